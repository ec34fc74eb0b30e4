"""How the tied-gradient reduction kernel compiles for a Hopper GPU, on a machine without one.

    python bench/kernel_layout.py                                   # bf16, K = 2..32, both warp policies
    python bench/kernel_layout.py --units 4 --dtype fp32 --warps fitted

Triton compiles for a named target without a device: this prints, per (K, warp
policy), the tile (K_PAD, BLOCK), the warps per program, the layout Triton gave
the 2-D tile of contributions (``warpsPerCTA [a, b]``: a > 1 means the sum over
units crosses warps, through shared memory, on every tile), and ``ptxas -v``'s
registers and spill bytes for sm_90a. It reads no timing: what it shows is what
the compiler decided, the first thing to look at before a GPU session measures.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkout_kernels  # noqa: E402

DTYPES = {"bf16": (tl.bfloat16, 2), "fp32": (tl.float32, 4)}
SIGNATURE = {"CONTRIB_PTRS": "*i64", "GRAD_PTRS": "*i64", "NUMEL": "*i64", "CHUNK_TENSOR": "*i64", "CHUNK_START": "*i64",
             "PARTIALS": "*fp32", "n_units": "i32", "chunk_size": "i32", "C_TYPE": "constexpr", "G_TYPE": "constexpr",
             "K_PAD": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}


def ptxas() -> str:
    """The newest ptxas Triton ships (its PTX may be newer than the older one's)."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(next(p for p in (folder / "ptxas-blackwell", folder / "ptxas") if p.exists()))


def compile_reduce(tg, k_pad: int, block: int, num_warps: int, dtype: str, arch: int):
    consts = {"C_TYPE": DTYPES[dtype][0], "G_TYPE": tl.float32, "K_PAD": k_pad, "BLOCK": block, "ALIGNED": True}
    src = ASTSource(fn=tg._reduce_kernel, signature=SIGNATURE, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def tile_layout(ttgir: str, k_pad: int) -> str:
    """warpsPerCTA of the 2-D blocked layouts (the tile of contributions), as '[a, b]'."""
    found = re.findall(r"#ttg\.blocked<\{[^}]*warpsPerCTA = (\[\d+, \d+\])[^}]*\}>", ttgir)
    return " ".join(dict.fromkeys(found)) or "?"


def registers(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([ptxas(), f"-arch=sm_{arch}a", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode:
        return "ptxas failed: " + out.stderr.strip().splitlines()[-1]
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} bytes spilled"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", default="2,4,8,16,32", help="values of K")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the contributions' dtype")
    p.add_argument("--warps", default="fixed,fitted", help="warp policies of tied_grad_reduce")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    args = p.parse_args(argv)
    (tg,) = checkout_kernels("tied_grad")
    print(f"tied-gradient reduction, {args.dtype} contributions, sm_{args.arch}a, Triton {triton.__version__}")
    print(f"{'K':>3} {'warps':>7} {'K_PAD x BLOCK':>14} {'num_warps':>9}  {'tile warpsPerCTA':<18} ptxas")
    for k in (int(u) for u in args.units.split(",")):
        k_pad = triton.next_power_of_2(k)
        block = max(256, tg._TILE_VALUES // k_pad)
        for policy in args.warps.split(","):
            warps = tg._num_warps(block, DTYPES[args.dtype][1], policy)
            kernel = compile_reduce(tg, k_pad, block, warps, args.dtype, args.arch)
            print(f"{k:>3} {policy:>7} {f'{k_pad} x {block}':>14} {warps:>9}  {tile_layout(kernel.asm['ttgir'], k_pad):<18} "
                  f"{registers(kernel.asm['ptx'], args.arch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
