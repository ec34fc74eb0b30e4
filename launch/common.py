"""What every launcher shares: import path, logging per rank, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from megascale.errors import MegascaleError  # noqa: E402

# How long a rank other than 0 waits, after an error, for rank 0 to have said it (see report_error).
PEER_GRACE_S = 5.0


def launch_world_size() -> int | None:
    """The world size the launcher announced, if any (before any process group exists)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return None


def add_model_args(p) -> None:
    """The arguments launch/generate.py and launch/evaluate.py share: which model, where, how split."""
    p.add_argument("--checkpoint", required=True,
                   help="a step_* directory, a checkpoints/ directory or a run directory; or a Hugging Face Llama "
                        "directory with a sentencepiece tokenizer.model (a megascale export)")
    p.add_argument("--device", default="auto", help="one process: auto (cuda when there is one), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (launch a multiple of tp × pp processes, e.g. with deepspeed; "
                                                        "the copies beyond one share the batches)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`


def open_model(args):
    """(the checkpoint as a ``megascale.generation.Generator``, whether this process reports): one process, or
    a multiple of tp × pp ranks under a launcher, each holding its part of one copy of the model."""
    from megascale.generation import Generator  # noqa: PLC0415 (imports torch)

    if (launch_world_size() or 1) == 1 and args.tp * args.pp == 1:
        return Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype), True
    if args.tp < 1 or args.pp < 1:
        raise MegascaleError(f"--tp {args.tp} --pp {args.pp}: use positive counts")
    from megascale.train.dist import init_distributed  # noqa: PLC0415

    ctx = init_distributed()
    return Generator.from_checkpoint(args.checkpoint, dtype=args.dtype, tp=args.tp, pp=args.pp, ctx=ctx), ctx.is_main


def launch_rank() -> int:
    """This process's global rank as the launcher set it (before any process group exists)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def quiet_third_party() -> None:
    """Silence start-up chatter that says nothing to a user: DeepSpeed's accelerator guess, torch deprecations."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")
    # DeepSpeed's pipeline engine broadcasts inside autograd; torch warns on every backward.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere, so N ranks do not print N copies (and the process's environment
    for the third-party code every launcher reaches: ``quiet_third_party``)."""
    quiet_third_party()
    level = logging.INFO if launch_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_layout(cfg) -> None:
    """Check the parallel layout against the world size the launcher announced, before any process group exists."""
    world = launch_world_size()
    if world is not None:
        from megascale.parallel.topology import ParallelDims  # noqa: PLC0415

        ParallelDims.from_world(cfg.parallel.tp, cfg.parallel.pp, world, cfg.parallel.cp).check_model(cfg.model)


def summary_lines(summary) -> list[str]:
    """Where a finished run put its checkpoint, metrics and plots (a megascale RunSummary)."""
    lines = [f"run directory : {summary.out_dir}", f"checkpoint    : {summary.checkpoint}", f"metrics       : {summary.metrics}"]
    if summary.loss_png:
        lines.append(f"loss curve    : {summary.loss_png}")
    if summary.first_val_loss is not None and summary.final_val_loss is not None:
        lines.append(f"val loss      : {summary.first_val_loss:.4f} -> {summary.final_val_loss:.4f}")
    return lines


def run(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Call ``main``; a MegascaleError becomes one line on stderr (``report_error``) and exit status 2, Ctrl-C one
    line and 130.

    The process group is torn down on every way out: left to the interpreter's exit, gloo's
    threads were sometimes destroyed while still joinable ("terminate called without an active
    exception", exit status 250 after a run that had finished and saved). ``exit_with`` then
    ends the process without the interpreter's teardown, where that crash still happened.
    """
    try:
        return main(argv)
    except MegascaleError as err:
        report_error(err, launch_rank())
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the traceback would only say where the step was
        if launch_rank() == 0:
            print("interrupted (Ctrl-C): the checkpoints already published are complete; continue with "
                  "train.resume=auto (SIGTERM or SIGUSR1 would have saved this step first)", file=sys.stderr, flush=True)
        return 130
    finally:
        from megascale.train.dist import leave_process_group  # noqa: PLC0415 (imports torch)

        leave_process_group()


def report_error(err: MegascaleError, rank: int) -> None:
    """Rank 0 says what is wrong, at once; any other rank first gives it PEER_GRACE_S to do so.

    Every rank usually meets the same error (a bad config, a missing file). Launchers stop all
    ranks as soon as one exits with an error: had rank 1 exited first, rank 0 could be killed
    before its line was out, and the run would end saying nothing. Waiting, a rank is normally
    stopped with the others once rank 0 has exited; if it is still running after the grace, the
    error was its own, and it says so with its rank.
    """
    if rank == 0:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return
    time.sleep(PEER_GRACE_S)
    print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)


def exit_with(code: int) -> None:
    """End the entry point with ``code`` (what ``run`` returned), skipping the interpreter's teardown."""
    from megascale.train.dist import exit_process  # noqa: PLC0415 (imports torch)

    exit_process(code)
