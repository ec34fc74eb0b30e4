"""The parallel layout of a plan: tensor × pipeline × context × data parallelism, ZeRO stage, micro-batch, recomputation.

Memory decides which layouts fit a GPU; a model of one optimizer step's time
decides among those that do. On one node data parallelism with ZeRO is nearly
free and wins; across nodes ZeRO-3 gathers every weight over the network for
every micro-batch, and a large model is better split by tensor parallelism
inside a node and pipeline stages across nodes (Narayanan et al. 2021,
"Efficient Large-Scale Language Model Training on GPU Clusters", §3).

The step model, per GPU, with every FLOP at the budget's MFU:

* compute: the model's FLOPs of the step over the GPUs; recomputed forwards on top;
* pipeline bubble: (pp − 1)/m of the step's compute, m micro-batches a step
  (1F1B: DeepSpeed's schedule);
* tensor parallelism (with sequence parallelism): per layer and micro-batch an
  all-gather and a reduce-scatter around attention and around the MLP, forward
  and backward (two more for a recomputed forward), each moving (tp − 1)/tp of
  the micro-batch's hidden states over the node's links; not overlapped (backward's
  second gather of the two inputs, for the weight gradients, overlaps the input
  gradients' matmuls and is not charged);
* data parallelism, ZeRO-1/2: the gradients' reduce-scatter (overlapped with the
  last micro-batch's backward, DeepSpeed's overlap_comm, but not in the pipeline
  engine, which reduces after its schedule) and the updated weights' all-gather
  (not overlapped), (dp − 1)/dp of the stage's weights each;
  ZeRO-3: the weights gathered for forward and for backward and the gradients
  reduce-scattered, every micro-batch, overlapped with that micro-batch's compute;
* pipeline sends: each micro-batch's hidden states forward and their gradient
  back, once per stage boundary, not overlapped (DeepSpeed's are blocking);
* context parallelism (megascale.parallel.context_parallel): per layer and
  micro-batch the keys and values all-gathered over the cp ranks in forward (and
  in a recomputed forward) and their gradients reduce-scattered in backward,
  (cp − 1)/cp of the whole sequence's K/V each; the rank's tokens are 1/cp of
  the sequence for everything else, and it keeps the gathered K/V for backward.
  Only for shards of at least MIN_CONTEXT_TOKENS (unless --cp asks), where the
  model leaves out what attention kernels lose on short ones.

Links: ranks are ordered tensor, context, data, then pipeline (DeepSpeed's
topology, context parallelism inside its data axis). A group stays inside a
node when its span of ranks does (tp·cp for context, tp·cp·dp for data; the
pipeline's neighbours are tp·cp·dp ranks apart); else it crosses the network. Among the layouts within one point of the best modelled efficiency,
the plan takes the fewest model-parallel GPUs, then the lowest ZeRO stage, then
the largest micro-batch: what the model leaves out (kernel efficiency at
smaller matrices, ZeRO-3's hooks) favours each of those.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from megascale.hardware import GPU
from megascale.model.head_loss import auto_chunk_tokens
from megascale.planner.shapes import Shape, ShapeCounts, recompute_flops_per_token

USABLE = 0.9  # of a GPU's memory: allocator fragmentation, CUDA context, communication buffers
# DeepSpeed's default stage3_max_live_parameters: the most weights ZeRO-3 keeps gathered at once.
MAX_LIVE_PARAMETERS = 10**9
EFFICIENCY_BAND = 0.01  # layouts this close to the best modelled efficiency count as equal
MIN_CONTEXT_TOKENS = 4096  # the shortest share of a sequence the planner gives a context-parallel rank


@dataclass(frozen=True)
class Links:
    """What the GPUs talk over: GPUs per node and GB/s per GPU, one way, inside a node and between nodes."""

    gpus_per_node: int
    link_gbs: float
    net_gbs: float

    @classmethod
    def of(cls, gpu: GPU, gpus_per_node: int = 0, link_gbs: float = 0.0, net_gbs: float = 0.0) -> Links:
        return cls(gpus_per_node or gpu.gpus_per_node, link_gbs or gpu.link_gbs, net_gbs or gpu.net_gbs)

    def describe(self) -> str:
        return f"{self.gpus_per_node} GPUs a node, {self.link_gbs:g} GB/s within, {self.net_gbs:g} GB/s between nodes"


@dataclass(frozen=True)
class StepTime:
    """One optimizer step's modelled seconds per GPU, by what they are spent on."""

    compute: float
    recompute: float = 0.0
    bubble: float = 0.0
    tensor: float = 0.0
    data: float = 0.0
    pipeline: float = 0.0
    context: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.bubble + self.tensor + self.data + self.pipeline + self.context

    @property
    def efficiency(self) -> float:
        """The share of the step spent on the model's own FLOPs."""
        return self.compute / self.total

    def words(self) -> str:
        parts = [("compute", self.compute), ("recomputation", self.recompute), ("pipeline bubble", self.bubble),
                 ("tensor-parallel traffic", self.tensor), ("context-parallel traffic", self.context),
                 ("data-parallel traffic", self.data), ("pipeline sends", self.pipeline)]
        return " · ".join(f"{name} {seconds / self.total:.0%}" for name, seconds in parts
                          if seconds / self.total >= 0.005 or name == "compute")


