"""Activation checkpointing of decoder layers that keeps each layer's input in host memory.

With checkpointing on, the only activations kept between the forward and the backward pass are
the inputs of the decoder layers (for a 7B model at 8k tokens: 32 x 64 MiB = 2 GiB). This
checkpoint function copies each one to pinned host memory on a side CUDA stream as soon as the
layer has run, frees the device copy, and in the backward pass brings it back one layer ahead of
use (while the current layer recomputes), so the copies overlap with compute.

It plugs into transformers' ``GradientCheckpointingLayer`` (every decoder layer since
transformers 4.5x): after ``model.gradient_checkpointing_enable()``, :func:`install` replaces
each layer's ``_gradient_checkpointing_func``. On CPU tensors nothing moves: it is then a plain
re-entrant checkpoint (the CPU test checks gradients against no checkpointing).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


class _Stash:
    """One layer input: on the host (CUDA case) or kept as is (CPU case)."""

    __slots__ = ("__weakref__", "device", "host", "kept", "loaded", "prev", "ready")

    def __init__(self) -> None:
        self.kept: torch.Tensor | None = None
        self.host: torch.Tensor | None = None
        self.device: torch.device | None = None
        self.loaded: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.prev: weakref.ref[_Stash] | None = None


class HostOffloader:
    """Moves tensors to pinned host memory and back on one side stream, prefetching in reverse."""

    def __init__(self) -> None:
        self._stream: torch.cuda.Stream | None = None
        self._last: weakref.ref[_Stash] | None = None
        self.bytes_offloaded = 0

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def stash(self, t: torch.Tensor) -> _Stash:
        s = _Stash()
        if t.device.type != "cuda":
            s.kept = t
            return s
        side = self._side_stream(t.device)
        side.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
        t.record_stream(side)  # the device copy may be reused only once the copy is done
        s.host, s.device = host, t.device
        s.prev = self._last
        self._last = weakref.ref(s)
        self.bytes_offloaded += t.numel() * t.element_size()
        return s

    def _load(self, s: _Stash) -> None:
        assert s.host is not None and s.device is not None
        main = torch.cuda.current_stream(s.device)
        out = torch.empty(s.host.shape, dtype=s.host.dtype, device=s.device)  # owned by the main stream
        side = self._side_stream(s.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            out.copy_(s.host, non_blocking=True)
            s.ready = torch.cuda.Event()
            s.ready.record(side)
        s.loaded = out

    def fetch(self, s: _Stash) -> torch.Tensor:
        """The stashed tensor on its device; starts bringing back the one stashed before it."""
        if s.kept is not None:
            return s.kept
        if s.loaded is None:
            self._load(s)
        assert s.ready is not None and s.loaded is not None
        torch.cuda.current_stream(s.device).wait_event(s.ready)
        out, s.loaded, s.host = s.loaded, None, None
        prev = s.prev() if s.prev is not None else None
        if prev is not None and prev.host is not None and prev.loaded is None:
            self._load(prev)
        return out


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, run: Callable[..., Any], offloader: HostOffloader, anchor: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.offloader = offloader
        dev = hidden.device
        ctx.device_type = dev.type
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        ctx.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type))
        ctx.input_requires_grad = hidden.requires_grad
        with torch.no_grad():
            out = run(hidden)
        if not isinstance(out, torch.Tensor):
            raise TypeError("offloaded checkpointing needs a layer that returns one tensor")
        ctx.stash = offloader.stash(hidden.detach())
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, None, None, torch.Tensor | None]:
        hidden = ctx.offloader.fetch(ctx.stash).detach().requires_grad_(ctx.input_requires_grad)
        ctx.stash = None
        dev = hidden.device
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, dev)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        torch.autograd.backward(out, grad_out)
        return None, None, None, hidden.grad if ctx.input_requires_grad else None


def make_checkpoint_fn(offloader: HostOffloader) -> Callable[..., torch.Tensor]:
    """A ``_gradient_checkpointing_func(run, hidden_states)`` for transformers' layers."""
    # An input that requires grad, so the layer's adapter weights get gradients even when the
    # layer input does not (frozen embeddings) -- what enable_input_require_grads does otherwise.
    anchor = torch.zeros((), requires_grad=True)

    def checkpoint(run: Callable[..., Any], *args: Any) -> torch.Tensor:
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise TypeError("offloaded checkpointing expects the hidden states as the only positional argument")
        return _OffloadedCheckpoint.apply(run, offloader, anchor, args[0])

    checkpoint.offloader = offloader  # type: ignore[attr-defined]
    return checkpoint


def install(model: torch.nn.Module, offloader: HostOffloader | None = None) -> int:
    """Use offloaded checkpointing in every checkpointed decoder layer of ``model``; returns the count.

    Only layers whose checkpointing is already on (``gradient_checkpointing_enable()``) change.
    """
    offloader = offloader or HostOffloader()
    fn = make_checkpoint_fn(offloader)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer as layer_cls
    except ImportError:  # pragma: no cover - transformers < 4.52
        layer_cls = torch.nn.Module  # type: ignore[misc, assignment]
    n = 0
    for module in model.modules():
        if not isinstance(module, layer_cls) or module is model:
            continue
        if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn  # type: ignore[assignment]
            n += 1
    return n
