"""Chat templates, in one place: what a template is (``base``), the built-in formats (``builtin``),
a model's own Jinja (``model``, rendered sandboxed by ``jinja``), control tokens in message text
(``control_tokens``) and the one rule that resolves ``chat.template: auto`` for every stage
(``resolve``)."""
