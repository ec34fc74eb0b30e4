"""A torch.profiler window over a few training steps: a trace per rank and a table of its top operators.

``metrics.profile_start=N`` profiles steps N … N + ``metrics.profile_steps`` - 1 on every
rank and writes, under ``<out_dir>/profile/``:

    rank0_steps10-11.json.gz     Chrome trace (https://ui.perfetto.dev or chrome://tracing),
                                 a "megascale step N" range per step; CUDA kernels on a GPU
    rank0_steps10-11_top.txt     the operators by self time (device time on a GPU)

Only those steps run under the profiler, so the rest of the run keeps its speed
(the profiled steps are slower; their tokens/s and MFU are not the run's).
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """Starts before step ``start`` and writes after step ``start + steps - 1`` (steps numbered from 1)."""

    def __init__(self, start: int, steps: int, out_dir: Path, rank: int, device: torch.device):
        self.start, self.last = start, start + steps - 1
        self.out_dir, self.rank, self.device = out_dir / "profile", rank, device
        self._prof: torch.profiler.profile | None = None
        self._first = 0  # the first step actually profiled
        self._range = None  # the open record_function of the step being profiled

    def before_step(self, step: int) -> None:
        if self.start <= step <= self.last and self._prof is None and not self._first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.start()
            self._first = step
        if self._prof is not None:
            # A named range per step (the profiler's own ProfilerStep marks need a schedule, which
            # would keep it attached for the whole run).
            self._range = torch.profiler.record_function(f"megascale step {step}")
            self._range.__enter__()

    def after_step(self, step: int) -> list[Path]:
        """Close the step's range; after the window's last step, the files written (else [])."""
        if self._prof is None:
            return []
        self._range.__exit__(None, None, None)
        return self._write(step) if step >= self.last else []

    def close(self, step: int) -> list[Path]:
        """The run ended inside the window (max_steps, a stop signal): write what was profiled."""
        return self._write(step) if self._prof is not None else []

    def _write(self, step: int) -> list[Path]:
        prof, self._prof = self._prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels finish inside it
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps{self._first}-{step}"
        trace, table = self.out_dir / f"{stem}.json.gz", self.out_dir / f"{stem}_top.txt"
        prof.export_chrome_trace(str(trace))  # gzipped by its suffix: a GPU step's trace is large
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table.write_text(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        return [trace, table]
