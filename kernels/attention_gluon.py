"""Attention for Hopper in Gluon: a forward with FlashAttention-3's overlap of softmax and products, and a
one-kernel backward.

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
products that read it (a barrier of the compute warps: the two warp groups of a
128-row query block each multiply their own 64 rows by the same K/V tile). The
compute warps issue the copies themselves, or (TMA_WARP) a warp of their own does
(``_fwd_loader``, FlashAttention-3's producer), told of each free buffer by an
mbarrier: Gluon surrounds every copy the compute warps issue with a barrier of
all of them (4 a key block), which the TMA warp leaves out.

PING_PONG is FlashAttention-3's other half, between warp groups: the 128 query
rows are two partitions of one warp group each (64 rows, a Q buffer of their
own), beside the TMA warp. Two warp groups in step run their softmax at the same
time, and the tensor cores idle through it but for the overlapped P V; here
they take turns issuing their products (an mbarrier each, passed on as soon as
the products are issued), so one group's softmax runs while the other's
products do. Each K/V buffer is freed when both groups are done with it.

PERSISTENT is the ping-pong in a persistent kernel, FlashAttention-3's scheduler: a block an SM, each taking
query blocks in turn (causal: the heaviest first, in the launch order below), so that the
TMA warp brings the next query block's Q and first K/V while this one's last products and its O's store run. The
rings of K/V buffers and of turns count on across query blocks; each warp group has two Q buffers, the next Q
landing in one while the other holds this block's Q and then its O on the way out. On the H200 the ping-pong ran
at 528 TFLOP/s at 4k and 612 at 16k (head dim 128, causal), where a block has four times the key blocks to spread
its start and end over; this is what it is for. Timed on the H200 (2026-11-27) it ran 12-23% below the ping-pong
at 2k-16k: its blocks took the tiles in turn (program_id, + programs, ...), which over the launch order's head
groups gives some blocks a heavy tile every round (a model puts the last block's end 27% past an even share at
4k). Since 2026-11-28 the host hands the tiles out as the GPU's block scheduler would (``persistent_schedule``:
0.2% at 4k by the same model), and the kernel reads them from a table (not yet timed).

Launch order (every kernel here, ``_lpt_block``): heads eight at a time (fewer where B · H has no factor 8), and
within such a group block by block, each over the group's heads, the heaviest blocks first (causal: the forward's
last query blocks, the backward's first key blocks). Until 2026-11-27 the grid went head by head, each head's
blocks heaviest first, so the last heads' heaviest blocks started when little else was left to run: a
list-scheduling model of 132 SMs (one block each; ``bench/launch_order.py``) puts that tail at 5.3-6.7% of a
causal forward's time at 2k-8k (16,384 tokens a call), 0.5% at 16k; the grouped order leaves 0-1.7%. Groups of heads rather than all
heads at once, so that the blocks running together read the K/V (backward: Q and dO) of a few heads, which L2
holds (8 heads at 4k: 16 MiB). Not yet timed.

The backward (``_bwd_gluon_kernel``; ``flash_attention(gluon=True, deterministic=False)``) is the Triton
dK/dV kernel's DQ_ATOMIC form written out: one program per (key block, K/V head), the query blocks of the
head's whole query group streaming past by TMA; Sᵀ = K Qᵀ and dPᵀ = V dOᵀ issued together, Pᵀ computed
while dPᵀ runs, then dV += Pᵀ dO and dK += dSᵀ Q from registers and dQ's share (dS K, or Kᵀ dSᵀ for
32-query steps, which a warp group cannot multiply as 32 rows) from dSᵀ in shared memory, the three
issued together and waited for once; dQ's share is added into an fp32 buffer by atomics: by the compute warps,
or (DQ_WARP) by the loading warp group, which reads it from shared memory, as FlashAttention-3's backward hands
dQ to a warp of its own; DQ_AHEAD besides issues the next step's Sᵀ and dPᵀ before waiting for this step's three
products, so the tensor cores have work through the dQ handoff and the step's barrier. At head dim 128
the 32-query step keeps dK, dV and the step's tiles in 238-251 registers without a spill (64 queries
spill 8-124 bytes; Triton 3.9 and 3.6).

What the other kernels' callers rely on holds here: q, k, v (B, H, T, D) /
(B, H_kv, T, D) strided views, grouped-query heads read in place (4-D
descriptors), any length (rows past the end arrive as zeros, stores clip), the
log2-domain log-sum-exp the backward reads. 16-bit inputs and head dims 64 and
128 only (``unsupported_reason``).

No interpreter runs Gluon, so on a machine without a GPU these kernels are only
compiled (``bench/attention_layout.py --kernels fwd-gluon,bwd-gluon``; the tests check
their products overlap and that the default tiles do not spill); their parity tests
need a Hopper GPU. On an H200 (2026-11-27, Triton 3.6; BENCHMARKS.md) all passed, the tuner
took the ping-pong forward and the DQ_WARP backward at 32 x 128, and at head dim 128, causal,
4k-16k the forward ran at 528-615 TFLOP/s (0.95-1.04x cuDNN), forward and backward together
at 0.84-0.85x cuDNN.
"""

from __future__ import annotations

import functools
import heapq
import os

import torch
import triton
import triton.language as tl

from ._host import order_heads

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

# Who loads K and V in the forward (a candidate's fourth field): the compute warps themselves; a TMA warp of its
# own (FlashAttention-3's producer); or a TMA warp and two compute warp groups of 64 query rows each that take turns
# issuing their products (FlashAttention-3's "ping-pong": one group's softmax runs while the other's products do).
# The backward has the first two, and DQ_WARP: a loading warp group also adds each step's dQ share into the fp32 buffer,
# which the compute warps leave in shared memory (FlashAttention-3's backward hands dQ to a warp of its own too).
# PERSISTENT is the ping-pong forward in a persistent kernel (``_fwd_compute_tiles``): one block an SM, each taking
# query blocks in turn, in ``_lpt_block``'s order, so the next block's copies overlap this one's last products and
# its O's store (FlashAttention-3's persistent scheduler; a block's start and end cost most at short lengths).
# DQ_AHEAD is DQ_WARP with the next step's Sᵀ and dPᵀ issued before this step's dV, dK and dQ products are waited
# for (``_bwd_compute``): the tensor cores run them through this step's dQ handoff and barrier.
OWN_LOADS, TMA_WARP, PING_PONG, DQ_WARP, PERSISTENT, DQ_AHEAD = 0, 1, 2, 3, 4, 5
LOADERS = {OWN_LOADS: "", TMA_WARP: "TMA warp", PING_PONG: "ping-pong", DQ_WARP: "TMA + dQ warp",
           PERSISTENT: "persistent ping-pong", DQ_AHEAD: "TMA + dQ warp, next S/dP ahead"}
# the kernels read globals as constexprs
_TMA_WARP, _PING_PONG, _DQ_WARP = tl.constexpr(TMA_WARP), tl.constexpr(PING_PONG), tl.constexpr(DQ_WARP)
_DQ_AHEAD = tl.constexpr(DQ_AHEAD)
_PERSISTENT = tl.constexpr(PERSISTENT)

GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.float16, torch.bfloat16)
# Candidate (BLOCK_M, BLOCK_N, STAGES, loader) per head dim, timed on the first call of a shape (``best_tile``);
# the first is the default. A warp takes 16 query rows, so BLOCK_M / 16 compute warps: 128 rows are two warp groups
# in step, 64 rows one. TMA_WARP adds a TMA warp (``_fwd_loader``; 12 warps in all at 128 rows, the compute warps'
# registers raised to 240 by setmaxnreg) so that the compute warps neither issue copies nor meet at a barrier of all
# threads around each. PING_PONG splits the 128 rows between two warp groups of their own that take turns issuing
# their products, so one group's softmax always has the other's products beside it (``_take_turn``). Compiled for
# sm_90a (bench/attention_layout.py --kernels fwd-gluon, Triton 3.6 and 3.9), none spills; at head dim 128: 128 x 128
# 189-193 registers and 160 KiB of shared memory (one block an SM), 128 x 64 145-148, 64 x 64 141-145 registers and
# 112 KiB: two blocks an SM, whose softmax and products the SM's schedulers interleave with each other (ping-pong
# left to the hardware). PERSISTENT: the ping-pong tile in a persistent kernel, two Q buffers a warp group (192 KiB
# at head dim 128). The H200 (2026-11-27) chose the ping-pong at every length: 528 TFLOP/s at 4k, 612 at 16k, where a
# block has 4 times the key blocks to spread its start and end over.
GLUON_TILES = {
    128: [(128, 128, 2, OWN_LOADS), (128, 64, 3, OWN_LOADS), (64, 64, 3, OWN_LOADS), (64, 128, 2, OWN_LOADS),
          (128, 128, 2, TMA_WARP), (128, 64, 3, TMA_WARP), (128, 128, 2, PING_PONG), (128, 128, 2, PERSISTENT)],
    64: [(128, 128, 2, OWN_LOADS), (128, 64, 3, OWN_LOADS), (64, 64, 3, OWN_LOADS), (64, 128, 2, OWN_LOADS),
         (128, 128, 2, TMA_WARP), (128, 64, 3, TMA_WARP), (128, 128, 2, PING_PONG), (128, 128, 2, PERSISTENT)],
}

