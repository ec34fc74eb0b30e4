"""What the kernel benchmarks share: timing and the run's environment record.

Imported as ``_common`` by the scripts in this folder (``python bench/x.py`` puts
``bench/`` on ``sys.path``), so it needs nothing beyond torch and, on a GPU, triton.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def checkout_kernels(*names: str) -> list:
    """``megascale.kernels.<name>`` modules from this checkout, whether or not it is pip-installed.

    The checkout goes first on ``sys.path``, so the kernels measured are the ones
    beside this script; ``megascale`` binds its top-level ``kernels/`` itself.
    """
    sys.path.insert(0, str(ROOT))
    return [importlib.import_module(f"megascale.kernels.{name}") for name in names]


def time_ms(fn, device: torch.device, warmup: int = 25, rep: int = 100) -> float:
    """Mean milliseconds per call: triton's do_bench (CUDA events, L2 flushed) on GPU; one wall-clock call on CPU.

    The CPU path only serves --smoke, where the number means nothing and speed of the run is what counts.
    """
    if device.type == "cuda":
        import triton.testing  # noqa: PLC0415

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def environment(device: torch.device, args) -> dict:
    """Device, date, command and versions for a benchmark's JSON (``args`` needs dtype and smoke)."""
    import triton  # noqa: PLC0415

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return dict(
        device=name, date=dt.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, dtype=args.dtype,
        smoke=args.smoke, interpreter=os.environ.get("TRITON_INTERPRET", "0") == "1",
    )


def write_results(path: Path | None, env: dict, rows: list[dict], **extra) -> None:
    """The benchmark's JSON so far; called after every shape, so a run cut off by a time limit keeps what it measured.
    ``extra``: more top-level entries beside "environment" and "results" (e.g. a host profile)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": rows, **extra}, indent=1))
