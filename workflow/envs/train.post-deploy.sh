#!/usr/bin/env bash
# Snakemake runs this inside the freshly created conda environment: install llama-pipe itself
# from this checkout (its dependencies come from the environment file beside this script).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python -m pip install --no-deps "$repo"
