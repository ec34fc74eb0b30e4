"""One Markdown page per run: config, loss and coherence plots, untie events, throughput, memory.

``launch/report.py RUN_DIR`` writes ``RUN_DIR/report.md`` (and the PNGs it shows)
from what the run left: ``metrics.jsonl`` and the newest checkpoint's
``megascale.json``. It reads files only, so it works on a finished, a running or
a preempted run, on any machine.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from megascale.errors import MegascaleError
from megascale.train.checkpoint import latest_checkpoint, read_meta
from megascale.train.metrics import mark_unties, new_axes, plot_loss_curve, read_metrics, save_figure


def load_run(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise MegascaleError(f"{run_dir} has no metrics.jsonl: not a megascale run directory; pass the run's train.out_dir")
    ckpt = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    return read_metrics(metrics), (read_meta(ckpt) if ckpt else None)


def plot_coherence(records: list[dict[str, Any]], png: Path) -> Path | None:
    """ρ of each tie group on probe steps, with the unties marked; None when the run never probed."""
    probes = [r for r in records if r.get("event") == "probe"]
    keys = sorted({k for r in probes for k in r if k.startswith("coherence/")})
    if not keys:
        return None
    fig, ax = new_axes(height=4)
    for key in keys:
        points = [(r["tokens"], r[key]) for r in probes if key in r]
        ax.plot(*zip(*points), ".-", label=key.split("/")[1], lw=1)
    mark_unties(ax, records)
    ax.set_ylim(0, 1.05)
    return save_figure(fig, ax, png, "tokens", "coherence ρ = |Σg|² / (K Σ|g_i|²)", "gradient coherence per tie group")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _throughput(steps: list[dict[str, Any]]) -> list[str]:
    timed = [r for r in steps if r.get("tokens_per_s")][1:]  # the first window includes start-up
    if not timed:
        return ["No timed steps."]
    med = lambda key: statistics.median(r[key] for r in timed if r.get(key) is not None)  # noqa: E731
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    hfu = [r["hfu"] for r in timed if r.get("hfu") is not None]
    mem = [r.get("mem_peak_gib") or r.get("mem_rss_peak_gib") for r in timed]
    rows = [["tokens/s", f"{med('tokens_per_s'):,.0f}"], ["model TFLOP/s per device", f"{med('tflops_per_device'):.3g}"],
            ["MFU", f"{statistics.median(mfu):.1%}" if mfu else "n/a (no peak for this device)"]]
    if any(r.get("hardware_tflops_per_device") for r in timed):  # activation recomputation: its forwards counted too
        rows += [["hardware TFLOP/s per device (with recomputation)", f"{med('hardware_tflops_per_device'):.3g}"],
                 ["HFU", f"{statistics.median(hfu):.1%}" if hfu else "n/a (no peak for this device)"]]
    rows.append(["peak memory (GiB)", f"{max(m for m in mem if m is not None):.2f}" if any(mem) else "n/a"])
    return ["Medians over the logged windows after the first:", "", *_table(["", "value"], rows)]


def _memory(records: list[dict[str, Any]]) -> list[str]:
    reports = [r for r in records if r.get("event") == "state_memory"]
    if not reports:
        return ["No state-memory record."]
    rows = []
    for report in reports:
        for r in report["ranks"]:
            f, m = r["formula"], r["measured"]
            rows.append([report["step"], r["rank"], f"{r['params']:,}", f"{(f['weights'] + f['optimizer']) / 2**20:.2f}",
                         f"{(m['weights'] + m['optimizer']) / 2**20:.2f}"])
    return _table(["step", "rank", "local params", "weights+optimizer MiB (formula)", "(measured)"], rows)


def _moments(event: dict[str, Any]) -> str:
    """The policy, and each scaled block's (exp_avg, exp_avg_sq) factors; runs from before untie.moments copied."""
    factors = event.get("moment_factors", {})
    scaled = ", ".join(f"block {g} ×{a:.3g}/×{b:.3g}" for g, (a, b, _) in factors.items())
    return f"{event.get('moments', 'copy')}: {scaled}" if scaled else event.get("moments", "copy")


