"""apo-fast eval end to end on the demo data with tiny settings: every source's metrics,
the report files, the missing-weights path, the LoRA baseline run, the CLI and run_demo's
short comparison, and that held-out data never reaches training or guidance."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from apo_fast.config import ConfigError, EvalConfig, load_config
from apo_fast.demo import demo_config
from apo_fast.eval.detection import DETECTION_METRICS
from apo_fast.eval.sample_quality import PRETRAINED_METRICS, WEIGHT_FREE_METRICS
from apo_fast.sampling.hierarchical import grow_mask

SOURCES = ["none", "cutpaste", "lora", "apo"]
DEFECTS = ["crack", "hole", "stain"]
TINY = [
    "data.image_size=16",
    "train.batch_size=4",
    "train.steps=2",
    "train.log_every=1",
    "train.progress=false",
    "train.device=cpu",
    "sample.num_inference_steps=2",
    "sample.num_per_defect=2",
    "sample.batch_size=4",
    "pretrain.steps=3",
    "pretrain.batch_size=4",
    "eval.num_per_defect=3",
    "eval.seeds=[0]",
    "eval.segmenter_steps=3",
    "eval.segmenter_channels=4",
    "eval.segmenter_depth=2",
    "eval.kid_subsets=2",
    "eval.judge_steps=20",
    "eval.device=cpu",
]


def tiny_cfg(run: Path, weights: Path, *extra: str):
    # Weight paths that hold nothing: IC-LPIPS, IS and KID must be skipped with a reason
    # whether or not torchvision (or a hub cache) exists on the machine running the tests.
    return demo_config(str(run), TINY + [f"eval.lpips_weights={weights}", f"eval.inception_weights={weights}", *extra])


def heldout_files(cfg) -> dict[str, set[str]]:
    """The held-out data, listed independently of the evaluator."""
    from apo_fast.data import resolve_data_root, scan_mvtec

    index = scan_mvtec(resolve_data_root(cfg.data.root), cfg.data.category, cfg.data.defect_types, cfg.data.shots)
    anomalies = {str(p) for d in index.defects.values() for p in d.heldout}
    masks = {str(d.masks[p]) for d in index.defects.values() for p in d.heldout}
    return {"anomalies": anomalies, "masks": masks, "good": {str(p) for p in index.test_good}}


@pytest.fixture(autouse=True)
def _keep_process_group(monkeypatch):
    # cli.main() ends the process group on exit, but DeepSpeed keeps its cached groups, so
    # any later trainer in this test process would fail. A real CLI process runs main() once.
    from apo_fast.training import distributed

    monkeypatch.setattr(distributed, "shutdown_distributed", lambda: None)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One tiny evaluation (trains the APO run and the LoRA baseline), with a spy on the detector's data."""
    from apo_fast.eval import downstream
    from apo_fast.eval.evaluate import evaluate, torch_threads

    root = tmp_path_factory.mktemp("eval")
    weights = root / "no_weights"
    weights.mkdir()
    cfg = tiny_cfg(root / "run", weights)
    seen = {}
    real = downstream.downstream_comparison

    def spy(normal_train, synthetic_by_source, test_images, test_masks, test_labels=None, **kwargs):
        seen.update(normal_train=normal_train, synthetic=synthetic_by_source, test_images=test_images,
                    test_labels=test_labels)
        return real(normal_train, synthetic_by_source, test_images, test_masks, test_labels, **kwargs)

    downstream.downstream_comparison = spy
    lines: list[str] = []
    try:
        with torch_threads(1):
            result = evaluate(cfg, log=lines.append)
    finally:
        downstream.downstream_comparison = real
    return {"cfg": cfg, "root": root, "weights": weights, "result": result, "seen": seen, "log": lines}


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_source_gets_detection_metrics_and_the_report_is_written(evaluated):
    result, root = evaluated["result"], evaluated["root"]
    assert list(result["summary"]) == SOURCES
    for source in SOURCES:
        runs = result["downstream"]["results"][source]
        assert [r["seed"] for r in runs] == [0] * (1 if source == "none" else 2)  # x 2 generators
        for metric in DETECTION_METRICS:
            value = result["summary"][source][metric]["mean"]
            assert 0.0 <= value <= 1.0, (source, metric, value)
    n = 3 * len(DEFECTS)
    assert [result["downstream"]["results"][s][0]["n_synthetic"] for s in SOURCES] == [0, n, n, n]

    out = root / "run" / "eval"
    files = {k: Path(v) for k, v in result["files"].items()}
    assert set(files) == {"json", "markdown", "metrics_png", "samples_png", "details", "kinds_sheet"}
    assert all(p.parent == out and p.is_file() for p in files.values())
    assert files["kinds_sheet"].name == "kinds_brick.png"
    for key in ("metrics_png", "samples_png", "kinds_sheet"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(files["json"].read_text())
    assert list(report["summary"]) == SOURCES and set(report["generation"]) >= {"cutpaste", "lora", "apo"}
    md = files["markdown"].read_text()
    assert md == result["markdown"]
    assert all(f"| {s} |" in md for s in SOURCES) and "## Verdict" in md and result["verdict"]["sentence"] in md
    details = json.loads(files["details"].read_text())
    assert details["verdict"]["of"] == len(DETECTION_METRICS)
    # the paired view: APO against the two other generated sources on both generators' runs
    paired = details["verdict"]["paired"]["pixel_ap"]
    assert paired["lora"]["n"] == paired["cutpaste"]["n"] == 2 and paired["none"]["n"] == 1
    assert "Paired: apo minus each source" in md and "| Pixel AP |" in md
    # the fidelity judge: its classes, its own accuracy, and its metrics for every source and mode
    judge = details["judge"]
    assert judge["classes"] == ["other", "good", *DEFECTS] and 0.0 <= judge["val_accuracy"]["mean"] <= 1.0
    for name in ("cutpaste", "apo", "apo (guided)", "apo (free)", "lora", "lora (guided)"):
        metrics = result["generation"][name]["metrics"]
        assert 0.0 <= metrics["judge_product"] <= 1.0 and 0.0 <= metrics["judge_defect"] <= 1.0, name
        assert math.isfinite(metrics["judge_kid"]), name
        if name != "cutpaste":
            assert 0.0 <= metrics["judge_right_kind"] <= 1.0, name
    assert math.isnan(result["generation"]["cutpaste"]["metrics"]["judge_right_kind"])  # no kind to be right about
    assert "## Fidelity judge" in md and "judge_right_kind" in md
    # per defect kind: every generated source and mode, counts over all generators that give
    # back each mode's judge_right_kind (the generators make equally many of each kind)
    by_kind = dict(judge["right_kind_by_kind"])
    real = by_kind.pop("real (training anomalies)")  # the judge never trained on them
    assert set(real) == set(DEFECTS) and all(0 <= r <= n for r, n in real.values())
    assert sum(n for _, n in real.values()) == details["data"]["train_anomalies"]
    assert set(by_kind) == {f"{s} ({m})" for s in ("apo", "lora") for m in ("guided", "free")}
    for name, per in by_kind.items():
        assert set(per) <= set(DEFECTS) and all(0 <= r <= n for r, n in per.values()), name
        right, made = sum(r for r, _ in per.values()), sum(n for _, n in per.values())
        assert right / made == pytest.approx(result["generation"][name]["metrics"]["judge_right_kind"]), name
    assert "Right kind per defect kind" in md and "| apo (guided) |" in md
    assert details["timings_s"]["total_s"] > 0 and details["machine"]["torch_threads"] == 1
    assert not list(out.glob(".*tmp"))  # no half-written file left


@pytest.mark.slow
def test_missing_weights_skip_only_their_metrics_with_a_message(evaluated):
    generation = evaluated["result"]["generation"]
    assert set(generation) == {"cutpaste", "lora", "lora (guided)", "lora (free)", "apo", "apo (guided)", "apo (free)"}
    for name, res in generation.items():
        assert set(res["skipped"]) == set(PRETRAINED_METRICS), name
        for reason in res["skipped"].values():
            assert "skipped" in reason or "not found" in reason or "does not" in reason, reason
        for metric in ("ms_ssim_diversity", "l2_diversity", "ic_l2"):
            assert math.isfinite(res["metrics"][metric]), (name, metric)
        judge = {"judge_right_kind", "judge_defect", "judge_product", "judge_kid", "judge_kid_std"}
        allowed = set(WEIGHT_FREE_METRICS) | judge  # the judge needs no downloaded weights
        allowed |= {f"{m}_std" for m in allowed}  # spreads over the two generators
        assert set(res["metrics"]) <= allowed
    md = evaluated["result"]["markdown"]
    assert "Skipped:" in md and "- kid:" in md and "| skipped |" in md


@pytest.mark.slow
def test_lora_baseline_is_the_same_run_with_constant_gate_and_plain_loss(evaluated):
    from apo_fast.eval.runs import ensure_lora_run

    root = evaluated["root"]
    apo, lora = load_config(root / "run" / "config.yaml"), load_config(root / "run-lora" / "config.yaml")
    runs = evaluated["result"]["runs"]
    assert {k: runs[k] for k in ("apo", "lora")} == {"apo": str(root / "run"), "lora": str(root / "run-lora")}
    assert (apo.loss.mode, apo.adapter.gate.kind) == ("unpaired", "rank_prefix")
    assert (lora.loss.mode, lora.adapter.gate.kind) == ("diffusion", "constant")
    assert lora.train.steps == apo.train.steps and lora.model == apo.model and lora.optim == apo.optim
    assert lora.adapter.r == apo.adapter.r and lora.data == apo.data
    # A trained baseline is reused; one trained with other settings is refused, not mixed in.
    assert ensure_lora_run(root / "run", train_missing=False) == root / "run-lora"
    other = root / "other-lora"
    other.mkdir()
    text = (root / "run-lora" / "config.yaml").read_text().replace("steps: 2\n", "steps: 5\n", 1)
    (other / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match="train.steps"):
        ensure_lora_run(root / "run", other, train_missing=False)
    # the same for a second generator: reused when trained, refused when its settings differ
    from apo_fast.eval.runs import ensure_generator_run

    assert ensure_generator_run(root / "run", 1, train_missing=False) == root / "run-gen1"
    with pytest.raises(FileNotFoundError, match="generator 2"):
        ensure_generator_run(root / "run", 2, train_missing=False)
    (root / "run-gen2").mkdir()
    (root / "run-gen2" / "config.yaml").write_text((root / "run" / "config.yaml").read_text())  # seed not + 2
    with pytest.raises(ValueError, match="other settings than generator 2"):
        ensure_generator_run(root / "run", 2, train_missing=False)


@pytest.mark.slow
def test_heldout_data_never_trains_the_segmenter_or_guides_generation(evaluated):
    data, cfg = evaluated["result"]["data"], evaluated["cfg"]
    held = heldout_files(cfg)
    held_all = held["anomalies"] | held["masks"] | held["good"]
    # The test set is exactly the held-out anomalies plus test/good.
    assert set(data["test_paths"]) == held["anomalies"] | held["good"]
    assert set(data["test_mask_paths"]) == held["masks"]
    assert data["test_anomalous"] == len(held["anomalies"]) and data["test_good"] == len(held["good"])
    # Nothing a detector trains on, nor any guide of the generation, comes from there.
    assert not set(data["guide_normal_paths"]) & held_all
    assert not set(data["train_anomaly_paths"]) & held_all
    for source, inputs in data["segmenter_training_inputs"].items():
        assert inputs and not set(inputs) & held_all, source
    assert set(data["segmenter_training_inputs"]["none"]) == set(data["normal_train_paths"])

    # The same on the tensors the detectors really got: no test image is a training
    # normal, and outside its mask no synthetic anomaly is a test image.
    seen = evaluated["seen"]
    tests = seen["test_images"].flatten(1)
    assert torch.cdist(seen["normal_train"].flatten(1), tests).min() > 1e-3
    normals = seen["normal_train"].flatten(1)
    guided = 2  # of 3 per defect type (guided_fraction 0.5, rounded); the guided ones come first
    for source in ("lora", "apo"):
        images, masks = seen["synthetic"][source]
        # a guided sample may change its mask grown by sample.guide_dilate pixels, nothing else
        grown = grow_mask(masks.float(), cfg.sample.guide_dilate)
        flat, outside = images.flatten(1), (grown < 0.5).expand_as(images).flatten(1)
        for i in range(images.shape[0]):
            keep = outside[i]
            if keep.any():
                assert (tests[:, keep] - flat[i, keep]).abs().amax(dim=1).min() > 1e-3, (source, i)
            if i % 3 < guided:  # a guided sample keeps a train/good image exactly outside the training mask
                assert (normals[:, keep] - flat[i, keep]).abs().amax(dim=1).min() < 1e-5, (source, i)


@pytest.mark.slow
def test_the_spread_covers_two_generators_and_the_detector_seeds(evaluated):
    """eval.generator_seeds (default 2): a second APO run and LoRA baseline from the run's config
    with train.seed + 1 (same base), detectors per (generator, seed), the summary over all of
    them, the judge's metrics the mean over generators with their spread."""
    from apo_fast.config import load_config

    res, cfg = evaluated["result"], evaluated["cfg"]
    gens = res["runs"]["generators"]
    assert len(gens) == cfg.eval.generator_seeds == 2 and gens[0]["apo"] == cfg.output_dir
    run_cfg = load_config(Path(cfg.output_dir) / "config.yaml")
    for key in ("apo", "lora"):
        other = load_config(Path(gens[1][key]) / "config.yaml")
        assert other.train.seed == run_cfg.train.seed + 1 and other.model.pretrained == run_cfg.model.pretrained
        assert (other.loss.mode == "diffusion") == (key == "lora")
    per = res["downstream"]["results"]
    for source in ("apo", "lora", "cutpaste"):
        assert sorted((r["generator_seed"], r["seed"]) for r in per[source]) == [
            (k, s) for k in (0, 1) for s in cfg.eval.seeds]
        assert res["summary"][source]["image_auroc"]["n"] == 2 * len(cfg.eval.seeds)
    assert [r["generator_seed"] for r in per["none"]] == [0] * len(cfg.eval.seeds)
    guided = res["generation"]["apo (guided)"]
    values = [p["judge_right_kind"] for p in guided["judge_per_generator"]]
    assert len(values) == 2 and guided["metrics"]["judge_right_kind"] == pytest.approx(sum(values) / 2)
    assert guided["metrics"]["judge_right_kind_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "2 generator(s) x" in res["markdown"]
    assert "(mean ± std over 2 generators x detector seeds)" in res["markdown"]


@pytest.mark.slow
def test_sampling_settings_can_replace_a_trained_runs_own(evaluated):
    """A sampling-only ablation: generate_synthetic(sample=...) samples the same trained run with
    other settings (the run's own settings again give the same anomalies, bit for bit)."""
    import copy

    from apo_fast.eval.eval_data import load_eval_data
    from apo_fast.eval.synthetic import generate_synthetic

    cfg = evaluated["cfg"]
    data = load_eval_data(cfg)
    ecfg = copy.deepcopy(cfg.eval)
    ecfg.num_per_defect = 2
    own = generate_synthetic(cfg.output_dir, data, ecfg, device="cpu")
    same = generate_synthetic(cfg.output_dir, data, ecfg, device="cpu", sample=copy.deepcopy(cfg.sample))
    assert torch.equal(own.images, same.images)
    other = copy.deepcopy(cfg.sample)
    other.s_align = 0.0  # the policy's alignment term off: the reference's samples
    off = generate_synthetic(cfg.output_dir, data, ecfg, device="cpu", sample=other)
    assert off.images.shape == own.images.shape and not torch.equal(off.images, own.images)


# --------------------------------------------------------------------------- pieces


def test_guides_are_training_masks_on_chosen_normals():
    from apo_fast.data import augment_pair
    from apo_fast.eval.eval_data import load_eval_data
    from apo_fast.eval.synthetic import mask_guides

    cfg = demo_config("unused", ["data.image_size=16"])
    data = load_eval_data(cfg, "train")
    images, masks, used = mask_guides(data, "hole", 7, torch.Generator().manual_seed(0), "dihedral")
    assert images.shape == (7, 3, 16, 16) and masks.shape == (7, 1, 16, 16)
    hole = [i for i, d in enumerate(data.train_defects) if d == "hole"]
    train_masks = {data.train_mask_paths[i] for i in hole}
    assert set(used) <= train_masks | set(data.normal_train_paths) and set(used) & train_masks
    for m in masks:  # each is a symmetry of a training mask of this defect
        assert any(torch.equal(m, augment_pair(data.train_anomalies[i], data.train_masks[i], v)[1])
                   for i in hole for v in range(8))
    for img in images:
        assert any(torch.equal(img, n) for n in data.normal_train)
    with pytest.raises(ValueError, match="scratch"):
        mask_guides(data, "scratch", 1, torch.Generator(), "flip")


def test_test_split_guides_are_removed_from_the_test_set():
    from apo_fast.eval.eval_data import load_eval_data

    cfg = demo_config("unused", ["data.image_size=16"])
    held = heldout_files(cfg)
    full, split = load_eval_data(cfg, "train"), load_eval_data(cfg, "test_split")
    assert set(full.guide_normal_paths) == set(full.normal_train_paths)
    assert set(split.guide_normal_paths) | (set(split.test_paths) & held["good"]) == held["good"]
    assert not set(split.guide_normal_paths) & set(split.test_paths)
    assert split.test_images.shape[0] == full.test_images.shape[0] - len(split.guide_normal_paths)
    assert int(split.test_labels.sum()) == int(full.test_labels.sum()) == len(held["anomalies"])
    with pytest.raises(ValueError, match="guide_normals"):
        load_eval_data(cfg, "test")


def test_compare_sources_counts_wins_and_spread():
    from apo_fast.eval.verdict import compare_sources

    def stat(mean, std):
        return {"mean": mean, "std": std, "n": 3}

    summary = {
        "none": {"image_auroc": stat(0.5, 0.01), "pixel_auroc": stat(0.6, 0.01), "pixel_ap": stat(0.2, 0.1)},
        "cutpaste": {"image_auroc": stat(0.7, 0.01), "pixel_auroc": stat(0.9, 0.01), "pixel_ap": stat(0.3, 0.1)},
        "apo": {"image_auroc": stat(0.8, 0.02), "pixel_auroc": stat(0.8, 0.01), "pixel_ap": stat(0.35, 0.1)},
    }
    verdict = compare_sources(summary)
    assert (verdict["wins"], verdict["of"]) == (2, 3)
    image = verdict["metrics"]["image_auroc"]
    assert image["best_other"] == "cutpaste" and image["margin"] == pytest.approx(0.1) and image["beyond_spread"]
    assert not verdict["metrics"]["pixel_ap"]["beyond_spread"]  # 0.05 apart, stds 0.1 each
    assert not verdict["metrics"]["pixel_auroc"]["wins"]
    assert "2 of 3" in verdict["sentence"] and "pixel_auroc (cutpaste)" in verdict["sentence"]
    assert compare_sources({"none": summary["none"]})["of"] == 0


def test_paired_margins_match_runs_and_cancel_shared_variance():
    import itertools

    import numpy as np

    from apo_fast.eval.verdict import paired_lines, paired_margins

    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    gens, seeds = 1 + int(rng.integers(1, 4)), [int(s) for s in rng.choice(50, 3, replace=False)]
    shift = {(g, s): float(rng.uniform(-0.3, 0.3)) for g in range(gens) for s in seeds}  # shared by both sources
    gain = {k: float(rng.uniform(0.01, 0.05)) for k in shift}
    gain[(0, seeds[0])] = -0.01  # one run lost
    lora = [{"seed": s, "generator_seed": g, "pixel_ap": 0.5 + shift[(g, s)]} for (g, s) in shift]
    apo = [{"seed": s, "generator_seed": g, "pixel_ap": 0.5 + shift[(g, s)] + gain[(g, s)]} for (g, s) in shift]
    apo = apo[::-1] + [{"seed": 999, "generator_seed": 0, "pixel_ap": 5.0}]  # order-free; an unmatched run is ignored
    lora.append({"seed": seeds[1], "generator_seed": 99, "pixel_ap": float("nan")})
    lora[1]["pixel_pro"] = float("nan")
    apo_pro = {(r["generator_seed"], r["seed"]): r for r in apo}
    apo_pro[(lora[1]["generator_seed"], lora[1]["seed"])]["pixel_pro"] = 0.9
    out = paired_margins({"apo": apo, "lora": lora}, "apo")

    diffs = np.array([gain[k] for k in shift], dtype=np.float64)
    got = out["pixel_ap"]["lora"]
    assert got["n"] == len(shift) and got["wins"] == len(shift) - 1
    assert got["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert got["std"] == pytest.approx(diffs.std(ddof=1), abs=1e-12)
    heads = sum(sum(f) >= got["wins"] for f in itertools.product([0, 1], repeat=got["n"]))
    assert got["p_sign"] == pytest.approx(heads / 2 ** got["n"])
    assert math.isclose(got["std"], diffs.std(ddof=1)) and got["std"] < 0.05  # the shared shift cancels
    assert "pixel_pro" not in out  # its one pair has a NaN side
    table = "\n".join(paired_lines(out))
    assert "| Pixel AP |" in table and f"({got['wins']}/{got['n']}," in table
    assert paired_margins({"apo": apo}, "apo") == {} and paired_lines({}) == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.sources=[apo, apo]", "eval.sources"),
        ("eval.sources=[dalle]", r"eval.sources\[0\]"),
        ("eval.guided_fraction=1.5", "eval.guided_fraction"),
        ("eval.guide_normals=test", "eval.guide_normals"),
        ("eval.seeds=[]", "eval.seeds"),
        ("eval.generator_seeds=0", "eval.generator_seeds"),
        ("eval.generator_seeds=1.5", "eval.generator_seeds"),
        ("eval.segmenter_steps=0", "eval.segmenter_steps"),
        ("eval.kid_subset_size=1", "eval.kid_subset_size"),
        ("eval.num_threads=-1", "eval.num_threads"),
        ("eval.lpips_net=resnet", "eval.lpips_net"),
        ("eval.bogus=1", "eval.bogus"),
    ],
)
def test_bad_eval_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        demo_config("unused", [override])


def test_threads_are_restored():
    from apo_fast.eval.evaluate import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before


def test_evaluate_refuses_a_missing_run_without_training(tmp_path, capsys):
    from apo_fast.cli import main
    from apo_fast.eval.evaluate import evaluate

    cfg = demo_config(str(tmp_path / "run"), ["data.image_size=16"])
    with pytest.raises(FileNotFoundError, match="no trained APO run"):
        evaluate(cfg, train_missing=False)
    with pytest.raises(TypeError, match="APOConfig"):
        evaluate({"output_dir": "x"})
    config = tmp_path / "cfg.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")
    assert main(["eval", "--config", str(config), "--no-train"]) == 2
    assert "no trained APO run" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI and demo on the trained runs


