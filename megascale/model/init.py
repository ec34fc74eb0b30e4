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
a run is reproducible on one kind of device, or on any with ``train.init_device=cpu``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

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


def chunk_range(size: int, shard: Shard) -> tuple[int, int]:
    """Where ``shard`` lies along its dimension of length ``size``: ``torch.chunk``'s split, as [start, end)."""
    step = -(-size // shard.count)
    start = min(shard.index * step, size)
    return start, min(start + step, size)


def cut(full: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """``shard``'s piece of ``full`` (``full`` itself when None), as a tensor of its own."""
    if shard is None:
        return full
    start, end = chunk_range(full.shape[shard.dim], shard)
    # A copy, not a view: a view would keep the whole tensor's storage alive.
    return full.narrow(shard.dim, start, end - start).clone(memory_format=torch.contiguous_format)


def local_value(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` cut down to ``p``'s shard (or all of it when ``p`` is not sharded)."""
    return _checked(p, cut(full, getattr(p, SHARD_ATTR, None)))


def _checked(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if value.shape != p.shape:
        raise ValueError(f"{getattr(p, INIT_ATTR).name}: a value of shape {tuple(value.shape)} for a parameter of "
                         f"shape {tuple(p.shape)}")
    return value


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


class Source(NamedTuple):
    """How to read one full plain-model tensor (fp32 when floating) without holding it."""

    make: Callable[[], torch.Tensor]  # the whole tensor
    shape: tuple[int, ...]  # its full shape, known without a read
    piece: Callable[[Shard], torch.Tensor] | None = None  # one tensor-parallel shard's range, read alone


class LazyWeights(Mapping):
    """Full plain-model tensors by name, each assembled when read and not kept.

    Reading ``weights[name]`` calls that name's maker: for a megascale checkpoint it
    concatenates the tensor's tensor-parallel shards, for a Hugging Face directory it
    reads one safetensors entry; both from memory-mapped files, cast to fp32, nothing
    cached. ``build_engine`` reads one tensor at a time and keeps only this rank's
    piece, so starting from saved weights never holds a second full copy of the model
    on any rank. ``shape(name)`` needs no read. ``aliases`` (the tied LM head) name the
    same tensor as their target.
    """

    def __init__(self, sources: dict[str, Source], aliases: dict[str, str] | None = None):
        self._sources, self._aliases = dict(sources), dict(aliases or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._sources[self._aliases.get(name, name)].make()

    def piece(self, name: str, shard: Shard | None) -> torch.Tensor:
        """``shard``'s piece of ``name`` (fp32): read alone where the source can (a safetensors slice, the
        checkpoint shards it overlaps), so a tensor-parallel rank reads 1/tp of the bytes; else cut from the whole."""
        source = self._sources[self._aliases.get(name, name)]
        if shard is not None and source.piece is not None:
            return source.piece(shard)
        return cut(source.make(), shard)

    def __iter__(self):
        return iter([*self._sources, *self._aliases])

    def __len__(self) -> int:
        return len(self._sources) + len(self._aliases)

    def __contains__(self, name: object) -> bool:  # Mapping's default would assemble the tensor to find out
        return name in self._sources or name in self._aliases

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[self._aliases.get(name, name)].shape

    def replaced(self, values: dict[str, torch.Tensor]) -> LazyWeights:
        """These weights with ``values`` in place of some (read eagerly); an alias and its target stay one tensor."""
        sources = dict(self._sources)
        for name, value in values.items():
            sources[self._aliases.get(name, name)] = Source(lambda v=value: v, tuple(value.shape))
        return LazyWeights(sources, self._aliases)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, assembled once; an alias is the same tensor object as its target."""
        out = {name: source.make() for name, source in self._sources.items()}
        return out | {alias: out[target] for alias, target in self._aliases.items()}


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
                weights: Mapping[str, torch.Tensor] | None = None,
                then: Callable[[nn.Parameter], None] | None = None, draw_on: torch.device | None = None) -> int:
    """Give storage on ``device`` to each ``meta`` parameter of ``module``; returns how many were.

    The value is cut from ``weights`` when given (full plain-model weights by name, e.g. a
    checkpoint's; ``LazyWeights`` reads only the piece a shard needs), else the seeded draw,
    made on ``draw_on`` (default ``device``: the CPU gives the same values on every kind of
    device). A parameter shared by several submodules stays one parameter; its attributes
    (the tensor-parallel mark, the init spec) come along. ``then(p)`` runs on each new
    parameter before the next is drawn: ZeRO-3 partitions it there, so a rank never holds
    more than one whole tensor.
    """
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                made[id(p)] = _materialized(p, seed, device, weights, draw_on or device)
                if then is not None:
                    then(made[id(p)])
            sub._parameters[name] = made[id(p)]
    return len(made)


def _materialized(p: nn.Parameter, seed: int, device: torch.device,
                  weights: Mapping[str, torch.Tensor] | None, draw_on: torch.device) -> nn.Parameter:
    spec: ParamInit | None = getattr(p, INIT_ATTR, None)
    if spec is None:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} on the meta device has no init spec "
                         f"(build it through megascale.model.Transformer)")
    with torch.no_grad():
        if weights is not None:  # cut on the host before the copy: the device sees this rank's piece only
            value = _checked(p, _piece(weights, spec.name, getattr(p, SHARD_ATTR, None)).to(device, p.dtype))
        else:  # drawn whole, then cut: every layout starts from the 1-rank model's values
            value = local_value(p, draw_full(spec, seed, draw_on, p.dtype)).to(device)  # cut before the copy
        new = nn.Parameter(value, requires_grad=p.requires_grad)
    new.__dict__.update(p.__dict__)
    return new


def piece_of(p: nn.Parameter, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``p``'s piece (its tensor-parallel shard) of the full plain-model ``weights``, as they hold it."""
    return _piece(weights, getattr(p, INIT_ATTR).name, getattr(p, SHARD_ATTR, None))


def _piece(weights: Mapping[str, torch.Tensor], name: str, shard: Shard | None) -> torch.Tensor:
    return weights.piece(name, shard) if isinstance(weights, LazyWeights) else cut(weights[name], shard)


def residual_std(std: float, n_layers: int) -> float:
    """Residual-output projections are scaled by depth (GPT-2): applied layers count."""
    return std / math.sqrt(2 * n_layers)
