"""``python -m llama_pipe STAGE ...``: the ``llama-pipe`` command without its console script. A
launcher starts training this way, one process per rank: ``accelerate launch ... --module
llama_pipe train --base ...`` (``workflow/rules/common.smk::train_command``)."""

import sys

from llama_pipe.cli import main

if __name__ == "__main__":  # pragma: no cover - run as a module
    sys.exit(main())
