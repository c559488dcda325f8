# Helpers shared by all the rule files (included first by the Snakefile) - config validation, the
# settings -> flags bridge, the shard list, the run name, resources, and the targets.

import hashlib
import json
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake.io import contains_wildcard
from snakemake.utils import min_version, validate

import yaml

# The checkout the workflow comes from (the Snakefile's directory): shipped defaults (sample data,
# accelerate configs, the default config.yaml) are found there, whatever the working directory.
WORKFLOW_ROOT = os.path.abspath(workflow.basedir)
# The settings code is read from that checkout, so Snakemake's own environment (e.g. with
# --sdm conda) needs only snakemake (which brings pyyaml and jsonschema), not llama-pipe.
if os.path.isdir(os.path.join(WORKFLOW_ROOT, "src", "llama_pipe")):
    sys.path.insert(0, os.path.join(WORKFLOW_ROOT, "src"))
# The conda post-deploy scripts run from a copy under .snakemake/conda/: they install llama-pipe
# from here (they inherit Snakemake's environment).
os.environ.update(LLAMA_PIPE_SOURCE=WORKFLOW_ROOT)

from llama_pipe.config import (
    SECTIONS,
    Config,
    config_schema,
    moved_key_errors,
    yaml_loader,
)
from llama_pipe.config.load import shared_value
from llama_pipe.config.checks import config_errors
from llama_pipe.core.errors import ConfigError
from llama_pipe.evaluation.retention import BENCHMARKS
from llama_pipe.core.settings import from_dict, performance_keys, shell_args, to_dict
from llama_pipe.stages import BY_NAME, DATA_STAGES, KEYED_STAGES

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


# Validate at load time against the schema generated from src/llama_pipe/config/ (errors name
# the key path), then complete every section with its defaults. Rules pass whole sections as
# flags, so a setting's default is part of a rule's params too: a changed value - in config.yaml,
# via --config, or a changed default in the code - changes the params and re-runs that rule and
# everything downstream of it.
#
# Errors are one line per bad key (an unknown key names the closest valid one) and include the
# cross-field checks the stages make (llama_pipe.config.checks), so a bad combination fails here,
# before any job is queued, not inside a GPU job.
# A value reached twice is a YAML alias (from a --configfile, which Snakemake read before this
# file ran): walking it as a tree, as validation does, could take billions of steps.
_shared = shared_value(dict(config))
if _shared is not None:
    raise WorkflowError(
        f"config: {_shared}: a YAML alias (*name); anchors and aliases are not allowed in a llama-pipe "
        "config (an alias can expand to billions of values); write the value out"
    )
config.update(typed_cli_values(dict(config), config_schema()))
try:
    # keys of an older config.yaml: say where they went
    _moved = moved_key_errors(config)
    if _moved:
        raise ConfigError("\n  ".join(_moved))
    _settings = from_dict(Config, config)
    _errors = config_errors(_settings)
    if _errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_errors))
except ConfigError as exc:
    raise WorkflowError(f"config: {exc}; fix config.yaml or --config") from None
validate(config, "../schemas/config.schema.yaml")
config.update(to_dict(_settings))


# ---------------------------------------------------------------- paths

# Settings that name files. A relative path is read against the working directory; one that is
# not there but is shipped with the workflow (the sample data, questions, tokenizer corpus,
# configs/accelerate/*.yaml) is read from the workflow's checkout, so `snakemake -s
# path/to/llama-pipe/Snakefile` and `--directory elsewhere` work with the defaults.
PATH_SETTINGS = (
    ("base", "tokenizer_corpus"),
    ("data", "inputs"),
    ("distill", "replay_prompts"),
    ("eval", "questions"),
    ("launch", "accelerate_config"),
    ("merge_adapter", "extra_adapters"),
)


def resolve_path(path):
    """``path`` as given, or the workflow's shipped file when only that one exists.

    A relative path that starts with '-' gets './' in front, so no stage reads it as an option.
    """
    if not isinstance(path, str) or os.path.isabs(path):
        return path
    if path.startswith("-"):
        path = os.path.join(".", path)
    if os.path.exists(path):
        return path
    shipped = os.path.join(WORKFLOW_ROOT, path)
    return shipped if os.path.exists(shipped) else path


for _section, _key in PATH_SETTINGS:
    _value = config[_section].get(_key)
    if isinstance(_value, list):
        config[_section][_key] = [resolve_path(v) for v in _value]
    elif _value is not None:
        config[_section][_key] = resolve_path(_value)


