"""Fused SwiGLU activation in Triton: forward and backward, beside its PyTorch reference.

``swiglu(gate, up) = F.silu(gate) * up``, elementwise: the product inside the
model's MLP, ``down(silu(gate(x)) * up(x))``. Unfused, PyTorch reads gate to
write silu(gate), then reads both to write the product, and its backward keeps
silu(gate) alive; the fused kernels read gate and up once and write once, and
the backward recomputes silu from gate instead of saving it.

Rounding follows the reference: F.silu rounds silu(gate) to the input dtype
before the product, so the forward rounds it too (bit-identical on a GPU up to
the exp implementation). The backward, in fp32:

* d up   = dy · round(silu(gate))   (the exact derivative of the rounded forward)
* d gate = dy · up · σ(gate) · (1 + gate · (1 − σ(gate)))

without the reference's intermediate rounding of dy · up, so it is slightly more
accurate than the reference in bf16/fp16.

Layout: one program per BLOCK contiguous elements of the flattened tensors.
Non-contiguous inputs are copied with ``.contiguous()`` (the model's gate and up
are fresh Linear outputs, contiguous). Outputs are contiguous.

Runs on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
module was imported (the tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels

# Elements per program: 16 per thread at 4 warps, so 16-bit inputs load 32 bytes per
# thread per tensor (two 128-bit loads in flight). Under the interpreter one program
# is one NumPy pass, so the same size keeps small tests to a few programs.
_BLOCK = 2048
_NUM_WARPS = 4


@triton.jit
def _sigmoid_and_silu(g):
    """σ(g) and g · σ(g) in fp32, with silu as F.silu writes it: g / (1 + exp(−g))."""
    denom = 1.0 + tl.exp(-g)
    return 1.0 / denom, g / denom


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    _, silu = _sigmoid_and_silu(g)
    silu = silu.to(Y.dtype.element_ty).to(tl.float32)  # F.silu's output is in the input dtype
    tl.store(Y + offs, (silu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sig, silu = _sigmoid_and_silu(g)
    silu = silu.to(DU.dtype.element_ty).to(tl.float32)  # the forward's rounded silu
    # σ · (1 + g·(1 − σ)) stays finite for large |g|: σ → 0 as g → −∞ multiplies a finite g.
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate and up (not silu(gate): the backward recomputes it)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = _dense(gate), _dense(up)
        y = torch.empty_like(gate)
        if gate.numel():
            _swiglu_fwd_kernel[_grid(gate.numel())](gate, up, y, gate.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = _dense(dy)
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            _swiglu_bwd_kernel[_grid(gate.numel())](
                gate, up, dy, dgate, dup, gate.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS
            )
        return dgate, dup


def unsupported_reason(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """One line saying why swiglu cannot take these tensors, or None when it can."""
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (no broadcasting)"
    if gate.dtype != up.dtype:
        return f"gate and up dtypes differ ({gate.dtype}, {up.dtype})"
    if gate.dtype not in SUPPORTED_DTYPES:
        return f"dtype {gate.dtype} not in (float32, bfloat16, float16)"
    if gate.device != up.device:
        return f"gate on {gate.device} but up on {up.device}"
    if gate.device.type != "cuda" and not (INTERPRET and gate.device.type == "cpu"):
        return f"device {gate.device.type}: the Triton kernel needs CUDA (or CPU tensors with TRITON_INTERPRET=1)"
    return None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, differentiable in gate and up.

    gate, up: the same shape and dtype (fp32/bf16/fp16), on one device. Returns a
    contiguous tensor of that shape and dtype. Non-contiguous inputs are copied.
    Raises ValueError with the reason from ``unsupported_reason`` otherwise.
    """
    reason = unsupported_reason(gate, up)
    if reason is not None:
        raise ValueError(f"swiglu: {reason}")
    return SwiGLUFunction.apply(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The model's MLP activation, verbatim: the parity tests' ground truth."""
    return torch.nn.functional.silu(gate) * up
