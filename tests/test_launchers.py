"""The same command under `deepspeed`, `torchrun` and `mpirun` (mpi4py discovery); metrics, plots and the sample.

The other test files spawn their ranks directly (conftest.spawn_ranks); these run the launchers."""

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import losses, run_pretrain


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("deepspeed")
    proc = run_pretrain(out, data_dir, "train.max_steps=4", "train.eval_every=2", "train.eval_batches=4",
                        "metrics.plot=true", "metrics.tensorboard=true", "train.sample_tokens=8", "train.progress=true",
                        "metrics.profile_start=2", nproc=2, launcher="deepspeed")
    return out, proc


def test_deepspeed_launcher_reports_and_writes_everything(deepspeed_run):
    out, proc = deepspeed_run
    assert "launcher torch-env, backend gloo, device cpu, world size 2" in proc.stderr
    assert "unique (memory)" in proc.stderr and "applied (compute)" in proc.stderr
    assert "RMSNorm/RoPE/SwiGLU: torch" in proc.stderr and "tied-gradient reduction: PyTorch (no CUDA device)" in proc.stderr
    for line in ("checkpoint    :", "metrics       :", "loss curve    :", "val loss      :", "sample (greedy):"):
        assert line in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["event"] == "start" and start["params_unique"] < start["params_applied"] and start["flops_per_token"] > 0
    steps = [r for r in records if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "mem_rss_peak_gib"):
        assert key in steps[-1]
    assert steps[-1]["mfu"] is None  # no peak for a CPU unless metrics.peak_tflops is set
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert (out / "loss.png").stat().st_size > 10_000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "pretrain: 100%" in proc.stderr  # tqdm bar on rank 0
    assert "shm_comm" not in proc.stdout + proc.stderr  # DeepSpeed's inference-only op is neither built nor loaded


def test_a_profiled_window_writes_a_trace_and_a_table_per_rank(deepspeed_run):
    """metrics.profile_start=2 (two steps by default): each rank's trace holds steps 2 and 3 as named ranges with the
    model's matmuls inside, beside its top-operator table. The losses are the unprofiled torchrun run's (next test)."""
    out, proc = deepspeed_run
    files = sorted(p.name for p in (out / "profile").iterdir())
    assert files == [f"rank{r}_steps2-3{suffix}" for r in (0, 1) for suffix in (".json.gz", "_top.txt")]
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((out / "profile" / f"rank{rank}_steps2-3.json.gz").read_bytes()))
        names = {e.get("name") for e in trace["traceEvents"]}
        assert {"megascale step 2", "megascale step 3", "aten::mm"} <= names and "megascale step 4" not in names
        assert "aten::mm" in (out / "profile" / f"rank{rank}_steps2-3_top.txt").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], [Path(f).name for f in r["files"]]) for r in records if r.get("event") == "profile"] == [
        (3, ["rank0_steps2-3.json.gz", "rank0_steps2-3_top.txt"])]
    assert "profile written: rank0_steps2-3.json.gz" in proc.stderr


def test_a_run_that_ends_inside_the_profiled_window_writes_what_it_profiled(tmp_path):
    from megascale.train.profiling import StepProfiler

    profiler, x = StepProfiler(start=2, steps=5, out_dir=tmp_path, rank=3, device=torch.device("cpu")), torch.ones(8, 8)
    for step in (1, 2, 3):
        profiler.before_step(step)
        x = x @ x / 8
        assert profiler.after_step(step) == []  # the window (2-6) is still open
    files = profiler.close(3)
    assert [f.name for f in files] == ["rank3_steps2-3.json.gz", "rank3_steps2-3_top.txt"]
    names = {e.get("name") for e in json.loads(gzip.decompress(files[0].read_bytes()))["traceEvents"]}
    assert {"megascale step 2", "megascale step 3"} <= names and "megascale step 1" not in names
    assert profiler.close(3) == [] and profiler.after_step(4) == []  # once only


@pytest.mark.parametrize("launcher, name", [("mpirun", "mpi"), ("torchrun", "torch-env")])
def test_other_launchers_match_the_deepspeed_launcher(deepspeed_run, data_dir, tmp_path, launcher, name):
    out, _ = deepspeed_run
    proc = run_pretrain(tmp_path, data_dir, "train.max_steps=4", "train.eval_every=2", "train.eval_batches=4",
                        nproc=2, launcher=launcher)
    assert f"launcher {name}, backend gloo, device cpu, world size 2" in proc.stderr
    assert losses(tmp_path) == losses(out)


