"""The ground floor: what every stage stands on and that knows no stage, no model and no config.

``errors`` (the errors a user can fix), ``atomic`` (outputs that appear whole or not at all),
``records`` (the conversation record and its readers), ``hashing`` (file digests), ``sidecar``
(the ``llama_pipe.json`` beside a model or adapter), ``budget`` (time limits on untrusted work),
``settings`` (dataclass <-> JSON schema <-> flags) and ``stage_writer`` (kept + rejects + stats,
committed together). Modules here import only each other and the standard library.
"""
