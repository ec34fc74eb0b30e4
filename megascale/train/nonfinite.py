"""Non-finite losses (NaN/inf): ``train.nan_policy`` = stop | skip | rollback.

* ``stop`` (default): one line naming the step and the fix, at the next logging step.
* ``skip``: a micro-batch whose loss is not finite contributes no gradient (its
  backward is replaced by a zero-weighted backward on a harmless input, so every
  ZeRO hook and reduction still runs); when every micro-batch of a step is
  skipped the step is taken with learning rate 0, so the weights do not move.
  Needs pp = 1: DeepSpeed's pipeline engine runs all micro-batches inside one call.
* ``rollback``: the step's mean loss is checked after every step; a non-finite one
  reloads the latest checkpoint (weights, optimizer, schedule, data position) and
  marks the offending global batch so it is never trained on again — the batches
  between the checkpoint and it are replayed as before.

Both non-default policies read the loss on every step (one host sync per step, or
per micro-batch for ``skip``). Each event is counted, logged and written to
``metrics.jsonl``; after ``train.nan_max_events`` the run stops as under ``stop``.
Skipped batch positions are saved in ``megascale.json`` so a resumed run skips them too.

Fault injection for tests: ``MEGASCALE_FAULT_NAN_AT_STEP=k`` poisons the global
batch drawn for step k (its loss becomes NaN) — the *batch*, not the step, so a
rollback that skips the batch does not meet it again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from megascale.errors import MegascaleError

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip", "rollback")
FAULT_ENV = "MEGASCALE_FAULT_NAN_AT_STEP"


@dataclass
class NanGuard:
    """The policy, the batches never to train on again, and the events so far."""

    policy: str = "stop"
    max_events: int = 10
    bad_batches: list[list[int]] = field(default_factory=list)  # sampler positions [epoch, consumed]
    events: int = 0
    skipped_micro: int = 0  # micro-batches skipped in the last step (skip policy)
    position: list[int] | None = None  # position of the batch drawn last
    poisoned: list[int] | None = None  # fault injection: the batch whose loss is made NaN

    @property
    def checks_every_step(self) -> bool:
        return self.policy != "stop"

    def draw(self, sampler, step: int) -> list:
        """The next global batch's micro-batch indices, passing over batches marked bad."""
        while self._here(sampler) in self.bad_batches:
            sampler.next_global_batch()
        self.position = self._here(sampler)
        if os.environ.get(FAULT_ENV) == str(step) and self.poisoned is None:
            self.poisoned = self.position
        return sampler.next_global_batch()

    @staticmethod
    def _here(sampler) -> list[int]:
        return [sampler.state.epoch, sampler.state.consumed]

    @property
    def poison(self) -> bool:
        return self.poisoned is not None and self.poisoned == self.position

    def count(self, step: int, out_dir, what: str) -> None:
        self.events += 1
        log.warning("step %d: %s (non-finite event %d of at most %d)", step, what, self.events, self.max_events)
        if self.events > self.max_events:
            raise MegascaleError(
                f"{self.events} non-finite losses by step {step} (train.nan_max_events={self.max_events}); "
                f"lower optim.lr or check the data, then resume from a checkpoint in {out_dir / 'checkpoints'}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"bad_batches": self.bad_batches, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad_batches = [list(b) for b in state.get("bad_batches", [])]
        self.events = int(state.get("events", 0))


def harmless_backward_loss(engine, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A loss whose backward adds exactly zero to every gradient but runs every hook and reduction.

    The forward runs on token 0 everywhere (finite as long as the weights are), and is
    multiplied by 0; under ZeRO-3 and tensor parallelism the forward is collective, as usual.
    """
    inputs, targets, *rest = batch
    return engine(torch.zeros_like(inputs), torch.zeros_like(targets), *rest) * 0.0


def zero_lr(engine) -> None:
    """Learning rate 0 for the coming optimizer step (the LR scheduler sets it again after the step)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
