"""Getting each sample's timestep from a model's forward call to its adapter layers.

One :class:`GateState` belongs to one model (an attribute of it, never a
global). A forward pre-hook on the model reads the ``timestep`` argument,
computes the per-sample gates once per forward (one ``(S, r)`` tensor per
adapter rank in use) and pushes them; every :class:`GatedLoRALinear` of that
model reads the top of the stack; a forward hook pops it again, also when the
forward raises.

Gradient checkpointing recomputes checkpointed blocks during backward, after
the model's forward has returned. For that the state remembers the gates of
each grad-enabled forward until a later forward finds its backward started
(a hook on the model's output) or its output freed. A recomputing layer uses
the gates of the forward whose backward is running; when two forwards with
different gates could both be running their backward, it raises instead of
guessing (concatenate such calls into one batch).

Under ``torch.compile`` none of that bookkeeping runs: a traced forward keeps its gates
as graph values (checkpointed blocks are recomputed inside the compiled backward from
them), so the hooks only push and pop the frame, and nothing in them breaks the graph.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from apo_fast.adapters.gates import GateConfig, TimestepGate

__all__ = ["GATE_MODULE_NAME", "STATE_ATTR", "GateState", "attach_gate", "install_gate", "get_gate_state"]

#: attribute name of the gate module on a model (a registered submodule).
GATE_MODULE_NAME = "taca_gate"
#: attribute name of the model's GateState.
STATE_ATTR = "_taca_gate_state"


@dataclass(eq=False)  # records are told apart by identity (they hold tensors)
class _ForwardRecord:
    gates: dict[int, torch.Tensor]
    output_ref: "weakref.ref | None" = None
    backward_started: bool = False

    def alive(self) -> bool:
        return self.output_ref is None or self.output_ref() is not None


@dataclass
class _Frame:
    gates: dict[int, torch.Tensor] | None = None  # None: constant gate (plain LoRA)
    constant: bool = True
    record: _ForwardRecord | None = None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


class GateState:
    """Per-model gates for the forward in progress (see the module docstring).

    Attributes:
        gate_config: the model's gate settings.
        ranks: adapter ranks whose gates are computed each forward.
        adapter_config: the ``AdapterConfig`` of ``inject_adapters`` (else None).
        timestep_index / sample_name: where ``timestep`` and the batched sample
            are among the forward's arguments (set when the hooks are installed).
    """

    def __init__(self, gate_config: GateConfig, ranks=()) -> None:
        self.gate_config = gate_config
        self.ranks: set[int] = set(ranks)
        self.adapter_config = None
        self.hooked = False
        self.timestep_index = 1
        self.sample_name = ""
        self._stack: list[_Frame] = []
        self._records: list[_ForwardRecord] = []

    @property
    def constant(self) -> bool:
        """The gate is all ones: layers run a plain LoRA and need no timestep."""
        return self.gate_config.is_constant

    # -- reading, from the adapter layers ---------------------------------
    def gate_for(self, rank: int) -> torch.Tensor | None:
        """The ``(S, rank)`` gate of the forward in progress, or ``None`` (constant gate)."""
        if self.constant:
            return None
        if self._stack:
            frame = self._stack[-1]
            if frame.constant:
                return None
            if frame.gates is None:
                raise RuntimeError("the gate is read while the model's forward pre-hook is still computing it")
            return self._lookup(frame.gates, rank)
        if not _compiling() and _in_backward():
            return self._gate_for_recompute(rank)
        raise RuntimeError(
            "a time-gated adapter layer was called outside a forward of the model that owns its gate; "
            "call the model itself (e.g. unet(sample, timestep, ...)) so each sample's timestep reaches the gate"
        )

    def _lookup(self, gates: dict[int, torch.Tensor], rank: int) -> torch.Tensor:
        if rank not in gates:
            raise RuntimeError(f"no gate computed for rank {rank}; registered ranks are {sorted(self.ranks)}")
        return gates[rank]

    def _gate_for_recompute(self, rank: int) -> torch.Tensor | None:
        live = [r for r in self._records if r.alive()]
        started = [r for r in live if r.backward_started]
        candidates = started or live
        if not candidates:
            raise RuntimeError(
                "a time-gated adapter layer ran during backward (gradient checkpointing recompute) but no "
                "grad-enabled forward of its model is pending; its gate is unknown"
            )
        chosen = candidates[-1]
        if not chosen.gates:
            return None
        gate = self._lookup(chosen.gates, rank)
        for other in candidates[:-1]:
            other_gate = other.gates.get(rank) if other.gates else None
            if other_gate is None or not torch.equal(other_gate, gate):
                raise RuntimeError(
                    "gradient checkpointing recompute is ambiguous: several grad-enabled forwards with different "
                    "timestep gates are pending backward. Run them as one batched forward (or backward each "
                    "before the next forward)."
                )
        return gate

    # -- writing, from the model's hooks -----------------------------------
    def timesteps_from_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps (S,), sample)`` from a forward call's arguments."""
        if self.sample_name in kwargs:
            sample = kwargs[self.sample_name]
        elif args:
            sample = args[0]
        else:
            raise ValueError(f"the model's forward was called without its first argument {self.sample_name!r}")
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) > self.timestep_index:
            timestep = args[self.timestep_index]
        else:
            raise ValueError(
                "the model's forward was called without `timestep`; time-gated adapters need each sample's "
                "timestep (positional argument 1 or keyword `timestep`)"
            )
        if not isinstance(sample, torch.Tensor) or sample.dim() < 1:
            raise TypeError(f"the forward's first argument must be a batched tensor, got {type(sample).__name__}")
        num_samples = sample.shape[0]
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(sample.device)
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            t = torch.tensor(timestep, device=sample.device)
        else:
            raise TypeError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep must be integer or floating point, got dtype {t.dtype}")
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(num_samples)
        elif t.dim() != 1 or t.shape[0] != num_samples:
            raise ValueError(
                f"timestep must be a scalar or of shape ({num_samples},) for a batch of {num_samples} samples, "
                f"got shape {tuple(t.shape)}"
            )
        return t, sample

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        frame = _Frame()
        self._stack.append(frame)  # pushed first: the always-called post hook pops it even if we raise
        if self.constant:
            return
        gate_module = getattr(module, GATE_MODULE_NAME, None)
        if not isinstance(gate_module, TimestepGate):
            raise RuntimeError(f"the model has no `{GATE_MODULE_NAME}` gate module; it was removed or replaced")
        timesteps, _ = self.timesteps_from_call(args, kwargs)
        device = timesteps.device
        with torch.autocast(device.type, enabled=False):
            gates = {rank: gate_module(timesteps, rank) for rank in sorted(self.ranks)}
        frame.gates = gates
        frame.constant = False
        if _compiling():
            return  # the traced graph keeps its gates (module docstring)
        if torch.is_grad_enabled() and not _in_backward():
            self._records = [r for r in self._records if r.alive() and not r.backward_started]
            frame.record = _ForwardRecord(gates=gates)
            self._records.append(frame.record)

    def post_forward(self, module: nn.Module, args: tuple, output) -> None:
        if not self._stack:
            return
        frame = self._stack.pop()
        record = frame.record
        if record is None:
            return
        out = _first_tensor(output)
        if out is None or not out.requires_grad:
            self._records.remove(record)
            return
        record.output_ref = weakref.ref(out)
        out.register_hook(_MarkBackwardStarted(record))


