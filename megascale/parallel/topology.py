"""Parallel layout: tensor × pipeline × context × data degrees, their checks and process groups.

``ParallelDims`` is checked once, at start-up, against the world size and the
model (heads, KV heads, FFN width, vocabulary, layers) so a bad layout fails
with one line naming the number that does not divide. ``build_groups`` makes
the process groups and returns them in a ``ParallelGroups`` object that is
passed explicitly to whatever communicates.

Rank order is DeepSpeed's ``PipeModelDataParallelTopology``: axes
(pipe, data, model) with tensor parallelism innermost, so TP peers are
adjacent ranks (same node on a cluster) and the grid doubles as DeepSpeed's
``mpu`` for ZeRO and gradient-norm reductions.

Context parallelism lives inside DeepSpeed's data axis, as Megatron-Core's
"data-parallel group with context parallelism": the context-parallel ranks of
one sequence each hold a share of its tokens, so for the weights they are
data-parallel peers (gradients averaged, ZeRO partitions spread over all
dp × cp of them). Data coordinate d = batch_rank · cp + cp_rank keeps the peers
of one sequence adjacent, after tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from megascale.config import ModelConfig
from megascale.errors import MegascaleError


def kv_replicas(tp: int, kv_heads: int) -> int:
    """Ranks of a tensor group that hold each KV head: 1, or tp / n_kv_heads when tp exceeds the KV heads."""
    return tp // kv_heads if tp > kv_heads else 1


@dataclass(frozen=True)
class ParallelDims:
    tp: int
    pp: int
    dp: int  # data-parallel replicas: each reads its own share of every global batch
    cp: int = 1  # context-parallel ranks per replica: each holds 1/cp of every sequence's tokens

    @classmethod
    def from_world(cls, tp: int, pp: int, world_size: int, cp: int = 1) -> "ParallelDims":
        if tp < 1 or pp < 1 or cp < 1:
            raise MegascaleError(f"parallel.tp={tp}, parallel.pp={pp} and parallel.cp={cp} must be >= 1")
        model = tp * pp * cp
        if world_size % model:
            names = "parallel.tp × parallel.pp" + (" × parallel.cp" if cp > 1 else "")
            sizes = f"{tp}×{pp}" + (f"×{cp}" if cp > 1 else "")
            raise MegascaleError(
                f"world size {world_size} is not divisible by {names} = {sizes}; "
                f"launch a multiple of {model} processes or change the layout"
            )
        return cls(tp, pp, world_size // model, cp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def dp_cp(self) -> int:
        """Ranks that average gradients and share ZeRO partitions: DeepSpeed's data axis, dp × cp."""
        return self.dp * self.cp

    def check_model(self, m: ModelConfig) -> None:
        """Raise one line for the first model dimension the layout does not divide."""
        tp_checks = [
            ("model.n_heads", m.n_heads),
            ("the FFN width (model.ffn_dim)", m.hidden_dim),
            ("model.vocab_size", m.vocab_size),
        ]
        for name, value in tp_checks:
            if value % self.tp:
                raise MegascaleError(f"parallel.tp={self.tp} does not divide {name}={value}; choose a tp that divides it")
        if m.kv_heads % self.tp and self.tp % m.kv_heads:  # more ranks than KV heads: each head on tp/n_kv ranks
            raise MegascaleError(f"parallel.tp={self.tp} neither divides model.n_kv_heads={m.kv_heads} nor is a multiple of it; "
                                 f"choose a tp that does (each KV head is then held whole by one or by tp/n_kv_heads ranks)")
        if m.n_layers < self.pp:
            raise MegascaleError(f"parallel.pp={self.pp} exceeds model.n_layers={m.n_layers}; use at most one stage per layer")

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp}" + (f" cp={self.cp}" if self.cp > 1 else "") + f" dp={self.dp}"


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's process groups and coordinates in the layout."""

    dims: ParallelDims
    topology: Any  # deepspeed ProcessTopology
    grid: Any  # deepspeed PipelineParallelGrid: also DeepSpeed's ``mpu``
    tp_group: Any
    dp_group: Any  # DeepSpeed's data-parallel group: dp × cp ranks (gradient averaging, ZeRO partitions)
    pp_group: Any
    tp_rank: int
    dp_rank: int  # rank in dp_group
    stage: int
    cp_group: Any = None  # the ranks holding the other token shares of this rank's sequences
    cp_rank: int = 0
    kv_group: Any = None  # with tp > n_kv_heads: the tensor ranks that hold this rank's KV head (copies of it)

    @cached_property
    def context(self):
        """This rank's ``ContextParallel`` (megascale.parallel.context_parallel), or None at cp = 1.

        Made once: the model's attention layers, the pipeline's layers and the loop hold the same one.
        """
        if self.dims.cp == 1:
            return None
        from megascale.parallel.context_parallel import ContextParallel  # noqa: PLC0415 (imports the model's attention)

        return ContextParallel(self.cp_group, self.dims.cp, self.cp_rank)

    @property
    def batch_rank(self) -> int:
        """Which of the dims.dp shares of each global batch this rank reads (its cp peers read the same)."""
        return self.dp_rank // self.dims.cp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1


