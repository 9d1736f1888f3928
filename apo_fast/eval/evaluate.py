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
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from apo_fast.config import APOConfig, EvalConfig, load_config, validate_config
from apo_fast.eval.eval_data import EvalData, load_eval_data
from apo_fast.eval.judging import judge_lines, judge_sources, save_kind_sheet
from apo_fast.eval.runs import ensure_apo_run, ensure_generator_run, ensure_lora_run
from apo_fast.eval.synthetic import (
    GENERATED_SOURCES,
    SyntheticSet,
    cutpaste_synthetic,
    generate_synthetic,
    split_counts,
)
from apo_fast.eval.report import mean_over_generators
from apo_fast.eval.verdict import compare_sources, margin_lines, paired_lines, paired_margins
from apo_fast.machine import loadavg

log = logging.getLogger(__name__)

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
        skipped}), ``verdict`` (:func:`~apo_fast.eval.verdict.compare_sources`), ``data``
        (counts and file provenance), ``runs``, ``timings_s``, ``markdown`` and ``files``.
    """
    from apo_fast.models import resolve_device

    if not isinstance(cfg, APOConfig):
        raise TypeError(f"cfg must be an APOConfig, got {type(cfg).__name__}")
    validate_config(cfg)
    ecfg = cfg.eval
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
    device = str(resolve_device(ecfg.device))
    clock = _Phases(log or (lambda _line: None))
    with torch_threads(ecfg.num_threads):
        with clock.phase("apo_run_s"):
            ensure_apo_run(cfg, run_dir, train_missing=train_missing, progress=progress)
        run_cfg = load_config(run_dir / "config.yaml")
        _check_same_data(cfg, run_cfg, run_dir)
        generators = [_generator_runs(run_dir, k, ecfg, train_missing, progress, clock)
                      for k in range(ecfg.generator_seeds)]
        runs = {**generators[0], "generators": generators}
        with clock.phase("synthesis_s"):
            data = load_eval_data(run_cfg, ecfg.guide_normals)
            synthetic_by_generator = [_synthesize(data, ecfg, g, device, progress, clock.say, k)
                                      for k, g in enumerate(generators)]
        generation: dict[str, dict] = {}
        if ecfg.generation_metrics:
            with clock.phase("generation_metrics_s"):
                generation = mean_over_generators([_generation_scores(data, syn, ecfg, device)
                                                   for syn in synthetic_by_generator])
        judge_record = None
        if ecfg.judge:
            with clock.phase("judge_s"):
                judge_record = judge_sources(data, synthetic_by_generator, ecfg, generation)
        with clock.phase("downstream_s"):
            downstream = _downstream(data, synthetic_by_generator, ecfg, device, progress, clock.say)
    results = _Results(runs, data, synthetic_by_generator[0], downstream, generation, judge_record)
    return _write_eval_report(out_dir, run_dir, ecfg, results, clock, device)


def _generator_runs(run_dir: Path, k: int, ecfg: EvalConfig, train_missing: bool, progress: bool,
                    clock: "_Phases") -> dict[str, str]:
    """Generator ``k``'s APO run (the run itself for 0) and, when ``lora`` is a source, its baseline."""
    suffix = "" if k == 0 else f"_gen{k}"
    apo = run_dir
    if k:  # generator 0 is the run itself, trained (or found) before
        with clock.phase(f"apo_run{suffix}_s"):
            apo = ensure_generator_run(run_dir, k, train_missing=train_missing, progress=progress)
    runs = {"apo": str(apo)}
    if "lora" in ecfg.sources:
        with clock.phase(f"lora_run{suffix}_s"):
            runs["lora"] = str(ensure_lora_run(apo, ecfg.lora_run if k == 0 else None, train_missing=train_missing,
                                               progress=progress))
    return runs


@dataclass
class _Results:
    runs: dict
    data: EvalData
    synthetic: dict
    downstream: dict
    generation: dict
    judge: dict | None


