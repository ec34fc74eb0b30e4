"""A Llama-style decoder in plain PyTorch, with tied transformer blocks.

RMSNorm, rotary position embeddings (RoPE, Hugging Face's rotate-half layout so
exported weights need no permutation), grouped-query attention, SwiGLU MLP,
optional embedding/LM-head tying.

Tied blocks: the model stores G unique blocks in ``blocks`` (an ``nn.ModuleDict``
keyed by group id, stable names for checkpoints and pipeline splits) and applies
them in the order of its ``SharingPlan``: layer i applies ``blocks[group_of[i]]``.
Units of one group therefore use one storage, and autograd sums their gradient
contributions into that storage's ``.grad``.

This module never imports DeepSpeed: parallelism and the engine wrap it from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from megascale.config import ModelConfig
from megascale.model import init
from megascale.model.attention import attention
from megascale.model.head_loss import linear_cross_entropy
from megascale.model.ops import apply_rope, rms_norm, swiglu
from megascale.model.sharing import SharingPlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = "torch"  # model.fused_ops, set by Transformer.set_ops_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.ops)


def rope_tables(head_dim: int, seq_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, hd), computed in fp32 on every call.

    Recomputing (T·hd/2 multiplies) instead of caching a buffer keeps the tables
    out of the engine's dtype cast, so positions stay exact under bf16.
    """
    return rope_tables_of(torch.arange(seq_len, device=device), head_dim, theta)


def rope_tables_of(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, hd) for positions (T,) shared by every row of a batch."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def sequence_rope_tables(head_dim: int, seq_len: int, theta: float, device: torch.device,
                         context=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of a batch's own ``seq_len`` tokens: positions 0..T-1, or under context parallelism
    (``context``: megascale.parallel.context_parallel.ContextParallel) this rank's tokens' global positions."""
    if context is None:
        return rope_tables(head_dim, seq_len, theta, device)
    return rope_tables_of(context.positions(seq_len, device), head_dim, theta)


def rope_tables_at(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, 1, T, hd) for explicit per-token positions (B, T).

    Used when examples are packed (positions restart at 0 in every example) and
    when decoding with a KV cache (the new token's position is past the prompt).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (B, 1, T, hd)
    return emb.cos(), emb.sin()


def document_mask(doc_ids: torch.Tensor, context=None) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T), True = may attend: same document and not in the future.

    Packed sequences hold several examples; a token must see only earlier tokens
    of its own example, so its output does not depend on what is packed beside it.
    Under context parallelism (doc_ids: this rank's tokens) the rank's rows of the
    whole sequence's mask, (B, 1, T/cp, T).
    """
    if context is not None:
        return context.document_mask(doc_ids)
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)  # (B, T, T)
    return (same & causal).unsqueeze(1)


def position_inputs(cfg: ModelConfig, tokens: torch.Tensor, positions: torch.Tensor | None,
                    doc_ids: torch.Tensor | None, mask: torch.Tensor | None, context=None):
    """RoPE tables and the attention mask every block of a forward reads: positions 0..T-1 (this rank's
    under context parallelism) or the given ones; the block-diagonal mask of ``doc_ids`` when given,
    else ``mask`` (None = causal)."""
    if positions is None:
        cos, sin = sequence_rope_tables(cfg.head_dim, tokens.shape[1], cfg.rope_theta, tokens.device, context)
    else:
        cos, sin = rope_tables_at(positions, cfg.head_dim, cfg.rope_theta)
    return cos, sin, (document_mask(doc_ids, context) if doc_ids is not None else mask)


