"""Operator calls in one DeepSpeed optimizer step, per trainer variant: the per-step launch count a GPU pays.

    python bench/step_ops.py                                   # 125m shape, bf16, ZeRO-1, on CPU
    python bench/step_ops.py --variants ";train.check_grad_overflow=true"

On a GPU every ATen call in ``engine.step()`` is at least one kernel launch issued
by the host, and the optimizer step is a long run of small ones (per-tensor
norms, overflow scans, casts); their count is fixed by the code, not the device,
so a CPU run counts them. It builds megascale's engine the way
bench/train_throughput.py does (seq 32, micro-batch 1: the step's work depends on
the parameters, not the batch), takes two steps, then profiles the third's
``engine.step()``. A count, not a timing: what it tells is where launches go.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_throughput as tt  # noqa: E402


def count_step(name: str, variant: str, ctx) -> tuple[str, int, list[tuple[int, str]]]:
    from megascale.train.loop import make_groups  # noqa: PLC0415

    args = types.SimpleNamespace(sharing="none", micro=1, ckpt_on=False, cpu=False, seq=32)
    cfg = tt.bench_config(name, args, variant)
    _, step = tt.megascale_trainer(cfg, ctx.device, ctx, make_groups(cfg, ctx))
    engine = step.engine
    batch = tt.random_batches(cfg, 1, ctx.device)[0]
    for _ in range(2):
        step(batch)
    engine.backward(engine(*batch))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    aten = [(e.count, e.key) for e in prof.key_averages() if e.key.startswith("aten::")]
    return type(engine.optimizer).__name__, sum(n for n, _ in aten), sorted(aten, reverse=True)[:6]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="125m", help="configs/<name>.yaml")
    p.add_argument("--variants", default=";train.check_grad_overflow=true",
                   help="semicolon-separated override sets (comma-separated within one); the first empty = defaults")
    args = p.parse_args(argv)
    from megascale.train.dist import init_distributed  # noqa: PLC0415

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ctx = init_distributed()
    print(f"ATen calls in one engine.step(), {args.config}, bf16, ZeRO-1 unless overridden, {ctx.device}")
    for variant in args.variants.split(";"):
        optimizer, calls, top = count_step(args.config, variant, ctx)
        print(f"{variant or 'defaults':<40} {optimizer:<28} {calls:>7,}  " + ", ".join(f"{k} {n}" for n, k in top),
              flush=True)
    return 0


if __name__ == "__main__":
    main()
    from megascale.train.dist import exit_process  # noqa: E402

    exit_process(0)
