"""``apo-fast eval``: does APO's synthetic data make a better anomaly detector?

For an MVTec-layout dataset and a trained APO run, :func:`evaluate`

1. makes sure the runs exist: the APO run (trained from the config if its
   folder holds no adapters) and the plain-LoRA baseline, trained into a
   sibling folder (``<run>-lora``) from the APO run's own config with a
   constant gate and the plain diffusion loss (``loss.mode: diffusion``):
   same base, data, rank, optimiser and steps, no preference, no TACA;
2. builds the synthetic data of every source, the same number of anomalies
   per defect type for each: ``cutpaste`` (pasted patches on the normal
   training images), ``lora`` and ``apo`` (hierarchical sampling, a share
   ``guided_fraction`` mask-guided, the rest free with the localization mask);
3. computes generation metrics of each synthetic set against the real
   training anomalies (weight-free ones always; IC-LPIPS, IS and KID when
   their weights are local, else skipped with the reason);
4. runs the downstream test: one DRAEM-style segmenter per (source, seed),
   trained from scratch on the normal training images plus that source's
   anomalies, tested on the held-out real anomalies and ``test/good``
   (image/pixel AUROC, AP, F1-max, PRO); ``none`` trains on normals only;
5. writes the report into ``<run>/eval/``: ``eval_report.json``,
   ``eval_report.md``, ``eval_metrics.png``, ``eval_samples.png`` and
   ``eval_details.json`` (data provenance, timings, machine load, verdict).

No held-out data reaches a detector's training data or the generation:

* the held-out set is the few-shot split's other two thirds of each defect
  type plus ``test/good``; it is only ever the detectors' test set;
* mask-guided generation takes its masks from the TRAINING anomalies
  (randomly flipped/rotated as the data augmentation does), never from
  held-out masks; real held-out masks would copy the test defects' shapes and
  places into the training data;
* its normal images are ``train/good`` (``guide_normals: train``, default:
  the images the segmenter sees as normals anyway and that CutPaste pastes
  on), or the first half of ``test/good`` (``guide_normals: test_split``),
  which is then removed from the test set. Guiding on ``test/good`` while
  also testing on it would put test backgrounds into the training data.

``eval_details.json`` lists, per source, every file its synthetic data was
derived from (the generated sources also list the model's training images),
and the test files, so the separation can be checked.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from apo_fast.config import APOConfig, EvalConfig, load_config, validate_config
from apo_fast.config.choices import GUIDE_NORMALS

log = logging.getLogger(__name__)

GENERATED_SOURCES = ("lora", "apo")
MODEL_TRAINING_KEYS = ("model", "data", "adapter", "loss", "optim", "pretrain")
TRAIN_KEYS_IGNORED = ("progress", "device", "log_every", "checkpoint_every", "keep_checkpoints")


# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """The real images of one category, split for the evaluation.

    Shapes: images (N,3,H,W) in [-1, 1], masks (N,1,H,W) in {0, 1}; every
    ``*_paths`` list matches its tensor row by row.
    """

    category: str
    defects: list[str]
    normal_train: torch.Tensor  # train/good: the segmenter's normals
    normal_train_paths: list[str]
    train_anomalies: torch.Tensor  # the few-shot third: IC cluster centres, KID reference, guide masks
    train_masks: torch.Tensor
    train_defects: list[str]
    train_anomaly_paths: list[str]
    train_mask_paths: list[str]
    guide_normals: torch.Tensor  # normal images the mask-guided generation paints into
    guide_normal_paths: list[str]
    test_images: torch.Tensor  # held-out anomalies, then good test images
    test_masks: torch.Tensor
    test_labels: torch.Tensor  # (T,) 1 anomalous, 0 good
    test_paths: list[str]
    test_mask_paths: list[str]  # masks of the held-out anomalies

    def summary(self) -> dict:
        n_anomalous = int(self.test_labels.sum())
        return {
            "category": self.category, "defects": self.defects, "image_size": list(self.normal_train.shape[-2:]),
            "normal_train": len(self.normal_train_paths), "train_anomalies": len(self.train_anomaly_paths),
            "guide_normals": len(self.guide_normal_paths), "test_anomalous": n_anomalous,
            "test_good": len(self.test_paths) - n_anomalous,
        }


def load_eval_data(cfg: APOConfig, guide_normals: str = "train") -> EvalData:
    """Scan ``cfg.data`` and split it for the evaluation (see the module docstring).

    Args:
        cfg: the run's config (its ``data`` section names the dataset and split).
        guide_normals: ``"train"`` or ``"test_split"``.

    Raises:
        ValueError: bad ``guide_normals``, no held-out anomalies, or too few
            ``test/good`` images for ``test_split``.
    """
    from apo_fast.data import (
        AnomalyDataset,
        NormalDataset,
        resolve_data_root,
        scan_mvtec,
    )

    if guide_normals not in GUIDE_NORMALS:
        raise ValueError(f"guide_normals must be 'train' or 'test_split', got {guide_normals!r}")
    d = cfg.data
    index = scan_mvtec(resolve_data_root(d.root), d.category, d.defect_types, d.shots)
    size = d.image_size

    def stack(ds, key):
        return torch.stack([ds[(i, 0)][key] for i in range(len(ds))]) if len(ds) else torch.zeros(0, 3, size, size)

    def mask_of(path: str) -> str:
        for defect in index.defects.values():
            if Path(path) in defect.masks:
                return str(defect.masks[Path(path)])
        raise KeyError(path)

    normals = NormalDataset(index, size, split="train")
    train = AnomalyDataset(index, size, split="train")
    held = AnomalyDataset(index, size, split="heldout")
    good = NormalDataset(index, size, split="test")
    if len(held) == 0:
        raise ValueError(
            f"{d.category}: no held-out anomalies to test on (data.shots={d.shots!r} leaves none); "
            "the downstream test needs the few-shot split's held-out images"
        )
    good_images, good_paths = stack(good, "image"), list(good.paths)
    if guide_normals == "train":
        guides, guide_paths = stack(normals, "image"), list(normals.paths)
    else:
        if len(good) < 2:
            raise ValueError(f"guide_normals 'test_split' needs at least 2 test/good images, found {len(good)}")
        half = len(good) // 2
        guides, guide_paths = good_images[:half], good_paths[:half]
        good_images, good_paths = good_images[half:], good_paths[half:]
    held_images = stack(held, "image")
    return EvalData(
        category=d.category,
        defects=list(index.defects),
        normal_train=stack(normals, "image"),
        normal_train_paths=list(normals.paths),
        train_anomalies=stack(train, "image"),
        train_masks=stack(train, "mask"),
        train_defects=list(train.defects),
        train_anomaly_paths=list(train.paths),
        train_mask_paths=[mask_of(p) for p in train.paths],
        guide_normals=guides,
        guide_normal_paths=guide_paths,
        test_images=torch.cat([held_images, good_images]),
        test_masks=torch.cat([stack(held, "mask"), torch.zeros(len(good_paths), 1, size, size)]),
        test_labels=torch.tensor([1] * len(held) + [0] * len(good_paths), dtype=torch.int64),
        test_paths=list(held.paths) + good_paths,
        test_mask_paths=[mask_of(p) for p in held.paths],
    )


# --------------------------------------------------------------------------- synthetic data


@dataclass
class SyntheticSet:
    """Synthetic anomalies of one source: images (N,3,H,W) in [-1, 1], masks (N,1,H,W) in {0, 1}.

    ``defects`` and ``modes`` ("guided", "free" or "cutpaste") label each row;
    ``inputs`` are the files the set was derived from.
    """

    images: torch.Tensor
    masks: torch.Tensor
    defects: list[str]
    modes: list[str]
    inputs: list[str]

    def select(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [i for i, m in enumerate(self.modes) if m == mode]
        return self.images[rows], self.masks[rows]

    def grid_order(self) -> list[int]:
        """Row indices round-robin over (defect, mode) groups, so a grid's first columns show each kind."""
        groups: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(zip(self.defects, self.modes)):
            groups.setdefault(key, []).append(i)
        order, queues = [], [list(v) for v in groups.values()]
        while any(queues):
            order.extend(q.pop(0) for q in queues if q)
        return order


