"""Every GPU measurement the open issues ask for, as one prepared, time-boxed run.

A session that is lent a GPU gets about 15 minutes of device time in all (the
machine's start included), one command may run 10, and a machine left idle for
30 s is given back. This script is that one command: it runs the jobs in order of
importance (first the reduction's tests and benchmark, its kernel changed since the last GPU run;
then the Gluon attention kernels' tests and, if they pass, their benchmark, which changed too (2026-11-28: the
persistent forward's schedule, the backward's passes; their host time and CUDA-graph replay, each pass's
bandwidth); then the attention benchmark and the tied 1.3b with gradient
accumulation, what the H100 session of 2026-11-27 measured last; then what it
measured before: 350m/1.3b with accumulation, the reduction's layouts, 1.3b's
options, 125m/350m with the fused-ops default, a 1.3b step's profile; then
everything the earlier sessions measured, for another device),
each under its own time cap and all under
``--budget``, and leaves in ``--out`` each job's JSON (and PNG where matplotlib
is there), its log, and ``session.json`` (environment; per job: the command, exit
code, seconds, whether it was cut off). A job cut off loses only what it had not
yet written; the next job still runs. A test that hangs (no output for ``STALL_S``)
is killed and the rest of its job runs without it; the tests after one that leaves
CUDA unusable (a kernel's illegal address) run again in a new process. The device call returns at most 8 files,
so ``--out`` lies outside ``$OUT`` and ``--pack`` writes all of it as one
archive there, after every job.

    bash bench/gpu_wheels.sh        # here, once: DeepSpeed, pytest, matplotlib... into .whl/
    # the device call (carry: [".whl"], timeout_s: 600; the inner timeout leaves time to pack):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site:$PWD && timeout 560 python3 bench/gpu_session.py --budget 540 \
        --out /tmp/res --pack $OUT/results.tgz

    python bench/gpu_session.py --smoke --out runs/gpu_session_smoke   # here: a CPU dry run, tiny shapes
    python bench/gpu_session.py --part kernels --only tied_grad --out /tmp/res --pack $OUT/r.tgz  # a subset
    python bench/gpu_report.py <files_at>/results.tgz                   # Markdown for BENCHMARKS.md

``--smoke`` runs every job's code path on CPU with tiny shapes (kernels under
``TRITON_INTERPRET=1``; the kernel tests are only collected, the suite runs them):
it proves the script and the benchmarks work before device time is spent. Its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("kernels", "train")
# A test this long without an outcome is taken as hung: a barrier protocol gone wrong never returns, and CUDA's
# wait cannot be interrupted, so only killing the process ends it. The GPU sessions' tests took far less (the TMA
# tests: 23 in 61 s, each compiling three kernels), and a Gluon candidate compiles in under 1 s even on a 2-core
# CPU (bench/attention_layout.py: all 14 at head dim 128 in 12 s, imports included).
STALL_S = 45
POLL_S = 0.5
# test_init.py: its CUDA-only case (weights drawn on the host match the CPU model) rides along, ~2 s.
KERNEL_TESTS = ["tests/test_kernels_attention.py", "tests/test_kernels_tied_grad.py", "tests/test_kernels_fused.py",
                "tests/test_init.py", "tests/test_kernels_cross_entropy.py", "tests/test_attention_backends.py"]
NEW_TESTS = ["tests/test_attention_backends.py", "tests/test_kernels_tied_grad.py",
             "tests/test_kernels_attention.py::test_backend_resolution_uses_kernel_support",
             # the warp-specialised forward (2026-11-27), compiled by the GPU's Triton for the first time
             "tests/test_kernels_attention.py::test_ws_matches_reference",
             "tests/test_kernels_attention.py::test_ws_with_a_fixed_tile_matches_reference"]
# The attention through TMA at real shapes, bf16 (the training dtype): 22 cases and the model's views. Every
# (head dim, mask, length alignment) compiles its own three kernels, so it is a job of its own, after the
# trainer options, and the fp32 cases are left to the suite's interpreter run.
CAST_TESTS = ["-k", "not tma and ((half and bf16) or model_with or rms_norm)", "tests/test_kernels_attention.py",
              "tests/test_kernels_fused.py"]
TMA_TESTS = ["-k", "tma and (bf16 or strided) and not atomic", "tests/test_kernels_attention.py"]
# The one-kernel backward (deterministic=False, dQ by fp32 atomics; 2026-11-27), compiled by the GPU's Triton for the
# first time: bf16 at real shapes, pointers and TMA, and the model's strided views.
ATOMIC_TESTS = ["-k", "atomic_dq and not fp32", "tests/test_kernels_attention.py"]
# The Gluon kernels (flash_attention(gluon=True), 2026-11-27): never run, only compiled. Each one's parity tests first,
# alone; a barrier protocol gone wrong hangs rather than fails, so a benchmark times a kernel only after its tests
# pass, and a broken backward does not cost the forward's figures. bf16; every candidate tile at head dim 128 (#3's).
# The forward with the TMA backward (dq-kernel): 28 cases on a GPU; the Gluon backward (dq-atomic): 27.
# (not bind_to: the launches' binding check, a CPU test: the GPU tests launch them for real)
GLUON_FWD_TESTS = ["-k", "gluon and not fp16 and not dq-atomic and not backward_every and not (every_tile and D64) "
                   "and not bind_to", "tests/test_kernels_attention.py"]
GLUON_BWD_TESTS = ["-k", "gluon and not fp16 and (dq-atomic or backward_every) and not (backward_every and D64)",
                   "tests/test_kernels_attention.py"]
# The attention providers but the Gluon ones, which only attention_gluon(_bwd) time, after their tests (GLUON_FWD_TESTS)
NOT_GLUON = ("triton,triton-tma,triton-ws,triton-tma-atomic,triton-ws-atomic,sdpa-flash,sdpa-cudnn,"
             "sdpa-efficient")
# The speed options configs/1.3b.yaml turns on (the second H200 session measured them there, 2026-11-26):
# for the smaller configs, one figure for "all of it".
FAST = "train.loss_chunk_tokens=8192,train.compile=true"
# The defaults before that session: the Triton attention, the bf16 overflow scan, 1024-token loss chunks.
OLD_DEFAULTS = ("model.attention=triton,train.check_grad_overflow=true,model.fused_ops=torch,train.loss_chunk_tokens=1024,"
                "train.compile=false")
# fp32 weights under autocast: on one GPU, torch's fused AdamW instead of DeepSpeed's bf16 ZeRO optimizer, whose
# step the H200 figures point at (tied runs, with 2.4-7.4x fewer parameters to step, ran 3-11% faster).
AUTOCAST = "train.precision=bf16-autocast"


@dataclass
class Job:
    name: str
    part: str
    argv: list[str]  # after the python executable; "{out}" is the output folder
    smoke_argv: list[str]
    cap_s: int  # at most this long, whatever the budget left
    env: dict[str, str] = field(default_factory=dict)  # on top of the session's environment
    discard: tuple[str, ...] = ()  # folders under the output folder removed after the job (too big to send back)
    requires: str | None = None  # a job that must have passed in this session (a kernel that may hang: its tests)
    stall_s: float | None = None  # pytest jobs: a test with no outcome this long hangs (``supervise``)


def tests_job(name: str, selection: list[str], cap_s: int, **kw) -> Job:
    """A pytest run of ``selection`` (``-k`` filters and files): verbose with a JUnit report on the GPU, only
    collected in a smoke run (the suite runs the tests on CPU). Unbuffered (-u): a job cut off by its cap keeps
    every outcome so far in its log, and the test it was in (``broken_tiles`` reads them). A test that hangs
    is killed after ``STALL_S`` and the run goes on without it; one that leaves CUDA unusable is the last of its
    process (``run_job``). -vv: with less, pytest cuts a failure's message in its summary to 80 columns."""
    return Job(name, "kernels", ["-u", "-m", "pytest", "-vv", "-p", "no:cacheprovider", "--junitxml",
                                 f"{{out}}/{name}.xml", *selection],
               ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *selection], cap_s, stall_s=STALL_S,
               **kw)