class _Phases:
    """Wall time per phase, said as each ends; CPU time and the load average around the whole."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.timings: dict[str, float] = {}
        self.load_before, self.cpu0, self.wall0 = loadavg(), time.process_time(), time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, quiet: bool = False) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 2)
        if not quiet:
            self.say(f"[eval] {name}: {self.timings[name]:.1f}s")

    def finish(self) -> dict[str, float]:
        self.timings["total_s"] = round(time.perf_counter() - self.wall0, 2)
        self.timings["cpu_s"] = round(time.process_time() - self.cpu0, 2)
        return self.timings


def _synthesize(data: EvalData, ecfg: EvalConfig, runs: dict, device: str, progress: bool,
                say: Callable[[str], None], k: int = 0) -> dict[str, SyntheticSet | None]:
    """Every source's synthetic anomalies for generator ``k`` (``none``: no anomalies, normals
    only; CutPaste, which has no generator, pastes with a seed of its own per ``k``). The
    generated sources sample every generator with the same seeds: they differ by training only."""
    synthetic: dict[str, SyntheticSet | None] = {}
    num = ecfg.num_per_defect * len(data.defects)
    for source in ecfg.sources:
        if source == "none":
            synthetic[source] = None
        elif source == "cutpaste":
            synthetic[source] = cutpaste_synthetic(data, num, ecfg.sample_seed + 7919 * k)
        else:
            synthetic[source] = generate_synthetic(runs[source], data, ecfg, device=device, progress=progress)
        n = 0 if synthetic[source] is None else synthetic[source].images.shape[0]
        say(f"[eval] synthetic data {source}{f' (generator {k})' if k else ''}: {n}")
    return synthetic


def _generation_scores(data: EvalData, synthetic: dict, ecfg: EvalConfig, device: str) -> dict[str, dict]:
    """IS / IC-LPIPS / KID / diversity of each source against the real training anomalies (and
    per mode, guided and free, for the generated sources)."""
    from apo_fast.eval.sample_quality import generation_metrics

    options = {
        "lpips_net": ecfg.lpips_net, "lpips_backbone_weights": ecfg.lpips_weights,
        "inception_weights": ecfg.inception_weights, "kid_subsets": ecfg.kid_subsets,
        "kid_subset_size": ecfg.kid_subset_size, "seed": ecfg.sample_seed, "device": device,
    }
    generation: dict[str, dict] = {}
    for source, syn in synthetic.items():
        if syn is None:
            continue
        parts = {source: (syn.images, syn.masks)}
        if source in GENERATED_SOURCES:
            parts.update({f"{source} ({m})": syn.select(m) for m in ("guided", "free")})
        for name, (images, _) in parts.items():
            if images.shape[0] >= 2:
                generation[name] = generation_metrics(images, data.train_anomalies, **options)
    return generation


def _downstream(data: EvalData, synthetic_by_generator: list[dict], ecfg: EvalConfig, device: str, progress: bool,
                say: Callable[[str], None]) -> dict:
    """One detector per (source, generator, seed) on normals + that source's anomalies, tested on
    the held-out set; ``none`` (no generator) per seed only. Every per-seed result carries its
    ``generator_seed`` (0, 1, ...), so the summary's spread covers generators and detectors."""
    from apo_fast.eval.downstream import downstream_comparison

    augment = ecfg.segmenter_augment
    if augment is None:
        from apo_fast.data import category_augment

        augment = category_augment(data.category, data.normal_train) == "dihedral"
    merged: dict | None = None
    for k, synthetic in enumerate(synthetic_by_generator):
        sources = {s: None if syn is None else (syn.images, syn.masks) for s, syn in synthetic.items()
                   if k == 0 or syn is not None}
        if not sources:
            continue
        out = downstream_comparison(
            data.normal_train, sources, data.test_images, data.test_masks, data.test_labels,
            seeds=list(ecfg.seeds), steps=ecfg.segmenter_steps, batch_size=ecfg.segmenter_batch_size,
            lr=ecfg.segmenter_lr, device=device, progress=progress,
            segmenter_kwargs={"base_channels": ecfg.segmenter_channels, "depth": ecfg.segmenter_depth,
                              "augment": augment},
            log=(lambda line, k=k: say(line.replace("[downstream]", f"[downstream gen {k}]"))) if k else say,
        )
        for runs in out["results"].values():
            for r in runs:
                r["generator_seed"] = k
        if merged is None:
            merged = out
            merged["settings"]["generator_seeds"] = len(synthetic_by_generator)
        else:
            for source, runs in out["results"].items():
                merged["results"].setdefault(source, []).extend(runs)
    return merged


