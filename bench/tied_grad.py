"""GB/s of the tied-block gradient reduction, against PyTorch and against the device's copy bandwidth.

    python bench/tied_grad.py --json runs/bench/tied_grad.json --png runs/bench/tied_grad.png
    python bench/tied_grad.py --smoke        # CPU, seconds: the code paths, not the speed
    python bench/tied_grad.py --host --dtype bf16   # CPU or GPU: a call's checks and tables alone, per K

For K units and a shared tensor of N elements the reduction must read K
contributions and the existing .grad and write the .grad: (K + 2)·N elements,
the bytes counted for every provider. Providers, side by side in one run:

* ``triton``: megascale.kernels.tied_grad.tied_grad_reduce, one launch, the default
  layout ("auto": "columns" up to K = 16, "wide" to 32, "fixed" beyond);
* ``fixed``: ``layout="fixed"``, the tile kernel with 8 warps per program (the
  default until the H200 measured it, 2026-11-26);
* ``fitted``: the same kernel with ``layout="fitted"`` (as many warps as one row of
  128-bit loads spans: the sum over units stays inside each thread);
* ``columns``: ``layout="columns"``, the kernel whose threads each own a few adjacent
  elements of every unit: no exchange between threads until a program's end;
* ``wide``: ``layout="wide"``, the same kernel with twice the registers for its tile
  (wider loads from K = 17);
* ``default last``: the default again, timed after all the others (every provider is
  called a few times before any is timed);
* ``prepared``: the default's launch built once (``plan_tied_grad_reduce``) and only
  run in the timed call: the kernel (which sums its statistics itself, one launch)
  without the host's checks and table copy, i.e. the kernel's own bandwidth;
* ``torch``: the plain PyTorch composition — stack, sum into .grad, norms, dots;
* ``copy``: ``dst.copy_(src)`` moving the same number of bytes, the speed of
  light for a memory-bound pass on this device.

After the table, the Llama block's default call at K = 2 (the case whose host time
outlasted its kernel on the H100) runs under cProfile: the JSON's ``host_profile``
lists where a call's host time goes, function by function (µs per call, its own
and with what it calls; inflated by the profiler, comparable with each other).
On CPU (``--host``, ``--smoke``) it profiles ``plan_tied_grad_reduce``, the part
that runs without a GPU.

``host us``: the host's time to issue one default (``triton``) call, the GPU idle
(synchronised before each call, median of 50); ``plan us`` and ``run us`` split
it: the checks and launch tables (``plan_tied_grad_reduce``), then the launch
(``plan.run()``, through the compiled kernel's own launcher once it is kept);
``dispatch us`` is that launch through Triton's dispatch instead, what a call
paid before the launcher was kept (2026-11-27). Each timed call starts after
do_bench's L2 flush, which hides about that long of the host's work; beyond it,
the host's time counts in the call's, which is what a small tensor measures.

Sizes are those of one shared tensor in the gradients' dtype (1 MB … 1 GB);
``llama-block`` is one 1B-class block's nine tensors (d 2048, FFN 5632, 32/8
heads) in one call, the kernel's real use. Shapes that do not fit in memory are
reported as skipped.

--smoke runs on CPU: tiny tensors through the kernel under TRITON_INTERPRET=1,
the PyTorch composition and the copy, to prove the script works where no GPU
is present. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from pathlib import Path

import torch

from _common import checkout_kernels, environment, time_ms, write_results

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("fixed", "fitted", "columns", "wide")  # timed beside the default, each by name
MB = 2**20
LLAMA_BLOCK = dict(d=2048, ffn=5632, heads=32, kv_heads=8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--png", type=Path, help="plot GB/s against tensor size here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through every code path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="contributions' and grads' dtype")
    p.add_argument("--units", default="2,4,8,12,24", help="values of K (24: 1.3b with sharing all)")
    p.add_argument("--sizes-mb", default="1,4,16,64,256,1024", help="one shared tensor's size in MB")
    p.add_argument("--no-block", action="store_true", help="skip the llama-block case")
    p.add_argument("--host", action="store_true",
                   help="only the host's checks and tables for the llama block (plan_tied_grad_reduce, no launch), "
                        "per K, and the host profile of its call at K = 2; runs on CPU too")
    args = p.parse_args(argv)
    if args.smoke:
        # a power of two and two blocks of rows (3 = 2 + 1); one size: each interpreted launch takes ~0.5 s
        args.units, args.sizes_mb, args.no_block = "2,3", "0.004", True
    return args


def import_kernels():
    (tied_grad,) = checkout_kernels("tied_grad")
    return tied_grad


def torch_composition(contributions, grads):
    """What one would write in PyTorch: per tensor stack, sum into .grad, norms and dots in fp32."""
    K, device = len(contributions[0]), grads[0].device
    sq, dots, sum_sq = (torch.zeros(K, device=device), torch.zeros(K, device=device), torch.zeros((), device=device))
    for units, grad in zip(contributions, grads):
        g = torch.stack(units).view(K, -1).float()  # (K, N)
        total = g.sum(0)  # (N,)
        grad.add_(total.view_as(grad))
        sq += torch.linalg.vector_norm(g, dim=1).square()
        dots += g @ total
        sum_sq += total @ total
    return sq, dots, sum_sq


def shapes_for(case: str, size_bytes: int, elem: int) -> list[tuple[int, ...]]:
    if case == "llama-block":
        d, f, h, kv = LLAMA_BLOCK.values()
        kv_dim = d // h * kv
        return [(d, d), (kv_dim, d), (kv_dim, d), (d, d), (f, d), (f, d), (d, f), (d,), (d,)]
    return [(max(1, size_bytes // elem),)]


def fits(device: torch.device, need: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.85 * free


def bench_case(tg, device, dtype, K: int, case: str, size_bytes: int) -> dict:
    elem = torch.tensor([], dtype=dtype).element_size()
    shapes = shapes_for(case, size_bytes, elem)
    n = sum(torch.Size(s).numel() for s in shapes)
    moved = (K + 2) * n * elem  # read K contributions and the grad, write the grad
    row = dict(K=K, case=case, size_mb=n * elem / MB, tensors=len(shapes), elements=n, bytes_moved=moved)
    # contributions + grads, the composition's (K, N) fp32 stack, the copy's two buffers
    if not fits(device, (K + 1) * n * elem + K * n * 4 + moved):
        return {**row, "skipped": "memory"}
    ms, host = time_reductions(tg, device, dtype, K, shapes)  # its buffers freed before the copy's are made
    src = torch.empty(moved // 2 // elem, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    ms["copy"] = time_ms(lambda: dst.copy_(src), device, warmup=10, rep=50)
    gbps = {f"{k}_gbps": moved / (v * 1e-3) / 1e9 for k, v in ms.items()}
    return {**row, **{f"{k}_ms": v for k, v in ms.items()}, **gbps, **host,
            "of_copy": gbps["triton_gbps"] / gbps["copy_gbps"], "vs_torch": gbps["triton_gbps"] / gbps["torch_gbps"],
            "prepared_of_copy": gbps["prepared_gbps"] / gbps["copy_gbps"],
            "last_of_copy": gbps["triton_last_gbps"] / gbps["copy_gbps"],
            **{f"{layout}_of_copy": gbps[f"{layout}_gbps"] / gbps["copy_gbps"] for layout in LAYOUTS}}


def time_reductions(tg, device, dtype, K: int, shapes: list[tuple[int, ...]]) -> tuple[dict, dict]:
    """Milliseconds per call of each reduction provider on one set of buffers, and the host's microseconds per
    call (``host_us``, ``plan_us``, ``run_us``, ``dispatch_us``: the module docstring)."""
    contributions = [[torch.randn(s, device=device, dtype=dtype) for _ in range(K)] for s in shapes]
    grads = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    plan = tg.plan_tied_grad_reduce(contributions, grads)  # the default's launch, built once

    def call(layout: str = "auto") -> None:
        tg.tied_grad_reduce(contributions, grads, backend="triton", layout=layout)

    providers = {"triton": call, **{layout: lambda lay=layout: call(lay) for layout in LAYOUTS}, "prepared": plan.run,
                 "torch": lambda: torch_composition(contributions, grads)}
    # Each provider a few calls before any is timed: on the H200 (2026-11-27) the default, timed first on fresh
    # buffers, read 3-9 points of the copy below the same launch named ``columns`` on the Llama block, in two runs.
    # ``triton_last``: the default timed again after the others, to show whether the order still counts.
    if device.type == "cuda":  # on CPU (--smoke) the order means nothing
        for fn in providers.values():
            for _ in range(3):
                fn()
    ms = {name: time_ms(fn, device, warmup=10, rep=50) for name, fn in providers.items()}
    ms["triton_last"] = time_ms(call, device, warmup=10, rep=50)
    reps = 50 if device.type == "cuda" else 1
    host = {
        "host_us": host_us(call, device, reps=reps),
        # The call's two halves: checks and tables (plan_tied_grad_reduce), then the launch.
        "plan_us": host_us(lambda: tg.plan_tied_grad_reduce(contributions, grads), device, reps=reps),
        "run_us": host_us(plan.run, device, reps=reps),
        # the same launch through Triton's dispatch, which a call skips once the compiled kernel's launcher is kept
        "dispatch_us": host_us(lambda: plan.spec(plan.partials, dispatch=True), device, reps=reps),
    }
    return ms, host


def host_us(fn, device: torch.device, reps: int = 50) -> float:
    """Median microseconds the host spends in one call, the GPU's queue empty (see the module docstring)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def host_rows(tg, device: torch.device, dtype: torch.dtype, units: list[int], reps: int = 7,
              calls: int = 400) -> list[dict]:
    """Microseconds ``plan_tied_grad_reduce`` takes for the llama block's nine tensors (checks and launch tables,
    the part of a call that grows with the number of tensors): per K, the median of ``reps`` means of ``calls``."""
    rows = []
    for K in units:
        contributions, grads = block_buffers(device, dtype, K)
        tg.plan_tied_grad_reduce(contributions, grads)  # the address tables' cache, as in a repeated call
        means = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(calls):
                tg.plan_tied_grad_reduce(contributions, grads)
            means.append((time.perf_counter() - start) / calls * 1e6)
        rows.append(dict(K=K, case="llama-block", tensors=len(grads) * (K + 1), plan_us=statistics.median(means)))
    return rows


