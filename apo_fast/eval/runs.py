"""The runs an evaluation compares: the APO run (trained from the config when missing) and its
plain-LoRA baseline (same base, data, rank, optimiser and steps; constant gate, diffusion loss).
"""

import copy
import dataclasses
import logging
from pathlib import Path

from apo_fast.config import APOConfig, EvalConfig, load_config, validate_config

log = logging.getLogger(__name__)

MODEL_TRAINING_KEYS = ("model", "data", "adapter", "loss", "optim", "pretrain")
TRAIN_KEYS_IGNORED = ("progress", "device", "log_every", "checkpoint_every", "keep_checkpoints")
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
    first into ``<run>/base``, as in the demo (:func:`apo_fast.training.base.prepare_base`: the
    shipped base when it matches the config, else trained on the normal images).
    """
    from apo_fast.training.base import prepare_base

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


def generator_run_dir(run_dir: str | Path, k: int) -> Path:
    """The folder of generator ``k`` of an APO run: the run itself for 0, ``<run>-gen<k>`` beside it."""
    run_dir = Path(run_dir)
    return run_dir if k == 0 else run_dir.parent / f"{run_dir.name}-gen{k}"


def ensure_generator_run(run_dir: str | Path, k: int, *, train_missing: bool = True, progress: bool = False) -> Path:
    """Generator ``k`` of the (trained) APO run ``run_dir``: its config, base and data with
    ``train.seed + k``, trained into :func:`generator_run_dir` if missing.

    Raises:
        ValueError: the folder holds a run trained with other settings.
        FileNotFoundError: it is missing and ``train_missing`` is False.
    """
    run_dir = Path(run_dir)
    out = generator_run_dir(run_dir, k)
    if k == 0:
        return out
    cfg = load_config(run_dir / "config.yaml")  # its model.pretrained names the base the run trained from
    cfg.output_dir = str(out)
    cfg.train.seed += k
    return _ensure_trained(cfg, out, f"generator {k} of {run_dir} (train.seed {cfg.train.seed})",
                           "set eval.generator_seeds: 1", train_missing, progress)


def _ensure_trained(expected: APOConfig, out: Path, what: str, instead: str, train_missing: bool,
                    progress: bool) -> Path:
    """``out`` trained from ``expected``: reused when it holds a run with the same training
    settings, refused (ValueError, naming the differing keys) when it holds another, trained
    when missing unless not ``train_missing`` (FileNotFoundError; ``instead`` says the way out)."""
    if (out / "config.yaml").is_file():
        found = _training_settings(load_config(out / "config.yaml"))
        want = _training_settings(expected)
        if found != want:
            differ = sorted(f"{s}.{k}" for s in want for k in set(want[s]) | set(found.get(s, {}))
                            if want[s].get(k) != found.get(s, {}).get(k))
            raise ValueError(f"{out} holds a run trained with other settings than {what} ({', '.join(differ)}); "
                             f"delete it or {instead}")
    if has_trained_run(out):
        return out
    if not train_missing:
        raise FileNotFoundError(f"{what} ({out}) is not trained; allow training or {instead}")
    expected.train.progress = progress
    _train(expected)
    return out


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
    return _ensure_trained(expected, lora_dir, f"the LoRA baseline of {apo_run}",
                           "set eval.lora_run to another folder", train_missing, progress)


def demo_eval_config(ecfg: EvalConfig, *, seeds: int = 2, segmenter_steps: int = 150, num_per_defect: int = 8,
                     generator_seeds: int = 1) -> EvalConfig:
    """The short comparison ``apo-fast demo`` ends with: ``ecfg`` capped to ``seeds`` seeds,
    ``segmenter_steps`` detector steps, ``num_per_defect`` anomalies per defect type and
    ``generator_seeds`` generators per source.

    Two detector seeds keep a spread in the table (one seed cannot tell a margin from noise);
    one generator keeps the demo in its time budget (the report says the spread then covers
    the detectors only); the plain-LoRA baseline still trains for the APO run's full step count.
    """
    return dataclasses.replace(
        ecfg, seeds=list(ecfg.seeds[:seeds]), segmenter_steps=min(ecfg.segmenter_steps, segmenter_steps),
        num_per_defect=min(ecfg.num_per_defect, num_per_defect),
        generator_seeds=min(ecfg.generator_seeds, generator_seeds),
    )