def test_peak_flops_gives_mfu(tmp_path, data_dir):
    run_pretrain(tmp_path, data_dir, "train.max_steps=2", "metrics.peak_tflops=0.5")
    record = [r for r in (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
              if "loss" in r][-1]  # the last step's (the final checkpoint's event comes after it)
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)


def test_bf16_trains_on_cpu(tmp_path, data_dir):
    run_pretrain(tmp_path, data_dir, "train.precision=bf16", "train.max_steps=3", nproc=2)
    got = losses(tmp_path)
    assert len(got) == 3 and all(l == l and l < 7 for l in got.values())  # finite, near ln(512)


def test_fp16_on_cpu_trains_where_the_cpu_has_it_and_is_one_line_elsewhere(tmp_path, data_dir):
    """fp16 on a CPU: DeepSpeed's CPU accelerator takes it where oneDNN has fp16 kernels (AVX512-FP16 Xeons), and the
    run trains; elsewhere it stops with one line, naming what to use instead."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415 (CPU here, as in the run's processes)

    proc = run_pretrain(tmp_path, data_dir, "train.precision=fp16", "train.max_steps=3", check=False)
    if get_accelerator().is_fp16_supported():
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = losses(tmp_path)
        assert len(got) == 3 and all(l == l and l < 7 for l in got.values())  # finite, near ln(512)
        return
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("error: ")] == [
        "error: train.precision=fp16 is not supported on this device (cpu); use train.precision=bf16 or fp32 (fp16 "
        "needs a GPU, or a CPU with fp16 kernels such as AVX512-FP16)"
    ]


def test_an_error_is_said_by_rank_0_and_other_ranks_wait_for_it(monkeypatch, capsys):
    """A rank other than 0 must not exit before rank 0 has printed the error (the launcher would kill rank 0 and
    the run would end without a word); still running after the grace, it says the error itself, with its rank."""
    import launch.common as common
    from megascale.errors import MegascaleError

    def failing(argv):
        raise MegascaleError("model.vocab_size=511 is odd")

    slept = []
    monkeypatch.setattr(common.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", "0")
    assert common.run(failing, []) == 2
    assert capsys.readouterr().err == "error: model.vocab_size=511 is odd\n" and slept == []
    monkeypatch.setenv("RANK", "1")
    assert common.run(failing, []) == 2
    assert slept == [common.PEER_GRACE_S]
    assert capsys.readouterr().err == "error (rank 1): model.vocab_size=511 is odd\n"


def test_a_precision_the_device_lacks_is_refused_in_one_line(monkeypatch):
    """Where the accelerator DeepSpeed detected has no fp16 (most CPUs; this machine's may have it, so its answer is
    replaced here), the run is refused before anything is built, in one line naming what to use instead."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    from megascale.errors import MegascaleError  # noqa: PLC0415
    from megascale.train.engine import check_precision  # noqa: PLC0415

    accel = get_accelerator()
    monkeypatch.setattr(accel, "is_fp16_supported", lambda: False)
    with pytest.raises(MegascaleError) as err:
        check_precision("fp16")
    assert str(err.value) == (f"train.precision=fp16 is not supported on this device ({accel.device_name()}); use "
                              "train.precision=bf16 or fp32 (fp16 needs a GPU, or a CPU with fp16 kernels such as "
                              "AVX512-FP16)")
    check_precision("fp32")  # always there


def test_deepspeed_builds_its_ops_in_the_venvs_own_folder(monkeypatch, tmp_path):
    """Two checkouts' venvs shared ~/.cache/torch_extensions and rebuilt each other's CPU Adam on every switch:
    a venv builds into <venv>/torch_extensions, where torch's build directory then lies; a folder the user
    chose stays, and outside a venv torch's default stays."""
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from megascale.train.dist import interpreter_extension_dir

    venv = tmp_path / "venv"
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    # set, then removed: pytest's delenv of an absent variable records nothing, and the value set below by the
    # function would outlive the test (later tests in this worker then rebuilt CPU Adam into this tmp folder)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    interpreter_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(venv / "torch_extensions")
    assert Path(_get_build_directory("cpu_adam", verbose=False)).parent == venv / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    interpreter_extension_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "base_prefix", str(venv))  # not a venv
    interpreter_extension_dir()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ


