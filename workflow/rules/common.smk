# Helpers shared by all the rule files (included first by the Snakefile) - config validation, the
# settings -> flags bridge, the shard list, the run name, resources, and the targets.

import os
import shlex

from snakemake.utils import min_version, validate

import yaml

from llama_pipe.config import SECTIONS, Config, config_schema, yaml_loader
from llama_pipe.settings import from_dict, shell_args, to_dict

min_version("9.0")


def typed_cli_values(data, schema):
    """``data`` with --config strings read as YAML where the schema wants a non-string.

    Snakemake parses nested ``--config key='{...}'`` values with YAML's BaseLoader, which leaves
    every scalar a string (``train='{"lora": {"r": 16}}'`` gives r = "16"). Values from
    config.yaml are typed already and pass through unchanged.
    """
    if isinstance(data, dict):
        props = schema.get("properties", {})
        return {k: typed_cli_values(v, props.get(k, {})) for k, v in data.items()}
    if isinstance(data, list):
        return [typed_cli_values(v, schema.get("items", {})) for v in data]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    wants_string = "string" in types or any(
        isinstance(e, str) for e in schema.get("enum", [])
    )
    if isinstance(data, str) and (types or "enum" in schema) and not wants_string:
        return yaml.load(data, Loader=yaml_loader())
    if data in ("null", "~") and ("null" in types or None in schema.get("enum", [])):
        return None
    return data


# Validate at load time against the schema generated from src/llama_pipe/config.py (errors name
# the key path), then complete every section with its defaults. Rules pass whole sections as
# flags, so a setting's default is part of a rule's params too: a changed value - in config.yaml,
# via --config, or a changed default in the code - changes the params and re-runs that rule and
# everything downstream of it.
config.update(typed_cli_values(dict(config), config_schema()))
validate(config, "../schemas/config.schema.yaml")
config.update(to_dict(from_dict(Config, config)))


def flags(section, only=None, skip=()):
    """A params function giving the shell-quoted ``--key value`` flags of one config section.

    Nested keys are dotted (``--lora.r 8``). ``only`` keeps just those top-level keys, ``skip``
    drops some: a rule passes only the settings that influence its output, so changing another
    key of the same section does not re-run it. A function, not a string: Snakemake expands
    ``{...}`` in params strings as wildcards, which would mangle a value such as "{input}".
    """
    data = {
        key: value
        for key, value in config[section].items()
        if (only is None or key in only) and key not in skip
    }
    text = shell_args(data, SECTIONS[section])
    return lambda wildcards: text


def split_flags():
    """split's flags, measuring chunks with the template the trainer renders them with.

    ``split.template`` / ``split.system_prompt`` exist for running split by hand; in the
    workflow they always follow ``train.template`` / ``train.system_prompt``, so the two can
    never disagree (a chunk that fits ``split.max_length`` fits the trainer's rendering too).
    """
    data = dict(config["split"])
    data["template"] = config["train"]["template"]
    data["system_prompt"] = config["train"]["system_prompt"]
    text = shell_args(data, SECTIONS["split"])
    return lambda wildcards: text


# ---------------------------------------------------------------- scatter / gather

N_SHARDS = config["data"]["shards"]
SHARDS = [f"{i:03d}" for i in range(N_SHARDS)]


def shard_paths(stage, suffix=".jsonl"):
    """Every shard's file of one data stage: results/<stage>/shard-000<suffix> ..."""
    return expand(
        "results/{stage}/shard-{shard}{suffix}",
        stage=stage,
        shard=SHARDS,
        suffix=suffix,
    )


# ---------------------------------------------------------------- names and resources

RUN = config["train"]["run"]
BASE_IS_TINY = config["base"]["source"] == "tiny"


def gpus(section):
    """GPUs a job of this section asks the scheduler for: 0 unless its device is 'cuda'; then 1,
    or launch.processes for train.

    'auto' asks for none (it uses a GPU only where the node happens to have one); a cluster
    profile may still give a rule GPUs through set-resources.
    """
    if config[section].get("device") != "cuda":
        return 0
    return config["launch"]["processes"] if section == "train" else 1


def accelerate_config():
    """launch.accelerate_config as a path ([] with one process): an input of train, so an edit of
    that file re-runs training and a missing one fails before the job starts."""
    if config["launch"]["processes"] == 1:
        return []
    accel = config["launch"]["accelerate_config"]
    if not os.path.isabs(accel):
        accel = os.path.join(os.path.dirname(workflow.basedir), accel)
    return [accel]


def train_command():
    """The command that starts training: ``llama-pipe train``, or for launch.processes > 1
    ``accelerate launch`` of the same stage (``-m llama_pipe.train.loop`` takes train's flags).
    """
    launch = config["launch"]
    if launch["processes"] == 1:
        return "llama-pipe train"
    return shlex.join(
        [
            "accelerate",
            "launch",
            "--config_file",
            accelerate_config()[0],
            "--num_processes",
            str(launch["processes"]),
            "--main_process_port",
            str(launch["main_process_port"]),
            "--module",
            "llama_pipe.train.loop",
        ]
    )


def clean_threads():
    """Processes per clean job: clean.workers, or 2 when it is 0 ("all cores").

    One clean job runs per shard, so "all cores" per job would oversubscribe the machine; the
    shards are what spreads clean over cores and nodes. Snakemake caps threads at --cores; change
    it per run with --set-threads clean=N.
    """
    workers = config["clean"]["workers"]
    return workers if workers > 0 else 2


def stage_outputs(stage):
    """Named outputs of one per-shard data stage: the records, their stats and rejects."""
    return {
        "data": f"results/{stage}/shard-{{shard}}.jsonl",
        "stats": f"results/{stage}/shard-{{shard}}.stats.json",
        "rejects": f"results/{stage}/shard-{{shard}}.rejects.jsonl",
    }


# ---------------------------------------------------------------- targets

DATA_TARGETS = ["results/data/train.jsonl", "results/data/val.jsonl"]
BASE_TARGET = "results/hf_base"
TRAIN_TARGET = f"results/train/{RUN}"
MERGED_TARGET = "results/merged"
REPORT_TARGET = "results/report"


def stats_files():
    """Stats files of every data stage, in pipeline order (the report's data funnel)."""
    return (
        ["results/merge/merged.stats.json", "results/shard/shard.stats.json"]
        + shard_paths("clean", ".stats.json")
        + shard_paths("filter_lang", ".stats.json")
        + shard_paths("split", ".stats.json")
        + ["results/data/gather.stats.json"]
    )
