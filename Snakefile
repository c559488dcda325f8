# llama-pipe: a LLaMA-family base model plus raw chat logs -> a fine-tuned, merged, evaluated
# chat model. Every rule calls one `llama-pipe <stage>` command; see docs/workflow.md.
#
#   snakemake --cores 2                          # the whole DAG on this machine
#   snakemake --profile profiles/slurm           # the same DAG on a SLURM cluster
#   snakemake -s path/to/llama-pipe/Snakefile .. # from another working directory
#
# The rules, the config schema and the report pages are under workflow/, the conda environments
# under envs/; config.yaml beside this file is the configuration.


import os
import sys

from snakemake.exceptions import WorkflowError

# config.yaml of the working directory, else the one shipped with the workflow (every key is
# optional; --configfile FILE and --config override it). A working directory laid out as before
# (config/config.yaml, no config.yaml) keeps being read, with a note saying where the file goes now.
CONFIG_FILE = "config.yaml"
if not os.path.exists(CONFIG_FILE):
    if os.path.exists(os.path.join("config", "config.yaml")):
        CONFIG_FILE = os.path.join("config", "config.yaml")
        print(
            "llama-pipe: reading config/config.yaml; the configuration is config.yaml in the working "
            "directory now (move the file there)",
            file=sys.stderr,
        )
    else:
        CONFIG_FILE = os.path.join(workflow.basedir, "config.yaml")

# Read it with llama-pipe's loader first, which refuses YAML aliases and deep nesting: Snakemake's
# own loader would expand an alias bomb (500 bytes standing for billions of values) before any
# later check could run. (A --configfile FILE is read by Snakemake before this file runs.)
SOURCE = os.path.join(os.path.abspath(workflow.basedir), "src")
if os.path.isdir(os.path.join(SOURCE, "llama_pipe")):
    sys.path.insert(0, SOURCE)
from llama_pipe.config.load import read_config_text
from llama_pipe.core.errors import ConfigError

# `snakemake --configfile F TARGET` reads TARGET as a second config file (--configfile takes every
# word after it). Snakemake loads them before this file runs, so a target that does not exist stops
# it there, with its own traceback; one that loads (a stats file under results/) reaches this
# check. Either way the fix is `--configfile F -- TARGET` (docs/workflow.md).
for _path in workflow.overwrite_configfiles or ():
    _given = os.path.relpath(_path)
    if _given.split(os.sep)[0] in ("results", "logs", "benchmarks", ".snakemake"):
        raise WorkflowError(
            f"--configfile {_given}: a product of the workflow, not a config file: --configfile takes every word "
            f"after it, so a target must follow `--`: snakemake --configfile FILE -- TARGET"
        )

if os.path.exists(CONFIG_FILE):
    try:
        read_config_text(CONFIG_FILE)
    except ConfigError as exc:
        raise WorkflowError(f"config: {exc}") from None


configfile: CONFIG_FILE


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        KEY_PRODUCTS,
        EXPORT_TARGETS,
