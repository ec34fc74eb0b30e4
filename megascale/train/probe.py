"""Per-unit gradient capture on probe steps: the untying detector's "gradient coherence".

A tie group's K units (the layers that apply one stored block) each contribute a
gradient g_i to the block; autograd only ever shows the sum Σg. On a probe step
``CoherenceProbe`` recovers every g_i for the block's matrices and reduces them with
``megascale.kernels.tied_grad.tied_grad_reduce`` to ‖g_i‖², ⟨g_i, Σg⟩ and ‖Σg‖²:
the coherence ρ = ‖Σg‖² / (K·Σ‖g_i‖²) (1 when the units pull the same way, ~1/K when
their gradients are orthogonal) and each unit's alignment cos(g_i, Σg).

How a unit's gradient is recovered: a linear layer's weight gradient is
Σ_tokens go ⊗ x, so a forward hook on each of the block's matrices keeps the input x
and hooks the output; in backward the output's gradient go arrives and goᵀ·x is
added to a buffer of the unit that ran the block. The unit comes from a tracker
that the model sets before every block application (``Transformer._apply_unit``,
``pipeline.BlockUnit``). Only the 7 matrices are captured: the two RMSNorm weight
vectors per block hold ~2d of its ~12d² parameters, would need a second capture
path (their gradient is a reduction of x̂ ⊙ go, a sequence-sliced partial sum under
sequence parallelism), and cannot move ρ measurably.

Costs:

* Non-probe steps: the forward hooks return at their first test and the tracker
  assignment is one attribute write per layer; no tensor is kept, no hook is added
  to any tensor, nothing runs in backward. Gradients the engine sees are never
  modified (the tensor hooks return None), on probe steps either.
* Probe steps: one extra weight-gradient GEMM per matrix application (as many FLOPs
  as the backward's own weight gradients, ~1/3 of the block's training FLOPs), one
  fp32 (out, in) buffer per local unit and matrix (K_local × the block's matrices,
  divided by tp; ZeRO does not partition them), and, with activation checkpointing,
  the matrices' inputs stay alive from forward to backward (checkpointing would
  otherwise drop them).

Activation checkpointing: with non-reentrant checkpointing (what megascale uses)
the original forward builds the graph that backward runs, so the hooks it adds
fire with the unit read at forward time; the recomputation re-runs the forward
hooks, whose tensor hooks land on recomputed tensors that backward never
differentiates, so they never fire (nothing is counted twice). With reentrant
checkpointing it is the other way round: the original forward runs without grad
(the hooks skip it) and the recomputation's hooks fire. The tracker is set inside
the checkpointed function in both models, so either way the unit is right.

Parallelism: under tensor parallelism the matrices are sharded, so each rank
captures the gradient of its shard; with sequence parallelism the column layers'
input and the row layers' output gradient are T/tp sequence slices and are
all-gathered over the tensor group in the hook. Under pipeline parallelism a
stage holds some of a group's units: the partial Σg is all-reduced over the
group's tie process group (DeepSpeed's ``tied_comms``) before the dots are taken.
Under data parallelism each replica's unit gradients come from its own
micro-batches; they are averaged over the data-parallel group first (one
coalesced all-reduce on probe steps only), which gives exactly the unit
gradients of the global batch, so ρ is the 1-rank run's on the same batch (the
statistics are not linear in the gradients: pooling per-replica statistics
instead would measure noisier, smaller-batch gradients). Finally per-layer
‖g_i‖², ⟨g_i, Σg⟩ and per-group ‖Σg‖² are summed over all ranks: exact over
tensor ranks (disjoint shards) and pipeline stages (disjoint units); the
data-parallel replicas hold equal copies, so the sum is divided by their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from megascale.kernels.tied_grad import (
    TiedGradStats,
    coherence,
    flatten_for_collective,
    tied_grad_reduce,
    unflatten_into,
    unit_alignment,
)
from megascale.model.sharing import SharingPlan
from megascale.parallel.mappings import gather_sequence
from megascale.parallel.pipeline import stage_units
from megascale.parallel.tensor_parallel import ColumnParallelLinear, ReplicatedKVLinear, RowParallelLinear
from megascale.parallel.topology import ParallelGroups

COLUMNS = (ColumnParallelLinear, ReplicatedKVLinear)  # input all-gathered under sequence parallelism (maybe before them)
MATRICES = (nn.Linear, *COLUMNS, RowParallelLinear)


@dataclass
class UnitTracker:
    """Which layer (unit) is applying a block right now; set by the model, read by the probe's hooks."""

    current: int = -1


