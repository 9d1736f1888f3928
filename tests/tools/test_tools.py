"""The scripts under tools/: the second (process-made) dataset and the demo-base builder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_process_dataset_layout_masks_and_reproducibility(tmp_path):
    from apo_fast.data import (
        AnomalyDataset,
        NormalDataset,
        category_augment,
        scan_mvtec,
    )

    tool = _tool("make_process_dataset")
    counts = tool.make_dataset(tmp_path / "a", seed=3, size=32)
    assert set(counts) == {"plank", "weave"}
    for category, (_, processes) in tool.CATEGORIES.items():
        index = scan_mvtec(tmp_path / "a", category)
        assert sorted(index.defects) == sorted(processes)
        assert len(index.train_good) == 48 and len(index.test_good) == 12
        for defect in processes:
            d = index.defects[defect]
            assert len(d.train) + len(d.heldout) == tool.DEFECTS_PER_KIND
        anomalies = AnomalyDataset(index, 32, split="train")  # would refuse an empty mask
        assert len(anomalies) == len(processes) * (tool.DEFECTS_PER_KIND // 3)
        # unknown to the built-in lists, both are recognised as textures from their images
        imgs = torch.stack([NormalDataset(index, 32)[(i, 0)]["image"] for i in range(12)])
        assert category_augment(category, imgs) == "dihedral"
    # a written mask marks a local defect (exactness is checked on a redraw in the next test)
    img = np.asarray(Image.open(tmp_path / "a" / "plank" / "test" / "burn" / "000.png"), dtype=int)
    mask = np.asarray(Image.open(tmp_path / "a" / "plank" / "ground_truth" / "burn" / "000_mask.png")) > 127
    assert 6 <= mask.sum() < mask.size // 2 and img.shape == (32, 32, 3)
    # the same seed gives the same files; another seed others
    tool.make_dataset(tmp_path / "b", seed=3, size=32)
    tool.make_dataset(tmp_path / "c", seed=4, size=32)
    same = (tmp_path / "a" / "weave" / "test" / "stain" / "003.png").read_bytes()
    assert same == (tmp_path / "b" / "weave" / "test" / "stain" / "003.png").read_bytes()
    assert same != (tmp_path / "c" / "weave" / "test" / "stain" / "003.png").read_bytes()


def test_process_masks_are_exactly_the_changed_pixels():
    tool = _tool("make_process_dataset")
    for category, (texture, processes) in tool.CATEGORIES.items():
        for name, process in processes.items():
            rng = np.random.default_rng(11)
            clean = np.clip(texture(rng, 32), 0, 255)
            bad = np.clip(process(clean.copy(), rng), 0, 255)
            delta = np.abs(bad.astype(np.uint8).astype(int) - clean.astype(np.uint8).astype(int)).max(-1)
            changed = delta >= tool.MIN_DELTA
            assert changed.any(), (category, name)
            assert changed.mean() < 0.5, (category, name)  # a local defect, not a new image


@pytest.mark.slow
def test_build_demo_base_writes_a_base_the_demo_accepts(tmp_path):
    """The rebuild command of the shipped bases, at a few steps: its build.json records the
    settings, and the demo takes such a base only when they are the demo's own."""
    from apo_fast.demo import demo_config
    from apo_fast.training.base import base_build_record, shipped_base

    tool = _tool("build_demo_base")
    assert tool.main(["--category", "brick", "--out", str(tmp_path), "--set", "pretrain.steps=3",
                      "--set", "pretrain.batch_size=2", "--set", "data.image_size=16"]) == 0
    folder = tmp_path / "brick"
    assert {p.name for p in folder.iterdir()} >= {"base_unet", "base_conditions.safetensors", "pretrain_log.jsonl",
                                                  "pretrain.png", "samples.png", "build.json"}
    record = json.loads((folder / "build.json").read_text())
    cfg = demo_config(None, ["pretrain.steps=3", "pretrain.batch_size=2", "data.image_size=16"])
    assert {k: record[k] for k in ("model", "data", "pretrain", "seed")} == base_build_record(cfg)
    assert "tools/build_demo_base.py" in record["command"]
    assert not list(tmp_path.glob(".*.building"))
    # the shipped bases (if any) were built with the demo's own settings
    for category in ("brick", "gravel"):
        shipped = REPO / "apo_fast" / "assets" / "demo_base" / category / "build.json"
        if shipped.is_file():
            found, why = shipped_base(demo_config(None, [f"data.category={category}"]))
            assert found is not None, why


def test_ablation_variants_split_on_commas_outside_brackets():
    """tools/fidelity_ablation.py: a variant's overrides split at top-level commas only, so a
    list and a [[fraction, value], ...] schedule reach the config whole."""
    tool = _tool("fidelity_ablation")
    assert tool.parse_variant("default") == ("default", [])
    name, sets = tool.parse_variant(
        "v=sample.s_align=[[0,2.0],[0.6,1.0]],optim.lr=2e-3,adapter.target_modules=[to_q,to_k],loss.beta=5")
    assert name == "v"
    assert sets == ["sample.s_align=[[0,2.0],[0.6,1.0]]", "optim.lr=2e-3", "adapter.target_modules=[to_q,to_k]",
                    "loss.beta=5"]
    from apo_fast.demo import demo_config

    cfg = demo_config("unused", sets)
    assert cfg.sample.s_align == [[0, 2.0], [0.6, 1.0]] and list(cfg.adapter.target_modules) == ["to_q", "to_k"]
