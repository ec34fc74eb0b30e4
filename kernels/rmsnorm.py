"""Fused RMSNorm in Triton: forward and backward, beside its PyTorch reference.

Semantics are exactly those of ``megascale.model.llama.RMSNorm.forward``::

    y = weight * (x.float() * rsqrt(mean(x.float()², -1) + eps)).to(x.dtype)

normalise in fp32, round to x's dtype, then multiply by the weight in the dtype
torch promotes ``weight * x`` to (bf16 · bf16 → bf16, fp32 weight · bf16 x → fp32).
The kernel reproduces both roundings, so on a GPU its output equals the
reference's up to the fp32 summation order of the mean of squares.

Kernels (rows = every leading dimension flattened; one row = ``x.shape[-1]`` values):

* forward: one program per tile of BLOCK_M rows; each row's sum of squares is
  accumulated in fp32. When the row fits one column block (hidden ≤ 8192 on a
  GPU) it is loaded once and stays in registers; wider rows loop over column
  blocks twice (sum of squares, then normalise). The per-row 1/rms (``rstd``,
  fp32) is saved for the backward.
* backward: with x̂ = x · rstd and d x̂ = dy · w,
  ``dx = rstd · (d x̂ − x̂ · mean(d x̂ · x̂))`` and ``dw = Σ_rows dy · round(x̂)``.
  dw is reduced in two deterministic stages, without atomics: a fixed number of
  programs each sum their share of rows into one fp32 row of a (programs, hidden)
  buffer, and torch sums that buffer's few rows. Programs are laid out as
  (row group, column block), so each owns its dw partials outright: no program
  reads what another writes. For wide rows the per-row term mean(d x̂ · x̂) needs
  the whole row first, so it comes from a separate launch (``_rms_bwd_rowdot_kernel``)
  instead of a read-after-write inside one program.

The backward computes in fp32 without the reference's intermediate roundings
(it rounds dy · w to x's dtype before the normalisation's backward), so it is
slightly more accurate than the reference; the tests allow for the difference.

Layout: rows need unit stride along the hidden dimension; any row stride is
passed to the kernel as is. Inputs whose last dimension is not unit-stride (or
whose leading dimensions do not flatten to one stride) are copied with
``.contiguous()`` first. Outputs are contiguous, shaped like x.

Runs on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was imported (the tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels

# Widest row kept in registers as one column block on a GPU: 8192 fp32 values over
# 16 warps is 16 per thread. Wider rows loop over blocks of this many columns.
_GPU_MAX_BLOCK = 8192
_GPU_TILE_VALUES = 4096  # rows per program = this / columns per block (several rows when hidden is small)
_GPU_PROGRAMS_PER_SM = 4  # backward programs (and dw partial rows) per SM
# The interpreter runs each program through NumPy: few, fat programs are fast, and
# 8-row tiles with 2 backward programs still cross row-tile and program edges in the tests.
_INTERPRET_MAX_BLOCK = 1024
_INTERPRET_BLOCK_M = 8
_INTERPRET_PROGRAMS = 2


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, rows, cols, stride, n_rows, n_cols):
    """A (rows, cols) tile of a row-major matrix as fp32; out-of-range entries read as 0."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, value, rows, cols, stride, n_rows, n_cols):
    """Store a (rows, cols) fp32 tile rounded to the buffer's dtype, masked to the matrix."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    ptrs = ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _normed(X, x, rstd):
    """x · rstd rounded to x's dtype and back to fp32: the reference's ``.to(x.dtype)``."""
    return (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _rms_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # torch.compile's Inductor passes a Python float as fp64: keep the math fp32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if ONE_BLOCK:  # the whole row in registers: one read of x
        cols = tl.arange(0, BLOCK_N)
        x = _load_tile(X, rows, cols, stride_x, n_rows, n_cols)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        _store_tile(Y, w[None, :] * _normed(X, x, rstd), rows, cols, stride_y, n_rows, n_cols)
    else:  # wide rows: sum of squares over column blocks, then a second pass to normalise
        sq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            x = _load_tile(X, rows, start + tl.arange(0, BLOCK_N), stride_x, n_rows, n_cols)
            sq += x * x
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / n_cols + eps)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            x = _load_tile(X, rows, cols, stride_x, n_rows, n_cols)
            w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            _store_tile(Y, w[None, :] * _normed(X, x, rstd), rows, cols, stride_y, n_rows, n_cols)
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_bwd_rowdot_kernel(X, W, DY, RSTD, ROWDOT, stride_x, stride_dy, n_rows, n_cols,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """mean(d x̂ · x̂) per row, for rows wider than one column block: rstd · Σ dy · w · x / n."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = _load_tile(X, rows, cols, stride_x, n_rows, n_cols)
        dy = _load_tile(DY, rows, cols, stride_dy, n_rows, n_cols)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        acc += dy * w[None, :] * x
    rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
    tl.store(ROWDOT + rows, rstd * tl.sum(acc, axis=1) / n_cols, mask=rows < n_rows)


