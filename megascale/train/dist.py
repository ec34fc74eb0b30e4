"""Process-group start-up under any launcher.

``deepspeed`` and ``torchrun`` set RANK/WORLD_SIZE/MASTER_* in the environment;
``mpirun`` sets only its own PMI/OMPI variables, and DeepSpeed's MPI discovery
(mpi4py) maps those to the torch ones; ``srun`` (one task per GPU, no ssh, no
launcher of ours in between) sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which
map to the torch ones here, with the rendezvous host from MASTER_ADDR (the sbatch
scripts set it to the first node) or else the node srun was started from. A bare
``python launch/pretrain.py`` is a world of one. The backend comes from the
accelerator DeepSpeed detects at run time: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch

log = logging.getLogger(__name__)

_TORCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class DistContext:
    """Who this process is; passed explicitly to everything that communicates."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """Name the launcher from the environment: torch-env, slurm, mpi or single."""
    env = dict(os.environ) if env is None else env
    if all(k in env for k in ("RANK", "WORLD_SIZE")):
        return "torch-env"
    # A task of an srun step (SLURM_STEP_NUM_TASKS is set for step tasks, not for the batch
    # script itself); mpirun inside an allocation also inherits SLURM_*, but sets OMPI_*.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and "OMPI_COMM_WORLD_RANK" not in env:
        return "slurm"
    if any(k in env for k in _MPI_RANK_VARS):
        return "mpi"
    return "single"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, for a rendezvous on this host, drawn below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which it also uses
    for the source port of every outgoing connection: between choosing the port and the rendezvous
    binding it, another process's connection (gloo opens many) took it, and the run failed with
    EADDRINUSE. Ports below the range are taken only by listeners, and the draw is checked free.
    """
    low = _ephemeral_range()[0]
    draw = random.Random()  # seeded from the OS: processes choosing at the same moment draw apart
    for _ in range(200):
        port = draw.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every draw taken: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default (other systems use 49152-65535, above it too)


def _single_process_env() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def slurm_env(env: dict[str, str]) -> dict[str, str]:
    """The torch rendezvous variables for an srun task, from SLURM's own."""
    addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)  # same on every node
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": addr, "MASTER_PORT": port}


STALE_LOCK_S = 600  # building a DeepSpeed CPU op takes about a minute; a lock this old is left over


def stale_build_locks(max_age_s: float = STALE_LOCK_S, now: float | None = None) -> list[Path]:
    """Lock files of torch C++ extension builds (DeepSpeed JIT-builds CPU Adam for offload) older than ``max_age_s``.

    A process killed while it holds such a lock leaves it behind, and every later start
    then waits on it forever without a word: the lock is worth a line before that wait.
    """
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415 (private, hence the guard)

    try:
        # the folder of one op's build (torch makes it if missing): CPU Adam's, the op DeepSpeed builds with offload
        root = Path(_get_build_directory("cpu_adam", verbose=False)).parent
    except Exception:  # noqa: BLE001 - a torch without it: nothing to check
        return []
    now = time.time() if now is None else now
    return sorted(p for p in root.glob("*/lock") if now - p.stat().st_mtime > max_age_s)


