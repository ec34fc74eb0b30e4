"""Trace fine-tuning: start from a pretraining checkpoint, train on (query, trace, response) examples.

    deepspeed --num_gpus 2 launch/finetune_trace.py --config configs/trace_tiny.yaml --init runs/tiny/checkpoints
    python launch/finetune_trace.py --config configs/trace_tiny.yaml --init runs/tiny/checkpoints finetune.trace_weight=0
    python launch/finetune_trace.py --config configs/trace_tiny.yaml --init runs/tiny/checkpoints --resume

The model shape comes from the checkpoint (any tp/pp/dp layout, tied or untied);
the run reuses the pretraining loop, engine, checkpoints and metrics.
"""

from __future__ import annotations

import argparse
import sys

import common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (configs/trace_tiny.yaml)")
    p.add_argument("--init", metavar="CHECKPOINT", help="pretraining checkpoint: a step_* dir, a checkpoints/ dir or a run dir (sets finetune.init)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. finetune.trace_weight=0 train.max_steps=100")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume a fine-tuning run from CKPT; alone: the latest in train.out_dir")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from megascale.config import describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    overrides = list(args.overrides)
    overrides += [f"finetune.init={args.init}"] if args.init else []
    overrides += [f"train.resume={args.resume}"] if args.resume else []
    from megascale.finetune.stage import finetune_config

    cfg, _, _ = finetune_config(load_config(args.config, overrides))  # checked before any process group exists
    common.check_layout(cfg)

    from megascale.finetune.stage import finetune
    from megascale.train.dist import init_distributed
    from megascale.train.preempt import PREEMPTED_EXIT

    ctx = init_distributed(cfg.train.collective_timeout_s)
    summary = finetune(cfg, ctx)
    if ctx.is_main:
        report(summary)
    return PREEMPTED_EXIT if summary.run.preempted else 0


def report(summary) -> None:
    lines = common.summary_lines(summary.run)
    if summary.accuracy_png:
        lines.append(f"accuracy plot : {summary.accuracy_png}")
    for key in ("acc_in", "acc_out", "step_acc_in", "step_acc_out", "trace_tok_acc_in"):
        if key in summary.first and key in summary.last:
            lines.append(f"{key:<14}: {summary.first[key]:.3f} -> {summary.last[key]:.3f} (held-out)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    common.setup_logging()
    common.exit_with(common.run(main, sys.argv[1:]))
