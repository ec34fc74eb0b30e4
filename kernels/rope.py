"""Fused rotary position embedding (RoPE) in Triton: forward and backward, beside its PyTorch reference.

Semantics are exactly those of ``megascale.model.llama.apply_rope`` (Hugging
Face's rotate-half layout)::

    rotate_half(x) = cat(−x[..., hd/2:], x[..., :hd/2])
    y = (x.float() · cos + rotate_half(x).float() · sin).to(x.dtype)

so with x = (x₁, x₂) split in halves, y₁ = x₁·cos₁ − x₂·sin₁ and
y₂ = x₂·cos₂ + x₁·sin₂, in fp32, rounded once to x's dtype. The backward is the
transposed rotation, dx = dy·cos + rotate_halfᵀ(dy·sin):
dx₁ = dy₁·cos₁ + dy₂·sin₂ and dx₂ = dy₂·cos₂ − dy₁·sin₁. cos and sin are
tables (no gradient); both halves of each table are read, so tables whose
halves differ are handled as the reference handles them.

One kernel serves both directions (``BACKWARD`` constexpr). One program handles
a (BLOCK_T positions × head dim) tile of one (batch, head): it loads both halves
of x and of the tables and writes both halves of y, so every element is read
and written once, with no rotated copy of x in memory.

Layout: x is (B, H, T, hd) with any strides — the model passes transposed views
of (B, T, H, hd) projections, read in place; the output has x's memory layout
(``torch.empty_like``). cos/sin: any shape that broadcasts to x without
enlarging it, in practice (T, hd) or (B, 1, T, hd); broadcast dimensions are
read through zero strides, never expanded in memory.

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
MAX_HEAD_DIM = 1024  # a tile holds BLOCK_T rows of hd/2 values per half; wider heads are not a RoPE use

# Positions per program on a GPU: about 2048 values per half-tile (32 rows at hd 128),
# 4 warps. Under the interpreter 16-row tiles keep the program count small while
# odd lengths still cross a tile edge.
_GPU_TILE_VALUES = 2048
_INTERPRET_BLOCK_T = 16


@triton.jit
def _halves(base, offs_t, offs_d, stride_t, stride_d, half, mask):
    """The two halves (BLOCK_T, BLOCK_D) of the rows offs_t of one (batch, head), as fp32."""
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    first = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(ptrs + half * stride_d, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _rope_kernel(X, COS, SIN, Y,
                 stride_xb, stride_xh, stride_xt, stride_xd,
                 stride_cb, stride_ch, stride_ct, stride_cd,
                 stride_sb, stride_sh, stride_st, stride_sd,
                 stride_yb, stride_yh, stride_yt, stride_yd,
                 n_heads, seq_len, half,
                 BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < seq_len)[:, None] & (offs_d < half)[None, :]

    x1, x2 = _halves(X + b * stride_xb + h * stride_xh, offs_t, offs_d, stride_xt, stride_xd, half, mask)
    # Broadcast table dimensions have stride 0: every (batch, head) reads the same rows.
    c1, c2 = _halves(COS + b * stride_cb + h * stride_ch, offs_t, offs_d, stride_ct, stride_cd, half, mask)
    s1, s2 = _halves(SIN + b * stride_sb + h * stride_sh, offs_t, offs_d, stride_st, stride_sd, half, mask)
    if BACKWARD:  # the transposed rotation: rotate_halfᵀ(v) = (v₂, −v₁)
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # rotate_half(x) = (−x₂, x₁)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2

    y_ptrs = Y + b * stride_yb + h * stride_yh + offs_t[:, None] * stride_yt + offs_d[None, :] * stride_yd
    tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + half * stride_yd, y2.to(Y.dtype.element_ty), mask=mask)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """One launch of the kernel; cos/sin already expanded (zero strides) to x's shape."""
    B, H, T, hd = x.shape
    y = torch.empty_like(x)  # x's memory layout when x is dense (a transposed view stays transposed)
    if x.numel() == 0:
        return y
    half = hd // 2
    block_d = next_pow2(half)
    block_t = _INTERPRET_BLOCK_T if INTERPRET else max(1, min(128, _GPU_TILE_VALUES // block_d))
    _rope_kernel[(triton.cdiv(T, block_t), B * H)](
        x, cos, sin, y, *_strides(x), *_strides(cos), *_strides(sin), *_strides(y), H, T, half,
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=1 if INTERPRET else 4,
    )
    return y


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves only the tables; the backward rotates dy the other way."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.expand(x.shape), sin.expand(x.shape)  # views with zero strides, no copies
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def unsupported_reason(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """One line saying why apply_rope cannot take these tensors, or None when it can."""
    if x.dim() != 4:
        return f"expected x of shape (B, heads, T, head_dim), got {x.dim()}-D"
    hd = x.shape[-1]
    if hd % 2 or hd == 0:
        return f"head dim {hd} is not even (rotate-half pairs the two halves)"
    if hd > MAX_HEAD_DIM:
        return f"head dim {hd} > {MAX_HEAD_DIM}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() > 4:
            return f"{name} has {t.dim()} dimensions; expected (T, head_dim) or (B, 1, T, head_dim)"
        try:
            shape = torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            return f"{name} {tuple(t.shape)} does not broadcast to x {tuple(x.shape)}"
        if t.requires_grad and torch.is_grad_enabled():
            return f"{name} requires grad; the kernel treats the tables as constants"
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} not in (float32, bfloat16, float16)"
        if t.device != x.device:
            return f"x on {x.device} but {name} on {t.device}"
    if x.device.type != "cuda" and not (INTERPRET and x.device.type == "cpu"):
        return f"device {x.device.type}: the Triton kernel needs CUDA (or CPU tensors with TRITON_INTERPRET=1)"
    return None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by position, rotate-half layout; differentiable in x only.

    x: any strides, fp32/bf16/fp16. cos, sin: tables (usually fp32) broadcasting to
    x, e.g. (T, hd) or (B, 1, T, hd). Returns x's shape and dtype, in x's memory
    layout. Raises ValueError with the reason from ``unsupported_reason`` otherwise.
    """
    reason = unsupported_reason(x, cos, sin)
    if reason is not None:
        raise ValueError(f"apply_rope: {reason}")
    return RoPEFunction.apply(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The model's apply_rope, verbatim: the parity tests' ground truth."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