def warn_stale_build_locks() -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    for lock in stale_build_locks():
        log.warning("%s is %d min old: a run killed while building a DeepSpeed op left it, and start-up waits on it "
                    "for ever; remove it if no other run is building", lock, (time.time() - lock.stat().st_mtime) // 60)


def interpreter_ninja_first() -> None:
    """Put this interpreter's bin folder first on PATH when it holds a ninja (a venv's, from requirements.txt).

    DeepSpeed JIT-builds its CPU ops (CPU Adam with offload, in ``build_engine``) with the first ``ninja`` on
    PATH. Run as ``.venv/bin/python launch/...`` (or a ``bench/`` script) without activating the venv, that was
    the system's, and a ninja of another version than the venv's keeps another build log: every switch between
    that and ``make`` (which puts the venv first) rebuilt them, 30-55 s a start on 2 cores. Called on the way to
    every build, so that every entry point that starts a process group gets it, not only the launchers.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bin_dir) / "ninja").is_file() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join(filter(None, [bin_dir, path]))


def prepare_op_builds() -> None:
    """Before anything loads DeepSpeed's JIT-built ops (CPU Adam): where and how they are built and found.

    Every process that may load one calls this (training's ``init_distributed``, ``bench/cpu_adam.py``):
    one that did not looked in torch's shared folder, found another venv's build there, and compiled
    the op again (88 s inside the make-bench test of a fresh clone, 2026-11-28).
    """
    interpreter_ninja_first()  # DeepSpeed builds its CPU ops with the first ninja on PATH,
    interpreter_extension_dir()  # into this folder,
    warn_stale_build_locks()  # and under such a lock
    cache_cpu_info()  # asking the CPU's features once


def interpreter_extension_dir() -> None:
    """Build DeepSpeed's JIT ops into the venv (``<venv>/torch_extensions``) unless TORCH_EXTENSIONS_DIR is set.

    torch keeps every environment's C++ extension builds in one folder per torch version
    (``~/.cache/torch_extensions/py311_cpu``), and it rebuilds an op whenever the include paths of the
    build it finds are not its own. Two checkouts, each with its own venv, rebuilt each other's CPU Adam
    on every switch (35-55 s on 2 cores, and once inside a test's timing). A venv's own folder is keyed by
    the venv, and goes with it on ``rm -rf .venv``. Outside a venv, torch's default stays.
    """
    if sys.prefix != sys.base_prefix and not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


def skip_inference_comm_op(deepspeed, accelerator) -> None:
    """Keep DeepSpeed from building its shared-memory all-reduce op, which training never calls.

    On CPU, ``deepspeed.init_distributed`` JIT-builds ``deepspeed_shm_comm`` (35-46 s on 2 cores on a fresh
    machine, ~0.1 s a rank start afterwards to check it is built and load it). Only ``inference_all_reduce``
    calls it (DeepSpeed inference's tensor parallelism); ZeRO, the pipeline and our collectives use the process
    group, and ``inference_all_reduce`` itself falls back to it without the op. DeepSpeed builds the op only
    when its table of compatible ops says it can, and keeps that table in one dict, so that an edit to it lasts:
    marking the op incompatible there skips the build. A DeepSpeed without that table builds it as before.
    """
    if accelerator.device_name() != "cpu":
        return  # the CUDA accelerator has no such op
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(table, dict):
        table[builder.NAME] = False


def cache_cpu_info() -> None:
    """Ask py-cpuinfo once per process: DeepSpeed's CPU Adam asks it three times as it loads.

    ``cpuinfo.get_cpu_info`` runs a Python subprocess each call (probing CPUID and timing the
    clock): 1.2 s each on this 2-core machine alone, many times that beside other busy processes,
    and DeepSpeed calls it from the op builder's compiler flags (twice) and from the optimizer.
    DeepSpeed imports the function at each call, so replacing the module's attribute with a
    memoised one serves all three. The CPU does not change under a running process.
    """
    try:
        import cpuinfo  # noqa: PLC0415 (DeepSpeed's dependency)
    except ImportError:
        return
    if getattr(cpuinfo.get_cpu_info, "megascale_cached", False):
        return
    first = functools.cache(cpuinfo.get_cpu_info)

    def get_cpu_info() -> dict:
        return copy.deepcopy(first())  # a copy each time, as the original returns a fresh dict

    get_cpu_info.megascale_cached = True
    cpuinfo.get_cpu_info = get_cpu_info


def init_distributed(timeout_s: float = 1800.0) -> DistContext:
    """Start the default process group for whatever launched us and return our identity.

    ``timeout_s`` bounds every collective: when a rank dies the others fail out of
    their next collective after this long instead of waiting forever.
    """
    import deepspeed  # noqa: PLC0415 (heavy import kept out of module import)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    launcher = detect_launcher()
    if launcher == "single":
        _single_process_env()
    elif launcher == "slurm":
        os.environ.update(slurm_env(dict(os.environ)))
    port = int(os.environ.get("MASTER_PORT", 29500))
    skip_inference_comm_op(deepspeed, get_accelerator())
    prepare_op_builds()
    deepspeed.init_distributed(
        auto_mpi_discovery=launcher == "mpi",
        distributed_port=port,
        verbose=False,
        timeout=timedelta(seconds=timeout_s),
    )
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = torch.distributed.get_backend()
    return DistContext(rank, world, local_rank, device, backend, launcher)


def leave_process_group() -> None:
    """Tear the process group down (every group), if there is one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank that has finished: leave the process group, flush, exit without interpreter teardown.

    A finished rank now and then aborted in the interpreter's teardown ('terminate called
    without an active exception', SIGABRT, after the run had saved and printed everything):
    C++ threads of the collectives' backends destroyed while still joinable, or touching
    Python objects once the interpreter is half gone (pytorch/pytorch#179291). Destroying the
    process group first made it rarer, not impossible. Nothing of ours needs that teardown (the
    metrics writer is closed and checkpoints are on disk), so the process skips it: a SLURM job
    or a test then sees the run's own exit status, never a crash after success.
    """
    leave_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
