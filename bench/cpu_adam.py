"""The host's Adam step rate: what an offloaded optimizer (train.offload_optimizer=cpu) costs per step.

    python bench/cpu_adam.py                          # 64M fp32 parameters, 1 thread and every core
    python bench/cpu_adam.py --params 256e6 --threads 1,8,32 --json runs/bench/cpu_adam.json

With ZeRO-Offload each GPU's process steps its partition of the fp32 master weights on
the host with DeepSpeed's CPU Adam, after backward and before the next forward: the
GPU waits for it. This measures that step, in parameters per second, for the thread
counts given, next to torch's AdamW on the same host (``foreach`` and ``fused``) for
reference. Run it on a training node with the threads one GPU's process gets (cores
per node / GPUs per node), then pass the rate to the planner:
``launch/plan.py ... --host-adam-rate <params/s>``.

Bytes per parameter of one step: read weight, gradient and both moments, write weight
and both moments, 28 bytes in fp32; ``GB/s`` is that over the step's time (the step is
memory-bound, so this against the node's memory bandwidth says how close it runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BYTES_PER_PARAM = 28  # fp32: read p, g, m, v (16), write p, m, v (12)


def time_step(step, reps: int) -> float:
    """Median seconds of ``step()`` over ``reps`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def optimizers(param: torch.nn.Parameter) -> dict[str, torch.optim.Optimizer]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 (JIT-builds its op on first use)

    return {
        "deepspeed_cpu_adam": DeepSpeedCPUAdam([param], lr=1e-4, adamw_mode=True),
        "torch_adamw_foreach": torch.optim.AdamW([param], lr=1e-4, foreach=True),
        "torch_adamw_fused": torch.optim.AdamW([param], lr=1e-4, fused=True),
    }


def measure(n_params: int, threads: int, reps: int) -> list[dict]:
    """In this process, whose OpenMP threads were fixed at start-up (``in_child``)."""
    from megascale.train.dist import prepare_op_builds  # noqa: PLC0415

    prepare_op_builds()  # as training has them: the venv's build of the op, py-cpuinfo asked once
    torch.set_num_threads(threads)
    param = torch.nn.Parameter(torch.randn(n_params))
    param.grad = torch.randn(n_params) * 1e-3
    rows = []
    for name, opt in optimizers(param).items():
        try:
            seconds = time_step(opt.step, reps)
        except RuntimeError as err:  # e.g. a torch build without the fused CPU kernel
            rows.append({"optimizer": name, "threads": threads, "error": str(err).splitlines()[0]})
            continue
        rows.append({"optimizer": name, "threads": threads, "params": n_params, "step_s": seconds,
                     "params_per_s": n_params / seconds, "gbps": n_params * BYTES_PER_PARAM / seconds / 1e9})
        if name == "deepspeed_cpu_adam":  # where its op was built and loaded from (None: torch's shared folder)
            rows[-1]["build_dir"] = os.environ.get("TORCH_EXTENSIONS_DIR")
        del opt
    return rows


def in_child(n_params: int, threads: int, reps: int) -> list[dict]:
    """``measure`` in a fresh process with OMP_NUM_THREADS=threads: DeepSpeed's op sizes its OpenMP
    pool from the environment, not from torch.set_num_threads (measured: 41 ms against 48 ms per
    step at "1 thread" on 2 cores, so it had used both)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # This interpreter's ninja first, as `make` and the launchers have it: a system ninja of another version
    # keeps another build log, and DeepSpeed's op is then compiled again (~1 min) by whichever ran last.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    cmd = [sys.executable, __file__, "--child", "--params", str(n_params), "--threads", str(threads), "--reps", str(reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("ROWS ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"error: the measurement at {threads} threads failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[5:])


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=64e6, help="parameters in the stepped partition (default 64M: 1.8 GB of state)")
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated thread counts")
    p.add_argument("--reps", type=int, default=5, help="timed steps per optimizer and thread count (median)")
    p.add_argument("--json", type=Path, help="write the rows, host and date here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    threads = sorted({int(t) for t in args.threads.split(",") if t.strip()})
    if args.child:
        print("ROWS " + json.dumps(measure(int(args.params), threads[0], args.reps)), flush=True)
        return 0
    rows = [row for t in threads for row in in_child(int(args.params), t, args.reps)]
    print(f"{'optimizer':<22} {'threads':>7} {'step s':>8} {'Mparams/s':>10} {'GB/s':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['optimizer']:<22} {r['threads']:>7} {'—':>8} {'—':>10} {'—':>6}  {r['error']}")
        else:
            print(f"{r['optimizer']:<22} {r['threads']:>7} {r['step_s']:>8.3f} {r['params_per_s'] / 1e6:>10.1f} {r['gbps']:>6.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        host = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "date": dt.date.today().isoformat()}
        args.json.write_text(json.dumps({"host": host, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