@dataclass(frozen=True)
class GroupCoherence:
    """One tie group on one probe step, summed over all ranks: ρ, per-unit alignment and the raw sums.

    The raw sums are of the gradients backward produced, so they include DeepSpeed's
    1/gradient_accumulation_steps and, in fp16, the loss scale (ρ and alignment do
    not depend on either). A step whose gradients overflowed reports nan.
    """

    units: tuple[int, ...]
    rho: float
    alignment: dict[int, float]  # layer → cos(g_i, Σg)
    sq_norms: dict[int, float]  # layer → ‖g_i‖²
    dots: dict[int, float]  # layer → ⟨g_i, Σg⟩
    sum_sq: float  # ‖Σg‖²

    @classmethod
    def from_sums(cls, units: list[int], sq_norms: torch.Tensor, dots: torch.Tensor, sum_sq: torch.Tensor) -> "GroupCoherence":
        """ρ and alignment with the kernel module's definitions (coherence, unit_alignment)."""
        stats = TiedGradStats(sq_norms=sq_norms, dots=dots, sum_sq=sum_sq)
        if bool(torch.isfinite(torch.cat([sq_norms, dots, sum_sq.reshape(1)])).all()):
            rho, alignment = coherence(stats), unit_alignment(stats).tolist()
        else:  # coherence() would clamp nan to 1: an overflowed step must not look coherent
            rho, alignment = math.nan, [math.nan] * len(units)
        return cls(
            units=tuple(units), rho=rho, alignment=dict(zip(units, alignment)),
            sq_norms=dict(zip(units, sq_norms.tolist())), dots=dict(zip(units, dots.tolist())), sum_sq=float(sum_sq),
        )

    def unit_shares(self) -> dict[str, dict[int, float]]:
        """Per unit, normalised by ‖Σg‖²: pull ⟨g_i, Σg⟩/‖Σg‖² (they sum to 1) and energy ‖g_i‖²/‖Σg‖²
        (what ``untie.moments=probe`` reads; nan when Σg is zero or not finite)."""
        s = self.sum_sq if self.sum_sq > 0 else math.nan
        return {"pull": {u: d / s for u, d in self.dots.items()}, "energy": {u: q / s for u, q in self.sq_norms.items()}}


@dataclass(frozen=True)
class ProbeResult:
    """Every tie group's coherence on one probe step (groups of ≥ 2 units), identical on every rank."""

    groups: dict[int, GroupCoherence]

    def to_record(self) -> dict[str, float]:
        """Flat metrics: {"coherence/g0": ρ, "alignment/g0/u2": cos, ...}."""
        record: dict[str, float] = {}
        for g, c in sorted(self.groups.items()):
            record[f"coherence/g{g}"] = c.rho
            record.update({f"alignment/g{g}/u{u}": a for u, a in c.alignment.items()})
        return record


@dataclass(frozen=True)
class _Matrix:
    """One hooked matrix of a tied block."""

    group: int
    index: int  # position among the block's matrices: the same for every unit and stage
    name: str  # the weight's name in the block, e.g. "attn.q_proj.weight"
    shape: tuple[int, ...]  # this rank's (out, in) shard
    gather: str  # "input" (column layer) / "grad" (row layer) under sequence parallelism, else ""
    kv_copy: bool = False  # one of the tp / n_kv_heads copies of a KV head (ReplicatedKVLinear)


class _PendingCapture:
    """The backward half of one matrix application: holds its input until the output's gradient arrives."""

    __slots__ = ("probe", "matrix", "layer", "x")

    def __init__(self, probe: "CoherenceProbe", matrix: _Matrix, layer: int, x: torch.Tensor):
        self.probe, self.matrix, self.layer, self.x = probe, matrix, layer, x

    def __call__(self, grad: torch.Tensor) -> None:
        x, self.x = self.x, None  # release the activation as soon as it is used
        if x is not None:
            self.probe._accumulate(self.matrix, self.layer, x, grad)


