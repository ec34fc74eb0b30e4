"""model.attention=cudnn: SDPA with cuDNN's backend first.

On CPU the request is refused in one line and the code path (the priority
context around SDPA) gives SDPA's own result; on CUDA (the GPU session runs this
file) its output and gradients match the fp32 math backend at a training shape.
"""

from __future__ import annotations

import pytest
import torch

from megascale.config import load_config
from megascale.errors import MegascaleError
from megascale.model.attention import attention, resolve_backend

CUDA = torch.cuda.is_available()


def test_cudnn_refused_without_cuda_in_one_line():
    if CUDA:
        pytest.skip("this machine has CUDA")
    with pytest.raises(MegascaleError, match=r"model.attention=cudnn needs SDPA's cuDNN backend: no CUDA device; use"):
        resolve_backend("cudnn", torch.device("cpu"))


def test_config_accepts_cudnn_and_names_it_when_refusing_others():
    assert load_config("configs/tiny.yaml", ["model.attention=cudnn"]).model.attention == "cudnn"
    with pytest.raises(MegascaleError, match="auto, torch, triton, triton-tma, cudnn"):
        load_config("configs/tiny.yaml", ["model.attention=flash"])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cudnn_path_equals_sdpa_on_cpu(kv_heads):
    """The priority context changes which kernel runs, never the math: on CPU both paths give the same numbers."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 16, generator=g, requires_grad=True)
    k = torch.randn(2, kv_heads, 24, 16, generator=g, requires_grad=True)
    v = torch.randn(2, kv_heads, 24, 16, generator=g, requires_grad=True)
    grads = []
    for backend in ("cudnn", "torch"):
        out = attention(q, k, v, causal=True, backend=backend)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_matches_math_at_training_shape(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    assert resolve_backend("cudnn", torch.device("cuda")) == ("cudnn", "requested")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    out = attention(q, k, v, causal=causal, backend="cudnn")
    dq, dk, dv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for got, want in zip((dq, dk, dv), ref_grads):
        # bf16 gradients of a 2048-long softmax: compare relative to the gradient's own scale.
        scale = want.abs().max()
        torch.testing.assert_close(got.float() / scale, want / scale, rtol=0, atol=2e-2)
