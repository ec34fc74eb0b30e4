"""The GPU session script, the benchmarks it drives and its report, dry-run on CPU.

A session lent a GPU has minutes of device time; these tests make sure the
prepared command (bench/gpu_session.py) and the checkout-only imports it relies
on work before that time is spent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_checkout_on_path_binds_kernels_as_megascale_kernels():
    """As on the GPU machine: the repository on sys.path, no pip install. The model must still find the kernels."""
    code = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, {str(ROOT)!r})
import megascale.kernels.attention as attention
from megascale.model.attention import triton_attention_available
print(attention.__file__)
print(triton_attention_available())
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    path, available = proc.stdout.split()
    assert Path(path) == ROOT / "kernels" / "attention.py"
    import importlib.util  # noqa: PLC0415

    assert available == str(importlib.util.find_spec("triton") is not None)


def test_gpu_session_smoke_runs_its_jobs(tmp_path):
    out = tmp_path / "session"
    archive = tmp_path / "device_out" / "results.tgz"
    proc = _run(["bench/gpu_session.py", "--smoke", "--only",
                 "kernel_tests,tied_grad,train_options,startup,untie,new_tests,fused_loss,tma_tests,train_350m,cast_tests,"
                 "atomic_tests,train_recompute",
                 "--out", str(out),
                 "--pack", str(archive)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    session = json.loads((out / "session.json").read_text())
    assert [j["name"] for j in session["jobs"]] == [
        "tied_grad", "new_tests", "atomic_tests", "train_350m", "cast_tests", "train_options", "tma_tests", "fused_loss",
        "kernel_tests", "untie", "startup", "train_recompute"]
    assert all(j["rc"] == 0 for j in session["jobs"])
    assert "collected" in (out / "kernel_tests.log").read_text()
    tied = json.loads((out / "tied_grad.json").read_text())["results"]
    assert tied and all(min(r["prepared_gbps"], r["host_us"], r["plan_us"], r["run_us"], r["dispatch_us"]) > 0 for r in tied)
    tied_and_untied = json.loads((out / "train_350m.json").read_text())["results"]
    assert {(r["sharing"], r["variant"]) for r in tied_and_untied if r["trainer"] == "megascale"} == {
        ("none", ""), ("none", "train.loss_chunk_tokens=32"), ("all", ""), ("all", "train.loss_chunk_tokens=32")}
    train = json.loads((out / "train_options.json").read_text())["results"]
    assert [(r["trainer"], r["variant"]) for r in train] == [
        ("plain", ""), ("megascale", ""), ("megascale", "train.loss_chunk_tokens=64"),
        ("megascale", "train.precision=bf16-autocast")]
    assert all(r["tokens_per_s"] > 0 for r in train)
    recompute = json.loads((out / "train_recompute.json").read_text())["results"]
    assert [(r["trainer"], r["variant"]) for r in recompute] == [
        ("plain", ""), ("megascale", ""), ("megascale", "parallel.activation_checkpointing=true,parallel.checkpoint_layers=1")]
    assert all(r["state_gib"] > 0 and r["state_formula_gib"] > 0 for r in train if r["trainer"] == "megascale")
    assert (out / "untie" / "metrics.jsonl").is_file()  # its corpus and checkpoint are not sent back
    assert not (out / "untie_data").exists() and not (out / "untie" / "checkpoints").exists()

    # The device call returns at most 8 files: the archive holds the whole folder, and the report reads it.
    assert [p.name for p in archive.parent.iterdir()] == ["results.tgz"]
    report = _run(["bench/gpu_report.py", str(archive)])
    assert report.returncode == 0, report.stderr
    assert report.stdout == _run(["bench/gpu_report.py", str(out)]).stdout
    text = report.stdout
    assert "smoke run: the numbers mean nothing" in text
    assert "Kernel tests at real shapes, first listed tile: " in text and "collected, none run" in text
    assert "New tests at real shapes (cuDNN attention as auto's choice, the reduction's layouts): " in text
    assert re.search(r"Attention through TMA at real shapes, bf16, first listed tile: 13/\d+ collected, none run", text)
    # bf16 through pointers and TMA (5 shapes x 2 masks each on CPU), the model's strided views and the tuner's case
    assert re.search(r"Attention's one-kernel backward \(dQ by atomics\) at real shapes, bf16, first listed tile: "
                     r"22/\d+ collected, none run", text)
    # of every test in the two files (the denominator grows with them), the cast tests' 26
    assert re.search(r"Kernels with fp32-cast float arguments at real shapes, bf16: 26/\d+ collected, none run", text)
    assert "| 128 | plain | auto |" in text and "| 128 | fused | auto |" in text  # the fused-loss table
    assert "Kernel tests, autotuned tiles (bf16, head dim 128): not run." in text
    assert "Attention: not run." in text  # not among the jobs asked for
    assert "| 2 | tensor |" in text  # the tied-gradient table, K = 2
    assert "Host profile of one call (Llama block, K = 2" in text and "(plan_tied_grad_reduce)" in text
    (option,) = [l for l in text.splitlines() if l.startswith("| tiny | none | off | megascale | train.loss_chunk_tokens=64 |")]
    assert option.split("|")[-2].strip() not in ("–", "")  # its before/after: against the defaults' row of the run
    assert "target 1.3b MFU ≥ 50%: n/a" in text  # no GPU, no MFU: never a verdict without a figure
    assert "Start-up, layout tp=1 pp=1 dp=1, 918,144 parameters, fp32, ZeRO 1:" in text
    assert "| 3 | 328,064 → 918,656 |" in text and "Training went on after the untie with finite losses: met." in text


def test_gpu_session_stops_at_its_budget(tmp_path):
    out = tmp_path / "session"
    proc = _run(["bench/gpu_session.py", "--smoke", "--part", "train", "--budget", "5", "--out", str(out)])
    assert proc.returncode == 1
    assert "not complete: train_accum_tied, train_accum, train_options_1.3b, train_small_auto, step_profile" in proc.stdout
    assert ("to rerun them: python3 bench/gpu_session.py --only train_accum_tied,train_accum,train_options_1.3b,"
            "train_small_auto,") in proc.stdout
    jobs = json.loads((out / "session.json").read_text())["jobs"]
    assert jobs and all(j["rc"] is None and j["log"] == "not started: budget spent" for j in jobs)


def test_gpu_session_times_the_gluon_forward_only_after_its_tests_pass():
    """A barrier protocol gone wrong hangs until the job's cap: the Gluon benchmark waits for its tests."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_session  # noqa: PLC0415

    job = next(j for j in gpu_session.jobs(False) if j.name == "attention_gluon")
    names = [j.name for j in gpu_session.jobs(False)]
    assert names.index("gluon_tests") < names.index("attention_gluon") < names.index("attention_hd128_causal")
    assert gpu_session.unmet_requirement(job, [{"name": "gluon_tests", "rc": 0}], smoke=False) is None
    for rc in (1, None):  # failed, or cut off by its cap
        assert gpu_session.unmet_requirement(job, [{"name": "gluon_tests", "rc": rc}], smoke=False) == \
            "gluon_tests did not pass"
    assert gpu_session.unmet_requirement(job, [], smoke=False) is None  # --only without it: the caller's choice
    assert gpu_session.unmet_requirement(job, [{"name": "gluon_tests", "rc": 1}], smoke=True) is None
    others = [j for j in gpu_session.jobs(False) if j.argv[0] == "bench/attention.py" and "gluon" not in j.name]
    assert {j.name for j in others} >= {"attention_hd128_causal", "attention_rest", "attention_hd64"}
    assert all("--providers" in j.argv and "gluon" not in " ".join(j.argv) for j in others)  # bench defaults have it
    # the backward apart: a broken Gluon backward costs neither the forward's figures nor the others'
    bwd = next(j for j in gpu_session.jobs(False) if j.name == "attention_gluon_bwd")
    assert bwd.requires == "gluon_bwd_tests" and names.index("gluon_bwd_tests") < names.index("attention_gluon_bwd")
    assert "triton-gluon-atomic" in bwd.argv[bwd.argv.index("--providers") + 1]
    assert "atomic" not in job.argv[job.argv.index("--providers") + 1]


