"""Pretrain a Llama-style decoder (tied blocks optional) with DeepSpeed.

    deepspeed launch/pretrain.py --config configs/tiny.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 launch/pretrain.py --config configs/tiny.yaml
    mpirun -n 2 python launch/pretrain.py --config configs/tiny.yaml
    python launch/pretrain.py --config configs/tiny.yaml --resume        # latest checkpoint in train.out_dir
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/tiny.yaml, configs/125m.yaml, ...)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.max_steps=50 model.sharing=cycle:2")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from CKPT (a step_* dir, checkpoints/ dir or run dir); alone: the latest in train.out_dir")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from megascale.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides)  # validated before any process group exists
    if cfg.train.init_hf:
        from megascale.export.hf import with_hf_model

        cfg = with_hf_model(cfg, Path(cfg.train.init_hf))
    common.check_layout(cfg)

    from megascale.train.dist import init_distributed
    from megascale.train.loop import pretrain
    from megascale.train.preempt import PREEMPTED_EXIT

    ctx = init_distributed(cfg.train.collective_timeout_s)
    summary = pretrain(cfg, ctx)
    if ctx.is_main:
        report(summary)
    return PREEMPTED_EXIT if summary.preempted else 0


def report(summary) -> None:
    lines = common.summary_lines(summary)
    if summary.sample:
        lines.append("sample (greedy):\n" + summary.sample)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