@dataclass(frozen=True)
class Layout:
    """A way to run the plan on its GPUs, with its memory per GPU and modelled step."""

    tp: int
    pp: int
    cp: int
    dp: int  # sequences side by side: the GPUs over tp × pp × cp
    zero_stage: int
    micro_batch: int
    global_batch: int
    checkpoint_layers: int  # per stage, the first ones; 0: none recomputed (unlike the config key, where 0 is all)
    state: float  # bytes per GPU: weights, gradients, optimizer state
    activations: float  # bytes per GPU, the heaviest stage
    step: StepTime

    @property
    def model_parallel(self) -> int:
        """GPUs that share one sequence's work."""
        return self.tp * self.pp * self.cp


def stage_layers(n_layers: int, pp: int) -> int:
    """Blocks on the fullest stage when the blocks are split evenly (parallel.partition=blocks)."""
    return math.ceil(n_layers / pp)


def stage_sizes(n_layers: int, pp: int) -> list[int]:
    """Blocks per stage when they are split evenly, the first stages taking one more."""
    base, extra = divmod(n_layers, pp)
    return [base + (stage < extra) for stage in range(pp)]


def recomputed_layers(n_layers: int, pp: int, per_stage: int) -> int:
    """Layers recomputed in the whole model when each stage recomputes its first ``per_stage``."""
    return sum(min(per_stage, size) for size in stage_sizes(n_layers, pp))


def stage_blocks(group_of: Sequence[int], pp: int) -> int:
    """Distinct blocks (tie groups) the fullest stage stores when the layers are split evenly (``stage_sizes``):
    a stage keeps one copy of each group it applies (a run's plan after an untie, or one that ``Shape.sharing``
    cannot spell)."""
    bounds = list(itertools.accumulate(stage_sizes(len(group_of), pp), initial=0))
    return max(len(set(group_of[a:b])) for a, b in zip(bounds, bounds[1:]))


def stage_params(shape: Shape, tp: int, pp: int, blocks: int | None = None) -> float:
    """Parameters a GPU of the fullest stage holds: its blocks' shards and an embedding's or the head's.
    ``blocks``: the blocks that stage stores (``stage_blocks``); None counts ``shape.sharing``'s groups."""
    s = shape
    kv_shard = 2 * s.d_model * s.n_kv_heads * s.head_dim / min(tp, s.n_kv_heads)  # tp > n_kv: a whole head a rank
    block = 2 * s.d_model + (2 * s.d_model * s.n_heads * s.head_dim + 3 * s.d_model * s.ffn_dim) / tp + kv_shard
    vocab = s.vocab_size * s.d_model / tp
    ends = 2 * vocab if pp == 1 and not s.tie_embeddings else vocab  # pp > 1: the first stage's embedding or the last's head
    blocks = min(stage_layers(s.n_layers, pp), s.n_groups) if blocks is None else blocks
    return blocks * block + ends + s.d_model


