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

Design: one multi-tensor launch over pointer tables
---------------------------------------------------
The kernel takes a table of raw addresses (int64 ``data_ptr()`` of every
contribution and every ``.grad``) and a chunk table (tensor index, start element);
one program reduces one chunk of one tensor, holding the K units' tiles side by
side in registers, so each element of each g_k is read once and each ``.grad``
element is read and written once: (K + 2)·N element transfers, the minimum.

The alternative, copying the contributions into a [K, N] workspace so that a
plain strided kernel can read them, costs an extra K·N read and K·N write —
roughly doubling the memory traffic of an operation that is bound by it. The
tables cost a few bytes per tensor and per chunk, built on the host and moved to
the device in one copy. Raw addresses also work under ``TRITON_INTERPRET=1`` for
CPU tensors: the interpreter dereferences host addresses directly (it only
copies *device* storages to the host), so the tested code is the GPU code.

Per-chunk partial statistics go to a small (chunks, 3, K_PAD) buffer summed by
torch afterwards, rather than atomics: the result is deterministic.

The reduction kernel is not autotuned: it accumulates into ``.grad`` in place,
so benchmarking configs would add the sum several times. The tile is sized
instead so that K_PAD × BLOCK = 4096 fp32 values live in registers per program:
128-bit loads.

Warps (``warps=``): "fixed" launches 8 per program, what the H200 measured
(BENCHMARKS.md): 77% of the copy bandwidth at K = 2, 9-22% from K = 4. Compiled
for sm_90a (``bench/kernel_layout.py``), the (K_PAD, BLOCK) tile then puts
warps along the unit axis whenever BLOCK < 8 warps × 32 lanes × 8 bf16 per load
= 2048, i.e. from K = 4 on (warpsPerCTA [2, 4] at K = 4, [8, 1] at K = 16), so
every tile's sum over units crosses warps through shared memory. "fitted" gives
a program BLOCK / (32 × elements per 128-bit load) warps, which keeps each
element column's K values inside one thread (warpsPerCTA [1, 4] at K = 4), at
96 / 159 / 240 registers per thread for K = 4 / 8 / 16 in bf16 without spills
(ptxas -v; K = 32 spills). Not measured on a GPU yet, so not the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)  # as triton.jit saw it when it decorated the kernels
BACKENDS = ("auto", "triton", "torch")
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TILE_VALUES = 4096  # K_PAD × BLOCK values per program tile on a GPU (see the module docstring)
_MAX_TILES_PER_CHUNK = 64  # caps a program at 64 tiles; longer tensors get more programs
WARPS = ("fixed", "fitted")


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
def _reduce_tile(contrib, grad, off, end, unit_ok, sq, dot, ss, MASK: tl.constexpr, BLOCK: tl.constexpr):
    """One (K_PAD, BLOCK) tile: Σ_k g_k into grad, and the running ‖g_k‖², ⟨g_k, Σg⟩, ‖Σg‖² (per lane)."""
    offs = off + tl.arange(0, BLOCK)
    ptrs = contrib[:, None] + offs[None, :]  # (K_PAD, BLOCK) addresses
    if MASK:
        in_range = offs < end
        g = tl.load(ptrs, mask=unit_ok[:, None] & in_range[None, :], other=0.0).to(tl.float32)
        acc = tl.load(grad + offs, mask=in_range, other=0.0).to(tl.float32)
    else:
        # Masking only the unit axis keeps each row's loads contiguous, hence vectorised.
        g = tl.load(ptrs, mask=unit_ok[:, None], other=0.0).to(tl.float32)
        acc = tl.load(grad + offs).to(tl.float32)
    total = tl.sum(g, axis=0)  # (BLOCK,) Σ_k g_k
    sq += tl.sum(g * g, axis=1)
    dot += tl.sum(g * total[None, :], axis=1)
    ss += total * total
    new = (acc + total).to(grad.dtype.element_ty)  # one rounding to the .grad dtype
    if MASK:
        tl.store(grad + offs, new, mask=in_range)
    else:
        tl.store(grad + offs, new)
    return sq, dot, ss


