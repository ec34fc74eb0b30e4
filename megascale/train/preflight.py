"""Memory before the first step, and what to change when a step runs out of it.

Megatron prints a theoretical memory footprint at start-up; so does megascale, with the
planner's own count (``megascale.planner.layout``): the state a GPU of the fullest stage
holds (weights, gradients, Adam, sharded as the ZeRO stage does) and the activations it
keeps for backward (``activation_bytes``: per layer what the real model saves with the
fused kernels, checked against autograd's saved tensors in tests/test_plan_layout.py and
test_tp_collectives.py; the PyTorch ops keep ≈ 1.4x that). On CUDA the start-up log
compares the two with the device's memory and, when they do not fit, names the fewest
recomputed layers that would. A step that runs out of memory anyway stops with one line
naming the same fixes, instead of the allocator's traceback; nothing saved is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megascale.config import Config
from megascale.errors import MegascaleError
from megascale.parallel.topology import ParallelDims
from megascale.model.sharing import SharingPlan
from megascale.planner.layout import USABLE, activation_bytes, stage_blocks, stage_layers, stage_params, state_bytes
from megascale.planner.shapes import Shape


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of the fullest stage, by the planner's count; ``state`` None when offloaded to the host."""

    state: float | None
    activations: float

    @property
    def total(self) -> float:
        return (self.state or 0.0) + self.activations


def model_shape(cfg: Config) -> Shape:
    m = cfg.model
    sharing = m.sharing if isinstance(m.sharing, str) else "none"  # an explicit list: counted untied (the most)
    return Shape(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, cfg.data.seq_len,
                 sharing, m.tie_embeddings)


def recomputed_per_stage(cfg: Config, dims: ParallelDims) -> int:
    """Layers the fullest stage recomputes in backward under the config's activation checkpointing."""
    p = cfg.parallel
    if not p.activation_checkpointing:
        return 0
    layers = stage_layers(cfg.model.n_layers, dims.pp)
    return min(p.checkpoint_layers, layers) if p.checkpoint_layers else layers


def estimate(cfg: Config, dims: ParallelDims, zero_stage: int, grad_accum: int, recomputed: int | None = None,
             plan: SharingPlan | None = None) -> MemoryEstimate:
    """The layout's state and activations per GPU, with ``recomputed`` layers a stage (None: the config's), and
    the blocks ``plan`` stores (the run's: resumed or untied ones differ from model.sharing; None: the config's)."""
    t, shape = cfg.train, model_shape(cfg)
    recomputed = recomputed_per_stage(cfg, dims) if recomputed is None else recomputed
    acts = activation_bytes(shape, t.micro_batch_size, t.precision, recomputed, tp=dims.tp, pp=dims.pp,
                            in_flight=min(dims.pp, grad_accum), cp=dims.cp,
                            sequence_parallel=cfg.parallel.sequence_parallel or dims.tp == 1)
    if t.optimizer_on_host or t.weights_on_host:
        return MemoryEstimate(None, acts)
    blocks = None if plan is None else stage_blocks(plan.group_of, dims.pp)
    params = stage_params(shape, dims.tp, dims.pp, blocks)
    return MemoryEstimate(state_bytes(params, t.precision, zero_stage, dims.dp_cp), acts)


def fewest_recomputed(cfg: Config, dims: ParallelDims, zero_stage: int, grad_accum: int, capacity: float,
                      plan: SharingPlan | None = None) -> int | None:
    """The fewest layers a stage must recompute for the estimate to fit ``capacity`` bytes; None if none does."""
    for r in range(stage_layers(cfg.model.n_layers, dims.pp) + 1):
        if estimate(cfg, dims, zero_stage, grad_accum, r, plan).total <= USABLE * capacity:
            return r
    return None


