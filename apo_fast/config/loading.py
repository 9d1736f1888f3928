"""Reading a run config: YAML and ``--set section.key=value`` overrides into typed dataclasses,
every value checked against its annotation, errors naming the key; saving it back.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from apo_fast.config.schema import RUN_DEFAULTS, APOConfig, ConfigError, ModelConfig

__all__ = ["LEGACY_KEYS", "check_paths", "config_from_dict", "load_config", "save_config"]

# Keys of the 0.1 config files, read as their new names (peft's): a run saved before
# the rename, or a YAML written for it, loads unchanged.
LEGACY_KEYS: dict[tuple[str, ...], str] = {
    ("adapter", "rank"): "r",
    ("adapter", "alpha"): "lora_alpha",
    ("adapter", "gate", "hidden"): "hidden_size",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        arm = args[0] if args else Any
        out = [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + u for u in unknown)}; "
            f"{cls.__name__} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a section's own checks (AdapterConfig, GateConfig)
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc).replace(f"{cls.__name__}.", f"{prefix}." if prefix else "")) from None


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> APOConfig:
    """Build and validate an :class:`APOConfig` from a plain mapping.

    ``overrides`` are ``section.key=value`` strings (value parsed as YAML), as the
    CLI's ``--set`` takes them.
    """
    data = copy.deepcopy(dict(data or {}))  # overrides write into nested sections
    _compile_shorthand(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        # `--set key=` (nothing after '=') means the empty string, as `--set key=''` does.
        value = "" if raw.strip() == "" else yaml.safe_load(raw)
        _set_dotted(data, dotted.strip(), value)
        _compile_shorthand(data)
    _rename_legacy_keys(data)
    for section, defaults in RUN_DEFAULTS.items():
        if isinstance(data.get(section, {}), dict):
            data[section] = {**defaults, **data.get(section, {})}
    _gate_timesteps_from_model(data)
    cfg = _build(APOConfig, data)
    return cfg.validate()


def _compile_shorthand(data: dict) -> None:
    """``train.compile: true`` (and ``sample.compile``) means ``{enabled: true}``."""
    for section in ("train", "sample"):
        node = data.get(section)
        if isinstance(node, dict) and isinstance(node.get("compile"), bool):
            node["compile"] = {"enabled": node["compile"]}


def _rename_legacy_keys(data: dict) -> None:
    for path, new in LEGACY_KEYS.items():
        node = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        if new in node:
            where = ".".join(path[:-1])
            raise ConfigError(f"{where}.{path[-1]} and {where}.{new} are the same setting (the old and the new "
                              f"name); give {where}.{new} only")
        node[new] = node.pop(path[-1])


def _gate_timesteps_from_model(data: dict) -> None:
    """The gate's ``T`` is the model's: filled in from ``model.num_train_timesteps``."""
    model, adapter = data.get("model", {}), data.get("adapter", {})
    if not isinstance(model, dict) or not isinstance(adapter, dict) or not isinstance(adapter.get("gate", {}), dict):
        return  # the type error is reported by _build, with its key
    steps = model.get("num_train_timesteps", ModelConfig.num_train_timesteps)
    gate = dict(adapter.get("gate", {}))
    if "num_train_timesteps" in gate and gate["num_train_timesteps"] != steps:
        raise ConfigError(f"adapter.gate.num_train_timesteps ({gate['num_train_timesteps']!r}) must equal "
                          f"model.num_train_timesteps ({steps!r}); leave it out, it is taken from the model")
    gate["num_train_timesteps"] = steps
    data["adapter"] = {**adapter, "gate": gate}


def load_config(path: str | Path, overrides: list[str] | None = None) -> APOConfig:
    """Read a YAML config file; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _looks_local(name: str) -> bool:
    """A model name meant as a local path rather than a hub id ("org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_paths(cfg: APOConfig) -> None:
    """Refuse missing data folders and model files with the key named, before any heavy
    import (torch, diffusers, DeepSpeed take tens of seconds to import on a busy machine).

    Hub ids (``org/name``) are left to the loader, which reads only the local cache.
    """
    d, m = cfg.data, cfg.model
    if d.root != "builtin:demo":
        root = Path(d.root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.root {d.root!r} is not a folder (expected an MVTec AD layout root)")
        if not (root / d.category).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise ConfigError(f"data.category {d.category!r}: no folder {root / d.category}; "
                              f"categories there: {', '.join(found) or 'none'}")
    for key, value in (("model.pretrained", m.pretrained), ("model.vae", m.vae), ("model.text_encoder", m.text_encoder)):
        if value and _looks_local(value) and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key} {value!r} is not a folder (expected a local diffusers model folder)")
    if m.pretrained and Path(m.pretrained).expanduser().is_dir() and m.subfolder:
        sub = Path(m.pretrained).expanduser() / m.subfolder
        if not sub.is_dir():
            raise ConfigError(f"model.subfolder {m.subfolder!r}: {sub} is not a folder (set model.subfolder= "
                              "to the UNet's folder, or to nothing when model.pretrained is the UNet folder itself)")
    if m.conditions and not Path(m.conditions).expanduser().is_file():
        raise ConfigError(f"model.conditions {m.conditions!r} is not a file (expected a conditions.safetensors)")


def save_config(cfg: APOConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (atomically); the gate's ``num_train_timesteps`` is left out,
    since loading takes it from the model."""
    from apo_fast.io_utils import atomic_write_text

    data = cfg.to_dict()
    data["adapter"]["gate"].pop("num_train_timesteps", None)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


