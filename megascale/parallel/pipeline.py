"""Pipeline parallelism on DeepSpeed's pipeline engine (1F1B schedule), with tied blocks.

The plain model becomes a flat layer list: embedding, one entry per *applied*
layer, final norm + LM head. Every block entry is a ``TiedLayerSpec`` keyed by
its tie group, so DeepSpeed builds a group's block once per stage — units of a
group on one stage share one storage — and stages holding the same group keep
replicas that it keeps in sync through a per-group process group. With
``tie_embeddings`` the LM head is the embedding's ``TiedLayerSpec`` on the last
stage.

DeepSpeed all-reduces replica gradients one tensor at a time; we replace that
step with one coalesced all-reduce per tie group (flatten → all-reduce →
unflatten). It runs where DeepSpeed's runs: after the last backward of the
batch and *before* the data-parallel reduction, so the DP all-reduce sees the
summed tied gradient (the ordering Megatron-LM#844 got wrong for the shared
embedding) and every replica takes the identical optimizer step.

Each block entry's ``forward_fn`` (``BlockUnit``) tells the block which layer applies
it, for the per-unit gradients of megascale.train.probe; ``StageUnit`` keeps such
entries in DeepSpeed's per-layer checkpoint files and activation checkpointing.

Trace fine-tuning's packed rows travel between stages as a tuple (hidden, doc_ids,
positions): every block rebuilds its block-diagonal mask and RoPE tables from the two
(B, T) integer tensors, which are far smaller than a (B, 1, T, T) mask, and DeepSpeed
sends no gradient for integer tensors. The last stage's labels are then (targets,
weights). Pretraining sends the hidden states alone.

Weights come from the (with tp > 1, already sharded) plain model: its own when it
was built with storage; drawn by name for this stage's layers only when it was
built on the meta device (megascale.model.init). Either way a pipelined run starts
from the 1-rank run's exact weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megascale.errors import MegascaleError
from megascale.kernels.tied_grad import flatten_for_collective, unflatten_into
from megascale.model.llama import Transformer, document_mask, rope_tables_at, sequence_rope_tables
from megascale.parallel.topology import ParallelGroups


class EmbedLayer(nn.Module):
    """tokens (B, T) → hidden (B, T, D), or (tokens, doc_ids, positions) → (hidden, doc_ids, positions).

    Holds the LM head too when it is tied to the embedding.
    """

    def __init__(self, embed: nn.Module, lm_head: nn.Module | None = None, fused_loss: bool = False):
        super().__init__()
        self.embed = embed
        self.lm_head = lm_head
        self.fused_loss = fused_loss

    def forward(self, x):
        if isinstance(x, tuple):
            tokens, *rows = x
            return (self.embed(tokens), *rows)
        return self.embed(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The tied LM head on the last stage: hidden (B, T, D) → logits (B, T, V[/tp]); with the fused loss, hidden."""
        return x if self.fused_loss else self.lm_head(x)


class BlockLayer(nn.Module):
    """One applied transformer layer: RoPE tables from the sequence length, then the (shared) block."""

    def __init__(self, block: nn.Module, head_dim: int, rope_theta: float, seq_multiplier: int = 1, context=None):
        super().__init__()
        self.block = block
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self.seq_multiplier = seq_multiplier  # tp under sequence parallelism: x holds T/tp positions
        self.context = context  # context parallelism: x holds this rank's tokens of each sequence
        self.unit_tracker = None  # as Transformer.unit_tracker: told which layer applies the block

    def forward(self, x):
        if isinstance(x, tuple):  # packed fine-tuning rows: per-example positions and attention
            hidden, doc_ids, positions = x
            cos, sin = rope_tables_at(positions, self.head_dim, self.rope_theta)
            return self.block(hidden, cos, sin, document_mask(doc_ids, self.context)), doc_ids, positions
        cos, sin = sequence_rope_tables(self.head_dim, x.shape[1] * self.seq_multiplier, self.rope_theta, x.device,
                                        self.context)
        return self.block(x, cos, sin)


