"""Cluster operation: the sbatch scripts under SLURM's variables, preemption → checkpoint → requeue → resume, dead ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY, clean_env, free_port, losses
from megascale.train.dist import detect_launcher, slurm_env

FAKE = ROOT / "tests" / "fake_slurm"  # srun/scontrol stand-ins: the sbatch script itself runs unchanged


def slurm_environment(tmp_path: Path, job_id: int, ntasks: int = 2, **extra: str) -> dict[str, str]:
    env = clean_env(SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="test", SLURM_JOB_NODELIST="localhost",
                    SLURM_NTASKS=str(ntasks), SLURM_SUBMIT_DIR=str(ROOT), PYTHON=sys.executable,
                    MASTER_PORT=str(free_port()), FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"),
                    FAKE_SLURM_PIDS=str(tmp_path / f"pids-{job_id}"), **extra)
    env["PATH"] = f"{FAKE}:{env['PATH']}"
    return env


def sbatch(tmp_path: Path, run_dir: Path, data_dir: Path, *overrides: str, job_id: int = 4242, **popen) -> subprocess.Popen:
    """Run launch/slurm/pretrain.sbatch as SLURM would run the batch script on the first node."""
    cmd = ["bash", str(ROOT / "launch" / "slurm" / "pretrain.sbatch"), "configs/tiny.yaml", *TINY, f"data.path={data_dir}", *overrides]
    env = slurm_environment(tmp_path, job_id, RUN_DIR=str(run_dir))
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {step} in {timeout} s")


def rank_pids(tmp_path: Path, job_id: int) -> list[int]:
    return [int(p) for p in (tmp_path / f"pids-{job_id}").read_text().split()]


def test_slurm_task_variables_map_to_torch_rendezvous():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123",
           "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    assert detect_launcher(env) == "slurm"
    assert slurm_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "20123"}
    assert detect_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == "single"  # the batch script itself
    assert detect_launcher({**env, "RANK": "0", "WORLD_SIZE": "1"}) == "torch-env"  # torchrun inside an allocation


def test_sbatch_script_runs_two_ranks(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    rc, out = finish(sbatch(tmp_path, run_dir, data_dir, "train.max_steps=3"))
    assert rc == 0, out[-3000:]
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and "launcher slurm" in out
    assert sorted(losses(run_dir)) == [1, 2, 3]


STEPS = ["train.max_steps=24", "train.log_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> Path:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    rc, out = finish(sbatch(tmp, tmp / "run", data_dir, *STEPS, job_id=1111))
    assert rc == 0, out[-3000:]
    return tmp / "run"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_checkpoints_requeues_and_resumes_to_the_same_losses(tmp_path, data_dir, uninterrupted, signum):
    steps = STEPS
    run_dir = tmp_path / "preempted"
    proc = sbatch(tmp_path, run_dir, data_dir, *steps, start_new_session=True)
    wait_for_step(run_dir, 3, proc)
    # SIGTERM as SLURM sends it: every task of the step and the batch shell. SIGUSR1 to rank 1 alone:
    # rank 0 learns of it from the logging step's all-reduce, and both stop at the same step.
    for pid in rank_pids(tmp_path, 4242) if signum == signal.SIGTERM else rank_pids(tmp_path, 4242)[1:]:
        os.kill(pid, signum)
    if signum == signal.SIGTERM:
        proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 3, out[-3000:]
    assert "requeue 4242" in (tmp_path / "scontrol.log").read_text()
    stopped = max(losses(run_dir))
    assert stopped < 24 and (run_dir / "checkpoints" / f"step_{stopped:08d}").is_dir()
    events = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen_by_rank0 = signum.name if signum == signal.SIGTERM else "a stop signal on another rank"
    assert [e["signal"] for e in events if e.get("event") == "preempted"] == [seen_by_rank0]

    rc, out = finish(sbatch(tmp_path, run_dir, data_dir, *steps))  # the requeued job: same id, same run directory
    assert rc == 0, out[-3000:]
    assert f"at step {stopped}: exact" in out
    assert losses(run_dir) == pytest.approx(losses(uninterrupted), rel=1e-6)


def test_a_dead_rank_makes_the_others_exit_within_the_timeout(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = sbatch(tmp_path, run_dir, data_dir, "train.max_steps=100000", "train.collective_timeout_s=20")
    wait_for_step(run_dir, 2, proc)
    killed = time.time()
    os.kill(rank_pids(tmp_path, 4242)[1], signal.SIGKILL)
    rc, out = finish(proc, timeout=180)
    assert rc != 0
    assert time.time() - killed < 20 + 40, out[-3000:]  # the timeout plus process teardown


def test_ctrl_c_is_one_line_and_keeps_the_checkpoints(tmp_path, data_dir):
    """SIGINT (Ctrl-C in a terminal) ends a one-process run with one line and status 130, not a traceback; the
    checkpoint published before it is whole and resumes. SIGINT is reset to its default in the child: a test run
    in the background of a shell would otherwise hand it down ignored."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), *TINY,
           f"data.path={data_dir}", f"train.out_dir={run_dir}", "train.max_steps=100000", "train.save_every=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc)
    assert rc == 130 and "Traceback" not in out, out[-3000:]
    assert "interrupted (Ctrl-C): the checkpoints already published are complete" in out
    rc, out = finish(subprocess.Popen([*cmd[:-2], "train.max_steps=3", "train.resume=auto"], cwd=ROOT, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    assert rc == 0 and "resumed from" in out, out[-3000:]