def _events(records: list[dict[str, Any]]) -> list[str]:
    unties = [r for r in records if r.get("event") == "untie"]
    lines = []
    if unties:
        rows = [[r["step"], r["groups"], r["units"], "; ".join(r["reasons"].values()),
                 f"{r['params_unique_before']:,} → {r['params_unique_after']:,}", _moments(r),
                 f"{r['seconds']:.1f}" if "seconds" in r else "–"] for r in unties]
        lines += _table(["step", "groups", "units", "why", "unique parameters", "Adam moments", "pause s"], rows)
    else:
        lines.append("No untie.")
    other = [r for r in records if r.get("event") in ("preempted", "nan_skip", "nan_rollback", "global_batch")]
    lines += ["", *[f"- step {r['step']}: {r['event']} {json.dumps({k: v for k, v in r.items() if k not in ('step', 'event')})}"
                    for r in other]]
    return lines


def _profiles(records: list[dict[str, Any]]) -> list[str]:
    """Each profiled window's files, and the first rows of rank 0's operator table (metrics.profile_start)."""
    lines = []
    for event in (r for r in records if r.get("event") == "profile"):
        files = [Path(f) for f in event["files"]]
        lines += [f"Steps up to {event['step']}: " + ", ".join(f"`{f.name}`" for f in files)
                  + " (each rank wrote its own; open a trace in https://ui.perfetto.dev)", ""]
        table = next((f for f in files if f.name.endswith("_top.txt") and f.is_file()), None)
        if table is not None:
            lines += ["```", *table.read_text().splitlines()[:14], "```", ""]
    return lines


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` and its plots; returns the page's path."""
    records, meta = load_run(run_dir)
    start = next((r for r in records if r.get("event") == "start"), {})
    steps = [r for r in records if "loss" in r and r["loss"] is not None]
    vals = [r for r in records if "val_loss" in r]
    loss_png = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=run_dir.name)
    coh_png = plot_coherence(records, run_dir / "coherence.png")
    lines = [f"# Run report: {run_dir.name}", ""]
    summary = [["steps", steps[-1]["step"] if steps else 0], ["tokens", f"{steps[-1]['tokens']:,}" if steps else 0],
               ["layout (tp, pp, dp)", start.get("layout")], ["device", start.get("device")],
               ["sharing", start.get("sharing")], ["unique / applied parameters",
                f"{start.get('params_unique', 0):,} / {start.get('params_applied', 0):,}"],
               ["final training loss", f"{steps[-1]['loss']:.4f}" if steps else "n/a"],
               ["validation loss", f"{vals[0]['val_loss']:.4f} → {vals[-1]['val_loss']:.4f}" if vals else "n/a"]]
    summary += [[f"validation loss, {name}", f"{first:.4f} → {vals[-1]['val_loss_parts'][name]:.4f}"]  # a blend's parts
                for name, first in (vals[0].get("val_loss_parts", {}) if vals else {}).items()
                if name in vals[-1].get("val_loss_parts", {})]
    lines += _table(["", ""], summary) + ["", f"![loss]({loss_png.name})", ""]
    if coh_png:
        lines += ["## Gradient coherence", "", f"![coherence]({coh_png.name})", ""]
    lines += ["## Untie and fault events", "", *_events(records), "", "## Throughput", "", *_throughput(steps), "",
              "## Per-rank state memory", "", *_memory(records), ""]
    profiles = _profiles(records)
    if profiles:
        lines += ["## Profile", "", *profiles]
    if meta is not None:
        lines += ["## Config (newest checkpoint)", "", "```json", json.dumps(meta["config"], indent=2), "```", ""]
    page = run_dir / "report.md"
    page.write_text("\n".join(lines))
    return page