@dataclass(frozen=True)
class BlockUnit:
    """The ``forward_fn`` of layer ``layer``'s TiedLayerSpec: DeepSpeed calls it as ``fn(tied BlockLayer, x)``.

    A stage holds one BlockLayer per tie group, shared by the group's units there, so
    only the call site knows which layer runs; it tells the layer's unit tracker (the
    coherence probe's) before applying the block. The pipeline checkpoints this call
    (through StageUnit), so the recomputation in backward names the unit again.
    """

    layer: int

    def __call__(self, module: BlockLayer, x):
        if module.unit_tracker is not None:
            module.unit_tracker.current = self.layer
        return module(x)


class StageUnit:
    """One block application in a stage's ``forward_funcs``: the tied BlockLayer and the BlockUnit that applies it.

    DeepSpeed would keep ``partial(BlockUnit(layer), block_layer)`` there, and it takes an
    entry without a ``state_dict`` for a stateless function: it would neither write it to
    nor read it from its per-layer checkpoint files (layer_XX-model_YY-model_states.pt),
    and would not checkpoint its activations. This stand-in is called the same way and
    hands state and parameters to the BlockLayer, so checkpoints and recomputation stay
    what they were when the BlockLayer itself sat in ``forward_funcs``.
    """

    def __init__(self, unit: BlockUnit, module: BlockLayer):
        self.unit, self.module = unit, module
        self.recompute = True  # under activation checkpointing (parallel.checkpoint_layers picks the stage's first N)

    def __call__(self, x):
        return self.unit(self.module, x)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)

    def parameters(self, *args, **kwargs):
        return self.module.parameters(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        return self.module.named_parameters(*args, **kwargs)


class NormLayer(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x) -> torch.Tensor:
        return self.norm(x[0] if isinstance(x, tuple) else x)  # the rows' doc_ids and positions end here


class HeadLayer(nn.Module):
    """hidden → logits; with the fused loss, the hidden states pass through and ``HeadLoss`` applies the head."""

    def __init__(self, lm_head: nn.Module, fused_loss: bool = False):
        super().__init__()
        self.lm_head = lm_head
        self.fused_loss = fused_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.fused_loss else self.lm_head(x)


class HeadLoss:
    """The last stage's loss_fn under train.fused_loss: the LM head's fused chunked loss on the final hidden states.

    A plain callable, not an nn.Module, so the head's weight is not registered a second
    time under the PipelineModule; ``head`` is set once the stage's layers are built.
    """

    def __init__(self) -> None:
        self.head: nn.Module | None = None

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(hidden, targets, weights)


class PipelineLoss:
    """The last stage's loss_fn as DeepSpeed calls it, ``fn(outputs, labels)``: labels are the
    targets, or (targets, weights) for trace fine-tuning's weighted loss, which under context
    parallelism is scaled by the rank's share of the weights (as ``Transformer.forward`` does)."""

    def __init__(self, loss: Callable[..., torch.Tensor], context=None):
        self.loss = loss
        self.context = context

    def __call__(self, outputs: torch.Tensor, labels) -> torch.Tensor:
        if not isinstance(labels, tuple):
            return self.loss(outputs, labels)
        loss = self.loss(outputs, *labels)
        return loss if self.context is None else loss * self.context.loss_share(labels[1])


def _stage_head(module) -> nn.Module | None:
    """The LM head this stage applies last (its own or the tied embedding's), or None on other stages."""
    last = module.forward_funcs[-1] if module.forward_funcs else None
    if isinstance(last, HeadLayer):
        return last.lm_head
    owner = (getattr(last, "args", None) or (None,))[0]  # a tied layer's functools.partial(project, EmbedLayer)
    return owner.lm_head if isinstance(owner, EmbedLayer) and getattr(last, "func", None) is EmbedLayer.project else None


def _param_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def pipeline_layers(model: Transformer, seq_multiplier: int = 1, fused_loss: bool = False) -> list:
    """The model as DeepSpeed layer specs: embed, L applied blocks, norm, head (hidden pass-through when fused_loss)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # noqa: PLC0415

    cfg = model.cfg
    tied_embed = cfg.tie_embeddings
    if tied_embed:
        attrs = ["embed.weight"]
        layers = [TiedLayerSpec("embed", EmbedLayer, model.embed, model.lm_head, fused_loss, tied_weight_attr=attrs)]
    else:
        layers = [LayerSpec(EmbedLayer, model.embed)]
    for layer, group in enumerate(model.plan.group_of):
        block = model.blocks[str(group)]
        names = _param_names(BlockLayer(block, cfg.head_dim, cfg.rope_theta))
        layers.append(TiedLayerSpec(f"block{group}", BlockLayer, block, cfg.head_dim, cfg.rope_theta, seq_multiplier,
                                    model.context, forward_fn=BlockUnit(layer), tied_weight_attr=names))
    layers.append(LayerSpec(NormLayer, model.norm))
    if tied_embed:
        layers.append(TiedLayerSpec("embed", EmbedLayer, model.embed, model.lm_head, fused_loss,
                                    forward_fn=EmbedLayer.project, tied_weight_attr=["embed.weight"]))
    else:
        layers.append(LayerSpec(HeadLayer, model.lm_head, fused_loss))
    return layers


NAMED_PARTITIONS = {"parameters": "parameters", "uniform": "uniform", "blocks": "type:BlockLayer"}


def explicit_boundaries(spec: str, n_layers: int, pp: int) -> list[int] | None:
    """parallel.partition='2,6' (blocks per stage) → layer-list boundaries; None for a named method.

    The layer list is [embed, L blocks, norm, head]: the embedding joins the first
    stage, the norm and head the last.
    """
    if spec in NAMED_PARTITIONS:
        return None
    try:
        counts = [int(x) for x in spec.split(",")]
    except ValueError:
        raise MegascaleError(
            f"parallel.partition='{spec}' is not parameters, uniform, blocks or a list of blocks per stage like 2,6"
        ) from None
    if len(counts) != pp or sum(counts) != n_layers or min(counts) < 0:
        raise MegascaleError(
            f"parallel.partition='{spec}' must give {pp} non-negative block counts (one per stage) summing to model.n_layers={n_layers}"
        )
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count + (1 if len(bounds) == 1 else 0))
    bounds[-1] += 2  # norm and head
    return bounds


def stage_units(module) -> list[int]:
    """The layers (units) whose blocks this stage's PipelineModule applies, in order."""
    specs = module._layer_specs[module._local_start:module._local_stop]
    return [spec.forward_fn.layer for spec in specs if isinstance(getattr(spec, "forward_fn", None), BlockUnit)]


def _module_class(bounds: list[int] | None, give_storage: Callable[[nn.Module], None] | None = None,
                  checkpoint_layers: int = 0):
    """A PipelineModule subclass that applies blocks as StageUnits, and takes the stage boundaries as given if any.

    Its ``_build`` calls ``give_storage`` on the stage: after DeepSpeed has chosen this
    stage's layers, before it moves them to the device and broadcasts tied weights.
    With ``checkpoint_layers`` N > 0 only the stage's first N block applications are
    recomputed in backward (DeepSpeed checkpoints each entry of ``forward_funcs`` that
    ``_is_checkpointable`` accepts, one at a time at interval 1).
    """
    from deepspeed.pipe import PipelineModule  # noqa: PLC0415

    def _build(self):
        PipelineModule._build(self)
        if give_storage is not None:
            give_storage(self)
        self.forward_funcs = [StageUnit(f.func, f.args[0]) if isinstance(getattr(f, "func", None), BlockUnit) else f
                              for f in self.forward_funcs]
        units = [f for f in self.forward_funcs if isinstance(f, StageUnit)]
        for i, unit in enumerate(units):
            unit.recompute = checkpoint_layers == 0 or i < checkpoint_layers

    def _is_checkpointable(self, funcs):
        # The chosen block applications alone, as the 1-rank model recomputes. DeepSpeed's own test would take
        # every module with parameters too: the embedding, final norm and head, whose recomputation frees
        # next to nothing (the head keeps the input the checkpoint would keep; the final norm under the PyTorch
        # ops one d-wide product a token, once per model, none with the fused kernel) and ran an unfused
        # head's d x V matmul twice on the last stage.
        return any(isinstance(f, StageUnit) and f.recompute for f in funcs)

    def _partition_layers(self, method="uniform"):
        self.parts = list(bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    methods = {"_build": _build, "_is_checkpointable": _is_checkpointable}
    if bounds is not None:
        methods["_partition_layers"] = _partition_layers
    return type("MegascalePipelineModule", (PipelineModule,), methods)


def build_pipeline_module(model: Transformer, groups: ParallelGroups, partition: str, activation_checkpointing: bool,
                          sequence_parallel: bool = False, fused_loss: bool = False,
                          give_storage: Callable[[nn.Module], None] | None = None, checkpoint_layers: int = 0):
    """Wrap the plain (possibly tensor-parallel) model into a DeepSpeed PipelineModule for this rank's stage.

    ``give_storage(stage_module)`` runs once the stage's layers are chosen (parameters still
    on the meta device get storage there: megascale.model.init.materialize), so the other
    stages' blocks never take memory here.
    """
    bounds = explicit_boundaries(partition, model.cfg.n_layers, groups.dims.pp)
    head_loss = HeadLoss()
    loss_fn = PipelineLoss(head_loss if fused_loss else model.loss_fn, model.context)
    module = _module_class(bounds, give_storage, checkpoint_layers if activation_checkpointing else 0)(
        layers=pipeline_layers(model, groups.dims.tp if sequence_parallel else 1, fused_loss),
        topology=groups.topology,
        loss_fn=loss_fn,
        partition_method=NAMED_PARTITIONS.get(partition, "uniform"),
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
        activation_checkpoint_func=_checkpoint,
    )
    if fused_loss:
        head_loss.head = _stage_head(module)
    return module


def _checkpoint(function, *args):
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


# ------------------------------------------------------------ tied gradients


def reduce_tied_grads_coalesced(engine) -> None:
    """One all-reduce per tie group over the stages that hold it (replaces DeepSpeed's per-tensor loop)."""
    if engine.zero_optimization_partition_gradients():
        engine.optimizer.overlapping_partition_gradients_reduce_epilogue()
    module = engine.module
    for key, comm in module.tied_comms.items():
        if len(comm["ranks"]) < 2:
            continue  # the group lives on one stage: its units already share one .grad
        grads = []
        for attr in comm["weight_attr"]:
            weight = module._recursive_getattr(module.tied_modules[key], attr)
            grad = weight._hp_grad if engine.using_bf16_optimizer else weight.grad
            if grad is not None:
                grads.append(grad)
        if grads:
            # Triton multi-tensor copy on CUDA, torch.cat elsewhere (megascale.kernels.tied_grad).
            flat = flatten_for_collective(grads)
            dist.all_reduce(flat, group=comm["group"])
            unflatten_into(flat, grads)


def install_coalesced_tied_reduction(engine) -> None:
    """Route the schedule's ReduceTiedGrads instruction to ``reduce_tied_grads_coalesced``."""
    from deepspeed.runtime.pipe import schedule  # noqa: PLC0415

    # The engine looks instructions up on ``self._INSTRUCTION_MAP``; an instance attribute overrides the class map.
    engine._INSTRUCTION_MAP = {**type(engine)._INSTRUCTION_MAP, schedule.ReduceTiedGrads: _reduce_tied_grads_method}


def _reduce_tied_grads_method(self):
    reduce_tied_grads_coalesced(self)
