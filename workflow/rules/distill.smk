# Self-distillation and replay between gather and train (docs/distill.md): the training split, its
# assistant replies rewritten by the base in its own words and the base's own answers to replay
# prompts added. Shared by the runs like the data (results/distill/): a sweep over train settings
# distills once. With distill.mode off there is no distill job: train reads gather's output. While
# it runs, finished replies are appended to train.partial.jsonl beside the outputs (not an output,
# so a killed job's re-run finds it and continues); the stage removes it when done.


rule distill:
    input:
        base=BASE_TARGET,
        train=DATA_TARGETS[0],
        # distill.replay_prompts null: the prompts bundled with the package
        replay_prompts=config["distill"]["replay_prompts"] or [],
    output:
        train=DISTILL_TARGET,
        stats="results/distill/train.stats.json",
        rejects="results/distill/train.rejects.jsonl",
    log:
        "logs/distill/distill.log",
    benchmark:
        "benchmarks/distill.tsv"
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=gpus("distill"),
    params:
        args=flags("distill", chat=CHAT_RENDER),
    shell:
        "llama-pipe distill --base={input.base:q} -o {output.train:q} {params.args}"
        " -- {input.train:q} > {log:q} 2>&1"