# Where input files whose names Snakemake would read as wildcards get a plain-named link.
INPUT_LINKS = os.path.join(".snakemake", "llama-pipe-inputs")


def as_input(path):
    """A path from config.yaml as a rule input that Snakemake reads as that file.

    Snakemake takes ``{x}`` anywhere in an input path for a wildcard (``data/{x}.json`` stops the
    workflow with a WildcardError, and it has no escape for file names). Such a file is given to
    the rule through a symbolic link with a plain name, ``.snakemake/llama-pipe-inputs/<hash of the
    path>/(x).json``; Snakemake follows the link for the file's time, so an edit still re-runs the
    rule, and the stage reads the file itself.
    """
    if not isinstance(path, str) or not contains_wildcard(path):
        return path
    if not os.path.exists(path):
        raise WorkflowError(f"config: input {path!r} not found")
    target = os.path.abspath(path)
    name = os.path.basename(target).replace("{", "(").replace("}", ")")
    digest = hashlib.sha256(target.encode()).hexdigest()[:12]
    link = os.path.join(INPUT_LINKS, digest, name)
    if not (os.path.islink(link) and os.readlink(link) == target):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return link


def as_inputs(paths):
    """:func:`as_input` of each path of a list (of a single path: a one-item list; None: none)."""
    if paths is None:
        return []
    return [as_input(p) for p in (paths if isinstance(paths, list) else [paths])]


def flags(section, only=None, skip=(), chat=()):
    """A params function giving the shell-quoted ``--key value`` flags of one config section.

    Nested keys are dotted (``--lora.r 8``). ``only`` keeps just those top-level keys, ``skip``
    drops some: a rule passes only the settings that influence its output, so changing another
    key of the same section does not re-run it. ``chat`` adds those keys of the ``chat`` section
    (the template, system prompt and row length every rendering stage shares). A function, not a
    string: Snakemake expands ``{...}`` in params strings as wildcards, which would mangle a value
    such as "{input}".
    """
    data = {
        key: value
        for key, value in config[section].items()
        if (only is None or key in only) and key not in skip
    }
    text = shell_args(data, SECTIONS[section])
    shared = {key: config["chat"][key] for key in chat}
    if shared:
        text = f"{text} {shell_args(shared, SECTIONS['chat'])}"
    return lambda wildcards: text


# The chat keys each rendering stage reads (flags(..., chat=...)).
CHAT_ALL = ("template", "system_prompt", "max_seq_len")
CHAT_RENDER = ("template", "system_prompt")


# ---------------------------------------------------------------- scatter / gather

N_SHARDS = config["data"]["shards"]
SHARDS = [f"{i:03d}" for i in range(N_SHARDS)]


def shard_paths(stage, suffix=".jsonl"):
    """Every shard's file of one data stage: <data_dir(stage)>/shard-000<suffix> ..."""
    return expand(
        "{directory}/shard-{shard}{suffix}",
        directory=data_dir(stage),
        shard=SHARDS,
        suffix=suffix,
    )


# ---------------------------------------------------------------- data directories
#
# Every data product lives in a directory keyed by what it was made from, so runs with other data
# settings (a sweep over data.inputs, clean or filter_lang settings) keep each other's products:
#
#   results/data/<stage>/<key>/...    logs/data/<stage>/<key>/...
#
# A stage's key is a short digest of the key of the stage before it and of this stage's own
# settings: exactly the flags its rule passes (DATA_PARAMS), plus data.inputs for merge, data.shards
# for shard and the base model's identity (the tokenizer) for split. A changed clean setting thus
# gives clean, filter_lang, split and gather new directories, while merge and shard keep theirs;
# switching back finds the old directories complete ("Nothing to be done"). The content of
# data.inputs is not part of the key: an edited input file re-runs merge into the same directory
# (Snakemake's mtime trigger), and what follows it, as before. Performance-only knobs (workers,
# split.batch_size) are not part of any key.

