"""llama-pipe: LLaMA base model + raw chat logs -> fine-tuned, merged, evaluated chat model."""

__version__ = "0.1.0"
