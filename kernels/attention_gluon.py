"""The attention forward for Hopper in Gluon, with FlashAttention-3's overlap of softmax and products.

Why a second forward: the Triton kernels (``attention.py``) leave the schedule to
Triton's pipeliner, which waits for every tensor-core product right after issuing
it (``bench/attention_layout.py``: a ``wgmma.wait_group 0`` after each), so the
tensor cores idle while the softmax runs. The H100 timed them at 415-524 TFLOP/s
(head dim 128, causal, 4k-16k; BENCHMARKS.md) against cuDNN's 543-581. Gluon,
Triton's lower-level language (``triton.experimental.gluon``, Triton >= 3.5),
states the schedule: layouts, shared-memory buffers, barriers and the
asynchronous products are written out, and the compiler keeps them.

The schedule (FlashAttention-3, Shah et al. 2024, "intra-warpgroup pipelining"),
per key block j after the first:

1. issue S_j = Q K_jᵀ (asynchronous ``wgmma``);
2. issue O += P_{j-1} V_{j-1} (asynchronous, P from registers);
3. wait until only the second is in flight (``warpgroup_mma_wait(1)``);
4. softmax of S_j — row maximum, exp2, row sum — *while P_{j-1} V_{j-1} runs*;
5. wait for it, rescale O by exp2(m_old - m_new), keep P_j for the next block.

K and V arrive by TMA in rings of STAGES buffers with one barrier each, issued
STAGES blocks ahead; a buffer is refilled once every warp has waited for the
products that read it (a barrier of all threads: the two warp groups of a 128-row
query block each multiply their own 64 rows by the same K/V tile).

What the other kernels' callers rely on holds here: q, k, v (B, H, T, D) /
(B, H_kv, T, D) strided views, grouped-query heads read in place (4-D
descriptors), any length (rows past the end arrive as zeros, stores clip), the
log2-domain log-sum-exp the backward reads. 16-bit inputs and head dims 64 and
128 only (``unsupported_reason``).

No interpreter runs Gluon, so on a machine without a GPU this kernel is only
compiled (``bench/attention_layout.py --kernels fwd-gluon``; the tests check its
products overlap and that it does not spill); its parity tests need a Hopper GPU.
"""

from __future__ import annotations

import functools

import torch
import triton

try:  # Gluon: Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # TMA copies: Triton 3.6 (the GPU machine's) names them async_copy_*, 3.9 (this suite's) async_load / async_store
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # every thread of the block: 3.9 / 3.6
except ImportError as err:  # pragma: no cover - depends on the installed Triton
    GLUON_IMPORT_ERROR: str | None = f"Triton {triton.__version__} has no Gluon for Hopper ({err})"
else:
    GLUON_IMPORT_ERROR = None

GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.float16, torch.bfloat16)
# Candidate (BLOCK_M, BLOCK_N, STAGES) per head dim, timed on the first call of a shape (``best_tile``); the first
# is the default. A warp takes 16 query rows, so BLOCK_M / 16 warps: 128 rows are two warp groups in step, 64 rows
# one. Compiled for sm_90a (bench/attention_layout.py --kernels fwd-gluon, Triton 3.6 and 3.9), none spills; at head
# dim 128: 128 x 128 190-193 registers and 160 KiB of shared memory (one block an SM), 128 x 64 145, 64 x 64 141
# registers and 112 KiB: two blocks an SM, whose softmax and products the SM's schedulers interleave with each other
# (FlashAttention-3's "ping-pong" between warp groups, left to the hardware).
GLUON_TILES = {
    128: [(128, 128, 2), (128, 64, 3), (64, 64, 3), (64, 128, 2)],
    64: [(128, 128, 2), (128, 64, 3), (64, 64, 3), (64, 128, 2)],
}


def warps(block_m: int) -> int:
    """Warps of a BLOCK_M-row tile: 16 rows each (a wgmma instruction's m), all along the rows."""
    return block_m // 16


