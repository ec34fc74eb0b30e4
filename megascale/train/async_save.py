"""Checkpoints written in the background (train.async_save=true).

DeepSpeed writes a checkpoint's files through its engine's ``checkpoint_engine``:
every ``save(state_dict, path)`` call of a save (the model states, each rank's ZeRO
partition, a pipeline stage's layer files) goes through it. ``HostSnapshotEngine``
takes those calls as copies of the state in host memory and nothing else, so
``engine.save_checkpoint`` returns once the state is copied; ``BackgroundWrites``
then writes the files on a thread while training goes on. The copy is what makes it
safe: the next optimizer step changes the live tensors, never the copy.

Publishing the checkpoint (``megascale.json``, the rename of ``step_N.tmp``,
``latest``) stays with ``megascale.train.checkpoint.PendingSave`` and waits until
every rank's writes are done, so the crash-safety contract is unchanged: ``latest``
only ever names a complete checkpoint. torchtitan's async mode (DCP's ``async_save``)
works the same way: stage to host memory, write on a thread, the next save waits.

The cost: host memory for one copy of the rank's checkpointed state while it is
being written, and the write's CPU time beside training.
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def host_copy(obj: Any, memo: dict[int, torch.Tensor] | None = None) -> Any:
    """``obj`` with every tensor copied to host memory, containers rebuilt and anything else deep-copied
    (the optimizer's param groups change with the LR schedule). A tensor met twice is copied once, so
    the file keeps that sharing as ``torch.save`` of the live state would."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to("cpu", copy=True)
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same kind of mapping (OrderedDict, defaultdict), its values replaced below
        for key, value in obj.items():
            out[key] = host_copy(value, memo)
        return out
    if type(obj) in (list, tuple):  # a namedtuple or other subclass: deep-copied below
        return type(obj)(host_copy(v, memo) for v in obj)
    return copy.deepcopy(obj)


class HostSnapshotEngine(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine with each ``save`` a host copy, kept until ``take()``; loading as usual."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "MegascaleHostSnapshot"
        self.snapshots: list[tuple[str, Any]] = []

    def save(self, state_dict, path: str) -> None:
        # A copy to pageable host memory returns once it is complete: the next step cannot change it.
        self.snapshots.append((path, host_copy(state_dict)))

    def write(self, state_dict, path: str) -> None:
        """The file as DeepSpeed's own engine writes it (its serialization setting)."""
        TorchCheckpointEngine.save(self, state_dict, path)

    def take(self) -> list[tuple[str, Any]]:
        """The snapshots of the save just made, (path, state) in DeepSpeed's order; the engine is empty after."""
        taken, self.snapshots = self.snapshots, []
        return taken


def install(engine) -> None:
    """Make ``engine``'s saves host snapshots (its serialization setting kept)."""
    engine.checkpoint_engine = HostSnapshotEngine(engine._config)


class BackgroundWrites:
    """One save's files written by a thread, in order; ``done()`` polls, ``wait()`` joins and raises its error."""

    def __init__(self, writer: HostSnapshotEngine, snapshots: list[tuple[str, Any]]):
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(writer, snapshots), name="megascale-checkpoint",
                                        daemon=True)  # a crashed run must not hang on it: .tmp is never published
        self._thread.start()

    def _run(self, writer: HostSnapshotEngine, snapshots: list[tuple[str, Any]]) -> None:
        start = time.perf_counter()
        try:
            while snapshots:
                path, state = snapshots.pop(0)  # dropped once written: host memory frees file by file
                writer.write(state, path)
                del state
        except BaseException as err:  # noqa: BLE001 (re-raised on the training thread by wait())
            self.error = err
        self.seconds = time.perf_counter() - start

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
