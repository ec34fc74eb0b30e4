"""Share, then unshare: loss against training FLOPs and wall time, tied vs untied vs tied-then-untied.

    python bench/sharing.py                   # the full experiment: 6 runs, ~11 minutes on a 2-core CPU
    python bench/sharing.py --smoke           # ~40 s (2 min when DeepSpeed rebuilds its ops): every code path
    python bench/sharing.py --reuse           # re-analyse finished runs in --out without training again
    python bench/sharing.py --moments copy,scale,probe --seeds 0,1,2 --variants step,tokens,plateau,coherence
                                              # the untie-moments comparison of BENCHMARKS.md (36 runs)

The claim under test (Yang et al. 2021, "Speeding up Deep Learning Training by
Sharing Weights and Then Unsharing"): BERT trained with all layers sharing one
block, then unshared, reaches the untied baseline's quality in about half the
training time. Here, on the embedded stdlib corpus, one model shape and one token
budget for every run (``launch/pretrain.py --config configs/tiny.yaml``, one CPU
process each, run one after the other):

* ``untied``: model.sharing=none — the baseline whose final validation loss is the target;
* ``tied``: model.sharing=all throughout;
* ``step``, ``tokens``, ``plateau``, ``coherence``: model.sharing=all, untied by
  untie.when=<that condition> (its settings, and why, in ``parse_args``).

Every run applies the same L blocks per token, so FLOPs per token are equal and
training FLOPs = tokens × flops_per_token (the run's start record), plus the
coherence probe's extra weight-gradient GEMM on probe steps (``probe_flops``).
Wall time is training time only: metrics.jsonl has no timestamps and its
throughput windows include evaluations, so this script timestamps each record as
it appears and subtracts the evaluations (time from the record before a
``val_loss`` record to that record). Runs are sequential and share the machine
with whatever else runs on it, each on one thread (``--threads``): the JSON keeps
the load average and CPU seconds of every run to judge that by.

Outputs: a table (stdout and --md), one PNG with loss against FLOPs and against
wall time (untie points marked), JSON with the curves, device and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "untied"
POLL_S = 0.05  # how often the child's metrics.jsonl is read (the resolution of the wall-time stamps)


@dataclass(frozen=True)
class Budget:
    """Model shape and token budget shared by every run (overrides of configs/tiny.yaml)."""

    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    seq_len: int = 128
    micro_batch: int = 8
    global_batch: int = 8
    steps: int = 300
    warmup: int = 20
    lr: float = 3e-3
    eval_every: int = 30
    eval_batches: int = 16
    log_every: int = 5

    def overrides(self) -> list[str]:
        return [
            f"model.d_model={self.d_model}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
            f"model.n_kv_heads={self.n_kv_heads}", f"model.max_seq_len={self.seq_len}", f"data.seq_len={self.seq_len}",
            f"train.micro_batch_size={self.micro_batch}", f"train.global_batch_size={self.global_batch}",
            f"train.max_steps={self.steps}", f"optim.warmup_steps={self.warmup}", f"optim.lr={self.lr}",
            f"train.eval_every={self.eval_every}", f"train.eval_batches={self.eval_batches}",
            f"train.log_every={self.log_every}",
        ]


FULL = Budget()
SMOKE = Budget(d_model=64, n_layers=4, seq_len=64, micro_batch=4, global_batch=4, steps=24, warmup=4,
               eval_every=6, eval_batches=2, log_every=2)
# Every run: no sampling, no progress bar, no TensorBoard or per-run plot, no intermediate checkpoints.
COMMON = ["train.progress=false", "train.sample_tokens=0", "train.save_every=0",
          "metrics.plot=false", "metrics.tensorboard=false"]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    note: str  # the untie condition in words, for the table


def variants(b: Budget, args: argparse.Namespace) -> list[Variant]:
    """The six runs; step:N is a fraction of the budget's steps, the other settings come from parse_args."""
    tied = ("model.sharing=all",)
    step = max(1, round(args.step_fraction * b.steps))
    plateau = (f"untie.plateau_window={args.plateau_window}", f"untie.plateau_threshold={args.plateau_threshold}",
               f"untie.plateau_smoothing={args.plateau_smoothing}", f"untie.min_step={args.min_step}")
    coherence = (f"untie.probe_every={args.probe_every}", f"untie.coherence_threshold={args.coherence_threshold}",
                 f"untie.coherence_probes={args.coherence_probes}", f"untie.min_step={args.min_step}")
    unties = [
        Variant("step", (*tied, f"untie.when=step:{step}"), f"step:{step}"),
        Variant("tokens", (*tied, "untie.when=tokens:0.5"), "tokens:0.5"),
        Variant("plateau", (*tied, "untie.when=plateau", *plateau),
                f"plateau (window {args.plateau_window}, < {args.plateau_threshold:.1%}, EMA {args.plateau_smoothing:g})"),
        Variant("coherence", (*tied, "untie.when=coherence", *coherence),
                f"coherence (rho < {args.coherence_threshold:g} x{args.coherence_probes}, probe every {args.probe_every})"),
    ]
    # Each untie under every --moments policy; "copy" (the default) keeps the plain names. "probe" reads the
    # coherence probe's statistics: the conditions that do not probe already get the coherence run's probes.
    probes = (f"untie.probe_every={args.probe_every}", f"untie.coherence_probes={args.coherence_probes}")

    def policy(v: Variant, how: str) -> tuple[str, ...]:
        extra = probes if how == "probe" and not any(o.startswith("untie.probe_every=") for o in v.overrides) else ()
        return (*v.overrides, *extra, f"untie.moments={how}")

    with_moments = [Variant(v.name if how == "copy" else f"{v.name}+{how}", policy(v, how),
                            v.note if how == "copy" else f"{v.note}, moments {how}")
                    for v in unties for how in args.moments]
    return [Variant("untied", ("model.sharing=none",), "untied from the start"), Variant("tied", tied, "tied throughout"),
            *with_moments]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, 24 steps per run: the code paths, not the science")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_sharing", help="run directories go here")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench" / "sharing.json")
    p.add_argument("--md", type=Path, default=ROOT / "runs" / "bench" / "sharing.md")
    p.add_argument("--png", type=Path, default=ROOT / "runs" / "bench" / "sharing.png")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--variants", default="untied,tied,step,tokens,plateau,coherence", help="comma-separated subset; "
                   "an untie under another --moments policy is named <variant>+<policy>, e.g. coherence+scale")
    p.add_argument("--moments", default="copy", help="comma-separated untie.moments policies each untie runs "
                   "under (copy, scale, probe); the variants of a policy other than copy run without being listed in --variants")
    p.add_argument("--steps", type=int, help="override the budget's optimizer steps (eval every steps/10; "
                   "the condition settings below stay as calibrated for 300)")
    p.add_argument("--reuse", action="store_true", help="analyse runs already finished in --out instead of training them")
    # One thread by default: on a 2-core machine shared with other jobs, two OpenMP threads stall on each
    # other whenever one is descheduled (measured: 250-1700 tokens/s with 2 threads under load against
    # 2600-4600 with 1, d128 L8); one thread keeps the runs' wall times comparable.
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint (deleted by default)")
    # Condition settings, calibrated on the full budget (300 steps of 1024 tokens) from one tied run with
    # the probe on and the threshold at 0 (it never fires, and the probe leaves training unchanged):
    # * step: about the first quarter of the run tied, as in the paper's schedules.
    p.add_argument("--step-fraction", type=float, default=0.28, help="step:N at this fraction of the steps")
    # * plateau: the tied validation loss falls 7.65 -> 6.37 by step 30, then only 6.37 -> 6.30 -> 6.16 by
    #   steps 60 and 90: the fast phase is over around step 40-60. The training loss, with batches of 8
    #   sequences, is noisy and drifts with the data order (harder batches around steps 75-115 lift it in
    #   every run), so the detector looks at a 30-step window (one evaluation interval) of an EMA 0.8 per
    #   record every 5 steps (~25-step memory; the default 0.9 lags ~50 steps, a sixth of this run, and
    #   fires only at step ~190 at 2%). Replayed on the tied run, window 30 with thresholds 0.5-2% all fire
    #   at step 85-90 (and never before min_step): 1% puts the untie where the tied curve has flattened,
    #   next to step:84.
    p.add_argument("--plateau-window", type=int, default=30)
    p.add_argument("--plateau-threshold", type=float, default=0.01)
    p.add_argument("--plateau-smoothing", type=float, default=0.8)
    # * coherence: rho = |sum g|^2 / (K sum |g_i|^2), from 1/K = 0.125 (8 units orthogonal) to 1 (aligned).
    #   Probed every 10 steps the tied run's rho is 0.80, 0.66, 0.78 at steps 10-30 (the units pull together
    #   while the common, fast part of the loss is learnt), then 0.41, 0.39, 0.13, 0.43, 0.30, 0.14, 0.65 at
    #   steps 40-100 and 0.15-0.35 from step 140 on. 0.45 is about halfway between the early ~0.75 and the
    #   1/K floor; 3 probes in a row below it keep one noisy probe from firing; it fires at step 60
    #   (0.41, 0.39, 0.13), where the validation curve flattens. 0.3 would wait for step ~230.
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--coherence-threshold", type=float, default=0.45)
    p.add_argument("--coherence-probes", type=int, default=3)
    p.add_argument("--min-step", type=int, default=40, help="plateau and coherence: no untie before this step (warm-up 20)")
    p.add_argument("--seeds", default="", help="comma-separated train.seed values: the whole experiment once per "
                   "seed, each into --out/--json/--md/--png suffixed _seed<s>, then a table of every untie's final "
                   "validation loss per seed and --moments policy (--md suffixed _moments)")
    p.add_argument("extra", nargs="*", help="more overrides for every run, e.g. optim.lr=2e-3")
    args = p.parse_args(argv)
    args.out = args.out.resolve()  # the runs' cwd is the repository root
    args.moments = [m.strip() for m in args.moments.split(",") if m.strip()]
    args.budget = SMOKE if args.smoke else FULL
    if args.steps:
        args.budget = dataclasses.replace(args.budget, steps=args.steps, eval_every=max(1, args.steps // 10))
    if args.smoke:  # conditions that fire within 24 steps, so every untie path runs
        args.plateau_window, args.plateau_threshold, args.min_step = 4, 0.5, 8
        args.probe_every, args.coherence_threshold, args.coherence_probes = 2, 1.01, 2
        args.out = args.out.with_name(args.out.name + "_smoke")
        args.json, args.md, args.png = (f.with_name(f.stem + "_smoke" + f.suffix) for f in (args.json, args.md, args.png))
    return args


# ---------------------------------------------------------------- running


@dataclass
class Timeline:
    """One run's metric records with the wall-clock second each was first seen (since the start record)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    seen_s: list[float] = field(default_factory=list)


def launch(variant: Variant, args: argparse.Namespace, run_dir: Path) -> list[str]:
    overrides = [*args.budget.overrides(), *COMMON, *variant.overrides, f"train.out_dir={run_dir}", *args.extra]
    return [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", args.config, *overrides]


def follow(proc: subprocess.Popen, metrics: Path) -> Timeline:
    """Poll ``metrics`` while ``proc`` runs; stamp each complete line when it first appears."""
    timeline, offset, buffer, t0 = Timeline(), 0, "", None
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            with metrics.open() as f:
                f.seek(offset)
                chunk = f.read()
                offset = f.tell()
            now = time.perf_counter()
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in filter(str.strip, lines):
                t0 = now if t0 is None else t0
                timeline.records.append(json.loads(line))
                timeline.seen_s.append(now - t0)
        if done:
            return timeline
        time.sleep(POLL_S)


def run_variant(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in a subprocess; its records, stamps, CPU seconds and load, or the failure."""
    run_dir = args.out / variant.name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the loop appends to metrics.jsonl
    run_dir.mkdir(parents=True)
    cmd = launch(variant, args, run_dir)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    print(f"[{variant.name}] {' '.join(cmd[2:])}", flush=True)
    started = dt.datetime.now().isoformat(timespec="seconds")
    load_before, cpu_before, start = os.getloadavg(), _child_cpu_s(), time.perf_counter()
    with (run_dir / "run.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        timeline = follow(proc, run_dir / "metrics.jsonl")
    raw = {"variant": dataclasses.asdict(variant), "command": cmd, "returncode": proc.returncode, "started": started,
           "process_wall_s": time.perf_counter() - start, "process_cpu_s": _child_cpu_s() - cpu_before,
           "load_before": load_before, "load_after": os.getloadavg(),
           "records": timeline.records, "seen_s": timeline.seen_s}
    if proc.returncode != 0:
        raw["error"] = (run_dir / "run.log").read_text()[-3000:]
        print(f"[{variant.name}] FAILED (exit {proc.returncode}); log: {run_dir / 'run.log'}", flush=True)
    if not args.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "bench.json").write_text(json.dumps(raw))
    return raw


def _child_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_or_run(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    """With --reuse, the saved run of identical settings (any Python); otherwise a fresh run."""
    saved = args.out / variant.name / "bench.json"
    if args.reuse and saved.exists():
        raw = json.loads(saved.read_text())
        if raw["command"][1:] == launch(variant, args, args.out / variant.name)[1:]:
            return raw
        print(f"[{variant.name}] the saved run had other settings: training again", flush=True)
    return run_variant(variant, args)


# ---------------------------------------------------------------- analysis


def probe_flops(start: dict[str, Any], d_model: int, n_layers: int) -> float:
    """Extra FLOPs of one probe step while every layer is tied (megascale/train/probe.py, "Costs").

    The probe recomputes each unit's weight gradient of the block's matrices, goᵀ·x: 2 FLOPs per
    matrix weight per token per applied layer. A block's weights = (applied - unique) / (L - 1) in the
    tied start record; its two RMSNorm vectors (2d) are not captured. The reduction to rho is O(weights).
    """
    if n_layers < 2 or start["params_applied"] == start["params_unique"]:
        return 0.0  # nothing tied: the probe captures nothing
    block = (start["params_applied"] - start["params_unique"]) / (n_layers - 1)
    return 2.0 * (block - 2 * d_model) * n_layers * start["tokens_per_step"]


def probe_wall_overhead(train: list[dict[str, Any]], probe_steps: list[int], busy_steps: list[int]) -> dict | None:
    """Seconds a probe step adds, from the tied phase's logging windows with and without a probe step.

    Each training record's throughput covers the steps since the previous record. A window is left out
    when it is the first (start-up) or holds an evaluation or an untie (``busy_steps``: they run after
    their step's record, so in the window that starts there or, off a logging step, in the one around it).
    """
    if not probe_steps:
        return None
    end = max(probe_steps)
    windows = {True: [], False: []}
    for prev, cur in zip(train, train[1:]):
        a, b = prev["step"], cur["step"]
        if b > end or any(a <= s < b for s in busy_steps):
            continue
        seconds = (b - a) * cur["tokens_per_step"] / cur["tokens_per_s"]
        windows[any(a < s <= b for s in probe_steps)].append(seconds / (b - a))
    if not windows[True] or not windows[False]:
        return None
    step_s = statistics.median(windows[False])
    probe_s = statistics.median(windows[True]) - step_s  # per step of a window holding one probe step
    window = train[1]["step"] - train[0]["step"]
    extra = probe_s * window  # one probe step per window
    return {"step_s": step_s, "probe_extra_s": extra, "probe_extra_of_step": extra / step_s,
            "windows_with_probe": len(windows[True]), "windows_without": len(windows[False])}


def train_wall(timeline: list[tuple[dict, float]]) -> list[float]:
    """Training seconds at each record: stamps minus the evaluations before it (and its own, for val records)."""
    out, eval_s, prev = [], 0.0, 0.0
    for record, seen in timeline:
        if "val_loss" in record:
            eval_s += seen - prev
        out.append(seen - eval_s)
        prev = seen
    return out


def ema(values: list[float], beta: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average (the plotted 'smoothed training loss')."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def analyse(raw: dict[str, Any], budget: Budget) -> dict[str, Any]:
    """Curves in FLOPs and training seconds, untie events, final numbers of one run."""
    name = raw["variant"]["name"]
    result = {"name": name, "note": raw["variant"]["note"], "overrides": raw["variant"]["overrides"],
              "started": raw.get("started"), "command": raw["command"],
              "returncode": raw["returncode"], "process_wall_s": raw["process_wall_s"],
              "process_cpu_s": raw["process_cpu_s"], "load_before": raw["load_before"], "load_after": raw["load_after"]}
    if raw.get("error"):
        return {**result, "error": raw["error"]}
    timeline = list(zip(raw["records"], raw["seen_s"]))
    walls = train_wall(timeline)
    start = next(r for r in raw["records"] if r.get("event") == "start")
    fpt, per_probe = start["flops_per_token"], probe_flops(start, budget.d_model, budget.n_layers)
    probes, curve_val, curve_train, unties = 0, [], [], []
    for (record, _), wall in zip(timeline, walls):
        if record.get("event") == "probe" and any(k.startswith("coherence/") for k in record):
            probes += 1  # after the untie the probe still reports, but captures nothing
        flops = record.get("tokens", 0) * fpt + probes * per_probe
        point = {"step": record["step"], "tokens": record.get("tokens", 0), "flops": flops, "wall_s": wall}
        if "val_loss" in record:
            curve_val.append({**point, "loss": record["val_loss"]})
        elif "loss" in record:
            curve_train.append({**point, "loss": record["loss"], "tokens_per_s": record["tokens_per_s"],
                                "tokens_per_step": start["tokens_per_step"]})
        elif record.get("event") == "untie":
            unties.append({**point, "reasons": record["reasons"], "units": record["units"],
                           "params_unique_before": record["params_unique_before"],
                           "params_unique_after": record["params_unique_after"]})
    for point, smooth in zip(curve_train, ema([p["loss"] for p in curve_train])):
        point["loss_smoothed"] = smooth
    coherence = [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("coherence/")}}
                 for r in raw["records"] if r.get("event") == "probe" and any(k.startswith("coherence/") for k in r)]
    busy = [p["step"] for p in curve_val if p["step"] > 0] + [u["step"] for u in unties]
    overhead = probe_wall_overhead(curve_train, [c["step"] for c in coherence], busy)
    return {**result, "flops_per_token": fpt, "tokens_per_step": start["tokens_per_step"],
            "params_unique_start": start["params_unique"], "params_applied": start["params_applied"],
            "params_unique_end": unties[-1]["params_unique_after"] if unties else start["params_unique"],
            "probe_steps": probes, "probe_flops_per_step": per_probe, "probe_flops_total": probes * per_probe,
            "probe_wall": overhead,
            "val": curve_val, "train": curve_train, "unties": unties, "coherence": coherence,
            "final_val_loss": curve_val[-1]["loss"] if curve_val else None,
            "total_flops": curve_train[-1]["flops"] if curve_train else None,
            "train_wall_s": curve_train[-1]["wall_s"] if curve_train else None}


def crossing(points: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (flops or wall_s) where the validation loss first reaches ``target``, linearly interpolated."""
    for prev, cur in zip([None, *points], points):
        if cur["loss"] > target:
            continue
        if prev is None or prev["loss"] == cur["loss"]:
            return cur[key]
        frac = (prev["loss"] - target) / (prev["loss"] - cur["loss"])
        return prev[key] + frac * (cur[key] - prev[key])
    return None


def to_target(results: list[dict[str, Any]]) -> float | None:
    """Add FLOPs and seconds to the untied baseline's final validation loss, and their ratio to the baseline's."""
    base = next((r for r in results if r["name"] == BASELINE and "error" not in r), None)
    if base is None:
        return None
    target = base["final_val_loss"]
    base_cost = {key: crossing(base["val"], target, key) for key in ("flops", "wall_s")}
    for r in results:
        if "error" in r:
            continue
        for key in ("flops", "wall_s"):
            cost = crossing(r["val"], target, key)
            r[f"{key}_to_target"] = cost
            r[f"{key}_ratio"] = cost / base_cost[key] if cost is not None and base_cost[key] else None
        # The other way round, informative when the target is never reached: the FLOPs the baseline needed
        # for this run's final loss, over this run's FLOPs (1: as good per FLOP as the baseline; None: the
        # run ended below the baseline's final loss, so the baseline's curve cannot say).
        equivalent = crossing(base["val"], r["final_val_loss"], "flops")
        r["untied_equivalent_flops"] = equivalent
        r["untied_equivalent_fraction"] = equivalent / r["total_flops"] if equivalent is not None else None
    return target


# ---------------------------------------------------------------- reporting


def untie_cell(r: dict[str, Any]) -> str:
    if not r.get("unties"):
        return "–"
    return "; ".join(f"step {u['step']}: {', '.join(u['reasons'].values())}" for u in r["unties"])


def table(results: list[dict[str, Any]], target: float | None) -> str:
    head = ("| run | untie when | final val loss | unique params (start → end) | untie at | "
            "FLOPs to target | × untied | train s to target | × untied | train s total | untied-equivalent FLOPs |")
    rule = "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"| {r['name']} | {r['note']} | failed (exit {r['returncode']}) | | | | | | | | |")
            continue
        params = f"{r['params_unique_start']:,}" + (f" → {r['params_unique_end']:,}" if r["unties"] else "")
        rows.append(
            f"| {r['name']} | {r['note']} | {r['final_val_loss']:.4f} | {params} | {untie_cell(r)} | "
            f"{_num(r.get('flops_to_target'), '.3g')} | {_num(r.get('flops_ratio'), '.2f')} | "
            f"{_num(r.get('wall_s_to_target'), '.0f')} | {_num(r.get('wall_s_ratio'), '.2f')} | {r['train_wall_s']:.0f} | "
            f"{_equivalent(r)} |")
    lines = [head, rule, *rows]
    if target is not None:
        lines += ["", f"Target: the untied baseline's final validation loss, {target:.4f}. "
                  "'× untied' is the run's cost to reach it over the baseline's (< 1: cheaper; the paper's ~2× "
                  "speed-up is 0.5). Linear interpolation between evaluations; 'not reached' if never. "
                  "'untied-equivalent FLOPs': the FLOPs the untied run needed to reach this run's final "
                  "validation loss, as a fraction of this run's FLOPs (the paper's claim would put a "
                  "shared-then-unshared run above 1)."]
    lines += [probe_note(r) for r in results if r.get("probe_steps")]
    return "\n".join(lines)


def probe_note(r: dict[str, Any]) -> str:
    """The coherence probe's cost: FLOPs by formula (added to the run's FLOPs), seconds as measured."""
    step_flops = r["flops_per_token"] * r["tokens_per_step"]
    text = (f"\n{r['name']}: {r['probe_steps']} probe steps while tied, each +{r['probe_flops_per_step']:.3g} FLOPs "
            f"({r['probe_flops_per_step'] / step_flops:.0%} of a step; {r['probe_flops_total'] / r['total_flops']:.2%} "
            f"of the run, included in its FLOPs)")
    w = r.get("probe_wall")
    if w:
        text += (f"; measured +{w['probe_extra_s'] * 1e3:.0f} ms per probe step ({w['probe_extra_of_step']:.0%} of a "
                 f"{w['step_s'] * 1e3:.0f} ms tied step, median of {w['windows_with_probe']} logging windows with a "
                 f"probe vs {w['windows_without']} without; included in its wall time)")
    return text + "."


def _equivalent(r: dict[str, Any]) -> str:
    if r.get("untied_equivalent_fraction") is None:
        return "beyond the untied run" if r.get("flops_to_target") is not None else "–"
    return f"{r['untied_equivalent_flops']:.3g} ({r['untied_equivalent_fraction']:.0%})"


def _num(value: float | None, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def plot(results: list[dict[str, Any]], target: float | None, path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    ok = [r for r in results if "error" not in r]
    # One colour per untie condition; its runs under another moments policy ("coherence+scale") dashed.
    bases = list(dict.fromkeys(r["name"].split("+")[0] for r in ok))
    for ax, key, label in ((axes[0], "flops", "training FLOPs"), (axes[1], "wall_s", "training wall time (s)")):
        for r in ok:
            color, style = f"C{bases.index(r['name'].split('+')[0])}", "--" if "+" in r["name"] else "-"
            ax.plot([p[key] for p in r["train"]], [p["loss_smoothed"] for p in r["train"]], color=color, ls=style,
                    alpha=0.35, lw=1)
            ax.plot([p[key] for p in r["val"]], [p["loss"] for p in r["val"]], color=color, ls=style, marker="o", ms=3,
                    lw=1.5, label=r["note"] if r["note"].startswith(r["name"]) else f"{r['name']} ({r['note']})")
            for u in r["unties"]:
                ax.axvline(u[key], color=color, ls=":", lw=1)
                ax.plot([u[key]], [_loss_at(r["val"], u[key], key)], marker="*", ms=13, color=color, mec="black", mew=0.5)
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"untied final val loss {target:.3f}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (markers: validation; faint: smoothed training; ★: untie)")
    axes[0].set_ylim(*_y_range(ok, target))
    handles, labels = axes[0].get_legend_handles_labels()
    rows = 4 if len(labels) > 8 else 2
    fig.legend(handles, labels, loc="lower center", ncol=-(-len(labels) // rows), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _loss_at(points: list[dict[str, Any]], x: float, key: str) -> float:
    """The validation curve at ``x``, linearly interpolated: where the untie star goes."""
    for prev, cur in zip(points, points[1:]):
        if prev[key] <= x <= cur[key]:
            frac = (x - prev[key]) / (cur[key] - prev[key]) if cur[key] > prev[key] else 0.0
            return prev["loss"] + frac * (cur["loss"] - prev["loss"])
    return points[-1]["loss"]


def _y_range(results: list[dict[str, Any]], target: float | None) -> tuple[float, float]:
    """Zoom past the first steep drop: from below the lowest loss to the highest loss after 20% of the run."""
    low = min([p["loss"] for r in results for p in r["val"]] + [p["loss_smoothed"] for r in results for p in r["train"]])
    later = [p["loss"] for r in results for p in r["val"] if p["step"] >= 0.2 * r["val"][-1]["step"]]
    high = max(later + ([target] if target is not None else []))
    pad = 0.05 * (high - low)
    return low - pad, high + 4 * pad


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch  # noqa: PLC0415

    return dict(device=_cpu_name(), cores=os.cpu_count(), threads=args.threads, date=dt.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([Path(sys.executable).name, *sys.argv]), python=platform.python_version(),
                torch=torch.__version__, deepspeed=_version("deepspeed"), smoke=args.smoke, accelerator="cpu")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_outputs(args: argparse.Namespace, env: dict[str, Any], results: list[dict[str, Any]], target: float | None) -> None:
    """The table on stdout and in --md, everything in --json, the curves in --png."""
    text = table(results, target)
    header = (f"# share then unshare — {env['device']}, {env['cores']} cores ({env['threads']} thread per run), "
              f"torch {env['torch']}, deepspeed {env['deepspeed']}; runs started {env['runs_started']}\n"
              f"budget: {dataclasses.asdict(args.budget)}\ncommand: {env['command']} ({env['date']})")
    print(header + "\n\n" + text)
    print(f"\nwall time: {env['runs_wall_s']:.0f} s in the {len(results)} training processes, "
          f"{env['script_wall_s']:.0f} s in this script{' (reused runs)' if args.reuse else ''}")
    for path in (args.json, args.md, args.png):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(header.replace("\n", "  \n") + "\n\n" + text + "\n")
    args.json.write_text(json.dumps({"environment": env, "budget": dataclasses.asdict(args.budget), "common": COMMON,
                                     "extra": args.extra, "target_val_loss": target, "runs": results}, indent=1))
    if any("error" not in r for r in results):
        title = (f"share then unshare: d{args.budget.d_model} L{args.budget.n_layers}, {args.budget.steps} steps × "
                 f"{args.budget.global_batch * args.budget.seq_len} tokens, {env['device']}, {env['runs_started'][:10]}")
        plot(results, target, args.png, title)
    print(f"wrote {args.md}, {args.json}, {args.png}")


def experiment(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every wanted variant trained (or reused) and analysed; the table, JSON and PNG written."""
    env = environment(args)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    wanted += [f"{v}+{how}" for v in wanted for how in args.moments if how != "copy"]
    start = time.perf_counter()
    results = [analyse(load_or_run(v, args), args.budget) for v in variants(args.budget, args) if v.name in wanted]
    env["script_wall_s"] = time.perf_counter() - start
    env["runs_wall_s"] = sum(r["process_wall_s"] for r in results)  # the training processes, start-up included
    env["runs_started"] = min((r["started"] for r in results if r.get("started")), default=env["date"])
    write_outputs(args, env, results, to_target(results))
    return results


def with_seed(args: argparse.Namespace, seed: int) -> argparse.Namespace:
    """``args`` for one seed of --seeds: its own run directories and outputs."""
    def suffixed(path: Path) -> Path:
        return path.with_name(f"{path.stem}_seed{seed}{path.suffix}")

    return argparse.Namespace(**{**vars(args), "extra": [*args.extra, f"train.seed={seed}"], "out": suffixed(args.out),
                                 "json": suffixed(args.json), "md": suffixed(args.md), "png": suffixed(args.png)})


def moments_table(by_seed: dict[int, list[dict[str, Any]]], policies: list[str]) -> str:
    """Final validation loss of every untie per seed and moments policy, the lowest of each in bold, and
    how each policy compares with copying."""
    loss = {(r["name"].partition("+")[0], seed, r["name"].partition("+")[2] or "copy"): r.get("final_val_loss")
            for seed, results in by_seed.items() for r in results}
    conditions = list(dict.fromkeys(c for c, _, _ in loss if c not in ("untied", "tied")))
    head = ["condition", *(f"seed {s} {how}" for s in by_seed for how in policies)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for c in conditions:
        cells = []
        for s in by_seed:
            row = {how: loss.get((c, s, how)) for how in policies}
            best = min((v for v in row.values() if v is not None), default=None)
            cells += ["–" if v is None else (f"**{v:.4f}**" if v == best and len(policies) > 1 else f"{v:.4f}")
                      for v in row.values()]
        lines.append(f"| `{c}` | " + " | ".join(cells) + " |")
    lines.append("")
    for how in (p for p in policies if p != "copy" and "copy" in policies):
        d = [loss[(c, s, how)] - loss[(c, s, "copy")] for c in conditions for s in by_seed
             if loss.get((c, s, how)) is not None and loss.get((c, s, "copy")) is not None]
        if d:
            lower, higher = sum(x < -5e-4 for x in d), sum(x > 5e-4 for x in d)
            lines.append(f"- {how} against copy: lower in {lower} of {len(d)}, higher in {higher}, equal (within "
                         f"0.0005) in {len(d) - lower - higher}; mean difference {statistics.mean(d):+.3f} nats, "
                         f"largest {max(d):+.4f} (negative: lower than copy).")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        results = experiment(args)
        return 1 if any("error" in r for r in results) else 0
    by_seed = {seed: experiment(with_seed(args, seed)) for seed in seeds}
    table = moments_table(by_seed, args.moments)
    md = args.md.with_name(f"{args.md.stem}_moments{args.md.suffix}")
    md.write_text(f"Final validation loss per seed and untie.moments policy ({', '.join(args.moments)}):\n\n{table}\n")
    print(f"\n{table}\nwrote {md}")
    return 1 if any("error" in r for results in by_seed.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
