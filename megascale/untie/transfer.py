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

Reading and writing are collective over the data-parallel group (its ranks hold the
same parameters and walk them in the same order). Between the two, the state
lives on the CPU and each data-parallel rank keeps only its 1/dp slice of every
flattened tensor, so the host memory an untie needs scales with ZeRO's
partitioning: 12 bytes per parameter of this rank's tensor/pipeline slice, over
dp, rather than the whole 12 bytes per parameter on every rank (a tied model
with 7B unique parameters at tp = pp = 1 would otherwise need 84 GB of host
memory per rank, eight times that on an 8-GPU node). Writing gathers one
tensor at a time (an all-gather per weight and moment), so the accelerator
holds at most one full tensor beyond the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megascale.model.init import piece_of
from megascale.train.engine import base_optimizer, holds_fp32_master

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's state, besides "step"


@dataclass
class ParamState:
    weight: torch.Tensor  # fp32 master value on CPU: this rank's slice of the flattened full tensor
    moments: dict[str, torch.Tensor]  # the same slice of each Adam moment
    shape: torch.Size  # the full tensor's (over data-parallel ranks)


@dataclass(frozen=True)
class Slicing:
    """Which slice of each flattened full tensor this data-parallel rank keeps."""

    group: object = None  # the data-parallel process group; None: one rank keeps everything
    rank: int = 0
    size: int = 1

    @classmethod
    def over(cls, group) -> "Slicing":
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return cls()
        return cls(group, dist.get_rank(group), dist.get_world_size(group))

    def chunk(self, numel: int) -> int:
        return -(-numel // self.size)  # ceil: the last ranks' slices may be shorter, or empty

    def take(self, full: torch.Tensor) -> torch.Tensor:
        flat, c = full.detach().reshape(-1), self.chunk(full.numel())
        return flat[self.rank * c:(self.rank + 1) * c].float().cpu().clone()

    def gather(self, piece: torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The full tensor from every rank's slice of it (one all-gather straight into it, no copy after)."""
        if self.size == 1:
            return piece.reshape(shape)
        numel, c = shape.numel(), self.chunk(shape.numel())
        mine = torch.zeros(c, device=device)
        mine[:piece.numel()] = piece.to(device)
        full = torch.empty(self.size, c, device=device)  # rank r's slice lands in row r: the flat tensor, padded
        dist.all_gather(list(full.unbind(0)), mine, group=self.group)
        return full.reshape(-1)[:numel].view(shape)


@dataclass
class EngineState:
    params: dict[str, ParamState]
    step: int  # Adam's step count (bias correction); the same for every parameter
    loss_scale: float | None = None  # fp16 dynamic loss scale
    slicing: Slicing = Slicing()

    def held_elements(self) -> int:
        """Elements this rank holds (weights and both moments): its host memory / 4 bytes."""
        return sum(s.weight.numel() + sum(m.numel() for m in s.moments.values()) for s in self.params.values())


def _state_step(opt: torch.optim.Optimizer) -> int:
    for state in opt.state.values():
        if "step" in state:
            return int(round(float(state["step"])))
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


def read_state(engine, dp_group=None) -> EngineState:
    """Every parameter's fp32 weight and Adam moments, by name; this rank's slice of each when ``dp_group``
    (the engine's data-parallel group) has several ranks. Collective over the data-parallel ranks."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415

    opt = base_optimizer(engine)
    _link_optimizer_state(engine)
    slicing = Slicing.over(dp_group)
    params = {}
    for name, p in engine.module.named_parameters():
        if holds_fp32_master(p):
            weight = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
        else:
            weight, moments = p.detach(), {k: opt.state[p][k] for k in MOMENTS}
        params[name] = ParamState(slicing.take(weight), {k: slicing.take(v) for k, v in moments.items()}, weight.shape)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return EngineState(params, _state_step(opt), getattr(scaler, "cur_scale", None), slicing)


def _hp_flat_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer steps: DeepSpeed's fp32 partitions, or the parameters themselves."""
    zero = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(zero, attr, None)
        if flats:
            return list(flats)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def _create_optimizer_state(engine, step: int) -> None:
    """Zero moments and the given step count for every stepped tensor, then link DeepSpeed's fragments."""
    opt = base_optimizer(engine)
    on_device = {id(p) for g in opt.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    for flat in _hp_flat_tensors(engine):
        if flat.numel() and not opt.state.get(flat):
            opt.state[flat] = {"step": _step_as_kept(opt, step, flat.device if id(flat) in on_device else None),
                               **{k: torch.zeros_like(flat) for k in MOMENTS}}
    _link_optimizer_state(engine)


def _step_as_kept(opt: torch.optim.Optimizer, step: int, device: torch.device | None):
    """The step count as ``opt`` keeps it: torch's Adam a float tensor (on the parameters' device when fused),
    DeepSpeed's CPU Adam a Python int (its C++ step takes one)."""
    if not isinstance(opt, torch.optim.Adam):
        return step
    return torch.tensor(float(step), device=device)


def _set_weight(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The parameter itself (training dtype), beside DeepSpeed's fp32 master copy."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the parameter is partitioned; gather, write, re-partition
        import deepspeed  # noqa: PLC0415

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.device, p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


def _full_moments(state: EngineState, src: ParamState, factors: tuple[float, float], device: torch.device):
    """(name, full moment times its factor), one moment at a time: one full tensor in memory beyond the engine."""
    for k, f in zip(MOMENTS, factors):
        full = state.slicing.gather(src.moments[k], src.shape, device)
        yield k, full * f if f != 1.0 else full


def _collective_device(engine, slicing: Slicing) -> torch.device:
    """Where the slices meet: NCCL gathers on the accelerator, gloo on the CPU."""
    if slicing.size > 1 and "nccl" in str(dist.get_backend(slicing.group)):  # "nccl" or e.g. "cuda:nccl,cpu:gloo"
        return engine.device
    return torch.device("cpu")


def write_state(engine, state: EngineState, source: Callable[[str], str],
                scale: Callable[[str], tuple[float, float]] | None = None) -> None:
    """Write ``state`` into a freshly built ``engine``; parameter ``name`` takes ``state.params[source(name)]``.

    ``scale(name)`` = (a, b), if given, multiplies the first moment by a and the second by b
    (``megascale.untie.moments``).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415

    _create_optimizer_state(engine, state.step)
    opt = base_optimizer(engine)
    meet = _collective_device(engine, state.slicing)
    for name, p in engine.module.named_parameters():
        src = state.params[source(name)]
        weight = state.slicing.gather(src.weight, src.shape, meet)
        _set_weight(p, weight)
        partitioned = holds_fp32_master(p)
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        if partitioned:
            safe_set_full_fp32_param(p, weight.to(device))
        del weight
        for k, moment in _full_moments(state, src, scale(name) if scale else (1.0, 1.0), meet):
            if partitioned:
                safe_set_full_optimizer_state(p, moment.to(device), k)
            else:
                opt.state[p][k].copy_(moment.to(p.device))
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if state.loss_scale is not None and scaler is not None:
        scaler.cur_scale = state.loss_scale


def restore_adam_state(engine, moments: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> None:
    """Adam's moments of every parameter, each cut from a full plain-model tensor by name (``piece_of``: this
    rank's tensor-parallel shard), and its step count: a checkpoint resumed in another layout steps on as the
    saved run would have. ``moments``: {"exp_avg": full tensors by name, "exp_avg_sq": ...}."""
    from deepspeed.utils import safe_set_full_optimizer_state  # noqa: PLC0415

    _create_optimizer_state(engine, step)
    opt = base_optimizer(engine)
    for p in engine.module.parameters():
        if hasattr(p, "_hp_mapping") and p._hp_mapping is None:
            continue  # ZeRO 1-2: none of its partition is on this rank
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        for k in MOMENTS:
            value = piece_of(p, moments[k])
            if holds_fp32_master(p):
                safe_set_full_optimizer_state(p, value.to(device), k)
            else:
                opt.state[p][k].copy_(value.to(p.device))