class LayerKV:
    """Keys and values one applied layer has seen so far (generation with a KV cache).

    Tied layers share weights, not activations: a cache holds one of these per *applied* layer.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, nkv, T_seen, hd)
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values; return all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.backend = "torch"  # set by Transformer.set_attention_backend
        self.ops = "torch"  # model.fused_ops, set by Transformer.set_ops_backend
        self.context = None  # context parallelism (megascale.parallel.context_parallel), applied from outside
        # What q, k and v read: tensor parallelism puts its one gather (or copy) of the input here, for all three.
        self.proj_input: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        """mask: optional boolean (B, 1, T, T_keys), True = attend (replaces the causal mask); cache: KV of earlier steps."""
        x = self.proj_input(x)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        B, T = q.shape[:2]  # T from the projection: under sequence parallelism x holds only T/tp positions
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin, self.ops), apply_rope(k, cos, sin, self.ops)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, nkv, T_seen + T, hd)
        if self.context is not None and cache is None:  # x holds this rank's tokens only
            y = self.context.attention(q, k, v, backend=self.backend, mask=mask)
        else:
            y = attention(q, k, v, causal=True, backend=self.backend, mask=mask)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)
        self.ops = "torch"  # model.fused_ops, set by Transformer.set_ops_backend
        self.proj_input: nn.Module = nn.Identity()  # what gate and up read (Attention.proj_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_input(x)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.ops))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attn_norm(x))


class CrossEntropy(nn.Module):
    """Mean next-token cross-entropy over full-vocabulary logits (B, T, V).

    A module rather than a call inside ``forward`` so tensor parallelism can swap
    in the vocabulary-parallel version without touching the model.

    With per-token ``weights`` (B, T) the loss is Σ w·ce / Σ w over the micro-batch
    (trace fine-tuning: query and padding tokens weigh 0, trace and response their
    configured weights); 0 when every weight is 0.
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        flat = logits.float().view(-1, logits.size(-1))
        if weights is None:
            return F.cross_entropy(flat, targets.reshape(-1))
        return weighted_mean(F.cross_entropy(flat, targets.reshape(-1), reduction="none"), weights)


class LMHead(nn.Linear):
    """hidden (..., D) → logits (..., V); given targets, the loss instead, without the full logits.

    The loss is computed here, inside the head module's forward, so that ZeRO-3 (which
    gathers a module's parameters around its forward and backward) has the weight
    gathered while the fused op reads it.
    """

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__(d_model, vocab_size, bias=False)
        self.chunk_tokens = 0  # train.loss_chunk_tokens; 0 = auto
        self.ops = "torch"  # model.fused_ops: "triton" runs the fused loss's row-wise steps as kernels

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, targets, weights, chunk_tokens=self.chunk_tokens, backend=self.ops)


