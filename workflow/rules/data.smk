# Data stages, scattered over data.shards shards:
#   merge -> shard -> clean -> filter_lang -> split (one job per shard) -> gather
# (the order is llama_pipe.stages': each rule's input is records_in(), the output of the stage
# its registry entry reads; its params are DATA_PARAMS[rule], from its section and entry)
# Each stage writes <out>.jsonl plus <out>.stats.json and <out>.rejects.jsonl beside it, in
# results/data/<stage>/<key>/ (data_dir() in common.smk: keyed by what the products are made
# from, so runs with other data settings keep each other's products).
#
# Only merge's merged.jsonl is temp(): the shards hold the same records, and every
# partial re-run below merge starts from the shards. The per-shard outputs of clean,
# filter_lang and split are kept on purpose: changing a setting of one stage re-runs that stage
# from its (kept) input instead of the whole chain.


rule merge:
    input:
        # braces escaped: an input named {x}.json is a file, not a wildcard
        as_inputs(config["data"]["inputs"]),
    output:
        data=temp(f"{data_dir('merge')}/merged.jsonl"),
        stats=f"{data_dir('merge')}/merged.stats.json",
        rejects=f"{data_dir('merge')}/merged.rejects.jsonl",
    log:
        data_log("merge", "merge.log"),
    conda:
        "../../envs/data.yaml"
    threads: worker_threads("merge")
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        args=DATA_PARAMS["merge"],
    shell:
        "llama-pipe merge -o {output.data:q} --workers {threads} {params.args} -- {input:q} > {log:q} 2>&1"


rule shard:
    input:
        records_in("shard"),
    output:
        shards=shard_paths("shard"),
        stats=f"{data_dir('shard')}/shard.stats.json",
        rejects=f"{data_dir('shard')}/shard.rejects.jsonl",
    log:
        data_log("shard", "shard.log"),
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        # shard writes the whole directory (shards, stats, rejects) and renames it into place
        outdir=lambda wildcards, output: os.path.dirname(output.stats),
        n=N_SHARDS,
    shell:
        "llama-pipe shard --n {params.n} -o {params.outdir:q} -- {input:q} > {log:q} 2>&1"


rule clean:
    input:
        records_in("clean"),
    output:
        **stage_outputs("clean"),
    log:
        data_log("clean", "shard-{shard}.log"),
    conda:
        "../../envs/data.yaml"
    threads: worker_threads("clean")
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        args=DATA_PARAMS["clean"],
    shell:
        "llama-pipe clean -o {output.data:q} --workers {threads} {params.args}"
        " -- {input:q} > {log:q} 2>&1"


rule filter_lang:
    input:
        records_in("filter_lang"),
    output:
        **stage_outputs("filter_lang"),
    log:
        data_log("filter_lang", "shard-{shard}.log"),
    conda:
        "../../envs/data.yaml"
    threads: worker_threads("filter_lang")
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        args=DATA_PARAMS["filter_lang"],
    shell:
        "llama-pipe filter-lang -o {output.data:q} --workers {threads} {params.args}"
        " -- {input:q} > {log:q} 2>&1"


rule split:
    input:
        data=records_in("split"),
        tokenizer=BASE_TARGET,
    output:
        **stage_outputs("split"),
    log:
        data_log("split", "shard-{shard}.log"),
    conda:
        "../../envs/data.yaml"
    threads: worker_threads("split")
    resources:
        mem_mb=2000,
        runtime=60,
        # texts per tokenizer batch: a performance-only knob, so not a param (re-runs nothing)
        batch_size=config["split"]["batch_size"],
    params:
        # batch_size is passed as a resource; chunks are measured as training renders them
        args=DATA_PARAMS["split"],
    shell:
        # the job's threads are split's worker processes, one tokenizer thread (Rayon) each
        "RAYON_NUM_THREADS=1 llama-pipe split -o {output.data:q} --workers {threads}"
        " --tokenizer {input.tokenizer:q} {params.args} --batch_size {resources.batch_size}"
        " -- {input.data:q} > {log:q} 2>&1"


rule gather:
    input:
        records_in("gather"),
    output:
        train=DATA_TARGETS[0],
        val=DATA_TARGETS[1],
        stats=f"{DATA_DIR}/gather.stats.json",
        rejects=f"{DATA_DIR}/gather.rejects.jsonl",
    log:
        data_log("gather", "gather.log"),
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        args=DATA_PARAMS["gather"],
    shell:
        "llama-pipe gather --train {output.train:q} --val {output.val:q} {params.args}"
        " -- {input:q} > {log:q} 2>&1"


# `snakemake data`: the train and validation sets of these settings (and the base, whose tokenizer
# split uses), wherever their key puts them.
localrules:
    data,


rule data:
    input:
        DATA_TARGETS,