@triton.jit
def _reduce_kernel(CONTRIB_PTRS, GRAD_PTRS, NUMEL, CHUNK_TENSOR, CHUNK_START, PARTIALS, n_units, chunk_size,
                   C_TYPE: tl.constexpr, G_TYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """One program = one chunk of one tensor; writes its partial statistics to PARTIALS[chunk] (3, K_PAD)."""
    chunk = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + chunk)
    start = tl.multiple_of(tl.load(CHUNK_START + chunk), BLOCK)  # chunk starts are whole tiles
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
def _copy_tile(src, dst, off, end, scale, MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = off + tl.arange(0, BLOCK)
    if MASK:
        x = tl.load(src + offs, mask=offs < end, other=0.0).to(tl.float32)
        tl.store(dst + offs, (x * scale).to(dst.dtype.element_ty), mask=offs < end)
    else:
        x = tl.load(src + offs).to(tl.float32)
        tl.store(dst + offs, (x * scale).to(dst.dtype.element_ty))


@triton.jit
def _copy_range(src, dst, start, end, scale, BLOCK: tl.constexpr):
    """dst[start:end] = scale · src[start:end]: whole tiles unmasked, then the masked tail."""
    full_end = start + ((end - start) // BLOCK) * BLOCK
    for off in range(start, full_end, BLOCK):
        _copy_tile(src, dst, tl.multiple_of(off, BLOCK), end, scale, False, BLOCK)
    if full_end < end:
        _copy_tile(src, dst, full_end, end, scale, True, BLOCK)


@triton.jit
def _flat_copy_kernel(PTRS, FLAT, FLAT_OFFSET, NUMEL, CHUNK_TENSOR, CHUNK_START, chunk_size, scale,
                      T_TYPE: tl.constexpr, TO_FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """Copy (and scale) one chunk of one tensor into its segment of FLAT, or back when not TO_FLAT."""
    chunk = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + chunk)
    start = tl.multiple_of(tl.load(CHUNK_START + chunk), BLOCK)
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
        for k, g in enumerate(units):
            if g.shape != grad.shape:
                raise ValueError(f"contributions[{i}][{k}] has shape {tuple(g.shape)}, grads[{i}] {tuple(grad.shape)}")
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


def _chunk_table(numels: list[int], chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index, start element) of every chunk: tensor i gets ceil(numel_i / chunk_size) chunks."""
    counts = torch.tensor([math.ceil(n / chunk_size) for n in numels], dtype=torch.int64)  # (T,)
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), counts)  # (C,)
    first_chunk = torch.cumsum(counts, 0) - counts  # (T,) index of each tensor's first chunk
    start = (torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]) * chunk_size  # (C,)
    return tensor_of_chunk, start


def _to_device(tables: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move several int64 host tables to the device in one copy; returns views of the device buffer."""
    packed = torch.cat([t.reshape(-1) for t in tables]).to(device)  # (Σ sizes,)
    return list(torch.split(packed, [t.numel() for t in tables]))


def _aligned(tensors: list[torch.Tensor]) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def _check_warps(warps: str) -> None:
    if warps not in WARPS:
        raise ValueError(f"warps '{warps}' is not one of {', '.join(WARPS)}")


def _num_warps(block: int, element_size: int, warps: str) -> int:
    """Warps per program: 8 ("fixed"), or as many as one row of 128-bit loads spans ("fitted"; see the docstring)."""
    _check_warps(warps)
    if warps == "fixed":
        return 8
    per_load = 16 // element_size
    return max(1, min(8, block // (32 * per_load)))


def _chunk_size(total: int, block: int, device: torch.device, num_warps: int = 8) -> int:
    """Elements per program: enough programs for ~64 warps per SM, at most _MAX_TILES_PER_CHUNK tiles each."""
    if INTERPRET:
        return 2 * block  # tiny tiles and chunks so small test tensors cross chunk and tile edges
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs_per_sm = 64 // num_warps
    tiles = math.ceil(total / (programs_per_sm * sms * block))
    return block * max(1, min(_MAX_TILES_PER_CHUNK, tiles))


def _reduce_triton(contributions: list[list[torch.Tensor]], grads: list[torch.Tensor], warps: str) -> TiedGradStats:
    n_units, device = len(contributions[0]), grads[0].device
    # Non-contiguous contributions are copied to dense ones (the flat index needs it).
    contributions = [[g if g.is_contiguous() else g.contiguous() for g in units] for units in contributions]
    k_pad = triton.next_power_of_2(n_units)
    block = 16 if INTERPRET else max(256, _TILE_VALUES // k_pad)
    num_warps = 1 if INTERPRET else _num_warps(block, contributions[0][0].element_size(), warps)
    chunk_size = _chunk_size(sum(g.numel() for g in grads), block, device, num_warps)
    chunk_tensor, chunk_start = _chunk_table([g.numel() for g in grads], chunk_size)
    contrib_ptrs = torch.tensor(  # (T, K_PAD); padded units point nowhere and are masked off
        [[g.data_ptr() for g in units] + [0] * (k_pad - n_units) for units in contributions], dtype=torch.int64
    )
    grad_ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)  # (T,)
    numel = torch.tensor([g.numel() for g in grads], dtype=torch.int64)  # (T,)
    tables = _to_device([contrib_ptrs, grad_ptrs, numel, chunk_tensor, chunk_start], device)
    n_chunks = len(chunk_tensor)
    partials = torch.zeros((max(n_chunks, 1), 3, k_pad), device=device, dtype=torch.float32)
    aligned = _aligned([g for units in contributions for g in units] + grads)
    if n_chunks:
        _reduce_kernel[(n_chunks,)](
            *tables, partials, n_units, chunk_size,
            C_TYPE=_TL_DTYPE[contributions[0][0].dtype], G_TYPE=_TL_DTYPE[grads[0].dtype],
            K_PAD=k_pad, BLOCK=block, ALIGNED=aligned, num_warps=num_warps,
        )
    stats = partials.sum(0)  # (3, K_PAD)
    return TiedGradStats(sq_norms=stats[0, :n_units], dots=stats[1, :n_units], sum_sq=stats[2, 0])


def tied_grad_reduce(
    contributions: list[list[torch.Tensor]], grads: list[torch.Tensor], backend: str = "auto", warps: str = "fixed"
) -> TiedGradStats:
    """Add Σ_k contributions[i][k] into grads[i] in place and return the group's statistics.

    contributions[i][k]: unit k's gradient for shared tensor i, shaped like grads[i].
    grads[i]: the existing (contiguous) ``.grad`` buffer of tensor i; its prior content
    is kept and added to, and does not enter the statistics. Contributions share one
    dtype, grads share one dtype (each fp32, bf16 or fp16; they may differ, e.g. bf16
    contributions into fp32 grads); statistics are accumulated in fp32.
    Non-contiguous contributions are copied; non-contiguous grads raise ValueError.
    backend: "auto" (Triton on CUDA, else PyTorch), "triton" (also CPU under TRITON_INTERPRET=1), "torch".
    warps: the Triton launch's warps per program, "fixed" or "fitted" (module docstring).
    """
    _check_reduce_inputs(contributions, grads)
    if _use_triton(backend, grads[0].device):
        _check_warps(warps)  # here too: under the interpreter _num_warps is not consulted
        return _reduce_triton(contributions, grads, warps)
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
    chunk_tensor, chunk_start = _chunk_table(numels, chunk_size)
    offsets = torch.tensor([0] + numels[:-1], dtype=torch.int64).cumsum(0)  # (T,) segment starts in flat
    ptrs = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)  # (T,)
    tables = _to_device([ptrs, offsets, torch.tensor(numels, dtype=torch.int64), chunk_tensor, chunk_start], device)
    if len(chunk_tensor):
        _flat_copy_kernel[(len(chunk_tensor),)](
            tables[0], flat, *tables[1:], chunk_size, float(scale),
            T_TYPE=_TL_DTYPE[tensors[0].dtype], TO_FLAT=to_flat, BLOCK=block, num_warps=8 if not INTERPRET else 1,
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