@dataclass(frozen=True)
class Replicas:
    """Data-parallel copies of a model that split a list of batches round-robin (generation, scoring).

    Batch b goes to replica b mod size, whole: each batch is the one a single process
    would run, so the results do not depend on how many replicas share the work.
    """

    rank: int = 0
    size: int = 1
    group: Any = None  # the data-parallel group (None: one replica)

    @classmethod
    def of(cls, groups: ParallelGroups) -> "Replicas":
        return cls(groups.batch_rank, groups.dims.dp, groups.dp_group if groups.dims.dp > 1 else None)

    def mine(self, n_batches: int) -> range:
        """The batch indices this replica runs."""
        return range(self.rank, n_batches, self.size)

    def gather(self, results: dict[int, Any]) -> dict[int, Any]:
        """Every replica's {batch index: result}, merged (collective over the replicas; picklable results)."""
        if self.size == 1:
            return results
        import torch.distributed as dist  # noqa: PLC0415

        parts: list[dict[int, Any]] = [{} for _ in range(self.size)]
        dist.all_gather_object(parts, results, group=self.group)
        return {b: r for part in parts for b, r in part.items()}

    def sum(self, values: list[float], device) -> list[float]:
        """Each value summed over the replicas, in float64, through ``device`` (NCCL reduces CUDA tensors only)."""
        if self.size == 1:
            return values
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total, group=self.group)
        return total.tolist()


def build_groups(dims: ParallelDims, kv_copies: int = 1) -> ParallelGroups:
    """Create the process groups of ``dims`` (collective: every rank calls it in the same order).

    ``kv_copies`` > 1 (tp > n_kv_heads, ``kv_replicas``): runs of that many adjacent tensor
    ranks hold one KV head, and get a group to sum its gradient.
    """
    import torch.distributed as dist  # noqa: PLC0415
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid  # noqa: PLC0415

    if dist.get_world_size() != dims.world_size:
        raise MegascaleError(f"layout {dims.describe()} needs {dims.world_size} processes but {dist.get_world_size()} were launched")
    topo = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp_cp)
    grid = PipelineParallelGrid(topology=topo, process_group=dist.group.WORLD)
    cp_group = _context_group(topo, dims.cp)
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
        cp_group=cp_group,
        cp_rank=grid.get_data_parallel_rank() % dims.cp,
        kv_group=_runs_of(topo.get_axis_comm_lists("model"), kv_copies),
    )


def _runs_of(axis_lists: list[list[int]], size: int):
    """This rank's group among runs of ``size`` consecutive ranks of each list (None for size 1).

    Collective: every rank creates every group, in one order.
    """
    import torch.distributed as dist  # noqa: PLC0415

    if size == 1:
        return None
    mine = None
    for ranks in axis_lists:
        for start in range(0, len(ranks), size):
            members = ranks[start:start + size]
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine = group
    return mine


def _context_group(topo, cp: int):
    """This rank's context-parallel group: same stage and tensor rank, data coordinates d // cp equal.

    Collective: every rank creates every group, in one order.
    """
    return _runs_of(topo.get_axis_comm_lists("data"), cp)  # each list: one (pipe, model) pair's data axis, in order
