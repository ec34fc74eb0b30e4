"""Metrics: one JSON line per logged step, TensorBoard when installed, a loss-curve PNG (untie events marked).

Only rank 0 writes. Values are plain floats by the time they get here; the loop
decides when to synchronise with the device (once per logging interval).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from megascale.hardware import PEAK_TFLOPS  # one table for MFU and the planner

log = logging.getLogger(__name__)


def device_peak_tflops(device: torch.device, configured: float) -> float | None:
    """The peak used for MFU: the configured one, else a lookup by CUDA device name, else None."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory in GiB: allocator peak on CUDA, process max RSS on CPU."""
    if device.type == "cuda":
        return {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return {"mem_rss_peak_gib": rss_kib * scale / 2**30}


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard) on the main rank."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, wandb_project: str = "", config: dict | None = None):
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = _tensorboard_writer(out_dir / "tensorboard") if enabled and tensorboard else None
        self._wandb = _wandb_run(wandb_project, out_dir, config) if enabled and wandb_project else None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional dependency)
    except ImportError:
        log.info("tensorboard not installed: metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(path))


def _wandb_run(project: str, out_dir: Path, config: dict | None):
    """A Weights & Biases run resumed by run directory (a requeued job continues the same run), or None."""
    try:
        import wandb  # noqa: PLC0415 (optional dependency)
    except ImportError:
        log.warning("metrics.wandb_project=%s but wandb is not installed (pip install wandb): metrics go to "
                    "metrics.jsonl and TensorBoard only", project)
        return None
    run_id = "".join(c if c.isalnum() else "-" for c in str(out_dir.resolve()))[-64:]
    return wandb.init(project=project, name=out_dir.name, id=run_id, resume="allow", dir=str(out_dir), config=config)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def new_axes(height: float = 4.5):
    """A figure and axes on the file-only Agg backend (no display on clusters and CI)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt.subplots(figsize=(7, height))


def save_figure(fig, ax, png_path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Labels, grid and legend, then write the PNG and free the figure."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path:
    """Training and validation loss against tokens seen, as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = new_axes()
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5, ms=4)
    names = sorted({k for r in records for k in r.get("val_loss_parts", {})})  # a blend's parts, each alone
    short = len({Path(n).name for n in names}) == len(names)  # label by directory name where that is unambiguous
    for name in names:
        part = [(r["tokens"], r["val_loss_parts"][name]) for r in records if name in r.get("val_loss_parts", {})]
        ax.plot(*zip(*part), ".--", label=f"validation: {Path(name).name if short else name}", lw=1, ms=4)
    mark_unties(ax, records)
    return save_figure(fig, ax, png_path, "tokens", "cross-entropy (nats/token)", title or "loss")


def mark_unties(ax, records: list[dict[str, Any]]) -> None:
    """A dashed vertical line at each untie event, labelled with the units untied."""
    for i, r in enumerate(r for r in records if r.get("event") == "untie"):
        ax.axvline(r["tokens"], color="tab:red", ls="--", lw=1, label="untie" if i == 0 else None)
        ax.annotate(f"untie {r['units']}", (r["tokens"], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="tab:red")