def block_buffers(device: torch.device, dtype: torch.dtype, K: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The Llama block's K contributions and grads per tensor, zeros: for the host's timings, whose values do not
    matter."""
    shapes = shapes_for("llama-block", 0, 0)
    return ([[torch.zeros(s, device=device, dtype=dtype) for _ in range(K)] for s in shapes],
            [torch.zeros(s, device=device, dtype=dtype) for s in shapes])


def host_profile(tg, device: torch.device, dtype: torch.dtype, K: int = 2, calls: int = 400, top: int = 15) -> list[dict]:
    """The Llama block's call at K units under cProfile: the ``top`` functions by their own time, per call.

    On CUDA the whole default call (checks, tables, the launch), synchronised after each
    so that no call waits on the GPU's queue; on CPU ``plan_tied_grad_reduce`` (the interpreter's launch
    would drown it)."""
    contributions, grads = block_buffers(device, dtype, K)
    if device.type == "cuda":
        call = lambda: tg.tied_grad_reduce(contributions, grads, backend="triton")  # noqa: E731
    else:
        call = lambda: tg.plan_tied_grad_reduce(contributions, grads)  # noqa: E731
    for _ in range(10):  # compiled, tables cached: the steady state a training run sees
        call()
    profile = cProfile.Profile()
    for _ in range(calls):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        profile.enable()
        call()
        profile.disable()
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = [dict(function=f"{Path(file).name}:{line}({name})", calls_per_call=n / calls,
                 own_us=own / calls * 1e6, cum_us=cum / calls * 1e6)
            for (file, line, name), (_, n, own, cum, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def print_profile(rows: list[dict]) -> None:
    print(f"{'own us':>8} {'cum us':>8} {'calls':>6}  function (host profile, per call)")
    for r in rows:
        print(f"{r['own_us']:8.2f} {r['cum_us']:8.2f} {r['calls_per_call']:6.1f}  {r['function']}")


def print_table(rows: list[dict]) -> None:
    print(f"{'K':>3} {'case':>12} {'MB':>9} {'triton GB/s':>12} {'fixed GB/s':>11} {'fitted GB/s':>12} "
          f"{'columns GB/s':>13} {'torch GB/s':>11} {'copy GB/s':>10} {'of copy':>8} {'vs torch':>9} "
          f"{'fixed of copy':>14} {'fitted of copy':>15} {'columns of copy':>16} {'wide of copy':>13} "
          f"{'prepared of copy':>17} {'default last of copy':>21} {'host us':>8} {'plan us':>8} {'run us':>7} {'dispatch us':>12}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['K']:>3} {r['case']:>12} {r['size_mb']:>9.3g} {'skipped: ' + r['skipped']:>12}")
            continue
        print(f"{r['K']:>3} {r['case']:>12} {r['size_mb']:>9.3g} {r['triton_gbps']:>12.4g} {r['fixed_gbps']:>11.4g} "
              f"{r['fitted_gbps']:>12.4g} {r['columns_gbps']:>13.4g} {r['torch_gbps']:>11.4g} {r['copy_gbps']:>10.4g} "
              f"{r['of_copy']:>8.1%} {r['vs_torch']:>8.2f}x {r['fixed_of_copy']:>14.1%} {r['fitted_of_copy']:>15.1%} "
              f"{r['columns_of_copy']:>16.1%} {r['wide_of_copy']:>13.1%} {r['prepared_of_copy']:>17.1%} "
              f"{r['last_of_copy']:>21.1%} "
              f"{r['host_us']:>8.1f} {r['plan_us']:>8.1f} {r['run_us']:>7.1f} {r['dispatch_us']:>12.1f}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    units = sorted({r["K"] for r in rows})
    fig, axes = plt.subplots(1, len(units), figsize=(4.2 * len(units), 3.4), squeeze=False)
    for K, ax in zip(units, axes[0]):
        pts = sorted((r for r in rows if r["K"] == K and r["case"] == "tensor" and "skipped" not in r),
                     key=lambda r: r["size_mb"])
        for key in ("triton", *LAYOUTS, "prepared", "torch", "copy"):
            if pts:
                ax.plot([r["size_mb"] for r in pts], [r[f"{key}_gbps"] for r in pts], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_title(f"K={K}", fontsize=9)
        ax.set_xlabel("tensor size (MB)")
        ax.set_ylabel("GB/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.smoke or args.host):
        raise SystemExit("no CUDA device: the benchmark needs a GPU (use --smoke to check the script on CPU)")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    tg = import_kernels()
    dtype = DTYPES[args.dtype]
    rows, env = [], environment(device, args)
    profile_calls = 10 if args.smoke else 400
    if args.host:
        rows = host_rows(tg, device, dtype, [int(k) for k in args.units.split(",")], *((1, 2) if args.smoke else ()))
        profile = host_profile(tg, device, dtype, calls=profile_calls)
        write_results(args.json, env, rows, host_profile=profile)
        for r in rows:
            print(f"K={r['K']:>3}  {r['tensors']:>4} tensors  plan_tied_grad_reduce {r['plan_us']:8.1f} us")
        print_profile(profile)
        return
    for K in map(int, args.units.split(",")):
        cases = [("tensor", int(float(mb) * MB)) for mb in args.sizes_mb.split(",")]
        cases += [] if args.no_block else [("llama-block", 0)]
        for case, size in cases:
            rows.append(bench_case(tg, device, dtype, K, case, size))
            write_results(args.json, env, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    profile = host_profile(tg, device, dtype, calls=profile_calls)
    write_results(args.json, env, rows, host_profile=profile)
    print(f"# {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table(rows)
    print_profile(profile)
    if args.json:
        print(f"wrote {args.json}")
    if args.png:
        plot(rows, args.png, f"tied-grad reduction GB/s, {env['device']}, {env['dtype']}")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
