"""Stopping cleanly when the scheduler asks: SIGTERM / SIGUSR1 → finish the step, checkpoint, exit 3.

SLURM sends SIGTERM on preemption and, with ``#SBATCH --signal=USR1@<seconds>``,
SIGUSR1 that long before the time limit. The handler only records the request;
the training loop acts on it between steps, when every rank agrees (one
all-reduce of a flag every ``train.log_every`` steps, where the loop synchronises
anyway) — ranks receive the signal at slightly different moments, and a rank
that stopped a step earlier than the others would leave them waiting in a
collective. The run then saves a checkpoint and the launcher exits with
``PREEMPTED_EXIT`` (3); ``launch/slurm/*.sbatch`` requeue the job on that code and
the requeued job resumes from the checkpoint (``train.resume=auto``).
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; ``agreed`` says whether any rank has received one."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.signal_name = signal.Signals(signum).name  # acted on between steps; nothing else is safe here

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has received a stop signal (collective over the world)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
