"""``torch.compile`` of the UNet call for training and sampling (``train.compile``, ``sample.compile``).

What is compiled is a function that calls the UNet (``unet(sample, timestep, **kwargs)``),
not the module: the time gate's forward hooks then trace into the same graph as the
forward (``torch.compile(unet)`` would give the hooks frames of their own), and the
module, its parameters and its state-dict keys stay as they are (no ``_orig_mod.``
prefix in checkpoints). The adapters' ops are custom ops (``apo_fast::``) that trace
without a graph break, and the reference pass switches the adapters off as data
(:func:`apo_fast.adapters.adapters_disabled`), so policy and reference passes trace the
same code: one graph per grad mode and input shape, no recompiles between them.

On the CPU, Inductor's ``layout_optimization`` (convolutions turned channels_last) is
switched off for the compiled call: with torch 2.13's CPU build it gave weight gradients
of a tiny diffusers UNet that differ from eager by 100% (forward outputs equal), measured
here on 2026-12-02 (``tests/models/test_compile.py`` checks the gradients).

Shapes are static by default (``dynamic: false``): torch's automatic dynamic shapes turn a
graph dynamic after a shape change, and the dynamic backward of the demo UNet failed to
compile on the CPU (Inductor ``ValueRangeError: Invalid ranges [0:-1]``, torch 2.13, seen
in the full test suite after earlier compiles of other shapes).
"""
from __future__ import annotations

import types
from collections.abc import Callable

import torch

__all__ = ["compile_kwargs", "compiled_unet_call", "compile_seconds", "mark_step", "plain_unet_call"]


def compile_kwargs(cfg, device: torch.device) -> dict:
    """``torch.compile`` keyword arguments for a :class:`~apo_fast.config.schema.CompileConfig`."""
    kwargs: dict = {"fullgraph": cfg.fullgraph, "backend": cfg.backend, "dynamic": cfg.dynamic}
    if cfg.backend != "inductor":
        return kwargs
    if device.type == "cpu":
        # torch.compile takes a mode or options, not both: spell the mode out as its options
        options = dict(torch._inductor.list_mode_options(cfg.mode)) if cfg.mode != "default" else {}
        options["layout_optimization"] = False  # the module docstring: wrong gradients on the CPU
        kwargs["options"] = options
    else:
        kwargs["mode"] = cfg.mode
    return kwargs


def plain_unet_call(unet: torch.nn.Module) -> Callable:
    """``call(sample, timestep, kwargs) -> unet(sample, timestep, **kwargs).sample``, uncompiled:
    a new function object with a code object of its own around ``unet``'s call.

    Dynamo keeps one cache of compiled entries per code object, with a limit (8) after which
    a ``fullgraph`` compile fails; every new UNet (another run in the same process: the
    demo's APO and LoRA runs, ``eval``, tests) fails the old entries' guards (its forward
    hooks have new ids), so a shared code object would run out after eight UNets."""
    def unet_call(sample, timestep, kwargs):
        return unet(sample, timestep, **kwargs).sample

    return types.FunctionType(unet_call.__code__.replace(), unet_call.__globals__, unet_call.__name__,
                              unet_call.__defaults__, unet_call.__closure__)


def compiled_unet_call(unet: torch.nn.Module, cfg, device: torch.device) -> Callable:
    """``call(sample, timestep, kwargs) -> unet(sample, timestep, **kwargs).sample``, compiled
    as ``cfg`` says (``cfg.enabled`` false: the plain call)."""
    call = plain_unet_call(unet)
    if not cfg.enabled:
        return call
    return torch.compile(call, **compile_kwargs(cfg, device))


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (Dynamo's own timers: tracing plus the
    backend, forward and backward graphs). 0.0 where torch does not keep them."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    keys = ("_compile.compile_inner", "backward._backward_impl")
    return float(sum(sum(compilation_time_metrics.get(k, ())) for k in keys))


def mark_step(cfg) -> None:
    """Before each step of a ``reduce-overhead`` (CUDA-graph) run: tell the graph trees that the
    previous step's outputs may be overwritten."""
    if cfg.enabled and cfg.mode == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()
