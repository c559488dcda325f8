# Fine-tuning and adapter merge. results/<run>/train/ holds the adapter and metrics.jsonl;
# results/<run>/merged/ is the product - neither is temp(). With train.base_run the run trains on
# results/<base_run>/merged and merges into it (a chain of runs). While train runs, its checkpoints live
# in results/<run>/train.ckpt/, outside the declared output: Snakemake deletes a job's outputs
# before it starts, and a re-run after a failure (or --retries on a cluster) must find them to
# continue (train.resume: auto; a checkpoint of other settings is not resumed).


rule train:
    input:
        # results/hf_base, or the merged model of train.base_run (common.smk: run_base)
        base=run_base,
        # gather's train.jsonl through distill (or directly when distill.mode is off)
        train=TRAIN_DATA,
        val=DATA_TARGETS[1],
        accelerate_config=as_inputs(accelerate_config()),
    output:
        run=directory(TRAIN_TARGET),
    log:
        f"logs/{RUN}/train.log",
    benchmark:
        f"benchmarks/{RUN}/train.tsv"
    # one more attempt (node failure, preemption, scancel): train resumes from its newest
    # checkpoint. The only rule with retries: elsewhere a failure is reported at once.
    retries: 1
    conda:
        "../../envs/train.yaml"
    # Snakemake gives the job OMP_NUM_THREADS={threads} (torch's CPU threads); a cluster profile
    # raises it with set-threads (the SLURM plugin asks for that many CPUs per task).
    threads: 2
    resources:
        # the default run (SmolLM2-135M, 4 x 512, fp32 on CPU) peaked at 9.2 GB RSS (docs/training.md)
        mem_mb=10000,
        runtime=240,
        gpu=gpus("train"),
    params:
        # llama-pipe train, or accelerate launch of it (config launch.processes > 1)
        command=lambda wildcards: train_command(),
        args=flags("train", chat=CHAT_ALL),
        # retention scored during training, as trained and at the weights select may give the adapter
        # (select.scale down to select.min_scale; select.bound is select's alone: changing it re-runs only select)
        select=flags(
            "select",
            only=(
                "retention",
                "items",
                "max_items",
                "batch_size",
                "scale",
                "min_scale",
            ),
        ),
    shell:
        "{params.command} --base={input.base:q} --train-data={input.train:q}"
        " --val-data={input.val:q} -o {output.run:q} {params.args} {params.select} > {log:q} 2>&1"


# Which evaluation checkpoint becomes the product: the best validation loss among those whose
# retention (scored during training) stays within select.bound of the base's, at weight
# select.scale (its LoRA update scaled). Reads JSON, links files, rewrites the adapter's tensors
# when scaled: no model is loaded.
rule select:
    input:
        TRAIN_TARGET,
    output:
        directory(SELECT_TARGET),
    log:
        f"logs/{RUN}/select.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        # torch and one copy of the adapter's tensors when select.scale rewrites them
        mem_mb=2000,
        runtime=10,
    params:
        args=flags("select", only=("retention", "bound", "scale", "min_scale")),
    shell:
        "llama-pipe select -o {output:q} {params.args} -- {input:q} > {log:q} 2>&1"


rule merge_adapter:
    input:
        # the model the adapter was trained on: merge-adapter refuses any other
        base=run_base,
        adapter=SELECT_TARGET,
        extra=as_inputs(config["merge_adapter"]["extra_adapters"]),
    output:
        directory(MERGED_TARGET),
    log:
        f"logs/{RUN}/merge_adapter.log",
    benchmark:
        f"benchmarks/{RUN}/merge_adapter.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        # a float copy of the base plus the adapters
        mem_mb=8000,
        runtime=60,
        gpu=gpus("train"),
    params:
        # the adapters, in order: the trained one, then merge_adapter.extra_adapters
        adapters=lambda wildcards, input: " ".join(
            shlex.quote(f"--adapter={path}") for path in [input.adapter, *input.extra]
        ),
        args=flags("merge_adapter", skip=("extra_adapters",), chat=CHAT_RENDER),
    shell:
        "llama-pipe merge-adapter --base={input.base:q} {params.adapters}"
        " -o {output:q} {params.args} > {log:q} 2>&1"
