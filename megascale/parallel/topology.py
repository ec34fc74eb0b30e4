"""Parallel layout: tensor × pipeline × data degrees, their checks and process groups.

``ParallelDims`` is checked once, at start-up, against the world size and the
model (heads, KV heads, FFN width, vocabulary, layers) so a bad layout fails
with one line naming the number that does not divide. ``build_groups`` makes
the process groups and returns them in a ``ParallelGroups`` object that is
passed explicitly to whatever communicates.

Rank order is DeepSpeed's ``PipeModelDataParallelTopology``: axes
(pipe, data, model) with tensor parallelism innermost, so TP peers are
adjacent ranks (same node on a cluster) and the grid doubles as DeepSpeed's
``mpu`` for ZeRO and gradient-norm reductions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megascale.config import ModelConfig
from megascale.errors import MegascaleError


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int

    @classmethod
    def from_world(cls, tp: int, pp: int, world_size: int) -> "ParallelDims":
        if tp < 1 or pp < 1:
            raise MegascaleError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
        if world_size % (tp * pp):
            raise MegascaleError(
                f"world size {world_size} is not divisible by parallel.tp × parallel.pp = {tp}×{pp}; "
                f"launch a multiple of {tp * pp} processes or change the layout"
            )
        return cls(tp, pp, world_size // (tp * pp))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def check_model(self, m: ModelConfig) -> None:
        """Raise one line for the first model dimension the layout does not divide."""
        tp_checks = [
            ("model.n_heads", m.n_heads),
            ("model.n_kv_heads", m.kv_heads),
            ("the FFN width (model.ffn_dim)", m.hidden_dim),
            ("model.vocab_size", m.vocab_size),
        ]
        for name, value in tp_checks:
            if value % self.tp:
                raise MegascaleError(f"parallel.tp={self.tp} does not divide {name}={value}; choose a tp that divides it")
        if m.n_layers < self.pp:
            raise MegascaleError(f"parallel.pp={self.pp} exceeds model.n_layers={m.n_layers}; use at most one stage per layer")

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and coordinates in the layout."""

    dims: ParallelDims
    topology: Any  # deepspeed ProcessTopology
    grid: Any  # deepspeed PipelineParallelGrid: also DeepSpeed's ``mpu``
    tp_group: Any
    dp_group: Any
    pp_group: Any
    tp_rank: int
    dp_rank: int
    stage: int

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1


def build_groups(dims: ParallelDims) -> ParallelGroups:
    """Create the process groups of ``dims`` (collective: every rank calls it in the same order)."""
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid  # noqa: PLC0415

    if dist.get_world_size() != dims.world_size:
        raise MegascaleError(f"layout {dims.describe()} needs {dims.world_size} processes but {dist.get_world_size()} were launched")
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    grid = PipelineParallelGrid(topology=topo, process_group=dist.group.WORLD)
    return ParallelGroups(
        dims=dims,
        topology=topo,
        grid=grid,
        tp_group=grid.get_slice_parallel_group(),
        dp_group=grid.get_data_parallel_group(),
        pp_group=grid.get_pipe_parallel_group(),
        tp_rank=grid.get_slice_parallel_rank(),
        dp_rank=grid.get_data_parallel_rank(),
        stage=grid.get_stage_id(),
    )
