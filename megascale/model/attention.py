"""The one attention entry point, with a backend switch.

Every attention call in the model goes through ``attention()``, so a faster
kernel (Triton flash attention, ``megascale.kernels.attention``) replaces the
PyTorch path in one place. ``resolve_backend`` decides once, at model build
time, and says why — the trainer logs that line at startup.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from megascale.errors import MegascaleError

BACKENDS = ("auto", "torch", "triton", "triton-tma", "cudnn")
SDPA = "torch scaled_dot_product_attention"


# SDPA's backends with cuDNN's first, then PyTorch's own order (flash, efficient, math).
# PyTorch's default priority puts cuDNN last, behind flash; on an H200 cuDNN's attention
# ran 1.1–1.5x the Triton kernel and 1.5–1.9x the flash backend (BENCHMARKS.md, "Fused
# attention"). Inputs cuDNN refuses fall through to the next.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _cudnn_refusal(device: torch.device) -> str | None:
    """Why SDPA's cuDNN backend cannot be asked for on this device, or None."""
    if device.type != "cuda":
        return "no CUDA device"
    if not torch.backends.cudnn.is_available():
        return "PyTorch was built without cuDNN"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    return None


def _interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through its interpreter (slow; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_attention_available() -> bool:
    """True when Triton and the flash-attention kernel module are installed (says nothing about the device)."""
    try:
        return importlib.util.find_spec("triton") is not None and (
            importlib.util.find_spec("megascale.kernels.attention") is not None
        )
    except ModuleNotFoundError:
        return False


def _kernel_refusal(
    device: torch.device, head_dim: int | None, dtype: torch.dtype | None, interpreter_ok: bool
) -> str | None:
    """Why the Triton kernel cannot serve this model on this device, or None when it can."""
    if not triton_attention_available():
        return "Triton attention kernel not installed"
    if device.type != "cuda" and not (interpreter_ok and device.type == "cpu" and _interpreting()):
        return "no CUDA device"
    if head_dim is None:
        return None
    from megascale.kernels.attention import unsupported_config  # noqa: PLC0415 (imports triton)

    return unsupported_config(head_dim, dtype or torch.float32, device)


def resolve_backend(
    requested: str, device: torch.device, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> tuple[str, str]:
    """Pick the attention backend for ``device``; returns (backend, reason), the reason being the log line's.

    auto: on a Hopper or newer GPU with SDPA's cuDNN backend, cudnn (the H200 measured
    it fastest: 1.6x the Triton kernel's attention time in a 1.3b step, and ahead of it
    at every benchmarked shape; BENCHMARKS.md); on other GPUs the Triton kernel when it
    supports the model's head dim and dtype (when given: shapes are fixed per model, so
    this is decided once); else PyTorch SDPA with the reason. triton: the kernel, also on CPU under TRITON_INTERPRET=1;
    an explicit request the kernel cannot serve stops with one line. triton-tma: the
    same with its forward through TMA descriptors. cudnn: SDPA with cuDNN's backend
    first (CUDA only).
    """
    if requested not in BACKENDS:
        raise MegascaleError(f"model.attention='{requested}' is not one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch", "requested"
    if requested == "cudnn":
        refusal = _cudnn_refusal(device)
        if refusal is not None:
            raise MegascaleError(f"model.attention=cudnn needs SDPA's cuDNN backend: {refusal}; "
                                 "use model.attention=auto or torch")
        return "cudnn", "requested"
    if requested == "auto" and _cudnn_refusal(device) is None and torch.cuda.get_device_capability(device) >= (9, 0):
        return "cudnn", "auto: Hopper GPU with cuDNN attention, measured fastest (BENCHMARKS.md)"
    # The interpreter is far too slow to be picked automatically; only an explicit request gets it.
    explicit = requested in ("triton", "triton-tma")
    refusal = _kernel_refusal(device, head_dim, dtype, interpreter_ok=explicit)
    if requested == "triton-tma" and refusal is None:  # the kernel is there: ask it about TMA on this device
        from megascale.kernels.attention import tma_unsupported_device  # noqa: PLC0415 (imports triton)

        refusal = tma_unsupported_device(device)  # tensor alignment is checked per call
    if explicit:
        if refusal is not None:
            hint = " (or TRITON_INTERPRET=1 on CPU, for tests)" if refusal == "no CUDA device" else ""
            raise MegascaleError(
                f"model.attention={requested} but the Triton kernel cannot run here: {refusal}{hint}; "
                "use model.attention=auto or torch"
            )
        return requested, "requested"
    if refusal is None:
        return "triton", "auto: CUDA device and Triton kernel available"
    return "torch", f"auto: {refusal}, using {SDPA}"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    backend: str = "torch",
    softmax_scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query support.

    q: (B, n_heads, T, hd); k, v: (B, n_kv_heads, T_k, hd) with n_heads % n_kv_heads == 0.
    mask: optional boolean (B, 1, T, T_k), True = attend; it replaces ``causal``
    (packed examples' block-diagonal mask, padded or cached generation). The
    Triton kernel has no mask input, so a masked call always runs PyTorch SDPA.
    Returns (B, n_heads, T, hd).
    """
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale, enable_gqa=gqa)
    if backend in ("triton", "triton-tma"):
        from megascale.kernels.attention import (  # noqa: PLC0415 (optional kernel)
            flash_attention,
            tma_unsupported_reason,
            unsupported_reason,
        )

        reason = unsupported_reason(q, k, v)
        if reason is None:
            # A view TMA cannot describe (alignment) runs the pointer kernel: same math, no warning needed.
            tma = backend == "triton-tma" and tma_unsupported_reason(q, k, v) is None
            return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, tma=tma)
        # resolve_backend already refused what it could see (head dim, dtype, device);
        # anything else falls back here, warned once per distinct reason.
        warnings.warn(f"Triton attention: {reason}; using {SDPA}", stacklevel=2)
    if backend == "cudnn":
        with sdpa_kernel(CUDNN_FIRST, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
    # enable_gqa lets SDPA broadcast KV heads without materialising repeated K/V.
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
