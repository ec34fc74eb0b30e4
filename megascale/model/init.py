"""Weight initialisation by parameter name, so a rank can build only the weights it holds.

Each parameter's initial value is a function of (seed, its name in the plain model):
Normal(0, std) for linear and embedding weights, ones for norms, drawn from a
generator seeded by the name. Nothing depends on the order tensors are created in,
so the model can be built on the ``meta`` device (shapes, no storage), sharded by
tensor parallelism and split into pipeline stages, and only then given storage:
``materialize`` draws each of this rank's parameters as the full tensor and keeps its
slice. A rank then pays for its shard, not the whole model, and every layout
starts from the same weights as the 1-rank model (what the equivalence tests need).

Parameters carry two attributes: ``megascale_init`` (``ParamInit``, set when the
model is built) and, on a tensor-parallel shard, ``megascale_shard`` (``Shard``).
The values depend on the device that draws them (CPU and CUDA generators differ):
a run is reproducible on one kind of device.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from megascale.errors import MegascaleError

INIT_ATTR = "megascale_init"
SHARD_ATTR = "megascale_shard"


@dataclass(frozen=True)
class ParamInit:
    """How to draw a parameter in full: its name in the plain model, full shape and std (None: ones)."""

    name: str
    shape: tuple[int, ...]
    std: float | None


@dataclass(frozen=True)
class Shard:
    """This rank's piece of the full tensor: chunk ``index`` of ``count`` along ``dim``."""

    dim: int
    index: int
    count: int


def param_seed(seed: int, name: str) -> int:
    """A generator seed from the run's seed and the parameter's name (stable across runs and Python versions)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63


def draw_full(spec: ParamInit, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The parameter's full initial value."""
    if spec.std is None:
        return torch.ones(spec.shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(param_seed(seed, spec.name))
    return torch.empty(spec.shape, dtype=dtype, device=device).normal_(0.0, spec.std, generator=gen)


def local_value(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` cut down to ``p``'s shard (or all of it when ``p`` is not sharded)."""
    shard: Shard | None = getattr(p, SHARD_ATTR, None)
    if shard is not None:
        # A copy, not a view: a view would keep the whole tensor's storage alive.
        full = full.chunk(shard.count, dim=shard.dim)[shard.index].clone(memory_format=torch.contiguous_format)
    if full.shape != p.shape:
        raise ValueError(f"{getattr(p, INIT_ATTR).name}: a value of shape {tuple(full.shape)} for a parameter of "
                         f"shape {tuple(p.shape)}")
    return full


def mark(module: nn.Module, std_of: Callable[[str, nn.Module], float | None]) -> None:
    """Give every parameter of ``module`` its ``ParamInit``; ``std_of(name, owner)`` says the std (None: ones).

    A parameter reachable under two names (tied weights) keeps the first.
    """
    owners = {f"{prefix}.{n}" if prefix else n: m for prefix, m in module.named_modules() for n, _ in m.named_parameters(recurse=False)}
    for name, p in module.named_parameters():
        setattr(p, INIT_ATTR, ParamInit(name, tuple(p.shape), std_of(name, owners[name])))


def carry_init(source: nn.Parameter, shard: nn.Parameter, dim: int, index: int, count: int) -> nn.Parameter:
    """``shard`` (chunk ``index`` of ``source`` along ``dim``) keeps ``source``'s init spec; returns ``shard``."""
    spec = getattr(source, INIT_ATTR, None)
    if spec is not None:
        setattr(shard, INIT_ATTR, spec)
        outer: Shard | None = getattr(source, SHARD_ATTR, None)
        if outer is not None:
            raise ValueError(f"{spec.name} is sharded already (dim {outer.dim}); it cannot be sharded again")
        setattr(shard, SHARD_ATTR, Shard(dim, index, count))
    return shard


def check_full_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse, in one line, full weights that do not fit ``model`` (built on the meta device) by name and shape."""
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("full weights go into a model built on the meta device (megascale.train.loop.build_model)")
    def shape(name: str) -> tuple[int, ...]:  # lazy checkpoint weights know it without reading the tensor
        return weights.shape(name) if hasattr(weights, "shape") else tuple(weights[name].shape)

    specs = [getattr(p, INIT_ATTR) for p in model.parameters()]
    missing = [s.name for s in specs if s.name not in weights]
    unexpected = sorted(set(weights) - set(model.state_dict()))
    wrong = [f"{s.name} {shape(s.name)} for {s.shape}" for s in specs if s.name in weights and shape(s.name) != s.shape]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise MegascaleError(f"the starting weights do not fit the model ({'; '.join(parts)}); "
                             f"check the model.* settings against the checkpoint they come from")


def init_in_place(module: nn.Module, seed: int) -> None:
    """Draw every (non-meta) marked parameter of ``module`` again, where it lives."""
    with torch.no_grad():
        for p in module.parameters():  # deduplicated: a tied tensor is drawn once
            spec = getattr(p, INIT_ATTR, None)
            if spec is not None and not p.is_meta:
                p.copy_(local_value(p, draw_full(spec, seed, p.device, p.dtype)))


def materialize(module: nn.Module, seed: int, device: torch.device,
                source: Callable[[ParamInit], torch.Tensor] | None = None,
                then: Callable[[nn.Parameter], None] | None = None) -> int:
    """Give storage on ``device`` to each ``meta`` parameter of ``module``; returns how many were.

    The value is ``source(spec)`` when given (full weights by name, e.g. a checkpoint's),
    else the seeded draw. A parameter shared by several submodules stays one parameter;
    its attributes (the tensor-parallel mark, the init spec) come along. ``then(p)`` runs
    on each new parameter before the next is drawn: ZeRO-3 partitions it there, so a
    rank never holds more than one whole tensor.
    """
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                made[id(p)] = _materialized(p, seed, device, source)
                if then is not None:
                    then(made[id(p)])
            sub._parameters[name] = made[id(p)]
    return len(made)


def _materialized(p: nn.Parameter, seed: int, device: torch.device,
                  source: Callable[[ParamInit], torch.Tensor] | None) -> nn.Parameter:
    spec: ParamInit | None = getattr(p, INIT_ATTR, None)
    if spec is None:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} on the meta device has no init spec "
                         f"(build it through megascale.model.Transformer)")
    with torch.no_grad():
        full = source(spec).to(device, p.dtype) if source is not None else draw_full(spec, seed, device, p.dtype)
        new = nn.Parameter(local_value(p, full), requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    return new


def residual_std(std: float, n_layers: int) -> float:
    """Residual-output projections are scaled by depth (GPT-2): applied layers count."""
    return std / math.sqrt(2 * n_layers)