def _data_record(data: EvalData, synthetic: dict) -> dict:
    """Counts and every file each source's data came from (for checking the split)."""
    return {
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


def _write_eval_report(out_dir: Path, run_dir: Path, ecfg: EvalConfig, res: _Results, clock: _Phases,
                       device: str) -> dict:
    from apo_fast.eval.report import (
        atomic_write_bytes,
        summarize,
        write_json,
        write_report,
    )

    data, synthetic = res.data, res.synthetic
    summary = summarize(res.downstream["results"])
    verdict = compare_sources(summary, "apo")
    verdict["paired"] = paired_margins(res.downstream["results"], "apo")
    with clock.phase("report_s", quiet=True):
        shown = {"real (train)": (data.train_anomalies, data.train_masks)}
        for source, syn in synthetic.items():
            if syn is not None:
                order = syn.grid_order()
                shown[source] = (syn.images[order], syn.masks[order])
        files = write_report(
            out_dir, res.downstream, generation_by_source=res.generation,
            images_by_source={k: v[0] for k, v in shown.items()}, masks_by_source={k: v[1] for k, v in shown.items()},
            title=f"Synthetic anomalies for {data.category}: downstream comparison",
        )
        files["kinds_sheet"] = save_kind_sheet(out_dir / f"kinds_{data.category}.png", data, synthetic)
    timings = clock.finish()
    machine = {"cpu_count": os.cpu_count(), "torch_threads": ecfg.num_threads or torch.get_num_threads(),
               "loadavg_before": clock.load_before, "loadavg_after": loadavg(), "device": device}
    data_record = _data_record(data, synthetic)
    files["details"] = write_json(out_dir / "eval_details.json", {
        "runs": res.runs, "eval_config": ecfg, "data": data_record, "verdict": verdict,
        "timings_s": timings, "machine": machine, "judge": res.judge,
    })
    protocol = _protocol_lines(ecfg, data, res.runs, run_dir, timings, machine, clock.load_before)
    markdown = "\n".join([files["markdown"].read_text(), *protocol, "## Verdict", "", verdict["sentence"], "",
                          *margin_lines(verdict), "", *paired_lines(verdict["paired"], "apo"), "",
                          *judge_lines(res.judge),
                          f"Real anomalies of each kind beside every source's, guided and free: "
                          f"`{Path(files['kinds_sheet']).name}`.", ""])
    atomic_write_bytes(files["markdown"], markdown.encode())
    clock.say(f"[eval] report written to {out_dir}")
    return {
        "summary": summary, "downstream": res.downstream, "generation": res.generation, "verdict": verdict,
        "data": data_record, "runs": res.runs, "timings_s": timings, "machine": machine, "markdown": markdown,
        "files": {k: str(v) for k, v in files.items()},
    }


def _protocol_lines(ecfg, data, runs, run_dir, timings, machine, load_before) -> list[str]:
    n_guided, n_free = split_counts(ecfg.num_per_defect, ecfg.guided_fraction)
    counts = data.summary()
    return [
        "## Protocol", "",
        (f"- Test: {counts['test_anomalous']} held-out real anomalies and {counts['test_good']} good test images; "
         "never used for training or guidance."),
        (f"- Each synthetic source: {ecfg.num_per_defect} anomalies per defect type ({len(data.defects)} types); "
         f"generated ones {n_guided} mask-guided (training masks on {ecfg.guide_normals} normals) and {n_free} free."),
        (f"- lora: {runs.get('lora', 'not run')} (constant gate, plain diffusion loss, same base and steps); "
         f"apo: {run_dir}."),
        (f"- Generators: {len(runs['generators'])} per generated source (train.seed + k: "
         f"{', '.join(Path(g['apo']).name for g in runs['generators'])}); the spread (±) covers "
         f"{len(runs['generators'])} generator(s) x {len(ecfg.seeds)} detector seed(s)"
         + ("." if len(runs["generators"]) > 1 else ": one generator, so it covers the detectors only.")),
        (f"- Wall time {timings['total_s']:.0f}s (CPU {timings['cpu_s']:.0f}s, {machine['torch_threads']} "
         f"thread(s), load average {load_before} -> {machine['loadavg_after']})."),
        "",
    ]
