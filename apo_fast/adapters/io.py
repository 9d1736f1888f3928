"""Saving and loading time-gated adapters in the peft / diffusers LoRA layout.

``save_adapters(unet, dir)`` writes ``dir/pytorch_lora_weights.safetensors``
with the keys diffusers' Stable Diffusion LoRA loader expects::

    unet.<module path>.lora_A.weight    (r, in)            convolutions: (r, in, kh, kw)
    unet.<module path>.lora_B.weight    (out, r)           convolutions: (out, r, 1, 1)

(the adapter name is dropped, as peft's ``get_peft_model_state_dict`` does).
The safetensors header carries

* ``format``: ``"pt"``;
* ``lora_adapter_metadata``: a JSON ``LoraConfig`` (``unet.r``,
  ``unet.lora_alpha``, ``unet.target_modules``, rank/alpha patterns), which
  diffusers (``pipe.load_lora_weights`` / ``unet.load_lora_adapter``) uses so
  that ``lora_alpha / r`` is restored exactly;
* ``apo_fast_taca``: a JSON object with the gate settings and the adapter
  config (r, alpha, targets, adapter name).

A learned gate's parameters go to ``dir/taca_gate.safetensors`` (extra keys in
the LoRA file would trip diffusers' loader). diffusers ignores the gate: a
diffusers model that loads the file runs the constant-gate (plain LoRA) form.
The mask input (``adapter.mask_input``) goes to ``dir/mask_input.safetensors`` likewise;
diffusers runs without it (no mask, as the reference does).

Writes are atomic (temporary file in ``dir`` + ``os.replace``).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from apo_fast.adapters.gates import GateConfig
from apo_fast.adapters.inject import (
    AdapterConfig,
    gated_layers,
    inject_adapters,
    set_gate,
)
from apo_fast.adapters.mask_input import attach_mask_input, get_mask_input
from apo_fast.adapters.state import GATE_MODULE_NAME, get_gate_state

__all__ = [
    "LORA_WEIGHT_NAME",
    "GATE_WEIGHT_NAME",
    "TACA_METADATA_KEY",
    "LORA_METADATA_KEY",
    "save_adapters",
    "load_adapters",
    "read_adapter_metadata",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
GATE_WEIGHT_NAME = "taca_gate.safetensors"
#: the mask input's weights (``adapter.mask_input``), beside the LoRA file for the same reason.
MASK_WEIGHT_NAME = "mask_input.safetensors"
TACA_METADATA_KEY = "apo_fast_taca"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key
FORMAT_VERSION = 1
_RESERVED_KEYS = ("format", LORA_METADATA_KEY, TACA_METADATA_KEY)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from apo_fast.io_utils import atomic_save

    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _prefixed(prefix: str | None, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _resolve_adapter_name(model: nn.Module, layers, adapter_name: str | None) -> str:
    if adapter_name is None:
        state = get_gate_state(model)
        if state is not None and state.adapter_config is not None:
            adapter_name = state.adapter_config.adapter_name
        else:
            adapter_name = layers[0][1].active_adapters[0]
    missing = [path for path, layer in layers if adapter_name not in layer.lora_A]
    if missing:
        raise ValueError(f"adapter {adapter_name!r} is missing in layers {missing[:5]}")
    return adapter_name


def _model_gate_config(model: nn.Module) -> GateConfig:
    state = get_gate_state(model)
    return state.gate_config if state is not None else GateConfig(kind="constant")


def _lora_config_metadata(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"r": r, "lora_alpha": alpha, "target_modules": sorted(ranks)}
    rank_pattern = {path: v for path, v in ranks.items() if v != r}
    alpha_pattern = {path: v for path, v in alphas.items() if v != alpha}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    if alpha_pattern:
        config["alpha_pattern"] = alpha_pattern
    return config


def save_adapters(
    model: nn.Module,
    path_dir: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    *,
    adapter_name: str | None = None,
    prefix: str | None = "unet",
) -> Path:
    """Write the adapters of ``model`` to ``path_dir`` (created if needed).

    Args:
        model: a model with :class:`GatedLoRALinear` layers (injected or converted).
        path_dir: output directory.
        metadata: extra ``str -> str`` entries for the safetensors header.
        adapter_name: which adapter to save (default: the injected one / the active one).
        prefix: key prefix (``"unet"`` for diffusers pipelines; ``None`` for none).

    Returns:
        Path of ``pytorch_lora_weights.safetensors``.
    """
    layers = gated_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no time-gated adapter layers to save")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError("metadata must be a dict of str -> str")
        clash = sorted(set(metadata) & set(_RESERVED_KEYS))
        if clash:
            raise ValueError(f"metadata keys {clash} are reserved")
    name = _resolve_adapter_name(model, layers, adapter_name)
    directory = Path(path_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path_dir {str(directory)!r} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, layer in layers:
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[name].weight
            tensors[_prefixed(prefix, f"{path}.{part}.weight")] = weight.detach().to("cpu").contiguous().clone()
        ranks[path] = layer.r[name]
        alphas[path] = layer.lora_alpha[name]
    lora_config = _lora_config_metadata(ranks, alphas)
    gate_config = _model_gate_config(model)
    state = get_gate_state(model)
    adapter_config = state.adapter_config.to_dict() if state is not None and state.adapter_config is not None else None
    gate_module = getattr(model, GATE_MODULE_NAME, None)
    gate_params = dict(gate_module.state_dict()) if isinstance(gate_module, nn.Module) else {}
    mask_module = get_mask_input(model)
    taca = {
        "format_version": FORMAT_VERSION,
        "adapter_name": name,
        "gate": gate_config.to_dict(),
        "gate_file": GATE_WEIGHT_NAME if gate_params else None,
        "mask_file": MASK_WEIGHT_NAME if mask_module is not None else None,
        "adapter_config": adapter_config,
        "modules": len(layers),
    }
    header = dict(metadata or {})
    header["format"] = "pt"
    header[LORA_METADATA_KEY] = json.dumps({_prefixed(prefix, k): v for k, v in lora_config.items()}, sort_keys=True)
    header[TACA_METADATA_KEY] = json.dumps(taca, sort_keys=True)

    gate_path = directory / GATE_WEIGHT_NAME
    if gate_params:
        gate_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in gate_params.items()}
        gate_info = {"gate": gate_config.to_dict(), "max_rank": getattr(gate_module, "max_rank", None)}
        gate_header = {"format": "pt", TACA_METADATA_KEY: json.dumps(gate_info)}
        _atomic_save(gate_tensors, gate_path, gate_header)
    mask_path = directory / MASK_WEIGHT_NAME
    if mask_module is not None:
        mask_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in mask_module.state_dict().items()}
        mask_info = {"hidden": mask_module.hidden, "out_channels": mask_module.out_channels,
                     "time": bool(mask_module.time_dim)}
        _atomic_save(mask_tensors, mask_path, {"format": "pt", TACA_METADATA_KEY: json.dumps(mask_info)})
    lora_path = directory / LORA_WEIGHT_NAME
    _atomic_save(tensors, lora_path, header)
    if not gate_params and gate_path.exists():
        gate_path.unlink()  # a stale learned gate from an earlier save would contradict the metadata
    if mask_module is None and mask_path.exists():
        mask_path.unlink()  # likewise a stale mask input
    return lora_path


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``apo_fast_taca`` header entry of a saved LoRA file (or dir); ``{}`` if absent."""
    file = _lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
    raw = header.get(TACA_METADATA_KEY)
    return json.loads(raw) if raw else {}


