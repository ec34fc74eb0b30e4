"""TFLOP/s of the Triton flash attention against PyTorch SDPA's backends, side by side in one run.

    python bench/attention.py --json runs/bench/attention.json --png runs/bench/attention.png
    python bench/attention.py --smoke        # CPU, seconds: the code paths, not the speed

Providers: ``triton`` (megascale.kernels.attention), ``triton-tma`` (the same with the
forward reading and writing through TMA descriptors, ``tma=True``; Hopper), ``triton-ws`` (the TMA
kernels with a warp-specialised forward, ``ws=True``; 16-bit inputs), ``triton-gluon`` (the TMA kernels
with the forward in Gluon, FlashAttention-3's overlap of softmax and products, ``gluon=True``; Hopper,
16-bit, head dims 64 and 128), any of the four with ``-atomic`` appended (the backward as one kernel adding dQ by fp32 atomics, ``deterministic=False``;
by default ``triton-tma-atomic``, ``triton-ws-atomic`` and ``triton-gluon-atomic``, whose backward is
the Gluon one too) and SDPA restricted to each of
its backends in turn — ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient`` — so the
comparison is with the best PyTorch has on the device. A backend that refuses a
shape is recorded as unavailable with its error, not dropped silently.

FLOPs (as in the FlashAttention papers and Triton's tutorial): the forward does
two (T × T × D) matmuls per head, 4·B·H·T²·D FLOPs, halved when causal; the
backward does five, 2.5 × the forward; forward+backward is 3.5 × the forward.
Shapes keep B·T = --tokens constant and H = --model-dim / D, so every length
does the same projection work and only attention's T² grows.

--overhead adds two figures to each row: the host's time per call (the calls only enqueued, the GPU left to
run behind them) and the call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: no host work,
no L2 flush between calls). A call whose host time exceeds its kernels' leaves the GPU idle, and ``ms`` counts it;
``graph_ms`` does not. That is what separates a host-bound gap (the fourth H200 session's forward+backward at 4k
took ~150 us more than its forward and backward timed apart, cuDNN's ~70 us) from one in the kernels.

--smoke runs on CPU: a tiny shape through the naive reference, SDPA's math
backend and the Triton kernel under TRITON_INTERPRET=1, to prove the script works
where no GPU is present. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from _common import checkout_kernels, environment, time_ms, write_results

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # × the forward's FLOPs
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--png", type=Path, help="plot TFLOP/s against sequence length here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through every code path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--causal", default="true,false", help="which of true,false to run")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tokens", type=int, default=16384, help="B·T per shape (B = tokens / T, at least 1)")
    p.add_argument("--model-dim", type=int, default=2048, help="H = model_dim / head_dim query heads")
    p.add_argument("--kv-group", type=int, default=1, help="query heads per KV head (1: MHA)")
    p.add_argument("--overhead", action="store_true",
                   help="also record each call's host time and its time replayed from a CUDA graph")
    p.add_argument("--providers", default="triton,triton-tma,triton-ws,triton-gluon,triton-tma-atomic,triton-ws-atomic,"
                                          "triton-gluon-atomic,sdpa-flash,sdpa-cudnn,sdpa-efficient")
    args = p.parse_args(argv)
    if args.smoke:
        args.head_dims, args.lengths, args.tokens, args.model_dim = "32", "24", 48, 64  # B = 2; T not a multiple of 16
        args.dtype = "fp32"
        args.providers = "triton,triton-tma,triton-ws,triton-atomic,triton-tma-atomic,reference,sdpa-math"
    return args


def import_kernels():
    (attention,) = checkout_kernels("attention")
    return attention


def sdpa(backend_name: str):
    """SDPA restricted to one backend (GQA broadcast by SDPA itself)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
    }[backend_name]

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            gqa = q.shape[1] != k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


TRITON_VARIANTS = {"triton": {}, "triton-tma": {"tma": True}, "triton-ws": {"ws": True}, "triton-gluon": {"gluon": True}}


def provider_fn(name: str, kernels):
    variant = name.removesuffix("-atomic")
    if variant in TRITON_VARIANTS:  # "-atomic": the one-kernel backward, dQ by atomics (deterministic=False)
        opts = {**TRITON_VARIANTS[variant], **({"deterministic": False} if name.endswith("-atomic") else {})}
        return lambda q, k, v, causal: kernels.flash_attention(q, k, v, causal=causal, **opts)
    if name == "reference":
        return lambda q, k, v, causal: kernels.attention_reference(q, k, v, causal=causal)
    if name.startswith("sdpa-"):
        return sdpa(name.removeprefix("sdpa-"))
    raise SystemExit(f"unknown provider {name}")


