"""Rebuild the pretrained demo bases shipped in apo_fast/assets/demo_base/<category>/.

    python tools/build_demo_base.py                      # both bundled categories, the demo's settings
    python tools/build_demo_base.py --category brick --out /tmp/bases --set pretrain.steps=50

Each base is ``apo-fast pretrain`` on the bundled normal images with the demo's
config (apo_fast/demo.py DEMO_CONFIG), one torch thread. Beside the UNet and condition file it writes ``pretrain_log.jsonl``,
``pretrain.png``, ``samples.png`` and ``build.json`` (the settings and the
command), which ``apo-fast demo`` checks before using a shipped base.
Measured: 2137 s (brick) and 2153 s (gravel), built side by side with
``--category`` on a loaded 2-core CPU (3000 steps each).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("brick", "gravel")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--category", action="append", choices=CATEGORIES, help="default: every bundled category")
    ap.add_argument("--out", default=str(REPO / "apo_fast" / "assets" / "demo_base"), help="folder of the bases")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from apo_fast.demo import demo_config
    from apo_fast.training.base import base_build_record

    for category in args.category or CATEGORIES:
        out = Path(args.out) / category
        overrides = [f"data.category={category}", "train.threads=1", "train.device=cpu", *args.overrides]
        cfg = demo_config(None, overrides)
        work = out.with_name(f".{category}.building")
        cmd = [sys.executable, "-m", "apo_fast.cli", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
               "--output_dir", str(work), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
        print(" ".join(cmd), flush=True)
        start = time.time()
        # Run where `kernels/` is not importable as a top-level `kernels` (not the repo root):
        # the installed package (pip install -e .) provides apo_fast.
        subprocess.run(cmd, check=True, cwd=Path(args.out).resolve().parent)
        record = base_build_record(cfg)
        record.update(command=" ".join(["python", "tools/build_demo_base.py", f"--category {category}",
                                        *[f"--set {o}" for o in args.overrides]]),
                      seconds=round(time.time() - start, 1), torch_threads=1)
        (work / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        for name in ("pretrain_state.pt",):
            (work / name).unlink(missing_ok=True)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
        print(f"{category}: {out} ({record['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