def test_gpu_session_benchmarks_the_gluon_candidates_whose_tests_passed(tmp_path, monkeypatch):
    """A Gluon candidate that fails or hangs in its own test (the job cut off in it) is left out of the benchmark
    after it (the tuner would time it too), named by its test id; a failure in a test that names no candidate
    still skips the benchmark."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_session  # noqa: PLC0415
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    every = "tests/test_kernels_attention.py::test_gluon_{}_every_{}[D128-{}-causal{}]"
    log = "\n".join([
        every.format("forward", "tile_matches_reference", "128x128-s2", "-T300") + " PASSED [ 10%]",
        every.format("forward", "tile_matches_reference", "128x128-s2-pingpong", "-T300") + " FAILED [ 20%]",
        every.format("backward", "loader_with_a_single_step", "32x64-s2-ws", "").replace("-causal", "") + " PASSED",
        every.format("backward", "tile_matches_reference", "32x128-s2-dqwarp", "") + " ",  # running when cut off
    ])
    assert gpu_session.broken_tiles(log) == ["bwd:32x128-s2-dqwarp", "fwd:128x128-s2-pingpong"]
    other = "tests/test_kernels_attention.py::test_gluon_matches_reference[B1-H4-kv2-T17-D64-bf16-causal-dq-kernel]"
    assert gpu_session.broken_tiles(log + "\n" + other + " FAILED") is None
    assert gpu_session.broken_tiles("collected 0 items") is None
    assert gpu_session.broken_tiles(every.format("forward", "tile_matches_reference", "64x64-s3", "-T100")
                                    + " PASSED") is None  # nothing failed: nothing to leave out

    job = next(j for j in gpu_session.jobs(False) if j.name == "attention_gluon")
    (tmp_path / "gluon_tests.log").write_text(log)
    env = gpu_session.salvage_env(job, tmp_path)
    assert env == {attention_gluon.EXCLUDE_ENV: "bwd:32x128-s2-dqwarp,fwd:128x128-s2-pingpong"}
    assert gpu_session.salvage_env(job, tmp_path / "elsewhere") is None  # no log: not safe
    assert "-u" in next(j for j in gpu_session.jobs(False) if j.name == "gluon_tests").argv  # outcomes as they come

    monkeypatch.setenv(*env.popitem())  # what the benchmark then tunes over
    fwd = attention_gluon.candidates("fwd", 128)
    assert attention_gluon.tile_tag((128, 128, 2, attention_gluon.PING_PONG)) == "128x128-s2-pingpong"
    assert len(fwd) == len(attention_gluon.GLUON_TILES[128]) - 1 and all(t[3] != attention_gluon.PING_PONG for t in fwd)
    assert (32, 128, 2, attention_gluon.DQ_WARP) not in attention_gluon.candidates("bwd", 128)
    assert attention_gluon.candidates("bwd", 64) == attention_gluon.GLUON_BWD_TILES[64]
    monkeypatch.setenv(attention_gluon.EXCLUDE_ENV, ",".join(f"fwd:{attention_gluon.tile_tag(t)}"
                                                             for t in attention_gluon.GLUON_TILES[64]))
    with pytest.raises(ValueError, match="leaves the Gluon fwd no candidate at head dim 64"):
        attention_gluon.candidates("fwd", 64)


STAND_IN_TESTS = """
import time

import pytest

CUDA = {"usable": True}  # what a faulting kernel takes down: every later CUDA call in the process fails


def _cuda_call():
    if not CUDA["usable"]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"D128-{t}-causal")
def test_gluon_forward_every_tile_matches_reference(tile):
    _cuda_call()  # after the fault: fails at once, so the ws candidate's hang shows in the run after that
    if tile.endswith(("pingpong", "ws")):
        time.sleep(600)  # its barriers deadlock: the kernel never returns
    if tile == "64x64-s3":
        CUDA["usable"] = False
        _cuda_call()


def test_gluon_forward_takes_the_models_strided_views():
    _cuda_call()
