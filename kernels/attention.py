"""Fused (flash) attention in Triton: forward and backward, beside its PyTorch reference.

The algorithm is FlashAttention-2 (Dao, 2023), read from Triton's fused-attention
tutorial and the flash-attention repository:

* forward: one program per (query block, batch × head). K/V blocks stream past
  the query block held in registers; an online softmax keeps the running row
  maximum ``m`` and row sum ``l`` so the (T, T) score matrix never exists in
  memory. The log-sum-exp per row is saved for the backward.
* backward: recomputation. The scores of a (query block, key block) tile are
  rebuilt from Q, K and the saved log-sum-exp, so the backward stores nothing
  of size T². Three launches: Δ = rowsum(O ∘ dO) (``_bwd_delta_kernel``), dK/dV
  with one program per key block (``_bwd_dkdv_kernel``) and dQ with one program
  per query block (``_bwd_dq_kernel``). Splitting dQ from dK/dV costs one more
  recomputation of the scores but needs no atomics, so gradients are
  deterministic and written once, in the input dtype.

Scores live in the log2 domain (scale folded with log2(e)) so the kernels call
``exp2``, which is what the hardware's SFU computes natively.

Layout: q (B, H, T, D); k, v (B, H_kv, T, D) with H % H_kv == 0 (grouped-query
attention: query head h reads kv head h // (H // H_kv), never a repeated copy).
Any strides: the model passes transposed views of (B, T, H, D) projections.
Lengths need not be multiples of the block size: the last block is masked, and
only the blocks that straddle the sequence end or the causal diagonal pay for
masks (``MASK`` constexpr), the others run unmasked.

``flash_attention`` runs on CUDA, or on CPU tensors when ``TRITON_INTERPRET=1``
was set before this module was imported (the tests do this).

``tma=True`` moves every (rows, D) tile with Hopper's tensor-memory accelerator,
through 4-D descriptors of the same strided tensors (Triton >= 3.4, 16-byte
aligned starts and strides; ``tma_unsupported_reason``): the forward as
``_fwd_tma_kernel`` (the same online softmax, ``_softmax_step``), the backward
as the same two kernels with ``TMA=True``. Rows past the end arrive as zeros and
stores clip themselves. Compiled for sm_90a it needs fewer registers than the
pointer kernels (bench/attention_layout.py; e.g. dQ 128 × 64: 158 against 246)
and spills less in dK/dV; the H100 timed its forward 7-14% faster than the
pointer kernel's from T = 2048 (BENCHMARKS.md), the model's default is cuDNN.

``ws=True`` is ``tma=True`` with the forward warp-specialised (``_fwd_ws_kernel``):
half the TMA forward's rate on an H200 (BENCHMARKS.md), so only the benchmark calls it.
``gluon=True`` is ``tma=True`` with the forward of ``attention_gluon.py``, FlashAttention-3's
schedule written in Gluon, and with ``deterministic=False`` its one-kernel backward too
(Hopper): on an H200 forward+backward at 0.94-1.01x cuDNN's (2026-11-27), which the model uses.

``deterministic=False`` runs the backward as FlashAttention-2's CUDA kernel does: one
launch after Δ, the dK/dV kernel, which also adds each key block's share of dQ
(dS K) into a zeroed fp32 (B, H, T, D) buffer by atomic adds (128-bit ``red.add``
on sm_90a), scaled and rounded into dQ afterwards. The Δ pass zeroes that buffer
and a Triton kernel does the scale and rounding (``_dq_cast``), where a
torch.zeros and a mixed-dtype torch.mul were a launch each. The scores are rebuilt once
instead of twice: 5 tile products instead of 7, for an fp32 buffer of q's size
and dQ bits that vary from run to run. Not timed on a GPU yet either.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._host import next_pow2, order_heads

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) = exp2(x · log2(e))
_UNSET_BOX = 8  # rows of a TMA descriptor's box until a config's pre-hook sets it (no tile is 8 rows)

# Read once, as triton.jit did when it decorated the kernels below: in interpreter
# mode they run on CPU tensors through NumPy.
INTERPRET = bool(triton.knobs.runtime.interpret)


# ---------------------------------------------------------------------------
# Block-size configurations
# ---------------------------------------------------------------------------


def _table(half: list[tuple], fp32: list[tuple]) -> dict[tuple, set[tuple[int, int]]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) → the (input bits, head dim) pairs it is a candidate for."""
    table: dict[tuple, set[tuple[int, int]]] = {}
    for bits, blocks in ((16, half), (32, fp32)):
        for m, n, w, s, dims in blocks:
            table.setdefault((m, n, w, s), set()).update((bits, d) for d in dims)
    return table


def _configs(table: dict, pre_hook=None, interpret_tile: tuple[int, int] = (16, 16)) -> list[triton.Config]:
    """The table's tiles as Configs; one tiny config under the interpreter.

    Autotuning under the interpreter would run every config through NumPy: slow and
    pointless, so it gets a single 16 × 16 tile (the smallest tl.dot accepts; ``interpret_tile``).
    ``pre_hook`` runs before each launch with the config's arguments (the TMA forward
    sizes its descriptors' blocks there).
    """
    if INTERPRET:
        block_m, block_n = interpret_tile
        return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=1, num_stages=1, pre_hook=pre_hook)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for m, n, w, s in table]


