"""Shared-weight gradient reduction for tied blocks, beside its PyTorch reference.

A tie group's K units apply one set of shared tensors. On probe steps the per-unit
gradient contributions g_1..g_K of every shared tensor are captured, and this
module, in one pass over memory and one launch for all the group's tensors:

* adds Σ_k g_k into each tensor's existing ``.grad`` buffer (in place), and
* returns the statistics the untying detector reads (DESIGN.md, "Gradient
  coherence"), in fp32, summed over the group's tensors:
  ‖g_k‖² (``sq_norms``), ⟨g_k, Σg⟩ (``dots``) and ‖Σg‖² (``sum_sq``).
  Σg means this step's contributions only: what the ``.grad`` buffer held
  before the call is accumulated into but never enters the statistics.

``coherence(stats)`` turns them into ρ = ‖Σg‖² / (K·Σ_k‖g_k‖²): 1 when the units
agree, about 1/K when their gradients are orthogonal.

It also provides ``flatten_for_collective`` / ``unflatten_into``: a tie group's
gradients packed (and scaled) into one flat buffer so that replicas on several
pipeline stages are summed with one collective per group, then copied back.

``plan_tied_grad_reduce`` does a call's host work once (checks, the address tables'
copy to the device, the partials buffer) and returns a ``TiedGradPlan`` whose
``run()`` is one launch and one sum: for buffers reduced many times, and for the
benchmark, which tells the kernel's bandwidth from the host's time per call with it
(an H100 spent 100-500 us of host time per call, BENCHMARKS.md). A plain call on buffers
seen before (a tie group's ``.grad`` buffers at each probe) reuses the same memoised
launch (``_launch_for``) and, after its first launch, the compiled kernel's own launcher:
its host work is then the checks of its tensors.

Design: one multi-tensor launch over pointer tables
---------------------------------------------------
The kernel takes a table of raw addresses (int64 ``data_ptr()`` of every
contribution and every ``.grad``) and each tensor's first program; one program
finds its tensor in that short table and reduces an equal share of its tiles (about
as many programs as the GPU runs at once: ``_shares``), holding the K units' tiles side by
side in registers, so each element of each g_k is read once and each ``.grad``
element is read and written once: (K + 2)·N element transfers, the minimum.

The alternative, copying the contributions into a [K, N] workspace so that a
plain strided kernel can read them, costs an extra K·N read and K·N write —
roughly doubling the memory traffic of an operation that is bound by it. The
tables cost a few bytes per tensor, built on the host as one list and moved to
the device in one asynchronous copy from pinned memory: a call's host work is a
few list operations, and nothing in it waits for the GPU. (The earlier per-chunk
tables, built with torch ops and moved by a synchronous copy: a straight line
through the H200's K = 2 times at 64 MB and 1 GB puts about 0.33 ms on every
call, where a copy of the same 256 MB takes 0.07 ms.) Raw addresses also work under ``TRITON_INTERPRET=1`` for
CPU tensors: the interpreter dereferences host addresses directly (it only
copies *device* storages to the host), so the tested code is the GPU code.

Per-program partial statistics go to a small (programs + 1, 3, K_PAD) buffer, and the
kernel sums them itself, in a fixed order (not by atomic float adds: the result is
deterministic): the last program of each group of programs (at most 64 groups) to
finish sums its group's rows, and the last of those the groups' (``_finish``), counted by integer
atomics in the device tables that the finishers set back to zero. One launch a call:
until 2026-11-27 a torch sum followed the kernel, a second launch that cost 6 points of the
copy bandwidth at 64 MB and K = 2 on an H200 (the kernel alone 86.5%,
80.5% with the sum) and, there, 46.5 µs of the host's time per call under cProfile (the
Llama block at K = 2; ``bench/results/2026-11-27-h200/tied_grad.log``).

The reduction kernel is not autotuned: it accumulates into ``.grad`` in place,
so benchmarking configs would add the sum several times. The tile is sized
instead so that K_PAD × BLOCK = 4096 fp32 values live in registers per program:
128-bit loads.

Layouts (``layout=``). "fixed" is the tile kernel above with 8 warps per
program. Compiled for sm_90a (``bench/kernel_layout.py``), its (K_PAD, BLOCK)
tile puts warps along the unit axis whenever BLOCK < 8 warps × 32 lanes × 8 bf16
per load = 2048, i.e. from K = 4 on, and its main loop exchanges values between
threads on every tile (10-16 ``bar.sync`` and 36-64 ``shfl`` per iteration): the
sum over units, and the per-tile sums over elements of ‖g_k‖² and ⟨g_k, Σg⟩.
"fitted" gives the same kernel BLOCK / (32 × elements per 128-bit load) warps,
which keeps the unit axis inside each thread but still reduces over elements on
every tile (56-160 shuffles per iteration at K = 4-16; 238 registers at K = 16,
spills from K = 24).

"columns" is a second kernel built not to exchange anything: each thread owns
VEC adjacent elements of every unit (a (K_PAD, COLS·VEC) tile whose contiguity
is capped at VEC with ``tl.max_contiguous``, so all 4 warps lie along the
elements whatever the Triton version), keeps per-unit partial sums of its own
elements, and threads combine them once, at the program's end. Its main loop
compiles to no ``bar.sync`` and no ``shfl`` for K up to 32, with Triton 3.9
and with 3.6 (the GPU machine's). VEC is one 128-bit access of the wider of
the two dtypes (the ``.grad`` tile then has the contributions' layout), capped
at 64 / K_PAD so that the tile stays in registers: 56-168 registers, no spill,
for K = 2-32 (K = 24 is 1.3b with ``sharing=all``). The unit count K is a constexpr
(``N_UNITS``; a compile per K, not per K_PAD), and the units come as two blocks of
rows, each a power of two (``_unit_split``: 12 = 8 + 4, 24 = 16 + 8), not one block
padded to K_PAD: a padded row still costs its masked loads (Triton's loads are inline
assembly, which the compiler keeps) and its arithmetic. With Triton 3.6 for sm_90a
(``bench/kernel_layout.py``), against one padded block with K a runtime int: "columns"
at K = 12 128 -> 106 registers and 538 -> 441 PTX instructions in the main loop
(4 + 4 fewer 64-bit address and data loads a tile), "wide" 203 -> 163 registers
(3 blocks an SM instead of 2) and 893 -> 701 instructions; at K = 24 "columns" 168 ->
128 registers (4 blocks an SM instead of 3), "wide" 227 -> 186. Powers of two compile
as before. On the H200 K = 12 "columns" levelled off at 88% of the copy where K = 8
reached 99%, with 1.6x the instructions a byte (now 1.3x); these are untimed. An earlier 3-D
(K_PAD, COLS, VEC) form of it compiled as intended with 3.9 only: 3.6 put
threads along the unit axis. From K = 64 it spills: correct, not fast.

"wide" is the "columns" kernel with twice the register budget for its tile (K_PAD
× VEC up to 128): at K = 17-32 each thread loads 4 adjacent bf16 of every unit (64-bit
accesses) instead of 2, and the H100's figures for K = 24 (45% of the copy bandwidth
with "columns", 32-bit loads) point at the narrow loads. sm_90a: 228 registers at
K = 24, no spill (220 at K = 12, 128-bit loads; both before K was a constexpr). Measured on an H100 (BENCHMARKS.md,
2026-11-27, bf16) at K = 24: 87% / 89% of the copy bandwidth at 64 / 256 MB and 88%
on the Llama block, where "columns" gave 45% / 46% / 77%; at K = 12, where it loads
128 bits against "columns"' 64, it is behind (79-86% against 87-95%; an H200: 78-82%
against 85-88%), with 2 blocks an SM where "columns" has 4; with K a constexpr it has 3
(untimed). Up to K = 8 the two are the same kernel (VEC 8 either way).

"auto", the default, is "columns" up to K = 16, "wide" at K = 17-32 and "fixed"
beyond. Measured on
an H200 (BENCHMARKS.md, 2026-11-26, bf16; tensors of 64 MB-1 GB and a Llama
block of 86 MB), as fractions of the copy bandwidth: "fixed" 8-23% from K = 4;
"columns" 71-100% at K = 4-12 on single tensors and 52-86% on the block, 33-34%
and 62% at K = 24. "fitted" is ahead of "columns" in some cases (64 MB at K = 2
and 8, the block at K = 8, single tensors at K = 24: 41% against 34%) and far
behind on the block at K = 24 (25%); at K = 2 "fixed" is ahead on 64 MB and the
block (66-68% against 56-60%) and behind from 256 MB.
"""

