"""Per-rank memory of weights, gradients and optimizer state: formula vs measurement, per layout.

    python bench/parallel_memory.py [--json out.json] [--config configs/tiny.yaml] [key=value ...]

Runs a 1-step pretraining of the config under each (tp, pp, dp) layout with
torchrun (CPU: gloo; GPUs when present), reads the per-rank ``state_memory``
record the trainer writes after its first step, and prints one table row per
rank. The formula is ``megascale.train.memory.formula_state_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 2, 2), (2, 2, 1)]


def run_layout(tp: int, pp: int, dp: int, config: str, overrides: list[str], out: Path) -> list[dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), f"--nproc-per-node={tp * pp * dp}", "--standalone", str(ROOT / "launch" / "pretrain.py"),
           "--config", config, f"parallel.tp={tp}", f"parallel.pp={pp}", "train.max_steps=1", "train.eval_every=0",
           "train.sample_tokens=0", "train.progress=false", "metrics.plot=false", "metrics.tensorboard=false",
           f"train.out_dir={out}", *overrides]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "state_memory")["ranks"]


def mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:8.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--json", type=Path)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rows = []
    print(f"{'layout':<14}{'rank':>5}{'stage':>6}{'tp':>4}{'params':>12}  MiB weights f/m       grads f/m        optimizer f/m")
    for tp, pp, dp in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            for r in run_layout(tp, pp, dp, args.config, args.overrides, Path(tmp)):
                f, m = r["formula"], r["measured"]
                print(f"tp{tp} pp{pp} dp{dp}  {r['rank']:>5}{r['stage']:>6}{r['tp_rank']:>4}{r['params']:>12,}  "
                      f"{mib(f['weights'])}/{mib(m['weights'])}  {mib(f['grads'])}/{mib(m['grads'])}  "
                      f"{mib(f['optimizer'])}/{mib(m['optimizer'])}")
                rows.append({"layout": {"tp": tp, "pp": pp, "dp": dp}, **r})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
