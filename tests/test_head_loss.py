"""The fused, chunked LM-head cross-entropy against the plain head-then-loss path.

Values and the gradients of the hidden states and the head weight, for the mean
and the weighted loss, chunk sizes that do and do not divide the token count,
bf16, evaluation (no gradients computed), the model switch, and the
vocabulary-parallel version on 2 gloo ranks against the dense loss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import free_port
from megascale.config import ModelConfig
from megascale.model import head_loss
from megascale.model.head_loss import auto_chunk_tokens, linear_cross_entropy
from megascale.model.llama import Transformer


def reference(x, weight, targets, weights=None):
    ce = F.cross_entropy((x @ weight.t()).float().view(-1, weight.shape[0]), targets.reshape(-1), reduction="none")
    if weights is None:
        return ce.mean()
    w = weights.reshape(-1).float()
    return (ce * w).sum() / w.sum()


def inputs(n=37, d=16, v=50, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    weights = torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > 0.3)  # some tokens weigh 0
    return x, weight, targets, weights


@pytest.mark.parametrize("chunk", [0, 1, 5, 37, 64])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_matches_plain_loss_and_gradients(chunk, weighted):
    x, weight, targets, weights = inputs()
    w = weights if weighted else None
    got = linear_cross_entropy(x, weight, targets, w, chunk_tokens=chunk)
    gx, gw = torch.autograd.grad(got * 2.5, (x, weight))  # a non-unit upstream gradient is applied in backward
    want = reference(x, weight, targets, w)
    rx, rw = torch.autograd.grad(want * 2.5, (x, weight))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_bf16_within_rounding_of_plain_path():
    x, weight, targets, _ = inputs(n=64, d=32, v=96, dtype=torch.bfloat16)
    got = linear_cross_entropy(x, weight, targets, chunk_tokens=16)
    gx, gw = torch.autograd.grad(got, (x, weight))
    want = reference(x, weight, targets)
    rx, rw = torch.autograd.grad(want, (x, weight))
    assert gx.dtype == gw.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # Gradient chunks are summed in fp32 here, in bf16 by autograd there: a few bf16 ulps apart.
    torch.testing.assert_close(gx.float(), rx.float(), rtol=3e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=3e-2, atol=2e-3)


def test_all_zero_weights_give_zero_loss_and_gradients():
    x, weight, targets, _ = inputs()
    got = linear_cross_entropy(x, weight, targets, torch.zeros(targets.shape), chunk_tokens=8)
    gx, gw = torch.autograd.grad(got, (x, weight))
    assert got.item() == 0.0 and not gx.any() and not gw.any()


def test_evaluation_computes_no_gradients(monkeypatch):
    x, weight, targets, _ = inputs()
    calls = []
    original = head_loss._logit_grad
    monkeypatch.setattr(head_loss, "_logit_grad", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, chunk_tokens=8)
    assert calls == [] and not loss.requires_grad
    torch.testing.assert_close(loss, reference(x, weight, targets).detach())


def test_auto_chunk_bounds_the_logits():
    assert auto_chunk_tokens(32000) * 32000 <= head_loss.CHUNK_ELEMENTS
    assert auto_chunk_tokens(32000) % 64 == 0
    assert auto_chunk_tokens(10**9) == head_loss.MIN_CHUNK_TOKENS


@pytest.mark.parametrize("tie", [False, True], ids=["untied-head", "tied-head"])
def test_model_switch_is_exact(tie):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    weights = torch.rand(3, 16)
    grads = []
    for fused in (False, True):
        model.fused_loss, model.lm_head.chunk_tokens = fused, 7
        model.zero_grad()
        loss = model(tokens, targets) + model(tokens, targets, weights)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = grads
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert model(tokens).shape == (3, 16, 64)  # without targets: logits, as before


# ---------------------------------------------------------------- vocabulary parallel (2 gloo ranks)


def _tp_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, weight, targets, weights = inputs(n=29, d=8, v=40)
        rows = weight.shape[0] // world
        local = weight.detach()[rank * rows:(rank + 1) * rows].clone().requires_grad_()
        out = {}
        for name, w in (("mean", None), ("weighted", weights)):
            loss = linear_cross_entropy(x, local, targets, w, chunk_tokens=6, vocab_start=rank * rows,
                                        group=dist.group.WORLD)
            gx, gw = torch.autograd.grad(loss, (x, local))
            out[name] = (loss.detach(), gx, gw)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_matches_dense_loss():
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_tp_worker, args=(world, free_port(), results), nprocs=world, join=True)
    x, weight, targets, weights = inputs(n=29, d=8, v=40)
    rows = weight.shape[0] // world
    for name, w in (("mean", None), ("weighted", weights)):
        want = reference(x, weight, targets, w)
        rx, rw = torch.autograd.grad(want, (x, weight))
        for rank in range(world):
            loss, gx, gw = results[rank][name]
            torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-6)
            # Each rank's dx is its shard's part; the head's copy-to-TP mapping all-reduces them in the model.
            partial = sum(results[r][name][1] for r in range(world))
            torch.testing.assert_close(partial, rx, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gw, rw[rank * rows:(rank + 1) * rows], rtol=1e-5, atol=1e-6)
