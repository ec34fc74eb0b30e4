"""The row-wise cross-entropy kernels (kernels/cross_entropy.py) against their PyTorch references.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set before
the kernel module is imported) with 16-column tiles, so odd widths cross several
tiles and end in a partial one; with CUDA the same tests add a training shape
(a 32k vocabulary). Then the fused loss with ``backend="triton"`` against its
``torch`` path: loss and both gradients, whole vocabulary and split over ranks.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from megascale.kernels.cross_entropy import (  # noqa: E402
    row_stats,
    row_stats_reference,
    softmax_grad_,
    softmax_grad_reference,
    unsupported_reason,
)
from megascale.model.head_loss import linear_cross_entropy  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(1, 1), (3, 16), (5, 37), (9, 100)] + ([(512, 32000), (7, 50257)] if CUDA else [])
# (atol, rtol) of the gradient, by dtype: one rounding of values in [-1, 1] to the dtype (two for the
# interpreter's truncating bf16 cast); the statistics are fp32 whatever the input.
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _inputs(rows, cols, dtype, seed=0, vocab_start=0, spread=3.0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (spread * torch.randn(rows, cols, generator=gen, device=DEVICE)).to(dtype)
    # Global ids over two ranks' worth of columns: about half the targets are another rank's.
    targets = torch.randint(0, 2 * cols, (rows,), generator=gen, device=DEVICE)
    return logits, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("vocab_start", [0, 1], ids=["rank0", "rank1"])
def test_row_stats_and_grad_match_reference(shape, dtype, vocab_start):
    cols = shape[1]
    logits, targets = _inputs(*shape, dtype)
    start = vocab_start * cols
    lse, target = row_stats(logits, targets, start)
    want_lse, want_target = row_stats_reference(logits, targets, start)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target, want_target, atol=0, rtol=0)  # one element read and widened: exact
    factors = torch.rand(shape[0], device=DEVICE) + 0.5
    want = softmax_grad_reference(logits, targets, want_lse, factors, start)
    got = softmax_grad_(logits.clone(), targets, want_lse, factors, start)
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    # Rows sum to factor · (1 − [target here]): the softmax sums to 1 and the one-hot is only on its rank.
    here = ((targets >= start) & (targets < start + cols)).float()
    torch.testing.assert_close(got.float().sum(1), factors * (1 - here), atol=cols * atol + 1e-4, rtol=1e-2)


def test_grad_is_written_in_place_on_a_row_strided_view():
    base, targets = _inputs(4, 40, torch.float32)
    logits = base[:, :24]  # rows 40 apart, columns contiguous: the head's local slice of a wider buffer
    factors = torch.ones(4, device=DEVICE)
    lse, _ = row_stats(logits, targets)
    want = softmax_grad_reference(logits, targets, lse, factors)
    out = softmax_grad_(logits, targets, lse, factors)
    assert out.data_ptr() == base.data_ptr()
    torch.testing.assert_close(base[:, :24], want, atol=1e-6, rtol=1e-5)


def test_refuses_what_it_cannot_take():
    logits, targets = _inputs(4, 8, torch.float32)
    assert "contiguous" in unsupported_reason(logits.t(), torch.zeros(8, dtype=torch.long, device=DEVICE))
    assert "dtype" in unsupported_reason(logits.double(), targets)
    with pytest.raises(ValueError, match="cross_entropy kernel: need logits"):
        row_stats(logits[0], targets)
    with pytest.raises(ValueError, match=r"must both be \(4,\)"):
        softmax_grad_(logits, targets, torch.zeros(3, device=DEVICE), torch.ones(4, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_fused_loss_with_the_kernels_matches_its_torch_path(dtype, weighted):
    """linear_cross_entropy(backend="triton") against backend="torch": loss, dx and dW, several chunks."""
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    n, d, v = (100, 32, 200) if not CUDA else (4096, 512, 32000)
    x0 = torch.randn(n, d, generator=gen, device=DEVICE).to(dtype)
    w0 = (0.05 * torch.randn(v, d, generator=gen, device=DEVICE)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    weights = torch.rand(n, generator=gen, device=DEVICE) if weighted else None
    results = []
    for backend in ("torch", "triton"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = linear_cross_entropy(x, w, targets, weights, chunk_tokens=48 if not CUDA else 1024, backend=backend)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    (loss_t, dx_t, dw_t), (loss_k, dx_k, dw_k) = results
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-5)
    # The logits' gradient rounds once to the dtype on both paths; dx and dW sum many such terms.
    atol = 1e-6 if dtype == torch.float32 else 2e-2
    for got, want in ((dx_k, dx_t), (dw_k, dw_t)):
        scale = float(want.abs().max())
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol, rtol=0)