if GLUON_IMPORT_ERROR is None:

    @gluon.jit
    def _load_block(desc, b, h, row, bar, dst, pred):
        """Bring one (1, 1, rows, D) box at row ``row`` of head (b, h) into ``dst``; ``bar`` completes on arrival."""
        mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
        _tma_load(desc, [b, h, row, 0], bar, dst, pred=pred)

    @gluon.jit
    def _scores(s, offs_m, start_n, seq_len, mask_from, CAUSAL: gl.constexpr, BLOCK_N: gl.constexpr,
                col_layout: gl.constexpr):
        """S with the keys a row may not see set to -inf; only blocks that reach ``mask_from`` pay for it."""
        if start_n + BLOCK_N > mask_from:
            offs_n = start_n + gl.arange(0, BLOCK_N, layout=col_layout)
            keep = gl.expand_dims(offs_n < seq_len, 0)
            if CAUSAL:
                keep = keep & (gl.expand_dims(offs_m, 1) >= gl.expand_dims(offs_n, 0))
            s = gl.where(keep, s, float("-inf"))
        return s

    @gluon.jit
    def _fwd_gluon_kernel(desc_q, desc_k, desc_v, desc_o, LSE, n_heads, group, seq_len, qk_scale,
                          HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
        dtype: gl.constexpr = desc_q.dtype
        # The products' register layouts: all warps along the query rows, 16 rows a warp.
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

        qk_scale = qk_scale.to(gl.float32)
        # Causal query blocks near the end do the most work: launched first, the light ones fill the tail.
        if CAUSAL:
            pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
        else:
            pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        kv_h = h // group
        start_m = pid_m * BLOCK_M
        if CAUSAL:
            hi = gl.minimum(start_m + BLOCK_M, seq_len)
            mask_from = gl.minimum(start_m + 1, seq_len)  # a key block ending at or before it needs no mask
        else:
            hi = seq_len
            mask_from = seq_len
        n_blocks = gl.cdiv(hi, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, desc_q.block_type.shape, desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_bars.index(i), count=1)
            mbarrier.init(v_bars.index(i), count=1)

        _load_block(desc_q, b, h, start_m, q_bar, q_smem, True)
        for i in gl.static_range(STAGES):
            _load_block(desc_k, b, kv_h, i * BLOCK_N, k_bars.index(i), k_smem.index(i), i < n_blocks)
            _load_block(desc_v, b, kv_h, i * BLOCK_N, v_bars.index(i), v_smem.index(i), i < n_blocks)

        q = q_smem.reshape([BLOCK_M, HEAD_DIM])
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, 0)

        # Key block 0: nothing to overlap with yet.
        mbarrier.wait(k_bars.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        s = _scores(s, offs_m, 0, seq_len, mask_from, CAUSAL, BLOCK_N, cols)
        m_i = gl.max(s, 1) * qk_scale  # key 0 is visible to every row: finite
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        p = gl.convert_layout(p.to(dtype), p_layout)
        _cta_barrier()  # every warp is past its product with K buffer 0: refill it
        _load_block(desc_k, b, kv_h, STAGES * BLOCK_N, k_bars.index(0), k_smem.index(0), STAGES < n_blocks)

        for j in range(1, n_blocks):
            slot = j % STAGES
            prev = (j - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
            acc = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j done; P_{j-1} V_{j-1} still running
            s = _scores(s, offs_m, j * BLOCK_N, seq_len, mask_from, CAUSAL, BLOCK_N, cols)
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p_j = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
            l_i = l_i * alpha + gl.sum(p_j, 1)
            m_i = m_new
            acc, p = warpgroup_mma_wait(0, deps=(acc, p))  # P_{j-1}'s registers are read until here
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)
            p = gl.convert_layout(p_j.to(dtype), p_layout)
            _cta_barrier()  # K buffer `slot` and V buffer `prev` are read by no product any more
            _load_block(desc_k, b, kv_h, (j + STAGES) * BLOCK_N, k_bars.index(slot), k_smem.index(slot),
                        j + STAGES < n_blocks)
            _load_block(desc_v, b, kv_h, (j - 1 + STAGES) * BLOCK_N, v_bars.index(prev), v_smem.index(prev),
                        j - 1 + STAGES < n_blocks)

        last = (n_blocks - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // STAGES) & 1)
        acc = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_bars.index(i))
            mbarrier.invalidate(v_bars.index(i))
        o = (acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)).to(dtype)
        q_smem.reshape([BLOCK_M, HEAD_DIM]).store(o)  # Q's buffer is free: every product is done
        fence_async_shared()
        _tma_store(desc_o, [b, h, start_m, 0], q_smem)
        # log2-sum-exp2 of the scaled scores, as the Triton forward saves it for the backward
        gl.store(LSE + pid_bh.to(gl.int64) * seq_len + offs_m, m_i + gl.log2(l_i), mask=offs_m < seq_len)
        tma.store_wait(0)


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