def make_case(fn, mode: str, q, k, v, do, causal: bool):
    """The callable to time for a mode; bwd times only the backward of a kept graph."""
    if mode == "fwd":
        return lambda: fn(q, k, v, causal)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
    out = fn(q, k, v, causal)
    return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)


def forward_flops(B: int, H: int, T: int, D: int, causal: bool) -> float:
    return 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)


def host_ms(case, device: torch.device) -> float:
    """Milliseconds of host time per call of ``case`` with the device queue left to run: the calls are only
    enqueued (nothing synchronises between them), so this is the Python and launch work alone, unless the call
    itself waits for the device (then it reads as the device's time: a hidden synchronisation shows here).
    On CPU (--smoke) one call, its whole time: the interpreter's calls are slow and the figure means nothing."""
    cuda = device.type == "cuda"
    sync, calls = (torch.cuda.synchronize, 10) if cuda else ((lambda _: None), 1)
    sync(device)  # an empty queue to start from
    start = time.perf_counter()
    for _ in range(calls):
        case()
    elapsed = time.perf_counter() - start
    sync(device)
    return elapsed * 1e3 / calls


def call_overhead(case, device: torch.device) -> dict:
    """{"host_ms", "graph_ms"} of one provider's case (``--overhead``); graph_ms is None on CPU, and a failure (a
    backend that refuses graph capture) is its own ``overhead_error``, never the row's."""
    out = {"host_ms": None, "graph_ms": None, "overhead_error": None}
    try:
        out["host_ms"] = host_ms(case, device)
        if device.type == "cuda":
            import triton.testing  # noqa: PLC0415

            out["graph_ms"] = triton.testing.do_bench_cudagraph(case, rep=20)
    except Exception as e:  # noqa: BLE001 (a diagnostic: never costs the provider's figure)
        out["overhead_error"] = _first_line(e)
    return out


