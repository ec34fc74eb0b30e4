"""Build DeepSpeed's CPU Adam op (ZeRO-Offload's optimizer) once, before the test workers start.

DeepSpeed JIT-compiles the op on first use: 35-55 s on the 2-core CI machine. Left to the
suite, the first offload test on one worker compiled it while the other worker's first
offload test waited on torch's build lock, both inside their timings (107-141 s each in a
fresh clone). Built here, alone, every test finds it ready. Where it is already built this
takes about 3 s (the import and ninja's check). A failure is reported and left to the
tests that need the op, which then say what is wrong; the rest of the suite runs.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    from megascale.train.dist import interpreter_extension_dir

    interpreter_extension_dir()  # the venv's own folder, as every run of the suite uses
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # noqa: BLE001 (any build failure: the offload tests will report it)
        print(f"prebuild_ops: DeepSpeed's CPU Adam did not build ({type(err).__name__}: {err}); "
              "the offload tests will fail on it", file=sys.stderr)
        return 0
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default folder")
    print(f"prebuild_ops: DeepSpeed's CPU Adam ready in {where} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