@triton.jit
def _rms_bwd_kernel(X, W, DY, DX, RSTD, ROWDOT, DW_PARTIAL, stride_x, stride_dy, stride_dx, n_rows, n_cols,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """dx for one column block of the row tiles pid, pid + P, …; their dw sum goes to DW_PARTIAL[pid]."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        x = _load_tile(X, rows, cols, stride_x, n_rows, n_cols)
        dy = _load_tile(DY, rows, cols, stride_dy, n_rows, n_cols)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)  # 0 on padded rows: no NaN, no contribution
        x_hat = x * rstd[:, None]
        dx_hat = dy * w[None, :]
        if ONE_BLOCK:
            rowdot = tl.sum(dx_hat * x_hat, axis=1) / n_cols
        else:
            rowdot = tl.load(ROWDOT + rows, mask=rows < n_rows, other=0.0)
        dx = (dx_hat - x_hat * rowdot[:, None]) * rstd[:, None]
        _store_tile(DX, dx, rows, cols, stride_dx, n_rows, n_cols)
        dw += tl.sum(dy * _normed(X, x, rstd), axis=0)  # y = w · round(x̂): dw sees the rounded x̂
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=cols < n_cols)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _blocks(n_cols: int, max_block: int | None) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, num_warps) for rows of n_cols values."""
    cap = max_block or (_INTERPRET_MAX_BLOCK if INTERPRET else _GPU_MAX_BLOCK)
    block_n = min(next_pow2(n_cols), next_pow2(cap))
    if INTERPRET:
        return _INTERPRET_BLOCK_M, block_n, 1
    block_m = max(1, min(16, _GPU_TILE_VALUES // block_n))
    return block_m, block_n, min(16, max(4, block_m * block_n // 512))


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as a (rows, n_cols) matrix with unit column stride: a view when possible, else a copy."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 or n_cols == 1 else t2.contiguous()


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, max_block: int | None):
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), device=x2.device, dtype=out_dtype)
    rstd = torch.empty(n_rows, device=x2.device, dtype=torch.float32)
    block_m, block_n, warps = _blocks(n_cols, max_block)
    if n_rows:
        _rms_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=block_n >= n_cols, num_warps=warps,
        )
    return y, rstd


def _n_programs(n_tiles: int, device: torch.device) -> int:
    """Backward programs: enough to fill the GPU, few enough that the dw partial buffer stays small."""
    if INTERPRET:
        return max(1, min(n_tiles, _INTERPRET_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, _GPU_PROGRAMS_PER_SM * sms))


def _backward(x2, weight, rstd, dy2, max_block: int | None):
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), device=x2.device, dtype=x2.dtype)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_n, warps = _blocks(n_cols, max_block)
    one_block = block_n >= n_cols
    n_programs = _n_programs(triton.cdiv(n_rows, block_m), x2.device)
    partial = torch.empty((n_programs, n_cols), device=x2.device, dtype=torch.float32)  # every entry written
    rowdot = rstd  # placeholder pointer, unread when the row fits one block
    if not one_block:
        rowdot = torch.empty_like(rstd)
        _rms_bwd_rowdot_kernel[(triton.cdiv(n_rows, block_m),)](
            x2, weight, dy2, rstd, rowdot, x2.stride(0), dy2.stride(0), n_rows, n_cols,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    _rms_bwd_kernel[(n_programs, triton.cdiv(n_cols, block_n))](
        x2, weight, dy2, dx, rstd, rowdot, partial, x2.stride(0), dy2.stride(0), dx.stride(0), n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=warps,
    )
    return dx, partial.sum(0).to(weight.dtype)  # second stage of the dw reduction: a fixed order


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: saves x, weight and the per-row rstd (fp32).

    ``max_block`` caps the columns per block (None: the default for the device); the
    tests set it small to run the wide-row path on small tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, max_block: int | None = None):
        n_cols = x.shape[-1]
        x2 = _rows(x, n_cols)
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        y, rstd = _forward(x2, weight.contiguous(), float(eps), out_dtype, max_block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.max_block = x.shape, max_block
        return y.view(*x.shape[:-1], n_cols)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(x2, weight.contiguous(), rstd, _rows(dy, x2.shape[1]), ctx.max_block)
        return dx.view(ctx.x_shape), dw, None, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """One line saying why rms_norm cannot take these tensors, or None when it can."""
    if x.dim() == 0:
        return "x is a scalar; expected (..., hidden)"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        return f"weight {tuple(weight.shape)} does not match x's hidden size {x.shape[-1]}; expected ({x.shape[-1]},)"
    if x.shape[-1] == 0:
        return "empty rows (hidden size 0)"
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} not in (float32, bfloat16, float16)"
    if x.device != weight.device:
        return f"x on {x.device} but weight on {weight.device}"
    if x.device.type != "cuda" and not (INTERPRET and x.device.type == "cpu"):
        return f"device {x.device.type}: the Triton kernel needs CUDA (or CPU tensors with TRITON_INTERPRET=1)"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, differentiable in x and weight.

    x: (..., hidden), fp32/bf16/fp16; weight: (hidden,), fp32/bf16/fp16. Returns
    (..., hidden) in ``torch.promote_types(weight.dtype, x.dtype)``, as the model's
    ``weight * x_normed.to(x.dtype)`` does. Non-unit-stride rows are copied first.
    Raises ValueError with the reason from ``unsupported_reason`` otherwise.
    """
    reason = unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(f"rms_norm: {reason}")
    return RMSNormFunction.apply(x, weight, float(eps))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm.forward, verbatim: the parity tests' ground truth."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