"""


def test_gpu_session_goes_on_past_a_test_that_hangs_or_takes_cuda_down(tmp_path):
    """A Gluon candidate whose barriers deadlock never returns: its test is killed once the log stops growing and
    the job's other tests still run. One that faults leaves CUDA unusable for every later test of its process: those
    run again in a new one (where one hangs, found as well). Those candidates are left out of the benchmark, and the
    report says what happened."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dataclasses  # noqa: PLC0415

    import gpu_report  # noqa: PLC0415
    import gpu_session  # noqa: PLC0415

    (tmp_path / "tests").mkdir()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    tiles = ["128x128-s2", "128x128-s2-pingpong", "64x64-s3", "128x64-s3-ws", "64x128-s2"]
    (tmp_path / "tests" / "test_stand_in.py").write_text(f"TILES = {tiles}\n" + STAND_IN_TESTS)
    # run where its pytest.ini is, as the session's tests run in the checkout: the ids pytest -v prints (relative to
    # the working folder) are then those --deselect takes (relative to pytest's rootdir)
    job = gpu_session.tests_job("gluon_tests", ["tests/test_stand_in.py"], 300, env={"MEGASCALE_TRITON_AUTOTUNE": "0"})
    assert job.stall_s == gpu_session.STALL_S
    outcome = gpu_session.run_job(dataclasses.replace(job, stall_s=2), job.argv, tmp_path, job.cap_s,
                                  {**os.environ, **job.env}, cwd=tmp_path)
    assert outcome.rc == 1  # failed, not cut off by its cap (None)
    log = (tmp_path / "gluon_tests.log").read_text()
    test = "tests/test_stand_in.py::test_gluon_forward_every_tile_matches_reference[D128-{}-causal]"
    views = "tests/test_stand_in.py::test_gluon_forward_takes_the_models_strided_views"
    # each test's last outcome: those after the fault failed in the second run, then hung or passed
    assert gpu_session.test_outcomes(log) == {
        test.format("128x128-s2"): "PASSED", test.format("128x128-s2-pingpong"): None, test.format("64x64-s3"): "FAILED",
        test.format("128x64-s3-ws"): None, test.format("64x128-s2"): "PASSED", views: "PASSED"}
    assert log.count(f"{views} FAILED") == 1
    spaced = "tests/test_kernels_fused.py::test_rms_norm_matches_reference[(1, 48)-bf16]"  # parameters with spaces
    assert gpu_session.test_outcomes(f"{spaced} PASSED [ 25%]\n{views} ") == {spaced: "PASSED", views: None}
    assert gpu_session.running_test(f"{spaced} ") == spaced
    assert gpu_session.broken_tiles(log) == ["fwd:128x128-s2-pingpong", "fwd:128x64-s3-ws", "fwd:64x64-s3"]
    bench = next(j for j in gpu_session.jobs(False) if j.name == "attention_gluon")
    assert gpu_session.salvage_env(bench, tmp_path) == {
        gpu_session.GLUON_EXCLUDE_ENV: "fwd:128x128-s2-pingpong,fwd:128x64-s3-ws,fwd:64x64-s3"}
    # the first and third runs were killed; the second and fourth wrote their own
    assert [p.name for p in sorted(tmp_path.glob("*.xml"))] == ["gluon_tests-2.xml", "gluon_tests-4.xml"]
    report = "\n".join(gpu_report._pytest_log(tmp_path / "gluon_tests.log", "Gluon"))
    assert report.startswith("Gluon: 3 passed, 1 failed, 0 skipped, 0 errors, 2 hung")
    assert f"* hung: `{test.format('128x128-s2-pingpong')}` (no output for 2 s: killed" in report
    assert (f"* `{test.format('64x64-s3')}` left CUDA unusable (RuntimeError: CUDA error: an illegal memory access was "
            "encountered); the tests after it ran again") in report


def test_gluon_phases_never_cost_the_providers_rows_and_the_report_shows_them(monkeypatch):
    """bench/attention.py times the Gluon kernels alone beside the provider's call (``gluon_phases``): nothing where no
    Gluon tuner ran for the shape, one error line where a timing fails (here the real launch on CPU tensors), and the
    report sets call against kernel and gives the backward's other passes their share."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "bench"))
    import attention  # noqa: PLC0415
    import gpu_report  # noqa: PLC0415

    kernels = attention.import_kernels()
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    q, k, v, do = (torch.randn(1, 2, 16, 64) for _ in range(4))
    monkeypatch.setattr(attention_gluon, "_TUNED", {})
    assert attention.gluon_phases(kernels, q, k, v, do, True, torch.device("cpu")) == {}
    tile = (128, 128, 2, attention_gluon.PING_PONG)
    monkeypatch.setattr(attention_gluon, "_TUNED", {("fwd", 64, True, torch.float32, 16, "cpu"): tile})
    failed = attention.gluon_phases(kernels, q, k, v, do, True, torch.device("cpu"))
    assert list(failed) == ["error"] and failed["error"], failed
    # the backward's passes one by one: times and bandwidths (the Δ kernel under the interpreter, in a process of
    # its own: whether this one interprets depends on which test modules were collected beside this one)
    code = """
import json, os, sys, torch
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, "bench")
import attention
o, do, lse, acc = torch.randn(1, 2, 16, 64), torch.randn(1, 2, 16, 64), torch.zeros(1, 2, 16), torch.randn(1, 2, 16, 64)
dq = torch.empty_like(o)
out = attention.backward_passes(attention.import_kernels(), o, do, lse, acc, dq, 0.125, torch.device("cpu"))
print(json.dumps({**out, "zeroed": not acc.any().item(), "cast_ok": torch.equal(dq, acc * 0.125)}))
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    passes = json.loads(proc.stdout.splitlines()[-1])
    assert set(passes["bwd_pass_ms"]) == set(passes["bwd_pass_gbps"]) == {
        "delta_zero", "dq_cast", "delta", "zero", "dq_cast_torch"}
    assert all(v > 0 for v in passes["bwd_pass_gbps"].values()) and passes["zeroed"] and passes["cast_ok"], passes

    phases = dict(fwd_kernel_ms=0.4, fwd_kernel_tflops=600.0, bwd_kernel_ms=1.2, bwd_kernel_tflops=520.0,
                  bwd_passes_ms=0.15, bwd_pass_ms=dict(delta=0.03, zero=0.035, dq_cast=0.06),
                  bwd_pass_gbps=dict(delta=4500.0, zero=3800.0, dq_cast=3350.0))
    shape = dict(D=128, causal=True, T=4096, gluon_phases=phases)
    rows = [dict(provider="triton-gluon-atomic", mode="fwd", ms=0.5, tflops=545.0, **shape),
            dict(provider="triton-gluon-atomic", mode="bwd", ms=1.5, tflops=460.0, **shape)]
    text = "\n".join(gpu_report.phase_lines(rows))
    assert "| 128 | causal | 4096 | 545 | 600 | 460 | 520 | 150 | 0.1 |" in text, text
    # each pass alone, with the bandwidth it reached
    assert "| 128 | causal | 4096 | delta | 30 | 4,500 |" in text and "| 128 | causal | 4096 | dq_cast | 60 | 3,350 |" in text
    # beside a forward-only record (job attention_gluon) of the same shape, the fuller one is shown
    fwd_only = dict(provider="triton-gluon", mode="fwd", ms=0.5, tflops=540.0, D=128, causal=True, T=4096,
                    gluon_phases=dict(fwd_kernel_ms=0.4, fwd_kernel_tflops=590.0))
    assert "| 128 | causal | 4096 | 545 | 600 | 460 | 520 | 150 | 0.1 |" in "\n".join(gpu_report.phase_lines([fwd_only, *rows]))
    rows[0]["gluon_phases"] = rows[1]["gluon_phases"] = {"error": "CUDA error"}
    assert "| 128 | causal | 4096 | failed: CUDA error |" in "\n".join(gpu_report.phase_lines(rows))