def _lora_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no adapter file at {str(file)!r}")
    return file


def _parse_keys(keys, prefix: str | None, file: Path) -> dict[str, dict[str, str]]:
    """``{module path: {"lora_A": key, "lora_B": key}}``."""
    modules: dict[str, dict[str, str]] = {}
    head = f"{prefix}." if prefix else ""
    for key in keys:
        if head and not key.startswith(head):
            continue
        body = key[len(head):]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if body.endswith(suffix):
                modules.setdefault(body[: -len(suffix)], {})[part] = key
                break
        else:
            raise ValueError(
                f"{str(file)!r}: unsupported key {key!r} (expected <module>.lora_A.weight / .lora_B.weight)"
            )
    if not modules:
        raise ValueError(
            f"{str(file)!r} has no LoRA keys with prefix {prefix!r} (use prefix=None for unprefixed files)"
        )
    for path, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{str(file)!r}: module {path!r} lacks one of lora_A / lora_B")
    return modules


def load_adapters(
    model: nn.Module,
    path_dir: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    prefix: str | None = "unet",
) -> AdapterConfig:
    """Load adapters saved by :func:`save_adapters` (or a plain peft/diffusers
    LoRA file: constant gate, ``lora_alpha`` from its metadata or ``r``).

    Injects adapters into ``model`` at the saved module paths if it has none;
    otherwise the saved modules must be exactly the model's adapter layers. The
    saved gate is restored (a different gate replaces ``model.taca_gate``).

    Returns:
        The adapter config in effect.
    """
    file = _lora_file(path_dir)
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
        modules = _parse_keys(list(f.keys()), prefix, file)
        tensors = {key: f.get_tensor(key) for parts in modules.values() for key in parts.values()}
    taca = json.loads(header[TACA_METADATA_KEY]) if TACA_METADATA_KEY in header else {}
    lora_meta = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else {}
    lora_meta = {k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else k: v for k, v in lora_meta.items()}
    ranks, alphas = _ranks_and_alphas(file, modules, tensors, lora_meta)
    gate_config = GateConfig.from_dict(taca["gate"]) if taca.get("gate") else GateConfig(kind="constant")
    layers = _layers_for(model, file, ranks, alphas, gate_config, taca, adapter_name)
    name = _resolve_adapter_name(model, sorted(layers.items()), adapter_name)
    with torch.no_grad():
        for path, parts in modules.items():
            _copy_into(layers[path], name, parts, tensors, file, path)
            layers[path].lora_alpha[name] = alphas[path]
            layers[path].set_scale(name, 1.0)
        if taca.get("gate_file"):
            _load_gate(model, Path(file).parent / taca["gate_file"])
        if taca.get("mask_file"):
            _load_mask_input(model, Path(file).parent / taca["mask_file"])
    state = get_gate_state(model)
    if state is not None and state.adapter_config is not None:
        return state.adapter_config
    return AdapterConfig(
        r=collections.Counter(ranks.values()).most_common(1)[0][0],
        lora_alpha=collections.Counter(alphas.values()).most_common(1)[0][0],
        target_modules=tuple(sorted(ranks)),
        gate=gate_config,
        adapter_name=name,
    )