def mask_guides(
    data: EvalData, defect: str, num: int, generator: torch.Generator, augment_mode: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Normal images and TRAINING masks of ``defect`` for ``num`` mask-guided samples.

    Normals are drawn at random from ``data.guide_normals``; the defect's training
    masks are cycled in a random order, each with a random symmetry of
    ``augment_mode`` (see :func:`apo_fast.data.augment_pair`).

    Returns:
        (images (num,3,H,W), masks (num,1,H,W), the files used).
    """
    from apo_fast.data import AUGMENT_VARIANTS, augment_pair

    rows = [i for i, name in enumerate(data.train_defects) if name == defect]
    if not rows:
        raise ValueError(f"defect {defect!r} has no training anomaly whose mask could guide the generation")
    if data.guide_normals.shape[0] == 0:
        raise ValueError("no normal images to guide the generation (guide_normals is empty)")
    normal_ids = torch.randint(data.guide_normals.shape[0], (num,), generator=generator).tolist()
    order = [rows[j] for j in torch.randperm(len(rows), generator=generator).tolist()]
    mask_ids = [order[k % len(order)] for k in range(num)]
    variants = torch.randint(AUGMENT_VARIANTS[augment_mode], (num,), generator=generator).tolist()
    masks = torch.stack([augment_pair(data.train_anomalies[m], data.train_masks[m], v)[1]
                         for m, v in zip(mask_ids, variants)])
    used = {data.guide_normal_paths[i] for i in normal_ids} | {data.train_mask_paths[m] for m in mask_ids}
    return data.guide_normals[normal_ids], masks, sorted(used)


def split_counts(num: int, guided_fraction: float) -> tuple[int, int]:
    """(guided, free) sample counts of one defect type."""
    guided = round(num * guided_fraction)
    return guided, num - guided


def generate_synthetic(
    run_dir: str | Path, data: EvalData, ecfg: EvalConfig, *, device: str = "auto", progress: bool = False
) -> SyntheticSet:
    """``ecfg.num_per_defect`` anomalies per defect type from a trained run (APO or the LoRA baseline).

    Seeds depend only on ``ecfg.sample_seed`` and the defect's position, so two
    runs get the same guides and the same initial noise.
    """
    from apo_fast.data import category_augment
    from apo_fast.sampling.runs import generate_for_defect, load_run

    run = load_run(run_dir, device=device)
    if run.cfg.data.category != data.category:
        raise ValueError(f"run {run_dir} was trained on {run.cfg.data.category!r}, the data is {data.category!r}")
    if ecfg.num_inference_steps is not None:
        run.cfg.sample.num_inference_steps = ecfg.num_inference_steps
    mode = category_augment(data.category, data.normal_train)
    n_guided, n_free = split_counts(ecfg.num_per_defect, ecfg.guided_fraction)
    images, masks, defects, modes = [], [], [], []
    inputs = set(data.train_anomaly_paths) | set(data.train_mask_paths) | set(data.normal_train_paths)
    for k, defect in enumerate(data.defects):
        seed = ecfg.sample_seed + 1000 * k
        if n_guided:
            known, known_masks, used = mask_guides(data, defect, n_guided, torch.Generator().manual_seed(seed), mode)
            out = generate_for_defect(run, defect, n_guided, known_images=known, known_masks=known_masks,
                                      seed=seed + 1, progress=progress)
            images.append(out[0])
            masks.append(out[1])
            defects += [defect] * n_guided
            modes += ["guided"] * n_guided
            inputs.update(used)
        if n_free:
            out = generate_for_defect(run, defect, n_free, seed=seed + 2, progress=progress)
            images.append(out[0])
            masks.append(out[1])
            defects += [defect] * n_free
            modes += ["free"] * n_free
    return SyntheticSet(torch.cat(images).float(), (torch.cat(masks) > 0.5).float(), defects, modes, sorted(inputs))


def cutpaste_synthetic(data: EvalData, num: int, seed: int) -> SyntheticSet:
    """``num`` CutPaste anomalies pasted on the normal training images."""
    from apo_fast.eval.cutpaste import cutpaste_anomalies

    images, masks = cutpaste_anomalies(data.normal_train, num, torch.Generator().manual_seed(seed))
    return SyntheticSet(images, masks, ["cutpaste"] * num, ["cutpaste"] * num, sorted(data.normal_train_paths))


# --------------------------------------------------------------------------- runs


def held_out_defects(data: EvalData) -> list[str]:
    """The defect kind of each held-out anomaly (its folder name), in ``test_images`` order."""
    n = int(data.test_labels.sum())
    return [Path(p).parent.name for p in data.test_paths[:n]]


def judge_sources(data: EvalData, synthetic: dict, ecfg, generation: dict) -> dict:
    """Train the fidelity judge (:mod:`apo_fast.eval.judge`) on the held-out real anomalies and
    test/good images, and add its metrics to ``generation`` (per source, and per mode for the
    generated sources). Returns the judge's classes, crop size and validation accuracy."""
    from apo_fast.data import category_augment
    from apo_fast.eval.judge import judge_metrics, mask_crops, train_judge

    held = data.test_labels == 1
    good = data.test_images[~held]
    if good.shape[0] < 2:  # too few test/good images: the normal training images stand in
        good = data.normal_train
    judge = train_judge(data.test_images[held], data.test_masks[held], held_out_defects(data), good, data.defects,
                        steps=ecfg.judge_steps, seed=ecfg.sample_seed,
                        texture=category_augment(data.category, data.normal_train) == "dihedral")
    real = mask_crops(data.test_images[held], data.test_masks[held], judge.crop)
    for source, syn in synthetic.items():
        if syn is None:
            continue
        parts = {source: list(range(len(syn.modes)))}
        if source in GENERATED_SOURCES:
            parts.update({f"{source} ({m})": [i for i, x in enumerate(syn.modes) if x == m] for m in ("guided", "free")})
        for name, rows in parts.items():
            if len(rows) < 2:
                continue
            metrics = judge_metrics(judge, syn.images[rows], syn.masks[rows], [syn.defects[i] for i in rows], real,
                                    kid_subsets=ecfg.kid_subsets, seed=ecfg.sample_seed)
            generation.setdefault(name, {"metrics": {}, "skipped": {}})["metrics"].update(metrics)
    return {"classes": judge.classes, "crop": judge.crop, "val_accuracy": judge.val_accuracy,
            "trained_on": {"anomalies": int(held.sum()), "good": int(good.shape[0])}}


def _judge_lines(record: dict | None) -> list[str]:
    if not record:
        return []
    acc = ", ".join(f"{k} {v:.2f}" for k, v in record["val_accuracy"].items())
    return [
        "## Fidelity judge", "",
        (f"A classifier of {', '.join(record['classes'])} on {record['crop']} px crops, trained on the "
         f"{record['trained_on']['anomalies']} held-out real anomalies and {record['trained_on']['good']} good "
         "images (never on what APO trained on). `judge_right_kind`: generated anomalies whose mask crop it "
         "calls the kind they were made for; `judge_defect`: any defect kind; `judge_product`: images it "
         "calls the product rather than `other`; `judge_kid`: KID of its features, generated vs real "
         "held-out defect crops (lower is closer)."),
        f"Its accuracy on a held-back quarter of its real crops: {acc}.", "",
    ]


def save_kind_sheet(path: Path, data: EvalData, synthetic: dict, per_row: int = 6) -> Path:
    """One picture per product: for each defect kind, real held-out anomalies, then each source's
    guided and free anomalies of that kind (CutPaste's: any), mask outlines in red."""
    from apo_fast.sampling.images import overlay, save_grid

    held = data.test_labels == 1
    kinds = held_out_defects(data)
    rows: dict[str, torch.Tensor] = {}
    for kind in data.defects:
        idx = [i for i, k in enumerate(kinds) if k == kind][:per_row]
        if idx:
            rows[f"{kind}: real"] = overlay(data.test_images[held][idx], data.test_masks[held][idx])
        for source, syn in synthetic.items():
            if syn is None:
                continue
            modes = ("guided", "free") if source in GENERATED_SOURCES else ("cutpaste",)
            for mode in modes:
                sel = [i for i, (d, m) in enumerate(zip(syn.defects, syn.modes))
                       if m == mode and (d == kind or source not in GENERATED_SOURCES)][:per_row]
                if sel:
                    label = f"{kind}: {source}" + (f" {mode}" if source in GENERATED_SOURCES else "")
                    rows[label] = overlay(syn.images[sel], syn.masks[sel])
    save_grid(rows, path)
    return path


def has_trained_run(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run (config, adapters and condition embeddings)."""
    run_dir = Path(run_dir)
    return (run_dir / "config.yaml").is_file() and (run_dir / "adapters" / "conditions.safetensors").is_file()


def _train(cfg: APOConfig) -> None:
    from apo_fast.training.trainer import APOTrainer

    trainer = APOTrainer(cfg, resume=True)
    try:
        trainer.train()
    finally:
        trainer.close()


def ensure_apo_run(cfg: APOConfig, run_dir: str | Path, *, train_missing: bool = True, progress: bool = False) -> Path:
    """The APO run in ``run_dir``, trained from ``cfg`` if it is not there yet.

    Without ``model.pretrained`` and with ``pretrain.steps > 0`` the base UNet comes
    first into ``<run>/base``, as in the demo (:func:`apo_fast.demo.prepare_base`: the
    shipped base when it matches the config, else trained on the normal images).
    """
    from apo_fast.demo import prepare_base

    run_dir = Path(run_dir)
    if has_trained_run(run_dir):
        return run_dir
    if not train_missing:
        raise FileNotFoundError(f"{run_dir} holds no trained APO run (no adapters/conditions.safetensors); "
                                "train it first (apo-fast train) or allow training")
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(run_dir)
    cfg.train.progress = progress
    if cfg.model.pretrained is None and cfg.pretrain.steps > 0:
        prepare_base(cfg, run_dir / "base", progress=progress, say=lambda what: log.info("base model: %s", what))
    _train(cfg)
    return run_dir


def lora_baseline_config(apo_cfg: APOConfig, lora_dir: str | Path) -> APOConfig:
    """The plain-LoRA baseline of an APO run: same config, constant gate, plain diffusion loss."""
    cfg = copy.deepcopy(apo_cfg)
    cfg.output_dir = str(lora_dir)
    cfg.adapter = dataclasses.replace(cfg.adapter, gate=dataclasses.replace(cfg.adapter.gate, kind="constant"))
    cfg.loss.mode = "diffusion"
    validate_config(cfg)
    return cfg


def _training_settings(cfg: APOConfig) -> dict:
    plain = cfg.to_dict()
    out = {k: plain[k] for k in MODEL_TRAINING_KEYS}
    out["train"] = {k: v for k, v in plain["train"].items() if k not in TRAIN_KEYS_IGNORED}
    return out


def ensure_lora_run(
    apo_run: str | Path, lora_dir: str | Path | None = None, *, train_missing: bool = True, progress: bool = False
) -> Path:
    """The plain-LoRA baseline of ``apo_run``, trained into ``lora_dir`` (default ``<run>-lora``) if missing.

    Raises:
        ValueError: ``lora_dir`` holds a run trained with other settings.
        FileNotFoundError: it is missing and ``train_missing`` is False.
    """
    apo_run = Path(apo_run)
    lora_dir = Path(lora_dir) if lora_dir else apo_run.parent / f"{apo_run.name}-lora"
    expected = lora_baseline_config(load_config(apo_run / "config.yaml"), lora_dir)
    if (lora_dir / "config.yaml").is_file():
        found = _training_settings(load_config(lora_dir / "config.yaml"))
        want = _training_settings(expected)
        if found != want:
            differ = sorted(f"{s}.{k}" for s in want for k in set(want[s]) | set(found.get(s, {}))
                            if want[s].get(k) != found.get(s, {}).get(k))
            raise ValueError(f"{lora_dir} holds a run trained with other settings ({', '.join(differ)}) than the "
                             f"LoRA baseline of {apo_run}; delete it or set eval.lora_run to another folder")
    if has_trained_run(lora_dir):
        return lora_dir
    if not train_missing:
        raise FileNotFoundError(f"the LoRA baseline {lora_dir} is not trained; allow training or set eval.lora_run")
    expected.train.progress = progress
    _train(expected)
    return lora_dir


def demo_eval_config(ecfg: EvalConfig, *, seeds: int = 2, segmenter_steps: int = 150, num_per_defect: int = 8) -> EvalConfig:
    """The short comparison ``apo-fast demo`` ends with: ``ecfg`` capped to ``seeds`` seeds,
    ``segmenter_steps`` detector steps and ``num_per_defect`` anomalies per defect type.

    Two seeds keep a spread in the table (one seed cannot tell a margin from noise); the
    plain-LoRA baseline still trains for the APO run's full step count.
    """
    return dataclasses.replace(
        ecfg, seeds=list(ecfg.seeds[:seeds]), segmenter_steps=min(ecfg.segmenter_steps, segmenter_steps),
        num_per_defect=min(ecfg.num_per_defect, num_per_defect),
    )


# --------------------------------------------------------------------------- verdict


def compare_sources(summary: dict, target: str = "apo") -> dict:
    """How ``target`` fares against the best other source on every detection metric (higher is better).

    Returns:
        ``{"target": target, "metrics": {metric: {target_mean, target_std, best_other,
        best_other_mean, best_other_std, margin, wins, beyond_spread}}, "wins": k, "of": n,
        "sentence": str}``;
        ``beyond_spread``: the margin exceeds the sum of the two stds over seeds.
    """
    from apo_fast.eval.detection import DETECTION_METRICS

    if target not in summary or len(summary) < 2:
        return {"target": target, "metrics": {}, "wins": 0, "of": 0,
                "sentence": f"no comparison: {target!r} and another source needed"}
    rows = {}
    for metric in DETECTION_METRICS:
        mine = summary[target].get(metric, {})
        others = [(s, v[metric]) for s, v in summary.items() if s != target and metric in v
                  and v[metric].get("mean") is not None and math.isfinite(v[metric]["mean"])]
        if mine.get("mean") is None or not math.isfinite(mine["mean"]) or not others:
            continue
        best, stat = max(others, key=lambda kv: kv[1]["mean"])
        margin = mine["mean"] - stat["mean"]
        spread = (mine.get("std") or 0.0) + (stat.get("std") or 0.0)
        rows[metric] = {
            "target_mean": mine["mean"], "target_std": mine.get("std"), "best_other": best,
            "best_other_mean": stat["mean"], "best_other_std": stat.get("std"), "margin": margin,
            "wins": margin > 0, "beyond_spread": abs(margin) > spread and mine.get("n", 0) > 1,
        }
    wins = [m for m, r in rows.items() if r["wins"]]
    clear = [m for m in wins if rows[m]["beyond_spread"]]
    losses_clear = [m for m, r in rows.items() if not r["wins"] and r["beyond_spread"]]
    if not rows:
        sentence = "no comparison: no finite metric"
    else:
        sentence = f"{target} has the best mean on {len(wins)} of {len(rows)} detection metrics"
        sentence += f" ({', '.join(wins)})" if wins else ""
        if any(summary[target][m].get("n", 0) > 1 for m in rows):
            sentence += f"; beyond the seed spread on {len(clear)}" if wins else ""
        else:
            sentence += " (one seed: no spread to judge the margins by)"
        if losses_clear:
            behind = ", ".join(f"{m} ({rows[m]['best_other']})" for m in losses_clear)
            sentence += f"; clearly behind on {behind}"
        sentence += "."
    return {"target": target, "metrics": rows, "wins": len(wins), "of": len(rows), "sentence": sentence}


# --------------------------------------------------------------------------- the evaluation


@contextlib.contextmanager
def torch_threads(num: int) -> Iterator[None]:
    """Run with ``num`` torch intra-op threads (0: unchanged), restoring the setting afterwards."""
    if num <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_same_data(cfg: APOConfig, run_cfg: APOConfig, run_dir: Path) -> None:
    keys = ("root", "category", "defect_types", "shots", "image_size")
    differ = [k for k in keys if getattr(cfg.data, k) != getattr(run_cfg.data, k)]
    if differ:
        raise ValueError(
            f"the config's data ({', '.join(f'data.{k}={getattr(cfg.data, k)!r}' for k in differ)}) differs from "
            f"the run {run_dir} ({', '.join(f'{getattr(run_cfg.data, k)!r}' for k in differ)}); "
            "evaluate a run with the config it was trained with"
        )


def _margin_lines(verdict: dict) -> list[str]:
    from apo_fast.eval.report import METRIC_LABELS

    lines = []
    for metric, r in verdict["metrics"].items():
        note = ", beyond the seed spread" if r["beyond_spread"] else ""
        lines.append(
            f"- {METRIC_LABELS.get(metric, metric)}: {verdict['target']} {r['target_mean']:.3f} ± {r['target_std'] or 0:.3f}, "
            f"best other {r['best_other']} {r['best_other_mean']:.3f} ± {r['best_other_std'] or 0:.3f} "
            f"({r['margin']:+.3f}{note})"
        )
    return lines


def _loadavg() -> list[float] | None:
    from apo_fast.machine import loadavg

    return loadavg()


def evaluate(
    cfg: APOConfig,
    run_dir: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    train_missing: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Generation metrics and the downstream detector test of APO against baselines.

    Args:
        cfg: the run config; its ``eval`` section (:class:`~apo_fast.config.EvalConfig`)
            sets the evaluation, its ``data`` must match the run's.
        run_dir: trained APO run folder (default ``cfg.output_dir``); trained
            from ``cfg`` first when it holds no adapters and ``train_missing``.
        out_dir: report folder (default ``<run>/eval``).
        train_missing: train missing runs (APO, LoRA baseline); else raise
            ``FileNotFoundError``.
        progress: progress bars for training and sampling.
        log: called with one line per phase and per detector (e.g. ``print``).

    Returns:
        dict with ``summary`` ({source: {metric: {mean, std, n}}}), ``downstream``
        (per-seed results and settings), ``generation`` ({source: metrics and
        skipped}), ``verdict`` (:func:`compare_sources`), ``data`` (counts and
        file provenance), ``runs``, ``timings_s``, ``markdown`` and ``files``.
    """
    from apo_fast.eval.downstream import downstream_comparison
    from apo_fast.eval.sample_quality import generation_metrics
    from apo_fast.eval.report import (
        atomic_write_bytes,
        summarize,
        write_json,
        write_report,
    )
    from apo_fast.models import resolve_device

    if not isinstance(cfg, APOConfig):
        raise TypeError(f"cfg must be an APOConfig, got {type(cfg).__name__}")
    validate_config(cfg)
    ecfg = cfg.eval
    say = log or (lambda _line: None)
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    device = str(resolve_device(ecfg.device))
    timings: dict[str, float] = {}
    load_before, cpu0, wall0 = _loadavg(), time.process_time(), time.perf_counter()

    def phase(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 2)
        say(f"[eval] {name}: {timings[name]:.1f}s")

    with torch_threads(ecfg.num_threads):
        start = time.perf_counter()
        ensure_apo_run(cfg, run_dir, train_missing=train_missing, progress=progress)
        phase("apo_run_s", start)
        run_cfg = load_config(run_dir / "config.yaml")
        _check_same_data(cfg, run_cfg, run_dir)
        runs = {"apo": str(run_dir)}
        if "lora" in ecfg.sources:
            start = time.perf_counter()
            runs["lora"] = str(ensure_lora_run(run_dir, ecfg.lora_run, train_missing=train_missing, progress=progress))
            phase("lora_run_s", start)

        start = time.perf_counter()
        data = load_eval_data(run_cfg, ecfg.guide_normals)
        synthetic: dict[str, SyntheticSet | None] = {}
        num = ecfg.num_per_defect * len(data.defects)
        for source in ecfg.sources:
            if source == "none":
                synthetic[source] = None
            elif source == "cutpaste":
                synthetic[source] = cutpaste_synthetic(data, num, ecfg.sample_seed)
            else:
                synthetic[source] = generate_synthetic(runs[source], data, ecfg, device=device, progress=progress)
            say(f"[eval] synthetic data {source}: {0 if synthetic[source] is None else synthetic[source].images.shape[0]}")
        phase("synthesis_s", start)

        generation: dict[str, dict] = {}
        if ecfg.generation_metrics:
            start = time.perf_counter()
            options = {
                "lpips_net": ecfg.lpips_net, "lpips_backbone_weights": ecfg.lpips_weights,
                "inception_weights": ecfg.inception_weights, "kid_subsets": ecfg.kid_subsets,
                "kid_subset_size": ecfg.kid_subset_size, "seed": ecfg.sample_seed, "device": device,
            }
            for source, syn in synthetic.items():
                if syn is None:
                    continue
                parts = {source: (syn.images, syn.masks)}
                if source in GENERATED_SOURCES:
                    parts.update({f"{source} ({m})": syn.select(m) for m in ("guided", "free")})
                for name, (images, _) in parts.items():
                    if images.shape[0] >= 2:
                        generation[name] = generation_metrics(images, data.train_anomalies, **options)
            phase("generation_metrics_s", start)

        judge_record = None
        if ecfg.judge:
            start = time.perf_counter()
            judge_record = judge_sources(data, synthetic, ecfg, generation)
            phase("judge_s", start)

        start = time.perf_counter()
        augment = ecfg.segmenter_augment
        if augment is None:
            from apo_fast.data import category_augment

            augment = category_augment(data.category, data.normal_train) == "dihedral"
        downstream = downstream_comparison(
            data.normal_train,
            {s: None if syn is None else (syn.images, syn.masks) for s, syn in synthetic.items()},
            data.test_images, data.test_masks, data.test_labels,
            seeds=list(ecfg.seeds), steps=ecfg.segmenter_steps, batch_size=ecfg.segmenter_batch_size,
            lr=ecfg.segmenter_lr, device=device, progress=progress,
            segmenter_kwargs={"base_channels": ecfg.segmenter_channels, "depth": ecfg.segmenter_depth,
                              "augment": augment},
            log=say,
        )
        phase("downstream_s", start)

    summary = summarize(downstream["results"])
    verdict = compare_sources(summary, "apo")
    start = time.perf_counter()
    shown = {"real (train)": (data.train_anomalies, data.train_masks)}
    for source, syn in synthetic.items():
        if syn is not None:
            order = syn.grid_order()
            shown[source] = (syn.images[order], syn.masks[order])
    files = write_report(
        out_dir, downstream, generation_by_source=generation,
        images_by_source={k: v[0] for k, v in shown.items()}, masks_by_source={k: v[1] for k, v in shown.items()},
        title=f"Synthetic anomalies for {data.category}: downstream comparison",
    )
    files["kinds_sheet"] = save_kind_sheet(out_dir / f"kinds_{data.category}.png", data, synthetic)
    timings["report_s"] = round(time.perf_counter() - start, 2)
    timings["total_s"] = round(time.perf_counter() - wall0, 2)
    timings["cpu_s"] = round(time.process_time() - cpu0, 2)
    machine = {"cpu_count": os.cpu_count(), "torch_threads": ecfg.num_threads or torch.get_num_threads(),
               "loadavg_before": load_before, "loadavg_after": _loadavg(), "device": device}
    data_record = {
        **data.summary(),
        "test_paths": data.test_paths, "test_mask_paths": data.test_mask_paths,
        "normal_train_paths": data.normal_train_paths, "train_anomaly_paths": data.train_anomaly_paths,
        "guide_normal_paths": data.guide_normal_paths,
        "segmenter_training_inputs": {s: sorted(set(data.normal_train_paths) | set(syn.inputs if syn else []))
                                      for s, syn in synthetic.items()},
        "synthetic": {s: None if syn is None else {"n": int(syn.images.shape[0]), "modes": sorted(set(syn.modes)),
                                                   "mask_fraction": float(syn.masks.mean())}
                      for s, syn in synthetic.items()},
    }
    files["details"] = write_json(out_dir / "eval_details.json", {
        "runs": runs, "eval_config": ecfg, "data": data_record, "verdict": verdict,
        "timings_s": timings, "machine": machine, "judge": judge_record,
    })
    markdown = files["markdown"].read_text()
    n_guided, n_free = split_counts(ecfg.num_per_defect, ecfg.guided_fraction)
    counts = data.summary()
    markdown += "\n".join([
        "", "## Protocol", "",
        (f"- Test: {counts['test_anomalous']} held-out real anomalies and {counts['test_good']} good test images; "
         "never used for training or guidance."),
        (f"- Each synthetic source: {ecfg.num_per_defect} anomalies per defect type ({len(data.defects)} types); "
         f"generated ones {n_guided} mask-guided (training masks on {ecfg.guide_normals} normals) and {n_free} free."),
        (f"- lora: {runs.get('lora', 'not run')} (constant gate, plain diffusion loss, same base and steps); "
         f"apo: {run_dir}."),
        (f"- Wall time {timings['total_s']:.0f}s (CPU {timings['cpu_s']:.0f}s, {machine['torch_threads']} "
         f"thread(s), load average {load_before} -> {machine['loadavg_after']})."),
        "", "## Verdict", "", verdict["sentence"], "", *_margin_lines(verdict), "",
        *_judge_lines(judge_record),
        f"Real anomalies of each kind beside every source's, guided and free: `{Path(files['kinds_sheet']).name}`.",
        "",
    ])
    atomic_write_bytes(files["markdown"], markdown.encode())
    say(f"[eval] report written to {out_dir}")
    return {
        "summary": summary, "downstream": downstream, "generation": generation, "verdict": verdict,
        "data": data_record, "runs": runs, "timings_s": timings, "machine": machine, "markdown": markdown,
        "files": {k: str(v) for k, v in files.items()},
    }
