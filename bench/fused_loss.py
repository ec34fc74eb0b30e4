"""Peak memory and time of the LM head + cross-entropy: plain (full logits) against fused and chunked.

    python bench/fused_loss.py --json runs/bench/fused_loss.json --png docs/fused_loss.png
    python bench/fused_loss.py --smoke        # seconds: the code paths, not the figures

One measurement = forward and backward of the head and loss on N tokens (hidden
size D, vocabulary V), in a fresh process so each peak is its own:

* ``plain``: ``lm_head(x)`` then ``F.cross_entropy`` on the (N, V) logits, as the
  model does with ``train.fused_loss=false``;
* ``fused``: ``megascale.model.head_loss.linear_cross_entropy`` (the default), its
  row-wise steps in PyTorch;
* ``fused-triton``: the same with ``backend="triton"`` (``model.fused_ops=triton``):
  those steps as two kernels over the logits in their own dtype (CUDA only).

``--chunk-tokens 0,4096,...`` measures each fused mode at each chunk size (0 = the
automatic size the trainer uses): fewer chunks mean fewer passes over the fp32
head gradient, more memory per chunk.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU
the process's peak resident set (ru_maxrss) above the resident set once the
inputs exist — coarser (the allocator may keep or return pages) but it sees
every byte the step touched. Time: median of ``--repeats`` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("plain", "fused", "fused-triton")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--png", type=Path, help="plot peak memory and time against tokens")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat")
    p.add_argument("--tokens", default="1024,2048,4096,8192", help="tokens per micro-batch, comma-separated")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="", help=f"comma-separated among {', '.join(MODES)} (default: fused-triton "
                   "only with CUDA)")
    p.add_argument("--chunk-tokens", default="0", help="tokens per chunk of the fused modes, comma-separated; 0 = auto")
    p.add_argument("--one", nargs=3, metavar=("MODE", "TOKENS", "CHUNK"), help=argparse.SUPPRESS)  # a child
    args = p.parse_args(argv)
    args.mode_list = [m for m in (args.modes.split(",") if args.modes else MODES)
                      if args.modes or m != "fused-triton" or torch.cuda.is_available()]
    unknown = set(args.mode_list) - set(MODES)
    if unknown:
        p.error(f"--modes: {', '.join(sorted(unknown))} not among {', '.join(MODES)}")
    if args.smoke:
        args.tokens, args.d_model, args.vocab, args.repeats = "128,256", 64, 1000, 1
    return args


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(mode: str, n: int, chunk: int, args) -> dict:
    """One child: build the inputs, run warm-up + repeats of forward/backward, report peak and median time."""
    from megascale.model.head_loss import linear_cross_entropy  # noqa: PLC0415

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, args.d_model, generator=gen, device=device).to(dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.d_model, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (n,), generator=gen, device=device)

    def step():
        if mode == "plain":
            loss = F.cross_entropy(F.linear(x, w).float(), t)
        else:
            loss = linear_cross_entropy(x, w, t, chunk_tokens=chunk, backend="triton" if mode == "fused-triton" else "torch")
        loss.backward()
        x.grad = w.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_peak_bytes()
    times = []
    for _ in range(1 + args.repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak_bytes()
    return {"mode": mode, "tokens": n, "chunk_tokens": chunk, "peak_bytes": peak - base,
            "step_s": statistics.median(times[1:])}


def run_child(mode: str, n: int, chunk: int, args) -> dict:
    cmd = [sys.executable, __file__, "--one", mode, str(n), str(chunk), "--d-model", str(args.d_model),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (mem, tim) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys(label(r) for r in rows):
        pts = [r for r in rows if label(r) == key]
        mem.plot([r["tokens"] for r in pts], [r["peak_bytes"] / 2**20 for r in pts], marker="o", label=key)
        tim.plot([r["tokens"] for r in pts], [r["step_s"] * 1e3 for r in pts], marker="o", label=key)
    mem.set(xlabel="tokens per micro-batch", ylabel="peak memory above inputs (MiB)", title="memory")
    tim.set(xlabel="tokens per micro-batch", ylabel="forward + backward (ms)", title="time")
    for ax in (mem, tim):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(row: dict) -> str:
    """'plain', or the fused mode with its chunk size ('fused', 'fused-triton/8192')."""
    return row["mode"] if row["mode"] == "plain" or not row["chunk_tokens"] else f"{row['mode']}/{row['chunk_tokens']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args)))
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    chunks = [int(c) for c in args.chunk_tokens.split(",")]
    rows = [run_child(mode, int(n), chunk, args) for n in args.tokens.split(",") for mode in args.mode_list
            for chunk in ([0] if mode == "plain" else chunks)]
    print(f"LM head + cross-entropy, D={args.d_model}, V={args.vocab}, {args.dtype}, {device}")
    print(f"{'tokens':>7} {'mode':>20} {'peak MiB':>9} {'ms':>8}")
    for r in rows:
        print(f"{r['tokens']:>7} {label(r):>20} {r['peak_bytes'] / 2**20:9.0f} {r['step_s'] * 1e3:8.1f}")
    result = {"device": device, "date": dt.date.today().isoformat(), "d_model": args.d_model, "vocab": args.vocab,
              "dtype": args.dtype, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.png:
        plot(rows, args.png, f"LM head + loss: D={args.d_model}, V={args.vocab}, {args.dtype}, {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
