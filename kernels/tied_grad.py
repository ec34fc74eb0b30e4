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
(an H100 spent 100-500 us of host time per call, BENCHMARKS.md).

Design: one multi-tensor launch over pointer tables
---------------------------------------------------
The kernel takes a table of raw addresses (int64 ``data_ptr()`` of every
contribution and every ``.grad``) and each tensor's first chunk; one program
finds its tensor in that short table and reduces one chunk of it, holding the K units' tiles side by
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

Per-chunk partial statistics go to a small (chunks, 3, K_PAD) buffer summed by
torch afterwards, rather than atomics: the result is deterministic.

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
elements, and threads combine them once, at the chunk's end. Its main loop
compiles to no ``bar.sync`` and no ``shfl`` for K up to 32, with Triton 3.9
and with 3.6 (the GPU machine's). VEC is one 128-bit access of the wider of
the two dtypes (the ``.grad`` tile then has the contributions' layout), capped
at 64 / K_PAD so that the tile stays in registers: 53-168 registers, no spill,
for K = 2-32 (K = 24 is 1.3b with ``sharing=all``). An earlier 3-D
(K_PAD, COLS, VEC) form of it compiled as intended with 3.9 only: 3.6 put
threads along the unit axis. From K = 64 it spills: correct, not fast.

"wide" is the "columns" kernel with twice the register budget for its tile (K_PAD
× VEC up to 128): at K = 17-32 each thread loads 4 adjacent bf16 of every unit (64-bit
accesses) instead of 2, and the H100's figures for K = 24 (45% of the copy bandwidth
with "columns", 32-bit loads) point at the narrow loads. sm_90a: 228 registers at
K = 24, no spill (220 at K = 12, 128-bit loads). Measured on an H100 (BENCHMARKS.md,
2026-11-27, bf16) at K = 24: 87% / 89% of the copy bandwidth at 64 / 256 MB and 88%
on the Llama block, where "columns" gave 45% / 46% / 77%; at K = 12, where it loads
128 bits against "columns"' 64, it is behind (79-86% against 87-95%), and up to
K = 8 the two are the same kernel (VEC 8 either way).

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
import math
import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._host import next_pow2

INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels
BACKENDS = ("auto", "triton", "torch")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE_VALUES = 4096  # K_PAD × BLOCK values per program tile on a GPU (see the module docstring)
_MAX_TILES_PER_CHUNK = 64  # caps a program at 64 tiles; longer tensors get more programs
LAYOUTS = ("auto", "fixed", "fitted", "columns", "wide")
_COLUMNS_UP_TO = 16  # "auto": the largest K given "columns" (module docstring)
_WIDE_UP_TO = 32  # "auto": the largest K given "wide" (beyond, its tile spills); "fixed" after it
_COLUMN_WARPS = 4  # "columns": warps per program, all along the elements (COLS = 32 × 4 threads)
_COLUMN_VALUES = 64  # "columns": K_PAD × VEC contribution values per thread (fp32 registers for the tile)
_WIDE_VALUES = 128  # "wide": the same kernel with twice that budget (module docstring)


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
def _chunk_of(FIRST_CHUNK, n_tensors, chunk_size, BLOCK: tl.constexpr, T_PAD: tl.constexpr):
    """(tensor, first element) of this program's chunk. FIRST_CHUNK[i] is tensor i's first chunk, non-decreasing
    (an empty tensor has no chunk): the chunk's tensor is the last whose first chunk is not after it."""
    chunk = tl.program_id(0)
    tensors = tl.arange(0, T_PAD)
    firsts = tl.load(FIRST_CHUNK + tensors, mask=tensors < n_tensors, other=0)
    t = tl.sum(((tensors < n_tensors) & (firsts <= chunk)).to(tl.int32), axis=0) - 1
    start = (chunk - tl.load(FIRST_CHUNK + t)) * chunk_size
    return t, tl.multiple_of(start, BLOCK)  # chunk sizes are whole tiles


@triton.jit
def _load_f32(ptrs, in_range, MASK: tl.constexpr):
    """A tile read as fp32; with MASK only where in_range (0 elsewhere): the tail tile of a chunk."""
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
def _reduce_kernel(CONTRIB_PTRS, GRAD_PTRS, NUMEL, FIRST_CHUNK, PARTIALS, n_tensors, n_units, chunk_size,
                   C_TYPE: tl.constexpr, G_TYPE: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """One program = one chunk of one tensor; writes its partial statistics to PARTIALS[chunk] (3, K_PAD)."""
    chunk = tl.program_id(0)
    t, start = _chunk_of(FIRST_CHUNK, n_tensors, chunk_size, BLOCK, T_PAD)
    end = tl.minimum(start + chunk_size, tl.load(NUMEL + t))
    units = tl.arange(0, K_PAD)
    unit_ok = units < n_units
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

    out = PARTIALS + chunk.to(tl.int64) * 3 * K_PAD
    tl.store(out + units, sq)
    tl.store(out + K_PAD + units, dot)
    tl.store(out + 2 * K_PAD + units, tl.where(units == 0, tl.sum(ss, axis=0), 0.0))


@triton.jit
def _columns_tile(CONTRIB_PTRS, t, grad, off, end, n_units, sq, dot, ss, C_TYPE: tl.constexpr, K_PAD: tl.constexpr,
                  COLS: tl.constexpr, VEC: tl.constexpr, MASK: tl.constexpr, ALIGNED: tl.constexpr):
    """One tile of COLS·VEC elements: each thread owns VEC adjacent elements of every unit.

    Σ_k g_k and the per-unit partial ‖g_k‖², ⟨g_k, Σg⟩ are sums inside one thread
    (over units, then over its VEC elements): nothing crosses threads until the
    chunk's end. The unit addresses are re-read per tile (cached, one per warp)
    rather than held: K 64-bit addresses would cost 2K registers for the whole loop.
    """
    # (BLOCK,) contiguous, so threads lie along it whatever the Triton version; contiguity capped at VEC so
    # that each thread's vector is VEC elements (all COLS × 32 threads along the elements, units in-thread).
    offs = tl.max_contiguous(off + tl.arange(0, COLS * VEC), VEC)
    units = tl.arange(0, K_PAD)
    ptr = tl.load(CONTRIB_PTRS + t * K_PAD + units).to(tl.pointer_type(C_TYPE))  # padded units: 0, masked off
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    in_range = offs < end
    g = _load_units(ptr[:, None] + offs[None, :], units < n_units, in_range, MASK)  # (K_PAD, BLOCK)
    acc = _load_f32(grad + offs, in_range, MASK)
    total = tl.sum(g, axis=0)  # (BLOCK,)
    # Each thread's VEC adjacent elements, summed where they are: (K_PAD, COLS) partials per unit.
    sq += tl.sum(tl.reshape(g * g, [K_PAD, COLS, VEC]), axis=2)
    dot += tl.sum(tl.reshape(g * total[None, :], [K_PAD, COLS, VEC]), axis=2)
    ss += total * total
    _store_cast(grad + offs, acc + total, in_range, MASK)
    return sq, dot, ss


@triton.jit
def _columns_kernel(CONTRIB_PTRS, GRAD_PTRS, NUMEL, FIRST_CHUNK, PARTIALS, n_tensors, n_units, chunk_size,
                    C_TYPE: tl.constexpr, G_TYPE: tl.constexpr, K_PAD: tl.constexpr, T_PAD: tl.constexpr,
                    COLS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    """``_reduce_kernel``'s contract (same tables, same PARTIALS), with the units inside each thread."""
    BLOCK: tl.constexpr = COLS * VEC
    chunk = tl.program_id(0)
    t, start = _chunk_of(FIRST_CHUNK, n_tensors, chunk_size, BLOCK, T_PAD)
    end = tl.minimum(start + chunk_size, tl.load(NUMEL + t))
    grad = tl.load(GRAD_PTRS + t).to(tl.pointer_type(G_TYPE))
    if ALIGNED:
        grad = tl.multiple_of(grad, 16)
    sq = tl.zeros([K_PAD, COLS], dtype=tl.float32)  # per thread: its partial ‖g_k‖² of every unit
    dot = tl.zeros([K_PAD, COLS], dtype=tl.float32)
    ss = tl.zeros([COLS * VEC], dtype=tl.float32)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for off in range(start, full_end, BLOCK):
        sq, dot, ss = _columns_tile(CONTRIB_PTRS, t, grad, tl.multiple_of(off, BLOCK), end, n_units, sq, dot, ss,
                                    C_TYPE, K_PAD, COLS, VEC, False, ALIGNED)
    if full_end < end:
        sq, dot, ss = _columns_tile(CONTRIB_PTRS, t, grad, full_end, end, n_units, sq, dot, ss,
                                    C_TYPE, K_PAD, COLS, VEC, True, ALIGNED)
    out = PARTIALS + chunk.to(tl.int64) * 3 * K_PAD
    units = tl.arange(0, K_PAD)
    tl.store(out + units, tl.sum(sq, axis=1))
    tl.store(out + K_PAD + units, tl.sum(dot, axis=1))
    tl.store(out + 2 * K_PAD + units, tl.where(units == 0, tl.sum(ss, axis=0), 0.0))


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
def _flat_copy_kernel(PTRS, FLAT, FLAT_OFFSET, NUMEL, FIRST_CHUNK, n_tensors, chunk_size, scale,
                      T_TYPE: tl.constexpr, TO_FLAT: tl.constexpr, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Copy (and scale) one chunk of one tensor into its segment of FLAT, or back when not TO_FLAT."""
    t, start = _chunk_of(FIRST_CHUNK, n_tensors, chunk_size, BLOCK, T_PAD)
    end = tl.minimum(start + chunk_size, tl.load(NUMEL + t))
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


def _check_reduce_inputs(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor]) -> int:
    """Validate shapes, dtypes, devices and layout; returns K."""
    if not grads or len(contributions) != len(grads):
        raise ValueError(f"need one list of contributions per grad, got {len(contributions)} lists for {len(grads)} grads")
    n_units = len(contributions[0])
    for i, (units, grad) in enumerate(zip(contributions, grads)):
        if len(units) != n_units or n_units == 0:
            raise ValueError(
                f"contributions[{i}] has {len(units)} units, expected {n_units} (K >= 1, the same for every tensor)"
            )
        shape = grad.shape
        for k, g in enumerate(units):
            if g.shape != shape:
                raise ValueError(f"contributions[{i}][{k}] has shape {tuple(g.shape)}, grads[{i}] {tuple(shape)}")
        if not grad.is_contiguous():
            raise ValueError(
                f"grads[{i}] is not contiguous: the sum is accumulated in place through a flat index; "
                "pass the parameter's .grad buffer itself (contiguous)"
            )
    _check_same([g for units in contributions for g in units], "contributions")
    _check_same(grads, "grads")
    if contributions[0][0].device != grads[0].device:
        raise ValueError(f"contributions on {contributions[0][0].device} but grads on {grads[0].device}")
    return n_units


def _first_chunks(numels: list[int], chunk_size: int) -> tuple[list[int], int]:
    """Each tensor's first chunk (tensor i gets ceil(numel_i / chunk_size) chunks), and the number of chunks."""
    firsts, n = [], 0
    for numel in numels:
        firsts.append(n)
        n += -(-numel // chunk_size)
    return firsts, n


def _to_device(tables: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    """Several small int64 host tables on the device, as views of one buffer moved in one copy.

    The same tables come back call after call (a tie group's .grad buffers, the
    benchmark's tensors): they are kept, keyed by their exact content, in a small
    cache (``_device_tables``), so a repeated call copies nothing.
    """
    return list(_device_tables(tuple(v for table in tables for v in table), tuple(len(t) for t in tables), device))


@functools.lru_cache(maxsize=64)
def _device_tables(flat: tuple[int, ...], lengths: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """``_to_device``'s copy, memoised: a pure function of the values (addresses, sizes), so a cached buffer is
    exactly what a new copy would hold, whatever lives at those addresses now. 64 entries of a few KB.

    On CUDA the copy is from pinned memory and asynchronous: from pageable memory it
    would first wait for every kernel queued before it, so the host's work for this
    call could never overlap the GPU's for the previous one. The buffers are read
    on the stream that wrote them (megascale launches on the current stream).
    """
    if device.type == "cuda":
        packed = torch.tensor(flat, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
    else:
        packed = torch.tensor(flat, dtype=torch.int64, device=device)
    return tuple(torch.split(packed, list(lengths)))


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


def _chunk_size(total: int, block: int, device: torch.device, num_warps: int = 8) -> int:
    """Elements per program: enough programs for ~64 warps per SM, at most _MAX_TILES_PER_CHUNK tiles each."""
    if INTERPRET:
        return 2 * block  # tiny tiles and chunks so small test tensors cross chunk and tile edges
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs_per_sm = 64 // num_warps
    tiles = math.ceil(total / (programs_per_sm * sms * block))
    return block * max(1, min(_MAX_TILES_PER_CHUNK, tiles))


@dataclass
class TiedGradPlan:
    """One reduction's launch, prepared once: its device tables, partials buffer and kernel arguments.

    ``run()`` adds Σ_k contributions into the grads again and returns the statistics,
    doing only the launch and the partials' sum: no checks, no host-to-device copy.
    Build it with ``plan_tied_grad_reduce`` for a set of buffers reduced many times
    (and for the benchmark, which times ``run()`` to separate the kernel's bandwidth
    from the host's work per call). It keeps the tensors alive: the tables hold their
    addresses, so the buffers must not be replaced (in-place updates are fine).
    """

    kernel: object
    n_chunks: int  # programs in the launch
    tables: tuple[torch.Tensor, ...]
    partials: torch.Tensor
    scalars: tuple[int, int, int]  # n_tensors, n_units, chunk_size
    constexprs: dict
    tensors: tuple  # the contributions and grads whose addresses the tables hold

    def launch(self) -> None:
        """The kernel alone: grads updated, per-program statistics in ``partials``, not yet summed."""
        if self.n_chunks:
            self.kernel[(self.n_chunks,)](*self.tables, self.partials, *self.scalars, **self.constexprs)

    def run(self) -> TiedGradStats:
        self.launch()
        stats = self.partials.sum(0)  # (3, K_PAD)
        n = self.scalars[1]
        return TiedGradStats(sq_norms=stats[0, :n], dots=stats[1, :n], sum_sq=stats[2, 0])


def _plan_triton(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor], layout: str) -> TiedGradPlan:
    n_units, device = len(contributions[0]), grads[0].device
    k_pad = next_pow2(n_units)
    # One pass over the tensors: non-contiguous contributions copied to dense ones (the flat index needs it) and
    # the (T × K_PAD) row-major address table (padded units point nowhere and are masked off).
    padding = [0] * (k_pad - n_units)
    dense, contrib_ptrs, grad_ptrs, numels = [], [], [], []
    for units, grad in zip(contributions, grads):
        units = [g if g.is_contiguous() else g.contiguous() for g in units]
        dense.append(units)
        contrib_ptrs += [g.data_ptr() for g in units] + padding
        grad_ptrs.append(grad.data_ptr())
        numels.append(grad.numel())
    any_bits = functools.reduce(operator.or_, contrib_ptrs + grad_ptrs)  # 16-byte aligned iff every address is
    c_size = dense[0][0].element_size()
    if layout in ("columns", "wide"):
        vec = _column_vec(k_pad, c_size, grads[0].element_size(), _WIDE_VALUES if layout == "wide" else _COLUMN_VALUES)
        num_warps = 1 if INTERPRET else _COLUMN_WARPS
        cols = 4 if INTERPRET else 32 * num_warps
        block, consts, kernel = cols * vec, {"COLS": cols, "VEC": vec}, _columns_kernel
    else:
        block = 16 if INTERPRET else max(256, _TILE_VALUES // k_pad)
        num_warps = 1 if INTERPRET else _num_warps(block, c_size, layout)
        consts, kernel = {"BLOCK": block}, _reduce_kernel
    chunk_size = _chunk_size(sum(numels), block, device, num_warps)
    firsts, n_chunks = _first_chunks(numels, chunk_size)
    tables = _to_device([contrib_ptrs, grad_ptrs, numels, firsts], device)
    # Every program writes its whole (3, K_PAD) row, so no fill is needed (one launch fewer), unless none runs.
    partials = (torch.empty if n_chunks else torch.zeros)((max(n_chunks, 1), 3, k_pad), device=device,
                                                          dtype=torch.float32)
    constexprs = dict(C_TYPE=_TL_DTYPE[dense[0][0].dtype], G_TYPE=_TL_DTYPE[grads[0].dtype], K_PAD=k_pad,
                      T_PAD=next_pow2(len(grads)), ALIGNED=any_bits % 16 == 0,
                      num_warps=num_warps, **consts)
    return TiedGradPlan(kernel, n_chunks, tuple(tables), partials, (len(grads), n_units, chunk_size), constexprs,
                        (dense, grads))


def plan_tied_grad_reduce(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor],
                          layout: str = "auto") -> TiedGradPlan:
    """``tied_grad_reduce``'s Triton launch for these buffers, checked and prepared once (``TiedGradPlan``).

    Needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1). Each ``plan.run()`` equals one
    ``tied_grad_reduce(contributions, grads, backend="triton", layout=layout)`` on the buffers' current values.
    """
    _check_reduce_inputs(contributions, grads)
    _use_triton("triton", grads[0].device)  # raises where the kernel cannot run
    _check_layout(layout)
    return _plan_triton(contributions, grads, _resolve_layout(layout, len(contributions[0])))


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
    _check_reduce_inputs(contributions, grads)
    if _use_triton(backend, grads[0].device):
        _check_layout(layout)  # here too: under the interpreter _num_warps is not consulted
        return _plan_triton(contributions, grads, _resolve_layout(layout, len(contributions[0]))).run()
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
    chunk_size = _chunk_size(sum(numels), block, device)
    firsts, n_chunks = _first_chunks(numels, chunk_size)
    offsets = [sum(numels[:i]) for i in range(len(numels))]  # segment starts in flat
    tables = _to_device([[t.data_ptr() for t in tensors], offsets, numels, firsts], device)
    if n_chunks:
        _flat_copy_kernel[(n_chunks,)](
            tables[0], flat, *tables[1:], len(tensors), chunk_size, float(scale),
            T_TYPE=_TL_DTYPE[tensors[0].dtype], TO_FLAT=to_flat, T_PAD=next_pow2(len(tensors)),
            BLOCK=block, num_warps=8 if not INTERPRET else 1,
        )


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
