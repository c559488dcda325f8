"""Fine-tuning: data (dataset), model (model), one step (step), checkpoints, the loop and its output."""
