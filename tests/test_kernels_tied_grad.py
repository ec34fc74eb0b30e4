"""The tied-block gradient reduction kernel against its PyTorch reference.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set
before the kernel module is imported) on small tensors whose sizes cross the
interpreter's 16-element tiles and 32-element chunks; with CUDA the same tests
also run at real sizes. Interpreter caveat: its fp32 → bf16 cast truncates
instead of rounding to nearest, so bf16 gradient buffers may differ from the
reference by one bf16 ulp; the bf16 tolerance allows for it.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from megascale.kernels.tied_grad import (  # noqa: E402
    TiedGradStats,
    chosen_backend,
    coherence,
    flatten_for_collective,
    plan_tied_grad_reduce,
    tied_grad_reduce,
    tied_grad_reduce_reference,
    unflatten_into,
    unit_alignment,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (atol, rtol) for the updated .grad buffers, by their dtype. bf16: one ulp (2^-7 relative) plus slack.
GRAD_TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 1.6e-2)}


def _grad_tol(g_dtype: torch.dtype, n_units: int) -> tuple[float, float]:
    """(atol, rtol) for the summed gradient. In fp32 the kernel and torch's sum add the K units in different
    orders, and the rounding that leaves grows with K: the H200 saw 3.6e-6 at K=24 (the entries ~1), so the
    fp32 bound grows with K past 4 units."""
    atol, rtol = GRAD_TOL[g_dtype]
    if g_dtype == torch.float32:
        return atol * max(1.0, n_units / 4), rtol * max(1.0, n_units / 4)
    return atol, rtol
STATS_RTOL = 1e-5  # fp32 statistics, summed in a different order than the reference

# Uneven sizes: 1 element, under a tile, across tiles and programs, 2-D; CUDA adds real ones.
SMALL_SHAPES = [(1,), (7,), (100,), (33, 5), (64,)]
LARGE_SHAPES = [(4096, 4096), (11008, 4096 // 8), (4096,), (123457,)]
SHAPES = SMALL_SHAPES + (LARGE_SHAPES if CUDA else [])


def _group(n_units, shapes, c_dtype, g_dtype, seed=0, shared=0.0):
    """Random contributions (shared·common + noise per unit) and random prior .grad buffers."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=DEVICE)

    contributions = []
    for shape in shapes:
        common = randn(shape)
        contributions.append([(shared * common + randn(shape)).to(c_dtype) for _ in range(n_units)])
    grads = [randn(shape).to(g_dtype) for shape in shapes]
    return contributions, grads


def _assert_stats_close(got: TiedGradStats, want: TiedGradStats):
    for name in ("sq_norms", "dots", "sum_sq"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=STATS_RTOL, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("n_units", [1, 2, 3, 4, 7, 8, 12])  # 7: two blocks of 4 units, the second with one masked
@pytest.mark.parametrize(
    "c_dtype, g_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-into-fp32"],
)
def test_reduce_matches_reference(n_units, c_dtype, g_dtype):
    contributions, grads = _group(n_units, SHAPES, c_dtype, g_dtype)
    ref_grads = [g.clone() for g in grads]
    buffers = [g.data_ptr() for g in grads]
    stats = tied_grad_reduce(contributions, grads, backend="triton")
    want = tied_grad_reduce_reference(contributions, ref_grads)
    _assert_stats_close(stats, want)
    assert [g.data_ptr() for g in grads] == buffers  # accumulated in place
    atol, rtol = _grad_tol(g_dtype, n_units)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", ["fixed", "fitted", "columns", "wide"])
@pytest.mark.parametrize("n_units", [1, 4, 12, 24])
@pytest.mark.parametrize("c_dtype, g_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                              (torch.bfloat16, torch.bfloat16)], ids=["bf16-into-fp32", "fp32", "bf16"])
def test_other_layouts_give_the_same_reduction(layout, n_units, c_dtype, g_dtype):
    """The default ("auto") is "columns" up to K = 16, "wide" to 32; "fixed" and "fitted" launch the tile kernel with 8 warps and
    with fitted ones. Every layout must reduce the same."""
    contributions, grads = _group(n_units, SHAPES, c_dtype, g_dtype, seed=5)
    ref_grads = [g.clone() for g in grads]
    _assert_stats_close(tied_grad_reduce(contributions, grads, backend="triton", layout=layout),
                        tied_grad_reduce_reference(contributions, ref_grads))
    atol, rtol = _grad_tol(g_dtype, n_units)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=rtol)