def state_bytes(params: float, precision: str, zero_stage: int, dp: int) -> float:
    """Weights + grads + Adam per GPU, sharded as ZeRO stage ``zero_stage`` does over ``dp``; with ZeRO-3 also the
    weights gathered for compute, at most DeepSpeed's MAX_LIVE_PARAMETERS."""
    n = max(1, dp)
    w, g, opt = (2, 2, 12) if precision in ("bf16", "fp16") else (4, 4, 8)  # opt: (fp32 master +) Adam m, v
    if zero_stage >= 1:
        opt = 12  # DeepSpeed's ZeRO optimizer keeps an fp32 master partition in fp32 too (train/memory.py)
        opt /= n
    if zero_stage >= 2:
        g /= n
    gathered = 0.0
    if zero_stage >= 3:
        gathered = w * min(params, MAX_LIVE_PARAMETERS)
        w /= n
    return params * (w + g + opt) + gathered


def layer_bytes_per_token(shape: Shape, precision: str, tp: int = 1, sequence_parallel: bool = True) -> float:
    """What one block keeps for backward per token on a tensor rank, as the model runs on CUDA (fused RMSNorm,
    RoPE and SwiGLU kernels, flash attention): each norm's input and fp32 1/rms, the attention input, q, k, v,
    the attention output (which the output projection reads in place) and its fp32 log-sum-exp, the MLP input,
    gate, up and the down projection's input: ≈ 32.5·d bytes in bf16 with MHA and an FFN of 2.75·d, where the
    34·d of Korthikanti et al. 2022 (GPT's GeLU MLP, flash attention) is the usual rule. With ``tp`` > 1
    (sequence parallelism) the heads, FFN columns, the norms' tokens and the attention and MLP inputs (a rank
    keeps its slice and gathers it again in backward, as Megatron does) split over the ranks, but a rank
    keeps its KV heads. tests/test_plan_layout.py and test_tp_collectives.py measure it on the real model.
    Without ``sequence_parallel`` every rank keeps the norms' inputs, outputs and 1/rms whole.
    The PyTorch ops (model.fused_ops=torch, as on CPU) keep ≈ 46·d: norms in fp32 and the SiLU's output besides."""
    s, w = shape, 4 if precision == "fp32" else 2  # bf16-autocast keeps 16-bit matmul inputs
    norms = 4 * s.d_model  # the two norms' inputs and outputs (what the projections read)
    split = 2 * s.n_heads * s.head_dim + 3 * s.ffn_dim  # q, attention out, gate, up, down input
    whole = 2 * kv_heads_per_rank(s, tp) * s.head_dim  # k, v
    norm_tp = tp if sequence_parallel else 1
    return w * (split / tp + norms / norm_tp + whole) + 4 * s.n_heads / tp + 4 * 2 / norm_tp


def activation_bytes(shape: Shape, micro_batch: int, precision: str, recomputed: int = 0, *, tp: int = 1, pp: int = 1,
                     in_flight: int = 1, cp: int = 1, sequence_parallel: bool = True) -> float:
    """Activations per GPU of the heaviest stage; its first ``recomputed`` layers keep only their input.

    A layer keeps ``layer_bytes_per_token`` for each of the rank's tokens, 1/``cp`` of each sequence, and with
    ``cp`` > 1 the keys and values it gathered: the whole sequence's. The first of ``pp`` stages
    keeps ``in_flight`` micro-batches (1F1B); the last keeps one and the loss's: the hidden states' gradient,
    the head's fp32 gradient and a chunk of fp32 logits (``auto_chunk_tokens``: about CHUNK_ELEMENTS on each
    rank, whatever the tensor split, or the whole micro-batch's when smaller). Without ``sequence_parallel`` the hidden states between
    blocks are whole on every tensor rank.
    """
    w = 4 if precision == "fp32" else 2
    tokens = shape.seq_len * micro_batch / cp
    hidden = w * shape.d_model / (tp if sequence_parallel else 1) * tokens  # a block's input on this rank
    kv = 2 * kv_heads_per_rank(shape, tp) * shape.head_dim * w  # a token's keys and values
    layer = layer_bytes_per_token(shape, precision, tp, sequence_parallel) * tokens
    if cp > 1:  # attention keeps the gathered keys and values of the whole sequence, not the rank's own
        layer += kv * (shape.seq_len * micro_batch - tokens)
    layers = stage_layers(shape.n_layers, pp)
    kept = (layers - recomputed) * layer + recomputed * hidden
    rebuilt = layer if recomputed else 0  # backward rebuilds one layer at a time
    vocab = shape.vocab_size / tp  # the head's rows on this rank
    chunk = min(auto_chunk_tokens(int(vocab)), shape.seq_len * micro_batch / cp) * vocab  # the fused loss's logits
    loss = hidden + 4 * vocab * shape.d_model + 3 * 4 * chunk
    last = kept + rebuilt + loss
    first = kept * in_flight + rebuilt
    return max(first, last) if pp > 1 else last


