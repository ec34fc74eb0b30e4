"""How the tied-gradient reduction kernel compiles for a Hopper GPU, on a machine without one.

    python bench/kernel_layout.py                                   # bf16, K = 2..32, every layout
    python bench/kernel_layout.py --units 4,24 --dtype fp32 --layouts columns

Triton compiles for a named target without a device: this prints, per (K,
layout), the tile, the warps per program, the layout Triton gave the tile of
contributions (``warpsPerCTA [a, b, ...]``: a > 1 means the sum over units
crosses warps), what the main loop does besides loading (``bar.sync`` and
``shfl`` in it: exchanges between threads on every tile; vector width of its
loads), and ``ptxas -v``'s registers and spill bytes for sm_90a. It reads no
timing: what it shows is what the compiler decided, the first thing to look at
before a GPU session measures.
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
TABLES = {"CONTRIB_PTRS": "*i64", "GRAD_PTRS": "*i64", "NUMEL": "*i64", "FIRST_PROGRAM": "*i64", "COUNTERS": "*i64",
          "PARTIALS": "*fp32",
          "n_tensors": "i32", "group_size": "i32", "N_UNITS": "constexpr", "C_TYPE": "constexpr", "G_TYPE": "constexpr",
          "K_PAD": "constexpr", "T_PAD": "constexpr", "ALIGNED": "constexpr", "ROWS": "constexpr"}
T_PAD = 16  # a Llama block's nine tensors


def ptxas() -> str:
    """The newest ptxas Triton ships (its PTX may be newer than the older one's)."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(next(p for p in (folder / "ptxas-blackwell", folder / "ptxas") if p.exists()))


def compile_reduce(tg, k: int, layout: str, c_dtype: str, g_dtype: str, arch: int):
    """(kernel, tile description, warps) of ``tied_grad_reduce``'s launch for K units, as the host code sizes it."""
    k_pad = triton.next_power_of_2(k)
    c_size, g_size = DTYPES[c_dtype][1], DTYPES[g_dtype][1]
    rows = tg._finish_rows(k_pad)
    consts = {"N_UNITS": k, "C_TYPE": DTYPES[c_dtype][0], "G_TYPE": DTYPES[g_dtype][0], "K_PAD": k_pad, "T_PAD": T_PAD, "ALIGNED": True,
              "ROWS": rows}
    if layout in ("columns", "wide"):
        vec = tg._column_vec(k_pad, c_size, g_size, tg._WIDE_VALUES if layout == "wide" else tg._COLUMN_VALUES)
        k_a, k_b = tg._unit_split(k)
        warps, fn, extra = tg._COLUMN_WARPS, tg._columns_kernel, {"K_A": k_a, "K_B": k_b, "COLS": 32 * tg._COLUMN_WARPS,
                                                                  "VEC": vec}
        tile = f"{k_a}{f'+{k_b}' if k_b else ''} x {32 * warps} x {vec}"
    else:
        block = max(256, tg._TILE_VALUES // k_pad)
        warps, fn, extra = tg._num_warps(block, c_size, layout), tg._reduce_kernel, {"BLOCK": block}
        tile = f"{k_pad} x {block}"
    src = ASTSource(fn=fn, signature={**TABLES, **{name: "constexpr" for name in extra}}, constexprs={**consts, **extra})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}), tile, warps


def tile_layout(ttgir: str) -> str:
    """warpsPerCTA of the blocked layouts with two or three dimensions (the tile of contributions)."""
    found = re.findall(r"#ttg\.blocked<\{[^}]*warpsPerCTA = (\[\d+, \d+(?:, \d+)?\])[^}]*\}>", ttgir)
    return " ".join(dict.fromkeys(found)) or "?"


def main_loop(ptx: str) -> str:
    """Exchanges between threads and the widest global load inside the kernel's first loop (the unmasked tiles)."""
    head = ptx.find("Inner Loop Header")
    if head < 0:
        return "no loop"
    body = ptx[head:ptx.find("._crit_edge", head)]
    # Scalar 64-bit loads are the address table's; the data loads are the rest.
    loads = re.findall(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.b(\d+)", body)
    widths = [int(v or 1) * int(b) for v, b in loads if v or b != "64"]
    return f"loop: {body.count('bar.sync')} bar.sync, {body.count('shfl.sync')} shfl, data loads {max(widths, default=0)} bit"


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


def sass(ptx: str, arch: int) -> list[tuple[int, str]]:
    """(address, instruction) of the machine code ptxas makes of ``ptx`` (Triton's cuobjdump disassembles it)."""
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        path.write_text(ptx)
        subprocess.run([ptxas(), f"-arch=sm_{arch}a", str(path), "-o", str(cubin)], check=True, capture_output=True)
        text = subprocess.run([str(Path(ptxas()).parent / "cuobjdump"), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def spills_in_loops(ptx: str, arch: int, marker: str) -> int:
    """Spill instructions (STL / LDL) inside the innermost loops whose body holds ``marker`` (e.g. HGMMA, the
    tensor-core products): a spill there costs every iteration, one outside costs once. A loop is a branch back to a
    lower address; an innermost one has no other branch back inside it. (An outer loop's branches back need not
    enclose the inner one's range: ptxas lays out a persistent kernel's loop of tiles as several branches back
    whose ranges start inside its loop of key blocks. Each holds that loop's branch back, so none counts here; the
    count before 2026-11-28 took them for innermost, and a reload once a tile for a spill in the loop.)"""
    code = sass(ptx, arch)
    loops = [(int(m.group(1), 16), addr) for addr, ins in code
             if (m := re.search(r"BRA\b.*?0x([0-9a-f]+)", ins)) and int(m.group(1), 16) < addr]
    def holds(lo, hi):
        return any(marker in ins for addr, ins in code if lo <= addr <= hi)
    inner = {(lo, hi) for lo, hi in loops if holds(lo, hi) and not any(lo < at < hi for _, at in loops)}
    return sum(1 for lo, hi in inner for addr, ins in code if lo <= addr <= hi and re.match(r"(STL|LDL)\b", ins))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", default="2,4,8,16,24,32", help="values of K")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the contributions' dtype")
    p.add_argument("--grad-dtype", choices=sorted(DTYPES), default=None, help="the .grad buffers' (default: --dtype)")
    p.add_argument("--layouts", default=",".join(("fixed", "fitted", "columns", "wide")), help="layouts of tied_grad_reduce")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    args = p.parse_args(argv)
    (tg,) = checkout_kernels("tied_grad")
    g_dtype = args.grad_dtype or args.dtype
    print(f"tied-gradient reduction, {args.dtype} contributions into {g_dtype} grads, sm_{args.arch}a, "
          f"Triton {triton.__version__}")
    print(f"{'K':>3} {'layout':>7} {'tile':>14} {'warps':>5}  {'tile warpsPerCTA':<22} {'main loop':<46} ptxas")
    for k in (int(u) for u in args.units.split(",")):
        for layout in args.layouts.split(","):
            kernel, tile, warps = compile_reduce(tg, k, layout, args.dtype, g_dtype, args.arch)
            print(f"{k:>3} {layout:>7} {tile:>14} {warps:>5}  {tile_layout(kernel.asm['ttgir']):<22} "
                  f"{main_loop(kernel.asm['ptx']):<46} {registers(kernel.asm['ptx'], args.arch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
