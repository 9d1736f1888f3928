"""One config vocabulary from YAML to kernel: the adapter section is the adapters package's
own AdapterConfig, the 0.1 key names still load, and every choice list is one object."""
from __future__ import annotations

import importlib

import pytest
import yaml

from apo_fast.config import (
    LEGACY_KEYS,
    AdapterConfig,
    ConfigError,
    GateConfig,
    config_from_dict,
    load_config,
    save_config,
)
from apo_fast.config import choices as C


def test_the_adapter_section_is_the_adapters_packages_config():
    import apo_fast.adapters as adapters

    cfg = config_from_dict({"adapter": {"r": 16, "lora_alpha": 4.0, "gate": {"kind": "learned", "hidden_size": 32}}})
    assert adapters.AdapterConfig is AdapterConfig and adapters.GateConfig is GateConfig
    assert isinstance(cfg.adapter, AdapterConfig) and isinstance(cfg.adapter.gate, GateConfig)
    assert (cfg.adapter.r, cfg.adapter.lora_alpha, cfg.adapter.scaling) == (16, 4.0, 0.25)
    assert cfg.adapter.gate.hidden_size == 32


def test_legacy_key_names_load_as_the_new_ones():
    old = config_from_dict({"adapter": {"rank": 16, "alpha": 4.0, "gate": {"hidden": 32}}})
    new = config_from_dict({"adapter": {"r": 16, "lora_alpha": 4.0, "gate": {"hidden_size": 32}}})
    assert old == new
    assert set(LEGACY_KEYS.values()) == {"r", "lora_alpha", "hidden_size"}
    with pytest.raises(ConfigError, match="adapter.rank and adapter.r are the same setting"):
        config_from_dict({"adapter": {"rank": 8, "r": 8}})
    with pytest.raises(ConfigError, match="adapter.r"):
        config_from_dict({"adapter": {"rank": "eight"}})


def test_run_default_rank_and_the_python_default_stay_as_they_were():
    assert config_from_dict({}).adapter.r == 8  # the run config's default (the demo's)
    assert config_from_dict({"adapter": {"gate": {"kind": "constant"}}}).adapter.r == 8
    assert AdapterConfig().r == 4  # the Python API's default


def test_the_gate_takes_its_timesteps_from_the_model():
    cfg = config_from_dict({"model": {"num_train_timesteps": 500}})
    assert cfg.adapter.gate.num_train_timesteps == 500
    with pytest.raises(ConfigError, match="adapter.gate.num_train_timesteps .* must equal model.num_train_timesteps"):
        config_from_dict({"model": {"num_train_timesteps": 500}, "adapter": {"gate": {"num_train_timesteps": 1000}}})


def test_section_checks_name_the_key():
    for data, words in [
        ({"adapter": {"r": 0}}, "adapter.r must be an int >= 1"),
        ({"adapter": {"gate": {"kind": "cosine"}}}, "adapter.gate.kind must be one of"),
        ({"adapter": {"r": 4, "gate": {"r_min": 3, "r_max": 2}}}, "adapter.gate.r_min"),
        ({"adapter": {"dropout": 1.5}}, "adapter.dropout"),
        ({"adapter": {"target_modules": []}}, "adapter.target_modules"),
    ]:
        with pytest.raises(ConfigError, match=words):
            config_from_dict(data)


def test_saved_config_round_trips_and_uses_the_new_names(tmp_path):
    cfg = config_from_dict({"adapter": {"rank": 12, "alpha": 6.0}, "model": {"num_train_timesteps": 700}})
    save_config(cfg, tmp_path / "config.yaml")
    text = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert text["adapter"]["r"] == 12 and "rank" not in text["adapter"] and "alpha" not in text["adapter"]
    assert "num_train_timesteps" not in text["adapter"]["gate"]  # derived from the model
    assert load_config(tmp_path / "config.yaml") == cfg
    again = load_config(tmp_path / "config.yaml", ["model.num_train_timesteps=900"])
    assert again.adapter.gate.num_train_timesteps == 900


def test_the_run_config_injects_without_translation():
    pytest.importorskip("diffusers")
    from apo_fast.adapters import gated_layers, inject_adapters
    from apo_fast.models import build_unet

    cfg = config_from_dict({"adapter": {"r": 6, "lora_alpha": 3.0}})
    unet = build_unet(cfg.model, in_channels=3, sample_size=32, seed=0)
    names = inject_adapters(unet, cfg.adapter)
    layers = dict(gated_layers(unet))
    assert names and set(names) == set(layers)
    layer = next(iter(layers.values()))
    assert layer.lora_A["default"].weight.shape[0] == 6 and layer.scaling["default"] == 0.5


@pytest.mark.parametrize(
    "module, name",
    [
        ("apo_fast.adapters.gates", "GATE_KINDS"),
        ("apo_fast.adapters", "GATE_KINDS"),
        ("apo_fast.adapters", "DEFAULT_TARGET_MODULES"),
        ("apo_fast.ops.backend", "BACKENDS"),
        ("apo_fast.losses", "BETA_SCHEDULES"),
        ("apo_fast.losses", "DPO_CONVENTIONS"),
        ("apo_fast.bench.memory_plan", "OPTIMIZERS"),
        ("apo_fast.bench.memory_plan", "DEFAULT_TARGET_MODULES"),
        ("apo_fast.config", "EVAL_SOURCES"),
    ],
)
def test_every_choice_list_is_defined_once(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(C, name)


def test_the_planner_reads_r_and_its_old_name():
    pytest.importorskip("diffusers")
    from apo_fast.bench.memory_plan import normalize_config

    assert normalize_config({"unet": "tiny", "rank": 6})["r"] == 6
    assert normalize_config({"unet": "tiny", "r": 6})["r"] == 6
    with pytest.raises(ValueError, match="give the adapter rank once"):
        normalize_config({"unet": "tiny", "r": 6, "rank": 6})