def test_attention_overhead_separates_the_host_from_the_kernels():
    """--overhead records each call's host time and its CUDA-graph replay beside the timed call (is forward+backward
    at 4k short of cuDNN by host work or in the kernels?); a case that fails there keeps its row, and the Gluon jobs
    ask for it."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "bench"))
    import attention  # noqa: PLC0415
    import gpu_report  # noqa: PLC0415
    import gpu_session  # noqa: PLC0415

    kernels = attention.import_kernels()
    rows = attention.bench_shape(["reference", "sdpa-math"], kernels, torch.device("cpu"), torch.float32, 1, 2, 2, 8,
                                 16, True, ["fwd", "fwd+bwd"], overhead=True)
    assert len(rows) == 4 and all(r["ms"] and r["host_ms"] > 0 for r in rows), rows
    assert all(r["graph_ms"] is None and r["overhead_error"] is None for r in rows)  # no CUDA graph on CPU
    plain = attention.bench_shape(["reference"], kernels, torch.device("cpu"), torch.float32, 1, 2, 2, 8, 16, True,
                                  ["fwd"])
    assert "host_ms" not in plain[0]

    def refuses():
        raise RuntimeError("operation not permitted when stream is capturing")

    assert attention.call_overhead(refuses, torch.device("cpu")) == {
        "host_ms": None, "graph_ms": None, "overhead_error": "operation not permitted when stream is capturing"}

    shape = dict(D=128, causal=True, T=4096)
    timed = [dict(provider="triton-gluon-atomic", mode="fwd+bwd", ms=2.14, host_ms=0.62, graph_ms=1.99,
                  overhead_error=None, **shape),
             dict(provider="sdpa-cudnn", mode="fwd+bwd", ms=2.06, host_ms=0.2, graph_ms=None,
                  overhead_error="capture failed", **shape)]
    text = "\n".join(gpu_report.overhead_lines(timed))
    assert "| 128 | causal | 4096 | triton-gluon-atomic | fwd+bwd | 2,140 | 1,990 | 620 | 150 |  |" in text, text
    assert "| 128 | causal | 4096 | sdpa-cudnn | fwd+bwd | 2,060 | – | 200 | – | capture failed |" in text, text
    assert gpu_report.overhead_lines(plain) == []  # no --overhead, no table
    for name in ("attention_gluon", "attention_gluon_bwd"):
        assert "--overhead" in next(j for j in gpu_session.jobs(False) if j.name == name).argv


def test_attention_bench_and_report_show_the_gluon_tuners_choice(tmp_path, monkeypatch):
    """A first GPU run of the Gluon kernels must say which candidate tile won per shape (attention_gluon._TUNED,
    keyed by kernel, head dim, mask, dtype, length bucket, device) and how far their output is from SDPA's."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "bench"))
    import attention  # noqa: PLC0415
    import gpu_report  # noqa: PLC0415

    kernels = attention.import_kernels()
    from megascale.kernels import attention_gluon  # noqa: PLC0415

    pp, own, tma_warp = attention_gluon.PING_PONG, attention_gluon.OWN_LOADS, attention_gluon.TMA_WARP
    tuned = {("fwd", 128, True, torch.bfloat16, 4096, "cuda:0"): (128, 128, 2, pp),
             ("bwd", 128, True, torch.bfloat16, 4096, "cuda:0"): (32, 64, 2, own),
             ("fwd", 128, True, torch.bfloat16, 8192, "cuda:0"): (64, 64, 3, own)}  # another length: not this shape's
    monkeypatch.setattr(attention_gluon, "_TUNED", tuned)
    tiles = attention.chosen_tiles(kernels, 128, True, torch.bfloat16, 3000)  # 3000 tunes in the 4096 bucket
    assert tiles == {"gluon_fwd": "128 x 128, 2 stages, ping-pong", "gluon_bwd": "32 x 64, 2 stages"}
    assert attention_gluon.describe_tile((32, 128, 2, tma_warp)) == "32 x 128, 2 stages, TMA warp"
    assert attention.chosen_tiles(kernels, 64, True, torch.bfloat16, 3000) == {}
    rows = [dict(provider="triton-gluon", mode="fwd", D=128, causal=True, T=3000, tflops=1.0, max_abs_err=0.0039,
                 tiles=tiles),
            dict(provider="sdpa-cudnn", mode="fwd", D=128, causal=True, T=3000, tflops=1.0, max_abs_err=0.0)]
    text = "\n".join(gpu_report.gluon_lines(rows))
    assert "| 128 | causal | 3000 | 128 x 128, 2 stages, ping-pong | 32 x 64, 2 stages | 0.0039 |" in text, text
    assert "Gluon candidates" not in text  # no timings recorded: no table

    # every candidate's time on the tuning call, as TFLOP/s of this shape (the backward's over 2.5x the FLOPs)
    persistent = attention_gluon.PERSISTENT
    times = {("fwd", 128, True, torch.bfloat16, 4096, "cuda:0"): {(128, 128, 2, pp): 2.0, (128, 128, 2, persistent): 1.0},
             ("bwd", 128, True, torch.bfloat16, 4096, "cuda:0"): {(32, 64, 2, own): 5.0},
             ("fwd", 128, True, torch.bfloat16, 8192, "cuda:0"): {(64, 64, 3, own): 1.0}}
    monkeypatch.setattr(attention_gluon, "_TIMES", times)
    flops = attention.forward_flops(2, 16, 3000, 128, True)
    candidates = attention.candidate_tflops(kernels, 2, 16, 128, True, torch.bfloat16, 3000)
    assert candidates == {
        "gluon_fwd": {"128 x 128, 2 stages, ping-pong": flops / 2e-3 / 1e12,
                      "128 x 128, 2 stages, persistent ping-pong": flops / 1e-3 / 1e12},
        "gluon_bwd": {"32 x 64, 2 stages": 2.5 * flops / 5e-3 / 1e12}}
    rows[0]["candidates"] = candidates
    lines = gpu_report.gluon_lines(rows)
    at = lines.index("Gluon candidates as the tuner timed them (the kernel alone; TFLOP/s):")
    body = [line for line in lines[at:] if line.startswith("| 128 ")]
    assert [line.split(" | ")[3:5] for line in body] == [  # per pass, the fastest first
        ["bwd", "32 x 64, 2 stages"], ["fwd", "128 x 128, 2 stages, persistent ping-pong"],
        ["fwd", "128 x 128, 2 stages, ping-pong"]], body


