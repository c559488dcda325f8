#!/usr/bin/env bash
# Snakemake runs a copy of this script (under .snakemake/conda/, from the working directory) in
# the freshly created conda environment: install llama-pipe itself from the workflow's checkout,
# which the Snakefile exports as LLAMA_PIPE_SOURCE (the copy's own directory is not the
# checkout). Its dependencies come from the pinned environment file beside this script.
set -euo pipefail
repo="${LLAMA_PIPE_SOURCE:?LLAMA_PIPE_SOURCE is not set: create the environments through the workflow (snakemake --sdm conda --conda-create-envs-only)}"
python -m pip install --no-deps "$repo"
