"""Choosing between the fused Triton kernels and the plain PyTorch reference.

The choice is made per call from the tensors' device and an override:

* ``backend=`` argument of a public function (``"auto"``, ``"triton"``, ``"torch"``),
  which a config field feeds;
* else the environment variable ``APO_FAST_BACKEND`` (same values);
* else ``"auto"``: Triton for CUDA tensors when Triton imports, PyTorch otherwise.

Forcing ``"triton"`` on CPU tensors is only possible under ``TRITON_INTERPRET=1``
(the Triton interpreter, used by the tests); without it a clear error is raised
instead of Triton's ``0 active drivers``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from apo_fast.config.choices import BACKENDS  # noqa: F401  (re-exported: the adapters name it)

ENV_VAR = "APO_FAST_BACKEND"


# Whether triton is installed: found once, without importing it (TRITON_INTERPRET must be set
# before the first import), a constant that torch.compile reads without tracing an import.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(override: str | None = None) -> str:
    """The backend asked for: the override if given, else the environment, else auto."""
    value = override if override is not None else os.environ.get(ENV_VAR, "auto")
    value = str(value).strip().lower()
    if value not in BACKENDS:
        source = "backend argument" if override is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return value


def use_triton(*tensors: torch.Tensor, override: str | None = None) -> bool:
    """True when the fused Triton path should run for these tensors."""
    want = requested_backend(override)
    if want == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if want == "auto":
        return on_cuda and triton_available()
    # want == "triton"
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' was requested for CPU tensors; the Triton kernels need CUDA "
            "tensors, or TRITON_INTERPRET=1 set before triton is imported (tests only)"
        )
    return True


def runs_triton(x: torch.Tensor) -> bool:
    """Whether a custom op (``apo_fast::``) called on ``x`` launches its Triton kernels: CUDA
    tensors, or plain CPU tensors under the interpreter; never the fake or functional CPU
    tensors of a trace, which take the PyTorch reference (Inductor then compiles it)."""
    if x.is_cuda:
        return True
    return interpreter_enabled() and type(x) is torch.Tensor
