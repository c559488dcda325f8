"""convert's output depends on its inputs and settings only, never on the environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _convert(meta_dir: Path, out: Path, offline: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HUB_OFFLINE"] = offline
    exe = Path(sys.executable).with_name("llama-pipe")
    proc = subprocess.run([str(exe), "convert", "-o", str(out), "--", str(meta_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_hf_hub_offline_does_not_change_the_converted_files(make_meta: Callable[..., Path], tmp_path: Path) -> None:
    meta_dir = make_meta()
    _convert(meta_dir, tmp_path / "offline", "1")
    _convert(meta_dir, tmp_path / "online", "0")
    offline = {p.relative_to(tmp_path / "offline"): p.read_bytes() for p in (tmp_path / "offline").rglob("*") if p.is_file()}
    online = {p.relative_to(tmp_path / "online"): p.read_bytes() for p in (tmp_path / "online").rglob("*") if p.is_file()}
    assert offline.keys() == online.keys()
    differing = sorted(str(name) for name in offline if offline[name] != online[name])
    assert not differing, f"files that depend on HF_HUB_OFFLINE: {differing}"
    assert b"local_files_only" not in offline[Path("tokenizer_config.json")]
