"""Deterministic, resumable, data-parallel sample order.

Every rank computes the same global order (a seeded permutation per epoch)
and takes its own slice of each global batch, so no communication is needed
and the data a step sees depends only on (seed, step), not on the layout.

Layout of one global batch of B = micro * accum * dp indices::

    positions:  [ m0 r0 | m0 r1 | ... | m0 r(dp-1) | m1 r0 | ... ]   (each slot = micro)

micro-step ``m`` of rank ``r`` takes slot ``m * dp + r``. The union over ranks
and micro-steps is the whole global batch whatever the split, so 1 rank with
accum 2 and 2 ranks with accum 1 average gradients over the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from megascale.data.tokens import TokenFile
from megascale.errors import MegascaleError


@dataclass
class SamplerState:
    """Position in the data stream, identical on every rank."""

    epoch: int = 0
    consumed: int = 0
    """Samples already taken in the current epoch, over all data-parallel ranks."""


def _grad_accum(global_batch: int, micro_batch: int, dp_size: int) -> int:
    """Micro-steps per optimizer step; the batch arithmetic must be exact."""
    per_micro_step = micro_batch * dp_size
    if micro_batch < 1 or dp_size < 1 or global_batch < 1 or global_batch % per_micro_step:
        raise MegascaleError(
            f"global batch {global_batch} is not a positive multiple of micro batch {micro_batch} "
            f"x data-parallel size {dp_size}; choose a global batch that micro * dp divides"
        )
    return global_batch // per_micro_step


class DistributedBatchSampler:
    """This rank's micro-batches of sample indices, step after step."""

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        *,
        seq_len: int | None = None,
        epoch_in_index: bool = False,
    ):
        """``seq_len`` is only used to make the too-little-data error clearer. ``epoch_in_index``: hand out
        sample i of epoch e as e·num_samples + i, for data that reads another sample in another epoch (a blend)."""
        self._grad_accum = _grad_accum(global_batch, micro_batch, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
        if num_samples < global_batch:
            of_length = f" of length {seq_len}" if seq_len else ""
            raise MegascaleError(
                f"dataset has {num_samples} samples{of_length} but a global batch needs {global_batch}; "
                "use a smaller batch/seq_len or more data"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch_in_index = epoch_in_index
        self.state = SamplerState()
        self._order_epoch = -1  # epoch whose order is cached in self._order
        self._order = np.empty(0, dtype=np.int64)

    @property
    def grad_accum(self) -> int:
        return self._grad_accum

    def set_global_batch(self, global_batch: int) -> None:
        """Take ``global_batch`` sequences per step from the next step on, from the same position (a batch ramp)."""
        self._grad_accum = _grad_accum(global_batch, self.micro_batch, self.dp_size)
        self.global_batch = global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the tail that cannot fill one is dropped)."""
        return self.num_samples // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch``, the same on every rank."""
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def _roll_over_if_exhausted(self) -> None:
        """Start the next epoch when the rest of this one cannot fill a batch."""
        if self.state.consumed + self.global_batch > self.num_samples:
            self.state = SamplerState(epoch=self.state.epoch + 1, consumed=0)

    def next_global_batch(self) -> list[np.ndarray]:
        """This rank's ``grad_accum`` micro-batches for the next optimizer step."""
        self._roll_over_if_exhausted()
        start = self.state.consumed
        batch = self.epoch_order(self.state.epoch)[start : start + self.global_batch]
        if self.epoch_in_index:
            batch = batch + self.state.epoch * self.num_samples
        self.state.consumed += self.global_batch
        self._roll_over_if_exhausted()  # so state_dict() already points at the next batch
        return [self._micro_slice(batch, m) for m in range(self._grad_accum)]

    def _micro_slice(self, batch: np.ndarray, micro_step: int) -> np.ndarray:
        """Slot ``micro_step * dp_size + dp_rank`` of a global batch."""
        slot = micro_step * self.dp_size + self.dp_rank
        return batch[slot * self.micro_batch : (slot + 1) * self.micro_batch].astype(np.int64)

    def state_dict(self) -> dict:
        """JSON-serialisable position plus what it is only valid for."""
        return {
            **asdict(self.state),
            "global_batch": self.global_batch,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly where ``state_dict()`` was taken (any dp/accum split, any global batch).

        The order of an epoch depends on (seed, epoch, num_samples) only, so another global batch goes on
        from the same sample: each is still read once per epoch, only grouped into steps differently.
        """
        for key in ("num_samples", "seed", "shuffle"):
            saved, current = state.get(key), getattr(self, key)
            if saved != current:
                raise MegascaleError(
                    f"the checkpoint's data position was saved with {key}={saved} but this run has "
                    f"{key}={current}; resume with the same data, data.seq_len, data.shuffle and train.seed, or start a new run"
                )
        self.state = SamplerState(epoch=int(state["epoch"]), consumed=int(state["consumed"]))


def batch_from_indices(
    token_file: TokenFile, indices: Sequence[int] | np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (B, T) int64, for sample ``indices``."""
    windows = np.stack([token_file.sample(int(i), seq_len) for i in indices])  # (B, T+1)
    windows = torch.from_numpy(windows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)
