"""Where one training step's time goes: megascale against the plain loop, per phase and per kernel category.

    python bench/step_profile.py                                  # GPU: 1.3b, seq 2048, bf16, micro-batch 8
    python bench/step_profile.py --variants ";model.attention=cudnn" --json out.json
    python bench/step_profile.py --cpu                            # CPU: the tiny config, fp32 (ATen ops, not kernels)

The two trainers of ``bench/train_throughput.py`` (same model, same batches) are
taken apart into their three phases: forward (with the loss), backward, and the
update (clipping, optimizer, zeroing; for megascale ``engine.step()``). For each:

* **wall ms** — the phase alone, synchronised before and after, median of
  ``--reps`` steps;
* **device ms** and **launches** — what ``torch.profiler`` records for that phase
  in one more step: the sum of the kernels' own times and their number on CUDA;
  on CPU, ATen ops' self times and calls (nested calls counted). Wall well above
  device time means the host, not the GPU, sets the pace;
* **categories** — the same time by kind of kernel (matmul, attention, loss,
  norm/RoPE/SwiGLU, optimizer, copies and casts, reductions, other elementwise),
  from the kernel names, and the ``--top`` longest kernels.

The train_throughput figures say megascale is 0.88-0.92× the plain loop on an
H200 (untied); this says in which phase and which kernels the difference lies,
before anything is changed. A profile, not a throughput figure: the phases run
synchronised, so overlap between them is lost, and the profiler adds its own cost.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_throughput as tt  # noqa: E402

PHASES = ("forward", "backward", "update")
# First match wins, on the lower-cased kernel name (CUDA) or ATen op name (CPU). Norm/RoPE/SwiGLU go first:
# the Triton RMSNorm kernel's name contains "_fwd_kernel", as the attention kernel's does.
CATEGORIES = (
    ("norm/rope/swiglu", ("rms", "rope", "swiglu", "silu", "sigmoid")),
    ("attention", ("flash", "fmha", "sdpa", "attention", "_fwd_kernel", "_bwd_dkdv", "_bwd_dq", "_bwd_delta", "_dq_cast")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "aten::matmul", "sm90_", "sm80_")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "_row_stats", "_softmax_grad")),
    ("compiled", ("triton_poi", "triton_red", "triton_per")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "lerp", "addcdiv", "addcmul")),
    ("copy/cast", ("copy", "memcpy", "memset", "fill", "cat", "clone", "to_copy", "zero")),
    ("reduction", ("reduce", "sum", "norm", "max", "min", "mean")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other elementwise")


def run_phases(phases: dict, batch, device: torch.device, timings: dict | None = None, profiled: str = ""):
    """One step, phase by phase, synchronised around each; the phase named ``profiled`` under torch.profiler."""
    loss = None
    prof = None
    for phase in PHASES:
        tt.sync(device)
        start = time.perf_counter()
        if phase == profiled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                loss = _call(phases, phase, batch, loss)
                tt.sync(device)
        else:
            loss = _call(phases, phase, batch, loss)
            tt.sync(device)
        if timings is not None:
            timings[phase].append((time.perf_counter() - start) * 1e3)
    return prof


def _call(phases: dict, phase: str, batch, loss):
    if phase == "forward":
        return phases["forward"](batch)
    if phase == "backward":
        phases["backward"](loss)
    else:
        phases["update"]()
    return loss


def kernels(prof, device: torch.device) -> list[tuple[str, float, int]]:
    """(name, own ms, count) of every kernel (CUDA) or ATen op (CPU) the profiled phase ran."""
    out = []
    for e in prof.key_averages():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            own = getattr(e, "self_device_time_total", None)
            own = getattr(e, "self_cuda_time_total", 0.0) if own is None else own
        else:
            if not e.key.startswith("aten::"):
                continue
            own = e.self_cpu_time_total
        out.append((e.key, own / 1e3, e.count))
    return out


def profile_trainer(phases: dict, batches, device: torch.device, warmup: int, reps: int) -> dict:
    for i in range(warmup):
        run_phases(phases, batches[i % len(batches)], device)
    timings: dict[str, list[float]] = {p: [] for p in PHASES}
    for i in range(reps):
        run_phases(phases, batches[i % len(batches)], device, timings)
    result = {}
    for phase in PHASES:
        prof = run_phases(phases, batches[0], device, profiled=phase)
        ks = kernels(prof, device)
        cats: dict[str, float] = defaultdict(float)
        for name, ms, _ in ks:
            cats[category(name)] += ms
        result[phase] = {"wall_ms": statistics.median(timings[phase]), "device_ms": sum(ms for _, ms, _ in ks),
                         "launches": sum(n for *_, n in ks), "categories": dict(cats),
                         "top": sorted(([round(ms, 3), n, name] for name, ms, n in ks), reverse=True)[:40]}
    return result


def build(trainer: str, cfg, device, ctx, groups):
    if trainer == "plain":
        return tt.plain_trainer(cfg, device)
    return tt.megascale_trainer(cfg, device, ctx, groups)


def report(rows: list[dict], top: int) -> None:
    print(f"{'trainer':<40} {'phase':<9} {'wall ms':>9} {'device ms':>10} {'launches':>9}")
    for r in rows:
        for phase in PHASES:
            p = r["phases"][phase]
            print(f"{r['label']:<40} {phase:<9} {p['wall_ms']:9.2f} {p['device_ms']:10.2f} {p['launches']:9,}")
    cats = sorted({c for r in rows for p in r["phases"].values() for c in p["categories"]})
    print("\ndevice ms by category (all phases): " + " | ".join(r["label"] for r in rows))
    for c in cats:
        vals = [sum(p["categories"].get(c, 0.0) for p in r["phases"].values()) for r in rows]
        print(f"  {c:<20} " + " ".join(f"{v:10.2f}" for v in vals))
    for r in rows:
        print(f"\n{r['label']}: the {top} longest kernels (ms, count, phase)")
        longest = sorted(((ms, n, phase, name) for phase, p in r["phases"].items() for ms, n, name in p["top"]),
                         reverse=True)[:top]
        for ms, n, phase, name in longest:
            print(f"  {ms:9.3f} {n:6} {phase:<9} {name[:110]}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: each trainer's kernel time, stacked by category. Right: each phase's wall time, per trainer."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    # A variant's overrides wrapped at their commas: one long label would squeeze both panels.
    labels = [textwrap.fill(r["label"].replace(",", ", "), 40) for r in rows]
    cats = sorted({c for r in rows for p in r["phases"].values() for c in p["categories"]})
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, (kinds, phases) = plt.subplots(1, 2, figsize=(14, 1.6 + 0.35 * lines + 0.3 * len(rows)),
                                        gridspec_kw={"width_ratios": [3, 2]})
    left = [0.0] * len(rows)
    for cat in cats:
        ms = [sum(p["categories"].get(cat, 0.0) for p in r["phases"].values()) for r in rows]
        kinds.barh(labels, ms, left=left, label=cat)
        left = [a + b for a, b in zip(left, ms)]
    kinds.set_xlabel("kernel ms per step (CPU: ATen op ms)")
    kinds.invert_yaxis()
    kinds.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    height = 0.8 / len(PHASES)
    for i, phase in enumerate(PHASES):
        phases.barh([j + i * height for j in range(len(rows))], [r["phases"][phase]["wall_ms"] for r in rows],
                    height=height, label=phase)
    phases.set_yticks([j + height for j in range(len(rows))], [""] * len(rows))  # the left panel names them
    phases.invert_yaxis()
    phases.set_xlabel("wall ms (synchronised)")
    phases.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="configs/<name>.yaml (default 1.3b; --cpu: tiny)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (fp32, tiny config): ATen ops instead of kernels")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default 8 on GPU, 8 on CPU)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default 2048 on GPU, 128 on CPU)")
    p.add_argument("--sharing", default="none")
    p.add_argument("--ckpt", choices=("off", "on"), default="off", help="activation checkpointing")
    p.add_argument("--variants", default="", help='megascale override sets, e.g. ";model.attention=cudnn"')
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed steps per trainer (wall ms: their median)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path, help="kernel time by category and wall time by phase, per trainer")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from megascale.train.dist import init_distributed  # noqa: PLC0415
    from megascale.train.loop import make_groups  # noqa: PLC0415

    ctx = init_distributed()
    device = ctx.device
    name = args.config or ("tiny" if args.cpu else "1.3b")
    # bench_config's fields: the same config train_throughput.py would build.
    args.micro, args.ckpt_on = args.micro_batch or 8, args.ckpt == "on"
    trainers = [("plain", "")] + [("megascale", v) for v in (args.variants.split(";") if args.variants else [""])]
    batches = tt.random_batches(tt.bench_config(name, args), 2, device)
    groups = make_groups(tt.bench_config(name, args), ctx)
    rows = []
    for trainer, variant in trainers:
        cfg = tt.bench_config(name, args, variant)
        model, step = build(trainer, cfg, device, ctx, groups)
        phases = profile_trainer(step.phases, batches, device, args.warmup, args.reps)
        rows.append({"trainer": trainer, "variant": variant, "label": f"{trainer} {variant}".strip(), "phases": phases})
        tt.release(step)
        del model, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:  # after every trainer: a run cut off keeps what it measured
            write_json(args.json, name, args, device, rows)
    print(f"{name}, seq {batches[0][0].shape[1]}, micro-batch {args.micro}, sharing {args.sharing}, "
          f"activation checkpointing {args.ckpt}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    report(rows, args.top)
    if args.png:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        plot(rows, args.png, f"one training step, {name}, micro-batch {args.micro}, {device_name}")
        print(f"wrote {args.png}")
    return 0


def write_json(path: Path, name: str, args, device: torch.device, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "command": " ".join(sys.argv), "config": name, "micro_batch": args.micro,
        "sharing": args.sharing, "ckpt": args.ckpt, "unit": "device ms: CUDA kernels' own time; on CPU ATen ops'",
        "trainers": rows}, indent=2))


if __name__ == "__main__":
    rc = main()
    from megascale.train.dist import exit_process  # noqa: E402

    exit_process(rc)
