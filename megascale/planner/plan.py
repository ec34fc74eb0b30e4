"""Budget → allocation → shape → a runnable training recipe.

``make_plan`` is the whole planner: it turns the budget into FLOPs, asks the
mapping for (N_opt, D_opt), solves a shape whose size is within 2% of N_opt,
and spends the *whole* budget on that shape: D = C / FLOPs-per-token, where the
FLOPs model is either

* ``exact`` (default) — the trainer's own count, ``Transformer.flops_per_token``:
  6 × applied matmul parameters (LM head in, embedding lookup out) +
  12·L·H·hd·T for attention; the same number the trainer's MFU uses; or
* ``6nd`` — C = 6·N·D with N all applied parameters (the papers' approximation).

Recipe rules (each stated where it is applied):

* global batch and peak LR from DeepSeek LLM's compute-optimal hyper-parameter
  fits (Bi et al. 2024, eq. 1): B_opt = 0.2920·C^0.3271 tokens,
  η_opt = 0.3118·C^-0.1250 — the batch rounded to a power of two sequences;
* steps = ceil(D / (global batch × seq_len)); warm-up 2% of the steps
  (at most 2000; short runs up to 10%, at most 100 steps); cosine decay to 10%;
* the parallel layout (tensor × pipeline × context × data, ZeRO stage, micro-batch,
  recomputed layers) from a memory estimate and a step-time model, both in
  ``layout.py``: weights + grads + Adam (16 bytes per unique parameter in bf16
  mixed precision and in fp32) of a GPU's share, sharded as ZeRO does, plus
  the activations each applied layer keeps per token as the model runs on
  CUDA (``layer_bytes_per_token``, measured on the real model by the tests:
  ≈ 32.5·d bytes in bf16 for a Llama block with MHA; over tp with sequence
  parallelism, over cp with the gathered K/V kept; pp micro-batches in flight
  on the first stage) plus the fused chunked loss (train.fused_loss):
  the hidden states' gradient per token, the head's fp32 gradient and one
  chunk of fp32 logits — not V bytes per token;
* activation recomputation (parallel.activation_checkpointing and
  checkpoint_layers): the fewest layers that make a layout fit keep only
  their input (2·d bytes per token in bf16), and backward rebuilds one layer's
  activations at a time; its forwards are charged to the step model and paid
  out of the budget (``recompute_flops_per_token``);
* the optimizer (then the weights) offloaded to the host only when no layout
  fits on the GPUs, with data parallelism alone: a host Adam step or weights
  crossing PCIe every step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megascale.config import HostOffload
from megascale.errors import MegascaleError
from megascale.hardware import GPU
from megascale.planner.layout import (MAX_LIVE_PARAMETERS, USABLE, Layout, Links, StepTime, activation_bytes, best_layout, candidate_layouts,
                                      context_sizes, pipeline_sizes, recomputed_layers, stage_layers, state_bytes, tensor_sizes)
from megascale.planner.mappings import PUBLISHED, TARGET_WORDS, Allocation, Mapping, ParametricMapping, sci
from megascale.planner.shapes import Shape, ShapeCounts, count, recompute_flops_per_token, solve_shape

FLOPS_MODELS = ("exact", "6nd")
FLOPS_MODEL_WORDS = {
    "exact": "exact: the trainer's count, 6 × applied matmul parameters + 12·L·H·hd·T attention",
    "6nd": "6ND: 6 × all applied parameters per token (the papers' approximation)",
}
SECONDS_PER_HOUR = 3600.0


# ------------------------------------------------------------------ budget


@dataclass(frozen=True)
class Budget:
    """A compute budget in FLOPs, and the hardware it will run on when known."""

    flops: float
    gpu: GPU | None = None
    n_gpus: int = 0
    hours: float | None = None
    mfu: float = 0.4
    host_adam_rate: float | None = None  # parameters/s one GPU's process steps on the host (bench/cpu_adam.py)
    gpus_per_node: int = 0  # 0: the GPU's reference system's
    link_gbs: float = 0.0  # GB/s one way per GPU inside a node (0: the GPU table's)
    net_gbs: float = 0.0  # GB/s one way per GPU between nodes (0: the GPU table's)

    @property
    def links(self) -> Links:
        return Links.of(self.gpu, self.gpus_per_node, self.link_gbs, self.net_gbs)

    @property
    def cluster_flops_per_s(self) -> float | None:
        """Achieved FLOP/s of the whole cluster: n × peak × MFU."""
        if self.gpu is None or not self.n_gpus:
            return None
        return self.n_gpus * self.gpu.peak_flops * self.mfu

    def seconds_for(self, flops: float) -> float | None:
        rate = self.cluster_flops_per_s
        return flops / rate if rate else None

    def describe(self) -> str:
        if self.gpu is None or not self.n_gpus:
            return f"{sci(self.flops)} FLOPs"
        hw = f"{self.n_gpus} × {self.gpu.name} ({self.gpu.peak_tflops:g} TFLOP/s dense bf16)"
        if self.hours is not None:
            return f"{sci(self.flops)} FLOPs = {hw} × {self.hours:g} h × MFU {self.mfu:g}"
        return f"{sci(self.flops)} FLOPs on {hw} at MFU {self.mfu:g}"


def make_budget(flops: float | None = None, gpu: GPU | None = None, n_gpus: int | None = None,
                hours: float | None = None, mfu: float = 0.4, host_adam_rate: float | None = None,
                gpus_per_node: int = 0, link_gbs: float = 0.0, net_gbs: float = 0.0) -> Budget:
    """Validate and build a budget: either ``flops``, or ``n_gpus`` × ``hours`` on ``gpu`` at ``mfu``.

    ``host_adam_rate`` (parameters per second one GPU's process steps with DeepSpeed's CPU Adam)
    prices the host step of a plan that offloads its optimizer; the FLOPs budget stays the GPUs'.
    ``gpus_per_node``, ``link_gbs`` and ``net_gbs`` describe the cluster where it differs from the
    GPU's reference system (megascale.hardware); they steer the parallel layout, not the budget.
    """
    links = {"gpus_per_node": gpus_per_node, "link_gbs": link_gbs, "net_gbs": net_gbs}
    if gpus_per_node < 0:
        raise MegascaleError(f"GPUs per node {gpus_per_node} must be a positive integer (e.g. --gpus-per-node 8)")
    for flag, value in (("--link-gbs", link_gbs), ("--net-gbs", net_gbs)):
        if not (value >= 0 and math.isfinite(value)):
            raise MegascaleError(f"{flag} {value:g} must be a positive bandwidth in GB/s per GPU, one way (e.g. --net-gbs 50)")
    if host_adam_rate is not None and not (host_adam_rate > 0 and math.isfinite(host_adam_rate)):
        raise MegascaleError(f"host Adam rate {host_adam_rate:g} must be a positive number of parameters per second "
                             "(measure it on a training node: python bench/cpu_adam.py)")
    if not (0.0 < mfu <= 1.0) or not math.isfinite(mfu):
        raise MegascaleError(f"MFU {mfu:g} must be in (0, 1]; typical bf16 LLM training reaches 0.3-0.5 (e.g. --mfu 0.4)")
    if n_gpus is not None and n_gpus <= 0:
        raise MegascaleError(f"GPU count {n_gpus} must be a positive integer (e.g. --gpus 8)")
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise MegascaleError(f"budget of {hours:g} hours must be positive (e.g. --hours 168 or --days 7)")
    if flops is not None:
        if not (flops > 0 and math.isfinite(flops)):
            raise MegascaleError(f"budget of {flops:g} FLOPs must be positive (e.g. --flops 1e21)")
        if hours is not None:
            raise MegascaleError("give the budget either as --flops or as --gpus × --hours/--days, not both")
        return Budget(flops, gpu, n_gpus or (1 if gpu else 0), None, mfu, host_adam_rate, **links)
    if hours is None or gpu is None:
        raise MegascaleError("no budget: give --flops C, or --gpus N --gpu NAME --hours H (or --days D) [--mfu 0.4]")
    n = n_gpus or 1
    return Budget(n * gpu.peak_flops * mfu * hours * SECONDS_PER_HOUR, gpu, n, hours, mfu, host_adam_rate, **links)


# ------------------------------------------------------------------ recipe


def deepseek_batch_tokens(flops: float) -> float:
    """Compute-optimal batch size in tokens, DeepSeek LLM eq. 1: 0.2920·C^0.3271."""
    return 0.2920 * flops**0.3271


def deepseek_lr(flops: float) -> float:
    """Compute-optimal peak learning rate, DeepSeek LLM eq. 1: 0.3118·C^-0.1250."""
    return 0.3118 * flops**-0.1250


def warmup_steps(steps: int) -> int:
    """2% of the run (at most 2000 steps); short runs get up to 10% (at most 100 steps) so Adam settles first."""
    return max(1, min(2000, max(round(0.02 * steps), min(100, steps // 10))))


def global_batch_sequences(flops: float, seq_len: int, multiple: int) -> int:
    """B_opt / seq_len rounded to a power of two (in log space), then up to a multiple of ``multiple`` (the GPUs)."""
    seqs = max(1.0, deepseek_batch_tokens(flops) / seq_len)
    pow2 = 2 ** round(math.log2(seqs))
    return multiple * math.ceil(pow2 / multiple)


@dataclass(frozen=True)
class Memory:
    """Per-GPU memory estimate in bytes."""

    state: float  # weights + grads + optimizer state after ZeRO sharding, on the device
    activations: float  # for one micro-batch
    capacity: float  # the device's memory (0: unknown)
    host: float = 0.0  # optimizer state and fp32 gradients offloaded to host memory (train.offload_optimizer=cpu)

    @property
    def total(self) -> float:
        return self.state + self.activations




def offloaded_state_bytes(unique: int, precision: str, zero_stage: int, n_gpus: int,
                          params: bool = False) -> tuple[float, float]:
    """(device, host) bytes per GPU with the optimizer offloaded (train/memory.py): the device keeps the
    weights (ZeRO-3: its partition); the host the fp32 master, moments and gradients, and a staging copy.
    With ``params`` (ZeRO-3) the weight partition goes to the host too, and the device holds at most
    the weights DeepSpeed keeps gathered for compute."""
    n, w = max(1, n_gpus), 2 if precision in ("bf16", "fp16") else 4
    if params:
        return w * min(unique, MAX_LIVE_PARAMETERS), unique * (16 + 2 * w) / n
    return unique * w / (n if zero_stage >= 3 else 1), unique * (16 + w) / n


@dataclass(frozen=True)
class MemoryLayout:
    """How the run fits its GPUs: the parallel layout, ZeRO stage, micro-batch, offloading, the estimates."""

    zero_stage: int
    micro_batch: int
    memory: Memory
    offload: bool = False  # the optimizer
    offload_params: bool = False  # the weights too (ZeRO-3)
    notes: tuple[str, ...] = ()
    recomputed: int = 0  # layers that recompute their activations in backward, in the whole model
    tp: int = 1
    pp: int = 1
    cp: int = 1
    per_stage: int = 0  # the recomputed layers of each stage (its first ones): parallel.checkpoint_layers
    step: StepTime | None = None  # the modelled step (layout.py), when the GPUs' memory and links are known
    data_parallel_only: StepTime | None = None  # the best layout without tp or pp, when another was chosen
    alternatives: tuple[Layout, ...] = ()  # the best layout of each other split, best first (OTHER_LAYOUTS at most)


OTHER_LAYOUTS = 5  # alternatives a multi-GPU plan lists


def choose_memory_layout(shape: Shape, counts: ShapeCounts, precision: str, budget: Budget, global_batch: int,
                         tp: int = 0, pp: int = 0, cp: int = 0) -> MemoryLayout:
    """The layout of ``budget``'s GPUs: on the device if any fits (the best modelled step, layout.py; the fewest layers
    recomputed it needs), else one sequence per GPU with the optimizer offloaded to the host (ZeRO-2, then ZeRO-3),
    and the weights as well (ZeRO-3) only when even that does not fit. ``tp``/``pp``/``cp`` (0: any) restrict the choice."""
    gpu, n_gpus = budget.gpu, max(1, budget.n_gpus)
    if gpu is None or not gpu.memory_gib:  # no hardware, or an unlisted GPU (--peak-tflops): memory unknown
        micro = min(max(1, global_batch // n_gpus), 16)
        return MemoryLayout(1, micro, Memory(state_bytes(counts.unique, precision, 1, n_gpus), activation_bytes(shape, micro, precision), 0.0))
    capacity = gpu.memory_gib * 2**30
    layouts = list(candidate_layouts(shape, counts, precision, gpu, budget.links, n_gpus, global_batch, budget.mfu, tp, pp, cp))
    best = best_layout(layouts)
    if best is not None:
        total = recomputed_layers(shape.n_layers, best.pp, best.checkpoint_layers)
        notes = (_recompute_note(shape, best.checkpoint_layers, best.pp),) if total else ()
        plain = best_layout([x for x in layouts if x.model_parallel == 1]) if best.model_parallel > 1 else None
        return MemoryLayout(best.zero_stage, best.micro_batch, Memory(best.state, best.activations, capacity), notes=notes,
                            recomputed=total, tp=best.tp, pp=best.pp, cp=best.cp, per_stage=best.checkpoint_layers, step=best.step,
                            data_parallel_only=plain.step if plain else None, alternatives=_alternatives(layouts, best))
    if tp > 1 or pp > 1 or cp > 1:
        raise MegascaleError(f"no layout with {_forced(tp, pp, cp)} fits the model on {gpu.memory_gib:g} GiB GPUs, even with every "
                             "layer recomputed; allow more model parallelism (or drop --tp/--pp/--cp), or use more or larger GPUs")
    return _offloaded_layout(shape, unique=counts.unique, precision=precision, gpu=gpu, n_gpus=n_gpus, global_batch=global_batch)


def _alternatives(layouts: list[Layout], chosen: Layout) -> tuple[Layout, ...]:
    """The best layout of every (tp, pp, cp) split but the chosen one's, by modelled efficiency."""
    splits: dict[tuple[int, int, int], list[Layout]] = {}
    for layout in layouts:
        splits.setdefault((layout.tp, layout.pp, layout.cp), []).append(layout)
    splits.pop((chosen.tp, chosen.pp, chosen.cp), None)
    best = [best_layout(group) for group in splits.values()]
    return tuple(sorted(best, key=lambda x: -x.step.efficiency)[:OTHER_LAYOUTS])


