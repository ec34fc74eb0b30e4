"""Megatron-style tensor parallelism, applied to a plain ``Transformer`` from outside.

``apply_tensor_parallel(model, group)`` swaps modules in place:

* attention q/k/v and MLP gate/up → ``ColumnParallelLinear`` (output features split:
  whole heads per rank, so attention runs locally on n_heads/tp query heads and
  n_kv_heads/tp KV heads — GQA groups never straddle ranks); with more ranks than
  KV heads (tp a multiple of n_kv_heads) k/v → ``ReplicatedKVLinear``: each rank
  holds the one KV head its query heads read, shared with tp/n_kv_heads - 1 others.
  The projections of one input share one ``ParallelInput`` (the block's
  ``proj_input``): one all-gather under sequence parallelism (one reduce-scatter of
  the summed gradient in backward), or one all-reduce of it without, per attention
  and per MLP, as Megatron's fused QKV and gate-up linears have, not one per matrix;
* attention o_proj and MLP down → ``RowParallelLinear`` (input features split,
  partial outputs all-reduced);
* the embedding → ``VocabParallelEmbedding`` (rows split by vocabulary range);
* the LM head → ``VocabParallelLMHead``, a column-parallel linear over the vocabulary
  with no gather whose fused chunked loss (``train.fused_loss``) or the unfused
  ``VocabParallelCrossEntropy`` never holds full-vocabulary logits on one rank.

Each new layer is cut from the dense layer: from its weights when it has them, so a
tp=N model starts from exactly the weights of the 1-rank model (what equivalence
tests need); from its shape on the ``meta`` device, where the shard remembers which
chunk it is and ``megascale.model.init.materialize`` draws just that chunk of the
same full tensor.
Sharded parameters carry ``tensor_model_parallel = True`` so DeepSpeed counts
them once per shard and replicated ones (norms) once in the gradient norm.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megascale.model.head_loss import linear_cross_entropy, token_weights
from megascale.model.init import carry_init
from megascale.model.llama import RMSNorm
from megascale.model.ops import rms_norm
from megascale.parallel.topology import kv_replicas
from megascale.parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, merge_parts, reduce_from_tp,
                                         reduce_scatter_to_sp, stacked_gather)


def _shard(weight: nn.Parameter, dim: int, group) -> nn.Parameter:
    """This rank's chunk of ``weight`` along ``dim`` as a new parameter, marked tensor-parallel.

    On the meta device it is a shape only; it keeps ``weight``'s init spec and learns
    which chunk it is, so ``megascale.model.init.materialize`` can draw it later.
    """
    return _chunk(weight, dim, dist.get_rank(group), dist.get_world_size(group))


def _chunk(weight: nn.Parameter, dim: int, index: int, count: int) -> nn.Parameter:
    p = nn.Parameter(weight.detach().chunk(count, dim=dim)[index].clone())
    p.tensor_model_parallel = True
    return carry_init(weight, p, dim, index, count)


def whole_input(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    """A column-parallel layer's input made whole: all-gathered from (B, T/tp, D) under sequence parallelism
    (backward: reduce-scatter), else already whole (backward: all-reduce, ``copy_to_tp``)."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


class _Regather:
    """A sequence-parallel input made whole again in backward, once for all the projections that read it.

    Each projection's forward registers as a user; the first backward all-gathers the saved slice
    (asynchronously, while it computes its input gradient), the others reuse that, and the last one
    drops it, so the whole input lives only while its projections' weight gradients are computed.
    """

    def __init__(self, group):
        self.group, self.users = group, 0
        self.stacked: torch.Tensor | None = None
        self.work = None
        self.whole: torch.Tensor | None = None

    def start(self, x_local: torch.Tensor) -> None:
        """Begin gathering ``x_local`` (B, T/tp, in) unless an earlier user has."""
        if self.stacked is None and self.whole is None:
            self.stacked, self.work = stacked_gather(x_local, self.group, async_op=True)

    def take(self) -> torch.Tensor:
        """The whole (B, T, in) input, for one user; freed here after the last."""
        if self.whole is None:
            self.work.wait()
            self.whole, self.stacked, self.work = merge_parts(self.stacked, 1), None, None
        whole = self.whole
        self.users -= 1
        if self.users == 0:
            self.whole = None
        return whole