# The backward's (BLOCK_M queries a step, BLOCK_N keys a program, STAGES, loader); BLOCK_N / 16 compute warps, and
# with TMA_WARP a TMA warp (``_bwd_loader``), with DQ_WARP a warp group that loads and adds dQ (``_bwd_loader``).
# At head dim 128 (sm_90a, Triton 3.9 / 3.6, causal and not): 32 x 64 236-251 registers, no spill. With a TMA warp
# none spills: the compute warps get 256 registers by setmaxnreg at 32 x 64 (one block an SM; without it two fit),
# 240 at 32 x 128 (two warp groups sharing each Q and dO tile, as FlashAttention-3's backward; 3 stages: a step
# more of Q and dO in flight). DQ_WARP takes dQ's atomics (and their addresses' registers) off the compute warps:
# they store each step's share to shared memory, 232-256 registers, no spill, and the loader adds it by 128-bit
# atomics (the compute warps' are 32-bit: their registers hold dQ's values a row or two apart). Left out: 32 x 128
# and 64 x 64 without a TMA warp (spill 28-124 bytes with 3.6, the GPU machine's). So 32 x 64 first. The H200
# (2026-11-27) chose 32 x 128 with the dQ warp group at every length (2k-16k, head dim 128, causal); beside it the
# same with 3 stages, a step more of Q and dO in flight (152 KiB, no spill, 3 bar.sync a step as with 2). With a
# loading partition the step's LSE and Δ come through shared memory (``_load_stats``), which takes their addresses
# off the compute warps (16-32 registers at 64 queries a step): FlashAttention-3's own tile, 64 x 128 with the dQ
# warp group, then spills nothing (it spilled 64-184 bytes), and 32 x 128's loop has 365 instructions a step, not
# 458. 64 queries a step halves what the S^T, dP^T and dQ^T products read from shared memory per product (their
# other side, 32 queries, is a small wgmma N); with a TMA warp alone 64 x 128 still spills (40-160 bytes).
# DQ_AHEAD (untimed): the dQ warp group's tile with the next step's S^T and dP^T issued before this step's dV, dK, dQ
# products are waited for (a wgmma.wait_group 2 in its loop, not 0), so the tensor cores have work through the dQ
# handoff, the step's barrier and the wait for the next Q/dO. No spill at 32 x 128, 2 stages, Triton 3.6 and 3.9,
# causal and not (nor at head dim 64, 64 x 64, which the GPU runs do not test: left out); 3 stages spills 4-12 bytes
# (3.6), 64 x 128 300-500: left out.
GLUON_BWD_TILES = {
    128: [(32, 64, 2, OWN_LOADS), (32, 64, 3, OWN_LOADS), (32, 64, 2, TMA_WARP), (32, 128, 2, TMA_WARP),
          (32, 128, 3, TMA_WARP), (32, 64, 2, DQ_WARP), (32, 128, 2, DQ_WARP), (32, 128, 3, DQ_WARP),
          (64, 128, 2, DQ_WARP), (32, 128, 2, DQ_AHEAD)],
    64: [(64, 64, 2, OWN_LOADS), (32, 64, 3, OWN_LOADS), (64, 64, 2, TMA_WARP), (64, 64, 2, DQ_WARP)],
}


def describe_tile(tile: tuple) -> str:
    """A candidate in words: '128 x 128, 2 stages, ping-pong'."""
    block_m, block_n, stages, loader = tile
    return ", ".join(filter(None, [f"{block_m} x {block_n}", f"{stages} stages", LOADERS[loader]]))


# Candidates the tuners leave out, "fwd:128x128-s2-pingpong,bwd:32x128-s2-dqwarp" (``tile_tag``):
# bench/gpu_session.py sets it from the candidates whose GPU tests failed or hung, so one broken candidate costs its
# own figures, not every other's (the tuner times them all: a hang there would stop the benchmark).
EXCLUDE_ENV = "MEGASCALE_GLUON_EXCLUDE"


def tile_tag(tile: tuple) -> str:
    """A candidate in a word, as the tests' ids and EXCLUDE_ENV name it: '128x128-s2-pingpong'."""
    block_m, block_n, stages, loader = tile
    return f"{block_m}x{block_n}-s{stages}" + {OWN_LOADS: "", TMA_WARP: "-ws", PING_PONG: "-pingpong",
                                                 DQ_WARP: "-dqwarp", PERSISTENT: "-persistent",
                                                 DQ_AHEAD: "-dqahead"}[loader]


def candidates(kind: str, head_dim: int) -> list[tuple]:
    """The tuner's candidates, ``kind`` "fwd" or "bwd": the table's, less those EXCLUDE_ENV names."""
    return list(_candidates(kind, head_dim, os.environ.get(EXCLUDE_ENV, "")))


@functools.lru_cache(maxsize=None)
def _candidates(kind: str, head_dim: int, exclude: str) -> tuple:
    """``candidates``, worked out once per setting: every attention call asks (a model's few shapes)."""
    excluded = {name.strip() for name in exclude.split(",")}
    table = (GLUON_TILES if kind == "fwd" else GLUON_BWD_TILES)[head_dim]
    kept = tuple(tile for tile in table if f"{kind}:{tile_tag(tile)}" not in excluded)
    if not kept:
        raise ValueError(f"{EXCLUDE_ENV} leaves the Gluon {kind} no candidate at head dim {head_dim}: "
                         f"unset it or name fewer")
    return kept


def forward_launch(tile: tuple) -> tuple[int, int]:
    """(query rows of each Q box, num_warps of the kernel) for a forward candidate: with PING_PONG (and PERSISTENT)
    each warp group loads half the block's rows, and the kernel's own warps are the first group (the second is a
    partition)."""
    block_m, _, _, loader = tile
    ping_pong = loader in (PING_PONG, PERSISTENT)
    if ping_pong and block_m != 128:
        raise ValueError(f"a ping-pong tile takes 128 query rows (two warp groups of 64), not {block_m}")
    rows = block_m // 2 if ping_pong else block_m
    return rows, warps(rows)


def warps(rows: int) -> int:
    """Warps of a kernel whose products have ``rows`` rows (the forward's queries, the backward's keys): 16 rows
    each, a wgmma instruction's m, all warps along the rows."""
    return rows // 16


