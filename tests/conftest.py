"""Shared fixtures: a tiny stdlib dataset and a launcher runner for multi-process tests.

Every multi-rank test starts real processes on gloo with the tiny test model
below, and reads the losses back from the run's metrics.jsonl. The ranks are
spawned directly with torchrun's variables (``spawn_ranks``); test_launchers.py
runs the launchers themselves (torchrun, deepspeed, mpirun, srun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "launch" / "pretrain.py"
BIN = Path(sys.executable).parent
# The venv's tools first, for this process and all it starts: DeepSpeed JIT-builds its ops (CPU Adam)
# with the first ninja on PATH, and a system ninja of another version keeps a build log the
# venv's cannot read, so each rebuilt what the other had built (~30 s and ~55 s on the CI machine).
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# A model small enough for 2-4 CPU ranks in seconds, with tied blocks (cycle:2) and GQA.
TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
    "model.max_seq_len=32", "model.sharing=cycle:2",
    "data.corpus=prepared", "data.seq_len=32", "optim.lr=1e-3", "optim.warmup_steps=2",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=5", "train.log_every=1",
    "train.eval_every=0", "train.sample_tokens=0", "train.progress=false",
    "metrics.tensorboard=false", "metrics.plot=false",
]


# What steers the builds and launches of later tests in a worker. Libraries set others once, on first import
# (DeepSpeed: TORCHINDUCTOR_CACHE_DIR, OMP_NUM_THREADS; torch: PYTORCH_NVML_BASED_CUDA_CHECK); those may stay.
WATCHED_ENV = ("PATH", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def environment_is_left_as_found():
    """A test that changed one of WATCHED_ENV and left it changed bent every later test of its worker: a
    TORCH_EXTENSIONS_DIR left pointing at one test's tmp folder made the next CPU Adam user rebuild the op
    there (50-100 s, twice a suite). Tests change the environment through monkeypatch, which puts it back."""
    before = {k: os.environ.get(k) for k in os.environ if k in WATCHED_ENV or k.startswith("MEGASCALE_")}
    yield
    after = {k: os.environ.get(k) for k in os.environ if k in WATCHED_ENV or k.startswith("MEGASCALE_")}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test left os.environ changed: {changed}"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The embedded stdlib corpus, small: 512-token vocabulary, ~600 kB of source."""
    from megascale.data import ensure_stdlib_dataset

    path = tmp_path_factory.mktemp("data") / "stdlib-512"
    ensure_stdlib_dataset(path, vocab_size=512, max_bytes=600_000, seed=0)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any launcher variables, one thread per rank.

    TRITON_INTERPRET goes too: the kernel test modules set it in this process when they are
    collected, and a run that inherited it would be one that nobody asked for (a test that
    wants the interpreter in a subprocess passes it in ``extra``).
    """
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PMI_", "OMPI_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def free_port() -> int:
    # below the ephemeral range: a port bind(0) gave was taken by the other worker's gloo connections
    # before the rendezvous bound it (EADDRINUSE; the deepspeed launcher tests' fixture, 2026-11-28)
    from megascale.train.dist import free_port as below_ephemeral  # noqa: PLC0415 (imports torch)

    return below_ephemeral()


# A rendezvous port checked free can still be taken before the ranks' store listens on it (seen once
# in a CI run, 2026-11-29: EADDRINUSE in init_process_group, nothing trained yet). A port collision is the
# harness's, not the code under test's: such a start is run again with another port, twice at most.
PORT_TAKEN = "EADDRINUSE"


def _port_taken(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode != 0 and PORT_TAKEN in proc.stderr


def spawn_ranks(cmd: list[str], nproc: int, env: dict[str, str], timeout: float, cwd: Path = ROOT,
                grace: float = 0.0) -> subprocess.CompletedProcess:
    """``_spawn_once``, started again on another rendezvous port if the drawn one was taken meanwhile."""
    for _ in range(2):
        proc = _spawn_once(cmd, nproc, env, timeout, cwd, grace)
        if not _port_taken(proc):
            return proc
    return _spawn_once(cmd, nproc, env, timeout, cwd, grace)


def _spawn_once(cmd: list[str], nproc: int, env: dict[str, str], timeout: float, cwd: Path = ROOT,
                grace: float = 0.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` as ``nproc`` ranks on this host, as torchrun does, without torchrun's own process.

    torchrun's agent imports torch before it starts a rank (2.4 s of CPU, a third of a 2-rank tiny
    run on the 2-core CI machine): with a hundred multi-rank runs in the suite, that was the largest
    cost left. The ranks get torchrun's variables (the "torch-env" launcher) and one rendezvous port.
    When a rank fails, the others are killed (after ``grace`` seconds), as torchrun does, so one
    rank's error cannot leave the rest waiting in a collective. stdout and stderr come back
    rank after rank; the return code is the first failing rank's (0 when all succeed).
    """
    import tempfile
    import time

    shared = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    files = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in range(nproc)]
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err,
                              env={**env, **shared, "RANK": str(r), "LOCAL_RANK": str(r), "GROUP_RANK": "0"})
             for r, (out, err) in enumerate(files)]
    start, failed_at = time.monotonic(), None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace:
                break
            if time.monotonic() - start > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    read = lambda f: (f.seek(0), f.read().decode(errors="replace"))[1]  # noqa: E731
    stdout, stderr = "".join(read(o) for o, _ in files), "".join(read(e) for _, e in files)
    for out, err in files:
        out.close(), err.close()
    return subprocess.CompletedProcess(cmd, next((c for c in codes if c != 0), 0), stdout, stderr)