# The params of the keyed stages that take settings (their rules pass these, the keys hash them):
# the flags of each one's section (llama_pipe.stages: the keys it takes, and its chat keys), less
# the performance-only knobs (workers, split.batch_size: opt(..., performance=True)).
DATA_PARAMS = {
    stage.rule: flags(
        stage.section,
        only=stage.keys,
        skip=performance_keys(SECTIONS[stage.section]),
        chat=stage.chat,
    )
    for stage in KEYED_STAGES
    if stage.section is not None
}
# Each keyed stage and the stage whose products it reads (None: it reads data.inputs), from the
# registry (Stage.reads): a new data stage takes its place in the chain and its directory from
# data_dir() by its registry entry alone.
DATA_CHAIN = {
    stage.rule: stage.records_from.rule if stage.records_from else None
    for stage in KEYED_STAGES
}


def base_identity():
    """What names the base model (and so split's tokenizer): its source and, for the embedded tiny
    model, the settings it is built from; download-only knobs (retries, timeouts) are left out.
    """
    base = config["base"]
    keys = ("source", "revision", "model_size", "sha256")
    if base["source"] == "tiny":
        keys += ("tiny", "tokenizer_corpus")
    return {key: base.get(key) for key in keys}


def data_made_from(stage):
    """What one data stage's products are made from, besides its input stage's products."""
    made_from = {"params": DATA_PARAMS[stage](None) if stage in DATA_PARAMS else None}
    if stage == "merge":
        made_from["inputs"] = config["data"]["inputs"]
    elif stage == "shard":
        made_from["shards"] = N_SHARDS
    elif stage == "split":
        made_from["base"] = base_identity()
    elif stage == "distill":
        # the model the run trains: the base, or train.base_run's merged model
        made_from["base"] = RUN_BASE if BASE_RUN else base_identity()
    return made_from


_DATA_KEYS = {}


def data_key(stage):
    """The short digest (10 hex digits) naming one data stage's products (see above)."""
    if stage not in _DATA_KEYS:
        parent = DATA_CHAIN[stage]
        made_from = [
            stage,
            data_key(parent) if parent else None,
            data_made_from(stage),
        ]
        text = json.dumps(made_from, sort_keys=True, default=str)
        _DATA_KEYS[stage] = hashlib.sha256(text.encode()).hexdigest()[:10]
    return _DATA_KEYS[stage]


def data_dir(stage="gather"):
    """The directory of one data stage's products: results/data/<stage>/<key>. The default, gather's,
    holds the train and validation sets (train.jsonl, val.jsonl) training reads."""
    return f"results/data/{stage}/{data_key(stage)}"


def data_log(stage, name):
    """The log file ``name`` of one data stage's job, keyed like its products."""
    return f"logs/data/{stage}/{data_key(stage)}/{name}"


# ---------------------------------------------------------------- names and resources

RUN = config["train"]["run"]
# Directories of results/ shared by every run; a run's own products live in results/<run>/. (The
# data products are under results/data/<stage>/<key>/; merge ... split are where older versions
# kept them, still no run's name.)
SHARED_DIRS = (
    "base",
    "hf_base",
    "merge",
    "shard",
    "clean",
    "filter_lang",
    "split",
    "data",
)
if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", RUN) or RUN in SHARED_DIRS:
    raise WorkflowError(
        f"config: train.run {RUN!r} must be a plain name (letters, digits, '.', '_', '-') and not "
        f"one of the shared result directories ({', '.join(SHARED_DIRS)})"
    )
BASE_IS_TINY = config["base"]["source"] == "tiny"
# train.base_run: this run trains on (and merges into) that earlier run's merged model.
BASE_RUN = config["train"]["base_run"]
if BASE_RUN is not None and (
    not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", BASE_RUN) or BASE_RUN in SHARED_DIRS
):
    raise WorkflowError(
        f"config: train.base_run {BASE_RUN!r} must name an earlier run (results/<run>/), not one of "
        f"the shared result directories ({', '.join(SHARED_DIRS)})"
    )


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
    return [config["launch"]["accelerate_config"]]