def fixes(cfg: Config, dims: ParallelDims, zero_stage: int, grad_accum: int, capacity: float | None,
          plan: SharingPlan | None = None, untying: bool = False) -> str:
    """What to change, most specific first; ``untying``: the untie's new weights and Adam state ran out."""
    p, t = cfg.parallel, cfg.train
    options = ["untie fewer units (untie.units=lowest:k with untie.probe_every > 0), or none (untie.when='')"] if untying else []
    r = fewest_recomputed(cfg, dims, zero_stage, grad_accum, capacity, plan) if capacity else None
    if r is not None and r > recomputed_per_stage(cfg, dims):
        every = r == stage_layers(cfg.model.n_layers, dims.pp)
        options.append("recompute " + ("every layer (parallel.activation_checkpointing=true)" if every else
                                       f"{r} layers a stage (parallel.activation_checkpointing=true "
                                       f"parallel.checkpoint_layers={r})"))
    elif not p.activation_checkpointing:
        options.append("recompute layers in backward (parallel.activation_checkpointing=true)")
    if t.micro_batch_size > 1:
        options.append(f"a smaller train.micro_batch_size (now {t.micro_batch_size}; set train.global_batch_size "
                       "to keep the step's batch)")
    if zero_stage < 3 and not t.optimizer_on_host and dims.pp == 1:  # DeepSpeed's pipeline engine takes ZeRO-1 at most
        options.append("a higher train.zero_stage")
    if untying and zero_stage >= 1 and not t.optimizer_on_host:  # the untie multiplies the state, not the activations
        options.append("the optimizer state on the host (train.offload_optimizer=cpu)")
    options.append("more tensor or pipeline ranks (parallel.tp, parallel.pp; `python launch/plan.py --gpus N --gpu NAME "
                   "--tp/--pp` sizes them)")
    return "; ".join(options)


def describe(est: MemoryEstimate, capacity: float | None) -> str:
    state = "offloaded to the host" if est.state is None else f"{est.state / 2**30:.2f} GiB"
    of = f" of the device's {capacity / 2**30:.1f} GiB" if capacity else ""
    return (f"memory per GPU by the planner's count: state (weights, gradients, Adam) {state} + activations "
            f"{est.activations / 2**30:.2f} GiB = {est.total / 2**30:.2f} GiB{of}")


def device_capacity(device: torch.device) -> float | None:
    """The device's memory in bytes, on CUDA; None elsewhere (the host's memory is not the layout's limit)."""
    if device.type != "cuda":
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's allocator error, or the CPU allocator's (a RuntimeError naming the failed allocation)."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


@contextmanager
def out_of_memory_explained(cfg: Config, dims: ParallelDims, zero_stage: int, grad_accum: int, where: str, rank: int,
                            device: torch.device, plan: SharingPlan | None = None, untying: bool = False,
                            then: Callable[[], str] | None = None) -> Iterator[None]:
    """Turn an allocation failure inside into one MegascaleError line with the estimate and the fixes; ``where``
    says what ran out ("in step 12", "building the model and optimizer"), ``plan`` is the sharing plan whose
    blocks the ranks hold or were building (``untying``: the one an untie was building), ``then()`` what the
    user can do next. Costs nothing unless one fails."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        est, capacity = estimate(cfg, dims, zero_stage, grad_accum, plan=plan), device_capacity(device)
        after = " after the untie" if untying else ""
        raise MegascaleError(
            f"out of memory {where} on rank {rank} ({_clip(first)}); {describe(est, capacity)}{after}; "
            f"to fit: {fixes(cfg, dims, zero_stage, grad_accum, capacity, plan, untying)}" + (f"; {then()}" if then else "")
        ) from None


def _clip(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fit_note(est: MemoryEstimate, capacity: float | None) -> str | None:
    """A warning when the estimate exceeds the usable share of the device, else None."""
    if capacity is None or est.total <= USABLE * capacity:
        return None
    return f"this layout may not fit: {math.ceil(est.total / 2**30)} GiB estimated, {USABLE * capacity / 2**30:.1f} GiB usable"
