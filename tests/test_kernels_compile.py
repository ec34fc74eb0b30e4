"""The kernels added since the last GPU session compile for a Hopper GPU, checked on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python through NumPy: it
never lowers it, so a kernel that computes the right numbers there can still
fail to compile for a GPU (a type the backend refuses, a layout conversion it
cannot do), and that would only show on scarce device time. Triton compiles for
a named target without a device, through PTX to a cubin with the ptxas it ships;
this runs that for sm_90a in a child process (the test session imported the
kernel modules in interpreter mode).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

COMPILE = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megascale.kernels import cross_entropy as ce

target = GPUTarget("cuda", 90, 32)
sizes = {}
for dt in ("bf16", "fp16", "fp32"):
    common = {"LOGITS": f"*{dt}", "stride_row": "i64", "TARGETS": "*i64", "LSE": "*fp32", "n_cols": "i32",
              "vocab_start": "i32", "BLOCK": "constexpr"}
    kernels = {"row_stats": (ce._row_stats_kernel, {**common, "TARGET_LOGIT": "*fp32"}),
               "softmax_grad": (ce._softmax_grad_kernel, {**common, "FACTORS": "*fp32"})}
    for name, (fn, sig) in kernels.items():
        sig = {arg: sig[arg] for arg in fn.arg_names}  # in the kernel's own argument order
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 4096}), target=target,
                                  options={"num_warps": 8})
        sizes[f"{name}-{dt}"] = len(compiled.asm["cubin"])
print(json.dumps(sizes))
"""


def test_cross_entropy_kernels_compile_for_sm90():
    proc = subprocess.run([sys.executable, "-c", COMPILE, str(ROOT)], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=300)
    if proc.returncode != 0 and "No module named 'triton'" in proc.stderr:
        pytest.skip("Triton is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(sizes) == sorted(f"{k}-{dt}" for k in ("row_stats", "softmax_grad") for dt in ("bf16", "fp16", "fp32"))
    assert all(n > 0 for n in sizes.values())  # a cubin: ptxas accepted the PTX
