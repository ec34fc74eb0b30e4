"""Row-wise cross-entropy over a chunk of logits, in place: the fused loss's inner step as two kernels.

``megascale.model.head_loss`` computes, a chunk of tokens at a time, the logits
x·Wᵀ, their per-token log-sum-exp and target logit, the loss, and the logits'
gradient (softmax − one-hot) · factor, which it multiplies into dx and dW. In
PyTorch that inner step is about eight passes over the chunk's logits in fp32
(cast, log-sum-exp, subtract, exp, scatter, scale, cast back). Here it is two
passes over them in their own dtype (bf16 in training):

* ``row_stats(logits, targets, vocab_start)`` → (lse, target_logit), fp32 per
  row: one read (online max and sum of exponentials per lane, combined at the
  end), plus one element for the target;
* ``softmax_grad_(logits, targets, lse, factors, vocab_start)``: one read and one
  write, in place, of (exp(x − lse) − [column = target]) · factor.

Between the two, a vocabulary-parallel caller combines each rank's partial
log-sum-exp and target logit across ranks (head_loss does that with one
all-gather), so the gradient kernel gets the global log-sum-exp. ``vocab_start``
is the global id of the local column 0; a target outside [vocab_start,
vocab_start + columns) is another rank's: its target logit reads 0 and no
column gets the −1.

Both accumulate in fp32; the gradient is rounded once, to the logits' dtype.
The PyTorch references are ``row_stats_reference`` / ``softmax_grad_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import next_pow2

INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels
DTYPES = (torch.float32, torch.bfloat16, torch.float16)



@triton.jit
def _row_stats_kernel(LOGITS, stride_row, TARGETS, LSE, TARGET_LOGIT, n_cols, vocab_start, BLOCK: tl.constexpr):
    """One program = one row: its log-sum-exp and its target logit (0 when the target is another rank's)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    m = tl.full([BLOCK], -1.0e30, tl.float32)  # per-lane running max; finite, so x − m_new is never inf − inf
    s = tl.zeros([BLOCK], tl.float32)  # per-lane Σ exp(x − m)
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)  # m starts finite: no inf − inf
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))  # lanes that saw only padding: s = 0
    local = tl.load(TARGETS + row) - vocab_start
    inside = (local >= 0) & (local < n_cols)
    target = tl.load(base + tl.where(inside, local, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(TARGET_LOGIT + row, tl.where(inside, target, 0.0))


@triton.jit
def _softmax_grad_kernel(LOGITS, stride_row, TARGETS, LSE, FACTORS, n_cols, vocab_start, BLOCK: tl.constexpr):
    """One program = one row, in place: (exp(x − lse) − one-hot) · factor, rounded once to the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    lse = tl.load(LSE + row)
    factor = tl.load(FACTORS + row)
    local = tl.load(TARGETS + row) - vocab_start  # outside [0, n_cols) for another rank's target: no −1 here
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(base + cols, (g * factor).to(LOGITS.dtype.element_ty), mask=mask)


def unsupported_reason(logits: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs, or None."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        return f"need logits (rows, columns) and targets (rows,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
    if logits.dtype not in DTYPES:
        return f"logits dtype {logits.dtype} is not one of float32, bfloat16, float16"
    if logits.stride(1) != 1:
        return "logits columns must be contiguous (stride 1)"
    if not (logits.is_cuda or (INTERPRET and logits.device.type == "cpu")):
        return f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {logits.device}"
    if targets.device != logits.device:
        return f"targets on {targets.device}, logits on {logits.device}"
    return None


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    reason = unsupported_reason(logits, targets)
    if reason is not None:
        raise ValueError(f"cross_entropy kernel: {reason}")


def _block(n_cols: int) -> int:
    return 16 if INTERPRET else min(4096, next_pow2(n_cols))  # tiny tiles in tests: several per row


def row_stats(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit) per row, fp32, over this rank's columns; targets are global ids."""
    _check(logits, targets)
    rows, cols = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    if rows:
        _row_stats_kernel[(rows,)](logits, logits.stride(0), targets, lse, target_logit, cols, vocab_start,
                                   BLOCK=_block(cols), num_warps=1 if INTERPRET else 8)
    return lse, target_logit


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor,
                  vocab_start: int = 0) -> torch.Tensor:
    """Overwrite ``logits`` with (softmax − one-hot) · factor per row (lse: the global log-sum-exp); returns it."""
    _check(logits, targets)
    rows, cols = logits.shape
    if lse.shape != (rows,) or factors.shape != (rows,):
        raise ValueError(f"cross_entropy kernel: lse {tuple(lse.shape)} and factors {tuple(factors.shape)} "
                         f"must both be ({rows},)")
    if rows:
        _softmax_grad_kernel[(rows,)](logits, logits.stride(0), targets, lse.float().contiguous(),
                                      factors.float().contiguous(), cols, vocab_start,
                                      BLOCK=_block(cols), num_warps=1 if INTERPRET else 8)
    return logits


def row_stats_reference(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0):
    x = logits.float()
    local = targets - vocab_start
    inside = (local >= 0) & (local < x.shape[1])
    target = x.gather(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(x, dim=1), torch.where(inside, target, torch.zeros_like(target))


def softmax_grad_reference(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, factors: torch.Tensor,
                           vocab_start: int = 0) -> torch.Tensor:
    x = logits.float()
    g = (x - lse.float().unsqueeze(1)).exp()
    local = targets - vocab_start
    inside = (local >= 0) & (local < x.shape[1])
    g.scatter_add_(1, local.clamp(0, x.shape[1] - 1).unsqueeze(1), -inside.float().unsqueeze(1))
    return (g * factors.float().unsqueeze(1)).to(logits.dtype)