def kv_heads_per_rank(shape: Shape, tp: int) -> float:
    """KV heads a tensor rank computes: its share, or one whole head when tp > n_kv_heads."""
    return shape.n_kv_heads / min(tp, shape.n_kv_heads)


def tensor_sizes(shape: Shape, n_gpus: int, gpus_per_node: int, only: int = 0) -> list[int]:
    """Tensor-parallel sizes the shape and the nodes allow: powers of two within a node dividing heads, FFN,
    vocabulary and the sequence (sequence parallelism), and either dividing the KV heads or a multiple of them."""
    sizes = []
    tp = 1
    while tp <= min(n_gpus, gpus_per_node):
        ok = all(x % tp == 0 for x in (n_gpus, gpus_per_node, shape.n_heads, shape.ffn_dim, shape.vocab_size, shape.seq_len))
        if ok and (shape.n_kv_heads % tp == 0 or tp % shape.n_kv_heads == 0) and only in (0, tp):
            sizes.append(tp)
        tp *= 2
    return sizes


def context_sizes(seq_len: int, tp: int, gpus: int, only: int = 0) -> list[int]:
    """Context-parallel sizes: powers of two dividing the GPUs left, with two chunks a rank (zigzag) and, with
    sequence parallelism, tp × cp dividing the sequence; automatic ones keep MIN_CONTEXT_TOKENS a rank."""
    sizes, cp = [1] if only in (0, 1) else [], 2
    while cp <= gpus:
        fits = gpus % cp == 0 and seq_len % (2 * cp) == 0 and (tp == 1 or seq_len % (tp * cp) == 0)
        if fits and (only == cp or (not only and seq_len // cp >= MIN_CONTEXT_TOKENS)):
            sizes.append(cp)
        cp *= 2
    return sizes


def pipeline_sizes(n_layers: int, gpus: int, only: int = 0) -> list[int]:
    """Stage counts that divide the GPUs left after tensor parallelism, at most one stage a layer."""
    return [pp for pp in range(1, min(n_layers, gpus) + 1) if gpus % pp == 0 and only in (0, pp)]


def step_time(shape: Shape, counts: ShapeCounts, precision: str, gpu: GPU, links: Links, n_gpus: int, mfu: float,
              tp: int, pp: int, zero_stage: int, micro: int, global_batch: int, per_stage: int, cp: int = 1) -> StepTime:
    """The modelled seconds of one optimizer step per GPU (module docstring)."""
    dp = n_gpus // (tp * pp * cp)
    w = 2 if precision in ("bf16", "fp16", "bf16-autocast") else 4
    rate = n_gpus * gpu.peak_flops * mfu
    tokens = global_batch * shape.seq_len
    compute = counts.flops_per_token * tokens / rate
    recompute = recompute_flops_per_token(shape, recomputed_layers(shape.n_layers, pp, per_stage)) * tokens / rate
    m = global_batch // (dp * micro)
    busy = compute + recompute
    hidden = micro * shape.seq_len * shape.d_model * w / cp  # a rank's share of one micro-batch's hidden states
    link, net = links.link_gbs * 1e9, links.net_gbs * 1e9
    layers = stage_layers(shape.n_layers, pp)
    tensor = m * (8 * layers + 4 * per_stage) * (tp - 1) / tp * hidden / link if tp > 1 else 0.0
    kv = 2 * kv_heads_per_rank(shape, tp) * shape.head_dim * w * shape.seq_len * micro  # the sequence's K and V
    cp_bw = link if tp * cp <= links.gpus_per_node else net
    context = m * (2 * layers + per_stage) * (cp - 1) / cp * kv / cp_bw
    shards = dp * cp  # ZeRO partitions and the gradient average span the context ranks too
    weights = stage_params(shape, tp, pp) * w * (shards - 1) / shards
    dp_bw = link if tp * shards <= links.gpus_per_node else net
    if zero_stage == 3:
        data = m * max(0.0, 3 * weights / dp_bw - busy / m)
    else:  # DeepSpeed's pipeline engine reduces after its schedule's last backward: no overlap there
        overlap = 2 / 3 * busy / m if pp == 1 else 0.0
        data = max(0.0, weights / dp_bw - overlap) + weights / dp_bw
    pp_bw = link if tp * shards < links.gpus_per_node else net
    pipeline = m * 2 * hidden / tp / pp_bw if pp > 1 else 0.0
    return StepTime(compute, recompute, (pp - 1) / m * busy, tensor, data, pipeline, context)


def candidate_layouts(shape: Shape, counts: ShapeCounts, precision: str, gpu: GPU, links: Links, n_gpus: int,
                      global_batch: int, mfu: float, tp_only: int = 0, pp_only: int = 0, cp_only: int = 0) -> Iterator[Layout]:
    """Every layout that fits a GPU without offloading, each with the fewest recomputed layers it needs."""
    for tp in tensor_sizes(shape, n_gpus, links.gpus_per_node, tp_only):
        for cp in context_sizes(shape.seq_len, tp, n_gpus // tp, cp_only):
            for pp in pipeline_sizes(shape.n_layers, n_gpus // (tp * cp), pp_only):
                yield from _fitting(shape, counts, precision, gpu, links, n_gpus, global_batch, mfu, tp, pp, cp)


def _fitting(shape: Shape, counts: ShapeCounts, precision: str, gpu: GPU, links: Links, n_gpus: int, global_batch: int,
             mfu: float, tp: int, pp: int, cp: int) -> Iterator[Layout]:
    """The layouts of one (tp, pp, cp) split that fit: each ZeRO stage and micro-batch with its fewest recomputed layers."""
    usable = USABLE * gpu.memory_gib * 2**30
    dp = n_gpus // (tp * pp * cp)
    params = stage_params(shape, tp, pp)
    for stage in (1,) if pp > 1 else (1, 2, 3):
        state = state_bytes(params, precision, stage, dp * cp)
        micro = 2 ** int(math.log2(max(1, min(64, global_batch // dp))))
        while micro >= 1:
            gb = max(global_batch, micro * dp)
            gb -= gb % (micro * dp)
            in_flight = min(pp, gb // (dp * micro))

            def act(r: int) -> float:
                return activation_bytes(shape, micro, precision, r, tp=tp, pp=pp, in_flight=in_flight, cp=cp)

            r = next((r for r in range(stage_layers(shape.n_layers, pp) + 1) if state + act(r) <= usable), None)
            if r is not None:
                step = step_time(shape, counts, precision, gpu, links, n_gpus, mfu, tp, pp, stage, micro, gb, r, cp)
                yield Layout(tp, pp, cp, dp, stage, micro, gb, r, state, act(r), step)
            micro //= 2


def best_layout(layouts: list[Layout]) -> Layout | None:
    """The fewest model-parallel GPUs, lowest ZeRO stage, largest micro-batch within the band of the best efficiency."""
    if not layouts:
        return None
    best = max(layout.step.efficiency for layout in layouts)
    near = [layout for layout in layouts if layout.step.efficiency >= best - EFFICIENCY_BAND]
    return min(near, key=lambda layout: (layout.model_parallel, layout.zero_stage, -layout.micro_batch, layout.checkpoint_layers))