def test_warps_per_program_and_elements_per_thread():
    from megascale.kernels.tied_grad import _column_vec, _num_warps, _unit_split

    # bf16 (8 per 128-bit load): one row of the tile spans BLOCK / 256 warps, at most 8.
    assert [_num_warps(block, 2, "fitted") for block in (4096, 2048, 1024, 512, 256)] == [8, 8, 4, 2, 1]
    assert _num_warps(1024, 4, "fitted") == 8  # fp32: 4 per load
    assert _num_warps(256, 2, "fixed") == 8

    # columns: one 128-bit access of the wider dtype, and at most 64 values of the tile per thread
    assert [_column_vec(k_pad, 2, 2) for k_pad in (1, 2, 4, 8, 16, 32, 64, 128)] == [8, 8, 8, 8, 4, 2, 1, 1]
    assert [_column_vec(k_pad, 2, 4) for k_pad in (1, 8, 16, 32)] == [4, 4, 4, 2]  # bf16 into fp32 grads
    # wide: twice the values, so 64-bit loads of bf16 at K = 17-32
    assert [_column_vec(k_pad, 2, 2, 128) for k_pad in (8, 16, 32, 64, 128)] == [8, 8, 4, 2, 1]
    # the units as two power-of-two blocks of rows: no padded row where K is a sum of two powers of two
    assert [_unit_split(k) for k in (1, 2, 3, 5, 7, 8, 12, 13, 24, 32)] == [
        (1, 0), (2, 0), (2, 1), (4, 1), (4, 4), (8, 0), (8, 4), (8, 8), (16, 8), (32, 0)]
    contributions, grads = _group(2, [(8,)], torch.float32, torch.float32)
    with pytest.raises(ValueError, match="layout 'many' is not one of auto, fixed, fitted, columns"):
        tied_grad_reduce(contributions, grads, backend="triton", layout="many")


def test_auto_layout_is_columns_then_wide_up_to_32_units():
    """What the H200 and the H100 measured fastest (kernels/tied_grad.py docstring); beyond 32 units the
    column kernels spill."""
    from megascale.kernels.tied_grad import _resolve_layout

    assert [_resolve_layout("auto", k) for k in (1, 2, 4, 12, 16, 17, 24, 32, 33, 64)] == (
        ["columns"] * 5 + ["wide"] * 3 + ["fixed"] * 2)
    assert _resolve_layout("fitted", 4) == "fitted"


@pytest.mark.parametrize("layout", ["fixed", "columns", "wide"])
def test_empty_tensors_in_the_group_are_skipped(layout):
    """Zero-element tensors get no chunk; each program still finds its own tensor among the rest."""
    shapes = [(0,), (7,), (0,), (100,), (0,)]
    contributions, grads = _group(3, shapes, torch.float32, torch.float32, seed=3)
    ref_grads = [g.clone() for g in grads]
    _assert_stats_close(tied_grad_reduce(contributions, grads, backend="triton", layout=layout),
                        tied_grad_reduce_reference(contributions, ref_grads))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref)
    flat = flatten_for_collective(grads, scale=2.0, backend="triton")
    torch.testing.assert_close(flat, 2 * torch.cat([g.reshape(-1) for g in grads]))
    back = [torch.empty_like(g) for g in grads]
    unflatten_into(flat, back, backend="triton")
    for b, g in zip(back, grads):
        torch.testing.assert_close(b, 2 * g)


def test_stats_are_of_this_steps_contributions_only():
    """A non-zero prior .grad is added to, but does not enter the statistics; the sum is exact."""
    contributions, grads = _group(3, [(50,), (9, 3)], torch.float32, torch.float32, seed=2)
    before = [g.clone() for g in grads]
    stats = tied_grad_reduce(contributions, grads, backend="triton")
    sums = [torch.stack(units).sum(0) for units in contributions]
    for g, b, s in zip(grads, before, sums):
        torch.testing.assert_close(g, b + s)
    flat = [torch.cat([u.reshape(-1) for u in units]) for units in zip(*contributions)]  # per unit, (N,)
    total = torch.stack(flat).sum(0)
    torch.testing.assert_close(stats.sq_norms, torch.stack([f @ f for f in flat]), rtol=STATS_RTOL, atol=0)
    torch.testing.assert_close(stats.dots, torch.stack([f @ total for f in flat]), rtol=STATS_RTOL, atol=0)
    torch.testing.assert_close(stats.sum_sq, total @ total, rtol=STATS_RTOL, atol=0)


