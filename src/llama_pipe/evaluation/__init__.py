"""The ``eval`` stage (``eval``) and what it scores with: the held-out questions (``heldout``) and
retention of what the base knew (``retention``)."""