from __future__ import annotations

import functools
import itertools
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._host import next_pow2

_SHAPE, _DTYPE, _DEVICE = operator.attrgetter("shape"), operator.attrgetter("dtype"), operator.attrgetter("device")
INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels
BACKENDS = ("auto", "triton", "torch")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE_VALUES = 4096  # K_PAD × BLOCK values per program tile on a GPU (see the module docstring)
LAYOUTS = ("auto", "fixed", "fitted", "columns", "wide")
_COLUMNS_UP_TO = 16  # "auto": the largest K given "columns" (module docstring)
_WIDE_UP_TO = 32  # "auto": the largest K given "wide" (beyond, its tile spills); "fixed" after it
_COLUMN_WARPS = 4  # "columns": warps per program, all along the elements (COLS = 32 × 4 threads)
_COLUMN_VALUES = 64  # "columns": K_PAD × VEC contribution values per thread (fp32 registers for the tile)
_WIDE_VALUES = 128  # "wide": the same kernel with twice that budget (module docstring)
_MAX_GROUPS = 64  # the kernel's final sum: program rows are summed in at most this many groups first (_finish_groups)


@dataclass(frozen=True)
class TiedGradStats:
    """Statistics of one tie group's K gradient contributions, fp32, on the gradients' device."""

    sq_norms: torch.Tensor  # (K,) ‖g_k‖² over all the group's tensors
    dots: torch.Tensor  # (K,) ⟨g_k, Σg⟩
    sum_sq: torch.Tensor  # () ‖Σg‖²

    @property
    def n_units(self) -> int:
        return self.sq_norms.numel()


def coherence(stats: TiedGradStats) -> float:
    """ρ = ‖Σg‖² / (K · Σ_k ‖g_k‖²), in [0, 1]: 1 when units agree, ~1/K when orthogonal.

    Defined as 1 for K = 1 and for all-zero gradients (nothing disagrees).
    By Cauchy-Schwarz ‖Σg‖² ≤ K Σ‖g_k‖², so ρ ≤ 1; the min() only absorbs rounding.
    """
    total = float(stats.sq_norms.double().sum())
    if stats.n_units == 1 or total == 0.0:
        return 1.0
    return min(1.0, float(stats.sum_sq) / (stats.n_units * total))


