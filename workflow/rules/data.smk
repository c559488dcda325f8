# Data stages, scattered over data.shards shards:
#   merge -> shard -> clean -> filter_lang -> split (one job per shard) -> gather
# Each stage writes <out>.jsonl plus <out>.stats.json and <out>.rejects.jsonl beside it.
#
# Only results/merge/merged.jsonl is temp(): the shards hold the same records, and every
# partial re-run below merge starts from the shards. The per-shard outputs of clean,
# filter_lang and split are kept on purpose: changing a setting of one stage re-runs that stage
# from its (kept) input instead of the whole chain.


rule merge:
    input:
        # braces escaped: an input named {x}.json is a file, not a wildcard
        as_inputs(config["data"]["inputs"]),
    output:
        data=temp("results/merge/merged.jsonl"),
        stats="results/merge/merged.stats.json",
        rejects="results/merge/merged.rejects.jsonl",
    log:
        "logs/merge/merge.log",
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        args=flags("merge"),
    shell:
        "llama-pipe merge -o {output.data:q} {params.args} -- {input:q} > {log:q} 2>&1"


rule shard:
    input:
        "results/merge/merged.jsonl",
    output:
        shards=shard_paths("shard"),
        stats="results/shard/shard.stats.json",
        rejects="results/shard/shard.rejects.jsonl",
    log:
        "logs/shard/shard.log",
    conda:
        "../envs/data.yaml"
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
        "results/shard/shard-{shard}.jsonl",
    output:
        **stage_outputs("clean"),
    log:
        "logs/clean/shard-{shard}.log",
    conda:
        "../envs/data.yaml"
    threads: worker_threads("clean")
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        args=flags("clean", skip=("workers",)),
    shell:
        "llama-pipe clean -o {output.data:q} --workers {threads} {params.args}"
        " -- {input:q} > {log:q} 2>&1"


rule filter_lang:
    input:
        "results/clean/shard-{shard}.jsonl",
    output:
        **stage_outputs("filter_lang"),
    log:
        "logs/filter_lang/shard-{shard}.log",
    conda:
        "../envs/data.yaml"
    threads: worker_threads("filter_lang")
    resources:
        mem_mb=1000,
        runtime=60,
    params:
        args=flags("filter_lang", skip=("workers",)),
    shell:
        "llama-pipe filter-lang -o {output.data:q} --workers {threads} {params.args}"
        " -- {input:q} > {log:q} 2>&1"


rule split:
    input:
        data="results/filter_lang/shard-{shard}.jsonl",
        tokenizer=BASE_TARGET,
    output:
        **stage_outputs("split"),
    log:
        "logs/split/shard-{shard}.log",
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
        # texts per tokenizer batch: a performance-only knob, so not a param (re-runs nothing)
        batch_size=config["split"]["batch_size"],
    params:
        # batch_size is passed as a resource; chunks are measured as training renders them
        args=flags("split", skip=("batch_size",), chat=CHAT_ALL),
    shell:
        # the fast tokenizer's thread pool (Rayon) gets the job's threads
        "RAYON_NUM_THREADS={threads} llama-pipe split -o {output.data:q}"
        " --tokenizer {input.tokenizer:q} {params.args} --batch_size {resources.batch_size}"
        " -- {input.data:q} > {log:q} 2>&1"


rule gather:
    input:
        shard_paths("split"),
    output:
        train=DATA_TARGETS[0],
        val=DATA_TARGETS[1],
        stats="results/data/gather.stats.json",
        rejects="results/data/gather.rejects.jsonl",
    log:
        "logs/gather/gather.log",
    conda:
        "../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        args=flags("data", only=("val_fraction", "seed")),
    shell:
        "llama-pipe gather --train {output.train:q} --val {output.val:q} {params.args}"
        " -- {input:q} > {log:q} 2>&1"
