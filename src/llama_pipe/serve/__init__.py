"""Using a model: shared streaming generation, the terminal ``chat`` and the OpenAI-compatible ``serve``."""
