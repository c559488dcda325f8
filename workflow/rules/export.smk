# Optional: the merged model as GGUF files for llama.cpp (llama-pipe export; docs/serving.md).
# `snakemake export` writes results/<run>/export/model.<type>.gguf for each type in
# export.all_types, or export.type when that list is empty;
# `snakemake results/default/export/model.q8_0.gguf` writes one.
# The default target (rule all) includes only the types listed in export.all_types ([] by default).

EXPORT_TYPES = config["export"]["all_types"]
EXPORT_DIR = f"{RUN_DIR}/export"
EXPORT_TARGETS = expand(f"{EXPORT_DIR}/model.{{type}}.gguf", type=EXPORT_TYPES)


localrules:
    export,


rule export:
    input:
        expand(
            f"{EXPORT_DIR}/model.{{type}}.gguf",
            type=EXPORT_TYPES or [config["export"]["type"]],
        ),


rule export_gguf:
    input:
        MERGED_TARGET,
    output:
        f"{EXPORT_DIR}/model.{{type}}.gguf",
    log:
        f"logs/{RUN}/export/{{type}}.log",
    wildcard_constraints:
        type="f16|q8_0|f32",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        args=flags("export", only=["format", "name"]),
    shell:
        "llama-pipe export {input:q} --type {wildcards.type} -o {output:q} {params.args} > {log:q} 2>&1"