@pytest.mark.parametrize("layout", ["auto", "fixed"])
def test_a_plan_reduces_like_a_call_each_time_it_runs(layout):
    """plan_tied_grad_reduce checks and prepares once; every run() adds the buffers' current contributions
    again and returns their statistics, as tied_grad_reduce would."""
    contributions, grads = _group(3, [(50,), (9, 3), (0,)], torch.float32, torch.float32, seed=5)
    expected = [g.clone() for g in grads]
    plan = plan_tied_grad_reduce(contributions, grads, layout=layout)
    for step in range(2):
        for units in contributions:  # new values in the same buffers, as a training step writes them
            for u in units:
                u.mul_(-0.5 if step else 1.0)
        want = tied_grad_reduce_reference(contributions, expected)
        _assert_stats_close(plan.run(), want)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)


def test_the_kernel_sums_its_programs_statistics_itself():
    """One launch: the tensors' tiles are split into about as many equal shares as the device runs programs at
    once (11 under the interpreter), and the last program of each group of programs to finish sums the group's
    rows, the last of those the groups' (under the interpreter groups of 3 and 2 rows a load: every loop and
    both levels, the last group partial). The counters are back at 0 after each launch, so the cached tables
    serve the next call, and the statistics, added in a fixed order, are bitwise the same each time."""
    contributions, grads = _group(3, [(50,), (9, 3), (0,), (300,)], torch.float32, torch.float32, seed=6)
    expected = [g.clone() for g in grads]
    want = tied_grad_reduce_reference(contributions, expected)
    plan = plan_tied_grad_reduce(contributions, grads, layout="columns")
    group = plan.spec.scalars[1]
    if not CUDA:
        assert plan.n_programs > 2 * group and plan.n_programs % group, (plan.n_programs, group)
    counters = plan.spec.tables[-1]
    first = plan.run()
    _assert_stats_close(first, want)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert counters.numel() == 1 + -(-plan.n_programs // group) and not counters.any()
    first = TiedGradStats(*(t.clone() for t in (first.sq_norms, first.dots, first.sum_sq)))
    second = tied_grad_reduce(contributions, grads, backend="triton", layout="columns")  # the same cached tables
    for name in ("sq_norms", "dots", "sum_sq"):
        assert torch.equal(getattr(second, name), getattr(first, name)), name
    assert not counters.any()


@pytest.mark.parametrize("numels, block, slots", [
    ([32 << 20], 512, 528),  # 64 MB of bf16 at K = 12 on an H200: 4 blocks an SM
    ([2048, 2048 * 2048, 512 * 2048, 512 * 2048, 2048 * 2048, 2048, 5632 * 2048, 5632 * 2048, 2048 * 5632], 1024, 1188),
    ([0, 7, 0, 100_000, 1], 16, 11),
    ([5], 16, 1000),  # fewer tiles than slots: a program a tile
])
def test_the_grid_is_one_wave_of_equal_shares(numels, block, slots):
    """_shares: at most as many programs as run at once, empty tensors none, every other at least one and at
    most one a tile, and no program more than ⌈tiles / (slots - tensors)⌉ tiles (one wave that ends together)."""
    from megascale.kernels.tied_grad import _shares

    firsts, n = _shares(numels, block, slots)
    tiles = [-(-x // block) for x in numels]
    counts = [b - a for a, b in zip(firsts, firsts[1:])]
    assert firsts[0] == 0 and firsts[-1] == n and len(firsts) == len(numels) + 1
    assert n <= slots and all((c == 0) == (t == 0) and c <= t for c, t in zip(counts, tiles))
    bound = -(-sum(tiles) // max(1, slots - sum(1 for t in tiles if t)))
    assert max(-(-t // c) for c, t in zip(counts, tiles) if c) <= bound


@pytest.mark.parametrize("regs, shared, warps, blocks", [
    (56, 0, 4, 9),  # "columns" at K = 2 (sm_90a): 1,792 registers a warp, 65,536 an SM
    (119, 0, 4, 4),  # K = 8 with Triton 3.6: 3,808 rounded up to 3,840 a warp
    (128, 0, 4, 4),  # K = 12
    (100, 0, 4, 4),  # 3,200 rounded up to 3,328 a warp: 4 blocks, where 3,200 would give 5
    (203, 0, 4, 2),  # "wide" at K = 12: 6,496 rounded up to 6,656
    (16, 0, 4, 16),  # few registers: 64 warps an SM at most
    (16, 0, 1, 32),  # one-warp blocks: 32 blocks an SM at most
    (32, 100_000, 4, 2),  # shared memory the limit
    (255, 0, 16, 1),  # one block even where the count rounds to none (16 warps of 255 registers: twice an SM)
])
def test_the_blocks_an_sm_holds(regs, shared, warps, blocks):
    """_slots' occupancy count, against the H100/H200's limits (65,536 registers, 227 KiB of shared memory a block)."""
    from megascale.kernels.tied_grad import _blocks_per_sm

    assert _blocks_per_sm(regs, shared, warps, 65536, 232448) == blocks


def test_the_slot_count_compiles_the_kernel_as_it_is_launched(monkeypatch):
    """_slots compiles each kernel with stand-in arguments (a dtype for each tensor, the ints as Triton specialises
    them) to read its registers: they, and the constexprs, must bind to the kernel's parameters as the launch's
    arguments do. Under the interpreter _slots returns at once, so this binds them here; on a GPU a mismatch would
    only warn and fall back to a guess."""
    import inspect  # noqa: PLC0415

    from megascale.kernels import tied_grad  # noqa: PLC0415

    bound = []

    def binding_slots(kernel, device, constexprs, stand_ins):
        kw = {k: v for k, v in constexprs if k != "num_warps"}
        arguments = inspect.signature(kernel.fn).bind(*stand_ins, **kw).arguments  # TypeError if they differ
        tensors = [name for name, value in arguments.items() if isinstance(value, torch.dtype)]
        bound.append((kernel.fn.__name__, tensors))
        return 11

    monkeypatch.setattr(tied_grad, "_slots", binding_slots)
    tied_grad._forget_launches()
    contributions, grads = _group(3, [(50,), (9, 3)], torch.float32, torch.float32, seed=2)
    for layout in ("fixed", "fitted", "columns", "wide"):
        tied_grad_reduce(contributions, grads, backend="triton", layout=layout)
    flat = flatten_for_collective(grads, backend="triton")
    unflatten_into(flat, grads, backend="triton")
    tied_grad._forget_launches()  # the launches memoised with this stand-in's count
    tables = ["CONTRIB_PTRS", "GRAD_PTRS", "NUMEL", "FIRST_PROGRAM", "COUNTERS", "PARTIALS"]
    assert bound == [("_reduce_kernel", tables)] * 2 + [("_columns_kernel", tables)] * 2 + [
        ("_flat_copy_kernel", ["PTRS", "FLAT", "FLAT_OFFSET", "NUMEL", "FIRST_PROGRAM"])] * 2


@pytest.mark.skipif(not CUDA, reason="the device's count of programs at once needs a GPU")
def test_the_grid_fills_the_device_once():
    """_slots reads the kernel's registers from a compile: between one and 16 blocks an SM at 4 warps."""
    contributions, grads = _group(12, [(4096, 4096)], torch.bfloat16, torch.bfloat16)
    plan = plan_tied_grad_reduce(contributions, grads)
    sms = torch.cuda.get_device_properties(grads[0].device).multi_processor_count
    assert sms <= plan.spec.slots <= 16 * sms and plan.n_programs <= plan.spec.slots


def test_a_reduction_over_empty_tensors_launches_nothing_and_reports_zeros():
    contributions, grads = _group(2, [(0,), (0, 4)], torch.float32, torch.float32)
    plan = plan_tied_grad_reduce(contributions, grads)
    assert plan.n_programs == 0
    stats = plan.run()
    assert stats.sq_norms.tolist() == [0.0, 0.0] and stats.dots.tolist() == [0.0, 0.0] and float(stats.sum_sq) == 0.0


def test_a_plan_refuses_what_a_call_refuses():
    contributions, grads = _group(2, [(8,)], torch.float32, torch.float32)
    with pytest.raises(ValueError, match="layout 'broad' is not one of"):
        plan_tied_grad_reduce(contributions, grads, layout="broad")
    with pytest.raises(ValueError, match="units, expected"):
        plan_tied_grad_reduce([contributions[0], contributions[0][:1]], grads * 2)


def test_a_repeated_call_reuses_its_launch():
    """The launch (tables, grid, arguments) is a pure function of the addresses, sizes, dtypes, layout and device:
    a second call on the same buffers builds nothing and copies nothing to the device (a cache hit, the same
    tables), and reduces the same. Each call's statistics are its own: the second does not overwrite the first's."""
    from megascale.kernels.tied_grad import _launch_for

    contributions, grads = _group(2, [(40,), (3, 7)], torch.float32, torch.float32, seed=9)
    expected = [g.clone() for g in grads]
    results, specs = [], []
    for step in range(3):
        hits = _launch_for.cache_info().hits
        want = tied_grad_reduce_reference(contributions, expected)
        results.append((tied_grad_reduce(contributions, grads, backend="triton"), want))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)
        specs.append(plan_tied_grad_reduce(contributions, grads).spec)
        # the first call may hit too: an earlier test's freed buffers can come back at the same addresses
        assert _launch_for.cache_info().hits - hits == 2 or (step == 0 and _launch_for.cache_info().hits > hits)
        for units in contributions:  # new values in the same buffers
            for u in units:
                u.mul_(-2.0)
    assert specs[0] is specs[1] is specs[2]
    # on CUDA the calls after the first went through the compiled kernel's own launcher (checked right above);
    # the interpreter's launch returns no compiled kernel
    assert (specs[0].direct is not None) == CUDA
    for got, want in results:
        _assert_stats_close(got, want)


def test_a_failed_launch_forgets_the_cached_launches():
    """A launch cut short can leave a counter counted up: the cached tables that hold the counters are dropped, so
    the next call builds new ones (a cache miss) and reduces right."""
    from megascale.kernels.tied_grad import _launch_for

    contributions, grads = _group(2, [(40,)], torch.float32, torch.float32, seed=4)
    expected = [g.clone() for g in grads]
    plan = plan_tied_grad_reduce(contributions, grads)
    with pytest.raises(Exception):  # refused before the kernel runs: Triton cannot pass a str as a pointer
        plan.spec("not a partials buffer")
    assert _launch_for.cache_info().currsize == 0
    misses = _launch_for.cache_info().misses
    _assert_stats_close(tied_grad_reduce(contributions, grads, backend="triton"),
                        tied_grad_reduce_reference(contributions, expected))
    assert _launch_for.cache_info().misses == misses + 1


def test_coherence_extremes():
    g = torch.randn(40, device=DEVICE)
    same = tied_grad_reduce([[g.clone() for _ in range(4)]], [torch.zeros(40, device=DEVICE)], backend="triton")
    assert coherence(same) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(unit_alignment(same), torch.ones(4, device=DEVICE), atol=1e-6)

    basis = torch.eye(4, 64, device=DEVICE)  # orthogonal unit vectors
    ortho = tied_grad_reduce([[basis[k] for k in range(4)]], [torch.zeros(64, device=DEVICE)], backend="triton")
    assert coherence(ortho) == pytest.approx(0.25, abs=1e-6)

    opposed = tied_grad_reduce([[g, -g]], [torch.zeros(40, device=DEVICE)], backend="triton")
    assert coherence(opposed) == pytest.approx(0.0, abs=1e-6)

    single = tied_grad_reduce([[g]], [torch.zeros(40, device=DEVICE)], backend="triton")
    zeros = tied_grad_reduce([[torch.zeros(5, device=DEVICE)] * 3], [torch.zeros(5, device=DEVICE)], backend="triton")
    assert coherence(single) == 1.0 and coherence(zeros) == 1.0
    assert torch.equal(unit_alignment(zeros), torch.ones(3, device=DEVICE))


def test_unit_alignment_finds_the_dissenting_unit():
    contributions, grads = _group(4, [(256,)], torch.float32, torch.float32, seed=3, shared=3.0)
    contributions[0][2] = -contributions[0][2]
    stats = tied_grad_reduce(contributions, grads, backend="triton")
    assert int(unit_alignment(stats).argmin()) == 2


def test_non_contiguous_contributions_are_handled():
    base = torch.randn(3, 16, 10, device=DEVICE)
    contributions = [[base[k].t() for k in range(3)]]  # (10, 16) views, not contiguous
    assert not contributions[0][0].is_contiguous()
    grads, ref = [torch.zeros(10, 16, device=DEVICE)], [torch.zeros(10, 16, device=DEVICE)]
    _assert_stats_close(tied_grad_reduce(contributions, grads, backend="triton"),
                        tied_grad_reduce_reference(contributions, ref))
    torch.testing.assert_close(grads[0], ref[0])


def test_non_contiguous_grad_is_refused():
    grad = torch.zeros(16, 10, device=DEVICE).t()
    with pytest.raises(ValueError, match=r"grads\[0\] is not contiguous"):
        tied_grad_reduce([[torch.ones(10, 16, device=DEVICE)] * 2], [grad])


@pytest.mark.parametrize(
    "contributions, grads, match",
    [
        ([[torch.ones(3)], [torch.ones(3), torch.ones(3)]], [torch.ones(3), torch.ones(3)], "has 2 units, expected 1"),
        ([[torch.ones(4)]], [torch.ones(3)], "has shape"),
        ([[torch.ones(3)]], [torch.ones(3), torch.ones(3)], "one list of contributions per grad"),
        ([[torch.ones(3, dtype=torch.float64)]], [torch.ones(3)], "one dtype"),
    ],
)
def test_bad_inputs_raise(contributions, grads, match):
    with pytest.raises(ValueError, match=match):
        tied_grad_reduce(contributions, grads)


def test_backends_agree_and_auto_choice():
    contributions, grads = _group(2, SMALL_SHAPES, torch.float32, torch.float32, seed=4)
    copies = [g.clone() for g in grads]
    _assert_stats_close(tied_grad_reduce(contributions, grads, backend="auto"),
                        tied_grad_reduce(contributions, copies, backend="torch"))
    with pytest.raises(ValueError, match="not one of"):
        tied_grad_reduce(contributions, grads, backend="cuda")
    # auto: Triton on CUDA only; on CPU the interpreter serves only an explicit request.
    assert chosen_backend(torch.device(DEVICE)) == ("triton" if DEVICE == "cuda" else "torch")
    assert chosen_backend(torch.device(DEVICE), "triton") == "triton"
    assert chosen_backend(torch.device(DEVICE), "torch") == "torch"


@pytest.mark.parametrize("dtype, flat_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)])
def test_flatten_scale_unflatten_roundtrip(dtype, flat_dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    tensors = [torch.randn(s, generator=gen, device=DEVICE).to(dtype) for s in SHAPES]
    flat = flatten_for_collective(tensors, scale=0.5, dtype=flat_dtype, backend="triton")
    want = flatten_for_collective(tensors, scale=0.5, dtype=flat_dtype, backend="torch")
    assert flat.shape == (sum(t.numel() for t in tensors),) and flat.dtype == (flat_dtype or dtype)
    torch.testing.assert_close(flat, want, atol=0, rtol=0)  # x · 0.5 is exact
    flat.mul_(2)  # what a 2-rank all-reduce of the halves gives back
    out = [torch.full_like(t, float("nan")) for t in tensors]
    unflatten_into(flat, out, backend="triton")
    for o, t in zip(out, tensors):
        torch.testing.assert_close(o, t, atol=0, rtol=0)


def test_flatten_reads_non_contiguous_and_unflatten_refuses_it():
    x = torch.randn(8, 6, device=DEVICE)
    flat = flatten_for_collective([x.t(), x[:, :2]], backend="triton")
    torch.testing.assert_close(flat, torch.cat([x.t().reshape(-1), x[:, :2].reshape(-1)]))
    with pytest.raises(ValueError, match=r"tensors\[0\] is not contiguous"):
        unflatten_into(flat[:48], [torch.zeros(6, 8, device=DEVICE).t()])
    with pytest.raises(ValueError, match=r"the tensors need \(3,\)"):
        unflatten_into(flat, [torch.zeros(3, device=DEVICE)])


def test_host_next_pow2_is_tritons():
    """The launchers' host-side power of two (Triton's is a constexpr_function, ~50x slower a call): the same
    values, and 1 where Triton's would give 0."""
    import triton  # noqa: PLC0415

    from megascale.kernels._host import next_pow2  # noqa: PLC0415

    assert all(next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert [next_pow2(n) for n in (0, 1, 2, 3, 2**40 - 1, 2**40, 2**40 + 1)] == [1, 1, 2, 4, 2**40, 2**40, 2**41]