def test_attention_bench_records_a_backward_that_fails_and_goes_on(monkeypatch, capsys):
    """A provider whose forward runs and whose backward fails (the Gluon backward's first run, say) gets an error row
    for the modes with a backward, the benchmark goes on to the next provider and shape, and both it and the report
    say what failed."""
    import torch  # noqa: PLC0415

    sys.path.insert(0, str(ROOT / "bench"))
    import attention  # noqa: PLC0415

    class RefusingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no tile of the backward compiles here")

    real = attention.provider_fn
    monkeypatch.setattr(attention, "provider_fn", lambda name, kernels: (
        lambda q, k, v, causal: RefusingBackward.apply(q)) if name == "broken-bwd" else real(name, kernels))
    modes = ["fwd", "bwd", "fwd+bwd"]
    rows = attention.bench_shape(["broken-bwd", "sdpa-math"], attention.import_kernels(), torch.device("cpu"),
                                 torch.float32, 1, 2, 2, 16, 16, True, modes)
    got = {(r["provider"], r["mode"]): (r["tflops"] is not None, r["error"]) for r in rows}
    assert got == {("broken-bwd", "fwd"): (True, None),
                   ("broken-bwd", "bwd"): (False, "no tile of the backward compiles here"),
                   ("broken-bwd", "fwd+bwd"): (False, "no tile of the backward compiles here"),
                   **{("sdpa-math", m): (True, None) for m in modes}}
    attention.print_table(rows, ["broken-bwd", "sdpa-math"], modes)
    assert ("unavailable: broken-bwd (bwd, fwd+bwd) at D=16 T=16 causal=True: no tile of the backward compiles here"
            in capsys.readouterr().out)
    import gpu_report  # noqa: PLC0415 (the report says it too)

    assert gpu_report.unavailable_lines(rows) == [
        "* unavailable: broken-bwd (bwd, fwd+bwd) at hd 16 causal T=16: no tile of the backward compiles here", ""]


def test_gpu_session_rejects_an_unknown_job(tmp_path):
    proc = _run(["bench/gpu_session.py", "--only", "nonesuch", "--out", str(tmp_path)])
    assert proc.returncode != 0
    assert "no job matches" in proc.stderr and "kernel_tests" in proc.stderr


