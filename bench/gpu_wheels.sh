#!/usr/bin/env bash
# Wheels for the GPU device machine (Python 3.12, PyTorch/Triton/NumPy/sentencepiece there,
# no network): DeepSpeed and its needs from ../shared/gpu/wheels.sh, plus what megascale's
# trainer imports beyond those (bench/train_throughput.py builds the real engine), pytest
# for the kernel tests at real shapes, and matplotlib for the benchmarks' PNGs.
# Run once on the development machine, then carry .whl (see BENCHMARKS.md).
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
bash ../shared/gpu/wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl pyyaml filelock tqdm \
  pytest pluggy iniconfig packaging \
  matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
ls -1 .whl
du -sh .whl   # the device call carries at most 64 MiB