def _ranks_and_alphas(file, modules: dict, tensors: dict, lora_meta: dict) -> tuple[dict, dict]:
    """Each saved module's rank (checked against its A/B shapes) and lora_alpha (peft's
    ``alpha_pattern``, else ``lora_alpha``, else the rank)."""
    ranks = {}
    for path, parts in modules.items():
        A, B = tensors[parts["lora_A"]], tensors[parts["lora_B"]]
        linear = A.dim() == 2 and B.dim() == 2
        conv = A.dim() == 4 and B.dim() == 4 and tuple(B.shape[2:]) == (1, 1)
        if not (linear or conv) or B.shape[1] != A.shape[0]:
            raise ValueError(f"{str(file)!r}: module {path!r} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
        ranks[path] = A.shape[0]
    alpha_default = lora_meta.get("lora_alpha")
    alpha_pattern = lora_meta.get("alpha_pattern") or {}
    alphas = {
        path: alpha_pattern.get(path, alpha_default if alpha_default is not None else ranks[path]) for path in ranks
    }
    return ranks, alphas


def _layers_for(model, file, ranks: dict, alphas: dict, gate_config: GateConfig, taca: dict, adapter_name) -> dict:
    """The model's gated layers for the saved modules: injected when the model has none (one
    rank and alpha), else checked to be exactly the saved set; the saved gate is restored."""
    layers = dict(gated_layers(model))
    if not layers:
        if len(set(ranks.values())) != 1 or len(set(alphas.values())) != 1:
            raise ValueError(
                f"{str(file)!r} has per-module ranks or alphas; load_adapters injects one rank and alpha. "
                "Inject matching layers first, then load."
            )
        saved = taca.get("adapter_config") or {}
        config = AdapterConfig(
            r=next(iter(ranks.values())),
            lora_alpha=next(iter(alphas.values())),
            target_modules=tuple(sorted(ranks)),
            gate=gate_config,
            adapter_name=adapter_name or taca.get("adapter_name") or "default",
            dropout=saved.get("dropout", 0.0),
            backend=saved.get("backend"),
        )
        inject_adapters(model, config)
        return dict(gated_layers(model))
    missing, unexpected = sorted(set(layers) - set(ranks)), sorted(set(ranks) - set(layers))
    if missing or unexpected:
        raise ValueError(
            f"{str(file)!r} does not match the model's adapter layers: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if _model_gate_config(model) != gate_config or get_gate_state(model) is None:
        set_gate(model, gate_config)
    return layers


def _copy_into(layer, name: str, parts: dict, tensors: dict, file, path: str) -> None:
    for part in ("lora_A", "lora_B"):
        param = getattr(layer, part)[name].weight
        value = tensors[parts[part]]
        if param.shape != value.shape:
            raise ValueError(
                f"{str(file)!r}: {path}.{part} has shape {tuple(value.shape)}, the model's is {tuple(param.shape)}"
            )
        param.copy_(value)


def _read_extra(file: Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header info, tensors) of a file the LoRA file's metadata names (a learned gate, the mask input)."""
    if not file.is_file():
        raise FileNotFoundError(f"the adapter metadata names a {what} file {str(file)!r}, which is missing")
    with safe_open(str(file), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get(TACA_METADATA_KEY, "{}"))
        return info, {key: f.get_tensor(key) for key in f.keys()}


def _load_state_into(module: nn.Module, saved: dict[str, torch.Tensor], file: Path, what: str) -> None:
    expected = module.state_dict()
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in expected):
        got = {k: tuple(v.shape) for k, v in saved.items()}
        wanted = {k: tuple(v.shape) for k, v in expected.items()}
        raise ValueError(f"{str(file)!r} does not fit the model's {what}: keys/shapes {got} vs {wanted}")
    module.load_state_dict(saved)


def _load_gate(model: nn.Module, gate_file: Path) -> None:
    _, saved = _read_extra(gate_file, "learned gate")
    _load_state_into(getattr(model, GATE_MODULE_NAME), saved, gate_file, "gate")


def _load_mask_input(model: nn.Module, mask_file: Path) -> None:
    """The saved mask input, attached to ``model`` (of the saved width) when it has none; the
    model's adapter config then says so."""
    info, saved = _read_extra(mask_file, "mask input")
    module = get_mask_input(model)
    if module is None:
        time = bool(info.get("time", False))
        module = attach_mask_input(model, hidden=int(info.get("hidden", 32)), time=time)
        state = get_gate_state(model)
        if state is not None and state.adapter_config is not None:
            state.adapter_config = dataclasses.replace(state.adapter_config, mask_input=True, mask_time=time)
    _load_state_into(module, saved, mask_file, "mask input")
