"""The one attention entry point, with a backend switch.

Every attention call in the model goes through ``attention()``, so a faster
kernel (Triton flash attention, ``megascale.kernels.attention``) replaces the
PyTorch path in one place. ``resolve_backend`` decides once, at model build
time, and says why — the trainer logs that line at startup.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from megascale.errors import MegascaleError

BACKENDS = ("auto", "torch", "triton")


def triton_attention_available() -> bool:
    """True when the Triton flash-attention kernel module is installed."""
    try:
        return importlib.util.find_spec("megascale.kernels.attention") is not None
    except ModuleNotFoundError:
        return False


def resolve_backend(requested: str, device: torch.device) -> tuple[str, str]:
    """Pick the attention backend for ``device``; returns (backend, reason)."""
    if requested not in BACKENDS:
        raise MegascaleError(f"model.attention='{requested}' is not one of {', '.join(BACKENDS)}")
    has_triton = triton_attention_available()
    if requested == "triton":
        if not has_triton:
            raise MegascaleError(
                "model.attention=triton but megascale.kernels.attention is not available; use model.attention=torch"
            )
        return "triton", "requested"
    if requested == "torch":
        return "torch", "requested"
    if device.type == "cuda" and has_triton:
        return "triton", "auto: CUDA device and Triton kernel available"
    why = "no CUDA device" if device.type != "cuda" else "Triton attention kernel not installed"
    return "torch", f"auto: {why}, using torch scaled_dot_product_attention"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    backend: str = "torch",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query support.

    q: (B, n_heads, T, hd); k, v: (B, n_kv_heads, T, hd) with n_heads % n_kv_heads == 0.
    Returns (B, n_heads, T, hd).
    """
    if backend == "triton":
        from megascale.kernels.attention import flash_attention  # noqa: PLC0415 (optional kernel)

        return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    # enable_gqa lets SDPA broadcast KV heads without materialising repeated K/V.
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale, enable_gqa=gqa)
