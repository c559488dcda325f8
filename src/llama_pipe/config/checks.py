"""Checks that span several settings (the JSON schema checks each value on its own).

Each check is one function of the settings alone, so the same rule holds where it is called:
``workflow/rules/common.smk`` calls :func:`check_config` when the Snakefile loads (a bad
combination fails before any job is queued), and the stages call the per-section functions
(``llama-pipe train`` calls :func:`train_errors`) when run by hand.
"""

from __future__ import annotations

from llama_pipe.config import Config, DataSettings, MergeAdapterSettings, TrainSettings
from llama_pipe.core.errors import ConfigError


def train_errors(settings: TrainSettings, processes: int = 1) -> list[str]:
    """Combinations of ``train`` settings that cannot run, one message each (empty: fine).

    ``processes`` is the number of training processes (``launch.processes`` in the workflow,
    the launcher's process count in the stage).
    """
    errors: list[str] = []
    if settings.optimizer_in_backward:
        needs = []
        if settings.max_grad_norm > 0:
            needs.append(f"max_grad_norm: 0 (clipping needs every gradient first; it is {settings.max_grad_norm})")
        if settings.grad_accum != 1:
            needs.append(f"grad_accum: 1 (it is {settings.grad_accum})")
        if settings.on_nonfinite != "stop":
            needs.append("on_nonfinite: stop (a step cannot be skipped after its updates ran)")
        if settings.precision == "fp16":
            needs.append("precision bf16 or fp32 (fp16's gradient scaler unscales at the optimiser step)")
        if processes != 1:
            needs.append(f"one process (there are {processes}: DDP reduces gradients after the hooks)")
        if needs:
            errors.append("train.optimizer_in_backward needs " + "; ".join(needs))
    if settings.method == "full" and settings.base_storage != "float":
        errors.append(f"train.base_storage: {settings.base_storage} holds a frozen quantised base for adapters; method full "
                      "trains every weight, so it needs base_storage float")
    if settings.base_storage == "fp8":
        if settings.method == "dora":
            errors.append("train.base_storage: fp8 trains LoRA adapters (method lora); DoRA needs the base weight's column norms "
                          "in float at every step; use method lora, or base_storage float for dora")
        if settings.device == "cpu":
            errors.append("train.base_storage: fp8 needs a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, "
                          "Hopper); train.device is cpu: use base_storage float (or nf4/int8)")
        if settings.precision in ("fp32", "fp16"):
            errors.append(f"train.base_storage: fp8 computes its products in bf16; train.precision is {settings.precision} "
                          "(use bf16 or auto)")
    targets = list(settings.lora.target_modules)
    if "all-linear" in targets and len(targets) > 1:
        errors.append("train.lora.target_modules: 'all-linear' cannot be combined with module names")
    if settings.device == "cpu" and settings.precision == "fp16":
        errors.append("train.precision: fp16 needs a CUDA device (train.device is cpu; use fp32 or bf16)")
    if settings.device == "cpu" and settings.optimizer == "paged_adamw_8bit":
        errors.append("train.optimizer: paged_adamw_8bit pages through CUDA memory (train.device is cpu); use adamw_8bit or adamw")
    return errors


def merge_adapter_errors(settings: MergeAdapterSettings, adapters: int) -> list[str]:
    """Combinations of ``merge_adapter`` settings that cannot run with ``adapters`` adapters (the
    trained one plus ``extra_adapters`` in the workflow, the ``--adapter`` count by hand)."""
    errors: list[str] = []
    if settings.combine == "chain":
        if settings.weights:
            errors.append("merge_adapter.weights: weights are for combine cat or svd; a chain applies each adapter whole")
    elif len(settings.weights) != adapters:
        errors.append(f"merge_adapter.weights: combine {settings.combine} needs one weight per adapter ({adapters}), got "
                      f"{len(settings.weights)}: e.g. [{', '.join(['1.0'] * adapters)}]")
    if settings.svd_rank is not None and settings.combine != "svd":
        errors.append("merge_adapter.svd_rank: only combine svd truncates to a rank")
    return errors


def data_errors(settings: DataSettings) -> list[str]:
    """Errors of ``data.weights`` against ``data.inputs``."""
    w, n = settings.weights, len(settings.inputs)
    if not w:
        return []
    errors = []
    if len(w) != n:
        errors.append(f"data.weights: one weight per entry of data.inputs ({n}), got {len(w)}: e.g. [{', '.join(['1.0'] * n)}]")
    if any(x < 0 for x in w):
        errors.append(f"data.weights: weights must be >= 0, got {w}")
    elif not any(x > 0 for x in w):
        errors.append("data.weights: every weight is 0, so nothing would be trained on")
    return errors


def config_errors(cfg: Config) -> list[str]:
    """Every cross-field error of a whole configuration, one message each."""
    errors = train_errors(cfg.train, processes=cfg.launch.processes)
    errors += merge_adapter_errors(cfg.merge_adapter, 1 + len(cfg.merge_adapter.extra_adapters))
    errors += data_errors(cfg.data)
    if cfg.train.base_run is not None and cfg.train.base_run == cfg.train.run:
        errors.append(f"train.base_run: {cfg.train.base_run!r} is this run (train.run); name the earlier run whose merged model "
                      "this one trains on")
    if cfg.split.max_length is not None and cfg.split.max_length > cfg.chat.max_seq_len:
        errors.append(f"split.max_length ({cfg.split.max_length}) is over chat.max_seq_len ({cfg.chat.max_seq_len}): training "
                      "would cut those chunks; raise chat.max_seq_len, or leave split.max_length null to follow it")
    return errors


def check_config(cfg: Config, where: str = "") -> None:
    """Raise :class:`ConfigError` listing every cross-field error of ``cfg`` (prefixed ``where: ``)."""
    errors = config_errors(cfg)
    if errors:
        prefix = f"{where}: " if where else ""
        raise ConfigError(prefix + "\n  ".join(errors))