def _forced(tp: int, pp: int, cp: int) -> str:
    return " and ".join(f"--{k} {v}" for k, v in (("tp", tp), ("pp", pp), ("cp", cp)) if v)


def _offloaded_layout(shape: Shape, *, unique: int, precision: str, gpu: GPU, n_gpus: int, global_batch: int) -> MemoryLayout:
    """Data parallelism with the optimizer (then the weights) on the host; for models no on-device layout fits."""
    capacity = gpu.memory_gib * 2**30
    usable = USABLE * capacity
    candidates = [(stage, False, *offloaded_state_bytes(unique, precision, stage, n_gpus)) for stage in (2, 3)]
    candidates.append((3, True, *offloaded_state_bytes(unique, precision, 3, n_gpus, params=True)))
    for stage, offload_params, state, host in candidates:
        micro = 2 ** int(math.log2(min(64, max(1, global_batch // n_gpus))))
        while micro >= 1:
            act = activation_bytes(shape, micro, precision)
            if state + act <= usable:
                return MemoryLayout(stage, micro, Memory(state, act, capacity, host), True, offload_params,
                                    (_offload_note(host, offload_params),))
            micro //= 2
    for stage, offload_params, state, host in candidates:
        n = _fewest_recomputed(shape, precision, usable - state)
        if n is not None:
            notes = (_recompute_note(shape, n), _offload_note(host, offload_params))
            return MemoryLayout(stage, 1, Memory(state, activation_bytes(shape, 1, precision, n), capacity, host), True,
                                offload_params, notes, recomputed=n, per_stage=n)
    state = state_bytes(unique, precision, 3, n_gpus)
    note = (f"does not fit: {state / 2**30:.0f} GiB of weights+grads+Adam per GPU even with ZeRO-3 (and the weights "
            f"gathered for compute even with everything offloaded) plus one sequence's activations with every layer "
            f"recomputed exceed {gpu.memory_gib:g} GiB; use more GPUs, tensor/pipeline parallelism or a shorter data.seq_len")
    return MemoryLayout(3, 1, Memory(state, activation_bytes(shape, 1, precision), capacity), notes=(note,))


def _fewest_recomputed(shape: Shape, precision: str, room: float) -> int | None:
    """The fewest layers whose recomputation fits one sequence's activations in ``room`` bytes (None: none do)."""
    return next((n for n in range(1, shape.n_layers + 1) if activation_bytes(shape, 1, precision, n) <= room), None)


def recompute_overrides(n: int, n_layers: int) -> dict[str, Any]:
    """The parallel section that recomputes ``n`` of ``n_layers`` layers (0: none; checkpoint_layers 0 is every layer)."""
    if not n:
        return {}
    return {"activation_checkpointing": True} | ({"checkpoint_layers": n} if n < n_layers else {})


def _recompute_note(shape: Shape, per_stage: int, pp: int = 1) -> str:
    """Why layers recompute (``per_stage`` of each of ``pp`` stages), the config keys that say so, and their price."""
    stages, total = stage_layers(shape.n_layers, pp), recomputed_layers(shape.n_layers, pp, per_stage)
    if per_stage == stages:
        which = "every layer recomputes its activations"
    elif pp > 1:
        which = f"the first {per_stage} layers of each stage ({total} of {shape.n_layers}) recompute their activations"
    else:
        which = f"{total} of {shape.n_layers} layers recompute their activations"
    key = ", ".join(f"parallel.{k}={str(v).lower()}" for k, v in recompute_overrides(per_stage, stages).items())
    extra = recompute_flops_per_token(shape, total) / count(shape).flops_per_token
    return (f"the activations do not fit beside the state, so {which} in backward ({key}): one more forward of "
            f"those layers, ≈ {extra:.0%} more FLOPs a token, paid out of the budget (fewer tokens in the same time)")


def _offload_note(host: float, params: bool) -> str:
    what = ("the optimizer state and the weights do not fit on the GPUs, so both are offloaded "
            "(train.offload_optimizer=cpu, train.offload_params=cpu)" if params else
            "the optimizer state does not fit on the GPUs, so it is offloaded (train.offload_optimizer=cpu)")
    return (f"{what}: each GPU's process needs ≈ {host / 2**30:.1f} GiB of host memory (times the GPUs per node), and the "
            f"Adam step runs on the CPU{', the weights cross to the GPU every step' if params else ''}, which slows each "
            f"step; more GPUs would keep it on the device")


@dataclass(frozen=True)
class Recipe(HostOffload):
    """How the run is trained."""

    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per GPU per forward/backward
    steps: int
    warmup: int
    lr: float
    precision: str
    zero_stage: int
    tokens: int  # steps × global_batch × seq_len
    flops: float  # the trainer's FLOPs for those tokens (under the chosen FLOPs model)
    offload_optimizer: str = "none"  # train.offload_optimizer
    offload_params: str = "none"  # train.offload_params
    recomputed_layers: int = 0  # of n_layers: parallel.activation_checkpointing (+ checkpoint_layers when fewer)
    recompute_flops: float = 0.0  # those layers' second forward for the tokens (same FLOPs model), not in ``flops``
    tp: int = 1  # parallel.tp (with sequence parallelism when > 1)
    pp: int = 1  # parallel.pp (blocks split evenly: parallel.partition=blocks)
    cp: int = 1  # parallel.cp: ranks sharing each sequence's tokens
    checkpoint_layers: int = 0  # the recomputed layers of each stage (its first ones)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


# ------------------------------------------------------------------ the plan


# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models": up to about 4 epochs, repeated
# tokens train about as well as new ones; past that each repetition is worth less, and past ~16 little.
REPEAT_EPOCHS_FREE = 4.0
REPEAT_EPOCHS_FUTILE = 16.0


@dataclass(frozen=True)
class DataPart:
    """A prepared corpus a run draws from: its share of the samples and the size of its train split."""

    path: str
    weight: float
    train_tokens: int

    def epochs(self, tokens: float) -> float:
        """How many times a run of ``tokens`` tokens reads this part's train split."""
        return tokens * self.weight / max(1, self.train_tokens)


def data_parts(data: dict[str, Any]) -> list[DataPart]:
    """The parts of a config's data section with their train tokens, read from each manifest (none for stdlib)."""
    from megascale.data import load_manifest  # noqa: PLC0415 (imports sentencepiece)
    from megascale.data.blend import parse_blend  # noqa: PLC0415

    if data.get("corpus") != "prepared":
        return []
    parts = [(p.weight, p.path) for p in parse_blend(data["blend"])] if data.get("blend") else [(1.0, Path(data["path"]))]
    return [DataPart(str(path), weight, int(load_manifest(path)["splits"]["train"]["tokens"])) for weight, path in parts]


@dataclass
class Plan:
    budget: Budget
    mapping: Mapping
    allocation: Allocation
    shape: Shape
    counts: ShapeCounts
    flops_model: str
    flops_per_token: float  # under flops_model
    recipe: Recipe
    memory: Memory
    predicted_loss: float | None
    data: dict[str, Any]
    out_dir: str
    notes: list[str] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    data_parts: list[DataPart] = field(default_factory=list)  # the prepared corpora drawn from (none: the stdlib demo)
    layout: MemoryLayout | None = None  # what the recipe's parallel and ZeRO settings came from

    @property
    def step(self) -> StepTime | None:
        """The layout's modelled step (layout.py), when the GPUs' memory and links are known."""
        return self.layout.step if self.layout else None

    @property
    def data_parallel_only(self) -> StepTime | None:
        """The best layout's step without tp, pp or cp, when another was chosen."""
        return self.layout.data_parallel_only if self.layout else None

    @property
    def alternatives(self) -> tuple[Layout, ...]:
        """The best layouts of the other splits."""
        return self.layout.alternatives if self.layout else ()

    @property
    def size_error(self) -> float:
        return self.counts.value(self.allocation.target_kind) / self.allocation.target - 1.0

    @property
    def recompute_hardware_flops(self) -> float:
        """The recomputed forwards of the planned tokens under the trainer's exact count."""
        return recompute_flops_per_token(self.shape, self.recipe.recomputed_layers) * self.recipe.tokens

    @property
    def hardware_flops(self) -> float:
        """What the GPUs compute for the planned tokens: the trainer's exact count plus the recomputed forwards."""
        return self.counts.flops_per_token * self.recipe.tokens + self.recompute_hardware_flops

    @property
    def device_seconds(self) -> float | None:
        """The GPUs' time for the planned FLOPs, recomputation included, at the budget's MFU (None without GPUs).

        Recomputed forwards are assumed to run as fast as the rest of the step, so the trainer's MFU, which counts
        model FLOPs only (PaLM's definition), reads lower than the budget's by their share; its HFU does not.
        """
        return self.budget.seconds_for(self.hardware_flops)

    @property
    def host_step_seconds(self) -> float | None:
        """One offloaded optimizer step on the host, when the plan offloads and the host's rate is known.

        Each GPU's process steps its 1/n partition of the unique parameters with DeepSpeed's CPU
        Adam between backward and the next forward, so the GPU waits for it: the time adds up.
        """
        if not self.recipe.optimizer_on_host or not self.budget.host_adam_rate:
            return None
        return self.counts.unique / max(1, self.budget.n_gpus) / self.budget.host_adam_rate

    @property
    def wall_seconds(self) -> float | None:
        """The GPUs' time, plus the host's Adam steps when the plan offloads and their rate is known."""
        device, host = self.device_seconds, self.host_step_seconds
        return device + host * self.recipe.steps if device is not None and host is not None else device


def make_plan(
    budget: Budget,
    mapping: Mapping,
    *,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    sharing: str = "none",
    tie_embeddings: bool = False,
    kv_heads: int = 0,
    flops_model: str = "exact",
    precision: str = "bf16",
    data_path: str | None = None,
    data_blend: str | None = None,
    out_dir: str = "runs/plan",
    strict: bool = True,
    global_batch: int | None = None,
    tp: int = 0,
    pp: int = 0,
    cp: int = 0,
) -> Plan:
    """The whole plan for ``budget`` under ``mapping``; ``tp``/``pp``/``cp`` fix those sizes (0: the planner picks)."""
    if flops_model not in FLOPS_MODELS:
        raise MegascaleError(f"FLOPs model '{flops_model}' is not one of {', '.join(FLOPS_MODELS)}")
    alloc = mapping.allocate(budget.flops)
    shape = solve_shape(alloc.target, kind=alloc.target_kind, vocab_size=vocab_size, seq_len=seq_len, sharing=sharing,
                        tie_embeddings=tie_embeddings, kv_heads=kv_heads, strict=strict)
    _check_forced_layout(shape, budget, tp, pp, cp)
    return plan_for_shape(budget, mapping, alloc, shape, flops_model=flops_model, precision=precision,
                          data=data_section(data_path, vocab_size, seq_len, data_blend), out_dir=out_dir, global_batch=global_batch,
                          tp=tp, pp=pp, cp=cp)


def _check_forced_layout(shape: Shape, budget: Budget, tp: int, pp: int, cp: int) -> None:
    """One line for a --tp, --pp or --cp the GPUs or the shape cannot take."""
    if min(tp, pp, cp) < 0:
        raise MegascaleError(f"--tp {tp}, --pp {pp} and --cp {cp} must be positive (0 or absent: the planner picks)")
    if not (tp > 1 or pp > 1 or cp > 1):
        return
    n = max(1, budget.n_gpus)
    if budget.gpu is None or not budget.gpu.memory_gib:
        raise MegascaleError("--tp/--pp/--cp need a GPU budget whose memory is known: --gpus N --gpu NAME")
    links = budget.links
    if tp and tp not in tensor_sizes(shape, n, links.gpus_per_node, tp):
        raise MegascaleError(
            f"--tp {tp} does not fit this plan: it must be a power of two dividing the GPUs ({n}), the GPUs per node "
            f"({links.gpus_per_node}), the heads ({shape.n_heads}), the FFN width ({shape.ffn_dim}), the vocabulary "
            f"({shape.vocab_size}) and the sequence ({shape.seq_len}), and divide or be a multiple of the KV heads "
            f"({shape.n_kv_heads})")
    if cp and cp not in context_sizes(shape.seq_len, tp or 1, n // (tp or 1), cp):
        raise MegascaleError(f"--cp {cp} does not fit this plan: it must be a power of two dividing the GPUs left after tensor "
                             f"parallelism ({n // (tp or 1)}), with the sequence ({shape.seq_len}) a multiple of 2·cp (and of tp·cp)")
    rest = n // ((tp or 1) * (cp or 1))
    if pp and not pipeline_sizes(shape.n_layers, rest, pp):
        raise MegascaleError(f"--pp {pp} must divide the GPUs left after tensor and context parallelism ({rest}) and be at "
                             f"most the layers ({shape.n_layers})")


def plan_for_shape(budget: Budget, mapping: Mapping, alloc: Allocation, shape: Shape, *, flops_model: str, precision: str,
                   data: dict[str, Any], out_dir: str, global_batch: int | None = None, micro_batch: int | None = None,
                   tp: int = 0, pp: int = 0, cp: int = 0) -> Plan:
    """Spend ``budget`` on a given ``shape``: tokens, batch, steps, parallel and memory layout, loss, time."""
    counts = count(shape)
    per_token = counts.flops_per_token if flops_model == "exact" else 6.0 * counts.applied
    n_gpus = max(1, budget.n_gpus)
    gb = global_batch or global_batch_sequences(budget.flops, shape.seq_len, n_gpus)
    layout = choose_memory_layout(shape, counts, precision, budget, gb, tp, pp, cp)
    micro = micro_batch or layout.micro_batch
    dp = n_gpus // (layout.tp * layout.pp * layout.cp)
    gb = max(gb, micro * dp)
    gb -= gb % (micro * dp)
    # Recomputation is spent out of the budget like the attention FLOPs are: the shape stays the allocation's,
    # the tokens are what the budget buys at the FLOPs a token really costs.
    recompute = recompute_flops_per_token(shape, layout.recomputed, exact=flops_model == "exact")
    steps = max(1, math.ceil(budget.flops / (per_token + recompute) / (gb * shape.seq_len)))
    tokens = steps * gb * shape.seq_len
    recipe = Recipe(shape.seq_len, gb, micro, steps, warmup_steps(steps), deepseek_lr(budget.flops), precision,
                    layout.zero_stage, tokens, per_token * tokens, "cpu" if layout.offload else "none",
                    "cpu" if layout.offload_params else "none", layout.recomputed, recompute * tokens, layout.tp, layout.pp,
                    layout.cp, layout.per_stage)
    loss = mapping.loss(counts.applied, tokens) if isinstance(mapping, ParametricMapping) else None
    plan = Plan(budget, mapping, alloc, shape, counts, flops_model, per_token, recipe, layout.memory, loss, data, out_dir,
                list(layout.notes), data_parts=data_parts(data), layout=layout)
    plan.notes += _notes(plan)
    plan.comparison = compare_mappings(budget.flops, exclude=mapping.name)
    return plan


def data_section(data_path: str | None, vocab_size: int, seq_len: int, blend: str | None = None) -> dict[str, Any]:
    if blend:
        return {"corpus": "prepared", "blend": blend, "seq_len": seq_len}
    if data_path:
        return {"corpus": "prepared", "path": data_path, "seq_len": seq_len}
    # The embedded stdlib corpus runs as is (a demo: a few million tokens); point at your data for a real run.
    return {"corpus": "stdlib", "path": f"data/stdlib-{_vocab_tag(vocab_size)}", "seq_len": seq_len, "stdlib_max_bytes": 16_000_000}


def _vocab_tag(vocab: int) -> str:
    return f"{vocab // 1000}k" if vocab % 1000 == 0 else str(vocab)


def _recompute_words(r: Recipe, n_layers: int) -> str:
    if not r.recomputed_layers:
        return ""
    if r.recomputed_layers == n_layers:
        return " · every layer recomputed"
    each = f", the first {r.checkpoint_layers} of each stage" if r.pp > 1 else ""
    return f" · {r.recomputed_layers} of {n_layers} layers recomputed{each}"


def _layout_words(plan: Plan) -> str:
    b, r = plan.budget, plan.recipe
    words = f"{r.precision} · ZeRO-{r.zero_stage}{_offload_words(r)} · micro-batch {r.micro_batch}"
    if b.n_gpus:
        dp = b.n_gpus // (r.tp * r.pp * r.cp)
        if r.tp * r.pp * r.cp > 1:
            context = f" × context {r.cp}" if r.cp > 1 else ""
            words += (f" per GPU · tensor {r.tp} × pipeline {r.pp}{context} × data {dp} = {b.n_gpus} GPUs"
                      + (" (sequence parallel)" if r.tp > 1 else ""))
        else:
            words += f" per GPU × {b.n_gpus} GPUs"
        words += f" × accumulation {r.global_batch // (r.micro_batch * dp)}"
    return words + _recompute_words(r, plan.shape.n_layers)


def _step_words(plan: Plan) -> str:
    return f"{plan.step.words()} (modelled: {plan.budget.links.describe()})"


def _offload_words(r: Recipe) -> str:
    if r.weights_on_host:
        return " + optimizer and weights offloaded to the host"
    return " + optimizer offloaded to the host" if r.optimizer_on_host else ""


def _notes(plan: Plan) -> list[str]:
    notes = _layout_notes(plan)
    if plan.shape.sharing != "none":
        notes.append("tied blocks: N, FLOPs and time follow applied parameters, memory the unique ones; the published "
                     "laws were fitted on untied models, so treat the allocation (and any predicted loss) as a dense "
                     "model's of the same compute — fit your own with `launch/plan.py sweep` + `fit`")
    if plan.mapping.param_count != "params":
        notes.append(f"mapping '{plan.mapping.name}' sizes {TARGET_WORDS[plan.mapping.param_count]}; the shape hits that quantity")
    if plan.predicted_loss is not None and not plan.mapping.extra.get("fitted"):
        notes.append("predicted loss is in nats/token on the paper's data and tokenizer (MassiveText): a relative guide, not your corpus's loss")
    notes += _repetition_notes(plan)
    if plan.data["corpus"] == "stdlib":
        notes.append("the emitted config trains on the embedded stdlib corpus (a few million tokens, repeated); "
                     "for a real run prepare your corpus and pass --data PATH (or override data.corpus=prepared data.path=...)")
    return notes


def _layout_notes(plan: Plan) -> list[str]:
    """Why the plan splits the model over GPUs, when it does."""
    r = plan.recipe
    if r.tp * r.pp * r.cp == 1 or plan.step is None:
        return []
    alone = plan.data_parallel_only
    why = (f"data parallelism alone (the best such layout) models at {alone.efficiency:.0%} compute: {alone.words()}"
           if alone else "no data-parallel layout fits a GPU without offloading")
    split = " × ".join(f"{name} {size}" for name, size in (("tensor", r.tp), ("pipeline", r.pp), ("context", r.cp)) if size > 1)
    return [f"each sequence's work is split over {r.tp * r.pp * r.cp} GPUs ({split}) because {why}; "
            f"this layout models at {plan.step.efficiency:.0%}. The wall time assumes the MFU all the same; "
            "--tp/--pp/--cp fix the sizes, --net-gbs and --gpus-per-node describe your cluster"]


def _repetition_notes(plan: Plan) -> list[str]:
    """A note per part that the plan's tokens read more than REPEAT_EPOCHS_FREE times."""
    notes = []
    for part in plan.data_parts:
        epochs = part.epochs(plan.recipe.tokens)
        if epochs <= REPEAT_EPOCHS_FREE:
            continue
        worth = "little" if epochs > REPEAT_EPOCHS_FUTILE else "less and less"
        notes.append(f"{part.path}: the plan reads its {human(part.train_tokens)} train tokens {epochs:.1f} times "
                     f"({part.weight:.0%} of {human(plan.recipe.tokens)} tokens); past ~{REPEAT_EPOCHS_FREE:g} epochs repeated "
                     f"tokens are worth {worth} next to new ones (Muennighoff et al. 2023): add data, lower its weight, "
                     "or plan a smaller budget")
    return notes


def compare_mappings(flops: float, exclude: str = "") -> list[dict[str, Any]]:
    """Every published mapping's allocation at ``flops``, for contrast."""
    rows = []
    for name, m in PUBLISHED.items():
        if name == exclude:
            continue
        a = m.allocate(flops)
        rows.append({"mapping": name, "params": a.params, "tokens": a.tokens, "tokens_per_param": a.tokens_per_param,
                     "loss": a.loss, "counts": m.param_count})
    return rows


# ------------------------------------------------------------------ config


def plan_config(plan: Plan) -> dict[str, Any]:
    """The run config (same sections as configs/125m.yaml) that trains the plan."""
    r = plan.recipe
    return {
        "model": plan.shape.model_overrides(),
        "data": dict(plan.data),
        "optim": {"lr": float(f"{r.lr:.3g}"), "warmup_steps": r.warmup, "schedule": "cosine", "min_lr_ratio": 0.1,
                  "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {
            "max_steps": r.steps, "micro_batch_size": r.micro_batch, "global_batch_size": r.global_batch,
            "precision": r.precision, "zero_stage": r.zero_stage, "offload_optimizer": r.offload_optimizer,
            "offload_params": r.offload_params,
            "eval_every": max(1, r.steps // 20), "eval_batches": 16, "log_every": max(1, min(10, r.steps // 100)),
            "save_every": max(1, r.steps // 10) if r.steps >= 1000 else 0, "out_dir": plan.out_dir,
        },
        "metrics": {"peak_tflops": plan.budget.gpu.peak_tflops if plan.budget.gpu else 0.0},
    } | _parallel_section(r, plan.shape.n_layers)


def _parallel_section(r: Recipe, n_layers: int) -> dict[str, Any]:
    parallel: dict[str, Any] = {"tp": r.tp, "sequence_parallel": True} if r.tp > 1 else {}
    if r.pp > 1:
        parallel |= {"pp": r.pp, "partition": "blocks"}  # the stage sizes the layout's memory assumed
    if r.cp > 1:
        parallel["cp"] = r.cp
    parallel |= recompute_overrides(r.checkpoint_layers, stage_layers(n_layers, r.pp))
    return {"parallel": parallel} if parallel else {}


def config_header(plan: Plan) -> str:
    c, r = plan.counts, plan.recipe
    lines = [
        f"Planned by `launch/plan.py`: {plan.budget.describe()}",
        f"mapping {plan.mapping.name}: {plan.mapping.title}",
        f"N_opt {sci(plan.allocation.params, 4)} -> {c.applied:,} applied / {c.unique:,} unique parameters; "
        f"D = {sci(r.tokens, 4)} tokens ({r.tokens / c.applied:.1f} per parameter)",
        f"FLOPs model {FLOPS_MODEL_WORDS[plan.flops_model]}: {sci(plan.flops_per_token, 4)} FLOPs/token, {sci(r.flops, 4)} in all"
        + (f", + {sci(r.recompute_flops, 4)} recomputing {r.recomputed_layers} layers" if r.recompute_flops else ""),
        "lr and global batch: DeepSeek LLM fits (0.3118*C^-0.125, 0.2920*C^0.3271 tokens); warm-up 2% of steps",
    ]
    if plan.data["corpus"] == "stdlib":
        lines.append("data: the embedded stdlib demo corpus; for a real run: data.corpus=prepared data.path=YOUR_DIR")
    lines.append(f"run: {start_command(plan.budget, 'THIS_FILE')}")
    return "".join(f"# {line}\n" for line in lines)


def start_command(budget: Budget, config: Path | str) -> str:
    """The launcher line for the plan's GPUs: one node through deepspeed, more through the SLURM script."""
    per_node = budget.links.gpus_per_node if budget.gpu else 0
    if per_node and budget.n_gpus > per_node:
        nodes = -(-budget.n_gpus // per_node)
        return (f"sbatch --nodes={nodes} --ntasks-per-node={per_node} --gpus-per-node={per_node} "
                f"launch/slurm/pretrain.sbatch {config}")
    launcher = f"deepspeed --num_gpus {budget.n_gpus} " if budget.n_gpus > 1 else "deepspeed "
    return f"{launcher}launch/pretrain.py --config {config}"


def write_config(plan: Plan, path: Path | str) -> Path:
    """Write the plan's config as YAML and check that it loads and validates."""
    from megascale.config import load_config  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(plan_config(plan), sort_keys=False, default_flow_style=False)
    path.write_text(config_header(plan).replace("THIS_FILE", str(path)) + body)
    load_config(path)
    return path


# ------------------------------------------------------------------ output


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    b, a, c, r = plan.budget, plan.allocation, plan.counts, plan.recipe
    return {
        "budget": {"flops": b.flops, "gpu": b.gpu.name if b.gpu else None, "peak_tflops": b.gpu.peak_tflops if b.gpu else None,
                   "n_gpus": b.n_gpus or None, "hours": b.hours, "mfu": b.mfu, "host_adam_rate": b.host_adam_rate},
        "mapping": plan.mapping.to_dict() | {"formula": plan.mapping.formula()},
        "allocation": {"params": a.params, "tokens": a.tokens, "tokens_per_param": a.tokens_per_param, "loss": a.loss,
                       "target": a.target, "target_kind": a.target_kind, "flops_convention": "C = 6ND"},
        "shape": plan.shape.to_dict() | {"head_dim": plan.shape.head_dim, "unique_blocks": plan.shape.n_groups},
        "params": {"applied": c.applied, "unique": c.unique, "non_embedding": c.non_embedding, "embedding": c.embedding,
                   "size_error": plan.size_error},
        "flops_model": plan.flops_model,
        "flops_per_token": plan.flops_per_token,
        "tokens": r.tokens,
        "tokens_per_param": r.tokens / c.applied,
        "training": asdict(r) | {"tokens_per_step": r.tokens_per_step, "schedule": "cosine", "min_lr_ratio": 0.1},
        "memory_per_gpu_gib": {"state": plan.memory.state / 2**30, "activations": plan.memory.activations / 2**30,
                               "capacity": plan.memory.capacity / 2**30 or None, "host": plan.memory.host / 2**30},
        "predicted_loss": plan.predicted_loss,
        "data_use": [asdict(p) | {"epochs": p.epochs(r.tokens)} for p in plan.data_parts],
        "hardware_flops": plan.hardware_flops,
        "step_model": _step_dict(plan),
        "other_layouts": [{k: v for k, v in asdict(x).items() if k != "step"} | {"efficiency": x.step.efficiency}
                          for x in plan.alternatives],
        "wall_seconds": plan.wall_seconds,
        "device_seconds": plan.device_seconds,
        "host_step_seconds": plan.host_step_seconds,
        "config": plan_config(plan),
        "notes": plan.notes,
        "other_mappings": plan.comparison,
    }


def _step_dict(plan: Plan) -> dict[str, Any] | None:
    """The modelled step's seconds by cause and the links assumed (None without known GPUs)."""
    if plan.step is None:
        return None
    alone = plan.data_parallel_only
    return (asdict(plan.step) | {"efficiency": plan.step.efficiency, "links": asdict(plan.budget.links)}
            | {"data_parallel_only": asdict(alone) | {"efficiency": alone.efficiency} if alone else None})


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def human(x: float, unit: str = "") -> str:
    """1.23e9 → '1.23B'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days ({seconds / 3600:.0f} h)"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def render_plan(plan: Plan) -> str:
    """The plan as a readable two-column table, then the other mappings for contrast."""
    b, a, c, r, s = plan.budget, plan.allocation, plan.counts, plan.recipe, plan.shape
    m = plan.mapping
    rows = [
        ("budget", b.describe()),
        ("mapping", f"{m.name} — {m.title}"),
        ("", m.formula()),
        ("", f"source: {m.source}"),
        ("allocation", f"N_opt {human(a.params)} parameters · D_opt {human(a.tokens)} tokens · "
                       f"{a.tokens_per_param:.1f} tokens/parameter (C = 6ND)"
                       + (f" · M_opt {sci(a.target)} FLOPs/token" if a.target_kind == "model_scale" else "")),
        ("model", s.describe()),
        ("parameters", f"{c.applied:,} applied (compute) · {c.unique:,} unique (memory) · "
                       f"{c.non_embedding:,} non-embedding · {plan.size_error:+.2%} vs target"),
        ("FLOPs model", f"{FLOPS_MODEL_WORDS[plan.flops_model]} = {sci(plan.flops_per_token, 4)} FLOPs/token"
                        + (f" (6N: {sci(6 * c.applied, 4)})" if plan.flops_model == "exact" else f" (exact: {sci(c.flops_per_token, 4)})")),
        ("tokens", _tokens_words(plan)),
        *([("data", _data_words(plan))] if plan.data_parts else []),
        ("training", f"{r.steps:,} steps × {r.global_batch} sequences × {r.seq_len} tokens ({human(r.tokens_per_step)} tokens/step) · "
                     f"lr {r.lr:.2g}, warm-up {r.warmup}, cosine to 10%"),
        ("layout", _layout_words(plan)),
        *([("step time", _step_words(plan))] if plan.step is not None and b.n_gpus > 1 else []),
    ]
    mem = plan.memory
    if mem.capacity:
        held = ("gathered weights" if r.weights_on_host else "weights") if mem.host else "weights+grads+Adam"
        on_host = f"; host ≈ {gib(mem.host)} {'weights+' if r.weights_on_host else ''}grads+Adam" if mem.host else ""
        rows.append(("memory/GPU", f"≈ {gib(mem.state)} {held} + {gib(mem.activations)} activations "
                                   f"of {mem.capacity / 2**30:.0f} GiB{on_host}"))
    else:
        rows.append(("memory", f"≈ {gib(mem.state)} weights+grads+Adam per replica before ZeRO sharding, "
                               f"{gib(mem.activations)} activations per micro-batch"))
    if plan.predicted_loss is not None:
        rows.append(("predicted loss", f"{plan.predicted_loss:.3f} nats/token (mapping's L(N, D) at the planned N and D)"))
    rows.append(("wall time", _wall_words(plan)))
    width = max(len(k) for k, _ in rows)
    out = ["megascale compute plan"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    out += [f"  {'note':<{width}}  {n}" for n in plan.notes]
    if plan.alternatives and b.n_gpus > 1:
        out += ["", "other layouts (the best of each split; compute: the modelled share of a step on the model's FLOPs):",
                render_layouts(plan.alternatives, s.n_layers)]
    out += ["", f"other mappings at {sci(b.flops)} FLOPs (C = 6ND):", render_comparison(plan.comparison)]
    return "\n".join(out)


def _tokens_words(plan: Plan) -> str:
    r = plan.recipe
    per_param = f"{human(r.tokens)} tokens ({r.tokens / plan.counts.applied:.1f} per parameter)"
    if not r.recompute_flops:
        return f"D = C / FLOPs-per-token = {per_param}, {sci(r.flops)} FLOPs"
    return (f"D = C / (FLOPs-per-token + {sci(r.recompute_flops / r.tokens, 4)} recomputed) = {per_param}, "
            f"{sci(r.flops)} FLOPs + {sci(r.recompute_flops)} recomputation")


def _data_words(plan: Plan) -> str:
    return " · ".join(f"{p.path}: {human(p.train_tokens)} train tokens"
                      + (f" × {p.weight:.0%}" if len(plan.data_parts) > 1 else "")
                      + f", {p.epochs(plan.recipe.tokens):.2f} epochs" for p in plan.data_parts)


def _wall_words(plan: Plan) -> str:
    device, host = plan.device_seconds, plan.host_step_seconds
    if device is None:
        return "n/a: give --gpus and --gpu for a time estimate"
    return _device_words(plan, device, host) + _recompute_share(plan)


def _recompute_share(plan: Plan) -> str:
    """What recomputation takes of the GPUs' time, and the MFU the trainer (model FLOPs only) will report."""
    share = plan.recompute_hardware_flops / plan.hardware_flops
    if not share:
        return ""
    return f"; {share:.0%} of it recomputing, so the trainer's MFU (model FLOPs) reads ≈ {plan.budget.mfu * (1 - share):.2f}"


def _device_words(plan: Plan, device: float, host: float | None) -> str:
    mfu = plan.budget.mfu
    if host is not None:
        return (f"{duration(plan.wall_seconds)}: {duration(device)} on the GPUs at MFU {mfu:g} + "
                f"{duration(host * plan.recipe.steps)} of host Adam steps ({host:.2f} s per step at "
                f"{plan.budget.host_adam_rate:.3g} parameters/s)")
    if plan.recipe.optimizer_on_host:
        return (f"{duration(device)} at MFU {mfu:g}, plus the host Adam steps, unpriced: measure the host's rate "
                f"with bench/cpu_adam.py and pass --host-adam-rate")
    return f"{duration(device)} at MFU {mfu:g}"


def render_layouts(layouts: tuple[Layout, ...], n_layers: int) -> str:
    lines = [f"  {'tp':>3} {'pp':>3} {'cp':>3} {'dp':>5}  {'ZeRO':>4} {'micro':>5} {'recomputed':>10} {'memory/GPU':>11} {'compute':>8}"]
    for x in layouts:
        recomputed = recomputed_layers(n_layers, x.pp, x.checkpoint_layers)
        lines.append(f"  {x.tp:>3} {x.pp:>3} {x.cp:>3} {x.dp:>5}  {x.zero_stage:>4} {x.micro_batch:>5} "
                     f"{f'{recomputed}/{n_layers}':>10} {gib(x.state + x.activations):>11} {x.step.efficiency:>8.0%}")
    return "\n".join(lines)


def render_comparison(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'mapping':<17} {'N_opt':>8} {'D_opt':>8} {'D/N':>7} {'loss':>7}  N counts"]
    for row in rows:
        loss = f"{row['loss']:.3f}" if row["loss"] is not None else "-"
        lines.append(f"  {row['mapping']:<17} {human(row['params']):>8} {human(row['tokens']):>8} "
                     f"{row['tokens_per_param']:>7.1f} {loss:>7}  {row['counts']}")
    return "\n".join(lines)
