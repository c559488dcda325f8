# llama-pipe: a LLaMA-family base model plus raw chat logs -> a fine-tuned, merged, evaluated
# chat model. Every rule calls one `llama-pipe <stage>` command; see docs/workflow.md.
#
#   snakemake --profile profiles/local          # the whole DAG on this machine
#   snakemake --profile profiles/slurm          # the same DAG on a SLURM cluster


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        REPORT_TARGET,