def unit_alignment(stats: TiedGradStats) -> torch.Tensor:
    """(K,) cosine between each unit's gradient and the group's sum: the units that disagree most score lowest.

    Zero-norm units (or a zero sum) get 1: they pull in no direction.
    """
    norms = (stats.sq_norms.double() * stats.sum_sq.double()).sqrt()  # (K,) ‖g_k‖·‖Σg‖
    cos = torch.where(norms > 0, stats.dots.double() / norms.clamp_min(1e-300), torch.ones_like(norms))
    return cos.float()


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _share_of(FIRST_PROGRAM, NUMEL, n_tensors, BLOCK: tl.constexpr, T_PAD: tl.constexpr):
    """(tensor, first element, end) of this program's share of the reduction. Tensor i has FIRST_PROGRAM[i + 1] -
    FIRST_PROGRAM[i] programs (FIRST_PROGRAM[n_tensors] is the total), which split its tiles evenly (±1 tile)."""
    program = tl.program_id(0)
    tensors = tl.arange(0, T_PAD)
    firsts = tl.load(FIRST_PROGRAM + tensors, mask=tensors < n_tensors, other=0)
    t = tl.sum(((tensors < n_tensors) & (firsts <= program)).to(tl.int32), axis=0) - 1
    first = tl.load(FIRST_PROGRAM + t)
    shares = tl.load(FIRST_PROGRAM + t + 1) - first
    numel = tl.load(NUMEL + t)
    tiles = tl.cdiv(numel, BLOCK)
    start = ((program - first) * tiles // shares) * BLOCK
    end = tl.minimum(((program - first + 1) * tiles // shares) * BLOCK, numel)
    return t, tl.multiple_of(start, BLOCK), end


@triton.jit
def _load_f32(ptrs, in_range, MASK: tl.constexpr):
    """A tile read as fp32; with MASK only where in_range (0 elsewhere): a tensor's last, partial tile."""
    if MASK:
        x = tl.load(ptrs, mask=in_range, other=0.0)
    else:
        x = tl.load(ptrs)
    return x.to(tl.float32)


@triton.jit
def _load_units(ptrs, unit_ok, in_range, MASK: tl.constexpr):
    """The (K_PAD, BLOCK) contributions as fp32, padded units 0. Without MASK only the unit axis is masked,
    which keeps each row's loads contiguous, hence vectorised."""
    if MASK:
        g = tl.load(ptrs, mask=unit_ok[:, None] & in_range[None, :], other=0.0)
    else:
        g = tl.load(ptrs, mask=unit_ok[:, None], other=0.0)
    return g.to(tl.float32)


@triton.jit
def _store_cast(ptrs, x, in_range, MASK: tl.constexpr):
    """x rounded once to the buffer's dtype and stored; with MASK only where in_range."""
    x = x.to(ptrs.dtype.element_ty)
    if MASK:
        tl.store(ptrs, x, mask=in_range)
    else:
        tl.store(ptrs, x)


@triton.jit
def _reduce_tile(contrib, grad, off, end, unit_ok, sq, dot, ss, MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One (K_PAD, BLOCK) tile: Σ_k g_k into grad, and the running ‖g_k‖², ⟨g_k, Σg⟩, ‖Σg‖² (per lane)."""
    offs = off + tl.arange(0, BLOCK)
    in_range = offs < end
    g = _load_units(contrib[:, None] + offs[None, :], unit_ok, in_range, MASK)  # (K_PAD, BLOCK)
    acc = _load_f32(grad + offs, in_range, MASK)
    total = tl.sum(g, axis=0)  # (BLOCK,) Σ_k g_k
    sq += tl.sum(g * g, axis=1)
    dot += tl.sum(g * total[None, :], axis=1)
    ss += total * total
    _store_cast(grad + offs, acc + total, in_range, MASK)  # one rounding to the .grad dtype
    return sq, dot, ss


@triton.jit
def _sum_rows(PARTIALS, first, n_rows, step, K_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Σ of the (3 K_PAD,) fp32 rows first, first + step, … (n_rows of them), in one fixed order: deterministic.

    Read through L2 (``.cg``): the rows were written by other programs, never by this SM's L1.
    """
    W: tl.constexpr = 3 * K_PAD
    cols = tl.arange(0, 4 * K_PAD)  # the row, padded to a power of two
    acc = tl.zeros([ROWS, 4 * K_PAD], dtype=tl.float32)
    for r in range(0, n_rows, ROWS):
        rows = r + tl.arange(0, ROWS)
        ptrs = PARTIALS + (first + rows.to(tl.int64) * step)[:, None] * W + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < W)[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def _finish(PARTIALS, COUNTERS, group_size, K_PAD: tl.constexpr, ROWS: tl.constexpr):
    """Once this program's row of PARTIALS is stored: the statistics, summed by the programs that finish last.

    Two levels, so that no one program reads every row: the last program of each group
    of ``group_size`` consecutive programs to finish sums the group's rows into its first
    row, and the last of those sums the group rows into row n_programs, the result. Each
    count is an atomic add (acquire-release, GPU scope) that the finisher sets back
    to 0, so the counters (part of the cached device tables) are ready for the next
    call. One launch instead of the kernel and a torch sum after it, with the same
    fixed order of additions.
    """
    W: tl.constexpr = 3 * K_PAD
    program = tl.program_id(0)
    n_programs = tl.num_programs(0)
    group = program // group_size
    first = group * group_size
    cols = tl.arange(0, 4 * K_PAD)
    tl.debug_barrier()  # the whole program's row is written before its count announces it
    size = tl.minimum(group_size, n_programs - first)
    if tl.atomic_add(COUNTERS + 1 + group, 1) == size - 1:
        row = _sum_rows(PARTIALS, first.to(tl.int64), size, 1, K_PAD, ROWS)
        tl.store(PARTIALS + first.to(tl.int64) * W + cols, row, mask=cols < W)
        tl.store(COUNTERS + 1 + group, 0)
        tl.debug_barrier()
        n_groups = tl.cdiv(n_programs, group_size)
        if tl.atomic_add(COUNTERS, 1) == n_groups - 1:
            stats = _sum_rows(PARTIALS, 0, n_groups, group_size, K_PAD, ROWS)
            tl.store(PARTIALS + n_programs.to(tl.int64) * W + cols, stats, mask=cols < W)
            tl.store(COUNTERS, 0)


@triton.jit
def _reduce_kernel(CONTRIB_PTRS, GRAD_PTRS, NUMEL, FIRST_PROGRAM, COUNTERS, PARTIALS, n_tensors, group_size,
                   N_UNITS: tl.constexpr, C_TYPE: tl.constexpr, G_TYPE: tl.constexpr, K_PAD: tl.constexpr,
                   T_PAD: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    """One program = one share of one tensor (``_share_of``); writes its partial statistics to PARTIALS[program]
    (3, K_PAD), and the programs that finish last sum them into PARTIALS[programs] (``_finish``)."""
    program = tl.program_id(0)
    t, start, end = _share_of(FIRST_PROGRAM, NUMEL, n_tensors, BLOCK, T_PAD)
    units = tl.arange(0, K_PAD)
    unit_ok = units < N_UNITS
    contrib = tl.load(CONTRIB_PTRS + t * K_PAD + units).to(tl.pointer_type(C_TYPE))  # (K_PAD,)
    grad = tl.load(GRAD_PTRS + t).to(tl.pointer_type(G_TYPE))
    if ALIGNED:  # every address 16-byte aligned (checked on the host): 128-bit loads
        contrib = tl.multiple_of(contrib, 16)
        grad = tl.multiple_of(grad, 16)

    sq = tl.zeros([K_PAD], dtype=tl.float32)
    dot = tl.zeros([K_PAD], dtype=tl.float32)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for off in range(start, full_end, BLOCK):
        sq, dot, ss = _reduce_tile(contrib, grad, tl.multiple_of(off, BLOCK), end, unit_ok, sq, dot, ss, False, BLOCK)
    if full_end < end:
        sq, dot, ss = _reduce_tile(contrib, grad, full_end, end, unit_ok, sq, dot, ss, True, BLOCK)

    out = PARTIALS + program.to(tl.int64) * 3 * K_PAD
    tl.store(out + units, sq)
    tl.store(out + K_PAD + units, dot)
    tl.store(out + 2 * K_PAD + units, tl.where(units == 0, tl.sum(ss, axis=0), 0.0))
    _finish(PARTIALS, COUNTERS, group_size, K_PAD, ROWS)


@triton.jit
def _unit_rows(CONTRIB_PTRS, t, offs, in_range, FIRST: tl.constexpr, ROWS: tl.constexpr, N_UNITS: tl.constexpr,
               C_TYPE: tl.constexpr, K_PAD: tl.constexpr, MASK: tl.constexpr, ALIGNED: tl.constexpr):
    """Units FIRST .. FIRST + ROWS of tensor t at ``offs``, as fp32 (ROWS, BLOCK); units past N_UNITS 0.

    The unit addresses are re-read per tile (cached, one per warp) rather than held: K 64-bit
    addresses would cost 2K registers for the whole loop."""
    units = FIRST + tl.arange(0, ROWS)
    ptr = tl.load(CONTRIB_PTRS + t * K_PAD + units).to(tl.pointer_type(C_TYPE))  # padded units: 0, masked off
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return _load_units(ptr[:, None] + offs[None, :], units < N_UNITS, in_range, MASK)


@triton.jit
def _unit_sums(g, total, sq, dot, ROWS: tl.constexpr, COLS: tl.constexpr, VEC: tl.constexpr):
    """Each thread's VEC adjacent elements of ‖g_k‖² and ⟨g_k, Σg⟩, summed where they are: (ROWS, COLS)."""
    sq += tl.sum(tl.reshape(g * g, [ROWS, COLS, VEC]), axis=2)
    dot += tl.sum(tl.reshape(g * total[None, :], [ROWS, COLS, VEC]), axis=2)
    return sq, dot


@triton.jit
def _columns_tile(CONTRIB_PTRS, t, grad, off, end, sq, dot, sq_b, dot_b, ss, N_UNITS: tl.constexpr,
                  C_TYPE: tl.constexpr, K_PAD: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr,
                  COLS: tl.constexpr, VEC: tl.constexpr, MASK: tl.constexpr, ALIGNED: tl.constexpr):
    """One tile of COLS·VEC elements: each thread owns VEC adjacent elements of every unit.

    Σ_k g_k and the per-unit partial ‖g_k‖², ⟨g_k, Σg⟩ are sums inside one thread
    (over units, then over its VEC elements): nothing crosses threads until the
    program's end. The units come as two power-of-two blocks of rows, K_A then K_B
    (``_unit_split``; K_B = 0 when K is a power of two): at K = 12, 8 and 4, where
    one block of 16 would carry 4 rows of masked loads and their arithmetic.
    """
    # (BLOCK,) contiguous, so threads lie along it whatever the Triton version; contiguity capped at VEC so
    # that each thread's vector is VEC elements (all COLS × 32 threads along the elements, units in-thread).
    offs = tl.max_contiguous(off + tl.arange(0, COLS * VEC), VEC)
    in_range = offs < end
    g = _unit_rows(CONTRIB_PTRS, t, offs, in_range, 0, K_A, N_UNITS, C_TYPE, K_PAD, MASK, ALIGNED)  # (K_A, BLOCK)
    acc = _load_f32(grad + offs, in_range, MASK)
    total = tl.sum(g, axis=0)  # (BLOCK,)
    if K_B > 0:
        g_b = _unit_rows(CONTRIB_PTRS, t, offs, in_range, K_A, K_B, N_UNITS, C_TYPE, K_PAD, MASK, ALIGNED)
        total += tl.sum(g_b, axis=0)
        sq_b, dot_b = _unit_sums(g_b, total, sq_b, dot_b, K_B, COLS, VEC)
    sq, dot = _unit_sums(g, total, sq, dot, K_A, COLS, VEC)
    ss += total * total
    _store_cast(grad + offs, acc + total, in_range, MASK)
    return sq, dot, sq_b, dot_b, ss


@triton.jit
def _store_rows(out, sq, dot, FIRST: tl.constexpr, ROWS: tl.constexpr, K_PAD: tl.constexpr):
    """A program's (ROWS, COLS) partial ‖g_k‖² and ⟨g_k, Σg⟩ of units FIRST.., summed over its threads, into its
    PARTIALS row."""
    units = FIRST + tl.arange(0, ROWS)
    tl.store(out + units, tl.sum(sq, axis=1))
    tl.store(out + K_PAD + units, tl.sum(dot, axis=1))


@triton.jit
def _columns_kernel(CONTRIB_PTRS, GRAD_PTRS, NUMEL, FIRST_PROGRAM, COUNTERS, PARTIALS, n_tensors, group_size,
                    N_UNITS: tl.constexpr, C_TYPE: tl.constexpr, G_TYPE: tl.constexpr, K_PAD: tl.constexpr,
                    T_PAD: tl.constexpr, K_A: tl.constexpr, K_B: tl.constexpr, COLS: tl.constexpr,
                    VEC: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    """``_reduce_kernel``'s contract (same tables, same PARTIALS), with the units inside each thread."""
    BLOCK: tl.constexpr = COLS * VEC
    K_B1: tl.constexpr = max(K_B, 1)  # the second block's accumulators exist (unused) when K_B = 0
    program = tl.program_id(0)
    t, start, end = _share_of(FIRST_PROGRAM, NUMEL, n_tensors, BLOCK, T_PAD)
    grad = tl.load(GRAD_PTRS + t).to(tl.pointer_type(G_TYPE))
    if ALIGNED:
        grad = tl.multiple_of(grad, 16)
    sq = tl.zeros([K_A, COLS], dtype=tl.float32)  # per thread: its partial ‖g_k‖² of every unit
    dot = tl.zeros([K_A, COLS], dtype=tl.float32)
    sq_b = tl.zeros([K_B1, COLS], dtype=tl.float32)
    dot_b = tl.zeros([K_B1, COLS], dtype=tl.float32)
    ss = tl.zeros([COLS * VEC], dtype=tl.float32)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for off in range(start, full_end, BLOCK):
        sq, dot, sq_b, dot_b, ss = _columns_tile(CONTRIB_PTRS, t, grad, tl.multiple_of(off, BLOCK), end, sq, dot,
                                                 sq_b, dot_b, ss, N_UNITS, C_TYPE, K_PAD, K_A, K_B, COLS, VEC,
                                                 False, ALIGNED)
    if full_end < end:
        sq, dot, sq_b, dot_b, ss = _columns_tile(CONTRIB_PTRS, t, grad, full_end, end, sq, dot, sq_b, dot_b, ss,
                                                 N_UNITS, C_TYPE, K_PAD, K_A, K_B, COLS, VEC, True, ALIGNED)
    out = PARTIALS + program.to(tl.int64) * 3 * K_PAD
    units = tl.arange(0, K_PAD)
    if K_A + K_B < K_PAD:  # the row's units past both blocks: every entry of PARTIALS is written
        tl.store(out + units, 0.0, mask=units >= K_A + K_B)
        tl.store(out + K_PAD + units, 0.0, mask=units >= K_A + K_B)
    _store_rows(out, sq, dot, 0, K_A, K_PAD)
    if K_B > 0:
        _store_rows(out, sq_b, dot_b, K_A, K_B, K_PAD)
    tl.store(out + 2 * K_PAD + units, tl.where(units == 0, tl.sum(ss, axis=0), 0.0))
    _finish(PARTIALS, COUNTERS, group_size, K_PAD, ROWS)


@triton.jit
def _copy_tile(src, dst, off, end, scale, MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    _store_cast(dst + offs, _load_f32(src + offs, offs < end, MASK) * scale, offs < end, MASK)


@triton.jit
def _copy_range(src, dst, start, end, scale, BLOCK: tl.constexpr):
    """dst[start:end] = scale · src[start:end]: whole tiles unmasked, then the masked tail."""
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for off in range(start, full_end, BLOCK):
        _copy_tile(src, dst, tl.multiple_of(off, BLOCK), end, scale, False, BLOCK)
    if full_end < end:
        _copy_tile(src, dst, full_end, end, scale, True, BLOCK)


@triton.jit
def _flat_copy_kernel(PTRS, FLAT, FLAT_OFFSET, NUMEL, FIRST_PROGRAM, n_tensors, scale,
                      T_TYPE: tl.constexpr, TO_FLAT: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Copy (and scale) one share of one tensor (``_share_of``) into its segment of FLAT, or back when not
    TO_FLAT."""
    t, start, end = _share_of(FIRST_PROGRAM, NUMEL, n_tensors, BLOCK, T_PAD)
    tensor = tl.load(PTRS + t).to(tl.pointer_type(T_TYPE))
    segment = FLAT + tl.load(FLAT_OFFSET + t)  # this tensor's slice of the flat buffer
    if TO_FLAT:
        _copy_range(tensor, segment, start, end, scale, BLOCK)
    else:
        _copy_range(segment, tensor, start, end, scale, BLOCK)


# ---------------------------------------------------------------------------
# Host side: validation, tables, launches
# ---------------------------------------------------------------------------


def _use_triton(backend: str, device: torch.device) -> bool:
    """auto: Triton on CUDA, PyTorch elsewhere; triton: also CPU tensors under TRITON_INTERPRET=1.

    The interpreter runs a kernel through NumPy, orders of magnitude slower than PyTorch:
    like the attention kernel's, it is only used when asked for by name (the tests do),
    never picked by ``auto`` because the variable happens to be set in the environment.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "triton" and not (device.type == "cuda" or (INTERPRET and device.type == "cpu")):
        raise ValueError(f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}")
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def chosen_backend(device: torch.device, backend: str = "auto") -> str:
    """"triton" or "torch": what ``tied_grad_reduce`` and the flatten/unflatten helpers run on ``device``."""
    return "triton" if _use_triton(backend, torch.device(device)) else "torch"


def _check_same(tensors: list[torch.Tensor], what: str) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or next(iter(dtypes)) not in GRAD_DTYPES:
        raise ValueError(f"{what} must share one dtype among float32, bfloat16, float16; got {sorted(map(str, dtypes))}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what} are on several devices: {sorted(map(str, devices))}")


@dataclass
class _Gathered:
    """What the one pass over a call's tensors (``_gather``) finds: the launch's key (``_launch_for``)."""

    n_units: int
    dense: list[list[torch.Tensor]]  # the contributions, non-contiguous ones copied (the flat index needs it)
    contrib_ptrs: tuple[int, ...]  # the (T × K_PAD) row-major address table; padded units point nowhere, masked off
    grad_ptrs: tuple[int, ...]
    numels: tuple[int, ...]


def _gather(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor], tables: bool = True) -> _Gathered:
    """Check the inputs (shapes, the grads' contiguity, one dtype and one device for each list) and, with
    ``tables``, gather the launch's addresses and sizes.

    A call's host time grows with its T·(K + 1) tensors, and reading a tensor's attribute is a
    Python call (~50-180 ns): each is read for all tensors at once through ``map`` (no Python
    frame per tensor), the shapes compared one unit's T at a time, and only a failed check
    looks again to name the offender.
    """
    if not grads or len(contributions) != len(grads):
        raise ValueError(f"need one list of contributions per grad, got {len(contributions)} lists for {len(grads)} grads")
    n_units = len(contributions[0])
    if n_units == 0 or set(map(len, contributions)) != {n_units}:
        i = next(i for i, units in enumerate(contributions) if len(units) != n_units or n_units == 0)
        raise ValueError(f"contributions[{i}] has {len(contributions[i])} units, expected {n_units} "
                         "(K >= 1, the same for every tensor)")
    shapes = list(map(_SHAPE, grads))
    if any(list(map(_SHAPE, unit)) != shapes for unit in zip(*contributions)):
        i, k = next((i, k) for i, units in enumerate(contributions) for k, g in enumerate(units) if g.shape != shapes[i])
        raise ValueError(f"contributions[{i}][{k}] has shape {tuple(contributions[i][k].shape)}, "
                         f"grads[{i}] {tuple(shapes[i])}")
    if not all(map(torch.Tensor.is_contiguous, grads)):
        i = next(i for i, g in enumerate(grads) if not g.is_contiguous())
        raise ValueError(f"grads[{i}] is not contiguous: the sum is accumulated in place through a flat index; "
                         "pass the parameter's .grad buffer itself (contiguous)")
    flat = list(itertools.chain.from_iterable(contributions))
    c_dtypes, g_dtypes = set(map(_DTYPE, flat)), set(map(_DTYPE, grads))
    devices = set(map(_DEVICE, flat)) | set(map(_DEVICE, grads))
    if len(c_dtypes) != 1 or len(g_dtypes) != 1 or not (c_dtypes | g_dtypes) <= set(GRAD_DTYPES) or len(devices) != 1:
        _check_same(flat, "contributions")
        _check_same(grads, "grads")
        raise ValueError(f"contributions on {flat[0].device} but grads on {grads[0].device}")
    if not tables:
        return _Gathered(n_units, contributions, (), (), ())
    if not all(map(torch.Tensor.is_contiguous, flat)):
        contributions = [[g if g.is_contiguous() else g.contiguous() for g in units] for units in contributions]
        flat = list(itertools.chain.from_iterable(contributions))
    ptrs = tuple(map(torch.Tensor.data_ptr, flat))
    k_pad = next_pow2(n_units)
    if k_pad != n_units:  # rows of K_PAD: padded units point nowhere (masked off)
        padding = (0,) * (k_pad - n_units)
        ptrs = tuple(itertools.chain.from_iterable(ptrs[row:row + n_units] + padding
                                                   for row in range(0, len(ptrs), n_units)))
    return _Gathered(n_units, contributions, ptrs, tuple(map(torch.Tensor.data_ptr, grads)),
                     tuple(map(torch.Tensor.numel, grads)))


def _to_device(tables: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several small int64 host tables on the device, as views of one buffer moved in one copy, each starting on a
    16-byte boundary (an even number of entries before it): Triton specialises a launch on its pointers' alignment,
    and ``_slots`` compiles the reduction with aligned stand-ins to count its registers.

    The same tables come back call after call (a tie group's .grad buffers, the
    benchmark's tensors): they are kept, keyed by their exact content, in a small
    cache (``_device_tables``), so a repeated call copies nothing.
    """
    return list(_device_tables(tuple(itertools.chain.from_iterable(tables)), tuple(map(len, tables)), device))


@functools.lru_cache(maxsize=64)
def _device_tables(flat: tuple[int, ...], lengths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``_to_device``'s copy, memoised: a pure function of the values (addresses, sizes), so a cached buffer is
    exactly what a new copy would hold, whatever lives at those addresses now. 64 entries of a few KB.

    On CUDA the copy is from pinned memory and asynchronous: from pageable memory it
    would first wait for every kernel queued before it, so the host's work for this
    call could never overlap the GPU's for the previous one. The buffers are read
    on the stream that wrote them (megascale launches on the current stream).
    """
    ends = list(itertools.accumulate(lengths, initial=0))
    padded = list(itertools.chain.from_iterable(flat[a:b] + (0,) * ((b - a) % 2) for a, b in zip(ends, ends[1:])))
    if device.type == "cuda":
        packed = torch.tensor(padded, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    else:
        packed = torch.tensor(padded, dtype=torch.int64, device=device)
    starts = itertools.accumulate((n + n % 2 for n in lengths), initial=0)  # each table on a 16-byte boundary
    return tuple(packed[start:start + n] for start, n in zip(starts, lengths))


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout '{layout}' is not one of {', '.join(LAYOUTS)}")


def _resolve_layout(layout: str, n_units: int) -> str:
    """"auto" → the layout the H200 measured fastest for K units (module docstring); any other as given."""
    if layout != "auto":
        return layout
    if n_units <= _COLUMNS_UP_TO:
        return "columns"
    return "wide" if n_units <= _WIDE_UP_TO else "fixed"


def _num_warps(block: int, element_size: int, layout: str) -> int:
    """The tile kernel's warps per program: 8 ("fixed"), or as many as one row of 128-bit loads spans ("fitted")."""
    _check_layout(layout)
    if layout == "fixed":
        return 8
    per_load = 16 // element_size
    return max(1, min(8, block // (32 * per_load)))


def _column_vec(k_pad: int, c_size: int, g_size: int, values: int = _COLUMN_VALUES) -> int:
    """"columns" ("wide": values=_WIDE_VALUES): elements per thread per unit, a power of two.

    At most one 128-bit access of the wider dtype: the .grad tile then gets the
    contributions' layout (with 8 bf16 per thread against 4 fp32, Triton exchanges
    the .grad tile through shared memory on every tile). At most _COLUMN_VALUES / K_PAD:
    the K_PAD × VEC tile stays in registers (sm_90a, bench/kernel_layout.py: no spill
    up to K = 32, at VEC 2; from K = 64, VEC 1 changes the layout and spills).
    """
    return max(1, min(16 // max(c_size, g_size), values // k_pad))


def _unit_split(n_units: int) -> tuple[int, int]:
    """"columns"/"wide": K units as two blocks of rows, each a power of two (Triton's tiles are): the largest power of
    two K_A <= K, then the rest padded, K_B = next_pow2(K - K_A), 0 if none. 12 = 8 + 4, 24 = 16 + 8, 7 = 4 + 4 (one
    row masked), 8 = 8 + 0. K_A + K_B <= K_PAD always."""
    k_a = 1 << (n_units.bit_length() - 1)
    return k_a, next_pow2(n_units - k_a) if n_units > k_a else 0


def _shares(numels: Sequence[int], block: int, slots: int) -> tuple[list[int], int]:
    """Programs for each tensor, as first-program offsets with the total appended (``_share_of``'s table), and the
    total: about ``slots`` programs of about equal tiles, so that the launch is one wave of programs that end
    together. Tensor i gets ⌈tiles_i · P / tiles⌉ programs (none if empty, at most one a tile), P = slots less one
    for each tensor, so that rounding up never takes the total past ``slots``; none has more than ⌈tiles / P⌉
    tiles."""
    tiles = [-(-n // block) for n in numels]
    total = sum(tiles)
    target = max(1, slots - sum(1 for n in tiles if n))
    firsts = list(itertools.accumulate((min(n, -(-n * target // max(total, 1))) for n in tiles), initial=0))
    return firsts, firsts[-1]


def _stand_in(value: int) -> int:
    """An int Triton specialises as it does ``value``: 1 (a constant), a multiple of 16 (a divisibility hint), or
    neither."""
    return 1 if value == 1 else 16 if value % 16 == 0 else 3


@functools.lru_cache(maxsize=64)
def _slots(kernel, device: torch.device, constexprs: tuple, stand_ins: tuple) -> int:
    """How many programs of ``kernel`` (compiled with ``constexprs``) ``device`` runs at once: its SMs × the
    blocks an SM holds, by registers (ptxas's count), warps and shared memory. 11 under the interpreter (tests:
    several tiles a program, several groups of programs in the final sum).

    The reduction launches about that many programs (``_shares``), each an equal share of the
    tiles: one wave, whatever registers make the occupancy. The earlier grid, a program per
    chunk of up to 64 tiles sized for 64 warps an SM, ran 2,048 programs at K = 12 and 64 MB
    where registers let an H200 hold 528 at a time: 3.9 waves, each program starting with
    dependent loads of its tables. The count comes from a compile with stand-in arguments
    (``warmup`` with dtypes for tensors, as Triton's fused-softmax tutorial reads it) that
    Triton specialises as it does the launch: ``stand_ins``, the launch's arguments with a dtype
    for each tensor (aligned, as the tables are: ``_to_device``) and its ints as ``_stand_in``
    maps them. A count one block too high would leave a second wave of a few programs, each a
    whole share long. The flatten/unflatten copy sizes its grid the same way (40 registers
    a thread at 8 warps: 6 blocks an SM, where its earlier grid assumed 8).
    """
    if INTERPRET:
        return 11
    kw = dict(constexprs)
    num_warps = kw["num_warps"]
    props = triton.runtime.driver.active.utils.get_device_properties(device.index)
    try:
        with torch.cuda.device(device):  # warmup takes a dtype for a tensor (Triton's MockTensor)
            compiled = kernel.warmup(*stand_ins, grid=(1,), **kw)
            compiled = compiled.result() if hasattr(compiled, "result") else compiled  # Triton's async compile
            compiled._init_handles()
        regs, shared = compiled.n_regs, compiled.metadata.shared
    except (AttributeError, TypeError) as err:  # a Triton without warmup / n_regs as 3.6-3.9 have them
        warnings.warn(f"tied_grad: could not read the reduction kernel's registers ({err}); sizing its grid for "
                      f"{64 // num_warps} blocks an SM", stacklevel=2)
        return props["multiprocessor_count"] * (64 // num_warps)
    return props["multiprocessor_count"] * _blocks_per_sm(regs, shared, num_warps, props["max_num_regs"],
                                                          props["max_shared_mem"])


def _blocks_per_sm(regs: int, shared: int, num_warps: int, sm_registers: int, sm_shared: int) -> int:
    """Blocks of ``num_warps`` warps, ``regs`` registers a thread and ``shared`` bytes of shared memory that one SM
    holds at once: registers go to a warp 256 at a time, an SM holds at most 64 warps and 32 blocks (Hopper's
    limits, as the CUDA occupancy calculator counts them). At least 1: a kernel that compiled runs."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(sm_registers // (per_warp * num_warps), 64 // num_warps, 32, sm_shared // shared if shared else 32)
    return max(1, blocks)


def _finish_rows(k_pad: int) -> int:
    """ROWS of the kernel's own final sum (``_finish``): rows a summing program loads at once, about 2048 values
    (16 a thread at 4 warps; sm_90a registers, ``bench/kernel_layout.py``: "columns" as without the sum). Under
    the interpreter 2, so that small tests cross the loop."""
    return 2 if INTERPRET else max(1, 2048 // (4 * k_pad))


def _finish_groups(n_programs: int, rows: int) -> tuple[int, int]:
    """(group size, counters) of the final sum: odd, at least ``rows`` - 1 (a group's rows in one load), and large
    enough for at most _MAX_GROUPS groups, so that the counters (one per group, one for the groups) stay a few
    hundred bytes of the tables and both levels take few loads (527 programs at K = 12: groups of 31, 1 load, then
    17 group rows, 1 load). A runtime argument: a new program count does not compile the kernel again. Odd, never
    1 nor a multiple of 16: Triton specialises the launch on it as on ``_slots``' stand-in, 3. At least 3, so that
    small tests under the interpreter cross both levels."""
    group = max(3, rows - 1, -(-n_programs // _MAX_GROUPS)) | 1
    return group, 1 + -(-n_programs // group)


@dataclass(eq=False)
class _Launch:
    """A reduction's launch for given addresses, sizes, dtypes, layout and device: everything but the partials
    buffer, which is each call's own (the statistics returned are views of it). Memoised (``_launch_for``).

    After its first launch through Triton's dispatch (``kernel[grid](...)``: binding the
    arguments, specialising each, looking the compiled kernel up) it keeps the compiled
    kernel's own launcher (``CompiledKernel[grid]``, Triton 3.6-3.9) and calls that: the
    same kernel with the same arguments (the tables, the scalars and the alignment of a
    fresh partials buffer do not change between calls, so neither does Triton's
    specialisation), without the dispatch's host time (``bench/tied_grad.py``'s host
    profile on an H200: 92 µs of a call's 430 under cProfile). Only where the current
    device is the one the kernel was loaded on; elsewhere, and under the interpreter
    (whose launch returns no compiled kernel), always through the dispatch.
    """

    kernel: object
    n_programs: int  # programs in the launch, each an equal share of a tensor's tiles (``_shares``)
    tables: tuple[torch.Tensor, ...]  # addresses, sizes, first programs and the total, counters (0 between launches)
    scalars: tuple[int, int]  # n_tensors, group_size
    constexprs: dict  # N_UNITS (K) among them
    k_pad: int
    slots: int  # programs the device runs at once (``_slots``)
    # after the first launch: (the device it was loaded on, the compiled kernel's launcher, the constexprs in the
    # kernel's order as that launcher takes them)
    direct: tuple | None = None

    def __call__(self, partials: torch.Tensor, dispatch: bool = False) -> None:
        """The kernel: grads updated, the statistics in ``partials[-1]``. ``dispatch``: through Triton's dispatch
        even where the compiled kernel's launcher is kept (``bench/tied_grad.py`` times both)."""
        if not self.n_programs:
            return
        args = (*self.tables, partials, *self.scalars)
        try:
            if self.direct is not None and not dispatch and \
                    triton.runtime.driver.active.get_current_device() == self.direct[0]:
                self.direct[1](*args, *self.direct[2])
            else:
                self._keep(self.kernel[(self.n_programs,)](*args, **self.constexprs), len(args))
        except BaseException:
            # A launch cut short (an interpreter error, Ctrl-C in it) can leave a counter counted up; the
            # cached tables holding it must not serve another call.
            _forget_launches()
            raise

    def _keep(self, compiled, n_args: int) -> None:
        if self.direct is not None or not all(hasattr(compiled, a) for a in ("function", "packed_metadata", "run")):
            return
        self.direct = (triton.runtime.driver.active.get_current_device(), compiled[(self.n_programs, 1, 1)],
                       tuple(self.constexprs[name] for name in self.kernel.arg_names[n_args:]))


@functools.lru_cache(maxsize=64)
def _launch_for(contrib_ptrs: tuple[int, ...], grad_ptrs: tuple[int, ...], numels: tuple[int, ...], n_units: int,
                c_dtype: torch.dtype, g_dtype: torch.dtype, layout: str, device: torch.device) -> _Launch:
    """The launch for these values, memoised: a pure function of them (what lives at the addresses now does not
    enter it), so a repeated call (a tie group's buffers at each probe, the benchmark's) does none of this work
    again and copies nothing to the device. 64 entries of a few KB of tables each."""
    k_pad = next_pow2(n_units)
    any_bits = functools.reduce(operator.or_, contrib_ptrs + grad_ptrs)  # 16-byte aligned iff all are
    c_size = c_dtype.itemsize
    if layout in ("columns", "wide"):
        vec = _column_vec(k_pad, c_size, g_dtype.itemsize, _WIDE_VALUES if layout == "wide" else _COLUMN_VALUES)
        num_warps = 1 if INTERPRET else _COLUMN_WARPS
        cols = 4 if INTERPRET else 32 * num_warps
        k_a, k_b = _unit_split(n_units)
        block, consts, kernel = cols * vec, {"K_A": k_a, "K_B": k_b, "COLS": cols, "VEC": vec}, _columns_kernel
    else:
        block = 16 if INTERPRET else max(256, _TILE_VALUES // k_pad)
        num_warps = 1 if INTERPRET else _num_warps(block, c_size, layout)
        consts, kernel = {"BLOCK": block}, _reduce_kernel
    rows = _finish_rows(k_pad)
    constexprs = dict(N_UNITS=n_units, C_TYPE=_TL_DTYPE[c_dtype], G_TYPE=_TL_DTYPE[g_dtype], K_PAD=k_pad,
                      T_PAD=next_pow2(len(grad_ptrs)), ALIGNED=any_bits % 16 == 0, ROWS=rows,
                      num_warps=num_warps, **consts)
    # five int64 tables, the fp32 partials, the ints (the group size is odd: _finish_groups)
    stand_ins = (*[torch.int64] * 5, torch.float32, _stand_in(len(grad_ptrs)), 3)
    slots = _slots(kernel, device, tuple(constexprs.items()), stand_ins)
    firsts, n_programs = _shares(numels, block, slots)
    group, n_counters = _finish_groups(n_programs, rows)
    tables = _to_device([contrib_ptrs, grad_ptrs, numels, firsts, [0] * n_counters], device)
    return _Launch(kernel, n_programs, tuple(tables), (len(grad_ptrs), group), constexprs, k_pad, slots)


def _forget_launches() -> None:
    _launch_for.cache_clear()
    _device_tables.cache_clear()


@dataclass
class TiedGradPlan:
    """One reduction's launch, prepared once: its device tables, partials buffer and kernel arguments.

    ``run()`` adds Σ_k contributions into the grads again and returns the statistics,
    doing only the launch: no checks, no host-to-device copy, no second launch (the
    kernel sums its programs' statistics itself). Build it with ``plan_tied_grad_reduce``
    for a set of buffers reduced many times (and for the benchmark, which times ``run()``
    to separate the kernel's bandwidth from the host's work per call). It keeps the
    tensors alive: the tables hold their addresses, so the buffers must not be replaced
    (in-place updates are fine). Each ``run()`` writes the same partials buffer: the
    statistics it returns are views of it, overwritten by the next run. Runs of plans
    over the same buffers must not overlap on two streams: they share the tables'
    counters (as they would the ``.grad`` sums).
    """

    spec: _Launch
    partials: torch.Tensor  # (n_programs + 1, 3, K_PAD): a row per program, then the statistics
    tensors: tuple  # the contributions and grads whose addresses the tables hold

    @property
    def n_programs(self) -> int:
        return self.spec.n_programs

    def launch(self) -> None:
        """The kernel: grads updated, the statistics in ``partials[-1]``."""
        self.spec(self.partials)

    def run(self) -> TiedGradStats:
        self.launch()
        stats = self.partials[-1]  # (3, K_PAD)
        n = self.spec.constexprs["N_UNITS"]
        return TiedGradStats(sq_norms=stats[0, :n], dots=stats[1, :n], sum_sq=stats[2, 0])


def _plan_triton(found: _Gathered, grads: list[torch.Tensor], layout: str) -> TiedGradPlan:
    device = grads[0].device
    spec = _launch_for(found.contrib_ptrs, found.grad_ptrs, found.numels, found.n_units, found.dense[0][0].dtype,
                       grads[0].dtype, layout, device)
    # Every program writes its whole (3, K_PAD) row and the last the statistics, so no fill is needed (one launch
    # fewer), unless none runs.
    partials = (torch.empty if spec.n_programs else torch.zeros)((spec.n_programs + 1, 3, spec.k_pad), device=device,
                                                                 dtype=torch.float32)
    return TiedGradPlan(spec, partials, (found.dense, grads))


def plan_tied_grad_reduce(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor],
                          layout: str = "auto") -> TiedGradPlan:
    """``tied_grad_reduce``'s Triton launch for these buffers, checked and prepared once (``TiedGradPlan``).

    Needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1). Each ``plan.run()`` equals one
    ``tied_grad_reduce(contributions, grads, backend="triton", layout=layout)`` on the buffers' current values.
    """
    found = _gather(contributions, grads)
    _use_triton("triton", grads[0].device)  # raises where the kernel cannot run
    _check_layout(layout)
    return _plan_triton(found, grads, _resolve_layout(layout, found.n_units))


def tied_grad_reduce(
    contributions: list[list[torch.Tensor]], grads: list[torch.Tensor], backend: str = "auto", layout: str = "auto"
) -> TiedGradStats:
    """Add Σ_k contributions[i][k] into grads[i] in place and return the group's statistics.

    contributions[i][k]: unit k's gradient for shared tensor i, shaped like grads[i].
    grads[i]: the existing (contiguous) ``.grad`` buffer of tensor i; its prior content
    is kept and added to, and does not enter the statistics. Contributions share one
    dtype, grads share one dtype (each fp32, bf16 or fp16; they may differ, e.g. bf16
    contributions into fp32 grads); statistics are accumulated in fp32.
    Non-contiguous contributions are copied; non-contiguous grads raise ValueError.
    backend: "auto" (Triton on CUDA, else PyTorch), "triton" (also CPU under TRITON_INTERPRET=1), "torch".
    layout: the Triton kernel and its warps: "auto" (the measured fastest for K), "fixed", "fitted", "columns" or "wide"
    (module docstring).
    """
    triton_here = bool(grads) and _use_triton(backend, grads[0].device)
    found = _gather(contributions, grads, tables=triton_here)
    if triton_here:
        _check_layout(layout)  # here too: under the interpreter _num_warps is not consulted
        return _plan_triton(found, grads, _resolve_layout(layout, found.n_units)).run()
    return tied_grad_reduce_reference(contributions, grads)


def tied_grad_reduce_reference(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor]) -> TiedGradStats:
    """The same in plain PyTorch (stack, sum, norms, dots): the parity tests' ground truth and the CPU path."""
    n_units, device = len(contributions[0]), grads[0].device
    sq = torch.zeros(n_units, device=device, dtype=torch.float32)
    dots = torch.zeros(n_units, device=device, dtype=torch.float32)
    sum_sq = torch.zeros((), device=device, dtype=torch.float32)
    for units, grad in zip(contributions, grads):
        g = torch.stack([u.float().reshape(-1) for u in units])  # (K, N)
        total = g.sum(0)  # (N,)
        sq += (g * g).sum(1)
        dots += g @ total
        sum_sq += total @ total
        grad.copy_((grad.float() + total.view(grad.shape)).to(grad.dtype))
    return TiedGradStats(sq_norms=sq, dots=dots, sum_sq=sum_sq)


def _check_flat_inputs(tensors: list[torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("no tensors to flatten")
    _check_same(tensors, "tensors")


def _flat_copy_triton(tensors: list[torch.Tensor], flat: torch.Tensor, scale: float, to_flat: bool) -> None:
    device = flat.device
    block = 16 if INTERPRET else 2048
    numels = [t.numel() for t in tensors]
    constexprs = dict(T_TYPE=_TL_DTYPE[tensors[0].dtype], TO_FLAT=to_flat, T_PAD=next_pow2(len(tensors)),
                      BLOCK=block, num_warps=1 if INTERPRET else 8)
    stand_ins = (torch.int64, flat.dtype, *[torch.int64] * 3, _stand_in(len(tensors)), 1.0)
    firsts, n_programs = _shares(numels, block, _slots(_flat_copy_kernel, device, tuple(constexprs.items()), stand_ins))
    offsets = list(itertools.accumulate(numels, initial=0))[:-1]  # segment starts in flat
    tables = _to_device([[t.data_ptr() for t in tensors], offsets, numels, firsts], device)
    if n_programs:
        _flat_copy_kernel[(n_programs,)](tables[0], flat, *tables[1:], len(tensors), float(scale), **constexprs)


def flatten_for_collective(
    tensors: list[torch.Tensor], scale: float = 1.0, dtype: torch.dtype | None = None, backend: str = "auto"
) -> torch.Tensor:
    """One flat (Σ numel,) buffer holding scale · tensors, in order, for a single all-reduce per tie group.

    dtype: the buffer's dtype (default: the tensors' own), e.g. fp32 to reduce bf16
    gradients at full precision. Non-contiguous tensors are read through a copy.
    """
    _check_flat_inputs(tensors)
    dtype = dtype or tensors[0].dtype
    if dtype not in GRAD_DTYPES:
        raise ValueError(f"flat dtype {dtype} not among float32, bfloat16, float16")
    device = tensors[0].device
    flat = torch.empty(sum(t.numel() for t in tensors), device=device, dtype=dtype)  # (N,)
    if _use_triton(backend, device):
        _flat_copy_triton([t if t.is_contiguous() else t.contiguous() for t in tensors], flat, scale, True)
        return flat
    torch.cat([t.reshape(-1).to(dtype) for t in tensors], out=flat)
    return flat.mul_(scale) if scale != 1.0 else flat


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor], backend: str = "auto") -> None:
    """Copy the segments of ``flat`` (as laid out by flatten_for_collective) back into tensors, in place."""
    _check_flat_inputs(tensors)
    total = sum(t.numel() for t in tensors)
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"flat buffer has shape {tuple(flat.shape)}, the tensors need ({total},)")
    if flat.device != tensors[0].device or flat.dtype not in GRAD_DTYPES:
        raise ValueError(f"flat buffer ({flat.dtype} on {flat.device}) does not fit tensors on {tensors[0].device}")
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(f"tensors[{i}] is not contiguous: unflatten_into writes through a flat index")
    if _use_triton(backend, flat.device):
        _flat_copy_triton(tensors, flat.contiguous(), 1.0, False)
        return
    for t, segment in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(segment.view(t.shape))
