"""Using a model: the terminal ``chat`` and the OpenAI-compatible ``serve`` (their streaming
generation, shared with ``eval``, is :mod:`llama_pipe.models.generation`)."""
