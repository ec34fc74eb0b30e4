"""Per-parameter training state read out of DeepSpeed's checkpoint files: fp32 masters and Adam moments.

A checkpoint saved under one layout resumes under another through whole tensors
by name (megascale/train/checkpoint.py); this module reads them for one
model-parallel rank (a tensor rank, or a stage × tensor rank of a pipeline):

* ZeRO 1-2 and DeepSpeed's BF16 optimizer: each data-parallel rank's
  ``*zero_pp_rank_R_mp_rank_M_optim_states.pt`` holds its partition of one flat fp32
  buffer per parameter group, and Adam's moments in the same flat layout (the torch
  optimizer steps those buffers). ``param_slice_mappings`` says where each
  parameter's fragment lies in the partition; a parameter is the fragments of the
  ranks in order. (DeepSpeed's universal checkpoint reads the same mappings.)
* ZeRO-3: every parameter is cut into dp equal pieces (the last padded), rank r
  holding piece r of each, parameter after parameter, in ``param_shapes`` order.
* ZeRO-0: the torch AdamW state dict in ``mp_rank_M_model_states.pt``, by
  parameter index, named by the list megascale saves beside it (``OPTIMIZER_NAMES``;
  a pipeline stage's file holds no module to name them by). Older checkpoints
  without it: megascale's two groups (matrices with decay, then norms;
  ``engine.param_groups``) in module order. A 16-bit run (megascale ran those at
  ZeRO-0 before 2026-11-29, and runs them at ZeRO-1 since) keeps DeepSpeed's
  fp32 copies of the weights beside it (``fp32_groups``), in the same order.

Nothing is read until a tensor is asked for: each is a ``Source`` whose maker
concatenates its fragments out of memory-mapped files, so a rank never holds a
second copy of the model's state.

DeepSpeed's ``zero_to_fp32`` reads the fp32 masters of the first two formats and
drops the moments. DeepSpeed's universal checkpoints keep them across layouts,
but ``ds_to_universal`` needs the ``universal_checkpoint_info`` that
Megatron-DeepSpeed's model code writes, and a separate conversion step.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from megascale.errors import MegascaleError
from megascale.model.init import Source

KEYS = ("fp32", "exp_avg", "exp_avg_sq")  # the fp32 master weight, Adam's two moments
PIPELINE_ZERO_0 = ("this pipeline's ZeRO-0 optimizer state is kept by parameter index only: it was saved before "
                   "megascale named it (OPTIMIZER_NAMES)")
OPTIMIZER_NAMES = "megascale_optimizer_names"  # in each ZeRO-0 model-states file: checkpoint.optimizer_names


class StateUnavailable(MegascaleError):
    """The files hold no such per-parameter state in a format read here (the reason is the message)."""


def load(path: Path) -> dict[str, Any]:
    """A checkpoint file, memory-mapped: a tensor's bytes are read when used, and ranks share the page cache."""
    if not path.is_file():
        raise MegascaleError(f"{path} is missing: the checkpoint is incomplete; resume from another step_* directory")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def optim_files(path: Path, mp_rank: int) -> list[Path]:
    """The ZeRO optimizer files of ``mp_rank``, in data-parallel rank order."""
    files = path.glob(f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt")
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))


def has_zero_files(path: Path) -> bool:
    return any(path.glob("*zero_pp_rank_*_optim_states.pt"))


def zero_tensors(path: Path, mp_rank: int, key: str) -> dict[str, Source]:
    """``key`` (see KEYS) of every parameter of ``mp_rank``, by the saved module's names, from ZeRO files."""
    files = optim_files(path, mp_rank)
    if not files:
        raise MegascaleError(f"{path} has no ZeRO files of model-parallel rank {mp_rank} (*mp_rank_{mp_rank:02d}_*): "
                             "the checkpoint is incomplete; use another step_* directory")
    parts = [load(f)["optimizer_state_dict"] for f in files]
    if int(parts[0].get("zero_stage", 0)) == 3:
        model = load(path / f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt")  # no bf16_ prefix, even in bf16
        return _stage3(parts, _shapes(model), key)
    model = load(path / f"mp_rank_{mp_rank:02d}_model_states.pt")
    return _sliced(parts, _shapes(model), key)


def _shapes(model_states: dict[str, Any]) -> dict[str, torch.Size]:
    groups = model_states.get("param_shapes")
    if not groups:
        raise StateUnavailable("its model states list no parameter shapes")
    return {name: torch.Size(shape) for group in groups for name, shape in group.items()}


def _flat(part: dict[str, Any], group: int, key: str, masters: str, state_key: str) -> torch.Tensor:
    """One rank's flat buffer of ``key`` for parameter ``group``: the fp32 partition, or its Adam moment."""
    if key == "fp32":
        return part[masters][group]
    state = part[state_key]
    if not isinstance(state, dict) or "state" not in state:
        raise StateUnavailable("its optimizer state is in DeepSpeed's elastic format")
    (index,) = state["param_groups"][group]["params"]  # DeepSpeed steps one flat tensor per group
    moments = state["state"].get(index)
    if moments is None or key not in moments:
        raise StateUnavailable(f"its optimizer holds no {key} (it had not stepped)")
    return moments[key]


def _sliced(parts: list[dict[str, Any]], shapes: dict[str, torch.Size], key: str) -> dict[str, Source]:
    """ZeRO 1-2, BF16 optimizer: each rank's fragment of a parameter at ``param_slice_mappings``' address."""
    if "param_slice_mappings" not in parts[0]:
        raise StateUnavailable("it was written by a DeepSpeed without param_slice_mappings (before 0.10)")
    fragments: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)
    for rank, part in enumerate(parts):
        for group, mapping in enumerate(part["param_slice_mappings"]):
            for name, address in mapping.items():
                fragments[name].append((rank, group, address.start, address.numel))

    def flat(rank: int, group: int) -> torch.Tensor:
        return _flat(parts[rank], group, key, "single_partition_of_fp32_groups", "base_optimizer_state")

    def maker(name: str) -> Callable[[], torch.Tensor]:
        shape, pieces = shapes[name], fragments[name]
        if sum(numel for *_, numel in pieces) != shape.numel():
            raise MegascaleError(f"the ZeRO partitions hold {sum(n for *_, n in pieces)} of the {shape.numel()} elements "
                                 f"of {name}: the checkpoint is incomplete; use another step_* directory")
        return lambda: torch.cat([flat(r, g).narrow(0, start, numel) for r, g, start, numel in pieces]).view(shape).float()

    return {name: Source(maker(name), tuple(shape)) for name, shape in shapes.items()}


