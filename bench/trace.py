"""Does training on the trace help? Same start, same steps, trace_weight 1 vs 0 (Nye et al. 2021, "Show Your Work").

    python bench/trace.py --init runs/tiny/checkpoints --json runs/bench/trace.json
    python bench/trace.py --init runs/tiny/checkpoints --steps 300 --nproc 2 --variants trace,direct,masked

Every variant fine-tunes configs/trace_tiny.yaml from the same pretraining
checkpoint for the same number of optimizer steps on the same generated
problems (same seed, same order) and is scored on the same held-out splits:
``in`` (unseen problems with the training digit counts) and ``out`` (longer
numbers than any seen in training). Variants:

* ``trace``: trace_weight 1, response_weight 1 — the model learns to write the
  steps and the answer;
* ``direct``: trace_weight 0 **and the trace removed from the input**
  (finetune.trace_in_input=false): the model answers right after the query — the
  scratchpad-free baseline;
* ``masked``: trace_weight 0 with the trace still in the input (teacher-forced
  but never a target). At evaluation the model must write a trace it was never
  trained to write, so this variant mostly measures that mismatch.

Note: ``direct`` sequences are shorter, so at equal steps it sees as many examples
but fewer tokens per example (packing fits more examples per row: it actually sees
*more* examples per step). The table reports examples seen per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "trace": ["finetune.trace_weight=1", "finetune.trace_in_input=true"],
    "direct": ["finetune.trace_weight=0", "finetune.trace_in_input=false"],
    "masked": ["finetune.trace_weight=0", "finetune.trace_in_input=true"],
}
COLUMNS = ("acc_in", "acc_out", "step_acc_in", "step_acc_out", "trace_tok_acc_in")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="runs/tiny/checkpoints", help="pretraining checkpoint (make pretrain writes runs/tiny/checkpoints)")
    p.add_argument("--config", default="configs/trace_tiny.yaml")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per variant")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun; CPU: gloo)")
    p.add_argument("--variants", default="trace,direct", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_trace", help="run directories go here")
    p.add_argument("--json", type=Path, help="write the table here")
    p.add_argument("extra", nargs="*", help="more overrides for every variant, e.g. finetune.eval_examples=96")
    return p.parse_args(argv)


def run_variant(name: str, args: argparse.Namespace) -> dict:
    out_dir = args.out / name
    if (out_dir / "metrics.jsonl").exists():
        (out_dir / "metrics.jsonl").unlink()  # a fresh run: the loop appends
    launch = [sys.executable, str(ROOT / "launch" / "finetune_trace.py")] if args.nproc == 1 else [
        str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={args.nproc}", str(ROOT / "launch" / "finetune_trace.py")]
    cmd = launch + ["--config", args.config, "--init", args.init, *VARIANTS[name], f"train.max_steps={args.steps}",
                    f"train.out_dir={out_dir}", "train.save_every=0", "train.progress=false", *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "acc_in" in r]
    start_rec = next(r for r in records if r.get("event") == "start")
    return {"variant": name, "overrides": VARIANTS[name], "steps": args.steps, "wall_s": round(wall, 1),
            "curve": [{k: r.get(k) for k in ("step", *COLUMNS)} for r in evals],
            "final": {k: evals[-1].get(k) for k in COLUMNS}, "start": {k: evals[0].get(k) for k in COLUMNS},
            "tokens_per_step": start_rec.get("tokens_per_step")}


def table(results: list[dict]) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | wall s |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    rows = []
    for r in results:
        cells = ["–" if r["final"][k] is None else f"{r['final'][k]:.3f}" for k in COLUMNS]
        rows.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    return "\n".join([head, rule, *rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [run_variant(name.strip(), args) for name in args.variants.split(",") if name.strip()]
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"steps": args.steps, "nproc": args.nproc, "init": args.init, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
