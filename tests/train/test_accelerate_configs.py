"""The accelerate configs shipped for GPU users parse with accelerate and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize(
    "name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"), ("deepspeed_zero3", "DEEPSPEED")]
)
def test_config_parses(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(kind)
    if name == "deepspeed_zero3":
        # Without it the final adapter could not be gathered from the ZeRO-3 shards.
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"] is True
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
