"""IsoFLOP sweeps: several model sizes at each of several budgets, as runnable configs.

At each budget C the sizes are spread geometrically around a prior's N_opt(C)
(``spread`` = ratio of the largest to the smallest target); each size gets a
shape and exactly the tokens that spend C on it (the trainer's exact FLOPs),
so the runs of one budget lie on one IsoFLOP curve. ``launch/plan.py fit``
then reads their run directories back.

The ``cpu-demo`` preset is sized for a 2-core CPU: 3 budgets (1.5e12–6e12
FLOPs) × 4-5 sizes of 74k–1M-parameter models on the embedded stdlib corpus
(512-token vocabulary, 64-token sequences), under 30 minutes end to end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megascale.errors import MegascaleError
from megascale.planner.mappings import PARAMS, Allocation, Mapping
from megascale.planner.plan import Budget, Plan, config_header, data_section, plan_config, plan_for_shape
from megascale.planner.shapes import count, solve_shape


@dataclass(frozen=True)
class SweepSettings:
    budgets: tuple[float, ...]
    sizes: int = 5
    spread: float = 8.0
    center: float = 1.0  # sizes are centred on center × the prior's N_opt(C)
    vocab_size: int = 32000
    seq_len: int = 2048
    sharing: str = "none"
    tie_embeddings: bool = False
    precision: str = "bf16"
    data_path: str | None = None
    data_blend: str | None = None  # prepared corpora mixed by weight (data.blend), instead of data_path
    micro_batch: int | None = None
    global_batch: int | None = None
    eval_batches: int = 32
    min_steps: int = 100  # fewer optimizer steps measure the warm-up transient, not the model size
    stdlib_max_bytes: int = 16_000_000


PRESETS: dict[str, SweepSettings] = {
    # Tied embeddings: a 512-token vocabulary's embedding + LM head would otherwise be 65k of the smallest
    # (d_model 64, 1 layer) model's 107k parameters, and no smaller shape exists. Centred a little above
    # Chinchilla's N_opt for the same reason; runs under 150 steps are dropped (they measure the warm-up,
    # not the model). One micro-batch per step (64 × 64 tokens): on CPU the per-step overhead, not the
    # arithmetic, dominates models this small.
    "cpu-demo": SweepSettings(
        budgets=(1.5e12, 3e12, 6e12), sizes=5, spread=8.0, center=1.3, vocab_size=512, seq_len=64, precision="fp32",
        tie_embeddings=True, micro_batch=64, global_batch=64, eval_batches=16, min_steps=150, stdlib_max_bytes=8_000_000,
    ),
}


@dataclass(frozen=True)
class SweepRun:
    name: str
    budget: float
    target_params: float
    plan: Plan
    config: dict[str, Any]


def _budget_tag(flops: float) -> str:
    mantissa, exponent = f"{flops:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def plan_sweep(settings: SweepSettings, prior: Mapping, runs_dir: str) -> list[SweepRun]:
    """The sweep's runs: for each budget, ``sizes`` distinct shapes around ``prior``'s N_opt."""
    s = settings
    if len(s.budgets) < 2:
        raise MegascaleError("a sweep needs 2+ budgets for a scaling fit (e.g. --budgets 1e18,3e18,1e19)")
    if any(not (c > 0 and math.isfinite(c)) for c in s.budgets):
        raise MegascaleError(f"sweep budgets {list(s.budgets)} must all be positive FLOPs")
    if s.sizes < 3 or s.spread <= 1:
        raise MegascaleError("a sweep needs --sizes 3 or more and --spread > 1 to find an IsoFLOP minimum")
    for flag, value in (("--micro-batch", s.micro_batch), ("--global-batch", s.global_batch), ("--center", s.center)):
        if value is not None and not value > 0:
            raise MegascaleError(f"{flag} {value:g} must be positive (or absent: the planner's choice)")
    data = data_section(s.data_path, s.vocab_size, s.seq_len, s.data_blend)
    if data["corpus"] == "stdlib":
        data["stdlib_max_bytes"] = s.stdlib_max_bytes
    runs = []
    for flops in sorted(s.budgets):
        runs += _budget_runs(flops, s, prior, data, runs_dir)
    return runs


def _budget_runs(flops: float, s: SweepSettings, prior: Mapping, data: dict, runs_dir: str) -> list[SweepRun]:
    center = s.center * prior.allocate(flops).params
    targets = center * s.spread ** np.linspace(-0.5, 0.5, s.sizes)
    seen, runs = set(), []
    for target in targets:
        shape = solve_shape(float(target), kind=PARAMS, vocab_size=s.vocab_size, seq_len=s.seq_len, sharing=s.sharing,
                            tie_embeddings=s.tie_embeddings, strict=False)
        if shape in seen:
            continue
        seen.add(shape)
        n = count(shape).applied
        name = f"C{_budget_tag(flops)}-N{_size_tag(n)}"
        alloc = Allocation(flops, float(target), flops / (6 * float(target)), None, float(target), PARAMS)
        plan = plan_for_shape(Budget(flops), prior, alloc, shape, flops_model="exact", precision=s.precision, data=dict(data),
                              out_dir=f"{runs_dir}/{name}", global_batch=s.global_batch, micro_batch=s.micro_batch)
        if plan.recipe.steps < s.min_steps:
            continue  # too big for this budget: a handful of steps says nothing
        runs.append(SweepRun(name, flops, float(target), plan, _sweep_config(plan, s)))
    return runs


def _size_tag(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _sweep_config(plan: Plan, s: SweepSettings) -> dict[str, Any]:
    """The plan's config, with evaluation only at the start and the end and one final checkpoint."""
    cfg = plan_config(plan)
    steps = plan.recipe.steps
    cfg["train"].update(eval_every=steps, eval_batches=s.eval_batches, log_every=max(1, min(10, steps // 50)), save_every=0,
                        keep_checkpoints=1, sample_tokens=0, progress=False)
    cfg["metrics"].update(tensorboard=False, plot=False)
    return cfg


def write_sweep(runs: list[SweepRun], out_dir: Path, settings: SweepSettings, prior: Mapping) -> Path:
    """configs/<name>.yaml for every run, sweep.json (the manifest) and run_sweep.sh; returns the manifest path."""
    from megascale.config import load_config  # noqa: PLC0415

    out_dir = Path(out_dir)
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    entries, commands = [], []
    for run in runs:
        path = out_dir / "configs" / f"{run.name}.yaml"
        header = config_header(run.plan).replace("THIS_FILE", str(path))
        path.write_text(f"# IsoFLOP sweep run {run.name}: budget {run.budget:.3g} FLOPs\n" + header
                        + yaml.safe_dump(run.config, sort_keys=False))
        load_config(path)  # every emitted config must load and validate
        c, r = run.plan.counts, run.plan.recipe
        entries.append({"name": run.name, "budget": run.budget, "config": str(path), "out_dir": run.config["train"]["out_dir"],
                        "params_applied": c.applied, "params_unique": c.unique, "flops_per_token": c.flops_per_token,
                        "tokens": r.tokens, "steps": r.steps, "flops": r.flops, "shape": run.plan.shape.to_dict()})
        commands.append(f"python launch/pretrain.py --config {path}")
    manifest = out_dir / "sweep.json"
    manifest.write_text(json.dumps({"prior": prior.name, "settings": {k: v for k, v in settings.__dict__.items()},
                                    "runs": entries}, indent=2) + "\n")
    script = out_dir / "run_sweep.sh"
    runs_dirs = sorted({str(Path(e["out_dir"]).parent) for e in entries})
    script.write_text("#!/bin/sh\n# Train every run of the sweep, then fit. Each line is independent: run them on\n"
                      "# separate GPUs or nodes as you like (deepspeed/torchrun/srun work the same).\nset -e\n"
                      + "\n".join(commands) + f"\npython launch/plan.py fit {' '.join(runs_dirs)} --out {out_dir / 'fit'}\n")
    script.chmod(0o755)
    return manifest
