"""The block's row-wise ops — RMSNorm, RoPE, SwiGLU — in PyTorch or as fused Triton kernels.

``model.fused_ops`` picks the backend once per run (``resolve_ops_backend``, logged
at startup); the model's modules call ``rms_norm`` / ``apply_rope`` / ``swiglu``
here with it. The PyTorch versions are the reference the kernels are tested
against (``tests/test_kernels_fused.py``). ``auto``, the default, takes the kernels
on CUDA when the blocks run eagerly: an H100 trained 350m 1.82x faster with them
than with the PyTorch ops (BENCHMARKS.md, 2026-11-26), whose eager forms are chains
of elementwise kernels over fp32 copies. Under ``train.compile`` it keeps the PyTorch
ops in the blocks, which Inductor fuses itself (the combination the 1.3b figures
measured), and the kernels in the fused loss, which is not compiled
(``resolve_loss_ops_backend``).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F

from megascale.errors import MegascaleError
from megascale.model.attention import _interpreting

OPS_BACKENDS = ("auto", "torch", "triton")


def resolve_ops_backend(requested: str, device: torch.device, compiled: bool = False) -> tuple[str, str]:
    """(backend, reason for the log line); an explicit triton the kernels cannot serve stops with one line.

    compiled: the blocks run under torch.compile (train.compile), where auto keeps the PyTorch ops.
    """
    if requested not in OPS_BACKENDS:
        raise MegascaleError(f"model.fused_ops='{requested}' is not one of {', '.join(OPS_BACKENDS)}")
    if requested == "torch":
        return "torch", "requested"
    if requested == "auto":
        if device.type != "cuda":
            return "torch", f"auto: the kernels run on CUDA, this is {device.type}"
        if compiled:
            return "torch", "auto: train.compile fuses the PyTorch ops"
        if importlib.util.find_spec("triton") is None:
            return "torch", "auto: Triton is not installed"
        return "triton", "auto: CUDA, eager blocks"
    if importlib.util.find_spec("triton") is None:
        raise MegascaleError("model.fused_ops=triton but Triton is not installed; pip install triton or use model.fused_ops=torch")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise MegascaleError(f"model.fused_ops=triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU, for tests), "
                             f"not {device.type}; use model.fused_ops=torch")
    return "triton", "requested"


def resolve_loss_ops_backend(requested: str, device: torch.device) -> str:
    """The fused loss's row-wise steps: as ``resolve_ops_backend`` says for eager blocks, compiled or not.

    train.compile compiles the blocks only, so the loss's PyTorch row ops run eagerly under it too; an H200
    ran the fused head and loss 1.8x faster with the row kernels (bench/fused_loss.py, BENCHMARKS.md).
    """
    return resolve_ops_backend(requested, device, compiled=False)[0]


def apply_ops_backend(model, requested: str, device: torch.device, compiled: bool) -> tuple[str, str, str]:
    """Resolve model.fused_ops for the blocks and the loss and set them on ``model`` (a Transformer);
    returns (blocks' backend, why, loss's backend) for the start-up log line."""
    ops, why = resolve_ops_backend(requested, device, compiled)
    loss_ops = resolve_loss_ops_backend(requested, device)
    model.set_ops_backend(ops, loss_ops)
    return ops, why, loss_ops


def _kernel_or_none(module: str, reason: str | None, what: str):
    """The kernel module, or None (after one warning per reason) when it cannot take these tensors."""
    if reason is None:
        return importlib.import_module(f"megascale.kernels.{module}")
    warnings.warn(f"Triton {what}: {reason}; using PyTorch", stacklevel=3)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    """weight · x / rms(x), normalised in fp32 (stable under bf16/fp16, as Llama does) then cast to x's dtype."""
    if backend == "triton":
        from megascale.kernels.rmsnorm import unsupported_reason  # noqa: PLC0415 (imports triton)

        kernel = _kernel_or_none("rmsnorm", unsupported_reason(x, weight), "RMSNorm")
        if kernel is not None:
            return kernel.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by position; rotate-half layout (Hugging Face's, so exports need no permutation)."""
    if backend == "triton":
        from megascale.kernels.rope import unsupported_reason  # noqa: PLC0415

        kernel = _kernel_or_none("rope", unsupported_reason(x, cos, sin), "RoPE")
        if kernel is not None:
            return kernel.apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) · up, the SwiGLU MLP's gating."""
    if backend == "triton":
        from megascale.kernels.swiglu import unsupported_reason  # noqa: PLC0415

        kernel = _kernel_or_none("swiglu", unsupported_reason(gate, up), "SwiGLU")
        if kernel is not None:
            return kernel.swiglu(gate, up)
    return F.silu(gate) * up
