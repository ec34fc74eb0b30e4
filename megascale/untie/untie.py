"""The untie itself: a new sharing plan, a new engine, the training state carried over.

``untie_run(run, decisions)`` is called by the training loop between two steps,
on every rank with the same decisions:

1. the new plan gives each freed unit its own block (``sharing.untie_units``);
2. every parameter's fp32 weight and Adam moments are read out of the old engine
   by name (``transfer.read_state``), and the old engine is released;
3. a model with the new plan is built and parallelized exactly as at start-up
   (tensor parallel shards, pipeline stages, a new DeepSpeed engine whose ZeRO
   partitions cover the new parameter set);
4. the state is written into it, each new block from the block it was tied to,
   and the optimizer step, LR schedule and DeepSpeed counters continue.

Each freed block starts equal to the shared one, with its moments copied or
scaled to its share of the units' gradient (``untie.moments``, see
``megascale.untie.moments``), so the output right after the untie equals the
output right before (tested).
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megascale.errors import MegascaleError
from megascale.model.sharing import SharingPlan, block_sources, untie_units
from megascale.untie.conditions import Decision
from megascale.untie.moments import block_factors
from megascale.untie.transfer import read_state, write_state

log = logging.getLogger(__name__)


def _block_name(pipelined: bool) -> re.Pattern:
    # The plain model names blocks "blocks.<g>."; DeepSpeed's PipelineModule "tied_modules.block<g>.".
    return re.compile(r"^(tied_modules\.block)(\d+)(\.)" if pipelined else r"^(blocks\.)(\d+)(\.)")


def source_name(sources: dict[int, int], pipelined: bool):
    """Map a parameter name of the new engine to the old engine's name it is copied from."""
    pattern = _block_name(pipelined)

    def source(name: str) -> str:
        return pattern.sub(lambda m: f"{m.group(1)}{sources[int(m.group(2))]}{m.group(3)}", name)

    return source


def moment_scale(factors: dict[int, tuple[float, float, str]], pipelined: bool) -> Callable[[str], tuple[float, float]] | None:
    """A parameter name of the new engine -> the (exp_avg, exp_avg_sq) factors of its block (1, 1 outside blocks)."""
    if not factors:
        return None
    pattern = _block_name(pipelined)

    def scale(name: str) -> tuple[float, float]:
        m = pattern.match(name)
        a, b, _ = factors.get(int(m.group(2)), (1.0, 1.0, "")) if m else (1.0, 1.0, "")
        return a, b

    return scale


def untie_run(run, decisions: list[Decision]) -> dict[str, Any]:
    """Untie the decided units of ``run`` in place (all ranks); returns the event recorded in metrics and checkpoints."""
    from megascale.train.checkpoint import restore_schedule  # noqa: PLC0415
    from megascale.train.engine import build_engine  # noqa: PLC0415
    from megascale.train.loop import build_model, describe_model, out_of_memory_explained  # noqa: PLC0415

    start = time.perf_counter()
    old_plan: SharingPlan = run.model.plan
    units = sorted({u for d in decisions for u in d.units})
    new_plan = untie_units(old_plan, units)
    sources = block_sources(old_plan, new_plan)
    factors = block_factors(old_plan, new_plan, run.cfg.untie.moments, run.controller.unit_stats(old_plan))
    where = f"untying units {units} at step {run.progress.step}"
    with out_of_memory_explained(run.cfg, run.ctx, run.groups, run.info["grad_accum"], where, new_plan, untying=True,
                                 then=lambda: _resume_hint(run.out_dir / "checkpoints")):
        state = read_state(run.engine, run.groups.dp_group)  # this rank's 1/dp slice, on the host
        samples = run.engine.global_samples  # DeepSpeed's count, kept in its checkpoints (a batch ramp varies it)
        _release(run)
        model = build_model(run.cfg, run.ctx, new_plan, quiet=True)  # meta: build_engine draws, write_state overwrites
        info = describe_model(model, run.cfg, run.layout)  # before tensor parallelism shards the plain model
        engine = build_engine(model, run.cfg, run.layout, run.ctx.device, run.groups)
        write_state(engine, state, source_name(sources, run.pipelined), moment_scale(factors, run.pipelined))
    restore_schedule(engine, run.progress.step)
    engine.global_samples = samples
    before = run.info
    run.model, run.engine, run.info = model, engine, info
    run.grad_bytes = None  # measured again on the next step
    seconds = time.perf_counter() - start  # training pauses this long (this rank; the ranks finish together)
    event = {
        "step": run.progress.step, "tokens": run.progress.tokens, "event": "untie",
        "groups": [d.group for d in decisions], "units": units,
        "reasons": {str(d.group): d.reason for d in decisions}, "moments": run.cfg.untie.moments,
        "moment_factors": {str(g): [a, b, why] for g, (a, b, why) in sorted(factors.items())},
        "plan_before": old_plan.to_list(), "plan_after": new_plan.to_list(),
        "params_unique_before": before["params_unique"], "params_unique_after": run.info["params_unique"],
        "seconds": round(seconds, 3),
    }
    if run.ctx.is_main:
        for d in decisions:
            log.info("step %d: untied group %d units %s (%s)", run.progress.step, d.group, d.units, d.reason)
        log.info("sharing plan now %s: %s -> %s unique parameters, Adam moments %s; the untie took %.1f s",
                 new_plan.describe(), f"{before['params_unique']:,}", f"{run.info['params_unique']:,}",
                 _factor_words(factors), seconds)
    return event


def _resume_hint(root: Path) -> str:
    """What an untie that ran out of memory leaves: the latest checkpoint, untouched, to resume after the fix."""
    from megascale.train.checkpoint import latest_checkpoint  # noqa: PLC0415

    try:
        path = latest_checkpoint(root)
    except MegascaleError as err:  # a broken pointer: say so rather than hide the memory error behind it
        return str(err)
    if path is None:
        return f"no checkpoint was saved before it ({root}): set train.save_every so a run can resume before an untie"
    return (f"the latest checkpoint, {path}, is untouched: after the fix, train.resume=auto resumes from it and the "
            "untie runs again when its condition holds")


def _factor_words(factors: dict[int, tuple[float, float, str]]) -> str:
    if not factors:
        return "copied"
    return "scaled: " + ", ".join(f"block {g} x{a:.3g} / x{b:.3g} ({why})" for g, (a, b, why) in sorted(factors.items()))


def _release(run) -> None:
    """Drop the old engine (hooks, flat buffers, optimizer state) before building the new one."""
    engine = run.engine
    if hasattr(engine, "destroy"):
        engine.destroy()
    run.engine = None
    del engine
    gc.collect()
