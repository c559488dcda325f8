# Fine-tuning and adapter merge. results/train/<run>/ holds the adapter and metrics.jsonl;
# results/merged/ is the product - neither is temp(). While train runs, its checkpoints live in
# results/train/<run>.ckpt/, outside the declared output: Snakemake deletes a job's outputs
# before it starts, and a re-run after a failure (or --retries on a cluster) must find them to
# continue (train.resume: auto; a checkpoint of other settings is not resumed).


rule train:
    input:
        base=BASE_TARGET,
        train=DATA_TARGETS[0],
        val=DATA_TARGETS[1],
        accelerate_config=accelerate_config(),
    output:
        run=directory(TRAIN_TARGET),
    log:
        f"logs/train/{RUN}.log",
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=gpus("train"),
    params:
        # llama-pipe train, or accelerate launch of it (config launch.processes > 1)
        command=lambda wildcards: train_command(),
        args=flags("train"),
    shell:
        "{params.command} --base {input.base:q} --train-data {input.train:q}"
        " --val-data {input.val:q} -o {output.run:q} {params.args} > {log:q} 2>&1"


rule merge_adapter:
    input:
        base=BASE_TARGET,
        adapter=TRAIN_TARGET,
        extra=config["merge_adapter"]["extra_adapters"],
    output:
        directory(MERGED_TARGET),
    log:
        "logs/merge_adapter/merge_adapter.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        # a float copy of the base plus the adapters
        mem_mb=8000,
        runtime=60,
        gpu=gpus("train"),
    params:
        # the adapters, in order: the trained one, then merge_adapter.extra_adapters
        adapters=lambda wildcards, input: " ".join(
            f"--adapter {shlex.quote(path)}" for path in [input.adapter, *input.extra]
        ),
        args=flags("merge_adapter", skip=("extra_adapters",)),
    shell:
        "llama-pipe merge-adapter --base {input.base:q} {params.adapters}"
        " -o {output:q} {params.args} > {log:q} 2>&1"