def test_sharing_bench_tabulates_each_policy_against_copy(monkeypatch):
    """bench/sharing.py --seeds: the final-loss table per seed and policy, and each policy's count against copy."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("sharing_bench", ROOT / "bench" / "sharing.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)

    def runs(copy: float, scale: float) -> list[dict]:
        return [{"name": "untied", "final_val_loss": 4.0}, {"name": "step", "final_val_loss": copy},
                {"name": "step+scale", "final_val_loss": scale}]

    table = bench.moments_table({0: runs(5.0, 4.9), 1: runs(5.0, 5.1), 2: runs(5.0, 5.0001)}, ["copy", "scale"])
    assert "| `step` | 5.0000 | **4.9000** | **5.0000** | 5.1000 | **5.0000** | 5.0001 |" in table
    assert "untied" not in table
    assert "scale against copy: lower in 1 of 3, higher in 1, equal (within 0.0005) in 1; mean difference +0.000" in table


def test_kernel_layout_shows_where_the_warps_go():
    """Compiled for sm_90a without a GPU: 8 warps split the K = 4 tile's unit axis; fitted warps do not; the
    columns kernel's loop exchanges nothing between threads and keeps K = 24 (1.3b, sharing all) in registers."""
    proc = _run(["bench/kernel_layout.py", "--units", "4,24"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines() if line.split()[:1] in (["4"], ["24"])}
    assert "[2, 4]" in rows["4", "fixed"] and " 8 " in rows["4", "fixed"]
    assert "[1, 4]" in rows["4", "fitted"] and "0 bytes spilled" in rows["4", "fitted"]
    for k in ("4", "24"):
        assert "loop: 0 bar.sync, 0 shfl" in rows[k, "columns"] and " 0 bytes spilled" in rows[k, "columns"]


def test_plot_train_draws_bars_and_refuses_mixed_devices(tmp_path):
    row = dict(config="tiny", sharing="none", ckpt=False, trainer="plain", variant="", mfu=None, tokens_per_s=1000.0,
               peak_gib=None)
    files = []
    for i, device in enumerate(("cpu", "cpu", "NVIDIA H200")):
        path = tmp_path / f"t{i}.json"
        rows = [row, {**row, "trainer": "megascale", "tokens_per_s": 900.0 + i}]
        path.write_text(json.dumps({"device": device, "date": "2026-11-26T00:00:00", "results": rows}))
        files.append(str(path))
    png = tmp_path / "train.png"
    proc = _run(["bench/plot_train.py", *files[:2], "--png", str(png)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mixed = _run(["bench/plot_train.py", *files, "--png", str(tmp_path / "mixed.png")])
    assert mixed.returncode != 0 and "different devices" in mixed.stderr


def test_step_ops_counts_fewer_calls_without_the_overflow_scan():
    proc = _run(["bench/step_ops.py", "--config", "tiny", "--variants",
                 "train.check_grad_overflow=true;train.check_grad_overflow=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = {line.split()[0]: int(line.split()[2].replace(",", "")) for line in proc.stdout.splitlines()
              if line.startswith("train.check_grad_overflow=")}
    assert counts["train.check_grad_overflow=false"] < counts["train.check_grad_overflow=true"], counts


def test_step_profile_splits_each_trainer_into_phases_and_categories(tmp_path):
    out = tmp_path / "profile.json"
    png = tmp_path / "profile.png"
    proc = _run(["bench/step_profile.py", "--cpu", "--warmup", "1", "--reps", "1", "--json", str(out), "--png", str(png)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(out.read_text())["trainers"]
    assert [r["trainer"] for r in rows] == ["plain", "megascale"]
    for r in rows:
        assert list(r["phases"]) == ["forward", "backward", "update"]
        for phase in r["phases"].values():
            assert phase["launches"] > 0 and phase["wall_ms"] > 0
            assert abs(sum(phase["categories"].values()) - phase["device_ms"]) < 1e-6 * max(1.0, phase["device_ms"])
        # the forward and backward matmuls are where a tiny model's time goes; the update has none
        assert r["phases"]["forward"]["categories"]["matmul"] > 0
        assert "matmul" not in r["phases"]["update"]["categories"]
    assert "device ms by category" in proc.stdout


def test_step_profile_sorts_kernel_names_into_categories():
    sys.path.insert(0, str(ROOT / "bench"))
    from step_profile import category  # noqa: PLC0415

    assert category("_rms_fwd_kernel") == "norm/rope/swiglu"  # before attention's "_fwd_kernel"
    assert category("_fwd_kernel") == "attention"
    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3") == "attention"
    assert category("fmha_cutlassB_bf16_aligned_64x64_k128_sm80") == "attention"
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1") == "matmul"
    assert category("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert category("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>") == "copy/cast"
    assert category("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>") == "other elementwise"
    assert category("_row_stats_kernel") == "loss"


def test_attention_layout_compiles_every_forward_tile_pipelined_on_tensor_cores():
    """Compiled for sm_90a with a real call's alignment: every candidate tile of the forward uses wgmma,
    pipelines its K/V loads and fits an H100's shared memory (without the hints none of that would show).
    The scale typed fp64, as torch.compile's Inductor types it (train.compile=true): the H200 session of
    2026-11-26 (second) failed to compile the forward that way, and the math must stay fp32."""
    proc = _run(["bench/attention_layout.py", "--kernels", "fwd", "--head-dims", "128", "--float-args", "fp64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("fwd ")]
    assert len(rows) == 8, proc.stdout
    for line in rows:
        assert "wgmma yes  pipelined yes" in line and "f64 0 " in line and "(fits)" in line, line


def test_ws_forward_compiles_warp_specialised_for_hopper():
    """flash_attention(ws=True)'s forward, compiled for sm_90a: Triton's Hopper pass must split it into a producer
    warp and two consumer groups (12 warps, setmaxnreg), without spilling. A change that breaks the form the pass
    accepts (two named query halves, one loop) compiles either not at all or unspecialised: both fail here."""
    proc = _run(["bench/attention_layout.py", "--kernels", "fwd-ws", "--head-dims", "64,128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("fwd-ws ")]
    assert len(rows) == 6, proc.stdout  # three tiles, two head dims
    for line in rows:
        assert "warps 12 specialised" in line and " 0 bytes spilled" in line and "(fits)" in line, line


def test_rms_norm_kernel_keeps_fp32_math_when_inductor_passes_eps_as_fp64():
    """torch.compile's Inductor compiles a Triton kernel called in a compiled region itself and types a Python
    float fp64: eps must not turn the normalisation into fp64 arithmetic (a fraction of the fp32 rate)."""
    code = f"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "bench")!r}]
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attention_layout import fp64_math
from megascale.kernels import rmsnorm
fn = rmsnorm._rms_fwd_kernel
sig = {{"X": "*bf16", "W": "*bf16", "Y": "*bf16", "RSTD": "*fp32", "stride_x": "i32", "stride_y": "i32",
        "n_rows": "i32", "n_cols": "i32", "eps": "fp64", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "ONE_BLOCK": "constexpr"}}
src = ASTSource(fn=fn, signature=sig, constexprs={{"BLOCK_M": 4, "BLOCK_N": 2048, "ONE_BLOCK": True}})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 8}}).asm["ptx"]
print(fp64_math(ptx), "cvt.f64" in ptx or ".f64" in ptx)
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    math, any_f64 = proc.stdout.split()
    assert any_f64 == "True"  # the fp64 argument is there (the check below sees PTX that mentions it)
    assert math == "0", proc.stdout


def test_attention_tma_kernels_compile_for_hopper():
    """The interpreter never lowers a kernel: the TMA variants' every tile must also compile for sm_90a, with
    tensor-memory copies and tensor-core products (an early return in a constexpr branch, for one, only fails here)."""
    proc = _run(["bench/attention_layout.py", "--kernels", "fwd-tma,dkdv-tma,dq-tma", "--head-dims", "128",
                 "--float-args", "fp64"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["fwd-tma"], ["dkdv-tma"], ["dq-tma"])]
    assert len(rows) == 8 + 6 + 5, proc.stdout
    for line in rows:
        assert "wgmma yes" in line and "TMA yes" in line and "f64 0 " in line and "(fits)" in line, line
        assert "atomics" not in line, line  # the deterministic backward has none
        # Triton's pipeliner waits for every product before the next step (attention_gluon.py's reason to be)
        assert "overlap" not in line, line


def test_gluon_kernels_compile_for_hopper_with_softmax_beside_the_products():
    """flash_attention(gluon=True)'s forward (and deterministic=False's backward), compiled for sm_90a at every candidate tile for head dims 64 and 128 (it
    has no interpreter, so this is the check a machine without a GPU can make): TMA copies, tensor-core products, no
    spill, and a wait that leaves P V running (wgmma.wait_group 1) while the next scores' softmax is computed."""
    proc = _run(["bench/attention_layout.py", "--kernels", "fwd-gluon,bwd-gluon", "--head-dims", "64,128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("fwd-gluon ")]
    assert len(rows) == 2 * 8, proc.stdout
    for line in rows:
        assert "wgmma yes" in line and "TMA yes" in line and "(fits)" in line, line
        assert line.endswith("overlap yes"), line
        # none spills; the persistent kernel (causal, head dim 128) a few bytes once a query block, none in its loop
        # of key blocks
        persistent = " persistent ping-pong " in line
        assert " 0 bytes spilled" in line or (persistent and "(0 in loops)" in line), line
    # the candidates with a TMA warp come out warp-specialised: 8 compute warps (one partition, or ping-pong's two
    # warp groups) and the loader's warp group
    specialised = [line for line in rows if "warps 12 specialised" in line]
    assert len(specialised) == 2 * 4 and sum(" ping-pong " in line for line in specialised) == 2 * 2, proc.stdout
    # The backward: every candidate compiles (Pᵀ computed while dPᵀ is multiplied: wait_group 1 there too) and the
    # first listed one of each head dim, the default without tuning, does not spill.
    rows = [line for line in proc.stdout.splitlines() if line.startswith("bwd-gluon ")]
    assert len(rows) == 4 + 10, proc.stdout
    for line in rows:
        assert "wgmma yes" in line and "TMA yes" in line and "(fits)" in line and " overlap yes" in line, line
    assert " 0 bytes spilled" in rows[0] and " 0 bytes spilled" in rows[4], proc.stdout
    ws = [line for line in rows if "specialised" in line]  # with a TMA warp: the compute warps' registers raised
    assert len(ws) == 2 + 8 and all(" 0 bytes spilled" in line for line in ws), proc.stdout
    # the dQ warp group adds dQ from shared memory, 4 values an atomic; the compute warps' own are scalar
    dq_warp = [line for line in rows if "TMA + dQ warp" in line]
    assert len(dq_warp) == 1 + 5 and all("dQ atomics v4" in line for line in dq_warp), proc.stdout
    # DQ_AHEAD alone waits for a step's dV, dK, dQ with the next step's S^T and dP^T still in flight (wait_group 2)
    assert [line.endswith("ahead yes") for line in rows] == ["next S/dP ahead" in line for line in rows], proc.stdout
    assert sum("next S/dP ahead" in line for line in rows) == 1, proc.stdout


def test_atomic_dq_backward_compiles_for_hopper_with_vector_atomics():
    """flash_attention(deterministic=False)'s one backward kernel, pointers and TMA, every dK/dV tile at head dim
    128: tensor-core products, dQ added by 128-bit fp32 reductions, and the 16 x 64 tile listed for it spill-free."""
    proc = _run(["bench/attention_layout.py", "--kernels", "dkdv-atomic,dkdv-atomic-tma", "--head-dims", "128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["dkdv-atomic"], ["dkdv-atomic-tma"])]
    assert len(rows) == 2 * 6, proc.stdout
    for line in rows:
        assert "wgmma yes" in line and "f64 0 " in line and "(fits)" in line and "dQ atomics v4" in line, line
    spill_free = [line for line in rows if line.split()[2:5] == ["16", "x", "64"]]
    assert len(spill_free) == 2 and all(" 0 bytes spilled" in line for line in spill_free), proc.stdout


def test_train_throughput_reports_a_failing_variant_and_keeps_the_others(tmp_path):
    """On the H200 (2026-11-26, second session) one variant's failure (train.compile with the Triton attention)
    lost the whole 350m table. A variant that fails is now a FAILED line and a "failed" entry; the others stay."""
    out = tmp_path / "train_options.json"
    proc = _run(["bench/train_throughput.py", "--cpu", "--steps", "5", "--warmup", "1", "--ckpt", "off",
                 "--sharings", "none", "--variants", ";model.attention=bogus;train.loss_chunk_tokens=64",
                 "--json", str(out)])
    assert proc.returncode != 0 and "1 variant(s) failed: model.attention=bogus" in proc.stderr, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(r["trainer"], r["variant"]) for r in data["results"]] == [
        ("plain", ""), ("megascale", ""), ("megascale", "train.loss_chunk_tokens=64")]
    assert [f["variant"] for f in data["failed"]] == ["model.attention=bogus"]
    assert "not one of" in data["failed"][0]["error"]
    report = _run(["-c", f"import sys; sys.path.insert(0, 'bench'); import gpu_report; "
                         f"print('\\n'.join(gpu_report.train_section(gpu_report.Path({str(tmp_path)!r}))))"])
    assert report.returncode == 0, report.stderr[-2000:]
    assert "variant failed: tiny, sharing none, act. ckpt off, `model.attention=bogus`" in report.stdout


def test_throughput_trainer_applies_the_fused_ops_setting():
    """The bench's megascale trainer must set up the model as launch/pretrain.py does: the second H200 session's
    model.fused_ops=triton variant measured the torch ops, because the bench never applied the setting."""
    code = f"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, {str(ROOT / "bench")!r})
import argparse, torch
import train_throughput as tt
from megascale.train.dist import init_distributed
from megascale.train.loop import make_groups
args = argparse.Namespace(cpu=True, seq=0, micro=2, sharing="none", ckpt_on=False, steps=1, warmup=0)
ctx = init_distributed()
for ops in ("torch", "triton"):
    cfg = tt.bench_config("tiny", args, f"model.fused_ops={{ops}}")
    model, step = tt.megascale_trainer(cfg, ctx.device, ctx, make_groups(cfg, ctx))
    print(ops, sorted({{m.ops for m in model.modules() if hasattr(m, "ops")}}))
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch ['torch']" in proc.stdout and "triton ['triton']" in proc.stdout, proc.stdout


def test_measure_frees_the_deepspeed_engine():
    """bf16 ZeRO-1: the optimizer's gradient hooks keep an engine alive after its last reference is dropped.
    measure() must destroy it, or the next variant's peak memory includes this one's state."""
    code = f"""
import argparse, gc, os, sys, weakref
os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, {str(ROOT / "bench")!r})
import train_throughput as tt
from megascale.train.dist import init_distributed
from megascale.train.loop import make_groups

ctx = init_distributed()
args = argparse.Namespace(sharing="none", micro=2, ckpt_on=False, cpu=False, seq=32, warmup=1, steps=1)
refs = []
build = tt.megascale_trainer
def recording(*a):
    model, step = build(*a)
    refs.append(weakref.ref(step.engine))
    return model, step
tt.megascale_trainer = recording
groups = make_groups(tt.bench_config("tiny", args), ctx)
r = tt.measure("tiny", "megascale", args, ctx.device, ctx, groups, "data.seq_len=32,model.max_seq_len=32")
gc.collect()
print(r.tokens_per_s > 0, refs[0]() is None)
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["True", "True"]


def test_micro_batch_per_config(monkeypatch):
    """--micro-batch 350m=16,1.3b=8: each config its own size; a config not named is sized by auto."""
    import argparse  # noqa: PLC0415

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import train_throughput as tt  # noqa: PLC0415

    monkeypatch.setattr(tt, "largest_micro_batch", lambda name, args, device, cap: 99)
    cpu = __import__("torch").device("cpu")
    for chosen, name, expected in [("350m=16,1.3b=8", "350m", 16), ("350m=16,1.3b=8", "1.3b", 8),
                                   ("350m=16,1.3b=8", "125m", 99), ("4", "125m", 4), ("auto", "125m", 99)]:
        args = argparse.Namespace(micro_batch=chosen, max_micro=0)
        assert tt.micro_batch(name, args, cpu) == expected, (chosen, name)


def test_gpu_report_judges_each_config_by_its_fastest_variant(tmp_path, monkeypatch):
    """The targets are read off the fastest megascale row of a config (a variant is a setting users can choose);
    tied rows are compared with the untied row of the same variant."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_report  # noqa: PLC0415

    def row(trainer, sharing, variant, mfu, state=None):
        return dict(config="350m", sharing=sharing, ckpt=False, trainer=trainer, variant=variant, micro_batch=16,
                    tokens_per_s=mfu * 1e6, tflops=mfu * 989, mfu=mfu, peak_gib=40.0, state_gib=state)

    results = [row("plain", "none", "", 0.30), row("megascale", "none", "", 0.28, 4.8),
               row("megascale", "none", "FAST", 0.42, 4.8),
               row("plain", "all", "", 0.30), row("megascale", "all", "", 0.31, 1.0),
               row("megascale", "all", "FAST", 0.43, 1.0), row("megascale", "none", "SLOW", 0.30, 4.8),
               row("megascale", "all", "SLOW", 0.28, 1.0)]
    (tmp_path / "train_350m.json").write_text(json.dumps({"device": "NVIDIA H100", "results": results}))
    text = "\n".join(gpu_report.train_section(tmp_path))
    assert "* target 350m MFU ≥ 40%: met (best 42.0%, `FAST`)" in text
    assert "* target 1.3b MFU ≥ 50%: n/a" in text
    assert "* target megascale ≥ 1.15× plain, each config's fastest variant: met (lowest 1.400×: 350m, sharing none" in text
    assert "* 350m, act. ckpt off, `FAST`: tied MFU 43.0% vs untied 42.0% (not 5% below it: met); state 1.00 vs 4.80 GiB" in text
    assert ("* 350m, act. ckpt off, `defaults`: tied MFU 31.0% vs untied 28.0% (not 5% below it: met; tied 11% faster: "
            "its optimizer step updates fewer parameters)") in text
    assert "* 350m, act. ckpt off, `SLOW`: tied MFU 28.0% vs untied 30.0% (not 5% below it: **not met**)" in text

    # Rows with gradient accumulation say so, in the table and in the verdict they decide.
    accum = [row("plain", "none", "", 0.30), {**row("megascale", "none", "", 0.45, 4.8), "accum": 8}]
    (tmp_path / "train_350m.json").write_text(json.dumps({"device": "NVIDIA H100", "results": accum}))
    text = "\n".join(gpu_report.train_section(tmp_path))
    assert "| 350m | none | off | megascale | – | 16×8 |" in text
    assert "* target 350m MFU ≥ 40%: met (best 45.0%, `defaults`, 8 micro-batches per optimizer step)" in text


def test_accumulation_steps_the_optimizer_once_per_window_in_both_trainers():
    """--accum 2: each trainer's step() is one micro-batch, and the optimizer moves on every second one only
    (DeepSpeed's boundary for megascale, the plain loop's own counter)."""
    code = f"""
import argparse, os, sys
os.environ["DS_ACCELERATOR"] = "cpu"
sys.path.insert(0, {str(ROOT / "bench")!r})
import torch
import train_throughput as tt
from megascale.train.dist import init_distributed
from megascale.train.loop import make_groups

ctx = init_distributed()
args = argparse.Namespace(cpu=True, seq=0, micro=2, sharing="none", ckpt_on=False, accum=2)
cfg = tt.bench_config("tiny", args)
print("accum", tt.accumulation_steps(cfg))
batch = tt.random_batches(cfg, 1, ctx.device)[0]
for trainer in ("plain", "megascale"):
    model, step = (tt.plain_trainer(cfg, ctx.device) if trainer == "plain"
                   else tt.megascale_trainer(cfg, ctx.device, ctx, make_groups(cfg, ctx)))
    weight = next(model.parameters())
    before = weight.detach().clone()
    step(batch)
    moved_after_one = not torch.equal(weight.detach(), before)
    step(batch)
    print(trainer, moved_after_one, not torch.equal(weight.detach(), before))
"""
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "accum 2" in lines
    assert "plain False True" in lines and "megascale False True" in lines, proc.stdout


def test_tied_grad_host_time_runs_on_cpu(tmp_path):
    """--host times a call's checks and launch tables alone (plan_tied_grad_reduce) for the llama block, per K."""
    proc = _run(["bench/tied_grad.py", "--host", "--smoke", "--dtype", "bf16", "--json", str(tmp_path / "host.json")])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "host.json").read_text())["results"]
    assert [(r["K"], r["tensors"]) for r in rows] == [(2, 27), (3, 36)]  # nine tensors, K units and the grad each
    assert all(r["plan_us"] > 0 for r in rows)
    assert "plan_tied_grad_reduce" in proc.stdout


def test_launch_order_model_puts_the_heaviest_blocks_of_a_few_heads_first():
    """bench/launch_order.py: the grouped order (the Gluon kernels') loses less of a causal forward to the tail than
    the head-by-head order at every length, and at most 2%, and so does the persistent forward's schedule (a model:
    the numbers are not a GPU's)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import launch_order  # noqa: PLC0415

    rows = launch_order.main(["--heads-together", "8"])
    assert [r["T"] for r in rows] == [2048, 4096, 8192, 16384]
    assert all(r["grouped 8"] < r["head-major"] and r["grouped 8"] <= 0.02 for r in rows), rows
    # the persistent forward: its tiles in turn lose 8-32%, handed out as the block scheduler would, as the grid
    assert all(r["persistent in turn"] > 0.08 and r["persistent scheduled"] <= r["grouped 8"] + 1e-9 for r in rows), rows
    assert launch_order.makespan([3.0, 1.0, 1.0, 1.0], sms=2) == 3.0  # the long block first: the rest fill beside it
    assert launch_order.makespan([1.0, 1.0, 1.0, 3.0], sms=2) == 4.0  # last: it runs alone at the end


def test_gpu_session_compares_the_attention_launch_orders(tmp_path):
    """The A/B job (heads launched one by one, MEGASCALE_ATTN_ORDER_HEADS=1) runs after the Gluon backward's timing,
    and the report sets the two side by side, row by row."""
    out = tmp_path / "session"
    proc = _run(["bench/gpu_session.py", "--smoke", "--only", "gluon_bwd_tests,attention_gluon_bwd,attention_gluon_order1",
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    session = json.loads((out / "session.json").read_text())
    assert [j["name"] for j in session["jobs"]] == ["gluon_bwd_tests", "attention_gluon_bwd", "attention_gluon_order1"]
    text = _run(["bench/gpu_report.py", str(out)]).stdout
    at = text.index("Attention launch order (TFLOP/s): 8 heads together")
    rows = [l for l in text[at:].splitlines()[4:] if l.startswith("|")]
    assert rows and all(len(r.split("|")) == 12 for r in rows)


def test_make_bench_runs_the_cpu_benchmarks(tmp_path):
    """`make bench` without a GPU: the framework-overhead table against the plain loop and the host Adam rate,
    both as JSON in BENCH_OUT (here with the smallest settings each script takes). The Adam rate, what
    --host-adam-rate is read from, has every optimizer stepped in a child process per thread count."""
    out = tmp_path / "bench"
    proc = subprocess.run(["make", "--no-print-directory", "bench", f"BENCH_OUT={out}",
                           "BENCH_ARGS=--steps 1 --warmup 0 --ckpt off --sharings none --max-micro 1",
                           # One thread: a 2-thread child's OpenMP barriers wait for a descheduled thread whenever the
                           # other worker's ranks hold the cores (166 s beside a 4-rank run, passive wait or not; 11 s
                           # at one thread). Each count runs the same per-count child.
                           "BENCH_ADAM_ARGS=--params 1e4 --threads 1 --reps 1"],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    throughput = json.loads((out / "train_throughput_cpu.json").read_text())
    assert sorted(r["trainer"] for r in throughput["results"]) == ["megascale", "plain"]
    rows = json.loads((out / "cpu_adam.json").read_text())["rows"]
    assert sorted((r["optimizer"], r["threads"]) for r in rows if "error" not in r) == sorted(
        (name, 1) for name in ("deepspeed_cpu_adam", "torch_adamw_foreach", "torch_adamw_fused"))
    assert all(r["params"] == 10_000 and r["params_per_s"] > 0 for r in rows)
    assert "deepspeed_cpu_adam" in proc.stdout
    # the venv's build of CPU Adam (tests/prebuild_ops.py): torch's shared folder held another venv's, rebuilt
    ds = next(r for r in rows if r["optimizer"] == "deepspeed_cpu_adam")
    assert ds["build_dir"] == str(Path(sys.prefix) / "torch_extensions")


def test_bf16_accumulation_measures_zero_for_one_micro_batch_and_the_rounding_for_more(tmp_path):
    """One micro-batch: autograd's bf16 .grad is the fp32 sum of itself, so the error is exactly 0 (both paths take
    the same micro-gradient). Eight: bf16 adds round, a few 2^-9 roundings' worth, never a whole gradient's."""
    out = tmp_path / "acc.json"
    proc = _run(["bench/bf16_accumulation.py", "--ks", "1,8", "--d-model", "32", "--layers", "2", "--heads", "2",
                 "--vocab", "256", "--seq", "16", "--micro", "2", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, eight = json.loads(out.read_text())["results"]
    assert one["relative_error"] == 0.0 and one["worst_tensor"] == 0.0
    assert 1e-4 < eight["relative_error"] <= eight["worst_tensor"] < 0.05
    assert "relative error" in proc.stdout
