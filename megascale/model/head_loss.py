"""The LM head and the cross-entropy in one op, chunked over tokens: full logits never exist.

The plain path keeps (N, V) logits for backward — in bf16, plus an fp32 copy and
the softmax: ≈ 10·V bytes per token, 20 GB for a micro-batch of 16k tokens at a
32k vocabulary, more than the rest of a 1B model's activations. Here the head
matmul, the log-sum-exp, the loss and both gradients are computed a chunk of
tokens at a time, in the forward (Liger-Kernel's and Apple's cut-cross-entropy
idea, read from their descriptions): what backward needs is then only dx (N, D)
and dW (V, D), which it scales by the incoming gradient. FLOPs are those of the
plain path (one matmul forward, two for the gradients); nothing is recomputed.

``backend="triton"`` (``model.fused_ops=triton``) runs each chunk's log-sum-exp,
target logit and logit gradient as two row-wise kernels over the logits in their
own dtype, in place (``megascale.kernels.cross_entropy``), instead of PyTorch's
passes over an fp32 copy; the matmuls are the same.

Tensor parallelism (vocabulary split over ranks): each rank holds (N_c, V/tp)
logits of a chunk; the per-token log-sum-exp and the target logit are combined
across ranks with one all-gather of 2·N_c floats per chunk, so the softmax is
exact and no rank ever holds another's logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# fp32 logits per chunk (elements): 128 M = 512 MiB, about 3× that with the softmax
# temporaries. On an H200 (BENCHMARKS.md: d 2048, vocabulary 32000, bf16, 8-16 k tokens)
# 4096-token chunks (this budget) ran the loss 1.23-1.35× faster than 1024-token ones
# (the earlier 32 M budget), for 0.3-1.1 GB more peak memory; 16384-token chunks gained
# a further 4-10% for 0.1-2.5 GB more.
CHUNK_ELEMENTS = 1 << 27
MIN_CHUNK_TOKENS = 64


def auto_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk for ``vocab_local`` logits per token: the CHUNK_ELEMENTS budget, a multiple of 64."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_local // 64 * 64)


def token_weights(targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token factors (N,) fp32 whose weighted sum of token losses is the loss: 1/N, or w / Σw (0 when Σw = 0)."""
    n = targets.numel()
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float32, device=targets.device)
    w = weights.reshape(-1).float()
    return w / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, *, chunk_tokens: int = 0,
                         vocab_start: int = 0, group=None, backend: str = "torch") -> torch.Tensor:
    """Mean cross-entropy of logits x·Wᵀ against ``targets``, or Σ w·ce / Σ w with per-token ``weights``.

    x (..., D); weight (V_local, D), the rows [vocab_start, vocab_start + V_local) of the
    head, split over ``group`` (None: the whole vocabulary here); targets (...,) global
    token ids; weights (...,) optional. chunk_tokens: tokens per chunk, 0 = auto.
    backend: "torch", or "triton" for the row-wise kernels (CUDA; CPU under TRITON_INTERPRET=1).
    """
    flat = x.reshape(-1, x.shape[-1])
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    tp_group = group if group is not None and dist.get_world_size(group) > 1 else None
    kernels = _row_kernels() if backend == "triton" else None
    return _LinearCrossEntropy.apply(flat, weight, targets.reshape(-1), token_weights(targets, weights),
                                     vocab_start, tp_group, chunk, torch.is_grad_enabled(), kernels)


def _row_kernels():
    from megascale.kernels import cross_entropy  # noqa: PLC0415 (imports triton)

    return cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, factors, vocab_start, group, chunk, grad_enabled, kernels):
        # needs_input_grad ignores no_grad mode (evaluation): the caller's grad mode says whether backward will come.
        want_dx, want_dw = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        # fp16 gradients unscaled by the loss scale would underflow: keep them in fp32 until backward.
        grad_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        dx = torch.empty(x.shape, dtype=grad_dtype, device=x.device) if want_dx else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_dw else None
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            xc, fc, tc = x[s:s + chunk], factors[s:s + chunk], targets[s:s + chunk]
            if kernels is None:
                logits = (xc @ weight.t()).float()  # (n, V_local): the only logits alive at a time
                lse, target_logit, local_t, inside = _chunk_stats(logits, tc, vocab_start, group)
            else:
                logits = xc @ weight.t()  # in x's dtype: the kernels read it as is and write the gradient over it
                lse, target_logit = _combine(*kernels.row_stats(logits, tc, vocab_start), group)
            loss += ((lse - target_logit) * fc).sum()
            if want_dx or want_dw:
                if kernels is None:
                    g = _logit_grad(logits, lse, local_t, inside, fc).to(x.dtype)  # d loss / d logits
                else:
                    g = kernels.softmax_grad_(logits, tc, lse, fc, vocab_start)
                if want_dx:
                    dx[s:s + chunk] = g @ weight
                if want_dw:
                    dw.add_(g.t() @ xc)  # widened inside the add: no fp32 copy of the (V, D) product
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.grads = (dx, dw if dw is None or x.dtype == torch.float16 else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad):
        (dx, dw), ctx.grads = ctx.grads, None
        dx = None if dx is None else (dx * grad).to(ctx.dtypes[0])
        dw = None if dw is None else (dw * grad).to(ctx.dtypes[1])
        return dx, dw, None, None, None, None, None, None, None


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group):
    """Per-token log-sum-exp and target logit over the whole vocabulary, for a chunk's local logits.

    Returns (lse, target_logit, local target index, whether the target is in this rank's rows).
    """
    rows = logits.shape[-1]
    inside = (targets >= vocab_start) & (targets < vocab_start + rows)
    local_t = (targets - vocab_start).masked_fill(~inside, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
    return (*_combine(lse, target_logit, group), local_t, inside)


def _combine(lse: torch.Tensor, target_logit: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole vocabulary's log-sum-exp and target logit from each rank's partial ones (no group: as given)."""
    if group is None:
        return lse, target_logit
    parts = [torch.empty(2, lse.shape[0], dtype=lse.dtype, device=lse.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, torch.stack([lse, target_logit]), group=group)
    every = torch.stack(parts)  # (tp, 2, n): each rank's partial log-sum-exp and (at most one nonzero) target logit
    return torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(0)


def _logit_grad(logits: torch.Tensor, lse: torch.Tensor, local_t: torch.Tensor, inside: torch.Tensor,
                factors: torch.Tensor) -> torch.Tensor:
    """(softmax − one-hot) · factor, in place over ``logits`` (fp32).

    The one-hot is a scatter of −1 (0 where the target is another rank's): no
    boolean indexing, which would read a count back to the host on a GPU.
    """
    g = logits.sub_(lse.unsqueeze(-1)).exp_()
    g.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
    return g.mul_(factors.unsqueeze(-1))
