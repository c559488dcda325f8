"""Base weights: the stages ``make-base``, ``download``, ``convert`` (Meta and GGUF to Hugging Face)
and ``export`` (to GGUF), and the formats, tokenizers and checks they share."""