def weighted_mean(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w·x / Σ w (0 when Σ w = 0), in fp32."""
    w = weights.reshape(-1).float()
    return (per_token * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class ParamCounts:
    """Unique parameters (memory) vs applied parameters (compute)."""

    unique: int
    applied: int
    embedding: int  # input embedding rows: a lookup, no FLOPs


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: SharingPlan | None = None, seed: int = 0):
        """Weights drawn from ``seed`` by parameter name (megascale.model.init); built under
        ``torch.device("meta")`` the parameters get shapes only, and ``materialize`` draws them later."""
        super().__init__()
        self.cfg = cfg
        self.plan = plan or SharingPlan.parse(cfg.sharing, cfg.n_layers)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleDict({str(g): Block(cfg) for g in range(self.plan.n_groups)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.loss_fn: nn.Module = CrossEntropy()
        # Loss through the head's fused chunked op (train.fused_loss) instead of full logits then loss_fn.
        self.fused_loss = False
        # Identity here; tensor parallelism swaps in an all-gather of the vocabulary shards.
        self.full_logits: nn.Module = nn.Identity()
        # Recompute layer activations in backward (set from parallel.activation_checkpointing): every
        # layer's, or only the first ``checkpoint_layers`` ones' (parallel.checkpoint_layers; 0 = all).
        self.activation_checkpointing = False
        self.checkpoint_layers = 0
        # An object with an int ``current``, told which layer (unit) runs each block: how the
        # coherence probe (megascale.train.probe) attributes a shared block's gradient to units.
        self.unit_tracker = None
        # Context parallelism: tokens hold this rank's share of each sequence (set from outside).
        self.context = None
        init.mark(self, self._init_std)
        self.reset_parameters(seed)

    def _init_std(self, name: str, owner: nn.Module) -> float | None:
        """Normal(0, init_std) for linear and embedding weights, the residual outputs scaled by depth; ones for norms."""
        if not isinstance(owner, (nn.Linear, nn.Embedding)):
            return None
        residual_out = name.endswith(("attn.o_proj.weight", "mlp.down_proj.weight"))
        return init.residual_std(self.cfg.init_std, self.cfg.n_layers) if residual_out else self.cfg.init_std

    def reset_parameters(self, seed: int = 0) -> None:
        """Draw the weights again from ``seed`` (parameters on the meta device are left for ``materialize``)."""
        init.init_in_place(self, seed)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks.values():
            block.attn.backend = backend

    def set_ops_backend(self, backend: str, loss_backend: str | None = None) -> None:
        """RMSNorm, RoPE, SwiGLU in PyTorch ("torch") or as Triton kernels ("triton"), and the fused loss's
        row-wise steps by ``loss_backend`` (default: the same)."""
        for module in self.modules():
            if isinstance(module, LMHead):
                module.ops = loss_backend or backend
            elif isinstance(module, (RMSNorm, Attention, MLP)):
                module.ops = backend

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        cache: list[LayerKV] | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V), or the mean cross-entropy when targets are given.

        Pretraining passes tokens and targets only (causal attention, positions 0..T-1).
        Fine-tuning adds per-token loss ``weights`` (B, T), ``doc_ids`` (B, T) for packed
        examples (block-diagonal causal attention) and ``positions`` (B, T) restarting per
        example. Generation passes an explicit boolean ``mask`` (B, 1, T, T_keys) and a
        ``cache`` with one ``LayerKV`` per applied layer.
        """
        cos, sin, mask = position_inputs(self.cfg, tokens, positions, doc_ids, mask, self.context)
        x = self.embed(tokens)  # (B, T, D)
        for layer in range(self.plan.n_layers):
            kv = None if cache is None else cache[layer]
            if self.recomputes(layer):
                x = torch.utils.checkpoint.checkpoint(self._apply_unit, layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = self._apply_unit(layer, x, cos, sin, mask, kv)
        hidden = self.norm(x)
        if targets is None:
            return self.full_logits(self.lm_head(hidden))  # the head gives (B, T, V/tp) under tensor parallelism
        if self.fused_loss:
            loss = self.lm_head(hidden, targets, weights)
        else:  # CrossEntropy or its vocabulary-parallel swap: both take weights=None as the plain mean
            loss = self.loss_fn(self.lm_head(hidden), targets, weights)
        if weights is not None and self.context is not None:  # this rank's share of the rows' weighted loss
            loss = loss * self.context.loss_share(weights)
        return loss

    def recomputes(self, layer: int) -> bool:
        """Whether applied layer ``layer`` keeps only its input in forward and recomputes the rest in backward."""
        wanted = self.checkpoint_layers == 0 or layer < self.checkpoint_layers
        return self.activation_checkpointing and self.training and wanted

    def _apply_unit(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    mask: torch.Tensor | None, kv: LayerKV | None) -> torch.Tensor:
        """Layer ``layer``: its group's block, after telling the unit tracker (if any) which unit runs.

        This is the function activation checkpointing wraps, so the recomputation in
        backward names the unit again before it re-runs the block.
        """
        if self.unit_tracker is not None:
            self.unit_tracker.current = layer
        return self.blocks[str(self.plan.group_of[layer])](x, cos, sin, mask, kv)

    # ------------------------------------------------------------ accounting

    def param_counts(self) -> ParamCounts:
        unique = sum(p.numel() for p in self.parameters())  # parameters() dedups shared storage
        per_block = [sum(p.numel() for p in self.blocks[str(g)].parameters()) for g in self.plan.group_of]
        head = 0 if self.cfg.tie_embeddings else self.lm_head.weight.numel()
        embedding = self.embed.weight.numel()
        applied = embedding + head + self.norm.weight.numel() + sum(per_block)
        return ParamCounts(unique=unique, applied=applied, embedding=embedding)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), from *applied* parameters.

        6 FLOPs per applied weight that multiplies (2 forward, 4 backward) — every
        parameter except the embedding lookup, but including the LM head even when
        it is tied to the embedding — plus attention's score and value products:
        2·2·T·(nh·hd) per layer forward, ×3 with backward = 12·L·nh·hd·T
        (PaLM's convention; causal masking is not subtracted).
        """
        c = self.cfg
        counts = self.param_counts()
        matmul_params = counts.applied - counts.embedding + (self.lm_head.weight.numel() if c.tie_embeddings else 0)
        return 6.0 * matmul_params + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def recompute_flops_per_token(self, seq_len: int, layers: int) -> float:
        """The FLOPs a token adds when ``layers`` applied layers run their forward again in backward.

        Their matmuls but the down projection, at 2 per weight: PyTorch's non-reentrant checkpoint stops
        recomputing once backward has every tensor it saved, and nothing reads that last product; and the
        attention products, 4·nh·hd·T. The planner's ``recompute_flops_per_token`` is the same closed form,
        which tests/test_planner.py checks against the FLOPs PyTorch counts in a real step.
        """
        c = self.cfg
        weights = 2 * c.d_model * c.n_heads * c.head_dim + 2 * c.d_model * c.kv_heads * c.head_dim + 2 * c.d_model * c.hidden_dim
        return layers * (2.0 * weights + 4.0 * c.n_heads * c.head_dim * seq_len)

