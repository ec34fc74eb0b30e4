"""Step time of the gradient-coherence probe (megascale.train.probe): off, installed but idle, armed.

    python bench/probe_cost.py --json runs/bench/probe_cost.json
    python bench/probe_cost.py --smoke        # seconds on CPU: the code paths, not the speed

One step is forward + backward over the micro-batches, plus ``finish()`` (the
tied-gradient reduction to ρ and alignments) when armed; no optimizer. Variants,
timed in turn within every round on one model so drift hits them alike:

* ``off``: no probe;
* ``idle``: the probe's hooks installed, not armed (every non-probe step of a run
  with probing on: should cost nothing);
* ``armed``: a probe step: per-unit capture in backward, then ``finish()``.

Cases cross the sharing plans with activation checkpointing off and on. A single
process, no process groups: the collectives of multi-rank layouts are not timed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from megascale.config import ModelConfig
from megascale.model import Transformer
from megascale.train.probe import CoherenceProbe

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("off", "idle", "armed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 2 timed steps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--sharing", default="all,cycle:2", help="sharing plans, comma-separated")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.d_model, args.layers, args.heads, args.kv_heads, args.vocab = 64, 4, 4, 2, 256
        args.seq, args.batch, args.steps, args.warmup = 32, 2, 2, 1
    return args


def model_config(args, sharing: str) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, max_seq_len=args.seq, sharing=sharing)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(model: Transformer, batches: list[torch.Tensor], variant: str, device: torch.device) -> float:
    """Milliseconds of one step of ``variant``; the probe is built and removed outside the timed region."""
    probe = None if variant == "off" else CoherenceProbe(model, model.plan, None)
    model.zero_grad(set_to_none=True)
    sync(device)
    start = time.perf_counter()
    if variant == "armed":
        probe.arm()
    for tokens in batches:
        model(tokens, tokens).backward()
    if variant == "armed":
        probe.finish()
    sync(device)
    elapsed = (time.perf_counter() - start) * 1e3
    if probe is not None:
        probe.remove()
    return elapsed


def bench_case(args, sharing: str, checkpointing: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args, sharing)
    model = Transformer(cfg).to(device=device, dtype=DTYPES[args.dtype])
    model.activation_checkpointing = checkpointing
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(args.micro_batches)]
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.warmup + args.steps):
        for variant in VARIANTS:
            ms = step_ms(model, batches, variant, device)
            if r >= args.warmup:
                times[variant].append(ms)
    median = {v: statistics.median(t) for v, t in times.items()}
    return dict(
        sharing=sharing, checkpointing=checkpointing, groups=model.plan.n_groups,
        params_unique=model.param_counts().unique,
        **{f"{v}_ms": median[v] for v in VARIANTS},
        **{f"{v}_ms_all": times[v] for v in VARIANTS},
        idle_overhead=median["idle"] / median["off"] - 1, armed_overhead=median["armed"] / median["off"] - 1,
    )


def environment(device: torch.device, args) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(
        device=name, date=dt.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
        torch=torch.__version__, cuda=torch.version.cuda, dtype=args.dtype, threads=torch.get_num_threads(),
        smoke=args.smoke, model=dict(d_model=args.d_model, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                                     vocab=args.vocab),
        batch=dict(seq=args.seq, micro_batch=args.batch, micro_batches=args.micro_batches), steps=args.steps,
    )


def print_table(rows: list[dict]) -> None:
    print(f"{'sharing':>9} {'ckpt':>5} {'off ms':>9} {'idle ms':>9} {'armed ms':>9} {'idle':>7} {'armed':>7}")
    for r in rows:
        print(f"{r['sharing']:>9} {str(r['checkpointing']):>5} {r['off_ms']:>9.2f} {r['idle_ms']:>9.2f} {r['armed_ms']:>9.2f} "
              f"{r['idle_overhead']:>+7.1%} {r['armed_overhead']:>+7.1%}")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [bench_case(args, sharing, ckpt, device) for sharing in args.sharing.split(",") for ckpt in (False, True)]
    env = environment(device, args)
    print(f"# {env['device']}, {env['dtype']}, torch {env['torch']}, {env['date']}; d={args.d_model} L={args.layers} "
          f"T={args.seq} micro-batch {args.batch} x {args.micro_batches}; median of {args.steps}")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