class _RegatheredLinear(torch.autograd.Function):
    """y = x Wᵀ on the gathered input, keeping for backward this rank's (B, T/tp, in) slice, not the whole.

    Megatron's sequence-parallel linears do the same: the weight gradient needs the whole input, and
    gathering it again in backward costs one all-gather per attention and per MLP (overlapped with the
    input-gradient matmul) where keeping it costs (1 - 1/tp) of two d-wide activations per token and layer.
    ``x_local`` goes through ``save_for_backward`` so activation checkpointing drops and rebuilds it.
    """

    @staticmethod
    def forward(ctx, x, weight, x_local, regather):
        ctx.save_for_backward(x_local, weight)
        ctx.regather = regather
        regather.users += 1
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x_local, weight = ctx.saved_tensors
        ctx.regather.start(x_local)
        grad_x = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        whole = ctx.regather.take()
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ whole.reshape(-1, whole.shape[-1]).to(grad.dtype)
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None


class ParallelInput(nn.Module):
    """The input of column-parallel projections, made whole (``whole_input``) once for all of them: backward
    then reduces the gradient the projections summed, once.

    Under sequence parallelism it also remembers (weakly) the slice it gathered, so the projections, given its
    ``gathered`` record as ``shared_input``, keep that slice for backward instead of the whole input.
    """

    def __init__(self, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.gathered = GatheredInput(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = whole_input(x, self.group, self.sequence_parallel)
        if self.sequence_parallel and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self.gathered.record(x, whole)
        return whole


class GatheredInput:
    """What a ``ParallelInput`` gathered last: weak references to the slice and the whole tensor, and the
    ``_Regather`` its projections share. Weak, so the module holds no activation past its forward."""

    def __init__(self, group):
        self.group = group
        self._local = self._whole = None
        self._regather: _Regather | None = None

    def record(self, x_local: torch.Tensor, whole: torch.Tensor) -> None:
        self._local, self._whole, self._regather = weakref.ref(x_local), weakref.ref(whole), _Regather(self.group)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x Wᵀ, keeping the slice for backward when ``x`` is the whole tensor gathered last.

        Not in a compiled block: Dynamo cannot trace the state the projections share (it would break the
        block's graph at each projection), so compiled blocks keep the whole input, as before.
        """
        mine = not torch.compiler.is_compiling() and self._whole is not None and self._whole() is x
        local = self._local() if mine else None
        return F.linear(x, weight) if local is None else _RegatheredLinear.apply(x, weight, local, self._regather)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ with W split by output features (rows).

    With sequence parallelism the input arrives as (B, T/tp, D) and is all-gathered, unless
    ``shared_input`` is given: the ``GatheredInput`` of a ``ParallelInput`` before it that made it whole
    already (and under sequence parallelism lets backward gather it again, not keep it whole).
    """

    def __init__(self, dense: nn.Linear, group, sequence_parallel: bool = False,
                 shared_input: GatheredInput | None = None):
        super().__init__()
        self.group, self.sequence_parallel, self.shared_input = group, sequence_parallel, shared_input
        self.weight = _shard(dense.weight, 0, group)  # (out/tp, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self, x, self.weight)


def _project(m: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A column-parallel projection of ``x`` by ``weight``: the input made whole here or by its ParallelInput."""
    if m.shared_input is None:
        return F.linear(whole_input(x, m.group, m.sequence_parallel), weight)
    return m.shared_input.linear(x, weight)


class ReplicatedKVLinear(nn.Module):
    """k or v projection when tp exceeds the KV heads: this rank's KV head, one of r = tp / n_kv_heads copies.

    Rank t's query heads (t·nh/tp onwards) all read KV head t // r, so the weight is
    chunk t // r of n_kv_heads along the output features, the same on the r ranks of
    ``kv_group``. Each copy's gradient holds only its own query heads' share: summed
    over the group in backward (``copy_to_tp`` on the weight: identity forward,
    all-reduce backward), every copy gets the whole gradient and steps alike, so the
    copies stay equal, as tied weights do. DeepSpeed counts a tensor-parallel weight
    once per rank in the gradient norm and any other weight on tensor rank 0 alone:
    marking the group's first copy tensor-parallel and the others not counts each
    head once (the first copy of head 0 is on tensor rank 0).
    """

    def __init__(self, dense: nn.Linear, group, kv_group, sequence_parallel: bool = False,
                 shared_input: GatheredInput | None = None):
        super().__init__()
        self.group, self.kv_group, self.sequence_parallel, self.shared_input = group, kv_group, sequence_parallel, shared_input
        tp, rank, r = dist.get_world_size(group), dist.get_rank(group), dist.get_world_size(kv_group)
        self.weight = _chunk(dense.weight, 0, rank // r, tp // r)  # (head_dim, in)
        self.weight.tensor_model_parallel = rank % r == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _project(self, x, copy_to_tp(self.weight, self.kv_group))


class VocabParallelLMHead(ColumnParallelLinear):
    """The LM head split by vocabulary rows; given targets, the fused chunked loss over the shards.

    Logits stay split (no gather): ``linear_cross_entropy`` combines each chunk's
    per-rank log-sum-exp and target logit with one small all-gather.
    """

    def __init__(self, dense: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__(dense, group, sequence_parallel)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]
        self.chunk_tokens = getattr(dense, "chunk_tokens", 0)
        self.ops = getattr(dense, "ops", "torch")

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        x = whole_input(x, self.group, self.sequence_parallel)
        return linear_cross_entropy(x, self.weight, targets, weights, chunk_tokens=self.chunk_tokens,
                                    vocab_start=self.vocab_start, group=self.group, backend=self.ops)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_local W_localᵀ with W split by input features (columns).

    With sequence parallelism the sum is reduce-scattered to (B, T/tp, D).
    """

    def __init__(self, dense: nn.Linear, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _shard(dense.weight, 1, group)  # (out, in/tp)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        y = F.linear(x_local, self.weight)
        return reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, end) of the vocabulary; other tokens contribute zeros."""

    def __init__(self, dense: nn.Embedding, group, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _shard(dense.weight, 0, group)  # (V/tp, D)
        rows = self.weight.shape[0]
        self.start = dist.get_rank(group) * rows
        self.end = self.start + rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, D) partial
        return reduce_scatter_to_sp(x, self.group) if self.sequence_parallel else reduce_from_tp(x, self.group)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over a (B, T/tp, D) sequence slice.

    Each rank sees only its slice, so the weight's gradient is a partial sum: the
    weight enters through ``copy_to_tp`` (identity forward, all-reduce backward),
    which hands every rank the full gradient before DeepSpeed reads it.
    """

    def __init__(self, norm: RMSNorm, group):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.group = group
        self.weight = norm.weight
        self.ops = norm.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, copy_to_tp(self.weight, self.group), self.eps, self.ops)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, without gathering them.

    loss_t = log Σ_v exp(z_tv) − z_t,target: the max and the sum of exponentials
    are all-reduced (MAX, SUM), the target logit is summed from the one rank that
    holds it. Backward: softmax − one_hot, computed locally.

    ``norm_weights`` (N,), optional: per-token weights already divided by their sum
    (trace fine-tuning); the loss is then Σ_t norm_w_t · loss_t instead of the mean.
    """

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, norm_weights=None):
        logits = logits.float()  # (N, V/tp)
        z_max = logits.max(dim=-1).values
        dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - z_max.unsqueeze(-1)
        rows = shifted.shape[-1]
        outside = (targets < vocab_start) | (targets >= vocab_start + rows)
        local_t = (targets - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(target_logit, group=group)
        dist.all_reduce(sum_exp, group=group)
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_t, outside, norm_weights)
        if norm_weights is None:
            return (sum_exp.log() - target_logit).mean()
        return ((sum_exp.log() - target_logit) * norm_weights).sum()

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, outside, norm_weights = ctx.saved_tensors
        # One-hot as a scatter (0 where another rank holds the target): no host read of a count.
        g = softmax.clone().scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).to(softmax.dtype).unsqueeze(-1))
        if norm_weights is None:
            return g * (grad / softmax.shape[0]), None, None, None, None
        return g * (grad * norm_weights).unsqueeze(-1), None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    def __init__(self, vocab_size: int, group):
        super().__init__()
        self.group = group
        self.vocab_start = dist.get_rank(group) * (vocab_size // dist.get_world_size(group))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy, or Σ w·ce / Σ w with per-token ``weights`` (as the dense CrossEntropy)."""
        flat = logits.reshape(-1, logits.size(-1))  # (B*T, V/tp)
        norm = None if weights is None else token_weights(targets, weights)  # the same on every TP rank
        return _VocabParallelCE.apply(flat, targets.reshape(-1), self.vocab_start, self.group, norm)


class GatherLogits(nn.Module):
    """Full-vocabulary logits for generation and evaluation with logits."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return gather_from_tp(logits, self.group)


def apply_tensor_parallel(model: nn.Module, group, sequence_parallel: bool = False, kv_group=None) -> nn.Module:
    """Shard ``model`` (a megascale Transformer) over ``group`` in place; returns it.

    sequence_parallel: norms and residuals hold (B, T/tp, D) slices (T must divide by tp).
    kv_group: with tp > n_kv_heads, the ranks of ``group`` that hold this rank's KV head
    (``ParallelGroups.kv_group``).
    """
    tp = dist.get_world_size(group)
    if tp == 1:
        return model
    sp = sequence_parallel
    replicated = kv_replicas(tp, model.cfg.kv_heads) > 1
    if replicated and kv_group is None:
        raise ValueError(f"tp={tp} exceeds n_kv_heads={model.cfg.kv_heads}: pass the KV-head group (ParallelGroups.kv_group)")
    for block in model.blocks.values():
        attn, mlp = block.attn, block.mlp
        attn.proj_input, mlp.proj_input = ParallelInput(group, sp), ParallelInput(group, sp)
        qkv, gate_up = attn.proj_input.gathered, mlp.proj_input.gathered
        attn.q_proj = ColumnParallelLinear(attn.q_proj, group, sp, shared_input=qkv)
        if replicated:
            attn.k_proj, attn.v_proj = (ReplicatedKVLinear(m, group, kv_group, sp, shared_input=qkv)
                                        for m in (attn.k_proj, attn.v_proj))
        else:
            attn.k_proj, attn.v_proj = (ColumnParallelLinear(m, group, sp, shared_input=qkv) for m in (attn.k_proj, attn.v_proj))
        attn.o_proj = RowParallelLinear(attn.o_proj, group, sp)
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, max(1, attn.n_kv_heads // tp)
        mlp.gate_proj, mlp.up_proj = (ColumnParallelLinear(m, group, sp, shared_input=gate_up)
                                      for m in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = RowParallelLinear(mlp.down_proj, group, sp)
        if sp:
            block.input_norm = SequenceParallelRMSNorm(block.input_norm, group)
            block.post_attn_norm = SequenceParallelRMSNorm(block.post_attn_norm, group)
    if sp:
        model.norm = SequenceParallelRMSNorm(model.norm, group)
    tied = model.cfg.tie_embeddings
    model.embed = VocabParallelEmbedding(model.embed, group, sp)
    model.lm_head = VocabParallelLMHead(model.lm_head, group, sp)  # gathers the sequence back under SP
    if tied:
        model.lm_head.weight = model.embed.weight  # the same vocabulary rows on this rank
    model.loss_fn = VocabParallelCrossEntropy(model.cfg.vocab_size, group)
    model.full_logits = GatherLogits(group)
    return model


@contextmanager
def sequence_parallel_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` on whole sequences inside the block, under sequence parallelism too.

    Generation's one-token steps and prompts of any length cannot be cut into T/tp
    slices. The weights are the same either way; only the collectives around them
    change (all-reduces where there were reduce-scatters and all-gathers), so the
    model computes the same function. A no-op without sequence parallelism.
    """
    switched = [m for m in model.modules() if getattr(m, "sequence_parallel", False)]
    for m in switched:
        m.sequence_parallel = False
    try:
        yield model
    finally:
        for m in switched:
            m.sequence_parallel = True
