# Self-distillation and replay between gather and train (docs/distill.md): the training split, its
# assistant replies rewritten in the words of the model this run trains and that model's own answers
# to replay prompts added. That model is results/hf_base, or with train.base_run that run's merged
# model. The output is keyed like the data products (results/data/distill/<key>/, common.smk: by
# gather's key, the distill settings and that model), so runs that share them distill once and a
# sweep over distill settings keeps each one's. With distill.mode off there is no distill job:
# train reads gather's output. While it runs, finished replies are appended to train.partial.jsonl
# beside the outputs (not an output, so a killed job's re-run finds it and continues); the stage
# removes it when done.


rule distill:
    input:
        # results/hf_base, or the merged model of train.base_run (common.smk: run_base)
        base=run_base,
        train=records_in("distill"),
        # distill.replay_prompts null: the prompts bundled with the package
        replay_prompts=as_inputs(config["distill"]["replay_prompts"]),
    output:
        train=DISTILL_TARGET,
        stats=f"{DISTILL_DIR}/train.stats.json",
        rejects=f"{DISTILL_DIR}/train.rejects.jsonl",
    log:
        data_log("distill", "distill.log"),
    benchmark:
        f"benchmarks/data/distill/{data_key('distill')}/distill.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus("distill"),
    params:
        args=DATA_PARAMS["distill"],
    shell:
        "llama-pipe distill --base={input.base:q} -o {output.train:q} {params.args}"
        " -- {input.train:q} > {log:q} 2>&1"