class _MarkBackwardStarted:
    def __init__(self, record: _ForwardRecord) -> None:
        self.record = record

    def __call__(self, grad: torch.Tensor) -> None:
        self.record.backward_started = True


class _PreHook:
    """Forward pre-hook object (a plain callable so ``copy.deepcopy(model)`` copies it with the state)."""

    def __init__(self, state: GateState) -> None:
        self.state = state

    def __call__(self, module, args, kwargs):
        self.state.pre_forward(module, args, kwargs)
        return None


class _PostHook:
    def __init__(self, state: GateState) -> None:
        self.state = state

    def __call__(self, module, args, output):
        self.state.post_forward(module, args, output)
        return None


def _forward_signature(model: nn.Module) -> tuple[int, str]:
    """``(index of timestep among positional args, name of the first arg)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot inspect {type(model).__name__}.forward: {exc}") from exc
    positional = [
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if "timestep" not in [p.name for p in params] or not positional or positional[0] == "timestep":
        raise TypeError(
            f"{type(model).__name__}.forward must take (sample, timestep, ...) to carry time-gated adapters "
            "(e.g. a diffusers UNet2DConditionModel; attach to the UNet, not to a wrapper)"
        )
    # keyword-only timestep: never positional
    index = positional.index("timestep") if "timestep" in positional else len(params) + 1
    return index, positional[0]


def get_gate_state(model: nn.Module) -> GateState | None:
    """The model's GateState, or ``None`` if no gate is attached."""
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, GateState) else None


def attach_gate(model: nn.Module, gate: TimestepGate, ranks) -> GateState:
    """Give ``model`` a :class:`GateState` (``model._taca_gate_state``) with gate ``gate``.

    A non-constant gate is registered as the submodule ``model.taca_gate`` (so
    its parameters are the model's) together with the timestep hooks; this
    needs a ``forward`` with a ``timestep`` argument. A constant gate needs
    neither: nothing is registered and the model's forward is left alone.
    """
    if get_gate_state(model) is not None or hasattr(model, GATE_MODULE_NAME):
        raise ValueError(f"{type(model).__name__} already has a time gate attached")
    state = GateState(gate.config, ranks)
    install_gate(model, state, gate)
    setattr(model, STATE_ATTR, state)
    return state


def install_gate(model: nn.Module, state: GateState, gate: TimestepGate, ranks=None) -> None:
    """Make ``gate`` the gate of ``model`` (whose state is ``state``); see :func:`attach_gate`."""
    if not isinstance(gate, TimestepGate):
        raise TypeError(f"gate must be a TimestepGate, got {type(gate).__name__}")
    if not gate.is_constant and not state.hooked:
        state.timestep_index, state.sample_name = _forward_signature(model)  # raises before any change
        model.register_forward_pre_hook(_PreHook(state), with_kwargs=True)
        model.register_forward_hook(_PostHook(state), always_call=True)
        state.hooked = True
    if gate.is_constant:
        if hasattr(model, GATE_MODULE_NAME):
            delattr(model, GATE_MODULE_NAME)
    else:
        param = next(model.parameters(), None)
        if param is not None:
            gate.to(param.device)
        setattr(model, GATE_MODULE_NAME, gate)
    state.gate_config = gate.config
    if ranks is not None:
        state.ranks = set(ranks)
