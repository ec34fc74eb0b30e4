"""GB/s of the fused RMSNorm, SwiGLU and RoPE kernels against the PyTorch reference and torch.compile of it.

    python bench/fused_ops.py --out runs/bench/fused_ops.json
    python bench/fused_ops.py --smoke --out /tmp/fused_ops.json   # CPU, seconds: the code paths, not the speed

A GPU benchmark: without CUDA it refuses (``--smoke`` excepted). Providers, side
by side in one run at each shape:

* ``triton``: megascale.kernels.{rmsnorm, swiglu, rope};
* ``torch``: the op's PyTorch reference in eager mode (the model's own code);
* ``compile``: ``torch.compile`` of that reference (Inductor's fused kernels).

Modes: ``fwd`` and ``fwd+bwd`` (forward, then the input gradients for a random
upstream gradient); the forward is timed with autograd recording, as in
training. Bandwidth counts the bytes each op must move at least, the same for
every provider (e: element size; tables and the weight are counted
once per pass):

* rmsnorm (M × N): fwd reads x and writes y, 2·M·N·e; fwd+bwd adds reading x
  and dy and writing dx, 5·M·N·e in all;
* swiglu (n elements): fwd reads gate, up and writes y, 3·n·e; fwd+bwd adds
  reading gate, up, dy and writing dgate, dup, 8·n·e in all;
* rope (B, H, T, hd): fwd reads x and writes y, 2·n·e; fwd+bwd 4·n·e, plus the
  fp32 cos/sin tables per pass.

Shapes are Llama's: tokens 8192 and 16384; RMSNorm over hidden 2048 and 4096;
SwiGLU at FFN width 5632 and 11008; RoPE on the query heads of hidden 2048 and
4096 with head dim 128 (B = tokens / --seq-len sequences), x a transposed view
of (B, T, H, hd) as the model passes it, (T, hd) fp32 tables.

--smoke runs on CPU: tiny shapes through the Triton kernels under
TRITON_INTERPRET=1 and the eager reference, to prove the script works where no
GPU is present. Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import checkout_kernels, environment, time_ms, write_results

OPS = ("rmsnorm", "swiglu", "rope")
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("triton", "torch", "compile")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIM = 128
EPS = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results (JSON, with device and date) here")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run through every code path")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--providers", help=f"default {','.join(PROVIDERS)}; triton,torch with --smoke")
    p.add_argument("--tokens", default="8192,16384", help="rows (B·T) per shape")
    p.add_argument("--hidden", default="2048,4096", help="RMSNorm width; RoPE heads = hidden / 128")
    p.add_argument("--ffn", default="5632,11008", help="SwiGLU width")
    p.add_argument("--seq-len", type=int, default=4096, help="RoPE sequence length T (B = tokens / T)")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.ffn, args.seq_len = "33", "256", "200", 11
        args.providers = args.providers or "triton,torch"  # compiling on CPU takes a minute
    args.providers = args.providers or ",".join(PROVIDERS)
    return args


def import_kernels():
    rmsnorm, rope, swiglu = checkout_kernels("rmsnorm", "rope", "swiglu")
    return {"rmsnorm": rmsnorm, "swiglu": swiglu, "rope": rope}


# ---------------------------------------------------------------------------
# Cases: inputs, the three providers' functions, bytes moved
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One op at one shape."""

    op: str
    shape: dict  # what the table and JSON show: tokens, width (and B, H, T, hd for rope)
    inputs: list[torch.Tensor]  # differentiable inputs, the gradients taken in fwd+bwd
    extras: tuple  # constant arguments after the inputs (rope's cos, sin)
    dy: torch.Tensor  # upstream gradient
    bytes_moved: dict[str, int]  # per mode, the same for every provider
    fns: dict  # "triton" and "torch" (the reference) callables


def _randn(shape, device, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, device=device, generator=gen, dtype=torch.float32).to(dtype)


def rmsnorm_case(k, device, dtype, tokens: int, hidden: int, gen) -> Case:
    x = _randn((tokens, hidden), device, dtype, gen).requires_grad_()
    w = (1 + 0.1 * _randn((hidden,), device, torch.float32, gen)).to(dtype).requires_grad_()
    e, n = x.element_size(), tokens * hidden
    moved = {"fwd": 2 * n * e + hidden * e, "fwd+bwd": 5 * n * e + 3 * hidden * e}
    fns = {"triton": lambda x, w: k.rms_norm(x, w, EPS), "torch": lambda x, w: k.rms_norm_reference(x, w, EPS)}
    return Case("rmsnorm", dict(tokens=tokens, width=hidden), [x, w], (), _randn((tokens, hidden), device, dtype, gen),
                moved, fns)


def swiglu_case(k, device, dtype, tokens: int, ffn: int, gen) -> Case:
    gate = _randn((tokens, ffn), device, dtype, gen).requires_grad_()
    up = _randn((tokens, ffn), device, dtype, gen).requires_grad_()
    e, n = gate.element_size(), tokens * ffn
    fns = {"triton": k.swiglu, "torch": k.swiglu_reference}
    return Case("swiglu", dict(tokens=tokens, width=ffn), [gate, up], (), _randn((tokens, ffn), device, dtype, gen),
                {"fwd": 3 * n * e, "fwd+bwd": 8 * n * e}, fns)