@functools.lru_cache(maxsize=None)
def shared_layout(rows: int, head_dim: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a (1, 1, rows, D) box, as TMA and ``wgmma`` both read it."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _gl_dtype(dtype))


def descriptor(x: torch.Tensor, rows: int):
    """A 4-D TMA descriptor of a (B, heads, T, D) strided view moving (1, 1, rows, D) boxes."""
    box = [1, 1, rows, x.shape[-1]]
    return TensorDescriptor(x, list(x.shape), list(x.stride()), box, shared_layout(rows, x.shape[-1], x.dtype))


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this forward cannot take q (on top of the Triton kernels' own checks), or None when it can."""
    if GLUON_IMPORT_ERROR is not None:
        return GLUON_IMPORT_ERROR
    if q.dtype not in GLUON_DTYPES:
        return f"the Gluon forward takes float16/bfloat16, got {q.dtype}"
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        return f"the Gluon forward takes head dims {GLUON_HEAD_DIMS}, got {q.shape[-1]}"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "the Gluon forward is written for Hopper (compute capability 9.x: wgmma)"
    return None


def _launch(q, k, v, o, lse, causal: bool, qk_scale: float, tile: tuple[int, int, int]) -> None:
    B, H, T, D = q.shape
    block_m, block_n, stages = tile
    descs = (descriptor(q, block_m), descriptor(k, block_n), descriptor(v, block_n), descriptor(o, block_m))
    _fwd_gluon_kernel[(triton.cdiv(T, block_m), B * H)](
        *descs, lse, H, H // k.shape[1], T, qk_scale,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=warps(block_m),
    )


def tile_for(head_dim: int, block: tuple[int, int]) -> tuple[int, int, int]:
    """The candidate with this (BLOCK_M, BLOCK_N) (``attention.Tiles.fwd``), or ValueError naming the ones there are."""
    for tile in GLUON_TILES[head_dim]:
        if tile[:2] == tuple(block):
            return tile
    raise ValueError(f"the Gluon forward has no {block[0]} x {block[1]} tile at head dim {head_dim}; "
                     f"its tiles: {', '.join(f'{m} x {n}' for m, n, _ in GLUON_TILES[head_dim])}")


# (head dim, causal, dtype, length bucket, device) -> the fastest candidate: a process's shapes are few (a model's).
_TUNED: dict[tuple, tuple[int, int, int]] = {}


def best_tile(q, k, v, causal: bool, qk_scale: float, tune: bool, bucket: int) -> tuple[int, int, int]:
    """The candidate tile for this call: the first listed when not ``tune``, else the fastest of them on this
    shape, timed once per (head dim, mask, dtype, length bucket, device) like Triton's autotuner does (the
    forward writes only its outputs, so running it to time it is harmless)."""
    candidates = GLUON_TILES[q.shape[-1]]
    if not tune or len(candidates) == 1:
        return candidates[0]
    key = (q.shape[-1], causal, q.dtype, bucket, q.device)
    if key not in _TUNED:
        from triton.testing import do_bench  # noqa: PLC0415

        o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        times = {tile: do_bench(lambda t=tile: _launch(q, k, v, o, lse, causal, qk_scale, t), warmup=5, rep=20)
                 for tile in candidates}
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, qk_scale: float,
            tile: tuple[int, int] | None = None, tune: bool = True, bucket: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, log2-sum-exp) of attention(q, k, v), the Triton ``_forward``'s contract; qk_scale = softmax scale · log2(e).

    tile: a fixed (BLOCK_M, BLOCK_N) among ``GLUON_TILES`` (the tests'); else ``best_tile`` with ``tune`` and the
    length's tuning ``bucket``. The caller checks the inputs (``attention.flash_attention``, with this module's
    ``unsupported_reason``).
    """
    o = torch.empty_like(q)  # q's memory layout
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)  # (B, H, T)
    chosen = tile_for(q.shape[-1], tile) if tile else best_tile(q, k, v, causal, qk_scale, tune, bucket)
    _launch(q, k, v, o, lse, causal, qk_scale, chosen)
    return o, lse