def bench_shape(providers, kernels, device, dtype, B, H, H_kv, T, D, causal, modes, overhead: bool = False) -> list[dict]:
    """Every provider and mode at one shape; the Triton output's error against the first working SDPA."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(B, H_kv, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    do = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)
    rows, outputs, cases = [], {}, []
    for name in providers:
        fn = provider_fn(name, kernels)
        try:
            with torch.no_grad():
                outputs[name] = fn(q, k, v, causal).float()
        except Exception as e:  # noqa: BLE001 (a backend refusing a shape is a result)
            rows += [dict(provider=name, mode=m, ms=None, tflops=None, error=_first_line(e)) for m in modes]
            continue
        for mode in modes:
            try:
                case = make_case(fn, mode, q, k, v, do, causal)
                ms = time_ms(case, device)
            except Exception as e:  # noqa: BLE001 (a backward failing where the forward ran: its own result)
                rows.append(dict(provider=name, mode=mode, ms=None, tflops=None, error=_first_line(e)))
                continue
            tflops = forward_flops(B, H, T, D, causal) * FLOP_FACTOR[mode] / (ms * 1e-3) / 1e12
            rows.append(dict(provider=name, mode=mode, ms=ms, tflops=tflops, error=None))
            cases.append((rows[-1], case))
    baseline = next((o for n, o in outputs.items() if not n.startswith("triton")), None)
    # each provider's forward against the first non-Triton one: a kernel never run on a GPU is checked here too
    errors = {n: float((o - baseline).abs().max()) for n, o in outputs.items()} if baseline is not None else {}
    shape = dict(B=B, H=H, H_kv=H_kv, T=T, D=D, causal=causal)
    tiles = chosen_tiles(kernels, D, causal, dtype, T)
    candidates = candidate_tflops(kernels, B, H, D, causal, dtype, T)
    phases = gluon_phases(kernels, q, k, v, do, causal, device)
    # Last, once every provider of the shape is timed: a CUDA graph capture that goes wrong costs only these figures.
    for row, case in cases if overhead else ():
        row.update(call_overhead(case, device))
    return [{**shape, **row, "triton_max_abs_err": errors.get("triton"), "max_abs_err": errors.get(row["provider"]),
             "tiles": tiles, "candidates": candidates, **({"gluon_phases": phases} if phases else {})} for row in rows]


def gluon_phases(kernels, q, k, v, do, causal: bool, device: torch.device) -> dict:
    """The Gluon kernels alone, timed as the providers are (same warm-up and repetitions, L2 flushed), with the tiles
    their tuner chose for this shape, and the backward's other passes (Δ, zeroing the fp32 dQ buffer, dQ's scale and
    rounding): what separates a provider's call from its kernel. {} where no Gluon provider ran; {"error": ...} if a
    timing fails (the providers' rows are kept either way).

    The tuner's own timings (``candidates``) are short bursts on the first call of a shape: on the fourth H200
    session the forward's was 9-11% above the provider's at 4k-16k, which the call's host work alone cannot
    explain at 16k (195 us a call). These are timed like the call, so the difference is the call's."""
    gluon = sys.modules.get(kernels.__name__ + "_gluon")
    B, H, T, D = q.shape
    tuned = dict(_tuned_here(kernels, gluon, "_TUNED", D, causal, q.dtype, T)) if gluon else {}
    if "fwd" not in tuned:
        return {}
    scale = D ** -0.5
    flops = forward_flops(B, H, T, D, causal)
    try:
        with torch.no_grad():
            q, k, v, do = (x.detach() for x in (q, k, v, do))
            o, lse = kernels._forward(q, k, v, causal, scale, gluon=True)
            o2, lse2 = torch.empty_like(o), torch.empty_like(lse)
            fwd_ms = time_ms(lambda: gluon._launch(q, k, v, o2, lse2, causal, scale * kernels.LOG2E, tuned["fwd"]),
                             device)
            out = {"fwd_kernel_ms": fwd_ms, "fwd_kernel_tflops": flops / (fwd_ms * 1e-3) / 1e12}
            if "bwd" not in tuned:
                return out
            delta = kernels._delta(o, do, lse)
            dq_acc, dq = torch.zeros((B, H, T, D), device=device, dtype=torch.float32), torch.empty_like(q)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            bwd_ms = time_ms(lambda: gluon._launch_bwd(q, k, v, do, lse, delta, dq_acc, dk, dv, causal,
                                                       scale * kernels.LOG2E, scale, tuned["bwd"]), device)

            def passes():  # as kernels._backward runs them around the Gluon backward
                acc = torch.empty((B, H, T, D), device=device, dtype=torch.float32)
                kernels._delta(o, do, lse, acc)  # Δ, and the buffer's zeros
                kernels._dq_cast(acc, dq, scale)

            passes_ms = time_ms(passes, device)
        out.update(bwd_kernel_ms=bwd_ms, bwd_kernel_tflops=2.5 * flops / (bwd_ms * 1e-3) / 1e12, bwd_passes_ms=passes_ms)
    except Exception as e:  # noqa: BLE001 (a diagnostic: never costs the providers' figures)
        return {"error": _first_line(e)}
    try:
        with torch.no_grad():
            return {**out, **backward_passes(kernels, o, do, lse, dq_acc, dq, scale, device)}
    except Exception as e:  # noqa: BLE001 (nor the kernels' own, timed above)
        return {**out, "bwd_pass_error": _first_line(e)}


def backward_passes(kernels, o, do, lse, dq_acc, dq, scale: float, device: torch.device) -> dict:
    """The passes around the one-kernel backward one by one, timed as the providers are, and the bandwidth each
    reaches by the bytes it must move: which one falls short of the copy. ``delta_zero`` and ``dq_cast`` are what
    ``kernels._backward`` runs (Δ and the fp32 dQ buffer's zeros in one pass, dQ's scale and rounding in Triton);
    ``delta``, ``zero`` (torch.zeros) and ``dq_cast_torch`` (PyTorch's mixed-dtype mul, fp32 in, q's dtype out) what
    it ran until 2026-11-28."""
    B, H, T, D = o.shape
    n, size = B * H * T * D, o.element_size()
    delta_bytes = 2 * n * size + B * H * T * 4
    each = {"delta_zero": (lambda: kernels._delta(o, do, lse, dq_acc), delta_bytes + 4 * n),
            "dq_cast": (lambda: kernels._dq_cast(dq_acc, dq, scale), 4 * n + n * size),
            "delta": (lambda: kernels._delta(o, do, lse), delta_bytes),
            "zero": (lambda: torch.zeros((B, H, T, D), device=device, dtype=torch.float32), 4 * n),
            "dq_cast_torch": (lambda: torch.mul(dq_acc, scale, out=dq), 4 * n + n * size)}
    pass_ms = {name: time_ms(run, device) for name, (run, _) in each.items()}
    return {"bwd_pass_ms": pass_ms,
            "bwd_pass_gbps": {name: each[name][1] / (ms * 1e-3) / 1e9 for name, ms in pass_ms.items()}}


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def chosen_tiles(kernels, D: int, causal: bool, dtype: torch.dtype, T: int) -> dict[str, str]:
    """The tiles the Gluon kernels' ``best_tile`` settled on for this shape (none: no Gluon provider ran): which of
    their candidates wins is what a first GPU run of them has to tell."""
    gluon = sys.modules.get(kernels.__name__ + "_gluon")  # imported only when a Gluon provider ran
    return {f"gluon_{kind}": gluon.describe_tile(tile)
            for kind, tile in _tuned_here(kernels, gluon, "_TUNED", D, causal, dtype, T)}


def _tuned_here(kernels, gluon, table: str, D: int, causal: bool, dtype: torch.dtype, T: int):
    """(kernel kind, value) of the Gluon tuners' ``table`` (_TUNED, _TIMES: keyed by kind, head dim, mask, dtype,
    length bucket, device) for this shape; none when the Gluon module was not imported."""
    for (kind, d, c, dt, bucket, _), value in (getattr(gluon, table, None) or {}).items():
        if (d, c, dt, bucket) == (D, causal, dtype, kernels.next_pow2(T)):
            yield kind, value


def candidate_tflops(kernels, B: int, H: int, D: int, causal: bool, dtype: torch.dtype, T: int) -> dict[str, dict]:
    """Every Gluon candidate's TFLOP/s as the tuner timed it on this shape ({"gluon_fwd": {tile: TFLOP/s}, ...}; the
    backward's over its 2.5x FLOPs): how close the ones that lost came, which one run of the tuner tells."""
    gluon = sys.modules.get(kernels.__name__ + "_gluon")
    flops = forward_flops(B, H, T, D, causal)
    return {f"gluon_{kind}": {gluon.describe_tile(tile): flops * FLOP_FACTOR[kind] / (ms * 1e-3) / 1e12
                              for tile, ms in times.items()}
            for kind, times in _tuned_here(kernels, gluon, "_TIMES", D, causal, dtype, T)}


def print_table(rows: list[dict], providers: list[str], modes: list[str]) -> None:
    """One line per shape and mode: TFLOP/s per provider, and the best Triton variant over the best SDPA backend."""
    header = f"{'D':>4} {'causal':>6} {'T':>6} {'B':>4} {'mode':>8} " + " ".join(f"{p:>15}" for p in providers)
    print(header + f" {'triton/best':>12}")
    keys = sorted({(r["D"], r["causal"], r["T"], r["B"], r["mode"]) for r in rows},
                  key=lambda x: (x[0], not x[1], x[2], modes.index(x[4])))
    for D, causal, T, B, mode in keys:
        got = {r["provider"]: r["tflops"] for r in rows if (r["D"], r["causal"], r["T"], r["B"], r["mode"]) == (D, causal, T, B, mode)}
        cells = " ".join(f"{got[p]:15.4g}" if got.get(p) is not None else f"{'n/a':>15}" for p in providers)
        others = [t for p, t in got.items() if not p.startswith("triton") and t is not None]
        ours = max((t for p, t in got.items() if p.startswith("triton") and t is not None), default=None)
        ratio = f"{ours / max(others):12.2f}" if ours and others else f"{'':>12}"
        print(f"{D:>4} {str(causal):>6} {T:>6} {B:>4} {mode:>8} {cells}{ratio}")
    failed: dict[tuple, list[str]] = {}  # the modes of each (provider, shape, error): refused, or only its backward
    for r in rows:
        if r["error"]:
            failed.setdefault((r["provider"], r["D"], r["T"], r["causal"], r["error"]), []).append(r["mode"])
    for (provider, D, T, causal, error), failed_modes in failed.items():
        print(f"  unavailable: {provider} ({', '.join(failed_modes)}) at D={D} T={T} causal={causal}: {error}")


def plot(rows: list[dict], providers: list[str], modes: list[str], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = sorted({(r["D"], r["causal"]) for r in rows}, key=lambda x: (x[0], not x[1]))
    fig, axes = plt.subplots(len(panels), len(modes), figsize=(4.5 * len(modes), 3.2 * len(panels)), squeeze=False)
    for (D, causal), row_axes in zip(panels, axes):
        for mode, ax in zip(modes, row_axes):
            for p in providers:
                pts = sorted((r["T"], r["tflops"]) for r in rows if (r["D"], r["causal"], r["mode"], r["provider"]) == (D, causal, mode, p) and r["tflops"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D} {'causal' if causal else 'full'} {mode}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: the benchmark needs a GPU (use --smoke to check the script on CPU)")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    kernels = import_kernels()
    providers, modes = args.providers.split(","), args.modes.split(",")
    causals = [c.strip().lower() == "true" for c in args.causal.split(",")]
    rows, env = [], environment(device, args)
    for D in map(int, args.head_dims.split(",")):
        H = max(1, args.model_dim // D)
        for causal in causals:
            for T in map(int, args.lengths.split(",")):
                B = max(1, args.tokens // T)
                rows += bench_shape(providers, kernels, device, DTYPES[args.dtype], B, H, max(1, H // args.kv_group), T, D,
                                    causal, modes, args.overhead)
                write_results(args.json, env, rows)
    print(f"# {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table(rows, providers, modes)
    if args.json:
        print(f"wrote {args.json}")
    if args.png:
        plot(rows, providers, modes, args.png, f"attention TFLOP/s, {env['device']}, {env['dtype']}")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
