"""Process-group start-up under any launcher.

``deepspeed``, ``torchrun`` and ``srun`` wrappers set RANK/WORLD_SIZE/MASTER_*
in the environment; ``mpirun`` sets only its own PMI/OMPI variables, and
DeepSpeed's MPI discovery (mpi4py) maps those to the torch ones. A bare
``python launch/pretrain.py`` is a world of one. The backend comes from the
accelerator DeepSpeed detects at run time: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

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
    """Name the launcher from the environment: torch-env, mpi or single."""
    env = dict(os.environ) if env is None else env
    if all(k in env for k in ("RANK", "WORLD_SIZE")):
        return "torch-env"
    if any(k in env for k in _MPI_RANK_VARS):
        return "mpi"
    return "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_minutes: float = 30.0) -> DistContext:
    """Start the default process group for whatever launched us and return our identity."""
    import deepspeed  # noqa: PLC0415 (heavy import kept out of module import)
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    launcher = detect_launcher()
    if launcher == "single":
        _single_process_env()
    port = int(os.environ.get("MASTER_PORT", 29500))
    deepspeed.init_distributed(
        auto_mpi_discovery=launcher == "mpi",
        distributed_port=port,
        verbose=False,
        timeout=timedelta(minutes=timeout_minutes),
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