def train_command():
    """The command that starts training: ``llama-pipe train``, or for launch.processes > 1
    ``accelerate launch`` of the same stage (``--module llama_pipe train``: ``python -m llama_pipe``).
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
            "llama_pipe",
            "train",
        ]
    )


def worker_threads(section):
    """Threads of a job with a ``workers`` setting (merge, and per shard clean, filter_lang, split): ``workers``,
    or 2 when it is 0 ("all cores"); the rule passes ``--workers {threads}``.

    One job runs per shard, so "all cores" per job would oversubscribe the machine; the shards
    are what spreads the stage over cores and nodes. Snakemake caps threads at --cores; change it
    per run with --set-threads clean=N. ``workers`` is not a param: a performance-only knob
    re-runs nothing.
    """
    workers = config[section]["workers"]
    return workers if workers > 0 else 2


def stage_outputs(stage):
    """Named outputs of one per-shard data stage: the records, their stats and rejects."""
    directory = data_dir(stage)
    return {
        "data": f"{directory}/shard-{{shard}}.jsonl",
        "stats": f"{directory}/shard-{{shard}}.stats.json",
        "rejects": f"{directory}/shard-{{shard}}.rejects.jsonl",
    }


def records_in(rule):
    """The records a keyed stage reads: the output of the stage before it in the registry
    (``Stage.reads``) - for a per-shard stage that shard's file, for the stage after the last
    per-shard one every shard's. Read from the earlier rule, so that rule comes first in its file.
    """
    stage = BY_NAME[rule.replace("_", "-")]
    before = stage.records_from
    if not hasattr(rules, before.rule):
        raise WorkflowError(
            f"the {before.rule} job makes what {rule} reads: define it first (data.smk lists them in pipeline order)"
        )
    out = getattr(rules, before.rule).output
    if before.layout == "shards":
        pattern = f"{data_dir(before.rule)}/shard-{{shard}}.jsonl"
    elif before.layout == "sets":
        pattern = out.train
    else:
        pattern = out.data
    if "{shard}" in pattern and not stage.per_shard:
        return expand(pattern, shard=SHARDS)
    return pattern


# ---------------------------------------------------------------- targets

# The train and validation sets of this run's data settings (data_dir(): keyed by what they are made of).
DATA_DIR = data_dir("gather")
DATA_TARGETS = [f"{DATA_DIR}/train.jsonl", f"{DATA_DIR}/val.jsonl"]
BASE_TARGET = "results/hf_base"
RUN_DIR = f"results/{RUN}"
# What this run trains on, merges into and evaluates against: the converted base, or with
# train.base_run the merged model of that run (a chain: docs/workflow.md).
RUN_BASE = f"results/{BASE_RUN}/merged" if BASE_RUN else BASE_TARGET


def run_base(wildcards):
    """RUN_BASE as an input. Another run's merged model is made by that run's own snakemake call
    (its settings are its config), so it must exist; asked for only when a job needs it.
    """
    if BASE_RUN and not os.path.isdir(RUN_BASE):
        raise WorkflowError(
            f"train.base_run {BASE_RUN!r}: {RUN_BASE} not found; build that run first, with its own "
            f"settings (its config file, with train.run: {BASE_RUN}), then this one (docs/workflow.md)"
        )
    return RUN_BASE


TRAIN_TARGET = f"{RUN_DIR}/train"
SELECT_TARGET = f"{RUN_DIR}/select"
MERGED_TARGET = f"{RUN_DIR}/merged"
EVAL_TARGET = f"{RUN_DIR}/eval"
REPORT_TARGET = f"{RUN_DIR}/report"
# The training data train reads: distill's output, or gather's when distill.mode is off (no job).
# Keyed like the data products, by gather's, the distill settings and the model this run trains
# (results/hf_base, or with train.base_run that run's merged model): runs that share all three
# share it.
DISTILL_DIR = data_dir("distill")
DISTILL_TARGET = f"{DISTILL_DIR}/train.jsonl"
TRAIN_DATA = DISTILL_TARGET if config["distill"]["mode"] != "off" else DATA_TARGETS[0]
# The default target's inputs: every key product, not only the report. A product a failed or killed
# job removed (the train run after kill -9 or scancel) is then missing from the targets and is
# planned again, with everything downstream of it, even while an older report still exists.
KEY_PRODUCTS = [
    *DATA_TARGETS,
    BASE_TARGET,
    TRAIN_TARGET,
    SELECT_TARGET,
    MERGED_TARGET,
    EVAL_TARGET,
    REPORT_TARGET,
]


def stats_files():
    """Stats files of every data stage (llama_pipe.stages.DATA_STAGES), in pipeline order (the
    report's data funnel): the ``stats`` output of each one's rule, every shard's for a per-shard
    stage. Called after the data rules are defined (rules/data.smk is included first).
    """
    files = []
    for stage in DATA_STAGES:
        stats = getattr(rules, stage.rule).output.stats
        files += expand(stats, shard=SHARDS) if stage.per_shard else [stats]
    return files
