"""When in the denoising does a mask-input policy draw the defect? (docs/fidelity.md, session 9)

Two views of one trained run (``adapter.mask_input``):

- a grid: the run's free and mask-guided samples with the mask input switched off for every
  step below ``t`` (``--cut``, repeatable; 0 = the run as it samples), same seeds, so a
  defect that vanishes when the mask is off below ``t`` was drawn below ``t``;
- a table: the mean colour inside the mask of the x0 the policy and the reference predict
  from a normal image noised to ``t`` (what the policy would draw there, and how far it is
  from the product's colour);
- a table of the run's own mask-guided sampling, step by step: the mean colour inside the
  mask of the sample and of the policy's x0 (when the defect's colour arrives).

    python tools/defect_timing.py RUN --out timing.png --cut 0 --cut 200 --cut 400
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path


@contextlib.contextmanager
def intercepted(run, wrap):
    """Inside the block the run samples through ``wrap(its own UNet call)``."""
    from apo_fast.models.compile import plain_unet_call

    own = run.unet_call
    run.unet_call = wrap(own or plain_unet_call(run.unet))
    try:
        yield
    finally:
        run.unet_call = own


def step_t(timestep) -> int:
    """The timestep of a UNet call (one per batch)."""
    import torch

    return int(torch.as_tensor(timestep).reshape(-1)[0])


def timing_rows(run, defects, cuts, num: int, seed: int) -> tuple[dict, dict]:
    """``{"<defect> <free|guided> off<<cut>": images}`` and their masks: the run's samples with
    the mask input left out of every UNet call below timestep ``cut`` (0: the run as it samples)."""
    from apo_fast.adapters.mask_input import MASK_KWARG
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides

    rows, outlines = {}, {}
    for cut in cuts:
        def mask_off_below(inner, cut=cut):
            def call(sample, timestep, kwargs):
                if step_t(timestep) < cut:
                    kwargs = {k: v for k, v in kwargs.items() if k != MASK_KWARG}
                return inner(sample, timestep, kwargs)
            return call

        with intercepted(run, mask_off_below):
            for d in defects:
                ki, km = heldout_guides(run.cfg, d, num)
                for mode, guide in (("free", {}), ("guided", {"known_images": ki, "known_masks": km})):
                    im, m, _ = generate_for_defect(run, d, num, seed=seed, **guide)
                    rows[f"{d} {mode} off<{cut}"] = im
                    outlines[f"{d} {mode} off<{cut}"] = m
    return rows, outlines


def mean_rgb(images, masks) -> list[float]:
    """Mean colour inside the masks over a batch."""
    masks = masks.to(images.dtype)
    return ((images * masks).sum((0, 2, 3)) / masks.sum()).tolist()


def fmt(rgb: list[float]) -> str:
    return "(" + ", ".join(f"{v:+.2f}" for v in rgb) + ")"


def predicted_x0(out, z, abar, prediction_type: str):
    """The clean image a model output ``out`` at noise level ``abar`` implies for the sample ``z``."""
    if prediction_type == "v_prediction":
        return abar.sqrt() * z - (1 - abar).sqrt() * out
    return (z - (1 - abar).sqrt() * out) / abar.sqrt()


def trajectory(run, defect: str, num: int, seed: int) -> list[tuple[int, list[float], list[float]]]:
    """Mask-guided sampling of ``defect`` as the run samples, step by step: ``(t, mean colour
    inside the mask of the sample z_t, of the x0 the policy predicts from it)`` for each policy
    call (pixel-space runs)."""
    from apo_fast.adapters.mask_input import MASK_KWARG
    from apo_fast.models import build_scheduler
    from apo_fast.sampling.runs import generate_for_defect, heldout_guides

    alphas = build_scheduler(run.cfg.model, "ddpm").alphas_cumprod
    ki, km = heldout_guides(run.cfg, defect, num)
    steps = []

    def recording(inner):
        def call(sample, timestep, kwargs):
            out = inner(sample, timestep, kwargs)
            if MASK_KWARG in kwargs:  # the policy's call (the reference's never carries the mask)
                t = step_t(timestep)
                x0 = predicted_x0(out, sample, alphas[t], run.cfg.model.prediction_type)
                steps.append((t, mean_rgb(sample.float(), km), mean_rgb(x0.float(), km)))
            return out
        return call

    with intercepted(run, recording):
        generate_for_defect(run, defect, num, seed=seed, known_images=ki, known_masks=km)
    return steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a trained run folder with adapter.mask_input")
    p.add_argument("--out", required=True, help="the grid (PNG)")
    p.add_argument("--cut", type=int, action="append", help="mask input off below this timestep (repeatable)")
    p.add_argument("--defect", action="append", help="defect kinds (default: every kind of the run)")
    p.add_argument("--num", type=int, default=6)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from apo_fast.adapters import adapters_disabled
    from apo_fast.adapters.mask_input import MASK_KWARG
    from apo_fast.data import AnomalyDataset, resolve_data_root, scan_mvtec
    from apo_fast.models import build_scheduler
    from apo_fast.sampling.images import save_grid
    from apo_fast.sampling.runs import heldout_guides, load_run

    run = load_run(args.run, device="cpu")
    if run.mask_bank is None:
        raise SystemExit(f"{args.run} was not trained with adapter.mask_input")
    category = run.cfg.data.category
    defects = args.defect or [n.split("/", 1)[1] for n in run.condition_names if not n.endswith("/good")]
    rows, outlines = timing_rows(run, defects, args.cut or [0, 200, 400], args.num, args.seed)
    save_grid(rows, Path(args.out), scale=4, outlines=outlines)
    print(f"grid: {args.out}")

    if run.vae is not None:
        print("the x0 colour table reads pixel-space runs; this run samples in a VAE's latent space")
        return 0

    alphas = build_scheduler(run.cfg.model, "ddpm").alphas_cumprod
    g = torch.Generator().manual_seed(args.seed)
    cfg = run.cfg
    index = scan_mvtec(resolve_data_root(cfg.data.root), category, cfg.data.defect_types, cfg.data.shots)
    held = AnomalyDataset(index, cfg.data.image_size, split="heldout")
    held = [held[i] for i in range(len(held))]
    print("| defect | t | real held-out defects | product under the mask | policy x0 | reference x0 |")
    print("|---|---:|---|---|---|---|")
    for d in defects:
        real = [r for r in held if r["defect"] == d]
        real_rgb = fmt(mean_rgb(torch.stack([r["image"] for r in real]), torch.stack([r["mask"] for r in real])))
        ki, km = heldout_guides(run.cfg, d, args.num)
        ids = torch.full((args.num,), run.condition_names.index(f"{category}/{d}"))
        kw = run.conditions.unet_kwargs(ids, torch.float32, run.cfg.data.image_size)
        for t in (50, 150, 300, 500, 700, 900):
            a = alphas[t]
            z = a.sqrt() * ki + (1 - a).sqrt() * torch.randn(ki.shape, generator=g)
            tb = torch.full((args.num,), t)
            with torch.no_grad():
                out = {"policy": run.unet(z, tb, **kw, **{MASK_KWARG: km}).sample}
                with adapters_disabled(run.unet):
                    out["reference"] = run.unet(z, tb, **kw).sample
            x0 = {k: fmt(mean_rgb(predicted_x0(v, z, a, run.cfg.model.prediction_type), km)) for k, v in out.items()}
            print(f"| {d} | {t} | {real_rgb} | {fmt(mean_rgb(ki, km))} | {x0['policy']} | {x0['reference']} |")
    print()
    print("Guided sampling as the run samples: mean colour inside the mask, step by step")
    print("| defect | t | sample z_t | policy x0 |")
    print("|---|---:|---|---|")
    for d in defects:
        for t, z_rgb, x0_rgb in trajectory(run, d, args.num, args.seed):
            print(f"| {d} | {t} | {fmt(z_rgb)} | {fmt(x0_rgb)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
