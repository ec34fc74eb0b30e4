"""Moving training state between DeepSpeed engines by parameter name.

An untie replaces the engine: the new one holds more parameters, so its ZeRO
flat buffers and partitions differ from the old one's and nothing can be copied
buffer to buffer. Instead every parameter's full training state is read out of
the old engine by name — the fp32 master weight and both Adam moments, each the
whole tensor of this rank's tensor/pipeline slice (gathered over data-parallel
ranks) — and written into the new engine's partitions by name, the new blocks'
names mapped to the block they were copied from.

DeepSpeed's ``safe_get/set_full_fp32_param`` and ``safe_get/set_full_optimizer_state``
do the gathering and partitioning for ZeRO 1-3 and for its BF16 optimizer. Plain
fp32 ZeRO-0 has no master copy (they return None there): the torch AdamW state is
the parameter's own, read and written directly. Setting optimizer state needs the
state to exist, and torch creates it lazily at the first step, so the new
engine's state is created here first (zeros, the old step count) and linked to
DeepSpeed's per-parameter fragments the way its own first step would.

Reading is collective over each parameter's data-parallel group (all ranks walk
the parameters in the same order); copies are kept on the CPU so an untie needs
no extra accelerator memory beyond one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's state, besides "step"


@dataclass
class ParamState:
    weight: torch.Tensor  # fp32 master value, full over data-parallel ranks, on CPU
    moments: dict[str, torch.Tensor]


@dataclass
class EngineState:
    params: dict[str, ParamState]
    step: torch.Tensor  # AdamW's step count (bias correction); the same for every parameter
    loss_scale: float | None = None  # fp16 dynamic loss scale


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrappers (ZeRO, BF16 optimizer), or the engine's own."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _partitioned(param: torch.nn.Parameter) -> bool:
    """True when DeepSpeed keeps the fp32 state of ``param`` in its own partitions (ZeRO 1-3, BF16)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _state_step(opt: torch.optim.Optimizer) -> torch.Tensor:
    for state in opt.state.values():
        if "step" in state:
            step = state["step"]
            return step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))
    raise RuntimeError("the optimizer has not stepped yet; untie after at least one training step")


def _link_optimizer_state(engine) -> None:
    """(Re)map each parameter to its slice of DeepSpeed's flat optimizer state.

    ZeRO 1/2 steps one parameter group at a time and links the fragments of *all*
    groups after the first group's step, while the later groups' state does not
    exist yet; the link is then never redone, so the moments of our second group
    (norms, no weight decay) stay unreachable through ``safe_get_full_optimizer_state``.
    Linking again once every group has state fixes that; it only rebuilds views.
    """
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def read_state(engine) -> EngineState:
    """Every parameter's fp32 weight and Adam moments, by name (collective over data-parallel ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415

    opt = base_optimizer(engine)
    _link_optimizer_state(engine)
    params = {}
    for name, p in engine.module.named_parameters():
        if _partitioned(p):
            weight = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            weight, moments = p.detach(), {k: opt.state[p][k] for k in MOMENTS}
        params[name] = ParamState(weight.detach().float().cpu().clone(),
                                  {k: v.detach().float().cpu().clone() for k, v in moments.items()})
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return EngineState(params, _state_step(opt), getattr(scaler, "cur_scale", None))


def _hp_flat_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer steps: DeepSpeed's fp32 partitions, or the parameters themselves."""
    zero = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(zero, attr, None)
        if flats:
            return list(flats)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def _create_optimizer_state(engine, step: torch.Tensor) -> None:
    """Zero moments and the given step count for every stepped tensor, then link DeepSpeed's fragments."""
    opt = base_optimizer(engine)
    for flat in _hp_flat_tensors(engine):
        if flat.numel() and not opt.state.get(flat):
            opt.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    _link_optimizer_state(engine)


def _set_weight(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The parameter itself (training dtype), beside DeepSpeed's fp32 master copy."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the parameter is partitioned; gather, write, re-partition
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.device, p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


def _scaled(moments: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    if s == 1.0:
        return moments
    return {"exp_avg": moments["exp_avg"] * s, "exp_avg_sq": moments["exp_avg_sq"] * (s * s)}


def write_state(engine, state: EngineState, source: Callable[[str], str],
                scale: Callable[[str], float] | None = None) -> None:
    """Write ``state`` into a freshly built ``engine``; parameter ``name`` takes ``state.params[source(name)]``.

    ``scale(name)`` = s, if given, multiplies the first moment by s and the second by s²
    (the moments of a gradient s times the one they were built from).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415

    _create_optimizer_state(engine, state.step)
    opt = base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        src = state.params[source(name)]
        moments = _scaled(src.moments, scale(name) if scale is not None else 1.0)
        _set_weight(p, src.weight)
        if _partitioned(p):
            device = p.device if p.device.type != "meta" else torch.device("cpu")
            safe_set_full_fp32_param(p, src.weight.to(device))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, moments[k].to(device), k)
        else:
            for k in MOMENTS:
                opt.state[p][k].copy_(moments[k].to(p.device))
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state.loss_scale is not None and scaler is not None:
        scaler.cur_scale = state.loss_scale
