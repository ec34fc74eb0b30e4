"""Triton flash attention against its naive fp32 reference: output and dq, dk, dv.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before the kernel module is imported) at small shapes; with CUDA the same tests
also run at real shapes. Tolerances are per dtype and absolute + relative, on
values of order 1 (randn inputs, randn upstream gradient).

Interpreter caveats, both worked around or allowed for:
* its tl.dot misreads bf16 operands, so under the interpreter the kernel upcasts
  bf16 dot operands to fp32 (exactly representable: same products as a GPU);
* its fp32 → bf16 cast truncates instead of rounding to nearest, so bf16 errors
  are about twice what a GPU gives; the bf16 tolerance allows for it.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from megascale.kernels.attention import (  # noqa: E402
    FlashAttention,
    Tiles,
    attention_reference,
    flash_attention,
    tma_unsupported_reason,
    unsupported_config,
    unsupported_reason,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (atol, rtol) for output and gradients, against the fp32 reference on the same (rounded) inputs.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}

# (B, H, H_kv, T, D): GQA ratios 1, 2, 4; lengths 1, 17, 64, 100 (not multiples of 16 except 64).
SMALL = [
    (1, 4, 4, 17, 32),
    (1, 4, 2, 64, 32),
    (1, 4, 1, 100, 64),
    (1, 4, 2, 1, 32),
    (1, 2, 1, 20, 128),
    (1, 1, 1, 18, 256),
]
# Real shapes, CUDA only: training-like lengths, an odd length, a wide head.
LARGE = [
    (2, 16, 4, 1024, 128),
    (1, 8, 8, 2048, 64),
    (2, 8, 2, 1000, 128),
    (1, 4, 1, 777, 32),
    (1, 4, 4, 512, 256),
]
SHAPES = SMALL + (LARGE if CUDA else [])


def _inputs(B, H, H_kv, T, D, dtype, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_()

    return randn(B, H, T, D), randn(B, H_kv, T, D), randn(B, H_kv, T, D), randn(B, H, T, D).detach()


def _model_views(gen, B, T, H, H_kv, D, dtype=torch.float32):
    """The model's layout: (B, T, H, D) q and (B, T, 2·H_kv, D) kv projections (leaves), and the transposed
    (B, heads, T, D) views of them that attention gets: q, k, v."""
    q = torch.randn(B, T, H, D, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    kv = torch.randn(B, T, 2 * H_kv, D, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    return q, kv, (q.transpose(1, 2), kv[:, :, :H_kv].transpose(1, 2), kv[:, :, H_kv:].transpose(1, 2))


def _check_sum_grads(q, kv, views, **options):
    """flash_attention(views).sum()'s gradients in the projections against the reference's: the stride-0 dO a sum
    gives, flowing back into the (B, T, ·, D) leaves."""
    flash_attention(*views, **options).sum().backward()
    got = (q.grad.clone(), kv.grad.clone())
    q.grad = kv.grad = None
    attention_reference(*views).sum().backward()
    torch.testing.assert_close(got[0], q.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], kv.grad, atol=1e-4, rtol=1e-4)


def _check(q, k, v, do, causal, scale=None, **options):
    """Kernel vs reference: output and the three gradients, with the dtype's tolerance; options go to flash_attention."""
    _check_output(flash_attention(q, k, v, causal=causal, softmax_scale=scale, **options), q, k, v, do, causal, scale)


def _check_output(out, q, k, v, do, causal, scale=None):
    """A kernel's output (and the gradients through it) against the reference's, with the dtype's tolerance."""
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    atol, rtol = TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_matches_reference_fp32(shape, causal):
    q, k, v, do = _inputs(*shape, torch.float32)
    if (reason := unsupported_reason(q, k, v)) is not None:  # fp32 with head dim 256 on a GPU
        pytest.skip(reason)
    _check(q, k, v, do, causal=causal)


