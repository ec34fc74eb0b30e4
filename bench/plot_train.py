"""Bars of what bench/train_throughput.py measured: tokens/s (or MFU) and peak memory, plain against megascale.

    python bench/plot_train.py bench/results/2026-11-26-h200/train_small.json \
        bench/results/2026-11-26-h200/train_1.3b.json --png docs/gpu/train_throughput.png

One group of bars per (config, sharing, activation checkpointing), one bar per
trainer (and per megascale variant), from one or more ``--json`` files of the
same device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def label(r: dict) -> str:
    ckpt = ", ckpt" if r["ckpt"] else ""
    accum = f", {r['micro_batch']}x{r['accum']}" if r.get("accum", 1) > 1 else ""  # micro-batches per optimizer step
    return f"{r['config']} {r['sharing']}{ckpt}{accum}"


def trainer(r: dict) -> str:
    return r["trainer"] if not r.get("variant") else f"{r['trainer']} {r['variant']}"


def plot(files: list[dict], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for d in files for r in d["results"]]
    groups = list(dict.fromkeys(label(r) for r in rows))
    trainers = list(dict.fromkeys(trainer(r) for r in rows))
    mfu = all(r.get("mfu") for r in rows)
    metric, name = ("mfu", "MFU (%)") if mfu else ("tokens_per_s", "tokens/s")
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(groups) + 4), 4))
    width = 0.8 / len(trainers)
    for i, t in enumerate(trainers):
        at = {label(r): r for r in rows if trainer(r) == t}
        xs = [g + (i - (len(trainers) - 1) / 2) * width for g in range(len(groups))]
        values = [at[g][metric] * (100 if mfu else 1) if g in at else 0 for g in groups]
        speed.bar(xs, values, width, label=t)
        memory.bar(xs, [at[g]["peak_gib"] or 0 if g in at else 0 for g in groups], width, label=t)
    for ax, ylabel in ((speed, name), (memory, "peak memory (GiB)")):
        ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    speed.legend(fontsize=8)
    devices = sorted({d["device"] for d in files})
    fig.suptitle(f"training throughput, {', '.join(devices)} ({files[0]['date'][:10]})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", type=Path, help="train_throughput.py --json outputs")
    p.add_argument("--png", type=Path, required=True)
    args = p.parse_args(argv)
    files = []
    for path in args.json:
        try:
            files.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: not a train_throughput.py JSON ({err})")
    if len({d["device"] for d in files}) > 1:
        raise SystemExit("these files come from different devices; plot one device at a time")
    plot(files, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
