"""Host reads of tensor values during training steps that do not log, by calling file and line.

    python tests/sync_audit.py [key=value overrides...]    # one process; prints "SYNC_AUDIT {json}"

A read of a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.numpy()``, ``.cpu()``) waits for the GPU to finish everything
queued before it: one per step caps throughput at the host's pace. This script
builds a run on the given config, trains two warm-up steps, then counts every such
call made from Python during ``--steps`` calls of ``train_step`` (the hot path:
logging steps read the loss, every ``train.log_every``), attributing each to the
first caller outside torch; then the reads a logging step adds (its one read of
loss, gradient norm and stop flag). Reads inside C++ (boolean-mask indexing, ``nonzero``)
are invisible here; on CUDA ``torch.cuda.set_sync_debug_mode`` catches those.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCH_DIR = str(Path(torch.__file__).parent)
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def caller() -> str:
    """'path:line function' of the first frame outside torch (and this file), path relative to its package."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    for marker in ("/megascale/", "/deepspeed/", "/kernels/"):
        if marker in path:
            path = path[path.rindex(marker) + 1:]
            break
    return f"{path}:{frame.f_lineno} {frame.f_code.co_name}"


def counting(counts: collections.Counter):
    """Patch the read methods of torch.Tensor to count their callers; returns a function that undoes it."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def read(self, *args, **kwargs):
            if name != "cpu" or self.device.type != "cpu":  # .cpu() of a CPU tensor is a no-op, not a read
                counts[f"{name}: {caller()}"] += 1
            return fn(self, *args, **kwargs)
        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))

    def undo():
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)

    return undo


def main(overrides: list[str], steps: int = 3) -> None:
    from megascale.config import load_config  # noqa: PLC0415
    from megascale.train.dist import init_distributed  # noqa: PLC0415
    from megascale.train.loop import setup_run, train_step  # noqa: PLC0415

    ctx = init_distributed()
    run = setup_run(load_config(ROOT / "configs" / "tiny.yaml", overrides), ctx)
    for _ in range(2):  # first steps measure memory and build DeepSpeed's lazy state
        train_step(run)
        run.progress.step += 1
    counts: collections.Counter = collections.Counter()
    undo = counting(counts)
    try:
        for _ in range(steps):
            train_step(run)
            run.progress.step += 1
    finally:
        undo()
    per_step = {k: v / steps for k, v in sorted(counts.items())}
    print("SYNC_AUDIT " + json.dumps({"steps": steps, "reads_per_step": per_step,
                                      "reads_on_log_step": log_step_reads(run)}), flush=True)


def log_step_reads(run) -> dict[str, int]:
    """The reads a logging step adds to its training step: the loop's read of the logged values."""
    from megascale.train.loop import read_log_values, train_step  # noqa: PLC0415
    from megascale.train.preempt import StopRequest  # noqa: PLC0415

    loss = train_step(run)
    counts: collections.Counter = collections.Counter()
    undo = counting(counts)
    try:
        read_log_values(run, loss, StopRequest())
    finally:
        undo()
    return dict(counts)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
    from megascale.train.dist import exit_process  # noqa: PLC0415

    exit_process(0)