@pytest.mark.slow
def test_cli_eval_reuses_the_trained_runs(evaluated, tmp_path, capsys):
    from apo_fast.cli import main
    from apo_fast.config import save_config

    cfg = evaluated["cfg"]
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    run = evaluated["root"] / "run"
    mtime = (run / "adapters" / "conditions.safetensors").stat().st_mtime_ns
    code = main(["eval", "--config", str(cfg_file), "--run", str(run), "--no-train", "--no-progress",
                 "--set", "eval.sources=[none, apo]", "--set", "eval.generation_metrics=false",
                 "--set", "eval.judge=false", "--set", "eval.num_threads=1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| none |" in printed and "| apo |" in printed and "| cutpaste |" not in printed
    assert (run / "adapters" / "conditions.safetensors").stat().st_mtime_ns == mtime  # not retrained
    report = json.loads((run / "eval" / "eval_report.json").read_text())
    assert list(report["summary"]) == ["none", "apo"] and report["generation"] == {}


@pytest.mark.slow
def test_demo_ends_with_the_short_comparison(evaluated):
    from apo_fast.demo import run_demo
    from apo_fast.eval.runs import demo_eval_config

    short = demo_eval_config(EvalConfig())
    assert len(short.seeds) < len(EvalConfig().seeds) or short.segmenter_steps < EvalConfig().segmenter_steps
    cfg = tiny_cfg(evaluated["root"] / "run", evaluated["weights"])  # the trained run: nothing retrains
    metrics = run_demo(cfg, progress=False)
    comparison = metrics["comparison"]
    assert list(comparison["summary"]) == SOURCES and comparison["verdict"]
    assert Path(metrics["files"]["eval_report"]).is_file()
    assert (evaluated["root"] / "run" / "samples" / "grid.png").is_file()  # the demo's own outputs stay


def test_eval_at_demo_settings_starts_from_the_shipped_base(tmp_path, monkeypatch):
    """`apo-fast eval --config configs/demo.yaml` with no run yet takes the base the demo takes
    (the shipped one), instead of pretraining 3000 steps first."""
    import apo_fast.eval.runs as eval_runs
    import apo_fast.training.pretrain as pretrain

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the shipped base matches: nothing should be pretrained")

    trained = []
    monkeypatch.setattr(pretrain, "pretrain_base", no_pretraining)
    monkeypatch.setattr(eval_runs, "_train", trained.append)
    eval_runs.ensure_apo_run(demo_config(str(tmp_path / "run")), tmp_path / "run")
    assert (tmp_path / "run" / "base" / "base_unet" / "config.json").is_file()
    assert trained and trained[0].model.pretrained == str(tmp_path / "run" / "base" / "base_unet")
