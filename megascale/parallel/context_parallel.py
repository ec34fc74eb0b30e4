"""Context parallelism: the cp ranks of a group each hold 1/cp of every sequence's tokens.

Every layer outside attention is token-wise, so each rank runs it on its own
tokens alone; only attention needs the rest of the sequence. Each rank's keys
and values are all-gathered over the group before attention (backward: their
gradients are reduce-scattered back), and the rank's queries attend to the
gathered keys with the causal mask of their global positions. This is the
all-gather form Llama 3 trained with (Dubey et al. 2024, §3.3.2) rather than
Megatron-Core's ring of point-to-point sends: with grouped-query attention the
keys and values are a fraction of the activations, one collective per layer
moves them, and any attention kernel that takes a causal mask aligned to the
bottom right serves it.

Load balance (the "zigzag" split): a causal sequence cut into 2·cp chunks gives
rank r chunks r and 2·cp-1-r, so every rank's queries see the same number of
keys in total: cp + 1/2 chunks' worth, where contiguous slices would give the
last rank 2·cp - 1 times the first's work.

Gradients: each rank's loss is the mean over its tokens; the cp ranks are
data-parallel peers for the weights (megascale.parallel.topology), so the
engine's average over dp × cp ranks is the gradient of the mean over every
token, as on one rank.

Packed fine-tuning rows: each rank's queries take their rows of the block-diagonal
causal mask (same example, not in the future, by global position) against the
gathered keys, and the weighted loss is rescaled by the rank's share of the
weights (``loss_share``), as the shares of a row weigh differently.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megascale.model.attention import attention
from megascale.parallel.mappings import all_gather_parts, reduce_scatter_along

SEQ_DIM = 2  # of (B, heads, T, head_dim)


@dataclass(frozen=True, eq=False)
class ContextParallel:
    """This rank's place in its context-parallel group, and the operations that depend on it."""

    group: Any
    size: int
    rank: int

    @property
    def chunks(self) -> tuple[int, int]:
        """The two chunks of the 2·cp a sequence is cut into that this rank holds, in the order it holds them."""
        return self.rank, 2 * self.size - 1 - self.rank

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``x`` (the sequence along ``dim``, a multiple of 2·cp long)."""
        parts = x.chunk(2 * self.size, dim=dim)
        first, second = self.chunks
        return torch.cat([parts[first], parts[second]], dim=dim)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global positions (local_len,) of this rank's tokens: RoPE must see where they sit in the sequence."""
        c = local_len // 2
        first, second = self.chunks
        return torch.cat([torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)]).to(device)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "torch",
                  softmax_scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this rank's queries over the whole sequence.

        q: (B, nh, T/cp, hd), k and v: (B, nkv, T/cp, hd), this rank's two chunks each; ``mask``: None
        (causal) or this rank's rows of the whole sequence's boolean mask, (B, 1, T/cp, T), from
        ``document_mask`` (packed fine-tuning rows). Returns (B, nh, T/cp, hd) as the 1-rank
        attention's rows at this rank's positions.
        """
        keys, values = _GatherContext.apply(k, self), _GatherContext.apply(v, self)  # (B, nkv, T, hd), in order
        if mask is not None:
            return attention(q, keys, values, backend=backend, softmax_scale=softmax_scale, mask=mask)
        return self.attend(q, keys, values, backend, softmax_scale)

    def document_mask(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """This rank's rows (B, 1, T/cp, T) of packed rows' block-diagonal causal mask, from its doc_ids (B, T/cp)."""
        return self.mask_rows(doc_ids, self.gather_sequence(doc_ids))

    def mask_rows(self, doc_ids: torch.Tensor, all_doc_ids: torch.Tensor) -> torch.Tensor:
        """Same document and not in the future, by global position: this rank's queries (doc_ids, (B, T/cp))
        against every key of the sequence (all_doc_ids, (B, T) in sequence order)."""
        mine = self.positions(doc_ids.shape[1], doc_ids.device)  # (T/cp,)
        causal = mine.unsqueeze(1) >= torch.arange(all_doc_ids.shape[1], device=doc_ids.device)  # (T/cp, T)
        same = doc_ids.unsqueeze(2) == all_doc_ids.unsqueeze(1)  # (B, T/cp, T)
        return (same & causal).unsqueeze(1)

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's share of ``x`` (no gradient: ids) → the whole sequence along ``dim``, in order."""
        return self.to_sequence_order(all_gather_parts(x, self.group), dim)

    def loss_share(self, weights: torch.Tensor) -> torch.Tensor:
        """The factor that turns this rank's weighted mean loss into its share of the sequences' one.

        A weighted loss is Σ w·ce / Σ w over the micro-batch; this rank sees its own tokens'
        weights only, and its shares of Σ w differ from its peers' (a query weighs 0, a trace
        its weight). Rank r's mean times cp · W_r / W (W_r its Σ w, W the group's) is
        cp · Σ_r w·ce / W, and the dp × cp average of the engine then gives the 1-rank loss.
        """
        mine = weights.detach().float().sum()
        total = mine.clone()
        dist.all_reduce(total, group=self.group)
        return self.size * mine / total.clamp(min=torch.finfo(torch.float32).tiny)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, backend: str = "torch",
               softmax_scale: float | None = None) -> torch.Tensor:
        """This rank's queries (B, nh, T/cp, hd) over the whole sequence's keys and values (B, nkv, T, hd)."""
        c = q.shape[SEQ_DIM] // 2
        out = []
        for half, chunk in enumerate(self.chunks):
            visible = (chunk + 1) * c  # the chunk's queries see every key up to its own last position
            rows = q[:, :, half * c:(half + 1) * c]
            out.append(_bottom_right_causal(rows, keys[:, :, :visible], values[:, :, :visible], backend, softmax_scale))
        return torch.cat(out, dim=SEQ_DIM)

    # -------------------------------------------------- zigzag order <-> sequence order

    def to_sequence_order(self, parts: list[torch.Tensor], dim: int = SEQ_DIM) -> torch.Tensor:
        """Every rank's (..., 2c, ...) along ``dim``, in rank order → the whole sequence in order."""
        n = 2 * self.size
        halves = [p.chunk(2, dim=dim) for p in parts]
        ordered = [halves[j][0] if j < self.size else halves[n - 1 - j][1] for j in range(n)]
        return torch.cat(ordered, dim=dim)

    def to_rank_order(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: the whole sequence → every rank's two chunks, rank after rank."""
        n = 2 * self.size
        chunks = x.chunk(n, dim=SEQ_DIM)
        return torch.cat([chunks[j] for r in range(self.size) for j in (r, n - 1 - r)], dim=SEQ_DIM)


def _bottom_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                         softmax_scale: float | None) -> torch.Tensor:
    """Query i of C sees keys 0..S-C+i of S: the last C keys are the queries' own positions."""
    C, S = q.shape[SEQ_DIM], k.shape[SEQ_DIM]
    if C == S:  # the first chunk: plain causal attention, through the configured backend
        return attention(q, k, v, causal=True, backend=backend, softmax_scale=softmax_scale)
    # SDPA picks flash or memory-efficient attention for a bottom-right causal bias on CUDA
    # (no mask in memory); elsewhere it materialises the (C, S) mask. Imported here: the bias
    # module imports torch._dynamo and Triton, which must not load before a test sets TRITON_INTERPRET.
    from torch.nn.attention.bias import causal_lower_right  # noqa: PLC0415

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(C, S), scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class _GatherContext(torch.autograd.Function):
    """(B, h, T/cp, hd) this rank's chunks → (B, h, T, hd) the whole sequence; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x, cp: ContextParallel):
        ctx.cp = cp
        return cp.to_sequence_order(all_gather_parts(x, cp.group))

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        # Every rank's queries read every rank's keys: the gradient of a key sums over ranks.
        return reduce_scatter_along(cp.to_rank_order(grad.contiguous()), cp.group, dim=SEQ_DIM), None


def apply_context_parallel(model: nn.Module, cp: ContextParallel | None) -> nn.Module:
    """Make ``model`` (a megascale Transformer, before the pipeline split) compute on this rank's tokens."""
    if cp is None or cp.size == 1:
        return model
    model.context = cp
    for block in model.blocks.values():
        block.attn.context = cp
    return model


@contextmanager
def context_parallel_off(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` on whole sequences (generation: one-token steps and prompts of any length).

    The weights are the same; each rank then computes every token itself, with no
    collective over the context-parallel group. A no-op without context parallelism.
    """
    switched = [(m, m.context) for m in model.modules() if getattr(m, "context", None) is not None]
    for m, _ in switched:
        m.context = None
    try:
        yield model
    finally:
        for m, cp in switched:
            m.context = cp
