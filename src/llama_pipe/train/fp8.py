"""``train.base_storage: fp8``: the frozen base's linear layers held in FP8 (e4m3) and run on FP8 tensor cores.

Each frozen ``nn.Linear`` of the decoder (not the embeddings, norms or output head) becomes an
:class:`Fp8Linear`: its weight rounded once to e4m3 with one fp32 scale per output channel
(``W ~ diag(s) Wq``, ``s = amax(row) / 448``), 1 byte per parameter plus 4 per row. A LoRA (peft)
adapter wraps it as it wraps an ``nn.Linear``; the adapters stay fp32 (their GEMMs bf16 under
autocast, as on the float path).

A frozen weight needs two products per layer, both on FP8 tensor cores (``torch._scaled_mm``,
row-wise scales, bf16 output):

* forward ``y = x W^T``: ``x`` quantized per token (row) on the fly, ``y = diag(sx) (xq Wq^T) diag(s)``;
* input gradient ``dx = g W = (g diag(s)) Wq``: the weight's per-output-channel scale lies on the
  contracted dimension here, so it is folded into the gradient's columns first, and ``g diag(s)``
  is quantized per token: ``dx = diag(sg) (gq Wq)``. ``_scaled_mm`` takes its second operand
  column-major (K-major) only, so ``Wq`` is needed transposed: ``dgrad`` chooses how (measured in
  docs/benchmarks.md): ``"transpose"`` (default) copies the layer's ``Wq^T`` inside the backward
  and frees it (a transient of 1 byte per parameter of one projection); ``"tiles"`` makes the same copy with
  :func:`transpose_e4m3`, one tiled Triton kernel (built, checked exact under Triton's interpreter, not yet
  run or timed on a GPU: docs/benchmarks.md); ``"cached"`` keeps a second,
  transposed FP8 copy of every weight (2 bytes per parameter in all: the memory of a bf16 base),
  ``"dequant"`` runs the input gradient as a bf16 GEMM over ``diag(s) Wq`` dequantized per call.

No weight gradient is computed (the base is frozen) and nothing is saved for the backward pass
but the module itself. Quantizing an activation or a gradient is one Triton kernel per tensor
(row absmax, then scale, clamp and round to nearest even), or plain PyTorch off CUDA. On CPU the
layers compute the same rounded values with fp32 matmuls (tests); training refuses fp8 there and on
GPUs without FP8 tensor cores (compute capability below 8.9) with a :class:`ConfigError`.

Numerics: e4m3 keeps 3 mantissa bits, a relative rounding error of up to 2^-4 per element, so a
product over K terms has a relative error of about 2^-4 / sqrt(3) ~ 3-4% on random data (the same
for forward and input gradient); the training loss follows the bf16 base's within a fraction of a
percent (docs/benchmarks.md, "FP8 frozen base").
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from llama_pipe.core.errors import ConfigError

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: FP8 tensor cores (torch._scaled_mm)
Dgrad = Literal["transpose", "tiles", "cached", "dequant"]
#: the modules left in their float dtype (the fused loss uses the head's weight; embeddings are lookups).
SKIP = ("lm_head",)


def unsupported_reason(device: Any) -> str | None:
    """Why ``base_storage: fp8`` cannot train on ``device`` (a ``torch.device`` or its name), or None."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this PyTorch ({torch.__version__}) has no float8_e4m3fn / _scaled_mm"
    if device.type != "cuda":
        return f"it needs a CUDA GPU with FP8 tensor cores (compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper, " \
               f"Blackwell); the training device is {device.type}"
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU, and none is visible"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}) has no FP8 tensor cores; it needs "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper, Blackwell)")
    return None


def check_supported(device: Any, precision: str) -> None:
    """Raise :class:`ConfigError` when fp8 cannot train on ``device`` with compute ``precision``."""
    import os

    reason = unsupported_reason(device)
    sharded = [k for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if os.environ.get(k, "").lower() in ("1", "true")]
    if reason is None and sharded:  # accelerate launch sets these for FSDP / DeepSpeed configs
        reason = f"sharding FP8 weights under FSDP/DeepSpeed is not supported ({sharded[0]} is set); run on one GPU or under DDP"
    if reason is None and precision != "bf16":
        reason = f"its products are computed in bf16, and train.precision resolved to {precision}"
    if reason is not None:
        raise ConfigError(f"train.base_storage: fp8: {reason}; use base_storage float (or nf4/int8 to save memory)")


# ----------------------------------------------------------------------------- quantization

_built: dict[str, Any] = {}


def _triton(name: str, build: Any) -> Any:
    """Triton kernel ``name``, made by ``build(triton, tl)`` on first use and kept; None where Triton is missing."""
    if name not in _built:
        try:
            import triton
            import triton.language as tl
        except ImportError:  # pragma: no cover - the device image has Triton
            _built[name] = None
        else:
            _built[name] = build(triton, tl)
    return _built[name]


