"""The memory planner (train.memory: auto), on CPU with fake card sizes: what a user relies on is
that the plan fits the card it was given, gets no worse with more memory, and keeps what they
fixed (or says clearly why it cannot)."""

from __future__ import annotations

import pytest

from llama_pipe.train import planner as P

LLAMA_7B = P.ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def _run(storage: str = "nf4", r: int = 8, seq: int = 512, rows: int = 4, method: str = "lora", **kw: object) -> P.RunShape:
    """LoRA r8 on all linear layers of LLaMA-7B over a ``storage`` base (float, nf4 or int8)."""
    return P.RunShape(LLAMA_7B, storage, method, r, ("all-linear",), seq, rows, 0.05, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("storage", ["nf4", "int8", "float"])
def test_plans_never_exceed_the_budget_and_improve_with_memory(storage: str) -> None:
    run = _run(storage)
    last_cost = float("inf")
    fitted = 0
    for gib in range(6, 150, 2):
        budget = P.budget_bytes(gib, "cuda")
        try:
            plan, pred = P.choose(run, budget)
        except P.PlanError:
            assert fitted == 0, f"{storage}: a plan fitted a smaller card but none fits {gib} GiB"
            continue
        fitted += 1
        assert pred.peak * (1 + P.MARGIN) + P.SLACK <= budget
        assert pred.peak == P.predict(run, plan).peak
        cost = P.step_cost(run, plan)
        assert cost <= last_cost, f"{storage}: {gib} GiB got a slower plan than a smaller card"
        last_cost = cost
    assert fitted > 0


def test_the_seed_cards_get_a_plan_and_the_whole_h200_no_recompute() -> None:
    for storage, gib in (("nf4", 8), ("nf4", 16), ("int8", 16), ("float", 24), ("nf4", 24)):
        plan, pred = P.choose(_run(storage), P.budget_bytes(gib, "cuda"))
        assert pred.peak < gib * P.GiB
        assert plan.micro_batch * plan.grad_accum == 4  # the step's rows are the user's
    plan, _ = P.choose(_run("nf4", r=64, seq=1024, rows=8), P.budget_bytes(139, "cuda"))
    assert plan.keep_layers == 32 and plan.micro_batch == 8 and plan.checkpointing(32) == "none"
    small, _ = P.choose(_run("nf4"), P.budget_bytes(8, "cuda"))
    assert small.keep_layers < 32  # 8 GiB needs recompute at 7B


def test_bf16_lora_7b_on_8_gib_is_refused_with_what_to_change() -> None:
    with pytest.raises(P.PlanError, match=r"no plan fits 7\.5 GiB.*use base_storage nf4.*memory: manual"):
        P.choose(_run("float"), P.budget_bytes(8, "cuda"))


def test_explicit_settings_are_kept_or_refused_clearly() -> None:
    run = _run("nf4", in_backward_ok=True)
    budget = P.budget_bytes(24, "cuda")
    plan, _ = P.choose(run, budget, P.Pins(gradient_checkpointing=True, optimizer="adamw_8bit"))
    assert plan.keep_layers == 0 and plan.optimizer == "adamw_8bit"
    plan, _ = P.choose(run, budget, P.Pins(optimizer="adamw", in_backward=True))
    assert (plan.optimizer, plan.in_backward, plan.grad_accum) == ("adamw", True, 1)
    # bf16 LoRA on a 16 GiB card fits only with recompute: pinning it off says which setting is in the way.
    with pytest.raises(P.PlanError, match="with train.gradient_checkpointing: False.*leave those settings unset"):
        P.choose(_run("float"), P.budget_bytes(16, "cuda"), P.Pins(gradient_checkpointing=False))


def test_in_backward_and_8bit_only_where_they_can_run() -> None:
    cpu = _run("float", device="cpu", fast=False)
    assert {(p.optimizer, p.in_backward) for p in P.candidates(cpu)} == {("adamw", False)}
    assert all(not p.offload for p in P.candidates(cpu))
    gpu = _run("nf4", in_backward_ok=True)
    assert all(p.grad_accum == 1 for p in P.candidates(gpu) if p.in_backward)
    assert {p.optimizer for p in P.candidates(gpu)} == {"adamw", "adamw_8bit"}


def test_step_down_keeps_the_optimizer_and_lowers_the_peak() -> None:
    run = _run("nf4")
    plan, pred = P.choose(run, P.budget_bytes(24, "cuda"))
    lower = P.step_down(run, plan)
    assert lower is not None
    assert (lower.optimizer, lower.in_backward) == (plan.optimizer, plan.in_backward)
    assert P.predict(run, lower).peak <= P.STEP_DOWN * pred.peak
    smallest = min(P.candidates(run), key=lambda p: P.predict(run, p).peak)
    assert P.step_down(run, smallest) is None or P.predict(run, P.step_down(run, smallest)).peak < P.predict(run, smallest).peak


def test_memory_model_parts_follow_the_settings() -> None:
    base = P.Plan(4, 1, 0, True, "adamw", False)
    q, lo = P.predict(_run("nf4"), base), P.predict(_run("float"), base)
    assert lo.parts["weights"] > 3 * q.parts["weights"]  # bf16 vs nf4
    r64 = P.predict(_run("nf4", r=64), base)
    assert r64.parts["optimizer"] == 8 * r64.parts["adapter"] // 4  # AdamW: two fp32 moments per parameter
    eight = P.predict(_run("nf4", r=64), P.Plan(4, 1, 0, True, "adamw_8bit", False))
    assert eight.parts["optimizer"] * 4 == r64.parts["optimizer"]
    kept = P.predict(_run("nf4"), P.Plan(4, 1, 32, False, "adamw", False))
    assert kept.parts["kept activations"] == 32 * 4 * 512 * P.activation_bytes_per_token(_run("nf4"))
    inb = P.predict(_run("nf4", r=64), P.Plan(4, 1, 0, True, "adamw", True))
    assert inb.parts["gradients"] < r64.parts["gradients"] / 100


def test_model_shape_from_config_json_and_a_clear_error() -> None:
    cfg = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 2000}
    shape = P.ModelShape.from_config(cfg)
    assert shape.linears()["k_proj"] == (64, 32)
    with pytest.raises(P.PlanError, match="config.json: cannot read the model shape.*memory: manual"):
        P.ModelShape.from_config({"hidden_size": 64})


