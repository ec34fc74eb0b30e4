"""How the attention kernels' candidate tiles compile for a Hopper GPU, on a machine without one.

    python bench/attention_layout.py                        # bf16, head dims 64 and 128, every candidate tile
    python bench/attention_layout.py --kernels fwd --head-dims 128

For each kernel (forward, dK/dV, dQ) and each tile the autotuner may try
(``_FWD_TILES``, ``_DKDV_TILES``, ``_DQ_TILES`` in ``kernels/attention.py``), this
compiles for sm_90a with the specialisation Triton's JIT gives a real call:
pointers and strides 16-byte aligned, the element strides equal to 1, the
sequence length a multiple of 16. Without those hints the loads are neither
vectorised nor pipelined, and the shared memory and registers read off the
compiler describe a kernel that never runs. Printed per tile: Hopper tensor-core
instructions (``wgmma``) in the PTX, whether the K/V loads are pipelined
(``cp.async``), fp64 arithmetic (``--float-args fp64``: the scales typed as
torch.compile's Inductor types them), ``ptxas -v``'s registers and spill bytes, and the shared memory
against an H100's 227 KiB per block. It reads no timing: it says which tiles can
run and how, before a GPU session spends time autotuning them.

``--kernels fwd-gluon,bwd-gluon`` compiles the Gluon kernels (``kernels/attention_gluon.py``)
at each of their candidate tiles the same way; ``overlap yes`` marks a kernel with a
``wgmma.wait_group 1``, i.e. one that computes while a tensor-core product still runs
(none of the Triton kernels has one).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import checkout_kernels  # noqa: E402
from kernel_layout import registers, spills_in_loops  # noqa: E402

H100_SMEM = 227 * 1024  # bytes of shared memory one block may use on sm_90
# name: (kernel, its tiles, the arguments that are TMA descriptors → the block giving their box rows)
KERNELS = {
    "fwd": ("_fwd_kernel", "_FWD_TILES", {}),
    "fwd-tma": ("_fwd_tma_kernel", "_FWD_TILES",
                {"desc_q": "BLOCK_M", "desc_o": "BLOCK_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N"}),
    # the warp-specialised forward: Q and O in half query blocks
    "fwd-ws": ("_fwd_ws_kernel", "_WS_TILES",
               {"desc_q": "HALF_M", "desc_o": "HALF_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N"}),
    "dkdv": ("_bwd_dkdv_kernel", "_DKDV_TILES", {}),
    "dkdv-tma": ("_bwd_dkdv_kernel", "_DKDV_TILES",
                 {"Q": "BLOCK_M", "DO": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N", "DK": "BLOCK_N", "DV": "BLOCK_N"}),
    # deterministic=False: the whole backward in the dK/dV kernel, dQ added by fp32 atomics (DQA)
    "dkdv-atomic": ("_bwd_dkdv_kernel", "_DKDV_TILES", {}),
    "dkdv-atomic-tma": ("_bwd_dkdv_kernel", "_DKDV_TILES",
                        {"Q": "BLOCK_M", "DO": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N", "DK": "BLOCK_N",
                         "DV": "BLOCK_N"}),
    # flash_attention(gluon=True)'s forward and, with deterministic=False, backward (kernels/attention_gluon.py)
    "fwd-gluon": ("_fwd_gluon_kernel", "GLUON_TILES", {}),
    "bwd-gluon": ("_bwd_gluon_kernel", "GLUON_BWD_TILES", {}),
    "dq": ("_bwd_dq_kernel", "_DQ_TILES", {}),
    "dq-tma": ("_bwd_dq_kernel", "_DQ_TILES",
               {"Q": "BLOCK_M", "DO": "BLOCK_M", "DQ": "BLOCK_M", "K": "BLOCK_N", "V": "BLOCK_N"}),
}
FP32_POINTERS = ("LSE", "DELTA", "DQA")
GLUON_KERNELS = {"fwd-gluon": "_fwd_gluon_kernel", "bwd-gluon": "_bwd_gluon_kernel"}
FP64_MATH = re.compile(r"^\s*(?:add|sub|mul|fma|div|rcp|sqrt|rsqrt|max|min|ex2|lg2|neg|abs|setp)[.\w]*\.f64\b", re.M)
NO_HINT = ("group", "n_kv_heads", "qk_scale", "sm_scale")  # values a real call does not make multiples of 16


def signature(fn, tile: tuple, head_dim: int, boxes: dict, float_args: str = "fp32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, divisibility attrs) of a realistic bf16 call, from the argument names.

    float_args: the type of the scale arguments; Triton's JIT types a Python float fp32, torch.compile's
    Inductor (which compiles a kernel called inside a compiled region itself) fp64.
    """
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in boxes:  # a descriptor moving (1, 1, BLOCK, D) boxes: what the pre-hooks set
            block = {"BLOCK_M": tile[0], "HALF_M": tile[0] // 2, "BLOCK_N": tile[1]}[boxes[name]]
            sig[name] = f"tensordesc<bf16[1, 1, {block}, {head_dim}]>"
            continue
        elif name.startswith("stride_") and name.endswith("d"):  # the head-dim stride of a contiguous tensor
            sig[name], consts[name] = "constexpr", 1
        elif name.isupper():
            sig[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
        else:
            sig[name] = float_args if name.endswith("scale") else "i32"
        if sig[name] != "constexpr" and name not in NO_HINT:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_tile(att, kernel: str, tile: tuple, head_dim: int, causal: bool, arch: int, float_args: str = "fp32"):
    name, _, boxes = KERNELS[kernel]
    fn = getattr(att, name).fn
    block_m, block_n, warps, stages = tile
    sig, consts, attrs = signature(fn, tile, head_dim, boxes, float_args)
    if "TMA" in fn.arg_names:  # the backward kernels: one kernel, descriptors or pointers
        consts["TMA"] = bool(boxes)
    if "DQ_ATOMIC" in fn.arg_names:
        consts["DQ_ATOMIC"] = "atomic" in kernel
    if "ORDER_HEADS" in fn.arg_names:  # the launch order's head groups (attention._launch_order): a model's 8
        consts["ORDER_HEADS"] = att.order_heads(64)
    consts.update(HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, **att._dot_flags(torch.bfloat16))
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def compile_gluon(gluon_mod, kernel: str, tile: tuple, head_dim: int, causal: bool, arch: int):
    """A Gluon kernel ("fwd-gluon" or "bwd-gluon") at a (BLOCK_M, BLOCK_N, STAGES) tile, as a bf16 call compiles it:
    (1, 1, rows, D) descriptors in the swizzled layout the launcher gives them, fp32 pointers 16-byte aligned."""
    from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415

    block_m, block_n, stages, loader = tile  # loader: who issues the TMA copies (attention_gluon.LOADERS)
    fn = getattr(gluon_mod, GLUON_KERNELS[kernel])
    if kernel == "fwd-gluon":  # ping-pong's Q boxes are half the block, one for each warp group
        q_rows, num_warps = gluon_mod.forward_launch(tile)
    else:  # 16 rows a warp: the backward's keys
        q_rows, num_warps = block_m, gluon_mod.warps(block_n)
    rows = {name: q_rows for name in ("desc_q", "desc_o", "desc_do")} | {
        name: block_n for name in ("desc_k", "desc_v", "desc_dk", "desc_dv")}
    sig, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in rows:
            layout = gluon_mod.shared_layout(rows[name], head_dim, torch.bfloat16)
            sig[name] = f"tensordesc<bf16[1,1,{rows[name]},{head_dim}],{layout!r}>"
        elif name in FP32_POINTERS:
            sig[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name == "SCHEDULE":  # the persistent forward's tiles a block (attention_gluon.persistent_schedule)
            sig[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
    consts = dict(HEAD_DIM=head_dim, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                  WS=loader, ORDER_HEADS=gluon_mod.order_heads(64), num_warps=num_warps)  # a model's B · H: 8 together
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def overlapped(ptx: str) -> bool:
    """A ``wgmma.wait_group 1``: the kernel goes on while one group of products is still running (the Gluon
    forward's softmax beside P V); Triton's pipeliner waits for 0 after each product in these kernels."""
    return re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx) is not None


def fp64_math(ptx: str) -> int:
    """PTX arithmetic in fp64 (conversions aside): a kernel meant for fp32 that does any runs at fp64 rate."""
    return len(FP64_MATH.findall(ptx))


def describe(compiled, arch: int) -> str:
    ptx, smem = compiled.asm["ptx"], compiled.metadata.shared
    fits = "fits" if smem <= H100_SMEM else "TOO BIG for an H100"
    # cp.async: loads copied to shared memory asynchronously by the threads; cp.async.bulk.tensor: by the TMA unit.
    # deterministic=False's dQ: fp32 reductions, 128-bit (four values an instruction) or one value at a time
    # red.global (Triton 3.9), or atom.global ... add whose result goes unused (3.6; ptxas makes it a REDG too)
    reductions = re.findall(r"\b(?:red|atom)\.global\S*add\S*", ptx)  # not "shared.global": a word of its own
    atomics = "" if not reductions else f"  dQ atomics {'v4' if any('v4.f32' in r for r in reductions) else 'scalar'}"
    overlap = "  overlap yes" if overlapped(ptx) else ""
    # the backward's DQ_AHEAD: this step's dV, dK, dQ waited for with the next step's two products still running
    overlap += "  ahead yes" if re.search(r"wgmma\.wait_group\.sync\.aligned\s+2\b", ptx) else ""
    regs = registers(ptx, arch)
    # where it spills, whether the spills are in the loops of products (each iteration) or outside them
    if re.search(r" [1-9]\d* bytes spilled", regs) and "wgmma.mma_async" in ptx:
        regs += f" ({spills_in_loops(ptx, arch, 'HGMMA')} in loops)"
    return (f"wgmma {'yes' if 'wgmma.mma_async' in ptx else 'NO ':<3}  pipelined {'yes' if 'cp.async' in ptx else 'NO ':<3}  "
            f"warps {compiled.metadata.num_warps:<2} {'specialised' if 'setmaxnreg' in ptx else '':<11}  "
            f"TMA {'yes' if 'cp.async.bulk.tensor' in ptx else 'no ':<3}  f64 {fp64_math(ptx)}  "
            f"{regs:<34} smem {smem / 1024:6.1f} KiB ({fits}){atomics}{overlap}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"any of {', '.join(KERNELS)}")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--causal", choices=("true", "false"), default="true")
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    p.add_argument("--float-args", choices=("fp32", "fp64"), default="fp32",
                   help="type of the scale arguments: fp32 as Triton's JIT passes a Python float, "
                        "fp64 as torch.compile's Inductor does (train.compile=true)")
    args = p.parse_args(argv)
    (att,) = checkout_kernels("attention")
    print(f"attention kernels, bf16, causal={args.causal}, sm_{args.arch}a, Triton {triton.__version__}")
    print(f"{'kernel':<15} {'D':>4} {'BLOCK_M x N':>11} {'warps':>5} {'stages':>6}  compiled")
    for kernel in args.kernels.split(","):
        if kernel in GLUON_KERNELS:
            (gluon_mod,) = checkout_kernels("attention_gluon")
            if gluon_mod.GLUON_IMPORT_ERROR:
                print(f"{kernel:<15} skipped: {gluon_mod.GLUON_IMPORT_ERROR}")
                continue
            table = getattr(gluon_mod, KERNELS[kernel][1])
            for head_dim in (int(d) for d in args.head_dims.split(",") if int(d) in table):
                for tile in table[head_dim]:
                    compiled = compile_gluon(gluon_mod, kernel, tile, head_dim, args.causal == "true", args.arch)
                    loads = gluon_mod.LOADERS[tile[3]] or "own loads"
                    print(f"{kernel:<15} {head_dim:>4} {f'{tile[0]} x {tile[1]}':>11} {compiled.metadata.num_warps:>5} "
                          f"{tile[2]:>6}  {loads:<20}  {describe(compiled, args.arch)}", flush=True)
            continue
        table = getattr(att, KERNELS[kernel][1])
        for head_dim in (int(d) for d in args.head_dims.split(",")):
            for tile, cases in table.items():
                if (16, head_dim) not in cases:  # a candidate for this head dim in half precision
                    continue
                compiled = compile_tile(att, kernel, tile, head_dim, args.causal == "true", args.arch, args.float_args)
                print(f"{kernel:<15} {head_dim:>4} {f'{tile[0]} x {tile[1]}':>11} {tile[2]:>5} {tile[3]:>6}  "
                      f"{describe(compiled, args.arch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
