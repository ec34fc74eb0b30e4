"""Stopping cleanly when the scheduler asks: SIGTERM / SIGUSR1 → finish the step, checkpoint, exit 3.

SLURM sends SIGTERM on preemption and, with ``#SBATCH --signal=USR1@<seconds>``,
SIGUSR1 that long before the time limit. The handler only records the request;
the training loop acts on it between steps, when every rank agrees (the flag
rides in the one all-reduce of each logging step, every ``train.log_every``
steps, ``loop.read_log_values``) — ranks receive the signal at slightly
different moments, and a rank that stopped a step earlier than the others would
leave them waiting in a collective. The run then saves a checkpoint and the launcher exits with
``PREEMPTED_EXIT`` (3); ``launch/slurm/*.sbatch`` requeue the job on that code and
the requeued job resumes from the checkpoint (``train.resume=auto``).
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal (``signal_name``); the loop's logging-step read shares it with every rank."""

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