if GLUON_IMPORT_ERROR is None:

    @gluon.constexpr_function
    def _mma_layout(num_warps, n):
        """The registers of a wgmma result, instructions n columns wide: 16 rows a warp, all warps along the rows."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])

    @gluon.constexpr_function
    def _consumers(loader):
        """The forward's compute partitions: PING_PONG's (and PERSISTENT's) two warp groups, else one."""
        return 2 if loader in (PING_PONG, PERSISTENT) else 1

    @gluon.constexpr_function
    def _q_buffers(loader):
        """The forward's Q buffers: one a compute partition; PERSISTENT's two, the next query block's Q landing in
        one while the other holds this block's (and then its O, on the way out)."""
        return _consumers(loader) * (2 if loader == PERSISTENT else 1)

    @gluon.constexpr_function
    def _dq_warp_group(loader):
        """Whether the backward's loading partition is a warp group that also adds dQ (DQ_WARP, DQ_AHEAD)."""
        return loader in (DQ_WARP, DQ_AHEAD)

    @gluon.constexpr_function
    def _dq_shape(loader, block_m, head_dim):
        """The backward's fp32 dQ buffers in shared memory: DQ_WARP's two, else a placeholder of one row."""
        return [2, block_m, head_dim] if _dq_warp_group(loader) else [1, 1, head_dim]

    @gluon.constexpr_function
    def _dq_shared_layout(transposed):
        """dQ's (BLOCK_M, D) fp32 buffer, read whole rows 8 at a time by the dQ loader (4 adjacent values a lane, one
        swizzle period) and written from the products' registers: Kᵀ dSᵀ's transposed share has a warp's lanes on 4
        rows 2 apart, 8 adjacent columns each, which 4-value groups swizzled over 8 rows spread over all 32 banks;
        dS K's has them on 8 adjacent rows, 2 values each, which 8-value groups spread, half a warp at a time."""
        return gl.SwizzledSharedLayout(4 if transposed else 8, 1, 8, [1, 0])

    @gluon.constexpr_function
    def _bwd_loader_warps(loader):
        """The backward's loading partition: DQ_WARP's warp group (the atomics), TMA_WARP's lone warp."""
        return 4 if _dq_warp_group(loader) else 1

    @gluon.constexpr_function
    def _bwd_loader_registers(loader, compute_warps):
        """Its registers: TMA_WARP's 24; DQ_WARP's 32 beside two compute warp groups (Triton gives them 232 each:
        168 a thread at launch, 3 x 168 over the three warp groups), 64 beside one (which gets 256)."""
        if not _dq_warp_group(loader):
            return 24
        return 32 if compute_warps == 8 else 64

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
    def _fwd_gluon_kernel(desc_q, desc_k, desc_v, desc_o, LSE, SCHEDULE, n_heads, group, seq_len, most, qk_scale,
                          HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, ORDER_HEADS: gl.constexpr,
                          num_warps: gl.constexpr):
        """One query block of one head (PERSISTENT: the query blocks SCHEDULE gives this block, at most ``most``, in
        turn: ``_fwd_compute_tiles``, ``_scheduled``; else SCHEDULE and most are not read). WS,
        who loads (``LOADERS``): TMA_WARP and PING_PONG take the TMA loads from a warp of their own (``_fwd_loader``),
        which the compute partitions tell when a buffer is free by an mbarrier each; OWN_LOADS has the compute warps
        issue them, and Gluon puts a barrier of all threads around each issue. PING_PONG's compute partitions are two
        warp groups of BLOCK_M / 2 rows (``_take_turn``)."""
        dtype: gl.constexpr = desc_q.dtype
        qk_scale = qk_scale.to(gl.float32)
        # Causal query blocks near the end do the most work: launched first, the light ones fill the tail.
        pid_m, pid_bh = _lpt_block(gl.program_id(1), gl.program_id(0), gl.cdiv(seq_len, BLOCK_M), CAUSAL, ORDER_HEADS)
        b, h, kv_h, start_m, n_blocks = _fwd_block(pid_m, pid_bh, n_heads, group, seq_len, CAUSAL, BLOCK_M, BLOCK_N)

        # One Q buffer per compute partition (PERSISTENT: two): PING_PONG's two warp groups take half the rows each
        # (desc_q's box).
        n_cons: gl.constexpr = _consumers(WS)
        q_bufs: gl.constexpr = _q_buffers(WS)
        q_smem = gl.allocate_shared_memory(dtype, [q_bufs] + desc_q.block_type.shape, desc_q.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [q_bufs, 1], mbarrier.MBarrierLayout())
        # ready: a buffer's TMA copy has landed. done (a TMA warp only): done.index(j % STAGES) completes when every
        # compute partition is past key block j's products, which frees K_j's buffer and V_{j-1}'s (``_fwd_release``).
        k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # PING_PONG: turns.index(w) completes when warp group w may issue its next products (``_take_turn``)
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(q_bufs):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(turns.index(i), count=1)
        for i in gl.static_range(STAGES):
            for ring in gl.static_range(2):
                mbarrier.init((k_bars, v_bars)[ring].index(i), count=1)
            mbarrier.init(done.index(i), count=n_cons)

        # (the frontend of Triton 3.6 takes no starred arguments: the lists are written out)
        if WS == _PING_PONG:
            # Each group is one warp group (the 4 warps below) of 16-row warps: 64 rows, so 128 in all.
            gl.static_assert(BLOCK_M == 128, "PING_PONG takes 128 query rows: two warp groups of 64")
            half: gl.constexpr = BLOCK_M // 2
            gl.warp_specialize([
                (_fwd_compute, (desc_k, desc_v, desc_o, LSE, q_smem.index(0), k_smem, v_smem, q_bars.index(0), k_bars,
                                v_bars, done, turns.index(0), turns.index(1), b, h, kv_h, pid_bh, start_m,
                                n_blocks, 0, 0, q_bars.index(0), seq_len, qk_scale, HEAD_DIM, CAUSAL, half, BLOCK_N,
                                STAGES, WS, True, 4)),
                (_fwd_compute, (desc_k, desc_v, desc_o, LSE, q_smem.index(1), k_smem, v_smem, q_bars.index(1), k_bars,
                                v_bars, done, turns.index(1), turns.index(0), b, h, kv_h, pid_bh,
                                start_m + half, n_blocks, 0, 0, q_bars.index(1), seq_len, qk_scale, HEAD_DIM, CAUSAL,
                                half, BLOCK_N, STAGES, WS, False, 4)),
                (_fwd_loader, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, done,
                               b, h, kv_h, start_m, n_blocks, BLOCK_N, STAGES, q_bufs)),
            ], [4, 1], [240, 24])
        elif WS == _PERSISTENT:
            # q_free.index(i) completes when Q buffer i may take the next query block's Q: its warp group is done with
            # it, and the O it held on the way out has been copied (``_fwd_compute``).
            gl.static_assert(BLOCK_M == 128, "PERSISTENT takes 128 query rows: two warp groups of 64")
            q_free = gl.allocate_shared_memory(gl.int64, [q_bufs, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(q_bufs):
                mbarrier.init(q_free.index(i), count=1)
            gl.warp_specialize([
                (_fwd_compute_tiles, (desc_k, desc_v, desc_o, LSE, q_smem, k_smem, v_smem, q_bars, q_free, k_bars,
                                      v_bars, done, turns.index(0), turns.index(1), n_heads, group, seq_len, SCHEDULE,
                                      most, qk_scale, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES, ORDER_HEADS,
                                      0)),
                (_fwd_compute_tiles, (desc_k, desc_v, desc_o, LSE, q_smem, k_smem, v_smem, q_bars, q_free, k_bars,
                                      v_bars, done, turns.index(1), turns.index(0), n_heads, group, seq_len, SCHEDULE,
                                      most, qk_scale, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES, ORDER_HEADS,
                                      1)),
                (_fwd_loader_tiles, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars,
                                     done, n_heads, group, seq_len, SCHEDULE, most, CAUSAL, BLOCK_M, BLOCK_N,
                                     STAGES,
                                     ORDER_HEADS)),
            ], [4, 1], [240, 24])
            for i in gl.static_range(q_bufs):
                mbarrier.invalidate(q_free.index(i))
        elif WS == _TMA_WARP:
            gl.warp_specialize([
                (_fwd_compute, (desc_k, desc_v, desc_o, LSE, q_smem.index(0), k_smem, v_smem, q_bars.index(0), k_bars,
                                v_bars, done, turns.index(0), turns.index(1), b, h, kv_h, pid_bh, start_m,
                                n_blocks, 0, 0, q_bars.index(0), seq_len, qk_scale, HEAD_DIM, CAUSAL, BLOCK_M,
                                BLOCK_N, STAGES, WS, True, num_warps)),
                (_fwd_loader, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, done,
                               b, h, kv_h, start_m, n_blocks, BLOCK_N, STAGES, q_bufs)),
            ], [1], [24])
        else:
            _load_block(desc_q, b, h, start_m, q_bars.index(0), q_smem.index(0), True)
            for i in gl.static_range(STAGES):
                _load_block(desc_k, b, kv_h, i * BLOCK_N, k_bars.index(i), k_smem.index(i), i < n_blocks)
                _load_block(desc_v, b, kv_h, i * BLOCK_N, v_bars.index(i), v_smem.index(i), i < n_blocks)
            _fwd_compute(desc_k, desc_v, desc_o, LSE, q_smem.index(0), k_smem, v_smem, q_bars.index(0), k_bars, v_bars,
                         done, turns.index(0), turns.index(1), b, h, kv_h, pid_bh, start_m, n_blocks, 0, 0,
                         q_bars.index(0), seq_len, qk_scale, HEAD_DIM, CAUSAL, BLOCK_M, BLOCK_N, STAGES, WS, True,
                         num_warps)

        for i in gl.static_range(q_bufs):
            mbarrier.invalidate(q_bars.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(turns.index(i))
        for i in gl.static_range(STAGES):
            for ring in gl.static_range(3):
                mbarrier.invalidate((k_bars, v_bars, done)[ring].index(i))

    @gluon.jit
    def _fwd_loader(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bars, k_bars, v_bars, done,
                    b, h, kv_h, start_m, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, Q_BUFS: gl.constexpr):
        """The TMA warp: Q (a box for each compute partition), then key block j's K and V into buffer j % STAGES
        once every compute partition freed it."""
        for i in gl.static_range(Q_BUFS):
            _load_block(desc_q, b, h, start_m + i * desc_q.block_type.shape[2], q_bars.index(i), q_smem.index(i), True)
        _fwd_kv_loads(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, 0, n_blocks, BLOCK_N, STAGES)

    @gluon.jit
    def _fwd_kv_loads(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, g0, n_blocks,
                      BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The TMA warp's K and V of head (b, kv_h)'s first n_blocks key blocks, block j the ring's (g0 + j)-th (g0:
        the key blocks of the query blocks before, PERSISTENT's; else 0), into buffer (g0 + j) % STAGES once every
        compute partition freed it."""
        for j in range(n_blocks):
            g = g0 + j
            slot = g % STAGES
            # done.index(s)'s u-th completion is ring block s + u * STAGES's (``_fwd_release``). K_g's buffer held
            # K_{g - STAGES}, free after that block: completion g // STAGES - 1 of done.index(slot); V_g's held
            # V_{g - STAGES}, free after block g - STAGES + 1: completion (g + 1) // STAGES - 1 of
            # done.index((g + 1) % STAGES), the same wait as K_{g + 1}'s, so V never holds K back (V of a query
            # block's last key block is read by its last product, before the next query block's first release). A wait
            # for completion -1 (the first pass) returns at once: parity 1 of a fresh barrier counts as complete.
            # Neither barrier can run a phase ahead of its wait: its next completion needs K_g or K_{g + 1}, loaded
            # after it.
            mbarrier.wait(done.index(slot), ((g // STAGES) & 1) ^ 1)
            _load_block(desc_k, b, kv_h, j * BLOCK_N, k_bars.index(slot), k_smem.index(slot), True)
            mbarrier.wait(done.index((g + 1) % STAGES), (((g + 1) // STAGES) & 1) ^ 1)
            _load_block(desc_v, b, kv_h, j * BLOCK_N, v_bars.index(slot), v_smem.index(slot), True)

    @gluon.jit
    def _lpt_block(g, r, n_blocks, HEAVY_LAST: gl.constexpr, ORDER_HEADS: gl.constexpr):
        """(block, head) of the r-th block of head group g in launch order: within a group of ORDER_HEADS heads, block by
        block, each over the group's heads; the heaviest first when HEAVY_LAST (a causal forward's last query
        blocks; the backward's heaviest, its first key blocks, come first as they are). Longest first: the light
        blocks fill the end, where the order head by head (each head's blocks heaviest first) starts the last
        heads' heaviest blocks when little work is left (``bench/launch_order.py``, a list-scheduling model of 132
        SMs: 5.3-6.7% of the time lost at 2k-8k, the causal forward at 16,384 tokens, against 0-1.7%). Groups of heads, not all heads at once, so that the blocks
        on the GPU together read few heads' K/V (or Q and dO): a group at 4k is 8 x 2 MiB, L2-resident.
        ORDER_HEADS, a power of two that divides the heads (``order_heads``), makes the division a shift."""
        i = r // ORDER_HEADS
        if HEAVY_LAST:
            i = n_blocks - 1 - i
        return i, g * ORDER_HEADS + r % ORDER_HEADS

    @gluon.jit
    def _fwd_block(pid_m, pid_bh, n_heads, group, seq_len, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr):
        """Query block pid_m of head pid_bh (b · H + h): (b, h, its K/V head, its first row, its key blocks)."""
        h = pid_bh % n_heads
        start_m = pid_m * BLOCK_M
        if CAUSAL:
            hi = gl.minimum(start_m + BLOCK_M, seq_len)
        else:
            hi = seq_len
        return pid_bh // n_heads, h, h // group, start_m, gl.cdiv(hi, BLOCK_N)

    @gluon.jit
    def _scheduled(t, SCHEDULE):
        """PERSISTENT: this block's t-th query block, as its index in ``_lpt_block``'s order (causal: the last query
        blocks, the most key blocks, of a group of heads first), or -1 past its last. SCHEDULE (``_schedule``) is
        (most tiles a block, programs), a column a block: each tile went to the block that frees up first by a cost
        model (``persistent_schedule``), as the GPU's own block scheduler hands out the non-persistent grid's. Its
        address comes from the grid's registers and t, and the loops run the same count in every block: a pointer or
        a count of its own kept across the loop of key blocks spilled there (causal, sm_90a, Triton 3.6 and 3.9)."""
        return gl.load(SCHEDULE + t * gl.num_programs(0) + gl.program_id(0))

    @gluon.jit
    def _fwd_tile(tile, n_heads, group, seq_len, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, ORDER_HEADS: gl.constexpr):
        """PERSISTENT: query block ``tile`` of ``_lpt_block``'s order as (pid_bh, ``_fwd_block``'s five)."""
        n_m = gl.cdiv(seq_len, BLOCK_M)
        pid_m, pid_bh = _lpt_block(tile // (ORDER_HEADS * n_m), tile % (ORDER_HEADS * n_m), n_m, CAUSAL, ORDER_HEADS)
        b, h, kv_h, start_m, n_blocks = _fwd_block(pid_m, pid_bh, n_heads, group, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
        return pid_bh, b, h, kv_h, start_m, n_blocks

    @gluon.jit
    def _fwd_loader_tiles(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, done,
                          n_heads, group, seq_len, SCHEDULE, most, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, ORDER_HEADS: gl.constexpr):
        """PERSISTENT's TMA warp: for each of this block's query blocks, each warp group's Q into its buffer for
        that block (the t-th query block: buffer 2 · group + t % 2), then the key blocks, the ring counted on."""
        half: gl.constexpr = BLOCK_M // 2
        g = 0
        for t in range(most):
            tile = _scheduled(t, SCHEDULE)
            if tile >= 0:
                pid_bh, b, h, kv_h, start_m, n_blocks = _fwd_tile(tile, n_heads, group, seq_len, CAUSAL, BLOCK_M,
                                                                  BLOCK_N, ORDER_HEADS)
                for part in gl.static_range(2):
                    buf = part * 2 + t % 2
                    # The buffer last held query block t - 2's Q, then O, freed early in block t - 1 (``_fwd_compute``):
                    # completion t // 2 - 1 of q_free.index(buf); none to wait for at t < 2 (a fresh barrier's parity 1).
                    mbarrier.wait(q_free.index(buf), ((t // 2) & 1) ^ 1)
                    _load_block(desc_q, b, h, start_m + part * half, q_bars.index(buf), q_smem.index(buf), True)
                _fwd_kv_loads(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, g, n_blocks, BLOCK_N,
                              STAGES)
                g += n_blocks

    @gluon.jit
    def _fwd_compute_tiles(desc_k, desc_v, desc_o, LSE, q_smem, k_smem, v_smem, q_bars, q_free, k_bars, v_bars, done,
                           turn_mine, turn_other, n_heads, group, seq_len, SCHEDULE, most, qk_scale,
                           HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, ORDER_HEADS: gl.constexpr, PART: gl.constexpr):
        """PERSISTENT's warp group PART: its 64 rows of each of the block's query blocks (``_fwd_compute``), the
        ring and the turns counted on from one query block to the next, the last O's copy waited for at the end."""
        half: gl.constexpr = BLOCK_M // 2
        g = 0
        for t in range(most):
            tile = _scheduled(t, SCHEDULE)
            if tile >= 0:  # a block's tiles come first in its column, then -1s
                pid_bh, b, h, kv_h, start_m, n_blocks = _fwd_tile(tile, n_heads, group, seq_len, CAUSAL, BLOCK_M,
                                                                  BLOCK_N, ORDER_HEADS)
                buf = PART * 2 + t % 2
                _fwd_compute(desc_k, desc_v, desc_o, LSE, q_smem.index(buf), k_smem, v_smem, q_bars.index(buf),
                             k_bars, v_bars, done, turn_mine, turn_other, b, h, kv_h, pid_bh, start_m + PART * half,
                             n_blocks, g, t, q_free.index(PART * 2 + (t + 1) % 2), seq_len, qk_scale, HEAD_DIM, CAUSAL,
                             half, BLOCK_N, STAGES, _PERSISTENT, PART == 0, 4)
                g += n_blocks
        tma.store_wait(0)

    @gluon.jit
    def _fwd_release(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, j, n_blocks,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr):
        """Key block j's products are done: K buffer j % STAGES is free, and from j = 1 V buffer (j - 1) % STAGES.
        Every compute warp must be past its wait first (the warp groups multiply their own rows by the same tiles).
        With a TMA warp: tell it, one arrive per compute partition on done.index(j % STAGES) for both buffers (the
        barrier counts the partitions; one arrive, not one for K and one for V, because Gluon puts a barrier of the
        partition's warps between two arrives); else refill them here, STAGES blocks ahead."""
        _cta_barrier()  # in a warp-specialised partition, a barrier of that partition's warps only
        slot = j % STAGES
        if WS:
            mbarrier.arrive(done.index(slot))
        else:
            prev = (j + STAGES - 1) % STAGES
            _load_block(desc_k, b, kv_h, (j + STAGES) * BLOCK_N, k_bars.index(slot), k_smem.index(slot),
                        j + STAGES < n_blocks)
            _load_block(desc_v, b, kv_h, (j - 1 + STAGES) * BLOCK_N, v_bars.index(prev), v_smem.index(prev),
                        (j > 0) & (j - 1 + STAGES < n_blocks))

    @gluon.jit
    def _take_turn(turn_mine, k, FIRST: gl.constexpr, WS: gl.constexpr):
        """PING_PONG: wait until this warp group may issue its k-th group of products. The two warp groups take
        turns, the first one's first turn free (parity 1 of a fresh barrier counts as complete); a turn is
        passed on as soon as the products are issued, so one group's softmax runs while the other's products do."""
        # Both groups must take the same number of turns (n_blocks + 1: the CTA's key blocks, not each group's
        # own), or the second's last wait never returns.
        if WS == _PING_PONG or WS == _PERSISTENT:
            mbarrier.wait(turn_mine, (k & 1) ^ FIRST)

    @gluon.jit
    def _pass_turn(turn_other, WS: gl.constexpr):
        if WS == _PING_PONG or WS == _PERSISTENT:
            mbarrier.arrive(turn_other)

    @gluon.jit
    def _fwd_compute(desc_k, desc_v, desc_o, LSE, q_smem, k_smem, v_smem, q_bar, k_bars, v_bars, done,
                     turn_mine, turn_other, b, h, kv_h, pid_bh, start_m, n_blocks, g0, t, q_free_prev, seq_len,
                     qk_scale, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, FIRST: gl.constexpr,
                     num_warps: gl.constexpr):
        """The online softmax of BLOCK_M query rows from start_m over the key blocks, FlashAttention-3's schedule
        (module docstring); O and the log2-sum-exp stored at the end. PING_PONG: one of two warp groups, each
        with its own rows and Q buffer, issuing their products in turns (``_take_turn``). PERSISTENT: the same for
        the partition's t-th query block, its key blocks the ring's g0-th on (g0 + t turns taken before); the O
        stored is waited for in the next query block, which then frees its buffer (q_free_prev) for the next Q.
        Otherwise g0 = t = 0 and q_free_prev is not used."""
        dtype: gl.constexpr = desc_o.dtype
        # The products' register layouts: all warps along the query rows, 16 rows a warp.
        s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
        o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, s_layout)
        cols: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
        if CAUSAL:
            mask_from = gl.minimum(start_m + 1, seq_len)  # a key block ending at or before it needs no mask
        else:
            mask_from = seq_len

        q = q_smem.reshape([BLOCK_M, HEAD_DIM])
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=rows)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        mbarrier.wait(q_bar, (t // 2) & 1)  # PERSISTENT: the buffer's (t // 2)-th Q; else its first
        turn0 = g0 + t  # a query block takes n_blocks + 1 turns

        # Key block 0: nothing to overlap with yet.
        slot = g0 % STAGES
        mbarrier.wait(k_bars.index(slot), (g0 // STAGES) & 1)
        _take_turn(turn_mine, turn0, FIRST, WS)
        s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        _pass_turn(turn_other, WS)
        s = warpgroup_mma_wait(0, deps=(s,))
        s = _scores(s, offs_m, 0, seq_len, mask_from, CAUSAL, BLOCK_N, cols)
        m_i = gl.max(s, 1) * qk_scale  # key 0 is visible to every row: finite
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
        l_i = gl.sum(p, 1)
        p = gl.convert_layout(p.to(dtype), p_layout)
        _fwd_release(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, g0, n_blocks,
                     BLOCK_N, STAGES, WS)
        if WS == _PERSISTENT:
            # The previous query block's O has had a key block's products to leave its buffer: wait until it has,
            # then let the TMA warp bring the next query block's Q there.
            tma.store_wait(0)
            if t > 0:
                mbarrier.arrive(q_free_prev)

        for j in range(1, n_blocks):
            g = g0 + j  # the ring's count (OWN_LOADS: g0 = 0, the refills' key block)
            slot = g % STAGES
            prev = (g - 1) % STAGES
            mbarrier.wait(k_bars.index(slot), (g // STAGES) & 1)
            mbarrier.wait(v_bars.index(prev), ((g - 1) // STAGES) & 1)
            _take_turn(turn_mine, turn0 + j, FIRST, WS)
            s = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            acc = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            _pass_turn(turn_other, WS)
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
            _fwd_release(desc_k, desc_v, k_smem, v_smem, k_bars, v_bars, done, b, kv_h, g, n_blocks,
                         BLOCK_N, STAGES, WS)

        g_last = g0 + n_blocks - 1
        last = g_last % STAGES
        mbarrier.wait(v_bars.index(last), (g_last // STAGES) & 1)
        _take_turn(turn_mine, turn0 + n_blocks, FIRST, WS)
        acc = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn_other, WS)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))

        o = (acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)).to(dtype)
        q_smem.reshape([BLOCK_M, HEAD_DIM]).store(o)  # Q's buffer is free: every product is done
        fence_async_shared()
        _tma_store(desc_o, [b, h, start_m, 0], q_smem)
        # log2-sum-exp2 of the scaled scores, as the Triton forward saves it for the backward
        gl.store(LSE + pid_bh.to(gl.int64) * seq_len + offs_m, m_i + gl.log2(l_i), mask=offs_m < seq_len)
        if WS != _PERSISTENT:  # PERSISTENT waits in its next query block, or at its end (``_fwd_compute_tiles``)
            tma.store_wait(0)


    @gluon.jit
    def _bwd_gluon_kernel(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, DQA, LSE, DELTA,
                          n_heads, group, seq_len, qk_scale, sm_scale,
                          HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr, ORDER_HEADS: gl.constexpr,
                          num_warps: gl.constexpr):
        """dK, dV of one key block of one K/V head, and its share of dQ added into DQA (fp32) by atomics.

        Transposed tiles (keys × queries), as the Triton dK/dV kernel: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ come out with
        the keys along the rows, so Pᵀ and dSᵀ are already the register operands of dV += Pᵀ dO and
        dK += dSᵀ Q. dQ = dS K reads dSᵀ back from shared memory, transposed by the product. Sᵀ and dPᵀ are
        issued together and Pᵀ is computed while dPᵀ runs. The query blocks of every query head of the K/V
        head's group stream past in one loop, Q and dO by TMA STAGES steps ahead: issued by the compute warps,
        or (TMA_WARP) by a warp of their own (``_bwd_loader``), as in the forward, or (DQ_WARP) by a warp group
        that also adds each step's dQ share, which the compute warps leave in shared memory (``_bwd_loader``).
        """
        dtype: gl.constexpr = desc_q.dtype
        # Causal, the first key blocks see the most queries: launched first (``_lpt_block``).
        key_block, pid_bkv = _lpt_block(gl.program_id(1), gl.program_id(0), gl.cdiv(seq_len, BLOCK_N), False, ORDER_HEADS)
        n_kv = n_heads // group
        b = pid_bkv // n_kv
        kv_h = pid_bkv % n_kv
        start_n = key_block * BLOCK_N
        # Causal: the query blocks from the one holding this key block's first key on (earlier rows see none of it).
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
        per_head = gl.cdiv(seq_len - lo, BLOCK_M)
        steps = group * per_head

        k_smem = gl.allocate_shared_memory(dtype, desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, desc_v.block_type.shape, desc_v.layout)
        q_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_q.block_type.shape, desc_q.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES] + desc_do.block_type.shape, desc_do.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        # Q and dO landed (with a loading partition also the step's LSE and Δ stored: a second arrive, ``_load_stats``)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # a TMA warp: the compute warps are done with a step (its Q/dO buffer free; with DQ_WARP its dQ share stored)
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=2 if WS else 1)
            mbarrier.init(empty.index(i), count=1)
        # DQ_WARP: two fp32 (BLOCK_M, D) buffers of dQ shares, and a barrier each for "added, free again"
        dq_smem = gl.allocate_shared_memory(gl.float32, _dq_shape(WS, BLOCK_M, HEAD_DIM),
                                            _dq_shared_layout(BLOCK_M < 16 * num_warps))  # _bwd_compute's DQ_T
        dq_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(dq_free.index(i), count=1)

        if WS:
            # Each step's log2-sum-exp and Δ rows, which the loading partition brings into shared memory (a ring
            # beside Q's and dO's, on the same barriers): loaded by the compute warps, their BLOCK_M addresses take
            # 16-32 registers at 64 queries a step, where FlashAttention-3's 64 x 128 tile spilled 64-184 bytes; from
            # shared memory it spills none (Triton 3.6 and 3.9).
            stats_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)
            delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stats_layout)
            gl.warp_specialize([
                (_bwd_compute, (desc_q, desc_do, desc_dk, desc_dv, DQA, LSE, DELTA, k_smem, v_smem, q_smem, do_smem,
                                dq_smem, lse_smem, delta_smem, kv_bar, bars, empty, dq_free, b, kv_h, start_n,
                                lo, per_head, steps, n_heads, group, seq_len, qk_scale, sm_scale, HEAD_DIM, CAUSAL,
                                BLOCK_M, BLOCK_N, STAGES, WS, num_warps)),
                (_bwd_loader, (desc_q, desc_k, desc_v, desc_do, DQA, LSE, DELTA, k_smem, v_smem, q_smem, do_smem,
                               dq_smem, lse_smem, delta_smem, kv_bar, bars, empty, dq_free, b, kv_h, start_n,
                               lo, per_head, steps, n_heads, group, seq_len, HEAD_DIM, BLOCK_M, STAGES, WS)),
            ], [_bwd_loader_warps(WS)], [_bwd_loader_registers(WS, num_warps)])
        else:  # the compute warps load LSE and Δ themselves: the stats ring's arguments are placeholders
            _bwd_first_loads(desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, kv_bar, bars, b, kv_h,
                             start_n, lo, per_head, steps, group, BLOCK_M, STAGES)
            _bwd_compute(desc_q, desc_do, desc_dk, desc_dv, DQA, LSE, DELTA, k_smem, v_smem, q_smem, do_smem,
                         dq_smem, dq_smem, dq_smem, kv_bar, bars, empty, dq_free, b, kv_h, start_n, lo,
                         per_head, steps, n_heads, group, seq_len, qk_scale, sm_scale, HEAD_DIM, CAUSAL, BLOCK_M,
                         BLOCK_N, STAGES, WS, num_warps)
        mbarrier.invalidate(kv_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
            mbarrier.invalidate(empty.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(dq_free.index(i))

    @gluon.jit
    def _load_kv(desc_k, desc_v, b, kv_h, start_n, bar, k_dst, v_dst):
        """The backward's key block: K and V rows start_n.. of K/V head (b, kv_h), one barrier for both."""
        mbarrier.expect(bar, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
        _tma_load(desc_k, [b, kv_h, start_n, 0], bar, k_dst)
        _tma_load(desc_v, [b, kv_h, start_n, 0], bar, v_dst)

    @gluon.jit
    def _bwd_first_loads(desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, kv_bar, bars, b, kv_h,
                         start_n, lo, per_head, steps, group, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """The backward's first copies, by whoever loads: its key block's K and V, and the first STAGES steps' Q
        and dO, one ring buffer each."""
        _load_kv(desc_k, desc_v, b, kv_h, start_n, kv_bar, k_smem, v_smem)
        for i in gl.static_range(STAGES):
            _load_step(desc_q, desc_do, b, kv_h * group, lo, per_head, i, bars.index(i), q_smem.index(i),
                       do_smem.index(i), i < steps, BLOCK_M)

    @gluon.jit
    def _bwd_loader(desc_q, desc_k, desc_v, desc_do, DQA, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, dq_smem,
                    lse_smem, delta_smem, kv_bar, bars, empty, dq_free, b, kv_h, start_n, lo, per_head, steps,
                    n_heads, group, seq_len, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                    WS: gl.constexpr):
        """The backward's loading partition, a TMA warp (TMA_WARP) or a warp group (DQ_WARP): K, V and the first
        STAGES steps' Q and dO, and their LSE and Δ rows (``_load_stats``); then, as the compute warps finish each
        step, the same for the step STAGES later into its buffers, and with DQ_WARP the step's dQ share added from
        shared memory (``_add_dq_share``; the copies issued first run meanwhile)."""
        _bwd_first_loads(desc_q, desc_k, desc_v, desc_do, k_smem, v_smem, q_smem, do_smem, kv_bar, bars, b, kv_h,
                         start_n, lo, per_head, steps, group, BLOCK_M, STAGES)
        first_head = kv_h * group
        for i in gl.static_range(STAGES):
            _load_stats(LSE, DELTA, b, first_head, lo, per_head, i, n_heads, seq_len, lse_smem.index(i),
                        delta_smem.index(i), bars.index(i), i < steps, BLOCK_M, _bwd_loader_warps(WS))
        for step in range(steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), (step // STAGES) & 1)  # step done: its buffers free, its dQ stored
            _load_step(desc_q, desc_do, b, first_head, lo, per_head, step + STAGES, bars.index(slot),
                       q_smem.index(slot), do_smem.index(slot), step + STAGES < steps, BLOCK_M)
            _load_stats(LSE, DELTA, b, first_head, lo, per_head, step + STAGES, n_heads, seq_len,
                        lse_smem.index(slot), delta_smem.index(slot), bars.index(slot), step + STAGES < steps,
                        BLOCK_M, _bwd_loader_warps(WS))
            if _dq_warp_group(WS):
                h, start_m = _step_block(first_head, lo, per_head, step, BLOCK_M)
                row = (b * n_heads + h).to(gl.int64) * seq_len
                _add_dq_share(DQA, row, start_m, dq_smem.index(step % 2),
                              dq_free.index(step % 2), seq_len, HEAD_DIM, BLOCK_M)

    @gluon.jit
    def _load_stats(LSE, DELTA, b, first_head, lo, per_head, step, n_heads, seq_len, lse_dst, delta_dst, bar, pred,
                    BLOCK_M: gl.constexpr, WARPS: gl.constexpr):
        """A loading partition of WARPS warps: the log2-sum-exp and Δ of the backward's ``step``-th query block into
        ``lse_dst`` and ``delta_dst`` (zeros past the sequence end), then an arrive on ``bar``, the step's Q/dO
        barrier, whose second it is (the first: the copies' expect, issued before these loads so that they run
        meanwhile); nothing where not ``pred`` (a step past the last)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        h, start_m = _step_block(first_head, lo, per_head, step, BLOCK_M)
        row = (b * n_heads + h).to(gl.int64) * seq_len
        offs = start_m + gl.arange(0, BLOCK_M, layout=layout)
        keep = (offs < seq_len) & pred
        lse_dst.store(gl.load(LSE + row + offs, mask=keep, other=0.0))
        delta_dst.store(gl.load(DELTA + row + offs, mask=keep, other=0.0))
        _cta_barrier()  # (of this partition's warps) every value stored before the arrive
        mbarrier.arrive(bar, pred=pred)

    @gluon.jit
    def _add_dq_share(DQA, row, start_m, dq_buf, dq_free, seq_len, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr):
        """DQ_WARP: one step's (BLOCK_M, D) dQ share, from ``dq_buf``, added into DQA by 128-bit atomics
        (``_add_dq``), then the buffer freed for the compute warps."""
        # 8 rows a pass (the shared layout's swizzle period), 4 adjacent values a lane: a row of D fp32 is 32 lanes
        # (head dim 128) or 16 (64); the 4 warps take 4 or 8 rows; 8 or 4 values a lane in all.
        rows_per_pass: gl.constexpr = 8
        lanes_d: gl.constexpr = HEAD_DIM // 4
        layout: gl.constexpr = gl.BlockedLayout([rows_per_pass * lanes_d // 128, 4], [32 // lanes_d, lanes_d], [4, 1],
                                                [1, 0])
        for r in gl.static_range(0, BLOCK_M, rows_per_pass):
            dq = dq_buf.slice(r, rows_per_pass, dim=0).load(layout)  # (rows_per_pass, D)
            _add_dq(DQA, row, start_m + r, dq, seq_len, False, HEAD_DIM, rows_per_pass, layout)
        _cta_barrier()  # (of this partition's warps) every value read: the compute warps may refill the buffer
        mbarrier.arrive(dq_free)

    @gluon.jit
    def _bwd_compute(desc_q, desc_do, desc_dk, desc_dv, DQA, LSE, DELTA, k_smem, v_smem, q_smem, do_smem, dq_smem,
                     lse_smem, delta_smem, kv_bar, bars, empty, dq_free, b, kv_h, start_n, lo, per_head, steps,
                     n_heads, group, seq_len, qk_scale, sm_scale, HEAD_DIM: gl.constexpr, CAUSAL: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, WS: gl.constexpr,
                     num_warps: gl.constexpr):
        """The backward's loop over its query blocks (``_bwd_gluon_kernel``), then dK and dV stored. With a loading
        partition (WS) each step's LSE and Δ come from its shared-memory ring (lse_smem, delta_smem), there once
        the step's barrier completes; else the compute warps load them."""
        dtype: gl.constexpr = desc_q.dtype
        st_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_M)  # keys x queries
        kv_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)  # keys x head dim
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        keys: gl.constexpr = gl.SliceLayout(1, st_layout)
        queries: gl.constexpr = gl.SliceLayout(0, st_layout)
        # dQ = dS K for BLOCK_M >= 16 rows a warp; below, dQᵀ = Kᵀ dSᵀ (HEAD_DIM rows): a wgmma needs 16 rows a warp
        DQ_T: gl.constexpr = BLOCK_M < 16 * num_warps
        if DQ_T:
            dq_layout: gl.constexpr = st_layout  # (D, BLOCK_M): BLOCK_M-wide instructions too
            dq_zero = gl.zeros([HEAD_DIM, BLOCK_M], gl.float32, dq_layout)
        else:
            dq_layout: gl.constexpr = kv_layout
            dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)

        qk_scale = qk_scale.to(gl.float32)
        sm_scale = sm_scale.to(gl.float32)
        offs_n = start_n + gl.arange(0, BLOCK_N, layout=keys)
        # A query block needs masks where it reaches the diagonal (causal) or runs past the end.
        mask_below = start_n + BLOCK_N if CAUSAL else 0
        k = k_smem.reshape([BLOCK_N, HEAD_DIM])
        v = v_smem.reshape([BLOCK_N, HEAD_DIM])
        st_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
        mbarrier.wait(kv_bar, 0)
        AHEAD: gl.constexpr = WS == _DQ_AHEAD
        if AHEAD:  # step 0's Sᵀ and dPᵀ; each step then issues the next one's before waiting for its own products
            s_t, dp_t = _issue_sdp(k, v, q_smem, do_smem, bars, 0, st_zero, BLOCK_M, HEAD_DIM, STAGES)

        for step in range(steps):
            slot = step % STAGES
            h, start_m = _step_block(kv_h * group, lo, per_head, step, BLOCK_M)
            q_s = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
            do_s = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
            if not AHEAD:
                s_t, dp_t = _issue_sdp(k, v, q_smem, do_smem, bars, step, st_zero, BLOCK_M, HEAD_DIM, STAGES)
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=queries)
            row = (b * n_heads + h).to(gl.int64) * seq_len
            if WS:
                lse = lse_smem.index(slot).load(queries)
            else:
                lse = gl.load(LSE + row + offs_m, mask=offs_m < seq_len, other=0.0)
            s_t = warpgroup_mma_wait(1, deps=(s_t,))  # dPᵀ still running
            p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse, 0))
            # loaded once lse is used: the two column vectors are never live together (registers at head dim 128)
            if WS:
                delta = delta_smem.index(slot).load(queries)
            else:
                delta = gl.load(DELTA + row + offs_m, mask=offs_m < seq_len, other=0.0)
            if (start_m < mask_below) | (start_m + BLOCK_M > seq_len) | (start_n + BLOCK_N > seq_len):
                keep = gl.expand_dims(offs_m < seq_len, 0) & gl.expand_dims(offs_n < seq_len, 1)
                if CAUSAL:
                    keep = keep & (gl.expand_dims(offs_m, 0) >= gl.expand_dims(offs_n, 1))
                p_t = gl.where(keep, p_t, 0.0)
            dp_t = warpgroup_mma_wait(0, deps=(dp_t,))
            ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)
            p_op = gl.convert_layout(p_t.to(dtype), op_layout)
            ds_op = gl.convert_layout(ds_t, op_layout)
            ds_smem.store(ds_t)  # dQ's operand, read back by the product below
            fence_async_shared()
            dv = warpgroup_mma(p_op, do_s, dv, is_async=True)
            dk = warpgroup_mma(ds_op, q_s, dk, is_async=True)
            if DQ_T:
                dq = warpgroup_mma(k.permute((1, 0)), ds_smem, dq_zero, use_acc=False, is_async=True)  # (D, BLOCK_M)
            else:
                dq = warpgroup_mma(ds_smem.permute((1, 0)), k, dq_zero, use_acc=False, is_async=True)  # (BLOCK_M, D)
            if AHEAD:
                # The next step's (the last step's again at the end: its buffers are not refilled before the arrive
                # below, and its barrier's phase has completed), then this step's three products waited for while
                # those two run.
                s_t, dp_t = _issue_sdp(k, v, q_smem, do_smem, bars, gl.minimum(step + 1, steps - 1), st_zero,
                                       BLOCK_M, HEAD_DIM, STAGES)
                dq, dv, dk, p_op, ds_op = warpgroup_mma_wait(2, deps=(dq, dv, dk, p_op, ds_op))
            else:
                dq, dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dq, dv, dk, p_op, ds_op))  # the three at once
            if _dq_warp_group(WS):  # to shared memory, (BLOCK_M, D) either way; the loader adds it
                mbarrier.wait(dq_free.index(step % 2), ((step // 2) & 1) ^ 1)  # added two steps ago
                if DQ_T:
                    dq_smem.index(step % 2).permute((1, 0)).store(dq)
                else:
                    dq_smem.index(step % 2).store(dq)
            else:
                _add_dq(DQA, row, start_m, dq, seq_len, DQ_T, HEAD_DIM, BLOCK_M, dq_layout)
            _cta_barrier()  # buffer `slot` and dSᵀ's are read by no product any more (every compute warp is past)
            if WS:
                mbarrier.arrive(empty.index(slot))
            else:
                _load_step(desc_q, desc_do, b, kv_h * group, lo, per_head, step + STAGES, bars.index(slot),
                           q_smem.index(slot), do_smem.index(slot), step + STAGES < steps, BLOCK_M)

        if AHEAD:  # the last step's Sᵀ and dPᵀ issued again, read K and V
            s_t, dp_t = warpgroup_mma_wait(0, deps=(s_t, dp_t))
        k_smem.reshape([BLOCK_N, HEAD_DIM]).store((dk * sm_scale).to(dtype))  # K and V are read by no product
        v_smem.reshape([BLOCK_N, HEAD_DIM]).store(dv.to(dtype))
        fence_async_shared()
        _tma_store(desc_dk, [b, kv_h, start_n, 0], k_smem)
        _tma_store(desc_dv, [b, kv_h, start_n, 0], v_smem)
        tma.store_wait(0)

    @gluon.jit
    def _issue_sdp(k, v, q_smem, do_smem, bars, step, st_zero, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                   STAGES: gl.constexpr):
        """The backward step's Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, issued (asynchronous) once its Q and dO have landed."""
        slot = step % STAGES
        mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
        q_s = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do_s = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        s_t = warpgroup_mma(k, q_s.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v, do_s.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        return s_t, dp_t

    @gluon.jit
    def _add_dq(DQA, row, start_m, dq, seq_len, TRANSPOSED: gl.constexpr, HEAD_DIM: gl.constexpr,
                BLOCK_M: gl.constexpr, layout: gl.constexpr):
        """Add one query block's dQ share (BLOCK_M, D), or its transpose, into the fp32 rows of DQA from ``row``
        on (that query head's first), by relaxed atomics; none past the sequence end."""
        if TRANSPOSED:
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, layout))
            ptrs = DQA + (row + gl.expand_dims(offs_m, 0)) * HEAD_DIM + gl.expand_dims(offs_d, 1)
            gl.atomic_add(ptrs, dq, mask=gl.expand_dims(offs_m < seq_len, 0), sem="relaxed")
        else:
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
            offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
            ptrs = DQA + (row + gl.expand_dims(offs_m, 1)) * HEAD_DIM + gl.expand_dims(offs_d, 0)
            gl.atomic_add(ptrs, dq, mask=gl.expand_dims(offs_m < seq_len, 1), sem="relaxed")

    @gluon.jit
    def _step_block(first_head, lo, per_head, step, BLOCK_M: gl.constexpr):
        """The backward's ``step``-th query block: (its query head, its first row). A program's steps run over the
        per_head query blocks from row lo of each query head of its K/V head's group in turn."""
        return first_head + step // per_head, lo + (step % per_head) * BLOCK_M

    @gluon.jit
    def _load_step(desc_q, desc_do, b, first_head, lo, per_head, step, bar, q_dst, do_dst, pred,
                   BLOCK_M: gl.constexpr):
        """Q and dO of the backward's ``step``-th query block (``_step_block``)."""
        h, row = _step_block(first_head, lo, per_head, step, BLOCK_M)
        mbarrier.expect(bar, desc_q.block_type.nbytes + desc_do.block_type.nbytes, pred=pred)
        _tma_load(desc_q, [b, h, row, 0], bar, q_dst, pred=pred)
        _tma_load(desc_do, [b, h, row, 0], bar, do_dst, pred=pred)

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


def tile_costs(T: int, block_m: int, block_n: int, n_bh: int, together: int, causal: bool) -> list[int]:
    """The forward's query blocks in ``_lpt_block``'s launch order (tile i: group i // (together · n_m), then block
    by block, each over the group's heads, the heaviest first when causal), each costed as its key blocks plus one
    for its start and end (``bench/launch_order.py``'s model)."""
    n_m = triton.cdiv(T, block_m)
    costs = []
    for tile in range(n_m * n_bh):
        i = tile % (together * n_m) // together
        pid_m = n_m - 1 - i if causal else i
        rows = min(pid_m * block_m + block_m, T) if causal else T
        costs.append(triton.cdiv(rows, block_n) + 1)
    return costs


def persistent_schedule(costs: list[int], programs: int) -> list[list[int]]:
    """Each persistent block's tiles (indices into ``costs``, taken in that order), handed out as the GPU's block
    scheduler hands a grid's blocks out: each tile to the block that frees up first (ties: the lowest), its cost
    as ``costs`` models it.

    The first PERSISTENT forward took tiles program_id, + programs, ... : over ``_lpt_block``'s order, whose
    heaviest tiles come once a head group, that gives some blocks a heavy tile every round. The model puts that
    block's end 27% past the even share at 4k (16,384 tokens, 132 SMs, causal), 15% at 8k, 9% at 16k; the H200's
    tuner timed the persistent forward 16%, 16% and 12% below the ping-pong there (2026-11-27). This order:
    0.05-0.2% at 4k-16k, 1.8% at 2k (``bench/launch_order.py``'s persistent rows)."""
    free = [(0, p) for p in range(programs)]
    tiles: list[list[int]] = [[] for _ in range(programs)]
    for tile, cost in enumerate(costs):
        at, p = heapq.heappop(free)
        tiles[p].append(tile)
        heapq.heappush(free, (at + cost, p))
    return tiles


@functools.lru_cache(maxsize=64)
def _schedule(T: int, block_m: int, block_n: int, n_bh: int, together: int, causal: bool, programs: int,
              device: torch.device) -> torch.Tensor:
    """``persistent_schedule`` as the kernel reads it (``_scheduled``): an int32 (most tiles a block, programs) table
    on ``device``, a column a block, its tiles then -1s. Built once a shape (a process's shapes are few), copied to
    the device then."""
    columns = persistent_schedule(tile_costs(T, block_m, block_n, n_bh, together, causal), programs)
    most = max(map(len, columns))
    table = [[c[t] if t < len(c) else -1 for c in columns] for t in range(most)]
    return torch.tensor(table, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=None)
def _no_schedule(device: torch.device) -> torch.Tensor:
    """What the non-persistent candidates pass as SCHEDULE (and its one row as ``most``): they never read it."""
    return torch.zeros((1, 1), dtype=torch.int32, device=device)


def _launch(q, k, v, o, lse, causal: bool, qk_scale: float, tile: tuple[int, int, int, int]) -> None:
    B, H, T, D = q.shape
    block_m, block_n, stages, loader = tile
    q_rows, num_warps = forward_launch(tile)
    descs = (descriptor(q, q_rows), descriptor(k, block_n), descriptor(v, block_n), descriptor(o, q_rows))
    n_tiles = triton.cdiv(T, block_m) * B * H
    together = order_heads(B * H)
    if loader == PERSISTENT:  # a block an SM (its 192 KiB of shared memory allows no second), its tiles in turn
        programs = min(n_tiles, _sm_count(q.device))
        grid, schedule = (programs,), _schedule(T, block_m, block_n, B * H, together, causal, programs, q.device)
    else:  # ``_lpt_block``'s order: groups of ``together`` heads along y, each group's blocks along x
        grid, schedule = (together * triton.cdiv(T, block_m), B * H // together), _no_schedule(q.device)
    _fwd_gluon_kernel[grid](
        *descs, lse, schedule, H, H // k.shape[1], T, schedule.shape[0], qk_scale,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, WS=loader, ORDER_HEADS=together,
        num_warps=num_warps,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tile_for(tiles: dict, head_dim: int, block: tuple, what: str = "forward") -> tuple:
    """The first candidate of ``tiles`` that starts with ``block``: (BLOCK_M, BLOCK_N) as ``attention.Tiles`` gives
    it, or a whole candidate; ValueError naming them when none does."""
    for tile in tiles[head_dim]:
        if tile[:len(block)] == tuple(block):
            return tile
    raise ValueError(f"the Gluon {what} has no {' x '.join(map(str, block[:2]))} tile {tuple(block)} at head dim "
                     f"{head_dim}; its tiles: {', '.join(f'{t[0]} x {t[1]}' for t in tiles[head_dim])}")


# (kernel, head dim, causal, dtype, length bucket, device) -> the fastest candidate: a process's shapes are few.
_TUNED: dict[tuple, tuple] = {}
# the same key -> every candidate's median ms on the call that tuned it (the benchmark reports them all: what a GPU
# session learns of the candidates that did not win)
_TIMES: dict[tuple, dict[tuple, float]] = {}


def best_tile(candidates: list, prepare, key: tuple, tune: bool) -> tuple:
    """The first candidate when not ``tune``, else the fastest of ``run(tile)`` on this call's shape, timed once
    per ``key`` (kernel, head dim, mask, dtype, length bucket, device) as Triton's autotuner does. ``prepare()``
    returns ``run``, called only when timing (its scratch outputs are not allocated on a tuned call); ``run``
    must write only scratch outputs: it runs many times. A candidate this device cannot run (too much shared
    memory or registers, a failed static assertion) is passed over, as the autotuner does; if none can run, the
    first one's error is raised."""
    if not tune or len(candidates) == 1:
        return candidates[0]
    if key not in _TUNED:
        from triton.compiler.errors import CompileTimeAssertionFailure  # noqa: PLC0415
        from triton.runtime.errors import OutOfResources, PTXASError  # noqa: PLC0415
        from triton.testing import do_bench  # noqa: PLC0415

        run, times, errors = prepare(), {}, []
        for tile in candidates:
            try:
                times[tile] = do_bench(lambda t=tile: run(t), warmup=5, rep=20)
            except (OutOfResources, CompileTimeAssertionFailure, PTXASError) as err:
                errors.append(err)
        if not times:
            raise errors[0]
        _TUNED[key] = min(times, key=times.get)
        _TIMES[key] = times
    return _TUNED[key]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, qk_scale: float,
            tile: tuple[int, int] | None = None, tune: bool = True, bucket: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, log2-sum-exp) of attention(q, k, v), the Triton ``_forward``'s contract; qk_scale = softmax scale · log2(e).

    tile: a fixed (BLOCK_M, BLOCK_N), or a whole candidate, of ``GLUON_TILES`` (``tile_for``: the tests'); else
    ``best_tile`` with ``tune`` and the length's tuning ``bucket``. The caller checks the inputs
    (``attention.flash_attention``, with this module's ``unsupported_reason``).
    """
    o = torch.empty_like(q)  # q's memory layout
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)  # (B, H, T)
    D = q.shape[-1]
    if tile:
        chosen = tile_for(GLUON_TILES, D, tile)
    else:  # the forward writes only o and lse: timing it on them is harmless
        chosen = best_tile(candidates("fwd", D), lambda: lambda t: _launch(q, k, v, o, lse, causal, qk_scale, t),
                           ("fwd", D, causal, q.dtype, bucket, q.device), tune)
    _launch(q, k, v, o, lse, causal, qk_scale, chosen)
    return o, lse


def _launch_bwd(q, k, v, do, lse, delta, dq_acc, dk, dv, causal: bool, qk_scale: float, sm_scale: float,
                tile: tuple[int, int, int, int]) -> None:
    B, H, T, D = q.shape
    block_m, block_n, stages, ws = tile
    rows_m = [descriptor(x, block_m) for x in (q, do)]
    rows_n = [descriptor(x, block_n) for x in (k, v, dk, dv)]
    together = order_heads(B * k.shape[1])  # ``_lpt_block``'s order, as the forward's
    _bwd_gluon_kernel[(together * triton.cdiv(T, block_n), B * k.shape[1] // together)](
        rows_m[0], *rows_n[:2], rows_m[1], *rows_n[2:], dq_acc, lse, delta, H, H // k.shape[1], T, qk_scale, sm_scale,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, WS=ws, ORDER_HEADS=together,
        num_warps=warps(block_n),
    )


def backward(q, k, v, do, lse, delta, dq_acc, dk, dv, causal: bool, qk_scale: float, sm_scale: float,
             tile: tuple[int, int] | None = None, tune: bool = True, bucket: int = 0) -> None:
    """dK, dV into dk, dv and dQ / sm_scale added into the zeroed fp32 (B, H, T, D) dq_acc (by atomics).

    lse: the forward's log2-sum-exp, delta: rowsum(O · dO), both contiguous (B, H, T) fp32, and dq_acc contiguous:
    the kernel indexes them flat. qk_scale = sm_scale · log2(e).
    tile: a fixed (BLOCK_M, BLOCK_N), or a whole candidate, of ``GLUON_BWD_TILES`` (``tile_for``); else the
    fastest candidate (``best_tile``), timed on scratch outputs.
    """
    D = q.shape[-1]
    if tile:
        chosen = tile_for(GLUON_BWD_TILES, D, tile, "backward")
    else:
        def prepare():  # dq_acc must stay zero and dk, dv are the caller's: time on scratch copies
            scratch = (torch.empty_like(dq_acc), torch.empty_like(dk), torch.empty_like(dv))
            return lambda t: _launch_bwd(q, k, v, do, lse, delta, *scratch, causal, qk_scale, sm_scale, t)

        chosen = best_tile(candidates("bwd", D), prepare, ("bwd", D, causal, q.dtype, bucket, q.device), tune)
    _launch_bwd(q, k, v, do, lse, delta, dq_acc, dk, dv, causal, qk_scale, sm_scale, chosen)