DTYPE_SHAPES = [(1, 4, 2, 40, 32)] + ([(2, 16, 4, 1024, 128), (1, 8, 2, 1000, 64), (1, 4, 4, 512, 256)] if CUDA else [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", DTYPE_SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_matches_reference_half(shape, causal, dtype):
    _check(*_inputs(*shape, dtype), causal=causal)


def _tma_or_skip(q, k, v):
    if (reason := unsupported_reason(q, k, v) or tma_unsupported_reason(q, k, v)) is not None:
        pytest.skip(reason)  # fp32 with head dim 256 on a GPU; a GPU older than Hopper; Triton < 3.4


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_tma_matches_reference(shape, dtype, causal):
    """Forward and backward through TMA descriptors: tails (T = 1, 17, 100) come as zeros from the descriptors'
    bounds, and the stores clip them."""
    q, k, v, do = _inputs(*shape, dtype, seed=7)
    _tma_or_skip(q, k, v)
    _check(q, k, v, do, causal=causal, tma=True)


WS_SHAPES = [(1, 4, 2, 40, 32), (2, 2, 2, 17, 64), (1, 2, 1, 100, 128)] + (
    [(2, 16, 4, 1024, 128), (1, 8, 2, 1000, 64)] if CUDA else [])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", WS_SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_ws_matches_reference(shape, dtype, causal):
    """The warp-specialised forward (two half query blocks; the TMA backward): GQA, tails, both masks."""
    q, k, v, do = _inputs(*shape, dtype, seed=11)
    _tma_or_skip(q, k, v)
    _check(q, k, v, do, causal=causal, ws=True)


# GQA ratios 1-4, a 1-token and a 100-token tail, head dims 32-256; training shapes on CUDA.
ATOMIC_SHAPES = [(1, 4, 2, 64, 32), (1, 4, 1, 100, 64), (1, 4, 2, 1, 32), (1, 2, 2, 20, 128), (1, 1, 1, 18, 256)] + (
    [(2, 16, 4, 1024, 128), (2, 8, 2, 1000, 128), (1, 8, 8, 2048, 64)] if CUDA else [])


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ATOMIC_SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_atomic_dq_backward_matches_reference(shape, dtype, causal, tma):
    """deterministic=False: one backward kernel, dQ added by fp32 atomics from every key block (and, with GQA,
    from the K/V head's whole group of query heads), then scaled and rounded once into q's layout."""
    q, k, v, do = _inputs(*shape, dtype, seed=5)
    if (reason := unsupported_reason(q, k, v) or (tma_unsupported_reason(q, k, v) if tma else None)) is not None:
        pytest.skip(reason)
    _check(q, k, v, do, causal=causal, tma=tma, deterministic=False)


def test_atomic_dq_backward_survives_the_tuner(monkeypatch):
    """The tuner runs each candidate tile several times before the real launch; with dQ added by atomics into one
    buffer, each of those runs must start from zero (what the H200 caught on 2026-11-27: Triton 3.6 times even a
    lone candidate, and dQ came out several times too large). Two candidates here, timed by a stand-in that runs
    each three times as CUDA-event timing would (the interpreter has no timer of its own)."""
    import triton  # noqa: PLC0415

    from megascale.kernels import attention  # noqa: PLC0415

    kernel = attention._bwd_dkdv_kernel
    first = kernel.configs[0]
    second = triton.Config(dict(first.kwargs), num_warps=first.num_warps, num_stages=first.num_stages + 1,
                           pre_hook=first.pre_hook)
    runs = []

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        runs.append(len(runs))
        return [float(len(runs))] * len(quantiles)  # the first candidate wins

    monkeypatch.setenv("MEGASCALE_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(kernel, "configs", [first, second])
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setitem(kernel.__dict__, "do_bench", bench)  # a cached_property: set on the instance, then removed
    q, k, v, do = _inputs(1, 4, 2, 40, 32, torch.float32, seed=7)
    _check(q, k, v, do, causal=True, deterministic=False)
    assert runs == [0, 1]  # both candidates were timed, so the buffer was written before the real launch


# The Gluon forward (Hopper only: no interpreter runs Gluon, so these skip without one). One key block (T = 17,
# 100), fewer blocks than buffers and more (300, 1000: the buffers refilled), GQA 1-4, the diagonal inside a block.
GLUON_SHAPES = [(1, 4, 2, 17, 64)] + ([(2, 2, 2, 100, 128), (1, 4, 1, 300, 128), (1, 4, 4, 1000, 64),
                                      (2, 16, 4, 1024, 128), (1, 8, 2, 4096, 128), (1, 8, 8, 2048, 64)] if CUDA else [])


def _gluon_or_skip(q, k, v):
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    _tma_or_skip(q, k, v)
    if (reason := attention_gluon.unsupported_reason(q)) is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", GLUON_SHAPES, ids=lambda s: "B{}-H{}-kv{}-T{}-D{}".format(*s))
def test_gluon_matches_reference(shape, dtype, causal, deterministic):
    """flash_attention(gluon=True): O against the reference, and the gradients through the TMA backward
    (dq-kernel) or the Gluon one (dq-atomic), both reading the Gluon forward's log-sum-exp."""
    q, k, v, do = _inputs(*shape, dtype, seed=13)
    _gluon_or_skip(q, k, v)
    _check(q, k, v, do, causal=causal, gluon=True, deterministic=deterministic)


def _gluon_tile_id(x) -> str:
    """D128, or the candidate's tag (attention_gluon.tile_tag): what bench/gpu_session.py reads back from a failed
    test's id to leave that candidate out of the benchmark."""
    from megascale.kernels.attention_gluon import tile_tag  # noqa: PLC0415

    return f"D{x}" if isinstance(x, int) else tile_tag(x)


def _gluon_forward_tiles() -> list[tuple[int, tuple]]:
    from megascale.kernels.attention_gluon import GLUON_TILES  # noqa: PLC0415

    return [(d, tile) for d, tiles in GLUON_TILES.items() for tile in tiles] if CUDA else [(64, GLUON_TILES[64][0])]


@pytest.mark.parametrize("seq_len", [300, 100], ids=["T300", "T100"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim, tile", _gluon_forward_tiles(), ids=_gluon_tile_id)
def test_gluon_forward_every_tile_matches_reference(head_dim, tile, causal, seq_len):
    """Every candidate the tuner may pick (64- and 128-row blocks, 64- and 128-key blocks, with and without the TMA
    warp, ping-pong), fixed: O and the log2-sum-exp the backward reads, GQA 2, at a length with a tail and more key
    blocks than buffers (ping-pong at T=300: the last block's second warp group has no row inside the sequence),
    and at one where a 128-key block is the only one (T=100: no loop, only the first and last products)."""
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    q, k, v, _ = _inputs(1, 4, 2, seq_len, head_dim, torch.bfloat16, seed=17)
    _gluon_or_skip(q, k, v)
    scale = head_dim**-0.5
    with torch.no_grad():
        o, lse = attention_gluon.forward(q, k, v, causal, scale / math.log(2.0), tile=tile)
    _check_forward_and_lse(q, k, v, o, lse, causal, scale)


def _check_forward_and_lse(q, k, v, o, lse, causal, scale):
    """A Gluon forward's O against the reference and its log2-sum-exp against the scores' (what the backward reads)."""
    with torch.no_grad():
        group = q.shape[1] // k.shape[1]
        scores = (q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-2, -1)) * scale  # (B, H, T, T)
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        want_lse = torch.logsumexp(scores, dim=-1) / math.log(2.0)  # log2 domain
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(o.float(), attention_reference(q, k, v, causal=causal).float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)


def _gluon_persistent_tiles() -> list[tuple[int, tuple]]:
    from megascale.kernels.attention_gluon import PERSISTENT  # noqa: PLC0415

    tiles = [(d, tile) for d, tile in _gluon_forward_tiles() if tile[3] == PERSISTENT]
    return tiles or [(64, (128, 128, 2, PERSISTENT))]  # on CPU: one, to skip


@pytest.mark.parametrize("shape", [(1, 4, 2, 300), (2, 4, 1, 1000)], ids=["B1-H4-kv2-T300", "B2-H4-kv1-T1000"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim, tile", _gluon_persistent_tiles(), ids=_gluon_tile_id)
def test_gluon_forward_every_persistent_tile_takes_query_blocks_in_turn(monkeypatch, head_dim, tile, causal, shape):
    """The persistent forward with 3 blocks for 12 and 64 query blocks: each block takes 4 to 22 in turn, so the
    rings of K/V buffers and turns run on across query blocks, and each warp group's two Q buffers are refilled
    while the O they held last is stored (the every-tile test above launches a block for each)."""
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    q, k, v, _ = _inputs(*shape, head_dim, torch.bfloat16, seed=19)
    _gluon_or_skip(q, k, v)
    monkeypatch.setattr(attention_gluon, "_sm_count", lambda device: 3)
    scale = head_dim**-0.5
    with torch.no_grad():
        o, lse = attention_gluon.forward(q, k, v, causal, scale / math.log(2.0), tile=tile)
    _check_forward_and_lse(q, k, v, o, lse, causal, scale)


def _gluon_backward_tiles() -> list[tuple[int, tuple]]:
    from megascale.kernels.attention_gluon import GLUON_BWD_TILES  # noqa: PLC0415

    return [(d, tile) for d, tiles in GLUON_BWD_TILES.items() for tile in tiles] if CUDA else [
        (64, GLUON_BWD_TILES[64][0])]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim, block", _gluon_backward_tiles(), ids=_gluon_tile_id)
def test_gluon_backward_every_tile_matches_reference(head_dim, block, causal):
    """The Gluon backward (deterministic=False) at each candidate (queries a step, keys a program, with and without
    the TMA warp), passed whole as the dK/dV tile: at 32 query rows it takes dQ as Kᵀ dSᵀ (a wgmma needs 64 rows a
    warp group), at 64 as dS K; GQA 2, a tail, several blocks."""
    q, k, v, do = _inputs(1, 4, 2, 300, head_dim, torch.bfloat16, seed=19)
    _gluon_or_skip(q, k, v)
    tiles = Tiles(fwd=(128, 128), dkdv=block, dq=(64, 32))
    out = FlashAttention.apply(q, k, v, causal, head_dim**-0.5, tiles, False, False, False, True)
    _check_output(out, q, k, v, do, causal)


def _gluon_backward_loaders() -> list[tuple[int, tuple]]:
    from megascale.kernels.attention_gluon import DQ_AHEAD, DQ_WARP, OWN_LOADS, TMA_WARP  # noqa: PLC0415

    return [(d, (*block, 2, loader)) for d, block in ((128, (32, 64)), (64, (64, 64)))
            for loader in (OWN_LOADS, TMA_WARP, DQ_WARP)] + [(128, (32, 128, 2, DQ_AHEAD))]


@pytest.mark.parametrize("seq_len", [80, 20], ids=["T80", "T20"])
@pytest.mark.parametrize("head_dim, tile", _gluon_backward_loaders(), ids=_gluon_tile_id)
def test_gluon_backward_every_loader_with_a_single_step(head_dim, tile, seq_len):
    """Causal, one query head per K/V head, a program with a single query step, fewer than its buffers (the loaders'
    first refills predicated off, DQ_WARP's dQ buffers and rings used once): at T = 80 the second key block's of
    64 keys, at T = 20 every one; with each kind of loader: the compute warps, a TMA warp, the warp group that also
    adds dQ, and that one with the next step's products issued ahead (DQ_AHEAD: one step issues its own again at
    the end; at T = 80 its 128 keys take 3 steps)."""
    q, k, v, do = _inputs(1, 2, 2, seq_len, head_dim, torch.bfloat16, seed=23)
    _gluon_or_skip(q, k, v)
    out = FlashAttention.apply(q, k, v, True, head_dim**-0.5, Tiles(fwd=(128, 128), dkdv=tile, dq=(64, 32)), False,
                               False, False, True)
    _check_output(out, q, k, v, do, True)


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "dq-atomic"])
def test_gluon_forward_takes_the_models_strided_views(deterministic):
    """The model's (B, T, H, D) projections seen as (B, H, T, D): the 4-D descriptors read and write them in place,
    forward and backward (the TMA one, or with dq-atomic the Gluon one: dK, dV come back in k's and v's layouts)."""
    B, T, H, H_kv, D = 2, 200, 8, 2, 128
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    _, _, views = _model_views(gen, B, T, H, H_kv, D, torch.bfloat16)
    _gluon_or_skip(*views)
    do = torch.randn(views[0].shape, generator=gen, device=DEVICE).to(torch.bfloat16)
    out = flash_attention(*views, gluon=True, deterministic=deterministic)
    assert out.stride() == views[0].stride()  # q's layout
    _check_output(out, *views, do, causal=True)


class _BindingKernel:
    """Stands in for a Gluon kernel where none can run (no interpreter runs Gluon): each launch's arguments are bound
    to the real kernel's parameters, as Triton binds them, and recorded with the grid."""

    def __init__(self, kernel):
        self.params = inspect.signature(kernel.fn).parameters
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_stages", "num_ctas", "maxnreg") if k in kwargs}
            bound = inspect.Signature(list(self.params.values())).bind(*args, **kwargs)  # TypeError if they differ
            self.launches.append((grid, bound.arguments, options))
        return launch


def test_gluon_launches_bind_to_their_kernels(monkeypatch):
    """Every Gluon candidate's launch, forward and backward, passes the kernel exactly its parameters, with a grid
    of positive sizes within CUDA's limits: checked on CPU, where the GPU tests that launch them skip, so that a
    change to a kernel's signature or its launch is caught before a GPU session spends its time on it."""
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    if attention_gluon.GLUON_IMPORT_ERROR is not None:
        pytest.skip(attention_gluon.GLUON_IMPORT_ERROR)
    fwd = _BindingKernel(attention_gluon._fwd_gluon_kernel)
    bwd = _BindingKernel(attention_gluon._bwd_gluon_kernel)
    monkeypatch.setattr(attention_gluon, "_fwd_gluon_kernel", fwd)
    monkeypatch.setattr(attention_gluon, "_bwd_gluon_kernel", bwd)
    monkeypatch.setattr(attention_gluon, "_sm_count", lambda device: 132)
    B, H, H_kv, T = 2, 8, 2, 1000
    for D in attention_gluon.GLUON_HEAD_DIMS:
        q, k = (torch.zeros(B, h, T, D, dtype=torch.bfloat16) for h in (H, H_kv))
        lse = torch.zeros(B, H, T)
        for tile in attention_gluon.GLUON_TILES[D]:
            attention_gluon._launch(q, k, k, q, lse, True, 0.1, tile)
        for tile in attention_gluon.GLUON_BWD_TILES[D]:
            attention_gluon._launch_bwd(q, k, k, q, lse, lse, q.float(), k, k, True, 0.1, 0.1, tile)
        assert len(fwd.launches) == sum(len(attention_gluon.GLUON_TILES[d]) for d in attention_gluon.GLUON_HEAD_DIMS
                                        if d <= D)
    assert bwd.launches
    for grid, arguments, _ in fwd.launches + bwd.launches:
        assert 1 <= len(grid) <= 3 and all(g >= 1 for g in grid) and grid[0] < 2**31 and all(g < 2**16 for g in grid[1:])
        assert arguments["num_warps"] in (4, 8, 12, 16)


def test_gluon_forward_refuses_what_it_cannot_run():
    """One line saying why, and what to use instead: fp32, head dims other than 64/128, a device that is not Hopper."""
    q, k, v, _ = _inputs(1, 2, 2, 8, 64, torch.float32)
    with pytest.raises(ValueError, match=r"flash_attention: .*float16/bfloat16.*; use tma=True"):
        flash_attention(q, k, v, gluon=True)
    q, k, v, _ = _inputs(1, 2, 2, 8, 32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"head dims \(64, 128\), got 32; use tma=True"):
        flash_attention(q, k, v, gluon=True)
    with pytest.raises(ValueError, match=r"ws=True and gluon=True are two forwards; pass one of them"):
        flash_attention(q, k, v, gluon=True, ws=True)
    from megascale.kernels.attention_gluon import (  # noqa: PLC0415
        GLUON_BWD_TILES, GLUON_TILES, OWN_LOADS, PERSISTENT, PING_PONG, TMA_WARP, forward_launch, tile_for)

    assert tile_for(GLUON_TILES, 128, (64, 64)) == (64, 64, 3, OWN_LOADS)  # a (BLOCK_M, BLOCK_N) finds the rest
    assert tile_for(GLUON_TILES, 128, (128, 128, 2, TMA_WARP)) == (128, 128, 2, TMA_WARP)  # a whole candidate, itself
    assert tile_for(GLUON_BWD_TILES, 128, (32, 64), "backward") == (32, 64, 2, OWN_LOADS)
    # ping-pong: each warp group loads its own 64 rows, and the kernel's 4 warps are the first group
    assert forward_launch((128, 128, 2, PING_PONG)) == (64, 4) and forward_launch((128, 64, 3, TMA_WARP)) == (128, 8)
    with pytest.raises(ValueError, match="a ping-pong tile takes 128 query rows"):
        forward_launch((64, 128, 2, PING_PONG))
    assert forward_launch((128, 128, 2, PERSISTENT)) == (64, 4)  # the persistent ping-pong's warp groups the same
    with pytest.raises(ValueError, match="a ping-pong tile takes 128 query rows"):
        forward_launch((64, 64, 3, PERSISTENT))
    with pytest.raises(ValueError, match=r"forward has no 32 x 32 tile \(32, 32\) at head dim 128; its tiles: 128 x 128, "):
        tile_for(GLUON_TILES, 128, (32, 32))
    if not CUDA:  # the interpreter's CPU tensors: the kernel is Hopper's
        q, k, v, _ = _inputs(1, 2, 2, 8, 64, torch.bfloat16)
        with pytest.raises(ValueError, match=r"(Hopper|Gluon).*; use tma=True"):
            flash_attention(q, k, v, gluon=True)


def test_launch_groups_heads_by_a_power_of_two_that_divides_them(monkeypatch):
    """order_heads: the heads an attention grid launches together (heaviest block first over them) are whole groups,
    8 when B · H allows, so the kernels' index arithmetic is a shift; an odd count launches head by head, and so does
    MEGASCALE_ATTN_ORDER_HEADS=1 (the benchmark's A/B against the order before)."""
    from megascale.kernels.attention_gluon import order_heads  # noqa: PLC0415

    assert [order_heads(n) for n in (1, 2, 3, 4, 6, 12, 16, 24, 64, 96)] == [1, 2, 1, 4, 2, 4, 8, 8, 8, 8]
    monkeypatch.setenv("MEGASCALE_ATTN_ORDER_HEADS", "1")
    assert order_heads(64) == 1
    monkeypatch.setenv("MEGASCALE_ATTN_ORDER_HEADS", "6")  # at most 6: 4
    assert order_heads(64) == 4
    monkeypatch.setenv("MEGASCALE_ATTN_ORDER_HEADS", "zero")
    with pytest.raises(ValueError, match="MEGASCALE_ATTN_ORDER_HEADS must be a positive integer"):
        order_heads(64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_one_kernel_backwards_passes_zero_and_round_as_torch_does(dtype):
    """The passes around the one-kernel backward (deterministic=False): the Δ pass also zeroes the fp32 dQ buffer
    (garbage before: torch.empty), and dQ's scale and rounding in Triton gives torch.mul's bits, into the model's
    strided view (a (B, T, H, D) projection seen as (B, H, T, D)); 40 rows: the last 16-row block partial. Bit for
    bit on a GPU (and on CPU but for bf16, which the interpreter rounds toward zero, not to nearest even)."""
    from megascale.kernels.attention import _delta, _dq_cast  # noqa: PLC0415

    B, H, T, D = 2, 3, 40, 32
    gen = torch.Generator().manual_seed(29)
    o, do = (torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
    acc = torch.randn(B, H, T, D, generator=gen) * 1e3
    lse = torch.zeros(B, H, T)
    plain = _delta(o, do, lse)
    with_zeros = _delta(o, do, lse, acc)
    assert torch.equal(plain, with_zeros) and not acc.any()
    torch.testing.assert_close(plain, (o.float() * do.float()).sum(-1), rtol=1e-5, atol=1e-5)
    acc = torch.randn(B, H, T, D, generator=gen) * 1e3
    dq = torch.empty(B, T, H, D, dtype=dtype).transpose(1, 2)
    _dq_cast(acc, dq, 0.0883883)
    expected = torch.empty_like(dq)
    torch.mul(acc, 0.0883883, out=expected)
    if dtype == torch.bfloat16 and not CUDA:  # Triton's interpreter rounds fp32 to bf16 toward zero: within an ulp
        torch.testing.assert_close(dq, expected, rtol=2**-7, atol=0)
        assert not torch.equal(dq, expected)  # (the day it rounds as the GPU does, this says so)
    else:
        assert torch.equal(dq, expected)


def test_persistent_forward_hands_out_its_tiles_as_the_block_scheduler_would():
    """The persistent forward's blocks take the tiles the host scheduled for them (``persistent_schedule``): every
    query block once, each block's in launch order, each to the block that frees up first. At 4k (64 heads, 132
    blocks) the busiest block ends within 0.5% of an even share, where taking tiles in turn (the first persistent
    forward: program_id, + programs, ...) put it 27% past; the kernel reads them as a column a block, -1 after."""
    from megascale.kernels import attention_gluon as G  # noqa: PLC0415

    assert G.persistent_schedule([5, 3, 3, 1, 1, 1], 2) == [[0, 3, 4], [1, 2, 5]]  # both blocks end at 7
    costs = G.tile_costs(4096, 128, 128, 64, 8, True)
    # eight heads' last query block (32 key blocks, + 1 for its start and end) first, then their second last, ...
    assert len(costs) == 32 * 64 and costs[:9] == [33] * 8 + [32] and costs[255:257] == [2, 33]
    assert set(G.tile_costs(1000, 128, 64, 4, 4, False)) == {16 + 1}  # full: every query block sees every key
    columns = G.persistent_schedule(costs, 132)
    assert sorted(t for c in columns for t in c) == list(range(len(costs))) and all(c == sorted(c) for c in columns)
    even = sum(costs) / 132
    assert max(sum(costs[t] for t in c) for c in columns) < 1.005 * even
    assert max(sum(costs[p::132]) for p in range(132)) > 1.25 * even
    table = G._schedule(300, 128, 128, 4, 4, True, 3, torch.device("cpu"))
    columns = G.persistent_schedule(G.tile_costs(300, 128, 128, 4, 4, True), 3)
    assert table.dtype == torch.int32 and table.shape == (max(map(len, columns)), 3)
    for p, column in enumerate(columns):
        assert table[:, p].tolist() == column + [-1] * (table.shape[0] - len(column))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_launch_order_computes_the_same(monkeypatch, causal):
    """The Triton kernels with heads launched 8 at a time (B · H = 8, GQA 2: the dK/dV pass 4) and head by head
    (MEGASCALE_ATTN_ORDER_HEADS=1, the grid before): the same output and gradients, bit for bit (each block's
    sums do not depend on when it runs). 40 keys: three 16-key tiles under the interpreter, the last one partial."""
    q, k, v, do = _inputs(2, 4, 2, 40, 32, torch.float32, seed=23)
    results = []
    for order in ("8", "1"):
        monkeypatch.setenv("MEGASCALE_ATTN_ORDER_HEADS", order)
        out = flash_attention(q, k, v, causal=causal)
        results.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    _check_output(flash_attention(q, k, v, causal=causal), q, k, v, do, causal)


def test_gluon_tuner_passes_over_a_candidate_the_device_cannot_run(monkeypatch):
    """best_tile as Triton's autotuner: a candidate that needs more shared memory than the device has is timed as
    never, the fastest of the others wins, and with none left the first error is raised. (do_bench stands in for
    the GPU timer: it calls the launch once and returns the tile's made-up time.)"""
    import triton.testing  # noqa: PLC0415
    from triton.runtime.errors import OutOfResources  # noqa: PLC0415

    from megascale.kernels import attention_gluon  # noqa: PLC0415

    monkeypatch.setattr(attention_gluon, "_TUNED", {})
    monkeypatch.setattr(attention_gluon, "_TIMES", {})
    made_up = {"a": 3.0, "b": 1.0, "c": 2.0}

    def launch(tile):
        if tile == "b":
            raise OutOfResources(240_000, 232_448, "shared memory")
        return made_up[tile]

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: fn())
    assert attention_gluon.best_tile(["a", "b", "c"], lambda: launch, ("k", 1), tune=True) == "c"
    assert attention_gluon.best_tile(["b", "a"], lambda: launch, ("k", 1), tune=True) == "c"  # timed once a key
    assert attention_gluon._TIMES == {("k", 1): {"a": 3.0, "c": 2.0}}  # every candidate that ran, for the benchmark
    with pytest.raises(OutOfResources, match="shared memory"):
        attention_gluon.best_tile(["b", "b"], lambda: launch, ("k", 2), tune=True)


def test_atomic_dq_takes_the_models_strided_views():
    """The model's transposed (B, T, H, D) views and a stride-0 dO: dQ comes back in q's own layout."""
    B, T, H, H_kv, D = 2, 23, 4, 2, 32
    q, kv, views = _model_views(torch.Generator(device=DEVICE).manual_seed(2), B, T, H, H_kv, D)
    dq = torch.autograd.grad(flash_attention(*views, deterministic=False).sum(), views[0])[0]
    assert dq.stride() == views[0].stride()
    _check_sum_grads(q, kv, views, deterministic=False)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ws_with_a_fixed_tile_matches_reference(causal):
    """A 64-row query block (two 32-row halves) against 16-key blocks: the diagonal falls inside each half."""
    q, k, v, do = _inputs(1, 2, 1, 45, 32, torch.bfloat16, seed=12)
    _tma_or_skip(q, k, v)
    out = FlashAttention.apply(q, k, v, causal, 1 / 32**0.5, Tiles(fwd=(64, 16), dkdv=(16, 32), dq=(32, 16)), False, True)
    ref = attention_reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 32), (torch.bfloat16, 256)], ids=["fp32", "D256"])
def test_ws_refuses_fp32_and_wide_heads(dtype, head_dim):
    q, k, v, _ = _inputs(1, 2, 1, 16, head_dim, dtype)
    with pytest.raises(ValueError, match="ws=True takes float16/bfloat16 and head dim <= 128"):
        flash_attention(q, k, v, ws=True)


def test_tma_takes_the_models_strided_views_and_refuses_misaligned_ones():
    B, T, H, D = 2, 33, 4, 32
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE).transpose(1, 2).requires_grad_() for _ in range(3))
    _tma_or_skip(q, k, v)
    do = torch.randn_like(q)
    _check(q, k, v, do, causal=True, tma=True)  # (B, T, H, D) projections seen as (B, H, T, D)
    # The gradient of a sum arrives expanded (stride 0), which TMA cannot describe: copied dense first.
    got = torch.autograd.grad(flash_attention(q, k, v, tma=True).sum(), (q, k, v))
    want = torch.autograd.grad(attention_reference(q, k, v).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    odd = torch.randn(B * H * T * D + 1, device=DEVICE)[1:].view(B, H, T, D)  # starts 4 bytes past an aligned one
    assert "16-byte aligned start" in tma_unsupported_reason(odd, k, v)
    with pytest.raises(ValueError, match="q: TMA needs"):
        flash_attention(odd, k, v, tma=True)
    assert flash_attention(odd, k, v).shape == odd.shape  # the pointer kernel takes any alignment


def test_explicit_softmax_scale():
    _check(*_inputs(1, 2, 1, 24, 32, torch.float32), causal=True, scale=0.3)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf"), float("nan")])
def test_non_positive_softmax_scale_is_refused(scale):
    q, k, v = _inputs(1, 2, 1, 8, 32, torch.float32)[:3]
    with pytest.raises(ValueError, match="softmax_scale must be a positive finite number"):
        flash_attention(q, k, v, softmax_scale=scale)


def test_strided_inputs_and_broadcast_upstream_gradient():
    """The model's layout: q, k, v are transposed views of (B, T, H, D); o.sum() gives a stride-0 dO."""
    B, T, H, H_kv, D = 2, 23, 4, 2, 32
    q, kv, views = _model_views(torch.Generator(device=DEVICE).manual_seed(1), B, T, H, H_kv, D)  # (B, h, T, D)
    assert not any(x.is_contiguous() for x in views)
    _check_sum_grads(q, kv, views, causal=True)


def test_reference_matches_sdpa():
    """The reference itself: agrees with PyTorch SDPA (GQA by repeated K/V)."""
    q, k, v, _ = _inputs(2, 4, 2, 33, 32, torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True
    )
    torch.testing.assert_close(attention_reference(q, k, v, causal=True), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "q_shape, kv_shape, dtype, expected",
    [
        ((1, 4, 8, 96), (1, 4, 8, 96), torch.float32, "head dim 96 not in (32, 64, 128, 256)"),
        ((1, 4, 8, 32), (1, 3, 8, 32), torch.float32, "4 query heads are not a multiple of 3 kv heads"),
        ((1, 4, 8, 32), (1, 4, 9, 32), torch.float32, "differ in batch, length or head dim"),
        ((1, 4, 8, 32), (1, 4, 8, 32), torch.float64, "dtype torch.float64 not in"),
        ((4, 8, 32), (4, 8, 32), torch.float32, "expected 4-D"),
    ],
)
def test_unsupported_inputs_raise_with_reason(q_shape, kv_shape, dtype, expected):
    q = torch.zeros(q_shape, dtype=dtype, device=DEVICE)
    k = v = torch.zeros(kv_shape, dtype=dtype, device=DEVICE)
    assert expected in unsupported_reason(q, k, v)
    with pytest.raises(ValueError, match="flash_attention: "):
        flash_attention(q, k, v)


def test_supported_configs():
    assert unsupported_config(64, torch.bfloat16, DEVICE) is None
    assert unsupported_config(128, torch.float32, DEVICE) is None
    assert "head dim 80" in unsupported_config(80, torch.bfloat16, DEVICE)
    assert "device meta" in unsupported_config(64, torch.bfloat16, "meta")
    assert "head dim 256 spills" in unsupported_config(256, torch.float32, "cuda")


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 128), (torch.float16, 256), (torch.float32, 64)])
def test_autotune_candidates_follow_width_head_dim_and_the_switch(monkeypatch, dtype, head_dim):
    """The pruner keeps the tiles listed for the input width and head dim; MEGASCALE_TRITON_AUTOTUNE=0 the first."""
    import triton  # noqa: PLC0415

    from megascale.kernels import attention as kernel  # noqa: PLC0415

    for table in (kernel._FWD_TILES, kernel._DKDV_TILES, kernel._DQ_TILES):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]
        prune = kernel._pruner(table)
        args = {"Q": torch.empty(1, 1, 1, head_dim, dtype=dtype)}
        want = (torch.empty((), dtype=dtype).element_size() * 8, head_dim)
        monkeypatch.delenv("MEGASCALE_TRITON_AUTOTUNE", raising=False)
        tuned = prune(configs, args, HEAD_DIM=head_dim)
        assert tuned and all(want in table[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
                             for c in tuned)
        monkeypatch.setenv("MEGASCALE_TRITON_AUTOTUNE", "0")
        assert prune(configs, args, HEAD_DIM=head_dim) == tuned[:1]


# --- the model's backend switch (megascale/model/attention.py) ---------------------------------


def test_backend_resolution_uses_kernel_support():
    from megascale.errors import MegascaleError
    from megascale.model.attention import resolve_backend

    device = torch.device(DEVICE)
    assert resolve_backend("triton", device, head_dim=64) == ("triton", "requested")
    if tma_unsupported_reason(*(torch.zeros(1, 1, 16, 64, device=DEVICE) for _ in range(3))) is None:
        assert resolve_backend("triton-tma", device, head_dim=64) == ("triton-tma", "requested")
    backend, why = resolve_backend("auto", device, head_dim=64, dtype=torch.bfloat16)
    if CUDA and torch.cuda.get_device_capability() >= (9, 0) and torch.backends.cudnn.is_available():
        assert backend == "cudnn" and "Hopper" in why  # measured fastest there (BENCHMARKS.md)
    elif CUDA:
        assert backend == "triton"
        backend, why = resolve_backend("auto", device, head_dim=96)
        assert backend == "torch" and "head dim 96 not in" in why
    else:  # the interpreter is for explicit requests only
        assert backend == "torch" and "no CUDA device" in why
    with pytest.raises(MegascaleError, match="head dim 96 not in"):
        resolve_backend("triton", device, head_dim=96)


@pytest.mark.parametrize("kernel", ["triton", "triton-tma"])
def test_model_with_triton_backend_matches_torch_backend(kernel):
    """A tied GQA model (head dim 32) gives the same loss and gradients with either backend."""
    from megascale.config import ModelConfig
    from megascale.model import Transformer

    cfg = ModelConfig(vocab_size=61, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=24, sharing="all")
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE)
    tokens = torch.randint(0, 61, (1, 19), device=DEVICE)
    results = []
    for backend in ("torch", kernel):
        model.zero_grad()
        model.set_attention_backend(backend)
        loss = model(tokens, tokens)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_t, grads_t), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_k, grads_t):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# Tile shapes other than the interpreter's autotune choice (16 × 16): BLOCK_M ≠ BLOCK_N moves the
# causal diagonal and the sequence tail to different places inside a tile, as the GPU configs do.
TILES = [
    Tiles(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16)),
    Tiles(fwd=(16, 32), dkdv=(32, 16), dq=(16, 32)),
    Tiles(fwd=(64, 16), dkdv=(16, 64), dq=(64, 16)),
]


@pytest.mark.parametrize("deterministic", [True, False], ids=["dq-kernel", "dq-atomic"])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*t.fwd, *t.dkdv, *t.dq))
def test_uneven_tiles_match_reference(tiles, causal, tma, deterministic):
    q, k, v, do = _inputs(1, 4, 2, 45, 32, torch.float32, seed=3)
    scale = 1 / 32**0.5
    out = FlashAttention.apply(q, k, v, causal, scale, tiles, tma, False, deterministic)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = attention_reference(q, k, v, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