def _stage3(parts: list[dict[str, Any]], shapes: dict[str, torch.Size], key: str) -> dict[str, Source]:
    """ZeRO-3: rank r holds piece r (ceil(numel / dp) elements) of every parameter, one after another."""
    world = len(parts)

    def flats(rank: int) -> list[torch.Tensor]:
        part = parts[rank]
        return [_flat(part, g, key, "fp32_flat_groups", "optimizer_state_dict") for g in range(len(part["fp32_flat_groups"]))]

    def maker(offset: int, piece: int, shape: torch.Size) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            full = torch.cat([_span(flats(r), offset, piece) for r in range(world)])
            return full[:shape.numel()].view(shape).float()
        return make

    sources, offset = {}, 0
    for name, shape in shapes.items():
        piece = -(-shape.numel() // world)
        sources[name] = Source(maker(offset, piece, shape), tuple(shape))
        offset += piece
    held = sum(t.numel() for t in parts[0]["fp32_flat_groups"])
    if offset != held:
        raise MegascaleError(f"the ZeRO-3 partitions hold {held} elements per rank where the parameters need {offset}: "
                             "the checkpoint does not match its model states; use another step_* directory")
    return sources


def _span(flats: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the concatenation of ``flats``, reading only those."""
    pieces = []
    for flat in flats:
        if numel and start < flat.numel():
            take = min(numel, flat.numel() - start)
            pieces.append(flat.narrow(0, start, take))
            numel -= take
        start = max(0, start - flat.numel())
    return torch.cat(pieces) if pieces else flats[0].new_empty(0)


def _torch_state(states: dict[str, Any]) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """A ZeRO-0 model-states file's torch optimizer state and (16-bit runs) DeepSpeed's fp32 copies, in its order."""
    optimizer = states.get("optimizer") or {}
    if "fp32_groups" in optimizer:  # DeepSpeed's 16-bit optimizer without ZeRO: fp32 copies beside the torch state
        return optimizer["optimizer_state_dict"], [t for group in optimizer["fp32_groups"] for t in group]
    if "state" not in optimizer:
        raise StateUnavailable(f"its optimizer state ({', '.join(map(str, optimizer)) or 'none'}) is not torch's")
    return optimizer, None


def _module_order(module: dict[str, torch.Tensor] | None, alias: Collection[str]) -> list[str]:
    """The optimizer's parameter order from the module state (checkpoints without OPTIMIZER_NAMES)."""
    if not module:
        raise StateUnavailable(PIPELINE_ZERO_0)
    names = [n for n in module if n not in alias]
    return [n for n in names if module[n].dim() >= 2] + [n for n in names if module[n].dim() < 2]  # engine.param_groups


def torch_tensors(path: Path, mp_rank: int, key: str, alias: Collection[str] = ()) -> dict[str, Source]:
    """ZeRO-0: ``key`` (see KEYS) of every parameter of ``mp_rank`` from the torch optimizer's state by index,
    named by the list saved beside it (OPTIMIZER_NAMES), or (older checkpoints) by the module state's order.

    ``alias``: names of the module's state dict that are another parameter (the tied LM head)."""
    states = load(path / f"mp_rank_{mp_rank:02d}_model_states.pt")
    module = states.get("module")
    optimizer, masters = _torch_state(states)
    if key == "fp32" and masters is None:
        raise StateUnavailable("an fp32 run's weights are its module's own, not its optimizer's")
    names = states.get(OPTIMIZER_NAMES) or _module_order(module, alias)
    indices = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise StateUnavailable(f"its optimizer holds {len(indices)} parameters where the module has {len(names)}")
    sources = {}
    for position, (index, name) in enumerate(zip(indices, names)):
        value = masters[position] if key == "fp32" else optimizer["state"].get(index, {}).get(key)
        if value is None or (module and value.shape != module[name].shape):
            raise StateUnavailable(f"its optimizer state {index} does not match parameter {name}")
        sources[name] = Source(lambda v=value: v.float().clone(), tuple(value.shape))
    return sources


def adam_step(path: Path) -> int:
    """Adam's step count in a checkpoint (every parameter's is the same)."""
    files = optim_files(path, 0)
    if files:
        outer = load(files[0])["optimizer_state_dict"]
        state = outer.get("base_optimizer_state", outer.get("optimizer_state_dict"))
    else:
        state, _ = _torch_state(load(path / "mp_rank_00_model_states.pt"))
    for param in (state or {}).get("state", {}).values() if isinstance(state, dict) else ():
        if "step" in param:
            return int(round(float(param["step"])))
    raise StateUnavailable("its optimizer has no step count")
