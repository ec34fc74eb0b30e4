"""Untie a running engine in place and report what changed (run by tests/test_untie.py, one process per rank).

    torchrun --nproc-per-node N tests/untie_check.py UNITS KEY=VALUE...

Trains two steps of the tiny model, unties UNITS (comma-separated layers) as one
decision, and prints on rank 0 one JSON line: validation loss before and after
(and whether its forwards ran with autograd on),
the largest difference between every new parameter's fp32 weight and Adam moments
and those of the parameter it was copied from (this rank's data-parallel slices),
the elements of untie state each rank held, the optimizer step and LR before
and after, per-rank state bytes (formula and measured) before and after, and the
losses of two more steps.
"""

import json
import sys

import torch
import torch.distributed as dist

from megascale.config import load_config
from megascale.train.dist import exit_process, init_distributed
from megascale.train.engine import state_formula
from megascale.train.loop import evaluate, mean_over, setup_run, train_step
from megascale.train.memory import local_param_count, measured_state_bytes
from megascale.untie.conditions import Decision
from megascale.untie.transfer import base_optimizer, read_state
from megascale.untie.untie import source_name, untie_run
from megascale.model.sharing import block_sources


def memory(run) -> dict:
    c = run.cfg
    params = local_param_count(run.engine)
    f = state_formula(c, params, run.groups.dims.dp, run.pipelined)
    m = measured_state_bytes(run.engine)
    return {"params": params, "formula": f.weights + f.optimizer, "measured": m.weights + m.optimizer}


def steps(run, n: int) -> list[float]:
    out = []
    for _ in range(n):
        loss = train_step(run)
        run.progress.step += 1
        out.append(mean_over(loss, run.groups.dp_group))
    return out


def pairs(before, after, sources, pipelined):
    """(name, new state, the old state it was written from) for every parameter of the new engine."""
    source = source_name(sources, pipelined)
    return [(name, new, before.params[source(name)]) for name, new in after.params.items()]


def max_diff(before, after, sources, pipelined) -> float:
    worst = 0.0
    for _, new, old in pairs(before, after, sources, pipelined):
        worst = max(worst, (new.weight - old.weight).abs().max().item())
        for k in new.moments:
            worst = max(worst, (new.moments[k] - old.moments[k]).abs().max().item())
    return worst


def moment_ratios(before, after, sources, pipelined) -> dict[str, list[float]]:
    """Per parameter of the new engine: sum|exp_avg| and sum exp_avg_sq over those of its source (copy: 1, 1)."""
    out = {}
    for name, new, old in pairs(before, after, sources, pipelined):
        if old.moments["exp_avg_sq"].sum() > 0:
            out[name] = [(new.moments["exp_avg"].abs().sum() / old.moments["exp_avg"].abs().sum()).item(),
                         (new.moments["exp_avg_sq"].sum() / old.moments["exp_avg_sq"].sum()).item()]
    return out


def main(units: str, overrides: list[str]) -> None:
    ctx = init_distributed()
    cfg = load_config("configs/tiny.yaml", overrides)
    run = setup_run(cfg, ctx)
    losses = steps(run, 2)
    old_plan = run.model.plan
    grad_modes = []  # torch.is_grad_enabled() at each forward of the evaluation: it must build no graph
    hook = run.engine.module.register_forward_pre_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    report = {"val_before": evaluate(run), "memory_before": memory(run), "lr_before": run.engine.get_lr()[0]}
    hook.remove()
    report["eval_grad_modes"] = sorted(set(grad_modes))
    before = read_state(run.engine, run.groups.dp_group)  # as untie_run reads it: this rank's slices
    event = untie_run(run, [Decision(0, [int(u) for u in units.split(",")], "test")])
    after = read_state(run.engine, run.groups.dp_group)
    sources = block_sources(old_plan, run.model.plan)
    report.update(
        val_after=evaluate(run), memory_after=memory(run), lr_after=run.engine.get_lr()[0],
        step_before=float(before.step), step_after=float(after.step),
        state_max_diff=max_diff(before, after, sources, run.pipelined),
        moment_ratios=moment_ratios(before, after, sources, run.pipelined),
        new_names=sorted(set(after.params) - set(before.params)),
        plan_after=event["plan_after"], global_steps=run.engine.global_steps,
        adam_state_step=float(next(iter(base_optimizer(run.engine).state.values()))["step"]),
    )
    report["losses"] = losses + steps(run, 2)
    memories = [None] * ctx.world_size
    held = {"held": before.held_elements(), "full": 3 * sum(s.shape.numel() for s in before.params.values()),
            "tensors": 3 * len(before.params)}
    dist.all_gather_object(memories, {"before": report["memory_before"], "after": report["memory_after"], "state": held})
    report["memory_by_rank"] = memories
    if ctx.is_main:
        print("UNTIE_REPORT " + json.dumps(report), flush=True)
    dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2:])
    exit_process(0)