def test_deepspeed_builds_its_ops_with_the_interpreters_ninja(monkeypatch, tmp_path):
    """Run as .venv/bin/python launch/... (or a bench/ script) without the venv activated, DeepSpeed's JIT builds
    took the system's ninja, whose other build-log version made every switch with `make` rebuild its ops (30-55 s
    a start). ``init_distributed``, where DeepSpeed builds its first op, puts the interpreter's bin first when it
    has a ninja (once), and leaves PATH alone when it has none."""
    import sys

    import deepspeed

    from megascale.train import dist

    class Built(Exception):
        pass

    seen = []

    def fake_init(**kwargs):  # what DeepSpeed's op build would see; then stop before any process group
        seen.append(os.environ["PATH"])
        raise Built

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by the call: undone after
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    # init_distributed points TORCH_EXTENSIONS_DIR at the venv's folder first: restored after the test
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    for _ in range(3):
        with pytest.raises(Built):
            dist.init_distributed()
        (bin_dir / "ninja").write_text("")  # from the second call on
    assert seen == ["/usr/local/bin:/usr/bin"] + [f"{bin_dir}:/usr/local/bin:/usr/bin"] * 2


def test_deepspeed_skips_its_inference_only_comm_op_on_cpu():
    """On CPU, deepspeed.init_distributed built its shared-memory all-reduce op (35-46 s on a fresh 2-core machine),
    which only DeepSpeed inference calls: marked incompatible, DeepSpeed's own build step returns no op."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from megascale.train.dist import skip_inference_comm_op

    accelerator = get_accelerator()
    assert accelerator.device_name() == "cpu"
    assert accelerator.create_op_builder("ShareMemCommBuilder") is not None  # the op this CPU would build
    skip_inference_comm_op(deepspeed, accelerator)
    assert build_shm_op() is None


def test_cpu_adam_asks_cpuinfo_once(monkeypatch):
    """DeepSpeed's CPU Adam called py-cpuinfo three times as it loaded, each a subprocess that times the clock
    (1.2 s alone, 115 s of CPU for the three beside a 4-rank run): cached, once, with the same answers."""
    import cpuinfo
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from megascale.train.dist import cache_cpu_info, interpreter_extension_dir, interpreter_ninja_first

    monkeypatch.setenv("PATH", os.environ["PATH"])  # both restored after the test
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    interpreter_ninja_first()  # the prebuilt op (tests/prebuild_ops.py), as training finds it: not rebuilt
    interpreter_extension_dir()
    calls, real = [], cpuinfo.get_cpu_info

    def counted():  # the real answers: other flags would make DeepSpeed compile the op again, for them
        calls.append(1)
        return real()

    monkeypatch.setattr(cpuinfo, "get_cpu_info", counted)
    cache_cpu_info()
    cache_cpu_info()  # a second call keeps the first cache
    first = cpuinfo.get_cpu_info()
    flags = list(first["flags"])
    first["flags"].append("changed")  # a copy: what a caller does to it is its own
    assert cpuinfo.get_cpu_info()["flags"] == flags and len(calls) == 1
    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])
    assert len(calls) == 1


def test_rendezvous_ports_are_drawn_below_the_ephemeral_range():
    """A port from bind(0) lies in the range the kernel also gives outgoing connections their source ports
    from: the other test worker's gloo connections took one between the draw and the rendezvous (EADDRINUSE)."""
    import socket

    from megascale.train.dist import _ephemeral_range, free_port

    low, high = _ephemeral_range()
    assert 1024 <= low < high
    ports = {free_port() for _ in range(20)}
    assert all(p < low for p in ports) and len(ports) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free when drawn


def test_ranks_whose_rendezvous_port_was_taken_start_again_on_another(monkeypatch):
    """The harness's port race (tests/conftest.py, PORT_TAKEN): the first draw is a port something listens on, so the
    ranks fail with EADDRINUSE before anything runs; the second attempt draws a free one and the ranks meet."""
    import socket
    import sys

    import conftest

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        draws = iter([taken.getsockname()[1]])
        real = conftest.free_port
        monkeypatch.setattr(conftest, "free_port", lambda: next(draws, None) or real())
        code = "import torch.distributed as d; d.init_process_group('gloo'); d.barrier(); print('met', d.get_rank())"
        proc = conftest.spawn_ranks([sys.executable, "-c", code], 2, conftest.clean_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["met", "0", "met", "1"], proc.stderr[-2000:]
