"""bench/train_throughput.py's helpers that run without a GPU."""

from __future__ import annotations

import dataclasses

import pytest

from tests.bench.loader import load_bench


@pytest.fixture(scope="module")
def tt():
    return load_bench("train_throughput")


def _frames(name: str) -> list[dict]:
    return [{"filename": "/x/site-packages/torch/autograd/function.py", "line": 1, "name": "apply"},
            {"filename": f"/repo/src/{name}.py", "line": 7, "name": name}, {"filename": "??", "line": 0, "name": "c++"}]


def test_live_at_peak_replays_the_step_from_the_blocks_that_predate_it(tt) -> None:
    """A weight (kept) and a gradient from the previous step (freed during this one) predate the
    recording; the step allocates activations, frees some, and peaks before the last free."""
    snap = {
        "segments": [{"address": 0, "blocks": [
            {"address": 0, "size": 1000, "state": "active_allocated"},  # weight, alive throughout
            {"address": 5000, "size": 30, "state": "active_allocated"},  # allocated in the step, kept
        ]}],
        "device_traces": [[
            {"action": "free_completed", "addr": 2000, "size": 200},  # last step's gradient
            {"action": "alloc", "addr": 3000, "size": 500, "frames": _frames("forward")},
            {"action": "alloc", "addr": 4000, "size": 300, "frames": _frames("backward")},
            {"action": "free_requested", "addr": 3000, "size": 500},  # not a free yet: ignored
            {"action": "free_completed", "addr": 3000, "size": 500},
            {"action": "alloc", "addr": 5000, "size": 30, "frames": _frames("backward")},
            {"action": "free_completed", "addr": 4000, "size": 300},
        ]],
    }
    peak, at, n, rows = tt.live_at_peak(snap, {0: "frozen weights"})
    assert n == 6
    # 1000 + 200 at the start; the gradient goes (1000); +500; +300 = 1800 at event 2, the peak
    assert (peak, at) == (1800, 2)
    assert dict(rows) == {"frozen weights": [1000], "forward.py:7 forward": [500], "backward.py:7 backward": [300]}
    assert rows[0][0] == "frozen weights"


def test_ours_builds_the_trainer_through_its_public_session(tt, tiny_hf_model_dir, monkeypatch) -> None:
    """bench's "ours" cases time the model ``llama-pipe train`` builds (``train.session.build_session``),
    not a copy of its set-up: a tiny case on CPU goes through it and trains."""
    from llama_pipe.train import session

    built = []
    plain = session.build_session

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - test double
        built.append(plain(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(session, "build_session", spy)
    monkeypatch.setattr(tt, "TINY", str(tiny_hf_model_dir))
    row = tt.run_ours(dataclasses.replace(tt.CASES["tiny_lora"], seq=64, bs=2))
    assert len(built) == 1 and built[0].trainable > 0
    assert row["tok_per_s"] > 0 and row["loss_last"] < row["loss_first"], row