def _kernel() -> Any:
    """The Triton row-quantization kernel (built on first use), or None where Triton is missing."""
    return _triton("quant_rows", _build_quant_rows)


def _build_quant_rows(triton: Any, tl: Any) -> Any:
    @triton.jit
    def quant_rows(x_ptr, cs_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q,  # type: ignore[no-untyped-def]
                   HAS_CS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n_cols
            v = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_CS:
                v = v * tl.load(cs_ptr + offs, mask=m, other=0.0)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.maximum(tl.max(amax, axis=0), 1e-12)
        mul = 448.0 / a
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n_cols
            v = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_CS:
                v = v * tl.load(cs_ptr + offs, mask=m, other=0.0)
            v = tl.minimum(tl.maximum(v * mul, -448.0), 448.0)
            tl.store(q_row + offs, v.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=m)
        tl.store(s_ptr + row, a / 448.0)

    return quant_rows


def _transpose_kernel() -> Any:
    """The Triton tiled transpose of a 1-byte matrix (built on first use), or None where Triton is missing."""
    return _triton("transpose_tiles", _build_transpose)


def _build_transpose(triton: Any, tl: Any) -> Any:
    @triton.jit
    def transpose_tiles(src_ptr, dst_ptr, rows, cols,  # type: ignore[no-untyped-def]
                        BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
        m = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(src_ptr + r[:, None] * cols + c[None, :], mask=m)
        tl.store(dst_ptr + c[:, None] * rows + r[None, :], tl.trans(tile), mask=tl.trans(m))

    return transpose_tiles


def transpose_e4m3(w: torch.Tensor) -> torch.Tensor:
    """``w.t().contiguous()`` for a contiguous 2-D e4m3 tensor: one tiled Triton kernel (64 x 64 tiles of bytes) on
    CUDA, PyTorch's copy elsewhere. PyTorch's strided copy of a float8 tensor took 1.35 ms for a 7B layer's 0.39 GB
    on an H100 (~0.3 TB/s; docs/benchmarks.md); the kernel is dgrad ``"tiles"``, not the default until timed."""
    kernel = _transpose_kernel() if w.is_cuda else None
    if kernel is None or w.dim() != 2 or not w.is_contiguous():
        return w.t().contiguous()
    rows, cols = w.shape
    out = torch.empty((cols, rows), device=w.device, dtype=w.dtype)
    if w.numel():
        kernel[(-(-rows // 64), -(-cols // 64))](w.view(torch.uint8), out.view(torch.uint8), rows, cols, BR=64, BC=64, num_warps=4)
    return out


def quantize_rows(x: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D; times ``col_scale`` per column when given) as e4m3 with one fp32 scale per row.

    Returns ``(q, s)`` with ``x * col_scale ~ s * q``, ``s`` of shape ``rows x 1`` (what ``_scaled_mm``
    takes as a row-wise scale). One Triton kernel on CUDA; plain PyTorch elsewhere (same rounding:
    to nearest even after clamping to +-448).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_rows wants a 2-D tensor, got {tuple(x.shape)}")
    kernel = _kernel() if x.is_cuda else None
    if kernel is None:
        v = x.float() if col_scale is None else x.float() * col_scale.float()
        amax = v.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
        q = (v * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q, amax / E4M3_MAX
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    if rows:
        block = min(4096, max(16, 1 << (cols - 1).bit_length()))
        cs = col_scale if col_scale is not None else s
        kernel[(rows,)](x, cs, q, s, cols, x.stride(0), q.stride(0), HAS_CS=col_scale is not None, BLOCK=block,
                        num_warps=8 if block >= 2048 else 4)
    return q, s


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float ``out x in`` weight as e4m3 plus one fp32 scale per output channel (1-D, ``out``), in fp32 arithmetic."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1).clamp(min=1e-12)
    q = (w32 * (E4M3_MAX / amax).unsqueeze(1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, (amax / E4M3_MAX).contiguous()


def _gemm(aq: torch.Tensor, a_s: torch.Tensor, b_t: torch.Tensor, b_s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``diag(a_s) (aq @ b_t) diag(b_s)`` for ``aq`` (M x K, row-major) and ``b_t`` (K x N, column-major).

    ``torch._scaled_mm`` on CUDA; elsewhere (tests) the same rounded operands multiplied in fp32.
    """
    if aq.is_cuda:
        return torch._scaled_mm(aq, b_t, scale_a=a_s, scale_b=b_s, out_dtype=dtype)
    return ((aq.float() @ b_t.float()) * a_s * b_s).to(dtype)


class Fp8Linear(nn.Linear):
    """A frozen linear layer held as e4m3 + per-output-channel fp32 scales; computes in ``compute_dtype``.

    ``weight`` is the e4m3 tensor (a frozen parameter, so ``model.parameters()`` and the memory
    counts see it); ``weight_scale`` the scales. ``compute_dtype`` is what peft reads to place
    the adapters (then upcast to fp32) and what the fast path's fused LoRA computes in.
    """

    fp8_base = True
    weight_scale: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16, dgrad: Dgrad = "transpose") -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no float weight is ever allocated
        self.out_features, self.in_features = qweight.shape
        self.weight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False))
        self.compute_dtype = compute_dtype
        self.dgrad: Dgrad = dgrad
        self._weight_t: torch.Tensor | None = None  # dgrad "cached": Wq^T, contiguous
        self._ones: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: Any = None, compute_dtype: torch.dtype = torch.bfloat16,
                    dgrad: Dgrad = "transpose") -> Fp8Linear:
        w = linear.weight.detach()
        if device is not None:
            w = w.to(device)
        q, s = quantize_weight(w)
        bias = None if linear.bias is None else linear.bias.detach().to(q.device)
        return cls(q, s, bias, compute_dtype, dgrad)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3, dgrad={self.dgrad}"

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``diag(s) Wq`` as a dense ``out x in`` tensor (fp32 arithmetic, rounded once to ``dtype``)."""
        return (self.weight.float() * self.weight_scale.unsqueeze(1)).to(dtype or self.compute_dtype)

    def fp8_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2 W^T (+ bias)`` for a 2-D ``x2`` (tokens x in), in ``compute_dtype``."""
        xq, xs = quantize_rows(x2)
        y = _gemm(xq, xs, self.weight.t(), self.weight_scale.view(1, -1), self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y

    def fp8_dgrad(self, g2: torch.Tensor) -> torch.Tensor:
        """``g2 W`` for a 2-D output gradient ``g2`` (tokens x out), in ``compute_dtype`` (see the module's ``dgrad``)."""
        if self.dgrad == "dequant":
            return g2.to(self.compute_dtype) @ self.dequantized()
        gq, gs = quantize_rows(g2, self.weight_scale)
        if self.dgrad == "cached":
            if self._weight_t is None or self._weight_t.device != self.weight.device:
                self._weight_t = self.weight.detach().t().contiguous()
            wt = self._weight_t
        else:
            w = self.weight.detach()  # in x out, row-major: its .t() is out x in column-major
            wt = transpose_e4m3(w) if self.dgrad == "tiles" else w.t().contiguous()
        if self._ones is None or self._ones.device != g2.device:
            self._ones = torch.ones((1, self.in_features), device=g2.device, dtype=torch.float32)
        return _gemm(gq, gs, wt.t(), self._ones, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self)


class _Fp8LinearFunction(torch.autograd.Function):
    """``y = x W^T`` over a frozen :class:`Fp8Linear`; the backward returns only ``dx``. Saves nothing but the module."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Fp8Linear) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        lead = x.shape[:-1]
        y = layer.fp8_mm(x.reshape(-1, x.shape[-1]))
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        dx = layer.fp8_dgrad(grad.reshape(-1, grad.shape[-1]))
        return dx.view(*grad.shape[:-1], layer.in_features).to(ctx.x_dtype), None


def is_fp8(module: nn.Module) -> bool:
    return getattr(module, "fp8_base", False) is True


def _gemm_ok(linear: nn.Linear) -> bool:
    """``_scaled_mm`` needs both dimensions of the weight divisible by 16."""
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def convert_model(model: nn.Module, device: Any, compute_dtype: torch.dtype = torch.bfloat16, dgrad: Dgrad = "transpose",
                  skip: tuple[str, ...] = SKIP) -> tuple[int, int]:
    """Replace every frozen ``nn.Linear`` of ``model`` (but ``skip``, and layers whose shape ``_scaled_mm``
    cannot take) by an :class:`Fp8Linear` on ``device``, one layer at a time (the float weight of a
    layer is freed as soon as its FP8 copy exists). Returns ``(converted, left in float)``."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip]
    done = kept = 0
    for name, lin in targets:
        if lin.weight.requires_grad and lin.weight.grad is not None:  # pragma: no cover - a trainable layer is never converted
            continue
        if not _gemm_ok(lin):
            kept += 1
            log.warning("base_storage fp8: %s (%d x %d) stays %s: FP8 GEMMs need dimensions divisible by 16", name,
                        lin.out_features, lin.in_features, lin.weight.dtype)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(lin, device, compute_dtype, dgrad))
        lin.weight = None  # type: ignore[assignment]  # drop the float copy now, not at the end
        done += 1
    return done, kept


def set_dgrad(model: nn.Module, dgrad: Dgrad) -> int:
    """Switch every :class:`Fp8Linear` of ``model`` to the input-gradient variant ``dgrad``; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.dgrad, m._weight_t = dgrad, None
            n += 1
    return n