def launch_command(nproc: int, launcher: str) -> list[str]:
    if launcher in ("single", "spawn"):
        return [sys.executable, str(PRETRAIN)]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), f"--nproc-per-node={nproc}", f"--master-port={free_port()}", str(PRETRAIN)]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={free_port()}", str(PRETRAIN)]
    if launcher == "mpirun":
        return [str(BIN / "mpirun"), "-n", str(nproc), sys.executable, str(PRETRAIN)]
    raise ValueError(launcher)


def run_pretrain(out_dir: Path, data: Path, *overrides: str, nproc: int = 1, launcher: str | None = None,
                 env: dict[str, str] | None = None, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run launch/pretrain.py on the tiny model; returns the finished process."""
    launcher = launcher or ("single" if nproc == 1 else "spawn")
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *TINY, f"data.path={data}", f"train.out_dir={out_dir}", *overrides]
    for _ in range(3):  # a launcher's rendezvous port taken meanwhile: again with another (PORT_TAKEN)
        run_env = {**(env or {}), "MASTER_PORT": str(free_port())} if launcher == "mpirun" else env
        cmd = launch_command(nproc, launcher) + args  # the torchrun and deepspeed commands draw their port here
        if launcher == "spawn":
            proc = spawn_ranks(cmd, nproc, clean_env(**(run_env or {})), timeout)
            break
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(**(run_env or {})), cwd=ROOT, timeout=timeout)
        if launcher == "single" or not _port_taken(proc):
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"pretrain failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(out_dir: Path) -> list[dict]:
    """Every record of the run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def events(out_dir: Path, name: str) -> list[dict]:
    """The run's records of one event kind ("untie", "probe", "state_memory", ...)."""
    return [r for r in metrics(out_dir) if r.get("event") == name]


def state_memory(out_dir: Path) -> list[dict]:
    """Per rank, the first state-memory report: formula and measured bytes."""
    return events(out_dir, "state_memory")[0]["ranks"]


def losses(out_dir: Path) -> dict[int, float]:
    """step → training loss from the run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in metrics(out_dir) if "loss" in r}


def same_state(a, b, where: str = "") -> None:
    """Two loaded checkpoint files hold the same values (tensors bit for bit, DeepSpeed's plain objects by field)."""
    import torch  # noqa: PLC0415 (conftest itself stays import-light)

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b), where
        for key in a:
            same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. the loss scaler's state
        assert type(a) is type(b), where
        same_state(vars(a), vars(b), where)
    else:
        assert a == b, (where, a, b)


def same_checkpoint(saved: Path, other: Path) -> None:
    """Every file of two checkpoints: the same names, the same tensors and state, the same metadata but for
    the run's directory and the settings that do not change the state."""
    import torch  # noqa: PLC0415

    names = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
    assert any(n.endswith(".pt") for n in names), names
    for name in names:
        if name.endswith(".pt"):
            same_state(torch.load(saved / name, weights_only=False), torch.load(other / name, weights_only=False), name)
    metas = [json.loads((c / "megascale.json").read_text()) for c in (saved, other)]
    for meta in metas:
        for key in ("out_dir", "async_save", "save_every"):
            meta["config"]["train"].pop(key)
    assert metas[0] == metas[1]


def last_checkpoint(out_dir: Path) -> Path:
    """The step_* directory ``latest`` names in a run's checkpoints."""
    return out_dir / "checkpoints" / (out_dir / "checkpoints" / "latest").read_text()


def same_adam_state(converted: Path, source: Path) -> None:
    """Two checkpoints (step_* directories, any layouts) hold the same Adam moments, bit for bit, and step count."""
    import torch  # noqa: PLC0415

    from megascale.train.checkpoint import lazy_adam_state, read_meta  # noqa: PLC0415

    got, want = (lazy_adam_state(path, read_meta(path)) for path in (converted, source))
    assert got.step == want.step >= 2
    for key, moments in want.moments.items():
        assert sorted(got.moments[key]) == sorted(moments)
        for name in moments:
            torch.testing.assert_close(got.moments[key][name], moments[name], rtol=0, atol=0, msg=f"{key} {name}")
