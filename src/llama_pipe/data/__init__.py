"""The data stages: merge -> shard -> clean -> filter-lang -> split -> gather.

Each stage module (named after its stage) exposes ``add_arguments``/``run`` for the CLI and a plain function (``merge_files``, ``clean_file``, ``filter_file``,
``split_file``, ``shard_file``, ``gather_files``) for use from Python. All of them read JSONL
(or a JSON list), write JSONL atomically with a rejects and a stats file, and keep
``in == out + sum(rejected)``. See ``docs/data.md``.
"""
