"""Tensor-parallel communication as small autograd functions, each with its conjugate.

Megatron's pattern: a column-parallel layer's input enters the tensor-parallel
region with ``copy_to_tp`` (identity forward, all-reduce of the gradient
backward); a row-parallel layer's partial outputs leave it with
``reduce_from_tp`` (all-reduce forward, identity backward). ``gather_from_tp``
and its conjugate ``split_to_tp`` move the last dimension between shards and
the full tensor. The process group is always an argument — no global state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    return x.chunk(world, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    world = _world(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward."""
    return _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the last dimension's shards forward; keep this rank's shard of the gradient backward."""
    return _GatherFromTP.apply(x, group)


def split_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's shard of the last dimension forward; gather the gradient backward."""
    return _SplitToTP.apply(x, group)


# ------------------------------------------------------------ sequence parallelism
#
# With sequence parallelism the regions outside the tensor-parallel matmuls (norms,
# residual adds) hold (B, T/tp, D) slices of the sequence instead of full replicas.
# Entering a column-parallel layer all-gathers the sequence (backward: reduce-scatter);
# leaving a row-parallel layer reduce-scatters it (backward: all-gather). The same bytes
# move as with copy/reduce, but activations outside the matmuls take 1/tp of the memory.


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    # torch 2.13 names it all_gather_single and deprecates all_gather_into_tensor, the name older versions have.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


def _reduce_scatter_single(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


def stacked_gather(x: torch.Tensor, group, async_op: bool = False):
    """(every rank's ``x`` stacked as (world, *x.shape) in group rank order, the work handle when ``async_op``).

    One all-gather into one buffer: NCCL's list all-gather gathers into a flat buffer of its own and copies
    each rank's part out, and concatenating those parts copied them again.
    """
    world = _world(group)
    flat = x.new_empty((world * x.shape[0], *x.shape[1:]))  # gloo wants the ranks' parts along dim 0
    work = _all_gather_single(flat, x.contiguous(), group, async_op)
    return flat.view(world, *x.shape), work


def merge_parts(stacked: torch.Tensor, dim: int) -> torch.Tensor:
    """(world, *shape) → ``shape`` with ``dim`` ``world`` times longer, rank r's part r-th along it: a view when
    every dimension before ``dim`` has size 1 (one sequence a micro-batch), else one copy."""
    world, shape = stacked.shape[0], stacked.shape[1:]
    return stacked.movedim(0, dim).reshape(*shape[:dim], world * shape[dim], *shape[dim + 1:])


def all_gather_parts(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x``, in group rank order (outside autograd): views of one gathered buffer."""
    return list(stacked_gather(x, group)[0].unbind(0))


def _gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    if _world(group) == 1:
        return x
    return merge_parts(stacked_gather(x, group)[0], dim)


def rank_major(x: torch.Tensor, world: int, dim: int) -> torch.Tensor:
    """``x`` cut into ``world`` chunks along ``dim``, stacked as (world, *chunk) in one contiguous buffer: the
    inverse of ``merge_parts``, and no copy when every dimension before ``dim`` has size 1."""
    return x.unflatten(dim, (world, -1)).movedim(dim, 0).contiguous()


def reduce_scatter_along(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """``x`` summed over ``group``, this rank keeping its 1/world chunk along ``dim`` (outside autograd).

    The chunks are staged rank-major in one buffer for one reduce-scatter (a view when every dimension before
    ``dim`` has size 1), not copied one by one into a list that NCCL copies again into a flat buffer.
    """
    world = _world(group)
    if world == 1:
        return x
    staged = rank_major(x, world, dim)
    out = x.new_empty(staged.shape[1:])
    _reduce_scatter_single(out, staged.flatten(0, 1), group)
    return out


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return reduce_scatter_along(x, group, dim=1)


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def gather_from_sp(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, D) → (B, T, D) forward; reduce-scatter of the gradient backward."""
    return _GatherFromSP.apply(x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    """Partial (B, T, D) summed over ranks, this rank keeping (B, T/tp, D); all-gather backward."""
    return _ReduceScatterToSP.apply(x, group)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T/tp, ...) → (B, T, ...) by a plain all-gather, outside autograd: for hooks that see sequence slices."""
    return _gather_seq(x, group)
