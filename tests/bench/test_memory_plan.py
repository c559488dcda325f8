"""bench/memory_plan.py's table: an emulated card that ran out of memory must show as OOM (the
acceptance is "never OOMs"), the error column must be the planner's relative error, and the
whole-card ratio is taken against unsloth's row of the same shape from the same call's results."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench.loader import load_bench


def test_table_marks_oom_and_prints_the_prediction_error(tmp_path: Path) -> None:
    mp = load_bench("memory_plan")
    rows = [
        {"kind": "card", "mode": "qlora", "card_gib": 8, "r": 8, "seq": 512, "rows_per_step": 4, "plan": "p1",
         "predicted_gib": 6.09, "peak_gib": 6.05, "fits": True, "tok_per_s": 4510, "error_pct": 0.6},
        {"kind": "card", "mode": "int8", "card_gib": 16, "r": 8, "seq": 512, "rows_per_step": 4, "plan": "p2",
         "predicted_gib": 13.4, "peak_gib": 14.66, "fits": False, "error": "CUDA out of memory"},
        {"kind": "card", "mode": "qlora", "card_gib": 139.8, "r": 64, "seq": 1024, "rows_per_step": 8, "plan": "p3",
         "predicted_gib": 39.2, "peak_gib": 39.15, "fits": True, "tok_per_s": 16991, "error_pct": 0.1},
        {"kind": "calibrate", "mode": "qlora"},
    ]
    peers = tmp_path / "results.jsonl"
    peers.write_text("".join(json.dumps(r) + "\n" for r in [
        {"case": "unsloth_qlora_nf4_r64all_s1024_b8_ckpt", "peer": "unsloth", "tok_per_s": 11698, "peak_gib": 8.01},
        {"case": "bf16_r16all_s1024_b8_ckpt", "peer": "hf", "tok_per_s": 6418, "peak_gib": 18.49},
    ]))
    assert "16,991 tok/s" not in "".join(mp.table(rows))  # no ratio without the same call's unsloth rows
    text = mp.table(rows, mp.load_unsloth(peers)).splitlines()
    assert text[2] == "| qlora | 8 | p1 | yes | 4,510 | 6.09 | 6.05 | +0.6% |"
    assert text[3] == "| int8 | 16 | p2 | **OOM** | - | 13.4 | 14.66 | - |"
    assert text[4].startswith("| qlora (r64, 8 x 1024) | 139.8 | p3 | yes | 16,991 |")
    assert "qlora r64 on the whole card: 16,991 tok/s, 39.15 GiB = 1.45x unsloth's 11,698 tok/s (8.01 GiB)" in text
    assert sum(t.startswith("| ") for t in text) == 4  # header + the 3 card rows (no calibration row)