def rope_case(k, device, dtype, tokens: int, hidden: int, seq_len: int, gen) -> Case:
    T = min(seq_len, tokens)
    B, H = max(1, tokens // T), max(1, hidden // HEAD_DIM)
    x = _randn((B, T, H, HEAD_DIM), device, dtype, gen).transpose(1, 2).requires_grad_()  # (B, H, T, hd) view
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device, dtype=torch.float32) / HEAD_DIM))
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), as megascale.model.llama.rope_tables
    cos, sin = emb.cos(), emb.sin()
    e, n, tables = x.element_size(), x.numel(), 2 * cos.numel() * 4
    fns = {"triton": k.apply_rope, "torch": k.apply_rope_reference}
    return Case("rope", dict(tokens=B * T, width=hidden, B=B, H=H, T=T, hd=HEAD_DIM), [x], (cos, sin),
                _randn((B, H, T, HEAD_DIM), device, dtype, gen),
                {"fwd": 2 * n * e + tables, "fwd+bwd": 4 * n * e + 2 * tables}, fns)


def cases(args, kernels, device, dtype):
    """Every (op, shape) case, built lazily: one case's tensors live at a time."""
    gen = torch.Generator(device=device).manual_seed(0)
    ops = args.ops.split(",")
    for tokens in map(int, args.tokens.split(",")):
        for hidden in map(int, args.hidden.split(",")):
            if "rmsnorm" in ops:
                yield lambda t=tokens, h=hidden: rmsnorm_case(kernels["rmsnorm"], device, dtype, t, h, gen)
            if "rope" in ops:
                yield lambda t=tokens, h=hidden: rope_case(kernels["rope"], device, dtype, t, h, args.seq_len, gen)
        if "swiglu" in ops:
            for ffn in map(int, args.ffn.split(",")):
                yield lambda t=tokens, f=ffn: swiglu_case(kernels["swiglu"], device, dtype, t, f, gen)


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------


def provider_fn(case: Case, name: str):
    if name == "compile":
        return torch.compile(case.fns["torch"], dynamic=False)
    return case.fns[name]


def make_call(fn, case: Case, mode: str):
    if mode == "fwd":
        return lambda: fn(*case.inputs, *case.extras)
    return lambda: torch.autograd.grad(fn(*case.inputs, *case.extras), case.inputs, case.dy)


def bench_case(case: Case, providers: list[str], modes: list[str], device) -> list[dict]:
    """Every provider and mode at one case; the Triton output's largest deviation from the eager reference."""
    rows, outputs = [], {}
    for name in providers:
        try:
            fn = provider_fn(case, name)
            with torch.no_grad():
                outputs[name] = fn(*case.inputs, *case.extras).float()  # also compiles / warms up
            make_call(fn, case, modes[-1])()  # the backward's compilation, outside the timing
        except Exception as e:  # noqa: BLE001 (a provider refusing a shape is a result)
            rows += [dict(provider=name, mode=m, ms=None, gbps=None, error=str(e).splitlines()[0][:160]) for m in modes]
            continue
        for mode in modes:
            ms = time_ms(make_call(fn, case, mode), device)
            gbps = case.bytes_moved[mode] / (ms * 1e-3) / 1e9
            rows.append(dict(provider=name, mode=mode, ms=ms, gbps=gbps, error=None))
    err = None
    if "triton" in outputs and "torch" in outputs:
        err = float((outputs["triton"] - outputs["torch"]).abs().max())
    base = dict(op=case.op, **case.shape)
    return [{**base, **row, "bytes": case.bytes_moved[row["mode"]], "triton_max_abs_err": err} for row in rows]


def print_table(rows: list[dict], providers: list[str], modes: list[str]) -> None:
    """One line per case and mode: ms and GB/s per provider, then Triton's speed-up over each other provider."""
    others = [p for p in providers if p != "triton"]
    cols = " ".join(f"{p + ' ms':>11} {p + ' GB/s':>12}" for p in providers)
    head = f"{'op':>8} {'tokens':>6} {'width':>6} {'mode':>8} " + cols
    print(head + "".join(f" {'vs ' + p:>10}" for p in others if "triton" in providers))
    keys = list(dict.fromkeys((r["op"], r["tokens"], r["width"], r["mode"]) for r in rows))
    for key in keys:
        got = {r["provider"]: r for r in rows if (r["op"], r["tokens"], r["width"], r["mode"]) == key}
        cells = []
        for p in providers:
            r = got.get(p)
            cells.append(f"{r['ms']:11.4g} {r['gbps']:12.4g}" if r and r["ms"] else f"{'n/a':>11} {'n/a':>12}")
        ratios = ""
        if "triton" in providers:
            for p in others:
                t, o = got.get("triton"), got.get(p)
                ratios += f" {o['ms'] / t['ms']:9.2f}x" if t and o and t["ms"] and o["ms"] else f" {'':>10}"
        print(f"{key[0]:>8} {key[1]:>6} {key[2]:>6} {key[3]:>8} " + " ".join(cells) + ratios)
    for r in rows:
        if r["error"] and r["mode"] == modes[0]:
            print(f"  unavailable: {r['provider']} for {r['op']} {r['tokens']}x{r['width']}: {r['error']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no CUDA device: bench/fused_ops.py is a GPU benchmark (--smoke checks the script on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    kernels = import_kernels()
    providers, modes = args.providers.split(","), args.modes.split(",")
    rows, env = [], environment(device, args)
    for build in cases(args, kernels, device, DTYPES[args.dtype]):
        rows += bench_case(build(), providers, modes, device)
        write_results(args.out, env, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"# {env['device']}, {env['dtype']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table(rows, providers, modes)
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
