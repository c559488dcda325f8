# Evaluation (base vs tuned perplexity, sample answers) and the report. The report's PNGs are
# registered with report(...), so `snakemake --report report.html` embeds them.


rule eval:
    input:
        base=BASE_TARGET,
        tuned=MERGED_TARGET,
        val=DATA_TARGETS[1],
        questions=config["eval"]["questions"],
    output:
        directory("results/eval"),
    log:
        "logs/eval/eval.log",
    conda:
        "../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=gpus("eval"),
    params:
        args=flags("eval"),
    shell:
        "llama-pipe eval --base {input.base:q} --tuned {input.tuned:q} --val {input.val:q}"
        " -o {output:q} {params.args} > {log:q} 2>&1"


rule report:
    input:
        run=TRAIN_TARGET,
        eval="results/eval",
        stats=stats_files(),
    output:
        report(
            directory(REPORT_TARGET),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="llama-pipe",
        ),
    log:
        "logs/report/report.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "llama-pipe report --train-metrics {input.run:q}/metrics.jsonl --stats {input.stats:q}"
        " --eval {input.eval:q}/metrics.json -o {output:q} > {log:q} 2>&1"