def autotuning() -> bool:
    """False when ``MEGASCALE_TRITON_AUTOTUNE=0``: each kernel takes the first tile listed for its input
    width and head dim instead of compiling and timing every candidate.

    Autotuning compiles ~16 kernels per (head dim, dtype, causal) combination, seconds each: fine once
    per training run, but minutes for a test run over many combinations or a short debugging job.
    """
    return os.environ.get("MEGASCALE_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _pruner(table: dict):
    """Autotune pruner keeping the configs listed for the call's input width and head dim (the first
    of them only when autotuning is off)."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"] if "Q" in named_args else named_args["desc_q"]
        q = getattr(q, "base", q)  # a tensor, or a TMA descriptor of one
        want = (q.element_size() * 8, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM")))
        key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
        kept = [c for c in configs if want in table.get(key(c), ())] or configs
        return kept if autotuning() else kept[:1]

    return prune


def _tma_boxes(**blocks: tuple[str, ...]):
    """Autotuner pre-hook: where an argument is a TMA descriptor (``tma=True``), it moves (1, 1, BLOCK, D)
    boxes of the config being run; ``blocks`` maps BLOCK_M / BLOCK_N to argument names."""

    def hook(nargs) -> None:
        for block, names in blocks.items():
            for name in names:
                if hasattr(nargs[name], "block_shape"):
                    nargs[name].block_shape = [1, 1, nargs[block], nargs["HEAD_DIM"]]

    return hook


# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims), chosen by compiling
# every kernel for sm_90 and reading ptxas -v (bench/attention_layout.py, with a real call's
# alignment hints, without which nothing is vectorised or pipelined): kept where shared
# memory fits an H100 (227 KiB) and registers spill at most ~128 bytes; 256-wide heads
# need small tiles.
# The forward and dQ keep a (BLOCK_M, D) query tile resident, dK/dV two (BLOCK_N, D) tiles
# plus their fp32 accumulators, hence its smaller blocks. fp32 inputs (3xTF32 products,
# see _dot_flags) take twice the registers and shared memory: small tiles only, and
# still some spilling; fp32 is the exactness path, bf16/fp16 the fast one. Configs that
# overflow a smaller GPU's shared memory are skipped by the autotuner.
_UP_TO_128 = (32, 64, 128)
_ALL = SUPPORTED_HEAD_DIMS
_FWD_TILES = _table(
    half=[
        (128, 64, 8, 3, _UP_TO_128), (128, 64, 8, 4, _UP_TO_128), (128, 128, 8, 3, _UP_TO_128),
        (128, 128, 8, 2, _UP_TO_128), (128, 32, 8, 4, _UP_TO_128), (64, 64, 4, 4, _UP_TO_128),
        (64, 128, 4, 3, _UP_TO_128), (64, 32, 4, 3, _ALL),
        (128, 64, 8, 2, (256,)), (128, 32, 8, 2, (256,)), (64, 64, 8, 2, (256,)),
    ],
    fp32=[(32, 32, 4, 2, _UP_TO_128), (64, 64, 4, 2, _UP_TO_128)],
)
_DKDV_TILES = _table(
    half=[
        (32, 128, 8, 3, _UP_TO_128), (32, 128, 8, 2, _UP_TO_128), (32, 64, 8, 3, _UP_TO_128),
        # at head dim 128 the three above spill 40-128 bytes (bench/attention_layout.py); this one does not
        (16, 128, 8, 3, (64, 128)),
        # deterministic=False adds dS K and its atomics to the loop: at head dim 128 these two spill at most 4 bytes
        # with Triton 3.6 (TMA; 16 x 64 nothing, with 3.9 too), where the ones above spill 40-324 bytes
        (16, 64, 8, 3, (64, 128)), (32, 64, 8, 2, (64, 128)),
        (64, 128, 8, 3, (32, 64)), (64, 64, 8, 3, (32, 64)), (16, 64, 4, 2, (32, 64)),
        (32, 32, 8, 2, (256,)), (16, 32, 8, 2, (256,)),
    ],
    fp32=[(16, 32, 4, 2, _UP_TO_128), (32, 32, 4, 2, _UP_TO_128)],
)
_DQ_TILES = _table(
    half=[
        (128, 32, 8, 3, _ALL), (128, 64, 8, 3, _UP_TO_128), (64, 64, 4, 3, _UP_TO_128),
        (64, 32, 4, 3, _ALL), (64, 16, 4, 2, _ALL),
    ],
    fp32=[(32, 32, 4, 2, _UP_TO_128), (64, 16, 4, 2, _UP_TO_128)],
)
_TUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL"]  # tensor dtypes are added to the key by Triton


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32.

    UPCAST is set only for bf16 under the interpreter, whose NumPy tl.dot reads bf16
    bit patterns as integers; the operands are already rounded to bf16, so the
    upcast product is what the tensor cores compute on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _kv_stages(start_m, seq_len, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block at start_m: key blocks [0, full_end) need no mask, [full_end, hi) do.

    A key block is mask-free when it lies wholly inside the sequence and, if causal,
    wholly at or left of the block's first query row.
    """
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
        full_end = (tl.minimum(start_m + 1, seq_len) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_len
        full_end = (seq_len // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def _load_rows(base, offs_t, offs_d, stride_t, stride_d, seq_len, MASK: tl.constexpr):
    """A (rows, D) tile; rows past the sequence end read as zero when MASK."""
    ptrs = base + offs_t[:, None] * stride_t + offs_d[None, :] * stride_d
    if MASK:
        return tl.load(ptrs, mask=offs_t[:, None] < seq_len, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _rows(src, b, h, start, offs_t, offs_d, stride_t, stride_d, seq_len,
          MASK: tl.constexpr, TMA: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A (ROWS, D) tile at rows start.. of head (b, h): from a TMA descriptor (rows past the end arrive as 0)
    or, without TMA, from ``src`` = that head's base pointer (``_load_rows``)."""
    if TMA:  # an if/else, not an early return: the compiler would still build the pointer branch
        tile = src.load([b, h, start, 0]).reshape(ROWS, HEAD_DIM)
    else:
        tile = _load_rows(src, offs_t, offs_d, stride_t, stride_d, seq_len, MASK)
    return tile


@triton.jit
def _visible(m, n, seq_len, CAUSAL: tl.constexpr):
    """True where query m may attend to key n; m and n come broadcastable, e.g. (M, 1) and (1, N)."""
    valid = (m < seq_len) & (n < seq_len)
    if CAUSAL:
        valid = valid & (m >= n)
    return valid


@triton.jit
def _softmax_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seq_len, qk_scale,
                  CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One key block (k, v: (BLOCK_N, D)) into the online softmax: acc (BLOCK_M, D), row sum l_i, row max m_i."""
    qk = _mma(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), PRECISION, UPCAST)
    if MASK:
        # Row validity is left out: padded query rows are never stored, and keeping
        # column 0 for them avoids an all -inf row (NaN from -inf - -inf).
        keep = offs_n[None, :] < seq_len
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        qk = tl.where(keep, qk, float("-inf"))
    # The scale (> 0, so it commutes with max) goes on the row maximum and, inside exp2's
    # argument, on the scores: one FMA per score where a multiply first cost one more
    # instruction per score (sm_90a PTX of a 128 × 64 tile: 210 fp32 mul/sub/fma, was 270).
    # The H100 timed the forward within ±2% of before (BENCHMARKS.md, 2026-11-27).
    # The first block visited always holds key 0, visible to every row, so m_ij is finite.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # (BLOCK_M, BLOCK_N), log2 domain
    alpha = tl.math.exp2(m_i - m_ij)  # rescales what was accumulated under the old maximum
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
    return acc, l_i, m_ij


@triton.jit
def _launch_order(HEAVY_LAST: tl.constexpr, ORDER_HEADS: tl.constexpr):
    """(block, batch × head) of this program. The grid is (ORDER_HEADS × blocks, B · heads / ORDER_HEADS): a group
    of ORDER_HEADS heads along y, its blocks along x, block by block, each over the group's heads; with HEAVY_LAST
    the last blocks (a causal forward's or dQ pass's heaviest) first. The GPU starts blocks in x-then-y order, so
    the heaviest blocks of every head start first and the light ones fill the end; the order head by head left a
    tail of 5-7% at 2k-8k (``bench/launch_order.py``, a model). ORDER_HEADS divides the heads (``order_heads``)."""
    r = tl.program_id(0)
    i = r // ORDER_HEADS
    if HEAVY_LAST:
        i = tl.num_programs(0) // ORDER_HEADS - 1 - i
    return i, tl.program_id(1) * ORDER_HEADS + r % ORDER_HEADS


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               offs_m, lo, hi, seq_len, qk_scale,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key blocks [lo, hi): updates acc (BLOCK_M, D), row sum l_i, row max m_i."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kt, stride_kd, seq_len, MASK)  # (BLOCK_N, D)
        v = _load_rows(v_base, offs_n, offs_d, stride_vt, stride_vd, seq_len, MASK)  # (BLOCK_N, D)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seq_len, qk_scale,
                                      CAUSAL, MASK, PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.autotune(configs=_configs(_FWD_TILES), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_FWD_TILES)})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_qd,
                stride_kb, stride_kh, stride_kt, stride_kd,
                stride_vb, stride_vh, stride_vt, stride_vd,
                stride_ob, stride_oh, stride_ot, stride_od,
                n_heads, group, seq_len, seq_bucket, qk_scale,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER_HEADS: tl.constexpr = 1):
    # torch.compile's Inductor types a Python float argument as fp64 (the JIT: fp32); fp64 scores would not
    # match the fp32 accumulator of tl.dot and fail to compile, so the scales are cast here.
    qk_scale = tl.cast(qk_scale, tl.float32)
    # Causal query blocks near the end do the most work: launched first, the light ones fill the tail.
    pid_m, pid_bh = _launch_order(CAUSAL, ORDER_HEADS)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    kv_h = h // group  # grouped-query attention: the query heads of a group share one K/V head
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, stride_qd, seq_len, True)
    k_base = K + b * stride_kb + kv_h * stride_kh
    v_base = V + b * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_end, hi = _kv_stages(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, 0, full_end, seq_len, qk_scale,
                               CAUSAL, False, BLOCK_N, HEAD_DIM, PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, full_end, hi, seq_len, qk_scale,
                               CAUSAL, True, BLOCK_N, HEAD_DIM, PRECISION, UPCAST)

    row_ok = offs_m < seq_len
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
    # log2-sum-exp2 of the scaled scores: the backward rebuilds p = exp2(s - lse) from it.
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, offs_m, lo, hi, seq_len, qk_scale,
                   CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``_fwd_inner`` with K/V blocks brought by the tensor-memory accelerator: rows past the end arrive as 0."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = desc_k.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, q, k, v, offs_m, offs_n, seq_len, qk_scale,
                                      CAUSAL, MASK, PRECISION, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _tma_query_block(n_heads, group, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, ORDER_HEADS: tl.constexpr):
    """This program's (batch × head, batch, head, kv head, first query row); int32, as descriptor coordinates are.

    Causal query blocks near the end do the most work: they are launched first so the
    light ones fill the tail of the grid (``_launch_order``).
    """
    pid_m, pid_bh = _launch_order(CAUSAL, ORDER_HEADS)
    h = pid_bh % n_heads
    return pid_bh, pid_bh // n_heads, h, h // group, pid_m * BLOCK_M


@triton.autotune(configs=_configs(_FWD_TILES, pre_hook=_tma_boxes(BLOCK_M=("desc_q", "desc_o"),
                                                                   BLOCK_N=("desc_k", "desc_v"))),
                 key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_FWD_TILES)})
@triton.jit
def _fwd_tma_kernel(desc_q, desc_k, desc_v, desc_o, LSE, n_heads, group, seq_len, seq_bucket, qk_scale,
                    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER_HEADS: tl.constexpr = 1):
    """``_fwd_kernel`` reading Q, K, V and writing O through 4-D TMA descriptors (B, heads, T, D).

    The copies are issued by the TMA unit from a descriptor instead of by every
    thread from a tensor of addresses; bounds are the descriptor's, so the tail
    block needs no load mask and its store clips itself.
    """
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under Inductor: see _fwd_kernel
    pid_bh, b, h, kv_h, start_m = _tma_query_block(n_heads, group, CAUSAL, BLOCK_M, ORDER_HEADS)
    offs_m = start_m + tl.arange(0, BLOCK_M)

    q = desc_q.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_end, hi = _kv_stages(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, offs_m, 0, full_end, seq_len, qk_scale,
                                   CAUSAL, False, BLOCK_N, HEAD_DIM, PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_tma_inner(acc, l_i, m_i, q, desc_k, desc_v, b, kv_h, offs_m, full_end, hi, seq_len, qk_scale,
                                   CAUSAL, True, BLOCK_N, HEAD_DIM, PRECISION, UPCAST)

    o = (acc / l_i[:, None]).to(q.dtype)  # o has q's dtype
    desc_o.store([b, h, start_m, 0], o.reshape(1, 1, BLOCK_M, HEAD_DIM))
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < seq_len)


def _ws_boxes(nargs) -> None:
    """Autotuner pre-hook of ``_fwd_ws_kernel``: Q and O move half query blocks, K and V key blocks."""
    for name, rows in (("desc_q", nargs["BLOCK_M"] // 2), ("desc_o", nargs["BLOCK_M"] // 2),
                       ("desc_k", nargs["BLOCK_N"]), ("desc_v", nargs["BLOCK_N"])):
        nargs[name].block_shape = [1, 1, rows, nargs["HEAD_DIM"]]


# (BLOCK_M, BLOCK_N, num_warps per consumer group, num_stages) of the warp-specialised forward, head dims up to 128,
# 16-bit inputs, compiled for sm_90a (12 warps: a TMA producer and two consumer groups; bench/attention_layout.py).
# Triton 3.9: 128 x 64 needs 168 registers and no spill, 128-161 KiB of shared memory at head dim 128. Triton 3.6
# (the GPU machine's) spills 136-164 bytes inside the loop at 128 x 64, head dim 128, with its own ptxas and with
# 3.9's: hence 128 x 32, which spills with neither, for the autotuner to weigh against it. 128 x 128 spills with both.
_WS_TILES = _table(half=[(128, 64, 4, 3, _UP_TO_128), (128, 64, 4, 2, _UP_TO_128), (128, 32, 4, 4, _UP_TO_128)],
                   fp32=[])


@triton.autotune(configs=_configs(_WS_TILES, pre_hook=_ws_boxes, interpret_tile=(32, 16)), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _pruner(_WS_TILES)})
@triton.jit
def _fwd_ws_kernel(desc_q, desc_k, desc_v, desc_o, LSE, n_heads, group, seq_len, seq_bucket, qk_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER_HEADS: tl.constexpr = 1):
    """``_fwd_tma_kernel`` with its query block in two halves and its one loop warp-specialised.

    ``tl.range(warp_specialize=True)`` lets Triton's Hopper pass split the loop
    into a producer warp issuing the TMA loads and one consumer warp group per
    half query block, each with its own registers (``setmaxnreg``): one group's
    softmax can run while the other's products occupy the tensor cores, the
    overlap FlashAttention-3 schedules by hand. The pass partitions the data
    along the query rows itself only when the kernel names the halves (a whole
    128-row Q tile fails to compile: "descriptor block with 16384 elements tensor
    with 8192 elements"), hence the two (BLOCK_M / 2, D) tiles, accumulators and
    running statistics. Compiled for sm_90a (Triton 3.9, ``bench/attention_layout.py
    --kernels fwd-ws``): 12 warps, specialised, 168 registers, no spill at 128 × 64.
    Not timed on a GPU yet. Under the interpreter the loop runs unspecialised: the
    same arithmetic.
    """
    HALF: tl.constexpr = BLOCK_M // 2
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under Inductor: see _fwd_kernel
    pid_bh, b, h, kv_h, start_m = _tma_query_block(n_heads, group, CAUSAL, BLOCK_M, ORDER_HEADS)
    offs_0 = start_m + tl.arange(0, HALF)
    offs_1 = offs_0 + HALF
    q0 = desc_q.load([b, h, start_m, 0]).reshape(HALF, HEAD_DIM)
    q1 = desc_q.load([b, h, start_m + HALF, 0]).reshape(HALF, HEAD_DIM)
    m0 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    m1 = tl.full([HALF], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([HALF], dtype=tl.float32)
    l1 = tl.zeros([HALF], dtype=tl.float32)
    acc0 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)
    acc1 = tl.zeros([HALF, HEAD_DIM], dtype=tl.float32)

    # One loop, every block masked: with the mask-free blocks in a loop of their own, as the other kernels
    # have them, the pass fails (Triton 3.9, sm_90a; triton-lang/triton#9728 reports the same on 3.4).
    _, hi = _kv_stages(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = desc_k.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, kv_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc0, l0, m0 = _softmax_step(acc0, l0, m0, q0, k, v, offs_0, offs_n, seq_len, qk_scale,
                                     CAUSAL, True, PRECISION, UPCAST)
        acc1, l1, m1 = _softmax_step(acc1, l1, m1, q1, k, v, offs_1, offs_n, seq_len, qk_scale,
                                     CAUSAL, True, PRECISION, UPCAST)

    desc_o.store([b, h, start_m, 0], (acc0 / l0[:, None]).to(q0.dtype).reshape(1, 1, HALF, HEAD_DIM))
    desc_o.store([b, h, start_m + HALF, 0], (acc1 / l1[:, None]).to(q1.dtype).reshape(1, 1, HALF, HEAD_DIM))
    lse = LSE + pid_bh.to(tl.int64) * seq_len
    tl.store(lse + offs_0, m0 + tl.math.log2(l0), mask=offs_0 < seq_len)
    tl.store(lse + offs_1, m1 + tl.math.log2(l1), mask=offs_1 < seq_len)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, DQA,
                      stride_ob, stride_oh, stride_ot, stride_od,
                      stride_db, stride_dh, stride_dt, stride_dd,
                      n_heads, seq_len,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQA: tl.constexpr):
    """Δ_i = Σ_d O_id · dO_id = Σ_j P_ij dP_ij, the softmax backward's row term. ZERO_DQA: also zero the same rows
    of the contiguous fp32 (B, H, T, D) buffer that the one-kernel backward adds dQ into (one pass for both)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, stride_od, seq_len, True)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, offs_d, stride_dt, stride_dd, seq_len, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, delta, mask=offs_m < seq_len)
    if ZERO_DQA:
        rows = DQA + pid_bh.to(tl.int64) * seq_len * HEAD_DIM
        zeros = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        tl.store(rows + offs_m[:, None] * HEAD_DIM + offs_d[None, :], zeros, mask=offs_m[:, None] < seq_len)


@triton.jit
def _dq_cast_kernel(DQA, DQ, stride_qb, stride_qh, stride_qt, stride_qd, n_heads, seq_len, scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """dQ = scale · dQ_acc rounded once to dQ's dtype, into dQ's strided layout: the fp32 sum the one-kernel
    backward added up by atomics (contiguous (B, H, T, D)), as ``torch.mul(dq_acc, scale, out=dq)`` rounds it."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keep = offs_m[:, None] < seq_len
    acc = tl.load(DQA + pid_bh.to(tl.int64) * seq_len * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=keep)
    scale = tl.cast(scale, tl.float32)  # fp64 under Inductor: see _fwd_kernel
    dq = (acc * scale).to(DQ.dtype.element_ty)  # an fp32 product, rounded once to nearest even, as torch.mul
    tl.store(DQ + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, dq,
             mask=keep)


@triton.jit
def _add_rows(dst, offs_t, offs_d, x, seq_len, MASK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Atomically add the fp32 (rows, D) tile x into rows offs_t of one head of a contiguous fp32 buffer,
    ``dst`` = that head's base pointer: relaxed atomic adds, with MASK none past the sequence end.

    Element atomics also under TMA: Triton's interpreter has no descriptor reduction, and the
    tests must run what the GPU runs (a TMA reduce-add would be the next step, if the GPU shows
    these atomics cost)."""
    ptrs = dst + offs_t[:, None] * HEAD_DIM + offs_d[None, :]
    if MASK:
        tl.atomic_add(ptrs, x, mask=(offs_t < seq_len)[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, sem="relaxed")


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_src, do_src, dqa_src, b, h, lse_base, delta_base,
                stride_qt, stride_qd, stride_dt, stride_dd,
                offs_n, lo, hi, seq_len, qk_scale,
                CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, D) of one key block over query blocks [lo, hi) of one query head.

    Works on transposed tiles (keys × queries) so that dV = Pᵀ dO and dK = dSᵀ Q
    are plain products. DQ_ATOMIC: also this key block's share of each query block's
    dQ, dS K, added into the fp32 accumulator at ``dqa_src`` (``_add_rows``).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows(q_src, b, h, start_m, offs_m, offs_d, stride_qt, stride_qd, seq_len, MASK, TMA, BLOCK_M, HEAD_DIM)
        do = _rows(do_src, b, h, start_m, offs_m, offs_d, stride_dt, stride_dd, seq_len, MASK, TMA, BLOCK_M, HEAD_DIM)
        if MASK:
            lse = tl.load(lse_base + offs_m, mask=offs_m < seq_len, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seq_len, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        zeros = tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32)
        s_t = _mma(k, tl.trans(q), zeros, PRECISION, UPCAST) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            p_t = tl.where(_visible(offs_m[None, :], offs_n[:, None], seq_len, CAUSAL), p_t, 0.0)
        dv = _mma(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        dp_t = _mma(v, tl.trans(do), zeros, PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = _mma(ds_t, q, dk, PRECISION, UPCAST)
        if DQ_ATOMIC:
            dq = _mma(tl.trans(ds_t), k, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), PRECISION, UPCAST)
            _add_rows(dqa_src, offs_m, offs_d, dq, seq_len, MASK, HEAD_DIM)
    return dk, dv


# reset_to_zero: with DQ_ATOMIC every candidate the tuner times adds its dQ into DQA again, so DQA is zeroed before
# each timed run and after the last. Without it the H200 (2026-11-27) failed every bf16 case longer than one token
# (17 of the 21 it reached), dQ several times too large; with it, all 32 pass. Triton 3.6 times even a lone
# candidate, so MEGASCALE_TRITON_AUTOTUNE=0 did not avoid it there; Triton 3.9 (this suite's) skips that timing.
# Deterministic runs pass dq as DQA, which the dQ kernel writes whole afterwards: zeroing it costs only tuning time.
@triton.autotune(configs=_configs(_DKDV_TILES, pre_hook=_tma_boxes(BLOCK_M=("Q", "DO"), BLOCK_N=("K", "V", "DK", "DV"))),
                 key=[*_TUNE_KEY, "TMA", "DQ_ATOMIC"],  # TMA, DQ_ATOMIC: only when passed
                 reset_to_zero=["DQA"],
                 prune_configs_by={"early_config_prune": _pruner(_DKDV_TILES)})
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQA, LSE, DELTA,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_kt, stride_kd,
                     stride_vb, stride_vh, stride_vt, stride_vd,
                     stride_db, stride_dh, stride_dt, stride_dd,
                     stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                     n_heads, n_kv_heads, group, seq_len, seq_bucket, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False,
                     DQ_ATOMIC: tl.constexpr = False, ORDER_HEADS: tl.constexpr = 1):
    """dK, dV of one key block of one KV head (TMA: Q, K, V, dO, dK, dV are 4-D descriptors).

    DQ_ATOMIC (``flash_attention(deterministic=False)``): the whole backward in this one
    kernel, dQ added into DQA, a zeroed fp32 (B, H, T, D) buffer, by atomic adds; the
    scores are rebuilt once instead of twice (5 products per tile instead of 7), but
    the order of dQ's fp32 sums varies from run to run. Otherwise DQA is not read.

    Grouped-query attention: the program loops over the `group` query heads that
    read this KV head and sums their contributions in registers. The alternative,
    one program per query head with atomic adds into dK/dV, needs fp32 scratch
    buffers, a cast pass and gives run-to-run differences; the loop keeps the
    backward deterministic and writes dK/dV once. Its cost is less parallelism
    (B · H_kv · T/BLOCK_N programs), which is ample at training shapes.
    """
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under Inductor: see _fwd_kernel
    key_block, pid_bkv = _launch_order(False, ORDER_HEADS)  # causal: the first key blocks see the most queries
    b32, kv_h32 = pid_bkv // n_kv_heads, pid_bkv % n_kv_heads  # int32: descriptor coordinates
    b, kv_h = b32.to(tl.int64), kv_h32.to(tl.int64)
    start_n = key_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:
        k_src, v_src = K, V
    else:
        k_src, v_src = K + b * stride_kb + kv_h * stride_kh, V + b * stride_vb + kv_h * stride_vh
    k = _rows(k_src, b32, kv_h32, start_n, offs_n, offs_d, stride_kt, stride_kd, seq_len, True, TMA, BLOCK_N, HEAD_DIM)
    v = _rows(v_src, b32, kv_h32, start_n, offs_n, offs_d, stride_vt, stride_vd, seq_len, True, TMA, BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query blocks [lo, diag_end) straddle the causal diagonal, [diag_end, full_end)
    # are mask-free, [tail, seq_len) hold the sequence end.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        diag_end = 0
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    tail = tl.maximum(diag_end, full_end)
    for g in range(group):
        h32 = kv_h32 * group + g
        h = h32.to(tl.int64)
        if TMA:
            q_src, do_src = Q, DO
        else:
            q_src, do_src = Q + b * stride_qb + h * stride_qh, DO + b * stride_db + h * stride_dh
        row0 = (b * n_heads + h) * seq_len  # LSE, Δ (B, H, T) and DQA (B, H, T, D) are contiguous
        dqa_src = DQA + row0 * HEAD_DIM
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dqa_src, b32, h32, LSE + row0, DELTA + row0,
                             stride_qt, stride_qd, stride_dt, stride_dd,
                             offs_n, lo, tl.minimum(diag_end, seq_len), seq_len, qk_scale,
                             CAUSAL, True, BLOCK_M, HEAD_DIM, PRECISION, UPCAST, TMA, DQ_ATOMIC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dqa_src, b32, h32, LSE + row0, DELTA + row0,
                             stride_qt, stride_qd, stride_dt, stride_dd,
                             offs_n, diag_end, full_end, seq_len, qk_scale,
                             CAUSAL, False, BLOCK_M, HEAD_DIM, PRECISION, UPCAST, TMA, DQ_ATOMIC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_src, do_src, dqa_src, b32, h32, LSE + row0, DELTA + row0,
                             stride_qt, stride_qd, stride_dt, stride_dd,
                             offs_n, tail, seq_len, seq_len, qk_scale,
                             CAUSAL, True, BLOCK_M, HEAD_DIM, PRECISION, UPCAST, TMA, DQ_ATOMIC)

    dk = dk * sm_scale  # s = scale · q·k
    if TMA:  # the store clips the rows past the end
        DK.store([b32, kv_h32, start_n, 0], dk.to(k.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))
        DV.store([b32, kv_h32, start_n, 0], dv.to(v.dtype).reshape(1, 1, BLOCK_N, HEAD_DIM))
    else:
        row_ok = (offs_n < seq_len)[:, None]
        dk_ptrs = DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_src, v_src, b, kv_h, stride_kt, stride_kd, stride_vt, stride_vd,
              offs_m, lo, hi, seq_len, qk_scale,
              CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ (BLOCK_M, D) of one query block over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(k_src, b, kv_h, start_n, offs_n, offs_d, stride_kt, stride_kd, seq_len, MASK, TMA, BLOCK_N, HEAD_DIM)
        v = _rows(v_src, b, kv_h, start_n, offs_n, offs_d, stride_vt, stride_vd, seq_len, MASK, TMA, BLOCK_N, HEAD_DIM)
        zeros = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        s = _mma(q, tl.trans(k), zeros, PRECISION, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], seq_len, CAUSAL), p, 0.0)
        dp = _mma(do, tl.trans(v), zeros, PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    return dq


@triton.autotune(configs=_configs(_DQ_TILES, pre_hook=_tma_boxes(BLOCK_M=("Q", "DO", "DQ"), BLOCK_N=("K", "V"))),
                 key=[*_TUNE_KEY, "TMA"],  # TMA: only when passed (the TMA variant)
                 prune_configs_by={"early_config_prune": _pruner(_DQ_TILES)})
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   stride_qb, stride_qh, stride_qt, stride_qd,
                   stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd,
                   stride_db, stride_dh, stride_dt, stride_dd,
                   stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                   n_heads, group, seq_len, seq_bucket, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False,
                   ORDER_HEADS: tl.constexpr = 1):
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 under Inductor: see _fwd_kernel
    pid_m, pid_bh = _launch_order(CAUSAL, ORDER_HEADS)
    b32, h32 = pid_bh // n_heads, pid_bh % n_heads  # int32: descriptor coordinates
    kv_h32 = h32 // group
    b, h, kv_h = b32.to(tl.int64), h32.to(tl.int64), kv_h32.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len

    if TMA:
        q_src, do_src, k_src, v_src = Q, DO, K, V
    else:
        q_src, do_src = Q + b * stride_qb + h * stride_qh, DO + b * stride_db + h * stride_dh
        k_src, v_src = K + b * stride_kb + kv_h * stride_kh, V + b * stride_vb + kv_h * stride_vh
    q = _rows(q_src, b32, h32, start_m, offs_m, offs_d, stride_qt, stride_qd, seq_len, True, TMA, BLOCK_M, HEAD_DIM)
    do = _rows(do_src, b32, h32, start_m, offs_m, offs_d, stride_dt, stride_dd, seq_len, True, TMA, BLOCK_M, HEAD_DIM)
    row0 = pid_bh.to(tl.int64) * seq_len
    lse = tl.load(LSE + row0 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    full_end, hi = _kv_stages(start_m, seq_len, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, b32, kv_h32, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, 0, full_end, seq_len, qk_scale, CAUSAL, False, BLOCK_N, HEAD_DIM, PRECISION, UPCAST, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, k_src, v_src, b32, kv_h32, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, full_end, hi, seq_len, qk_scale, CAUSAL, True, BLOCK_N, HEAD_DIM, PRECISION, UPCAST, TMA)

    dq = dq * sm_scale
    if TMA:  # the store clips the rows past the end
        DQ.store([b32, h32, start_m, 0], dq.to(q.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _dot_flags(dtype: torch.dtype) -> dict:
    """How tl.dot multiplies: fp32 inputs as 3xTF32, bf16 upcast under the interpreter.

    3xTF32 splits each fp32 operand into a TF32 head and tail and sums three tensor-core
    products: close to fp32 accuracy (torch's default keeps TF32 off for fp32) at
    tensor-core speed. "ieee" would run on the FMA units, spill kilobytes of registers
    and take minutes to compile. The interpreter multiplies in exact fp32 either way.
    """
    return {"PRECISION": "tf32x3" if dtype == torch.float32 else "tf32", "UPCAST": INTERPRET and dtype == torch.bfloat16}


def _seq_bucket(seq_len: int) -> int:
    """Autotuning key for the length: powers of two, so generation (T growing by one) tunes log T times."""
    return next_pow2(seq_len)


class Tiles(NamedTuple):
    """Fixed (BLOCK_M, BLOCK_N) per kernel, bypassing the autotuner.

    The tests use it to run tile shapes other than the interpreter's 16 × 16
    (BLOCK_M ≠ BLOCK_N exercises the causal and tail bookkeeping); None everywhere else.
    """

    fwd: tuple[int, int]
    dkdv: tuple[int, int]
    dq: tuple[int, int]


def _launch(kernel, grid, args: tuple, kwargs: dict, tile: tuple[int, int] | None) -> None:
    """Autotuned launch, or the underlying kernel with a fixed tile."""
    if tile is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, BLOCK_M=tile[0], BLOCK_N=tile[1], num_warps=4 if not INTERPRET else 1)


def _ordered_grid(T: int, block: str, n_heads: int):
    """(grid, ORDER_HEADS) of a launch in ``_launch_order``'s order over ``n_heads`` (batch × heads): a group of
    heads along y, its blocks of ``block`` (the tile's BLOCK_M or BLOCK_N) rows along x."""
    together = order_heads(n_heads)
    return (lambda meta: (together * triton.cdiv(T, meta[block]), n_heads // together)), together


def _forward(q, k, v, causal: bool, scale: float, tiles: Tiles | None = None,
             tma: bool = False, ws: bool = False, gluon: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if gluon:
        from . import attention_gluon  # noqa: PLC0415 (Gluon's import is guarded there)

        return attention_gluon.forward(q, k, v, causal, scale * LOG2E, tiles and tiles.fwd, autotuning(),
                                       _seq_bucket(q.shape[2]))
    B, H, T, D = q.shape
    o = torch.empty_like(q)  # (B, H, T, D), q's memory layout
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)  # log2 domain
    scalars = (H, H // k.shape[1], T, _seq_bucket(T), scale * LOG2E)
    grid, together = _ordered_grid(T, "BLOCK_M", B * H)
    consts = dict(HEAD_DIM=D, CAUSAL=causal, ORDER_HEADS=together, **_dot_flags(q.dtype))
    if tma or ws:
        boxes = tiles and (tiles.fwd[0] // 2 if ws else tiles.fwd[0], tiles.fwd[1])  # ws: Q and O in half blocks
        d = _descriptors(boxes, dict(q=q, o=o), dict(k=k, v=v), D)
        _launch(_fwd_ws_kernel if ws else _fwd_tma_kernel, grid, (d["q"], d["k"], d["v"], d["o"], lse, *scalars),
                consts, tiles and tiles.fwd)
        return o, lse
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), *scalars)
    _launch(_fwd_kernel, grid, args, consts, tiles and tiles.fwd)
    return o, lse


def _delta(o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dq_acc: torch.Tensor | None = None) -> torch.Tensor:
    """Δ = rowsum(O · dO), (B, H, T) fp32 like lse: the backward's pass before its kernels; and, given the one-kernel
    backward's contiguous fp32 dQ buffer, its zeros in the same pass (where a torch.zeros was a launch of its own)."""
    B, H, T, D = o.shape
    delta = torch.empty_like(lse)
    block = 16 if INTERPRET else 128
    _bwd_delta_kernel[(triton.cdiv(T, block), B * H)](
        o, do, delta, delta if dq_acc is None else dq_acc, *_strides(o), *_strides(do), H, T, HEAD_DIM=D,
        BLOCK_M=block, ZERO_DQA=dq_acc is not None,
    )
    return delta


def _dq_cast(dq_acc: torch.Tensor, dq: torch.Tensor, scale: float) -> None:
    """dq = scale · dq_acc in dq's dtype and layout (``_dq_cast_kernel``): the one-kernel backward's last pass, in
    place of PyTorch's mixed-dtype mul (fp32 in, 16-bit out), which takes its elementwise path without vector loads
    (bench/attention.py's ``backward_passes`` times both)."""
    B, H, T, D = dq.shape
    block = 16 if INTERPRET else 64
    _dq_cast_kernel[(triton.cdiv(T, block), B * H)](dq_acc, dq, *_strides(dq), H, T, scale, HEAD_DIM=D, BLOCK_M=block)


def _backward(q, k, v, o, lse, do, causal: bool, scale: float, tiles: Tiles | None = None, tma: bool = False,
              deterministic: bool = True, gluon: bool = False):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    if tma and _tma_refusal(do) is not None:  # e.g. the expanded gradient of a sum: stride 0
        do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # Not deterministic: dQ summed by atomic adds in fp32 into dq_acc by the dK/dV kernel, the dQ kernel not run;
    # the Δ pass zeroes it.
    dq_acc = None if deterministic else torch.empty((B, H, T, D), device=q.device, dtype=torch.float32)
    delta = _delta(o, do, lse, dq_acc)
    common = dict(HEAD_DIM=D, CAUSAL=causal, **_dot_flags(q.dtype), **({"TMA": True} if tma else {}))
    if gluon and not deterministic:  # the one-kernel backward written in Gluon (attention_gluon.py)
        from . import attention_gluon  # noqa: PLC0415

        attention_gluon.backward(q, k, v, do, lse, delta, dq_acc, dk, dv, causal, scale * LOG2E, scale,
                                 tiles and tiles.dkdv, autotuning(), _seq_bucket(T))
        _dq_cast(dq_acc, dq, scale)
        return dq, dk, dv
    # With TMA the tensors travel as descriptors (their boxes set per config by the pre-hooks, or
    # here for a fixed tile); the strides still go along, unused, so both variants share one kernel.
    plain = dict(q=q, k=k, v=v, do=do, dq=dq, dk=dk, dv=dv, dqa=dq if dq_acc is None else dq_acc)
    src, dq_src = plain, plain
    if tma:  # one set per launch: the two kernels' boxes differ
        src = {"dqa": plain["dqa"], **_descriptors(tiles and tiles.dkdv, dict(q=q, do=do), dict(k=k, v=v, dk=dk, dv=dv), D)}
        dq_src = _descriptors(tiles and tiles.dq, dict(q=q, do=do, dq=dq), dict(k=k, v=v), D)
    dkdv_args = (src["q"], src["k"], src["v"], src["do"], src["dk"], src["dv"], src["dqa"], lse, delta,
                 *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
                 H, H_kv, H // H_kv, T, _seq_bucket(T), scale * LOG2E, scale)
    grid, together = _ordered_grid(T, "BLOCK_N", B * H_kv)
    _launch(_bwd_dkdv_kernel, grid, dkdv_args,
            {**common, "ORDER_HEADS": together, **({} if deterministic else {"DQ_ATOMIC": True})}, tiles and tiles.dkdv)
    if dq_acc is not None:
        _dq_cast(dq_acc, dq, scale)  # s = scale · q·k; one rounding to q's dtype, into q's layout
        return dq, dk, dv
    dq_args = (dq_src["q"], dq_src["k"], dq_src["v"], dq_src["do"], dq_src["dq"], lse, delta,
               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
               H, H // H_kv, T, _seq_bucket(T), scale * LOG2E, scale)
    grid, together = _ordered_grid(T, "BLOCK_M", B * H)
    _launch(_bwd_dq_kernel, grid, dq_args, {**common, "ORDER_HEADS": together}, tiles and tiles.dq)
    return dq, dk, dv


def _descriptors(tile: tuple[int, int] | None, rows_m: dict, rows_n: dict, head_dim: int) -> dict:
    """4-D TMA descriptors of one launch's tensors: rows_m's move BLOCK_M rows, rows_n's BLOCK_N.

    The boxes are a fixed tile's, or a placeholder no config uses until the autotuner's pre-hook
    (``_tma_boxes``) sets them: without the hook the kernel would not compile, rather than run wrong.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: PLC0415 (Triton >= 3.4)

    out = {}
    for rows, tensors in ((0, rows_m), (1, rows_n)):
        for name, x in tensors.items():
            box = [1, 1, tile[rows] if tile else _UNSET_BOX, head_dim]
            out[name] = TensorDescriptor(x, list(x.shape), list(x.stride()), box)
    return out


def _tma_refusal(x: torch.Tensor) -> str | None:
    if x.stride(-1) != 1 or x.data_ptr() % 16 or any(st * x.element_size() % 16 for st in x.stride()[:-1]):
        return "TMA needs a contiguous last dimension, a 16-byte aligned start and 16-byte multiple strides"
    return None


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, O and the log-sum-exp; the backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, tiles: Tiles | None = None, tma: bool = False,
                ws: bool = False, deterministic: bool = True, gluon: bool = False):
        o, lse = _forward(q, k, v, causal, softmax_scale, tiles, tma, ws, gluon)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale, ctx.tiles, ctx.tma = causal, softmax_scale, tiles, tma or ws or gluon
        ctx.deterministic, ctx.gluon = deterministic, gluon
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal, ctx.softmax_scale, ctx.tiles, ctx.tma,
                               ctx.deterministic, ctx.gluon)
        return dq, dk, dv, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def unsupported_config(head_dim: int, dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why the kernel cannot run this head dim / dtype / device, or None when it can.

    The model's backend switch asks this once at start-up: shapes are fixed per model.
    """
    device = torch.device(device)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} not in (float16, bfloat16, float32)"
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        return f"device {device.type}: the Triton kernel needs CUDA (or CPU tensors with TRITON_INTERPRET=1)"
    if device.type == "cuda" and dtype == torch.float32 and head_dim > 128:
        return f"float32 with head dim {head_dim} spills the GPU's registers; use bfloat16/float16 or head dim <= 128"
    return None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """One line saying why flash_attention cannot take these tensors, or None when it can."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected 4-D (B, heads, T, head_dim) tensors, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, length or head dim"
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        return f"{H} query heads are not a multiple of {k.shape[1]} kv heads"
    if T == 0:
        return "empty sequence (T = 0)"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not (q.device == k.device == v.device):
        return f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})"
    if max(x.stride(2) for x in (q, k, v)) * T >= 2**31:
        return "sequence too long for 32-bit row offsets within a head"
    return unsupported_config(D, q.dtype, q.device)


def tma_unsupported_device(device: torch.device | str) -> str | None:
    """Why TMA cannot run on this device with this Triton, or None (the model asks this once, at start-up)."""
    return _tma_device_refusal(torch.device(device))


@functools.lru_cache(maxsize=None)
def _tma_device_refusal(device: torch.device) -> str | None:
    # Cached: tma_unsupported_reason runs on every attention call of a triton-tma model.
    if importlib.util.find_spec("triton.tools.tensor_descriptor") is None:
        return f"Triton {triton.__version__} has no tensor descriptors (3.4 and newer have)"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "the tensor-memory accelerator needs compute capability 9.0 or newer (Hopper)"
    return None


def tma_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the TMA kernels cannot take these tensors (on top of ``unsupported_reason``), or None when they can."""
    return tma_unsupported_device(q.device) or next(
        (f"{name}: {why}" for name, x in (("q", q), ("k", k), ("v", v)) if (why := _tma_refusal(x))), None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, softmax_scale: float | None = None,
    tma: bool = False, ws: bool = False, deterministic: bool = True, gluon: bool = False,
) -> torch.Tensor:
    """Flash attention, differentiable in q, k, v.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H % H_kv == 0. Returns (B, H, T, D)
    in q's dtype. softmax_scale (> 0) defaults to 1/sqrt(D). Raises ValueError with the
    reason from ``unsupported_reason`` for inputs the kernel does not handle.
    tma: move the tiles through TMA descriptors, forward and backward (Hopper, Triton >= 3.4).
    ws: as tma, with the forward warp-specialised (``_fwd_ws_kernel``; 16-bit inputs, head dim <= 128).
    deterministic: False runs the backward as one kernel that adds dQ by fp32 atomic adds
    (``_bwd_dkdv_kernel``'s DQ_ATOMIC): fewer products, an fp32 (B, H, T, D) buffer more, and
    gradients of q that vary in their last bits from run to run. True (the default): two kernels, dQ
    written once, the same bits every run.
    gluon: the forward as FlashAttention-3 schedules it, written in Gluon (``attention_gluon.py``: the softmax of
    one key block runs while the tensor cores multiply the previous one); the backward as with tma=True, or with
    deterministic=False in Gluon too (one kernel, dQ by atomics, Pᵀ computed while dPᵀ is multiplied).
    Hopper only, 16-bit inputs, head dims 64 and 128.
    ws, gluon and deterministic=False are options of the benchmark, not of the model: none is faster than cuDNN's
    attention, the model's choice on Hopper (BENCHMARKS.md).
    """
    if ws and gluon:
        raise ValueError("flash_attention: ws=True and gluon=True are two forwards; pass one of them")
    if ws and (q.dtype == torch.float32 or q.shape[-1] > 128):
        raise ValueError(f"flash_attention: ws=True takes float16/bfloat16 and head dim <= 128, got {q.dtype}, "
                         f"head dim {q.shape[-1]}; use tma=True")
    reason = unsupported_reason(q, k, v) or (tma_unsupported_reason(q, k, v) if tma or ws or gluon else None)
    if reason is None and gluon:
        from . import attention_gluon  # noqa: PLC0415

        reason = attention_gluon.unsupported_reason(q)
        reason = reason and f"{reason}; use tma=True"
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not 0.0 < scale < math.inf:  # the forward scales each row's maximum: a scale <= 0 would flip it
        raise ValueError(f"flash_attention: softmax_scale must be a positive finite number, got {softmax_scale}")
    return FlashAttention.apply(q, k, v, bool(causal), scale, None, bool(tma), bool(ws), bool(deterministic),
                                bool(gluon))


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, softmax_scale: float | None = None
) -> torch.Tensor:
    """Naive attention in fp32 that materialises the (T, T) scores; the parity tests' ground truth."""
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    k = k.float().repeat_interleave(group, dim=1)  # (B, H, T, D)
    v = v.float().repeat_interleave(group, dim=1)  # (B, H, T, D)
    scores = (q.float() @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
    if causal:
        T = q.shape[2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # (T, T)
        scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)  # (B, H, T, D)
