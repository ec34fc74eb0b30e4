"""Shape solver: a target size → a Llama-style shape with hardware-friendly sizes.

Counts are exact closed forms of ``megascale.model.Transformer`` (tested
against the real module on the meta device). Per block::

    norms 2d + q d·(H·hd) + k, v 2·d·(K·hd) + o (H·hd)·d + SwiGLU 3·d·f

    applied = V·d (embedding) + V·d (LM head, unless tied) + d (final norm) + L·block
    unique  = the same with G stored blocks instead of L        (G = the sharing plan's groups)
    FLOPs/token (trainer) = 6·(L·block + d + V·d) + 12·L·H·hd·T

The FLOPs line is ``Transformer.flops_per_token``: 6 per applied weight that
multiplies (the embedding lookup does not, the LM head always does) plus the
attention products, 12·L·H·hd·T. DeepSeek's model scale M uses 6·L·block +
6·L·H·hd·T (no vocabulary, causal half of the attention).

Tied blocks: the planner hits its target with *applied* parameters (compute
follows them) and reports the unique ones (memory follows them).

Hardware-friendly: head dim 64 below d_model 2048 and 128 from there (Llama,
Pythia, GPT-3 conventions), d_model a multiple of 64 (128 from 512, 256 from
2048, 512 from 8192, 1024 from 16384), FFN width a multiple of 64 (128 from
d_model 1024) between 2·d and 4·d; from 3B parameters, 8 KV heads (Llama 2/3)
and head counts divisible by 8 are preferred.
Depth follows a width/depth ratio that grows with size, fitted by eye to
published families: ~16 at 1M parameters, 48 at 100M, 64 at 1B, 100 at 10B,
128 from 100B (GPT-3 175B: 128, Chinchilla 70B: 102, Llama-2 7B: 128,
Pythia 160M: 64). Kaplan et al. 2020 (fig. 5) found the loss within ~1-3% over
ratios 20–200, so this is a soft preference; the parameter count is the hard
constraint.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from megascale.errors import MegascaleError
from megascale.model.sharing import SharingPlan
from megascale.planner.mappings import MODEL_SCALE, NON_EMBEDDING, PARAMS

DEFAULT_TOLERANCE = 0.02

# (log10 N, d_model / n_layers) — interpolated linearly in log10 N.
_ASPECT_POINTS = ((6.0, 16.0), (8.0, 48.0), (9.0, 64.0), (10.0, 100.0), (11.0, 128.0))


@dataclass(frozen=True)
class Shape:
    """A model shape, in ``ModelConfig``'s terms."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    seq_len: int
    sharing: str = "none"
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_groups(self) -> int:
        return _n_groups(self.sharing, self.n_layers)

    def model_overrides(self) -> dict:
        """The ``model`` section of a config for this shape."""
        return {
            "vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "ffn_dim": self.ffn_dim,
            "max_seq_len": self.seq_len, "rope_theta": 10000.0, "tie_embeddings": self.tie_embeddings,
            "sharing": self.sharing,
        }

    def describe(self) -> str:
        kv = f"{self.n_kv_heads} KV heads" if self.n_kv_heads != self.n_heads else "MHA"
        tied = f" · blocks tied {self.sharing} ({self.n_groups} unique)" if self.sharing != "none" else ""
        emb = " · tied embeddings" if self.tie_embeddings else ""
        return (f"d_model {self.d_model} · {self.n_layers} layer{'s' * (self.n_layers > 1)} · "
                f"{self.n_heads} head{'s' * (self.n_heads > 1)} × {self.head_dim} ({kv}) · "
                f"FFN {self.ffn_dim} · vocab {self.vocab_size} · seq {self.seq_len}{tied}{emb}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShapeCounts:
    """Exact parameter and FLOP counts of a shape."""

    applied: int  # parameters applied per token (compute), embeddings included
    unique: int  # parameters stored (memory)
    embedding: int  # input embedding (a lookup: no FLOPs)
    non_embedding: int  # applied minus embedding and LM head (Kaplan's N)
    flops_per_token: float  # the trainer's exact training FLOPs per token
    model_scale: float  # DeepSeek's M

    def value(self, kind: str) -> float:
        return {PARAMS: self.applied, NON_EMBEDDING: self.non_embedding, MODEL_SCALE: self.model_scale}[kind]


@functools.lru_cache(maxsize=4096)
def _n_groups(sharing: str, n_layers: int) -> int:
    return SharingPlan.parse(sharing, n_layers).n_groups


def block_params(d: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn: int) -> int:
    return 2 * d + 2 * d * n_heads * head_dim + 2 * d * n_kv_heads * head_dim + 3 * d * ffn


def count(shape: Shape) -> ShapeCounts:
    """Exact counts; equal to ``Transformer(cfg).param_counts()`` and ``.flops_per_token(seq_len)``."""
    s = shape
    block = block_params(s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim)
    vocab = s.vocab_size * s.d_model
    head = 0 if s.tie_embeddings else vocab
    applied = vocab + head + s.d_model + s.n_layers * block
    unique = vocab + head + s.d_model + s.n_groups * block
    attention = s.n_layers * s.n_heads * s.head_dim * s.seq_len
    flops = 6.0 * (s.n_layers * block + s.d_model + vocab) + 12.0 * attention
    model_scale = 6.0 * s.n_layers * block + 6.0 * attention
    return ShapeCounts(applied, unique, vocab, applied - vocab - head, flops, model_scale)


def recompute_flops_per_token(shape: Shape, layers: int, exact: bool = True) -> float:
    """The FLOPs a token costs when ``layers`` blocks run their forward again in backward (activation recomputation).

    The block's forward matmuls but the feed-forward's down projection: PyTorch's non-reentrant checkpoint
    (the model's) stops recomputing once backward has every tensor it saved, and nothing in backward reads
    that last product (tests/test_planner.py counts it on the real model). 2 per weight, plus 4·H·hd·T of
    attention under the exact count (``exact``); under 6N, weights only, as that model counts the rest.
    """
    s = shape
    block = block_params(s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim)
    weights = block - 2 * s.d_model - s.d_model * s.ffn_dim  # no norms (no matmul), no down projection
    attention = 4.0 * s.n_heads * s.head_dim * s.seq_len if exact else 0.0
    return layers * (2.0 * weights + attention)


def aspect_ratio(params: float) -> float:
    """The preferred d_model / n_layers for a model of ``params`` parameters."""
    x = math.log10(max(params, 1.0))
    pts = _ASPECT_POINTS
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def head_dim_for(d_model: int) -> int:
    return 64 if d_model < 2048 else 128


def _kv_heads(n_heads: int, requested: int, params: float) -> int | None:
    """GQA policy: as requested (must divide), else MHA below 3B and 8 KV heads above (Llama 2/3)."""
    if requested:
        return requested if n_heads % requested == 0 else None
    if params < 3e9 or n_heads < 16:
        return n_heads
    return max(k for k in range(1, 9) if n_heads % k == 0)


def _layer_options(sharing: str, lo: int, hi: int) -> list[int]:
    spec = sharing.strip()
    if spec.startswith("sequence:"):
        k = _int_suffix(spec)
        return [n for n in range(max(lo, k), hi + 1) if n % k == 0] or [k * max(1, round(lo / k))]
    if spec.startswith("cycle:"):
        k = _int_suffix(spec)
        return list(range(max(lo, k), max(hi, k) + 1))
    if spec not in ("none", "all"):  # an explicit list fixes the depth
        return [len([g for g in spec.strip("[]").split(",") if g.strip() != ""])]
    return list(range(lo, hi + 1))


def _int_suffix(spec: str) -> int:
    try:
        return max(1, int(spec.split(":", 1)[1]))
    except ValueError:
        raise MegascaleError(f"sharing '{spec}': write cycle:k or sequence:k with an integer k") from None


@dataclass(frozen=True)
class _Candidate:
    cost: float
    error: float
    shape: Shape


def solve_shape(
    target: float,
    *,
    kind: str = PARAMS,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    sharing: str = "none",
    tie_embeddings: bool = False,
    kv_heads: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    strict: bool = True,
) -> Shape:
    """The best-scoring shape whose ``kind`` count is within ``tolerance`` of ``target``.

    Score: distance (in log) of d_model/n_layers from ``aspect_ratio`` + half the
    distance of the FFN width from 8/3·d + 10 × the relative count error.
    ``strict=False`` returns the closest shape even when none is within tolerance
    (sweeps of tiny models, where sizes are coarse).
    """
    if not (target > 0 and math.isfinite(target)):
        raise MegascaleError(f"target model size {target} must be a positive number")
    if seq_len <= 0 or vocab_size <= 0:
        raise MegascaleError(f"sequence length {seq_len} and vocabulary {vocab_size} must be positive (e.g. --seq-len 2048)")
    if kv_heads < 0:
        raise MegascaleError(f"KV heads {kv_heads} must be >= 0 (0: MHA below 3B parameters, 8 above)")
    approx_params = target / 6.0 if kind == MODEL_SCALE else target
    ratio = aspect_ratio(approx_params)
    best: _Candidate | None = None
    closest: _Candidate | None = None
    for d in _width_options(approx_params, ratio, vocab_size):
        for cand in _candidates_for_width(d, target, kind, ratio, approx_params, vocab_size, seq_len, sharing, tie_embeddings, kv_heads):
            if cand.error <= tolerance and (best is None or cand.cost < best.cost):
                best = cand
            if closest is None or cand.error < closest.error:
                closest = cand
    if best is not None:
        return best.shape
    if closest is not None and not strict:
        return closest.shape
    what = {PARAMS: "parameters", NON_EMBEDDING: "non-embedding parameters", MODEL_SCALE: "FLOPs/token"}[kind]
    near = f"; the closest is {closest.shape.describe()} ({closest.error:.1%} off)" if closest else ""
    raise MegascaleError(
        f"no Llama shape with vocabulary {vocab_size} has {target:.4g} {what} within {tolerance:.0%}{near}; "
        f"raise the budget or lower --vocab"
    )


def _width_options(params: float, ratio: float, vocab: int) -> list[int]:
    """d_model candidates around the width that 12·L·d² ≈ N with d/L = ratio implies.

    Coarser steps for wider models keep head counts divisible for tensor
    parallelism: 64 below 512, 128 below 2048, 256 below 8192, 512 below 16384, 1024 above.
    """
    d0 = (params * ratio / 12.0) ** (1.0 / 3.0)
    lo, hi = max(64, d0 / 4.0), max(128, d0 * 2.0)
    widths, d = [], 64
    while d <= hi:
        if d >= lo:
            widths.append(d)
        d += 64 if d < 512 else 128 if d < 2048 else 256 if d < 8192 else 512 if d < 16384 else 1024
    return widths


def _candidates_for_width(d, target, kind, ratio, approx_params, vocab, seq_len, sharing, tied, kv_req):
    hd = head_dim_for(d)
    n_heads = d // hd
    n_kv = _kv_heads(n_heads, kv_req, approx_params)
    if n_kv is None:
        return
    multiple = 64 if d < 1024 else 128
    f_lo, f_hi = multiple * math.ceil(2 * d / multiple), multiple * math.floor(4 * d / multiple)
    l_center = d / ratio
    # Tensor parallelism splits heads (and KV heads) 8 ways on big models: prefer widths that allow it.
    untidy_heads = 0.3 if approx_params >= 3e9 and (n_heads % 8 or n_kv % 8) else 0.0
    for n_layers in _layer_options(sharing, max(1, math.floor(l_center / 3)), max(2, math.ceil(l_center * 3))):
        untidy = untidy_heads + (0.1 if n_layers > 12 and n_layers % 2 else 0.0)  # even depth splits into pipeline stages
        base = Shape(vocab, d, n_layers, n_heads, n_kv, 0, seq_len, sharing, tied)
        v0, v1 = count(base).value(kind), count(_with_ffn(base, 1)).value(kind)
        slope = v1 - v0  # counts are affine in the FFN width
        f_star = (target - v0) / slope
        for ffn in {min(f_hi, max(f_lo, multiple * math.floor(f_star / multiple))),
                    min(f_hi, max(f_lo, multiple * math.ceil(f_star / multiple)))}:
            shape = _with_ffn(base, ffn)
            error = abs(v0 + slope * ffn - target) / target
            cost = abs(math.log(d / n_layers / ratio)) + 0.5 * abs(math.log(ffn / (8 * d / 3))) + 10 * error + untidy
            yield _Candidate(cost, error, shape)


def _with_ffn(shape: Shape, ffn: int) -> Shape:
    return Shape(shape.vocab_size, shape.d_model, shape.n_layers, shape.n_heads, shape.n_kv_heads, ffn,
                 shape.seq_len, shape.sharing, shape.tie_embeddings)