class CoherenceProbe:
    """Captures each unit's gradient of its tied block on probe steps; see the module docstring.

    module: what DeepSpeed wraps (the plain ``Transformer``, or this stage's
    PipelineModule); plan: the model's sharing plan; groups: the process groups, or
    None for one process without any (tests, tools); sequence_parallel: as configured.

    Per step: ``arm()`` before the forward passes, the step's forwards and backwards,
    then ``finish()`` (a collective: every rank calls it) for the result, or
    ``disarm()`` to drop the step. ``remove()`` takes every hook out (before the
    engine is rebuilt).
    """

    def __init__(self, module: nn.Module, plan: SharingPlan, groups: ParallelGroups | None, sequence_parallel: bool = False):
        self.module, self.plan, self.groups, self.sequence_parallel = module, plan, groups, sequence_parallel
        self.tracker = UnitTracker()
        self.tied_groups = [g for g in range(plan.n_groups) if len(plan.units_of(g)) > 1]
        self._units: dict[int, list[int]] = {}  # group → its units on this rank
        self._matrices: dict[int, list[_Matrix]] = {}  # group → the block's hooked matrices
        self._comms: dict[int, dict] = {}  # group → DeepSpeed tie comm, for groups spanning several stages
        self._owners: list[nn.Module] = []  # modules whose unit_tracker we set
        self._handles: list = []
        self._grads: dict[tuple[int, int], torch.Tensor] | None = None  # (layer, matrix index) → fp32; None = disarmed
        for g, block in self._local_blocks().items():
            self._hook_block(g, block)

    # ------------------------------------------------------------ set-up

    def _local_blocks(self) -> dict[int, nn.Module]:
        """The tied blocks on this rank (tie groups of ≥ 2 units in the whole plan), set up their trackers."""
        tied_modules = getattr(self.module, "tied_modules", None)  # a PipelineModule's per-stage tied layers
        if tied_modules is None:
            if getattr(self.module, "plan", self.plan) != self.plan:
                raise ValueError(f"the probe's plan {self.plan.to_list()} is not the model's {self.module.plan.to_list()}")
            self._set_tracker(self.module)
            self._units = {g: self.plan.units_of(g) for g in self.tied_groups}
            return {g: self.module.blocks[str(g)] for g in self.tied_groups}
        blocks = {}
        for layer in stage_units(self.module):
            g = self.plan.group_of[layer]
            if g not in self.tied_groups:
                continue
            key = f"block{g}"
            if key not in tied_modules:
                raise ValueError(f"layer {layer} applies group {g} in the plan, but this stage has no tied module '{key}'")
            if g not in blocks:
                blocks[g] = tied_modules[key].block
                self._set_tracker(tied_modules[key])
                comm = getattr(self.module, "tied_comms", {}).get(key)
                if comm is not None and len(comm["ranks"]) > 1:
                    self._comms[g] = comm
            self._units.setdefault(g, []).append(layer)
        return blocks

    def _set_tracker(self, owner: nn.Module) -> None:
        owner.unit_tracker = self.tracker
        self._owners.append(owner)

    def _hook_block(self, group: int, block: nn.Module) -> None:
        matrices = []
        for name, m in block.named_modules():
            if not isinstance(m, MATRICES):
                continue  # norms are left out (module docstring)
            if isinstance(m, (*COLUMNS, RowParallelLinear)) and m.sequence_parallel != self.sequence_parallel:
                raise ValueError(f"{name} has sequence_parallel={m.sequence_parallel}, the probe {self.sequence_parallel}")
            gather = ""
            if self.sequence_parallel and isinstance(m, COLUMNS) and not m.shared_input:  # else gathered before it
                gather = "input"
            elif self.sequence_parallel and isinstance(m, RowParallelLinear):
                gather = "grad"
            if gather and self.groups is None:
                raise ValueError("sequence parallelism needs the process groups (groups=None)")
            # ZeRO-3 empties partitioned parameters and keeps the logical shape in ds_shape.
            shape = tuple(getattr(m.weight, "ds_shape", m.weight.shape))
            matrix = _Matrix(group, len(matrices), f"{name}.weight" if name else "weight", shape, gather,
                             isinstance(m, ReplicatedKVLinear))
            matrices.append(matrix)
            self._handles.append(m.register_forward_hook(partial(self._on_forward, matrix)))
        self._matrices[group] = matrices

    # ------------------------------------------------------------ per step

    @property
    def armed(self) -> bool:
        return self._grads is not None

    def arm(self) -> None:
        """Make this step a probe step: per-unit buffers start at zero (allocated at first use)."""
        self._grads = {}

    def disarm(self) -> None:
        """End the probe step without a result; frees the buffers."""
        self._grads = None

    def _on_forward(self, matrix: _Matrix, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._grads is None or not torch.is_grad_enabled() or not output.requires_grad:
            return
        layer = self.tracker.current
        if not 0 <= layer < self.plan.n_layers or self.plan.group_of[layer] != matrix.group:
            raise RuntimeError(
                f"probe: block of group {matrix.group} applied while the unit tracker says layer {layer}; "
                "blocks must be applied through Transformer._apply_unit or pipeline.BlockUnit"
            )
        output.register_hook(_PendingCapture(self, matrix, layer, inputs[0].detach()))

    def _accumulate(self, matrix: _Matrix, layer: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        """g_layer += goᵀ·x for one application of ``matrix`` (called in backward)."""
        if self._grads is None:
            return  # disarmed between forward and backward
        if matrix.gather == "input":
            x = gather_sequence(x, self.groups.tp_group)  # (B, T, in) from (B, T/tp, in)
        elif matrix.gather == "grad":
            grad = gather_sequence(grad, self.groups.tp_group)  # (B, T, out) from (B, T/tp, out)
        go, xs = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, out), (N, in)
        key = (layer, matrix.index)
        buf = self._grads.get(key)
        if buf is None:
            buf = self._grads[key] = torch.zeros(go.shape[-1], xs.shape[-1], device=go.device, dtype=torch.float32)
        if go.dtype == xs.dtype == torch.float32:
            buf.addmm_(go.t(), xs)
        else:
            # bf16/fp16: the GEMM accumulates in fp32 and rounds its (out, in) result once, as autograd's own
            # weight gradient does; micro-batches then accumulate in fp32. An fp32 GEMM would cost ~10x.
            buf.add_(go.t() @ xs.to(go.dtype))

    def unit_gradients(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer ``layer``'s captured gradients so far, by weight name in the block (this rank's shards; armed only)."""
        if self._grads is None:
            raise RuntimeError("the probe is not armed: no gradients are captured")
        group = self.plan.group_of[layer]
        return {m.name: self._grad(layer, m) for m in self._matrices.get(group, [])}

    def _grad(self, layer: int, matrix: _Matrix) -> torch.Tensor:
        """The unit's buffer, or zeros if it never ran backward this step."""
        buf = self._grads.get((layer, matrix.index))
        return buf if buf is not None else torch.zeros(matrix.shape, device=self._device(), dtype=torch.float32)

    def _device(self) -> torch.device:
        if self._grads:
            return next(iter(self._grads.values())).device
        return next(self.module.parameters()).device

    # ------------------------------------------------------------ results

    def finish(self) -> ProbeResult:
        """Reduce the step's per-unit gradients to ProbeResult (identical on all ranks) and disarm.

        Collective: every rank calls it, after the step's last backward.
        """
        if self._grads is None:
            raise RuntimeError("finish() without arm(): this was not a probe step")
        device = self._device()
        dp = self.groups.dims.dp_cp if self.groups is not None else 1  # context-parallel peers average too
        if dp > 1:
            self._average_over_data_parallel(dp)
        if self.groups is not None and self.groups.kv_group is not None:
            self._sum_kv_copies()
        n_layers, n_groups = self.plan.n_layers, self.plan.n_groups
        sums = torch.zeros(2 * n_layers + n_groups, device=device, dtype=torch.float64)  # [‖g_i‖² | ⟨g_i,Σg⟩ | ‖Σg‖²]
        for g, units in sorted(self._units.items()):  # one order on every stage: the tie all-reduces must pair up
            stats = self._group_stats(g, units)
            index = torch.tensor(units, device=device)
            sums[index] += stats.sq_norms.to(device, torch.float64)
            sums[n_layers + index] += stats.dots.to(device, torch.float64)
            sums[2 * n_layers + g] += stats.sum_sq.to(device, torch.float64)
        self._grads = None
        if self.groups is not None and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # every rank: tensor shards, pipeline stages, data-parallel replicas
            sums /= dp  # the replicas' statistics are equal after the averaging: count them once
        sq, dots, sum_sq = sums[:n_layers].cpu(), sums[n_layers:2 * n_layers].cpu(), sums[2 * n_layers:].cpu()
        return ProbeResult({
            g: GroupCoherence.from_sums(self.plan.units_of(g), sq[self.plan.units_of(g)], dots[self.plan.units_of(g)], sum_sq[g])
            for g in self.tied_groups
        })

    def _average_over_data_parallel(self, dp: int) -> None:
        """Each unit gradient buffer becomes its mean over the data-parallel group: the global batch's."""
        keys = sorted(self._grads)  # the same units ran on every replica: the buffers pair up in this order
        if not keys:
            return
        buffers = [self._grads[k] for k in keys]
        flat = flatten_for_collective(buffers, scale=1.0 / dp, dtype=torch.float32)
        dist.all_reduce(flat, group=self.groups.dp_group)
        unflatten_into(flat, buffers)

    def _sum_kv_copies(self) -> None:
        """tp > n_kv_heads: each copy of a KV head captured its own query heads' share of the unit gradient.

        Summed over the copies it is the unit's gradient; kept on the group's first copy alone (zeros on
        the others), the all-rank sums of ‖g_i‖², ⟨g_i, Σg⟩ and ‖Σg‖², additive over matrices, count
        each head once, as over disjoint tensor shards.
        """
        keys = sorted(k for k in self._grads if self._matrices[self.plan.group_of[k[0]]][k[1]].kv_copy)
        if not keys:
            return
        buffers = [self._grads[k] for k in keys]
        flat = flatten_for_collective(buffers, dtype=torch.float32)
        dist.all_reduce(flat, group=self.groups.kv_group)
        if dist.get_rank(self.groups.kv_group) != 0:
            flat.zero_()
        unflatten_into(flat, buffers)

    def _group_stats(self, group: int, units: list[int]) -> TiedGradStats:
        """This rank's ‖g_i‖², ⟨g_i, Σg⟩ for its units, and its share of ‖Σg‖², over the group's matrices."""
        contributions = [[self._grad(u, m) for u in units] for m in self._matrices[group]]  # [matrix][unit]
        partial_sums = [torch.zeros_like(units_of_m[0]) for units_of_m in contributions]
        stats = tied_grad_reduce(contributions, partial_sums)  # partial_sums += Σ_local g_i
        comm = self._comms.get(group)
        if comm is None:
            return stats  # every unit is here: the local sum is Σg
        flat = flatten_for_collective(partial_sums)
        dist.all_reduce(flat, group=comm["group"])  # Σg over the stages that hold the group
        unflatten_into(flat, partial_sums)
        dots = torch.stack([
            sum(torch.vdot(per_unit[k].reshape(-1), total.reshape(-1)) for per_unit, total in zip(contributions, partial_sums))
            for k in range(len(units))
        ])
        counted_here = dist.get_rank() == comm["ranks"][0]  # ‖Σg‖² once per tie group, not once per stage
        sum_sq = flat @ flat if counted_here else torch.zeros((), device=flat.device, dtype=flat.dtype)
        return TiedGradStats(sq_norms=stats.sq_norms, dots=dots.float(), sum_sq=sum_sq.float())

    def remove(self) -> None:
        """Take out every hook and tracker (before the engine is rebuilt); the probe is unusable after."""
        for handle in self._handles:
            handle.remove()
        for owner in self._owners:
            owner.unit_tracker = None
        self._handles, self._owners, self._grads = [], [], None