def jobs(png: bool) -> list[Job]:
    """The measurements, most important first: a run cut short by the budget loses the least."""
    def plot(name: str) -> list[str]:
        return ["--png", f"{{out}}/{name}.png"] if png else []

    attention = ["bench/attention.py", "--dtype", "bf16"]
    train = ["bench/train_throughput.py", "--steps", "20", "--warmup", "5"]
    train_smoke = ["bench/train_throughput.py", "--cpu", "--steps", "5", "--warmup", "1", "--ckpt", "off"]
    # A real run through launch/pretrain.py that unties at step 3 (every layer shares one block until then),
    # its moments scaled from the probe: the untie path on CUDA, and how long it pauses training.
    untie = ["model.vocab_size=512", "data.corpus=stdlib", "data.path={out}/untie_data",
             "data.stdlib_max_bytes=600000", "model.sharing=all", "train.max_steps=6", "train.eval_every=3",
             "train.eval_batches=2", "train.sample_tokens=0", "train.progress=false", "train.log_every=1",
             "untie.when=step:3", "untie.probe_every=1", "untie.coherence_probes=2", "untie.moments=probe",
             "metrics.tensorboard=false", "train.out_dir={out}/untie"]
    # The trainer options, each against the defaults in one run (megascale's before/after figures): the 350m
    # table the second 2026-11-26 H200 session lost to one failing variant (fixed since), and the cheapest way.
    # Compile last: its first steps compile, the longest variant, and a cut-off job keeps the rows before it.
    # (ZeRO-0 in bf16 is not among them: bench/step_ops.py counts 38% more calls per step than ZeRO-1.)
    # TMA attention late: a kernel no GPU has compiled yet, and a crash would lose only the rows after it.
    options = ";".join(["", "model.attention=triton", "train.check_grad_overflow=true", "model.fused_ops=triton",
                        "train.loss_chunk_tokens=16384", AUTOCAST, "model.attention=triton-tma", "train.compile=true",
                        FAST, f"{FAST},model.attention=triton"])
    def gluon_bench(name: str, provider: str, requires: str) -> Job:
        """A Gluon provider's TFLOP/s (#3's case: hd128, causal, 2k-16k) beside cuDNN's, once its tests passed (or
        without the candidates whose own tests failed: ``salvage_env``); each call's host time and its time from a
        CUDA graph too (--overhead: is forward+backward at 4k short of cuDNN's by host work, or in the kernels?)."""
        return Job(name, "kernels",
                   [*attention, "--head-dims", "128", "--causal", "true", "--lengths", "2048,4096,8192,16384",
                    "--providers", f"{provider},sdpa-cudnn", "--overhead", "--json", f"{{out}}/{name}.json", *plot(name)],
                   ["bench/attention.py", "--smoke", "--json", f"{{out}}/{name}.json"], 120, requires=requires)

    return [
        # #3's reduction first: its kernel changed since the fourth H200 session (2026-11-27, 14 of 16 cases >= 85%):
        # its units are two power-of-two blocks of rows (12 = 8 + 4), not one padded, which takes "wide" at K = 12 to
        # 3 blocks an SM with 128-bit loads (the case short of 85% is K = 12 at 64 MB). Its tests at real shapes, then its GB/s (every layout by name, the default
        # timed first and last, the prepared launch, the host's time per call).
        tests_job("tied_grad_tests", ["tests/test_kernels_tied_grad.py"], 90),
        Job("tied_grad", "kernels",  # every layout, the prepared launch, the host's time per call
            ["bench/tied_grad.py", "--dtype", "bf16", "--json", "{out}/tied_grad.json", *plot("tied_grad")],
            ["bench/tied_grad.py", "--smoke", "--json", "{out}/tied_grad.json"], 90),
        # #3's newest candidates, the Gluon forward and backward (FlashAttention-3's overlap of softmax and products,
        # written out): their parity tests at real shapes, then, if they pass, their TFLOP/s beside cuDNN's.
        tests_job("gluon_tests", GLUON_FWD_TESTS, 150, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        # its candidate tiles timed on the first call of each length; cuDNN in the same run (the TMA kernels: later)
        gluon_bench("attention_gluon", "triton-gluon", "gluon_tests"),
        tests_job("gluon_bwd_tests", GLUON_BWD_TESTS, 150, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        gluon_bench("attention_gluon_bwd", "triton-gluon-atomic", "gluon_bwd_tests"),
        # #3's attention with the warp-specialised forward (provider triton-ws: a TMA producer warp and two
        # consumer groups, FlashAttention-3's overlap) and the one-kernel backward (triton-*-atomic: dQ by fp32
        # atomics, 5 products a tile instead of 7), both compiled for sm_90a, never run on a GPU; then the
        # real-shape tests that check them (new_tests, atomic_tests). Then what the H100 session of 2026-11-27
        # measured last: #9's tied 1.3b with accumulation, and fp32 weights under autocast there.
        Job("attention_hd128_causal", "kernels",
            [*attention, "--head-dims", "128", "--causal", "true", "--providers", NOT_GLUON,
             "--json", "{out}/attention_hd128_causal.json", *plot("attention_hd128_causal")],
            ["bench/attention.py", "--smoke", "--json", "{out}/attention_hd128_causal.json"], 200),
        # At real shapes: the warp-specialised forward, cuDNN attention as auto's choice, the reduction's layouts
        # (auto = columns to K = 16, wide to 32).
        tests_job("new_tests", NEW_TESTS, 120),
        tests_job("atomic_tests", ATOMIC_TESTS, 120, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        Job("train_accum_tied", "train",
            ["bench/train_throughput.py", "--steps", "8", "--warmup", "3", "--accum", "8", "--configs", "1.3b",
             "--micro-batch", "8", "--ckpt", "off", "--sharings", "none,all", "--variants", f";{AUTOCAST}",
             "--json", "{out}/train_accum_tied.json"],
            [*train_smoke, "--accum", "2", "--variants", f";{AUTOCAST}", "--json", "{out}/train_accum_tied.json"], 200),
        # Measured on the H100 on 2026-11-27 (what the session before it left open). #9's 1.3b target (46.7% MFU
        # there, >= 50% wanted): the config's defaults since (compile, the loss's row kernels) against what it
        # measured (fused_ops=torch), the fused Triton ops under compile and eager (model.fused_ops=auto's choice
        # without compile), autocast under compile, and the earlier eager PyTorch ops; 125m/350m with the new
        # default (auto: the fused ops, eager); #3's reduction with its launch prepared once (the kernel's own
        # bandwidth) beside the host's time per call; where a 1.3b step goes with each.
        # As the configs train: their global batches are many micro-batches, so the optimizer step (DeepSpeed's
        # bf16 ZeRO-1 update, 51 of a 1.3b step's 318 ms on the H100) is paid once per 8 of them, in both trainers.
        Job("train_accum", "train",
            ["bench/train_throughput.py", "--steps", "8", "--warmup", "3", "--accum", "8", "--configs", "350m,1.3b",
             "--micro-batch", "350m=16,1.3b=8", "--ckpt", "off", "--sharings", "none",
             "--json", "{out}/train_accum.json"],
            [*train_smoke, "--sharings", "none", "--accum", "2", "--json", "{out}/train_accum.json"], 180),
        Job("train_options_1.3b", "train",
            [*train, "--configs", "1.3b", "--micro-batch", "8", "--ckpt", "off", "--sharings", "none", "--variants",
             f";model.fused_ops=torch;model.fused_ops=triton;train.compile=false;{AUTOCAST};"
             "train.compile=false,model.fused_ops=torch", "--json", "{out}/train_options_1.3b.json"],
            [*train_smoke, "--sharings", "none", "--json", "{out}/train_options_1.3b.json"], 270),
        Job("train_small_auto", "train",
            [*train, "--configs", "125m,350m", "--micro-batch", "125m=32,350m=16", "--ckpt", "off",
             "--sharings", "none,all", "--json", "{out}/train_small_auto.json"],
            [*train_smoke, "--json", "{out}/train_small_auto.json"], 150),
        Job("step_profile", "train",
            ["bench/step_profile.py", "--config", "1.3b", "--micro-batch", "8", "--variants",
             ";model.fused_ops=triton;train.compile=false", "--json", "{out}/step_profile.json", *plot("step_profile")],
            ["bench/step_profile.py", "--cpu", "--warmup", "1", "--reps", "1", "--json", "{out}/step_profile.json"], 150),
        # Measured on the H100 on 2026-11-26 (BENCHMARKS.md): #9 untied and tied, FAST at 125m/350m, checkpointing.
        Job("train_350m", "train",
            [*train, "--configs", "350m", "--micro-batch", "16", "--ckpt", "off", "--sharings", "none,all",
             "--variants", f";{FAST}", "--json", "{out}/train_350m.json"],
            [*train_smoke, "--variants", ";train.loss_chunk_tokens=32", "--json", "{out}/train_350m.json"], 170),
        Job("train_1.3b_now", "train",
            [*train, "--configs", "1.3b", "--micro-batch", "8", "--ckpt", "off", "--sharings", "none,all",
             "--json", "{out}/train_1.3b_now.json"],
            [*train_smoke, "--json", "{out}/train_1.3b_now.json"], 170),
        Job("train_ckpt_now", "train",
            ["bench/train_throughput.py", "--steps", "10", "--warmup", "3", "--configs", "350m,1.3b", "--micro-batch",
             "32", "--ckpt", "on", "--sharings", "none,all", "--variants", "train.compile=true",
             "--json", "{out}/train_ckpt_now.json"],
            [*train_smoke, "--variants", "train.loss_chunk_tokens=64", "--json", "{out}/train_ckpt_now.json"], 240),
        Job("train_125m_now", "train",
            [*train, "--configs", "125m", "--micro-batch", "32", "--ckpt", "off", "--sharings", "none,all",
             "--variants", f";{FAST}", "--json", "{out}/train_125m_now.json"],
            [*train_smoke, "--json", "{out}/train_125m_now.json"], 120),
        # The kernels' float arguments cast to fp32 in the kernel (since the second H200 session): the attention
        # and fused-op parity tests at real shapes, bf16, first listed tile.
        tests_job("cast_tests", CAST_TESTS, 90, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        Job("train_options", "train",
            [*train, "--configs", "350m", "--micro-batch", "16", "--ckpt", "off", "--sharings", "none", "--variants",
             options, "--json", "{out}/train_options.json"],
            [*train_smoke, "--sharings", "none", "--variants", f";train.loss_chunk_tokens=64;{AUTOCAST}",
             "--json", "{out}/train_options.json"], 270),
        Job("train_1.3b_ckpt", "train", [*train, "--configs", "1.3b", "--ckpt", "on", "--json", "{out}/train_1.3b_ckpt.json"],
            [*train_smoke, "--sharings", "none", "--json", "{out}/train_1.3b_ckpt.json"], 200),
        Job("train_small_ckpt", "train", [*train, "--configs", "125m,350m", "--ckpt", "on", "--json", "{out}/train_small_ckpt.json"],
            [*train_smoke, "--sharings", "all", "--json", "{out}/train_small_ckpt.json"], 180),
        tests_job("tma_tests", TMA_TESTS, 150, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        Job("fused_loss", "kernels",
            ["bench/fused_loss.py", "--dtype", "bf16", "--d-model", "2048", "--tokens", "8192,16384",
             "--chunk-tokens", "0,4096,16384", "--json", "{out}/fused_loss.json", *plot("fused_loss")],
            ["bench/fused_loss.py", "--smoke", "--json", "{out}/fused_loss.json"], 120),
        # Measured on the H200 on 2026-11-26 (BENCHMARKS.md); again on any other device.
        # Every parity test at real shapes, each kernel at its first listed tile: autotuning every
        # (head dim, dtype, causal) combination would compile ~300 kernels, most of the budget.
        # the TMA cases are tma_tests' (and compile for minutes)
        tests_job("kernel_tests", ["-k", "not tma", *KERNEL_TESTS], 200, env={"MEGASCALE_TRITON_AUTOTUNE": "0"}),
        Job("train_small", "train", [*train, "--configs", "125m,350m", "--ckpt", "off", "--json", "{out}/train_small.json"],
            [*train_smoke, "--json", "{out}/train_small.json"], 240),
        Job("untie", "train", ["launch/pretrain.py", "--config", "configs/125m.yaml", *untie, "data.seq_len=256",
                               "model.max_seq_len=256", "train.micro_batch_size=8", "train.global_batch_size=8"],
            ["launch/pretrain.py", "--config", "configs/tiny.yaml", *untie], 75, discard=("untie_data", "untie/checkpoints")),
        Job("train_1.3b", "train", [*train, "--configs", "1.3b", "--ckpt", "off", "--json", "{out}/train_1.3b.json"],
            [*train_smoke, "--sharings", "none", "--json", "{out}/train_1.3b.json"], 240),
        # One shape per op: torch.compile, the third provider, compiles every shape and pass anew.
        Job("fused_ops", "kernels", ["bench/fused_ops.py", "--tokens", "16384", "--hidden", "4096", "--ffn", "11008",
                                     "--out", "{out}/fused_ops.json"],
            ["bench/fused_ops.py", "--smoke", "--out", "{out}/fused_ops.json"], 120),
        Job("attention_rest", "kernels",  # hd128 full, hd64 both: hd128 causal is the first attention job's
            [*attention, "--head-dims", "128", "--causal", "false", "--lengths", "1024,4096,16384",
             "--providers", NOT_GLUON, "--json", "{out}/attention_rest.json", *plot("attention_rest")],
            ["bench/attention.py", "--smoke", "--causal", "false", "--json", "{out}/attention_rest.json"], 90),
        Job("attention_hd64", "kernels",
            [*attention, "--head-dims", "64", "--causal", "true,false", "--lengths", "1024,4096,16384",
             "--providers", NOT_GLUON, "--json", "{out}/attention_hd64.json", *plot("attention_hd64")],
            ["bench/attention.py", "--smoke", "--json", "{out}/attention_hd64.json"], 90),
        # The tiles the autotuner picks for the model's own case (bf16, head dim 128), against the reference.
        Job("kernel_tests_autotuned", "kernels",
            ["-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "half and D128 and bf16", KERNEL_TESTS[0]],
            ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-k", "half and bf16", KERNEL_TESTS[0]], 120),
        # launch/pretrain.py's own build (meta device, parameters drawn on the GPU, DeepSpeed) for 1.3b, one rank.
        Job("startup", "train", ["bench/startup.py", "--config", "configs/1.3b.yaml", "--json", "{out}/startup.json"],
            ["bench/startup.py", "--config", "configs/tiny.yaml", "train.precision=fp32", "--json", "{out}/startup.json"], 90),
        # The launch order's A/B, last (the fourth H200 session: 8 heads together 2-5% faster in each pass at 2k-8k;
        # for another device): the same providers with heads launched one by one, the grid before
        # (MEGASCALE_ATTN_ORDER_HEADS=1), beside attention_gluon_bwd (8 heads together, heaviest blocks first).
        Job("attention_gluon_order1", "kernels",
            [*attention, "--head-dims", "128", "--causal", "true", "--lengths", "2048,4096,8192",
             "--providers", "triton-gluon-atomic,sdpa-cudnn", "--json", "{out}/attention_gluon_order1.json"],
            ["bench/attention.py", "--smoke", "--json", "{out}/attention_gluon_order1.json"], 60,
            env={"MEGASCALE_ATTN_ORDER_HEADS": "1"}, requires="gluon_bwd_tests"),
        # parallel.checkpoint_layers between recomputing all of 1.3b's 24 layers and none (train_1.3b): the first 16,
        # then 8 of them; peak memory against tokens/s.
        Job("train_recompute", "train",
            [*train, "--configs", "1.3b", "--micro-batch", "8", "--ckpt", "on", "--sharings", "none", "--variants",
             ";parallel.checkpoint_layers=16;parallel.checkpoint_layers=8", "--json", "{out}/train_recompute.json"],
            [*train_smoke, "--sharings", "none", "--variants",
             ";parallel.activation_checkpointing=true,parallel.checkpoint_layers=1", "--json", "{out}/train_recompute.json"],
            200),
    ]


@dataclass
class Outcome:
    name: str
    command: str
    rc: int | None  # None: cut off by its cap or the budget
    seconds: float
    log: str


def run_job(job: Job, argv: list[str], out: Path, limit: float, env: dict[str, str],
            extra_env: dict[str, str] | None = None, cwd: Path = ROOT) -> Outcome:
    """``job`` under ``env``, and ``extra_env`` (written into the recorded command too), for at most ``limit`` s,
    in ``cwd``.

    A pytest job (``job.stall_s``) goes on past a test that would end it early, in a new pytest process that
    appends to the same log (``next_attempt``): one that hangs is killed (``supervise``); after one that fails
    with an error that leaves CUDA unusable, the tests after it (all failing the same way) run again. Either
    is named in the log (``HUNG``, ``STICKY``) and fails the job (``broken_tiles`` names a Gluon candidate)."""
    extra_env = extra_env or {}
    env = {**env, **extra_env}
    cmd = [sys.executable, *(a.replace("{out}", str(out)) for a in argv)]
    log = out / f"{job.name}.log"
    start = time.monotonic()
    done: list[str] = []  # tests not to run again: only a test that hung or took CUDA down puts any here
    with log.open("w") as fh:
        for attempt in itertools.count(1):
            offset = log.stat().st_size  # where this run's output starts
            proc = subprocess.Popen(resumed(cmd, done, attempt), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            rc, stuck = supervise(proc, log, offset, start + limit, job.stall_s)
            if job.stall_s is None or (note := next_attempt(log, offset, rc, stuck, job.stall_s, done)) is None:
                break
            fh.write(f"\n{note}\n")
            fh.flush()
    for folder in job.discard:
        shutil.rmtree(out / folder, ignore_errors=True)
    command = shlex.join([f"{k}={v}" for k, v in extra_env.items()] + cmd)
    if done and rc in (0, 5):  # the rest passed, or nothing was left to run (pytest's 5): the job still failed
        rc = 1
    return Outcome(job.name, command, rc, round(time.monotonic() - start, 1), log.name)


def supervise(proc: subprocess.Popen, log: Path, offset: int, deadline: float,
              stall_s: float | None) -> tuple[int | None, str | None]:
    """Wait for ``proc``, whose output ``log`` holds from byte ``offset``: (its exit code, None); (None, None) when
    ``deadline`` came first; (None, the test) when ``log`` stopped growing for ``stall_s`` in a test that has no
    outcome yet (``running_test``). Killed (its process group: anything it started too) in both of the last two
    cases."""
    size, since = -1, time.monotonic()
    while True:
        try:
            return proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic()))), None
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        stuck = None
        if stall_s is not None and (grown := log.stat().st_size) != size:
            size, since = grown, now
        elif stall_s is not None and now - since > stall_s:
            stuck = running_test(output_since(log, offset))
        if now >= deadline or stuck:
            os.killpg(proc.pid, 9)
            proc.wait()
            return None, stuck


def next_attempt(log: Path, offset: int, rc: int | None, stuck: str | None, stall_s: float,
                 done: list[str]) -> str | None:
    """After a pytest run that wrote ``log`` from byte ``offset``: the line to note there when another run must
    take the tests it left (adding to ``done`` those it must not run again), or None when the job is over."""
    attempt = output_since(log, offset)
    ran = list(test_outcomes(attempt).items())
    if stuck is not None:
        done += [test for test, outcome in ran if outcome] + [stuck]
        return HUNG.format(seconds=stall_s, test=stuck)
    tests = [test for test, _ in ran]
    sticky = sticky_failure(attempt) if rc == 1 else None
    if sticky is None or sticky[0] not in tests[:-1]:
        return None  # passed, cut off, failed otherwise, or nothing ran after the failure
    done += tests[:tests.index(sticky[0]) + 1]
    return STICKY.format(test=sticky[0], message=sticky[1])


def output_since(log: Path, offset: int) -> str:
    return log.read_bytes()[offset:].decode(errors="replace")


def resumed(cmd: list[str], done: list[str], attempt: int) -> list[str]:
    """``cmd`` without the tests ``done``; its JUnit report under a name of its own after the first run's."""
    if attempt == 1:
        return cmd
    cmd = [f"{a[:-len('.xml')]}-{attempt}.xml" if a.endswith(".xml") else a for a in cmd]
    return cmd + [arg for test in done for arg in ("--deselect", test)]


# attention_gluon.EXCLUDE_ENV: the candidates its tuners leave out (not imported: this script imports no torch)
GLUON_EXCLUDE_ENV = "MEGASCALE_GLUON_EXCLUDE"
# A test's id as pytest -v prints it; its parameters may hold spaces ("[(1, 48)-fp32]").
TEST_ID = r"tests/\S+?::[^\s\[]+(?:\[.*?\](?= |$))?"
# A verbose pytest line: the test's id, then its outcome unless it was still running when the log ends.
TEST_LINE = re.compile(rf"^({TEST_ID})(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))?")
# The Gluon tests whose ids name a candidate (attention_gluon.tile_tag), after the head dim.
GLUON_TILE_TEST = re.compile(r"::test_gluon_(forward|backward)_every_\w+\[D\d+-(\d+x\d+-s\d+(?:-ws|-pingpong|-dqwarp|-persistent|-dqahead)?)"
                             r"(?:-|\])")


# What run_job writes into a pytest job's log for a test it killed, and for one after which the rest ran again
# (gpu_report.py reads them).
HUNG = "gpu_session: no output for {seconds:g} s in {test}: killed, the run goes on without it"
STICKY = "gpu_session: {test} left CUDA unusable ({message}): the tests after it run again in a new process"
HUNG_LINE = re.compile(r"^gpu_session: no output for (\S+) s in (.+): killed", re.M)
STICKY_LINE = re.compile(r"^gpu_session: (.+?) left CUDA unusable \((.*)\): the tests after it run again", re.M)
# A CUDA error is sticky: once a kernel faults (an illegal address, a misaligned one, an illegal instruction), every
# later CUDA call in the process fails with it, so the tests after the first such failure say nothing of their own.
STICKY_ERROR = re.compile(r"CUDA error|CUDA_ERROR|Triton Error \[CUDA\]|cudaError|unspecified launch failure")
# pytest's short summary line for a failed test (whole with -vv: ``tests_job``)
FAILED_LINE = re.compile(rf"^(?:FAILED|ERROR) ({TEST_ID}) - (.*)$")


def test_outcomes(log: str) -> dict[str, str | None]:
    """Each test of a ``pytest -v`` log and its outcome, None for one still running when the log ends (or killed),
    in the order of their last runs (``run_job`` may run a test again)."""
    outcomes: dict[str, str | None] = {}
    for line in log.splitlines():
        if match := TEST_LINE.match(line):
            outcomes.pop(match.group(1), None)
            outcomes[match.group(1)] = match.group(2)
    return outcomes


def running_test(log: str) -> str | None:
    """The test a ``pytest -v`` log ends in, without an outcome; None when it ends between tests."""
    last = list(test_outcomes(log).items())[-1:]
    return last[0][0] if last and last[0][1] is None else None


def run_notes(log: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The notes ``run_job`` wrote into a pytest job's log: (seconds, test) of each test it killed, and (test,
    message) of each after which the rest ran again."""
    return HUNG_LINE.findall(log), STICKY_LINE.findall(log)


def sticky_failure(log: str) -> tuple[str, str] | None:
    """The first test of a ``pytest -v`` log that failed with a sticky CUDA error (``STICKY_ERROR``), and its
    message; None when none did."""
    for line in log.splitlines():
        if (match := FAILED_LINE.match(line)) and STICKY_ERROR.search(match.group(2)):
            return match.group(1), match.group(2)
    return None


def broken_tiles(log: str) -> list[str] | None:
    """The Gluon candidates ("fwd:128x128-s2-pingpong", ...) whose test failed, or was running when the log ends
    (a hang cut off by the job's cap), from a ``pytest -v`` log; None when a failed test names no candidate (the
    default tile's parity tests: the benchmark is not safe), or when the log holds no outcome at all."""
    outcomes = test_outcomes(log)
    bad = [test for test, outcome in outcomes.items() if outcome in (None, "FAILED", "ERROR")]
    if not bad:
        return None
    tags = set()
    for test in bad:
        match = GLUON_TILE_TEST.search(test)
        if match is None:
            return None
        tags.add(("fwd:" if match.group(1) == "forward" else "bwd:") + match.group(2))
    return sorted(tags)


def salvage_env(job: Job, out: Path) -> dict[str, str] | None:
    """When ``job``'s required tests failed only in tests of single Gluon candidates: the environment that runs
    ``job`` without those candidates (their own figures lost, not every other's); else None."""
    log = out / f"{job.requires}.log"
    tags = broken_tiles(log.read_text(errors="replace")) if log.is_file() else None
    return None if tags is None else {GLUON_EXCLUDE_ENV: ",".join(tags)}


def unmet_requirement(job: Job, done: list[dict], smoke: bool) -> str | None:
    """Why ``job`` must not start after the jobs ``done`` (session.json's entries), or None.

    Only a required job this session ran and that did not pass holds it back: ``--only`` without the
    required job (a rerun after it passed in an earlier call) is the caller's choice. A smoke run only
    collects the tests, so there a requirement is not checked.
    """
    ran = [d for d in done if d["name"] == job.requires]
    if smoke or job.requires is None or not ran or ran[-1]["rc"] == 0:
        return None
    return f"{job.requires} did not pass"


def pack(folder: Path, archive: Path) -> None:
    """folder → archive (.tgz), replaced whole: a kill mid-write leaves the previous archive."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(folder, arcname=".")
    os.replace(partial, archive)


def environment() -> dict:
    """What the figures were measured on: GPU (nvidia-smi), Python and package versions."""
    env = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for package in ("torch", "triton", "deepspeed"):
        spec = importlib.util.find_spec(package)
        env[package] = _version(package) if spec else None
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    return env


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=(*PARTS, "all"), default="all")
    p.add_argument("--out", type=Path, required=True, help="results folder (on the device machine: $OUT)")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole part; jobs past it are not started")
    p.add_argument("--only", default="", help="comma-separated job names (default: every job of the part)")
    p.add_argument("--smoke", action="store_true", help="CPU dry run of every job with tiny shapes")
    p.add_argument("--pack", type=Path, help="after every job, also write the whole --out folder as this .tgz "
                   "(the device call returns at most 8 files: give --out a folder outside $OUT and --pack $OUT/...)")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # This interpreter's bin first (its ninja), as `make` and the launchers have it: DeepSpeed JIT-builds its CPU
    # ops with the first ninja on PATH, and a system ninja of another version rebuilds them (~30 s a smoke job).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if args.smoke:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    selected = [j for j in jobs(png=importlib.util.find_spec("matplotlib") is not None)
                if args.part in ("all", j.part) and (not args.only or j.name in args.only.split(","))]
    if not selected:
        raise SystemExit(f"no job matches --part {args.part} --only {args.only!r}; jobs: "
                         + ", ".join(j.name for j in jobs(False)))
    deadline = time.monotonic() + args.budget
    session = {"environment": environment(), "smoke": args.smoke, "budget_s": args.budget, "jobs": []}
    for job in selected:
        left = deadline - time.monotonic()
        why = unmet_requirement(job, session["jobs"], args.smoke)
        extra = salvage_env(job, args.out) if why else {}  # None: not safe to run at all
        if left < 20:
            outcome = Outcome(job.name, "", None, 0.0, "not started: budget spent")
        elif extra is None:
            outcome = Outcome(job.name, "", None, 0.0, f"not started: {why}")
            print(f"{job.name:<24} skipped  ({why})", flush=True)
        else:
            if extra:
                print(f"{job.name:<24} without {extra[GLUON_EXCLUDE_ENV]} ({why} there)", flush=True)
            outcome = run_job(job, job.smoke_argv if args.smoke else job.argv, args.out, min(job.cap_s, left),
                              {**env, **job.env}, extra)
            status = "cut off" if outcome.rc is None else f"rc={outcome.rc}"
            print(f"{job.name:<24} {status:<8} {outcome.seconds:7.1f} s  {outcome.log}", flush=True)
        session["jobs"].append(asdict(outcome))
        (args.out / "session.json").write_text(json.dumps(session, indent=2))  # after each job: survives a kill
        if args.pack:
            pack(args.out, args.pack)
    failed = [j["name"] for j in session["jobs"] if j["rc"] != 0]
    if failed:
        print("not complete: " + ", ".join(failed) + f" (logs in {args.out})")
        # Ready to paste: a device machine left idle 30 s is given back, so the second call must be quick to make.
        print("to rerun them: python3 bench/gpu_session.py --only " + ",".join(failed) + " --out <a new folder> --pack ...")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
