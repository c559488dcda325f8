"""``train.memory: auto``: pick the fastest training plan whose predicted peak memory fits the card.

A *plan* is what the trainer can change without changing the optimisation problem much:
how the step's rows are split into micro-batches, how many decoder layers keep their
activations for the backward pass (the others are recomputed, their inputs on the host when
the GPU fast path offloads them, else on the device), and the optimiser's state format
(AdamW in fp32, bitsandbytes' 8-bit AdamW, optionally updated inside the backward pass).

The memory model (bytes, all pure arithmetic on the model's ``config.json`` shape):

* frozen weights by base storage (float: bf16; nf4 = 0.5 byte + block scales; int8 = 1 byte; fp8 = 1 byte + a
  per-row fp32 scale), or fp32 for method full,
  embeddings / head / norms in bf16 on the fast path, else fp32 for 4/8-bit bases;
* adapter weights (fp32), their gradients (none kept with in-backward updates) and the
  optimiser state (8 bytes per parameter for AdamW, 2 for 8-bit AdamW);
* activations: ``act`` bytes per token per layer that keep what they saved for the backward,
  plus the inputs of recomputed layers when they stay on the device;
* the larger of two transients: the layer being (re)computed and differentiated
  (``BWD_FACTOR * act``, plus its dequantized weights for a 4/8-bit base, or for fp8 the transposed e4m3 copy
  of its largest weight and an e4m3 copy of its widest activation) and the loss
  (2k-token fp32 logits chunks on the fast path, full logits without it).

Constants were calibrated against ``torch.cuda.max_memory_allocated`` on an H200 (see
docs/benchmarks.md, "the memory planner"). A plan fits when ``peak * (1 + MARGIN) + SLACK`` is within
the budget; among those, the one with the lowest modelled step time wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

GiB = 1024**3
MARGIN = 0.10  # relative safety margin on the predicted peak
SLACK = int(0.5 * GiB)  # allocator fragmentation (reserved above allocated)
CUDA_CONTEXT = int(0.5 * GiB)  # taken by the CUDA context outside the allocator, per card
BWD_FACTOR = 1.35  # one layer's backward: its saved activations + their gradients
ACT_H = 5.0  # bf16 hidden-size tensors saved per token per layer (fast path) ...
ACT_I = 4.0  # ... and intermediate-size ones (gate, up, the SwiGLU product)
PLAIN_ACT = 1.9  # activations without the fast path (kernels: none), relative to the fast path
LOSS_CHUNK = 2048  # tokens per fused-loss chunk (llama_pipe.train.fast.loss)
STEP_DOWN = 0.8  # after an OOM: retry with a plan predicted at most this fraction of the failed one
OVERHEAD_TOKENS = 1024  # per-micro-batch fixed cost, in token-equivalents of a recompute-free layer stack
# On CPU the prediction is the GPU model's count of the training tensors, not the process's memory:
# fp32 compute instead of bf16, the CPU attention's score matrices, the allocator and the runtime
# (torch, transformers) are not in it. Measured once (docs/benchmarks.md): SmolLM2-135M, 4 x 512
# tokens, LoRA r16 all-linear, fp32 on CPU: peak RSS 8.54 GiB for a predicted 3.79 GiB.
CPU_RSS_MEASURED = (8.54, 3.79)

Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_8bit"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """No plan fits (or the user's fixed settings leave none that fits); the message says what to change."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-family ``config.json`` that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), heads,
                       int(cfg.get("num_key_value_heads") or heads), int(cfg["vocab_size"]),
                       bool(cfg.get("tie_word_embeddings", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"config.json: cannot read the model shape ({exc!r}); set train.memory: manual") from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each adaptable projection of one decoder layer."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values())

    def outer_params(self) -> int:
        """Embeddings, head and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)


@dataclass(frozen=True)
class RunShape:
    """What the user asked for, as far as memory is concerned."""

    model: ModelShape
    storage: Literal["float", "nf4", "int8", "fp8"]  # train.base_storage
    method: Literal["lora", "dora", "full"]  # train.method (DoRA's magnitude vectors are not modelled: under 0.1%)
    lora_r: int
    targets: tuple[str, ...]
    seq_len: int
    rows_per_step: int  # micro_batch_size * grad_accum of the settings: kept by every plan
    dropout: float = 0.0
    fast: bool = True  # the GPU fast path (kernels: auto) is on
    device: Literal["cuda", "cpu"] = "cuda"
    eight_bit_ok: bool = True  # bitsandbytes' 8-bit AdamW can run here
    in_backward_ok: bool = False  # max_grad_norm 0, on_nonfinite stop, no fp16, one process
    frozen_fp32: bool = False  # kernels: auto-fp32 keeps a quantised base's embeddings, norms and head fp32

    def adapted(self) -> dict[str, tuple[int, int]]:
        lin = self.model.linears()
        if "all-linear" in self.targets:
            return lin
        return {t: lin[t] for t in self.targets if t in lin}

    def trainable(self) -> int:
        if self.method == "full":
            return self.model.layers * self.model.layer_params() + self.model.outer_params()
        return self.model.layers * sum(self.lora_r * (a + b) for a, b in self.adapted().values())

    def largest_trainable_tensor(self) -> int:
        if self.method == "full":
            return self.model.vocab * self.model.hidden
        return max((self.lora_r * max(a, b) for a, b in self.adapted().values()), default=0)


@dataclass(frozen=True)
class Plan:
    """One way to run the step. ``keep_layers``: decoder layers that keep their activations
    (all of them: no checkpointing; 0: every layer recomputed); ``offload``: recomputed layers'
    inputs wait in host memory."""

    micro_batch: int
    grad_accum: int
    keep_layers: int
    offload: bool
    optimizer: Optimizer
    in_backward: bool

    def checkpointing(self, layers: int) -> str:
        if self.keep_layers >= layers:
            return "none"
        kind = "offload" if self.offload else "full"
        return kind if self.keep_layers == 0 else f"partial ({self.keep_layers} of {layers} layers kept, rest {kind})"

    def describe(self, layers: int) -> str:
        opt = self.optimizer + (" in-backward" if self.in_backward else "")
        return (f"micro-batch {self.micro_batch} x {self.grad_accum}, checkpointing {self.checkpointing(layers)}, "
                f"optimizer {opt}")


@dataclass(frozen=True)
class Prediction:
    """Predicted peak of a plan, by part (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        items = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.peak / GiB:.2f} GiB ({items})"


@dataclass(frozen=True)
class Pins:
    """Settings the user fixed (None: the planner chooses)."""

    gradient_checkpointing: bool | None = None
    optimizer: str | None = None
    in_backward: bool | None = None


# ----------------------------------------------------------------------------- memory model


def weight_bytes(run: RunShape) -> int:
    m = run.model
    inner = m.layers * m.layer_params()
    if run.method == "full":  # fp32 master weights
        per = outer = 4.0
    else:
        per = {"float": 2.0, "nf4": 0.5 + 1 / 64, "int8": 1.0 + 4 / m.hidden, "fp8": 1.0 + 4 / m.hidden}[run.storage]
        outer = 2.0 if run.storage in ("float", "fp8") or (run.fast and not run.frozen_fp32) else 4.0
    return int(inner * per + m.outer_params() * outer)


def activation_bytes_per_token(run: RunShape) -> int:
    """What one decoder layer keeps per token for its backward pass when it is not recomputed."""
    m = run.model
    act = (ACT_H * m.hidden + ACT_I * m.intermediate) * 2.0
    adapted = run.adapted() if run.method != "full" else {}
    act += sum(run.lora_r * 2 for _ in adapted)  # the adapter's A outputs (bf16)
    if run.dropout > 0:
        act += sum(a for a, _ in adapted.values())  # dropout masks, one byte per input feature
    if not run.fast:
        act *= PLAIN_ACT
    return int(act)


def loss_bytes(run: RunShape, tokens: int) -> int:
    """The logits' share of the peak: fused 2k-token chunks, or full fp32 logits and their gradient."""
    v = run.model.vocab
    if run.fast:
        return min(tokens, LOSS_CHUNK) * v * 4 * 2
    return tokens * v * (2 + 4 + 4)


def predict(run: RunShape, plan: Plan) -> Prediction:
    """The plan's predicted peak (what ``torch.cuda.max_memory_allocated`` reports over a step)."""
    m = run.model
    n_train = run.trainable()
    tokens = plan.micro_batch * run.seq_len
    act = activation_bytes_per_token(run)
    opt_per = 2 if plan.optimizer != "adamw" else 8
    parts = {"weights": weight_bytes(run)}
    if run.method != "full":
        parts["adapter"] = n_train * 4
    parts["optimizer"] = n_train * opt_per
    parts["gradients"] = run.largest_trainable_tensor() * 4 if plan.in_backward else n_train * 4
    parts["kept activations"] = plan.keep_layers * tokens * act
    recomputed = m.layers - plan.keep_layers
    parts["layer inputs"] = 0 if plan.offload or recomputed == 0 else recomputed * tokens * m.hidden * 2
    backward = int(BWD_FACTOR * tokens * act) + (2 * tokens * m.hidden * 2 if plan.offload else 0)
    if run.storage == "fp8":  # the largest weight transposed (e4m3) for its input gradient, the widest activation in e4m3
        backward += max(a * b for a, b in m.linears().values()) + tokens * max(max(ab) for ab in m.linears().values())
    elif run.storage != "float":  # the layer's weights dequantized to bf16 for its GEMMs
        backward += 2 * max(a * b for a, b in m.linears().values()) * 2
    # The loss's logit chunks live at the end of the forward, the layer's backward after it: the larger counts.
    loss = loss_bytes(run, tokens)
    parts["backward of a layer" if backward >= loss else "loss"] = max(backward, loss)
    return Prediction(parts)


def fits(pred: Prediction, budget: int) -> bool:
    return pred.peak * (1 + MARGIN) + SLACK <= budget


def step_cost(run: RunShape, plan: Plan) -> float:
    """Modelled step time (arbitrary units): the frozen GEMMs cost 4 passes of the forward without
    recompute, 6 with; each micro-batch also has a fixed cost; in-backward updates cost ~8%."""
    layers = run.model.layers
    tokens = plan.micro_batch * run.seq_len
    per_token = (4 + 2 * (layers - plan.keep_layers) / layers) / 6
    cost = plan.grad_accum * (OVERHEAD_TOKENS + tokens * per_token)
    if plan.in_backward:
        cost *= 1.08
    if plan.optimizer != "adamw":
        cost *= 1.01  # about level with AdamW in speed: the exact fp32 state unless 8 bits buy more than 1%
    return cost


# ----------------------------------------------------------------------------- search


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _keep_options(layers: int) -> list[int]:
    return list(range(layers, -1, -1))


def candidates(run: RunShape, pins: Pins = Pins()) -> list[Plan]:
    """Every plan the trainer can run for ``run`` that respects ``pins``."""
    opts: list[tuple[str, bool]] = [("adamw", False)]
    if run.eight_bit_ok and run.device == "cuda":
        opts.append(("adamw_8bit", False))
    if run.in_backward_ok:
        opts += [(o, True) for o, _ in list(opts)]
    if pins.optimizer is not None:
        opts = [(pins.optimizer, ib) for ib in sorted({ib for _, ib in opts})]
    if pins.in_backward is not None:
        opts = [(o, ib) for o, ib in opts if ib == pins.in_backward] or [(o, pins.in_backward) for o, _ in opts[:1]]
    keeps = _keep_options(run.model.layers)
    if pins.gradient_checkpointing is True:
        keeps = [0]
    elif pins.gradient_checkpointing is False:
        keeps = [run.model.layers]
    offload = run.fast and run.device == "cuda"
    plans = []
    for mb in _divisors_desc(run.rows_per_step):
        ga = run.rows_per_step // mb
        for keep in keeps:
            for o, ib in opts:
                if ib and ga != 1:
                    continue
                plans.append(Plan(mb, ga, keep, offload and keep < run.model.layers, o, ib))  # type: ignore[arg-type]
    return plans


def choose(run: RunShape, budget: int, pins: Pins = Pins()) -> tuple[Plan, Prediction]:
    """The fastest plan (lowest :func:`step_cost`) whose prediction fits ``budget`` bytes.

    Raises :class:`PlanError` naming the smallest plan's prediction when none fits, and the
    pinned setting when only the user's fixed settings stand in the way.
    """
    plans = candidates(run, pins)
    fitting = [(step_cost(run, p), i, p) for i, p in enumerate(plans) if fits(predict(run, p), budget)]
    if fitting:
        _, _, best = min(fitting)
        return best, predict(run, best)
    smallest = min(plans, key=lambda p: predict(run, p).peak)
    pred = predict(run, smallest)
    need = (pred.peak * (1 + MARGIN) + SLACK) / GiB
    pinned = [f"{k}: {v}" for k, v in (("gradient_checkpointing", pins.gradient_checkpointing),
                                       ("optimizer", pins.optimizer), ("optimizer_in_backward", pins.in_backward))
              if v is not None]
    if pinned and any(fits(predict(run, p), budget) for p in candidates(run)):
        raise PlanError(f"train.memory auto: no plan fits {budget / GiB:.1f} GiB with train.{', train.'.join(pinned)} "
                        f"(smallest {pred.describe()}, {need:.1f} GiB with margin); leave those settings unset "
                        "(null) so the planner may choose them, or set train.memory: manual to run anyway")
    raise PlanError(f"train.memory auto: no plan fits {budget / GiB:.1f} GiB: the smallest, "
                    f"{smallest.describe(run.model.layers)}, needs {pred.describe()}, {need:.1f} GiB with margin; "
                    "use base_storage nf4, a smaller lora.r or fewer target_modules, a shorter chat.max_seq_len, a larger "
                    "train.gpu_memory_gib if the card has it, or set train.memory: manual to run anyway")


def step_down(run: RunShape, plan: Plan, pins: Pins = Pins()) -> Plan | None:
    """The plan to retry with after an out-of-memory error: the fastest plan with the same
    optimiser (so the checkpoint's optimiser state still loads) whose predicted peak is at most
    ``STEP_DOWN`` of this one's; None when there is none."""
    now = predict(run, plan).peak
    same = [p for p in candidates(run, pins) if (p.optimizer, p.in_backward) == (plan.optimizer, plan.in_backward)]
    lower = [(step_cost(run, p), i, p) for i, p in enumerate(same) if predict(run, p).peak <= STEP_DOWN * now]
    if not lower:
        lower = [(float(predict(run, p).peak), i, p) for i, p in enumerate(same) if predict(run, p).peak < now]
    return min(lower)[2] if lower else None



def budget_bytes(gpu_memory_gib: float, device: str) -> int:
    """What the allocator may use on a card of ``gpu_memory_gib`` (the CUDA context takes its share)."""
    return int(gpu_memory_gib * GiB) - (CUDA_CONTEXT if device == "cuda" else 0)