def test_auto_fp32_counts_a_quantised_base_s_outer_weights_in_fp32() -> None:
    """kernels auto-fp32 leaves the embeddings, norms and head of an nf4 base in fp32: 2 bytes more each."""
    bf16, fp32 = P.weight_bytes(_run("nf4")), P.weight_bytes(_run("nf4", frozen_fp32=True))
    assert fp32 - bf16 == 2 * LLAMA_7B.outer_params()
    assert P.weight_bytes(_run("float", frozen_fp32=True)) == P.weight_bytes(_run("float"))  # a float base: bf16 either way


def test_on_cpu_the_log_says_the_prediction_is_tensors_not_rss(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """On CPU the planner predicted 3.79 GiB where the process's RSS reached 8.3-9.1 GB: its figure
    is the training tensors as the GPU model counts them. The log line says so, with the measured
    ratio; on a GPU (what it was calibrated on) it does not."""
    import json
    import logging

    from llama_pipe.config import TrainSettings
    from llama_pipe.train import memory

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))  # SmolLM2-135M
    with caplog.at_level(logging.INFO, logger="llama_pipe.train"):
        planned = memory.plan_run(TrainSettings(gpu_memory_gib=20.0), 512, tmp_path, "cpu", 1, False)
    line = next(r.getMessage() for r in caplog.records if "train.memory auto" in r.getMessage())
    assert planned.prediction is not None and 3.7 < planned.prediction.peak / P.GiB < 3.9, line
    assert "predicted peak 3.79 GiB" in line
    assert "on CPU that counts the training tensors as on a GPU, not the process's memory (RSS)" in line
    assert "peaked at 8.54 GiB RSS for a predicted 3.79 GiB, 2.25x" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llama_pipe.train"):
        memory.plan_run(TrainSettings(gpu_memory_gib=20.0), 512, tmp_path, "cuda", 1, False)
    assert "RSS" not in " ".join(r.getMessage() for r in caplog.records)
