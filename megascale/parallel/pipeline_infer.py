"""A pipelined model run forward outside DeepSpeed's schedule: generation and scoring for evaluation.

DeepSpeed's pipeline engine runs whole batches of fixed shape through its schedule, and
only as training or loss evaluation; generation needs one forward per new token with a
KV cache and explicit positions. ``PipelinedLM`` runs this rank's stage of the pipeline
module for that:

* every rank of one pipeline (the same data and tensor coordinates) calls it with the
  same tokens, in the same order;
* stage s receives the hidden states (B, T, D) from stage s-1, applies its layers (each
  applied layer with its own KV-cache entry, as the plain model does), and sends them on;
* the last stage applies ``fn`` to the logits and broadcasts the result over the pipeline
  group: next token ids or a few sums, never the (B, T, V) logits themselves.

One call at a time with no overlap between stages: evaluation, not throughput.
``megascale.model.generate.reduce_logits`` is the one entry point, for plain and
pipelined models alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from megascale.config import ModelConfig
from megascale.model.llama import LayerKV, position_inputs
from megascale.model.sharing import SharingPlan
from megascale.parallel.pipeline import EmbedLayer, HeadLayer, NormLayer, StageUnit
from megascale.parallel.topology import ParallelGroups


class PipelinedLM:
    """This rank's stage of a pipeline module, called like the plain model through ``reduce_logits``."""

    def __init__(self, stage_module: nn.Module, groups: ParallelGroups, cfg: ModelConfig, plan: SharingPlan,
                 full_logits: nn.Module):
        """``full_logits``: the plain model's (an all-gather of vocabulary shards under tensor parallelism)."""
        self.module, self.cfg, self.plan, self.full_logits = stage_module, cfg, plan, full_logits
        self.ranks = list(groups.grid.pp_group)  # global ranks of this pipeline, in stage order
        self.stage, self.group = groups.stage, groups.pp_group
        self.steps = [self._step(f) for f in stage_module.forward_funcs]

    # the parts of the plain model's interface evaluation uses
    def parameters(self):
        return self.module.parameters()

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "PipelinedLM":
        self.module.train(mode)
        return self

    def eval(self) -> "PipelinedLM":
        return self.train(False)

    def reduce_logits(self, fn: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor, tokens: torch.Tensor,
                      positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      doc_ids: torch.Tensor | None = None, cache: list[LayerKV] | None = None) -> torch.Tensor:
        """``fn(logits)`` on every stage, computed on the last; the result has ``like``'s shape and dtype."""
        B, T = tokens.shape
        cos, sin, mask = position_inputs(self.cfg, tokens, positions, doc_ids, mask)
        x = tokens if self.stage == 0 else self._receive(B, T, tokens.device)
        for step in self.steps:
            x = step(x, cos, sin, mask, cache)
        if self.stage < len(self.ranks) - 1:
            dist.send(x.contiguous(), self.ranks[self.stage + 1])
            out = torch.empty_like(like)
        else:
            out = fn(self.full_logits(x)).to(like.dtype).reshape(like.shape).contiguous()
        dist.broadcast(out, self.ranks[-1], group=self.group)
        return out

    def _receive(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        dtype = next(self.module.parameters()).dtype  # the engine casts every stage alike (fp32, bf16, fp16)
        hidden = torch.empty(B, T, self.cfg.d_model, dtype=dtype, device=device)
        dist.recv(hidden, self.ranks[self.stage - 1])
        return hidden

    @staticmethod
    def _step(f) -> Callable:
        """How one entry of the stage's forward_funcs runs with explicit positions, mask and KV cache."""
        if isinstance(f, EmbedLayer):
            return lambda x, cos, sin, mask, cache: f.embed(x)
        if isinstance(f, StageUnit):
            layer, block = f.unit.layer, f.module.block
            return lambda x, cos, sin, mask, cache: block(x, cos, sin, mask, None if cache is None else cache[layer])
        if isinstance(f, NormLayer):
            return lambda x, cos, sin, mask, cache: f.norm(x)
        if isinstance(f, HeadLayer):  # its forward passes the hidden states on under the fused loss
            return lambda x, cos, sin, mask, cache: f.lm_head(x)
        owner = (getattr(f, "args", None) or (None,))[0]
        if getattr(f, "func", None) is EmbedLayer.project and isinstance(owner, EmbedLayer):  # the tied LM head
            return lambda x, cos, sin, mask, cache: owner.lm_head(x)
        raise TypeError(f"PipelinedLM cannot run the pipeline layer {f!r}")
