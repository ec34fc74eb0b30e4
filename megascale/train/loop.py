"""The pretraining loop: data → model → DeepSpeed engine → steps, evaluation, checkpoints.

``pretrain(cfg, ctx)`` is the whole run; each stage is a short function so the
trace fine-tuning stage can reuse them (DESIGN.md: no second copy of the loop).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megascale.config import FP32_STATE, Config, OptimConfig
from megascale.data import DistributedBatchSampler, Tokenizer, TokenFile, batch_from_indices, ensure_stdlib_dataset, load_manifest, require_tokenizer
from megascale.data.blend import Blend, BlendPart, parse_blend
from megascale.errors import MegascaleError
from megascale.model import Transformer
from megascale.model.attention import resolve_backend
from megascale.model.ops import apply_ops_backend
from megascale.model.generate import greedy_generate
from megascale.model.init import LazyWeights
from megascale.model.sharing import SharingPlan, replay_untie_history
from megascale.parallel.context_parallel import context_parallel_off
from megascale.parallel.tensor_parallel import sequence_parallel_off
from megascale.parallel.topology import ParallelDims, ParallelGroups, build_groups, kv_replicas
from megascale.train import checkpoint as ckpt
from megascale.train import preflight
from megascale.train.dist import DistContext
from megascale.train.engine import (BatchLayout, batch_layout, build_engine, effective_zero_stage, lr_lambda, optimizer_settings,
                                    planned_tokens, ramp_layouts, set_global_batch, state_formula, zero_stage_run)
from megascale.train.memory import local_param_count, measured_state_bytes
from megascale.train.metrics import MetricsWriter, device_peak_tflops, memory_stats, plot_loss_curve
from megascale.train.nonfinite import NanGuard, harmless_backward_loss, zero_lr
from megascale.train.preempt import PREEMPTED_EXIT, StopRequest
from megascale.train.profiling import StepProfiler
from megascale.train.zero_files import StateUnavailable
from megascale.untie.conditions import UntieController
from megascale.untie.transfer import restore_adam_state

log = logging.getLogger(__name__)


TRAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "bf16-autocast": torch.bfloat16}  # the dtype attention computes in


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenFile | Blend
    val: TokenFile | Blend
    path: Path
    blend: list[BlendPart] | None = None  # data.blend's parts (path is then the first one's)


@dataclass
class RunSummary:
    """What a finished run produced, for the launcher to report."""

    out_dir: Path
    checkpoint: Path | None
    metrics: Path
    loss_png: Path | None
    sample: str = ""
    first_val_loss: float | None = None
    final_val_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    preempted: str | None = None  # the stop signal that ended the run early, if any


# ------------------------------------------------------------------ setup


def open_data(cfg: Config, ctx: DistContext) -> Data:
    """Open the token files; build the embedded stdlib corpus first if it is missing."""
    if cfg.data.blend:
        return open_blend(cfg)
    path = Path(cfg.data.path)
    if cfg.data.corpus == "stdlib":
        # Every rank calls this: a file lock lets one build while the others wait.
        ensure_stdlib_dataset(path, cfg.model.vocab_size, cfg.data.stdlib_max_bytes, seed=0)
    tokenizer = open_tokenizer(path, cfg.model.vocab_size)
    return Data(tokenizer, TokenFile(path / "train"), TokenFile(path / "val"), path)


def open_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """The prepared directory's tokenizer, checked against model.vocab_size."""
    tokenizer = Tokenizer(path / load_manifest(path)["tokenizer"])
    if tokenizer.vocab_size > vocab_size:
        raise MegascaleError(
            f"tokenizer in {path} has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    return tokenizer


def open_blend(cfg: Config) -> Data:
    """data.blend: the parts' train and val files mixed by weight (megascale.data.blend), one tokenizer."""
    parts = parse_blend(cfg.data.blend)
    first = parts[0].path
    tokenizer = open_tokenizer(first, cfg.model.vocab_size)
    for part in parts[1:]:
        try:
            require_tokenizer(part.path, tokenizer.path, str(first), " (every part of a blend shares one tokenizer)")
        except MegascaleError as e:
            raise MegascaleError(f"data.blend: {e}") from None
    weights = [p.weight for p in parts]
    train = Blend([TokenFile(p.path / "train") for p in parts], weights)
    for part, file in zip(parts, train.files):
        if file.num_samples(cfg.data.seq_len) == 0:
            raise MegascaleError(f"data.blend: {part.path} holds {file.num_tokens} training tokens, not one sample of "
                                 f"data.seq_len + 1 = {cfg.data.seq_len + 1}; prepare more text or drop it from the blend")
    val = Blend([TokenFile(p.path / "val") for p in parts], weights)
    return Data(tokenizer, train, val, first, parts)


def build_model(cfg: Config, ctx: DistContext, plan: SharingPlan | None = None, quiet: bool = False) -> Transformer:
    """The plain model on the meta device (shapes only); ``plan`` overrides model.sharing (a resumed or untied run's plan).

    ``build_engine`` gives storage to the parameters this rank holds, drawn from
    train.seed by name (megascale.model.init): a rank never holds the whole model
    unless it trains all of it.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model, plan, seed=cfg.train.seed)
    backend, why = resolve_backend(cfg.model.attention, ctx.device, head_dim=cfg.model.head_dim, dtype=TRAIN_DTYPES[cfg.train.precision])
    model.set_attention_backend(backend)
    ops, ops_why, loss_ops = apply_ops_backend(model, cfg.model.fused_ops, ctx.device, cfg.train.compile)
    if ctx.is_main and not quiet:
        log.info("attention backend: %s (%s); RMSNorm/RoPE/SwiGLU: %s (%s); loss rows: %s; tied-gradient reduction: %s",
                 backend, why, ops, ops_why, loss_ops, tied_grad_backend(ctx.device))
    return model


def tied_grad_backend(device: torch.device) -> str:
    """The log line's words for the tie-group reduction and probe statistics (megascale.kernels.tied_grad)."""
    from megascale.kernels.tied_grad import chosen_backend  # noqa: PLC0415 (imports triton)

    return "Triton kernel" if chosen_backend(device) == "triton" else "PyTorch (no CUDA device)"


def describe_model(model: Transformer, cfg: Config, layout: BatchLayout) -> dict[str, Any]:
    """Unique vs applied parameters, FLOPs per token and state memory by formula."""
    counts = model.param_counts()
    # fp32 training keeps weights + grads (4+4 bytes) + Adam m, v (8); bf16/fp16 add an fp32 master copy.
    bytes_per_param = 16 if cfg.train.precision == "fp32" else 2 + 2 + 4 + 8
    return {
        "sharing": model.plan.describe(),
        "params_unique": counts.unique,
        "params_applied": counts.applied,
        "flops_per_token": model.flops_per_token(cfg.data.seq_len),
        "state_bytes_formula": counts.unique * bytes_per_param,
        "global_batch": layout.global_batch,
        "grad_accum": layout.grad_accum,
        "tokens_per_step": layout.global_batch * cfg.data.seq_len,
    }


def log_startup(ctx: DistContext, info: dict[str, Any], cfg: Config, groups: ParallelGroups, plan: SharingPlan) -> None:
    if not ctx.is_main:
        return
    log.info("launcher %s, backend %s, device %s, world size %d", ctx.launcher, ctx.backend, ctx.device, ctx.world_size)
    log.info("layout: %s", groups.dims.describe())
    log.info("sharing plan: %s", info["sharing"])
    log.info(
        "parameters: %s unique (memory), %s applied (compute); %.3g FLOPs/token; weights+grads+Adam ≈ %.1f MiB/replica before ZeRO",
        f"{info['params_unique']:,}", f"{info['params_applied']:,}", info["flops_per_token"], info["state_bytes_formula"] / 2**20,
    )
    log.info(
        "batch: %d sequences × %d tokens per step (micro %d, accumulation %d, dp %d); ZeRO stage %s, %s",
        info["global_batch"], cfg.data.seq_len, cfg.train.micro_batch_size, info["grad_accum"], groups.dims.dp,
        zero_stage_note(cfg, groups.dims.dp_cp), cfg.train.precision,
    )
    if cfg.train.batch_rampup:
        stages = ramp_layouts(cfg, groups.dims.dp, groups.dims.cp)
        log.info("batch ramp: %s, then %d (train.batch_rampup)", ", ".join(
            f"{layout.global_batch} until step {end}" for (_, layout), (end, _) in zip(stages, stages[1:])), stages[-1][1].global_batch)
    p = cfg.parallel
    if p.activation_checkpointing:
        n = p.checkpoint_layers
        which = f"the first {n} layer{'s' * (n > 1)} of each stage (the others keep their activations)" if n else "every layer"
        log.info("activation checkpointing: %s recomputed in backward", which)
    dims, stage = groups.dims, effective_zero_stage(cfg, groups.dims.dp_cp)
    capacity = preflight.device_capacity(ctx.device)
    est = preflight.estimate(cfg, dims, stage, info["grad_accum"], plan=plan)
    log.info("%s", preflight.describe(est, capacity))
    note = preflight.fit_note(est, capacity)
    if note:
        log.warning("%s; to fit: %s", note, preflight.fixes(cfg, dims, stage, info["grad_accum"], capacity, plan))


def zero_stage_note(cfg: Config, dp: int) -> str:
    """'1', or '0 (train.zero_stage=1 partitions nothing at dp=1 in fp32)' when the stage runs lower."""
    stage = effective_zero_stage(cfg, dp)
    t = cfg.train
    offloaded = [what for what, on_host in (("optimizer", t.optimizer_on_host), ("weights", t.weights_on_host)) if on_host]
    if offloaded:
        adam = " (DeepSpeed CPU Adam)" if t.optimizer_on_host else ""
        return f"{stage}, {' and '.join(offloaded)} offloaded to the host{adam}"
    if stage == cfg.train.zero_stage:
        return str(stage)
    if stage > cfg.train.zero_stage:
        return (f"{stage} (train.zero_stage={cfg.train.zero_stage} with {t.precision} weights would get DeepSpeed's 16-bit "
                "optimizers without ZeRO, which train differently; see effective_zero_stage)")
    return f"{stage} (train.zero_stage={cfg.train.zero_stage} partitions nothing at dp=1 with fp32 weights; see effective_zero_stage)"


# ------------------------------------------------------------------ the run state


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0


@dataclass
class Run:
    """Everything one training run holds, passed to the step, eval and save functions."""

    cfg: Config
    ctx: DistContext
    groups: ParallelGroups
    model: Transformer  # the plain model (before parallelization)
    engine: Any
    data: Data
    sampler: DistributedBatchSampler
    info: dict[str, Any]
    out_dir: Path
    layout: BatchLayout
    controller: UntieController
    progress: Progress = field(default_factory=Progress)
    untie_history: list[dict[str, Any]] = field(default_factory=list)  # events, in order (megascale.json)
    nan: NanGuard = field(default_factory=NanGuard)  # train.nan_policy and the batches it skips
    grad_bytes: float | None = None  # measured on the first step, between backward and the optimizer step
    pending_save: ckpt.PendingSave | None = None  # train.async_save: a checkpoint still being written
    resumed_exactly_from: Path | None = None  # the checkpoint this run resumed from by DeepSpeed's own load
    # A later training stage (megascale.finetune.stage.TraceStage): its data, initial weights,
    # batches (extra forward arguments), evaluation and checkpoint extras. None = pretraining.
    stage: Any = None

    @property
    def pipelined(self) -> bool:
        return self.groups.dims.pp > 1


# ------------------------------------------------------------------ steps


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the mean loss (on device, not synced).

    Under train.nan_policy=skip, micro-batches with a non-finite loss are left out of
    the gradient and of the returned mean (NaN when all of them were).
    """
    device, guard = run.ctx.device, run.nan
    batches = [load_batch(run, run.data.train, idx) for idx in guard.draw(run.sampler, run.progress.step + 1)]
    if run.pipelined:
        # DeepSpeed's 1F1B schedule consumes the micro-batches and steps the optimizer itself.
        loss = run.engine.train_batch(data_iter=iter([pipeline_batch(b, device) for b in batches])).detach().float()
        return loss * float("nan") if guard.poison else loss
    total, kept = torch.zeros((), device=device), 0
    guard.skipped_micro = 0
    for i, batch in enumerate(batches):
        batch = tuple(t.to(device) for t in batch)  # (inputs, targets[, weights, doc_ids, positions])
        loss = run.engine(*batch)
        if guard.poison:
            loss = loss * float("nan")
        if guard.policy == "skip" and not finite_everywhere(loss, run.groups.dp_group):
            guard.skipped_micro += 1
            run.engine.backward(harmless_backward_loss(run.engine, batch))
            if guard.skipped_micro == len(batches):
                zero_lr(run.engine)  # nothing left to learn from: keep the weights where they are
        else:
            run.engine.backward(loss)
            total, kept = total + loss.detach().float(), kept + 1
        if run.grad_bytes is None and i == len(batches) - 1:
            run.grad_bytes = measured_state_bytes(run.engine).grads  # gradients exist only until the step
        run.engine.step()  # DeepSpeed only updates at the accumulation boundary
    return total / kept if kept else torch.full((), float("nan"), device=device)


def pipeline_batch(batch: tuple[torch.Tensor, ...], device) -> tuple:
    """A micro-batch as the pipeline engine takes it: (the first stage's inputs, the last stage's labels).

    Pretraining's (inputs, targets) stays as it is. Fine-tuning's (inputs, targets, weights,
    doc_ids, positions) becomes ((inputs, doc_ids, positions), (targets, weights)): the stages
    pass doc_ids and positions on beside the hidden states (megascale.parallel.pipeline).
    """
    batch = tuple(t.to(device) for t in batch)
    if len(batch) == 2:
        return batch
    inputs, targets, weights, doc_ids, positions = batch
    return (inputs, doc_ids, positions), (targets, weights)


def finite_everywhere(loss: torch.Tensor, group) -> bool:
    """Whether this micro-batch's loss is finite on every data-parallel rank (all skip it together, or none)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return not bool(bad.item())


def load_batch(run: Run, split, indices) -> tuple[torch.Tensor, ...]:
    """The engine's forward arguments for sample ``indices``: (inputs, targets), or the stage's tuple
    (fine-tuning: inputs, targets, weights, doc_ids, positions), each (B, T)."""
    if run.stage is not None:
        batch = run.stage.batch(split, indices)
    else:
        batch = batch_from_indices(split, indices, run.cfg.data.seq_len)
    context = run.groups.context
    if context is not None:  # this rank's token share of each sequence
        batch = tuple(context.shard(t) for t in batch)
    return batch


def mean_over(value: torch.Tensor, group) -> float:
    """Mean of a scalar over ``group`` (the data-parallel group: TP and PP peers already agree)."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        value = value.clone()
        dist.all_reduce(value, group=group)
        value /= dist.get_world_size(group)
    return float(value)


def read_log_values(run: Run, loss_t: torch.Tensor, stop: StopRequest) -> tuple[float, float | None, bool]:
    """A logging step's one synchronisation: (loss averaged over data-parallel replicas, gradient norm,
    whether any rank has received a stop signal), from one all-reduce over the world and one host read.

    TP and PP peers hold the same loss (the pipeline engine broadcasts it), so only the first
    tensor-parallel rank of the first stage of each replica contributes it; the gradient norm, the
    same everywhere, comes from global rank 0 alone. Every other entry is an exact zero, so the
    sums are those of a data-parallel reduction. Context-parallel ranks hold the mean over equal
    shares of the same sequences: they count as replicas here.
    """
    groups, device = run.groups, loss_t.device
    speaks_for_replica = groups.tp_rank == 0 and groups.stage == 0
    grad_norm = run.engine.get_global_grad_norm()
    values = torch.zeros(3, device=device)
    values[0] = loss_t.detach().float().reshape(()) if speaks_for_replica else 0.0
    values[1] = 1.0 if stop.signal_name else 0.0
    if grad_norm is not None and run.ctx.rank == 0:
        values[2] = _norm_value(grad_norm)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    loss, stops, norm = values.tolist()
    return loss / groups.dims.dp_cp, (norm if grad_norm is not None else None), stops > 0


def eval_batch_count(run: Run, split) -> int:
    """Validation micro-batches of ``split``: ``eval_batches``, or fewer if it is short, a multiple of dp (0: too short)."""
    micro, dp = run.cfg.train.micro_batch_size, run.groups.dims.dp
    n_batches = min(run.cfg.train.eval_batches, split.num_samples(run.cfg.data.seq_len) // micro)
    return n_batches - n_batches % dp  # every rank runs the same number of forwards (ZeRO-3 gathers, pipelines)


@torch.no_grad()  # no autograd graph: one would hold every eval micro-batch's activations until the mean
def evaluate(run: Run, split=None) -> float:
    """Mean loss over the first ``eval_batches`` micro-batches of ``split`` (default: the validation
    split), round-robin over DP ranks.

    The set does not depend on the layout (beyond rounding to a multiple of the
    data-parallel size), so runs on different layouts report comparable losses.
    """
    seq, micro, dp = run.cfg.data.seq_len, run.cfg.train.micro_batch_size, run.groups.dims.dp
    val = run.data.val if split is None else split
    n_batches = eval_batch_count(run, val)
    if n_batches == 0:
        raise MegascaleError(
            f"validation split has {val.num_samples(seq)} sequences of {seq} tokens, fewer than the {micro * dp} "
            f"needed for one batch per data-parallel rank; prepare more data, or lower data.seq_len or train.micro_batch_size"
        )
    device = run.ctx.device
    batches = [load_batch(run, val, range(b * micro, (b + 1) * micro)) for b in range(run.groups.batch_rank, n_batches, dp)]
    if run.pipelined:
        batches = [pipeline_batch(batch, device) for batch in batches]
        loss = run.engine.eval_batch(iter(batches), num_micro_batches=len(batches)).float()
    else:
        batches = [tuple(t.to(device) for t in batch) for batch in batches]
        run.engine.eval()
        loss = torch.stack([run.engine(*batch).float() for batch in batches]).mean()
        run.engine.train()
    return mean_over(loss, run.groups.dp_group)


def _norm_value(grad_norm):
    """DeepSpeed's global gradient norm (a tensor or a float, by stage) as a value to write into a tensor."""
    return grad_norm.detach().float().reshape(()) if torch.is_tensor(grad_norm) else float(grad_norm)


def check_update_finite(run: Run) -> None:
    """Refuse to checkpoint weights that the last step may have made non-finite.

    fp16, and bf16 with train.check_grad_overflow=true, skip a step whose
    gradients are not finite: their weights stay good. fp32, and bf16 without the
    check (the default), apply it, and the clipped update of a non-finite gradient norm is NaN:
    without this, a save between two logging steps (train.nan_policy=stop reads the
    loss only there) would write those weights over the last good checkpoint. One
    all-reduce and one host read per save.
    """
    t = run.cfg.train
    if t.precision == "fp16" or (t.precision == "bf16" and t.check_grad_overflow):
        return
    grad_norm = run.engine.get_global_grad_norm()
    if grad_norm is None:  # no clipping, no norm: nothing to read it from
        return
    value = torch.zeros(1, device=run.ctx.device)
    if run.ctx.rank == 0:  # the same everywhere; rank 0 speaks for all, as in read_log_values
        value[0] = _norm_value(grad_norm)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
    norm = value.item()
    if not math.isfinite(norm):
        hint = ("leave train.check_grad_overflow=true (such steps are then skipped), "
                if t.precision == "bf16" else "")
        raise MegascaleError(
            f"gradient norm {norm} at step {run.progress.step}: that step's update left the weights non-finite, so no "
            f"checkpoint is written (the last good one stays in {run.out_dir / 'checkpoints'}); resume from it "
            f"(train.resume=auto) and lower optim.lr, {hint}or use train.nan_policy=rollback"
        )


def check_finite(loss: float, step: int, out_dir: Path) -> None:
    if not math.isfinite(loss):
        raise MegascaleError(
            f"loss became {loss} at step {step}; lower optim.lr or use train.precision=fp32/bf16, "
            f"then resume from the last good checkpoint in {out_dir / 'checkpoints'} (train.resume=auto)"
        )


# ------------------------------------------------------------------ start-up


def layout_of(groups: ParallelGroups) -> dict[str, int]:
    cp = {"cp": groups.dims.cp} if groups.dims.cp > 1 else {}  # absent at 1: checkpoints from before cp compare equal
    return {"tp": groups.dims.tp, "pp": groups.dims.pp, **cp, "dp": groups.dims.dp}


def state_format(train: dict[str, Any], layout: dict[str, int]) -> str:
    """How DeepSpeed's files hold a run's training state: the ZeRO stage it runs (1 and 2 write the same files),
    the precision, and whether Adam steps on the host. DeepSpeed loads a checkpoint only into its own format."""
    on_host = train.get("offload_optimizer", "none") != "none"
    stage = zero_stage_run(train["zero_stage"], train["precision"], on_host, layout["dp"] * layout.get("cp", 1))
    return _format_name(stage, train["precision"], on_host)


def _format_name(stage: int, precision: str, on_host: bool) -> str:
    return f"ZeRO-{'1/2' if stage in (1, 2) else stage} {precision}" + (" optimizer on host" if on_host else "")


def saved_state_format(meta: dict[str, Any]) -> str:
    """The state format a checkpoint was saved in: recorded since 2026-11-29. Before, 16-bit weights at
    train.zero_stage=0 ran DeepSpeed's optimizers without ZeRO (they run ZeRO-1 now), and fp32 pipeline stages at
    dp=1 kept ZeRO-1/2 (they run ZeRO-0 now: effective_zero_stage)."""
    if "state_format" in meta:
        return meta["state_format"]
    train, layout = meta["config"]["train"], meta["layout"]
    if train["zero_stage"] == 0 and train["precision"] not in FP32_STATE:
        return f"ZeRO-0 {train['precision']}"
    on_host = train.get("offload_optimizer", "none") != "none"
    if layout["pp"] > 1 and train["zero_stage"] in (1, 2) and not on_host:
        return _format_name(train["zero_stage"], train["precision"], on_host)
    return state_format(train, layout)


def needs_conversion(meta: dict[str, Any], cfg: Config, groups: ParallelGroups) -> bool:
    """Whether a checkpoint resumes by name (full tensors, sharded anew) rather than DeepSpeed's own load: another
    layout, or another state format (ZeRO-3 from ZeRO-1, bf16 from fp32, Adam moved to the host)."""
    now = state_format(cfg.to_dict()["train"], layout_of(groups))
    return meta["layout"] != layout_of(groups) or saved_state_format(meta) != now


def checkpoint_meta(run: Run) -> dict[str, Any]:
    info = run.info
    return {
        "format": ckpt.META_FORMAT,
        "version": ckpt.META_VERSION,
        "step": run.progress.step,
        "tokens": run.progress.tokens,
        "config": run.cfg.to_dict(),
        "sharing_plan": run.model.plan.to_list(),
        "params": {"unique": info["params_unique"], "applied": info["params_applied"], "flops_per_token": info["flops_per_token"]},
        "tokenizer": {"path": str(run.data.tokenizer.path.resolve()), "file": ckpt.TOKENIZER_FILE,
                      "vocab_size": run.data.tokenizer.vocab_size},
        "data": {"path": str(run.data.path.resolve()), "sampler": run.sampler.state_dict(),
                 **({"blend": [[p.weight, str(p.path.resolve())] for p in run.data.blend]} if run.data.blend else {})},
        "layout": layout_of(run.groups),
        "state_format": state_format(run.cfg.to_dict()["train"], layout_of(run.groups)),
        "world_size": run.ctx.world_size,
        "untie_history": run.untie_history,
        "untie_state": run.controller.state_dict(),
        "nonfinite": run.nan.state_dict(),
        **({"finetune": run.stage.meta()} if run.stage is not None else {}),
    }


def find_resume(cfg: Config) -> tuple[Path | None, dict[str, Any] | None, SharingPlan]:
    """Find and check the checkpoint to resume from, before any engine exists (so nothing is touched on error).

    Returns it with the sharing plan to build: the configured one after the
    checkpoint's untie events, which must give the plan the checkpoint was saved with.
    """
    plan = SharingPlan.parse(cfg.model.sharing, cfg.model.n_layers)
    path = ckpt.resolve_checkpoint(cfg.train.resume, Path(cfg.train.out_dir))
    if path is None:
        return None, None, plan
    meta = ckpt.read_meta(path)
    plan = replay_untie_history(plan, meta.get("untie_history", []))
    ckpt.check_compatible(meta, cfg.to_dict()["model"], plan.to_list())
    return path, meta, plan


def make_groups(cfg: Config, ctx: DistContext) -> ParallelGroups:
    dims = ParallelDims.from_world(cfg.parallel.tp, cfg.parallel.pp, ctx.world_size, cfg.parallel.cp)
    dims.check_model(cfg.model)
    return build_groups(dims, kv_replicas(dims.tp, cfg.model.kv_heads))


def setup_run(cfg: Config, ctx: DistContext, stage: Any = None) -> Run:
    """Data, model, layout, engine and (when asked) the resumed state.

    ``stage`` (None: pretraining) supplies a later stage's data (``open_data``), its
    starting weights (``initial_weights``, on a fresh start) and its batches (``batch``).
    """
    groups = make_groups(cfg, ctx)
    data = open_data(cfg, ctx) if stage is None else stage.open_data(cfg, ctx)
    resume_path, meta, plan = find_resume(cfg)
    model = build_model(cfg, ctx, plan)
    layout = batch_layout(cfg, groups.dims.dp, groups.dims.cp)  # the final batch: memory, preflight, the sampler's check
    ramp_layouts(cfg, groups.dims.dp, groups.dims.cp)  # every ramp batch divides, before anything is built
    info = describe_model(model, cfg, layout)
    log_startup(ctx, info, cfg, groups, model.plan)
    sampler = DistributedBatchSampler(
        data.train.num_samples(cfg.data.seq_len), layout.global_batch, layout.micro_batch,
        groups.batch_rank, groups.dims.dp, cfg.train.seed, cfg.data.shuffle, epoch_in_index=isinstance(data.train, Blend),
    )
    converted = resume_path is not None and needs_conversion(meta, cfg, groups)
    weights = None  # full plain-model weights to start from, by name; None: drawn from train.seed
    if converted:
        # Another layout: full weights, then sharded anew like fresh ones.
        weights = ckpt.lazy_full_weights(resume_path, meta)
    elif resume_path is None and stage is not None:
        weights = stage.initial_weights(cfg.model)  # e.g. the pretraining checkpoint's weights
    elif resume_path is None and cfg.train.init_hf:
        weights = hf_weights(Path(cfg.train.init_hf), ctx)
    with out_of_memory_explained(cfg, ctx, groups, layout.grad_accum, "building the model and optimizer", model.plan):
        engine = build_engine(model, cfg, layout, ctx.device, groups, weights=weights)
    del weights  # each rank now holds its shard only
    controller = UntieController(cfg, planned_tokens=planned_tokens(cfg, groups.dims.dp))
    run = Run(cfg, ctx, groups, model, engine, data, sampler, info, Path(cfg.train.out_dir), layout, controller, stage=stage,
              nan=NanGuard(cfg.train.nan_policy, cfg.train.nan_max_events))
    if resume_path is not None:
        restore(run, resume_path, meta, converted)
    return run


def hf_weights(directory: Path, ctx: DistContext) -> LazyWeights:
    """The Hugging Face model's weights, checked, each read when build_engine asks for it."""
    from megascale.export.hf import lazy_hf_weights  # noqa: PLC0415

    _, state = lazy_hf_weights(directory)
    if ctx.is_main:
        log.info("initialised from the Hugging Face model in %s", directory)
    return state


def restore_position(run: Run, meta: dict[str, Any]) -> None:
    """Step, tokens, data position and untie-controller state of a checkpoint (resume and rollback)."""
    run.sampler.load_state_dict(meta["data"]["sampler"])
    run.progress.step, run.progress.tokens = meta["step"], meta["tokens"]  # in place: the loop holds this object
    if meta.get("untie_state"):
        run.controller.load_state_dict(meta["untie_state"])


def restore(run: Run, path: Path, meta: dict[str, Any], converted: bool) -> None:
    how = "exact"
    if converted:
        ckpt.restore_schedule(run.engine, meta["step"])
        how = f"converted from layout {meta['layout']}, {saved_state_format(meta)} ({restore_adam(run, path, meta)})"
    else:
        ckpt.load_checkpoint(run.engine, path)
    restore_position(run, meta)
    run.untie_history = list(meta.get("untie_history", []))
    run.nan.load_state_dict(meta.get("nonfinite", {}))
    run.resumed_exactly_from = None if converted else path
    if run.ctx.is_main:
        log.info("resumed from %s at step %d: %s", path, run.progress.step, how)
        saved_batch = meta["data"]["sampler"]["global_batch"]
        batch = batch_layout(run.cfg, run.groups.dims.dp, run.groups.dims.cp, run.progress.step).global_batch
        if saved_batch != batch:
            log.info("the global batch goes from %d to %d sequences per step; the data goes on in the same order "
                     "from sample %d of epoch %d", saved_batch, batch, run.sampler.state.consumed, run.sampler.state.epoch)
        changed = changed_schedule(meta.get("config", {}), run.cfg.to_dict())
        if changed:
            # At the schedule's own position: fp16 steps skipped on overflow did not advance it.
            position = getattr(run.engine.lr_scheduler, "last_epoch", run.progress.step)
            then, now = (schedule_lr(c, position) for c in (meta["config"], run.cfg.to_dict()))
            log.info("the config's optimizer settings apply from here on, not the checkpoint's: %s; the LR for "
                     "step %d is %.4g (the saved run's schedule: %.4g)", ", ".join(changed), run.progress.step + 1, now, then)


def changed_schedule(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'optim.lr 0.001 -> 0.002'-style lines for each optimizer or schedule setting a resume changes."""
    pairs = [(f"optim.{k}", v, saved.get("optim", {}).get(k, v)) for k, v in now["optim"].items()]
    pairs.append(("train.max_steps", now["train"]["max_steps"], saved.get("train", {}).get("max_steps", now["train"]["max_steps"])))
    return [f"{name} {old} -> {new}" for name, new, old in pairs if old != new]


def schedule_lr(config: dict[str, Any], step: int) -> float:
    """The LR a config's schedule gives after ``step`` steps (settings a checkpoint lacks: today's defaults)."""
    known = {f.name for f in dataclasses.fields(OptimConfig)}
    optim = OptimConfig(**{k: v for k, v in config["optim"].items() if k in known})
    return optim.lr * lr_lambda(optim, config["train"]["max_steps"])(step)


def restore_adam(run: Run, path: Path, meta: dict[str, Any]) -> str:
    """Adam's moments and step of a checkpoint saved in another layout (the weights are in already); says which."""
    try:
        adam = ckpt.lazy_adam_state(path, meta)
    except StateUnavailable as why:
        if run.ctx.is_main:
            log.warning("optimizer moments start from zero: %s", why)
        return "weights restored, optimizer moments reset"
    with out_of_memory_explained(run.cfg, run.ctx, run.groups, run.layout.grad_accum, "restoring the optimizer state",
                                 run.model.plan):
        restore_adam_state(run.engine, adam.moments, adam.step)
    return "weights and Adam state restored"


def pretrain(cfg: Config, ctx: DistContext) -> RunSummary:
    """Run pretraining as configured; every rank calls this."""
    return run_loop(setup_run(cfg, ctx))


# ------------------------------------------------------------------ the loop


def run_loop(run: Run) -> RunSummary:
    t, ctx, progress = run.cfg.train, run.ctx, run.progress
    writer = MetricsWriter(run.out_dir, ctx.is_main, run.cfg.metrics.tensorboard, run.cfg.metrics.wandb_project, run.cfg.to_dict())
    follow_batch_ramp(run)  # the start record shows the batch the first step takes
    writer.log({"step": progress.step, "event": "start", "world_size": ctx.world_size, "device": str(ctx.device),
                "layout": layout_of(run.groups), "optimizer": optimizer_settings(run.engine), **run.info})
    summary = RunSummary(run.out_dir, None, writer.path, None)
    meter = _Meter(device_peak_tflops(ctx.device, run.cfg.metrics.peak_tflops),
                   _progress_bar(ctx, t, progress.step, "pretrain" if run.stage is None else "finetune"))
    if t.eval_every and progress.step == 0:
        summary.first_val_loss = _log_eval(run, writer)
    last_saved = -1
    if _nothing_to_train(run):  # saving again would only rewrite the checkpoint just read
        last_saved, summary.checkpoint = progress.step, run.resumed_exactly_from
    memory_due = True  # per-rank state memory on the first step, and again after each untie
    probe = make_probe(run)
    profiler = make_profiler(run)
    stop = StopRequest().install()
    try:
        while progress.step < t.max_steps:
            probing = probe is not None and run.controller.probe_due(progress.step + 1)
            if probing:
                probe.arm()
            follow_batch_ramp(run, writer)
            if profiler is not None:
                profiler.before_step(progress.step + 1)
            with run_out_of_memory_explained(run, f"in step {progress.step + 1}"):
                loss_t = train_step(run)
            progress.step += 1
            if profiler is not None:
                log_profile(run, writer, profiler.after_step(progress.step))
            progress.tokens += run.info["tokens_per_step"]
            if run.nan.checks_every_step and handle_nonfinite(run, loss_t, writer):
                if probing:
                    probe.disarm()  # the step was undone; so is its capture
                continue  # rolled back: step, data position and state are the checkpoint's
            if probing:
                log_probe(run, probe, writer)
            if memory_due:
                report_state_memory(run, writer)
                memory_due = False
            logged = progress.step % t.log_every == 0 or progress.step == t.max_steps
            stop_agreed = meter.step(run, loss_t if logged else None, writer, summary, stop)
            decisions = run.controller.decide(progress.step, progress.tokens, run.model.plan)
            if logged and run.pending_save is not None:  # logging steps synchronise anyway
                publish_if_written(run, writer)
            if decisions:
                probe = untie_now(run, probe, decisions, writer)
                memory_due = True
                if run.nan.policy == "rollback":  # a rollback must never cross an untie
                    summary.checkpoint, last_saved = _save(run, writer), progress.step
            if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.max_steps:
                _log_eval(run, writer)
            if t.save_every and progress.step % t.save_every == 0:
                summary.checkpoint, last_saved = _save(run, writer, wait=False), progress.step
            if stop_agreed:  # decided by the logging step's read, so every rank stops at the same step
                summary.preempted = stop.signal_name or "a stop signal on another rank"
                break
    finally:
        stop.uninstall()
        meter.close()
    if profiler is not None:  # the run ended inside the window (max_steps, a stop signal)
        log_profile(run, writer, profiler.close(progress.step))
    if summary.preempted:
        _log_preempted(run, writer, summary)
    elif t.eval_every:
        summary.final_val_loss = _log_eval(run, writer)
    if last_saved != progress.step:
        summary.checkpoint = _save(run, writer)
    settle_save(run, writer)  # the last periodic save, if it is still being written
    writer.close()
    _finish(run, summary)
    return summary


def follow_batch_ramp(run: Run, writer: MetricsWriter | None = None) -> None:
    """Put engine, sampler and counts at the global batch train.batch_rampup gives the next step; a change is
    logged and recorded when ``writer`` is given (not before the start record)."""
    if not run.cfg.train.batch_rampup:  # the batch never changes: nothing to parse each step
        return
    layout = batch_layout(run.cfg, run.groups.dims.dp, run.groups.dims.cp, run.progress.step)
    if layout == run.layout:
        return
    set_global_batch(run.engine, layout)
    run.sampler.set_global_batch(layout.global_batch)
    run.layout = layout
    run.info.update(global_batch=layout.global_batch, grad_accum=layout.grad_accum,
                    tokens_per_step=layout.global_batch * run.cfg.data.seq_len)
    if writer is not None and run.ctx.is_main:
        log.info("global batch %d sequences (accumulation %d) from step %d on (train.batch_rampup)",
                 layout.global_batch, layout.grad_accum, run.progress.step + 1)
        writer.log({"step": run.progress.step, "event": "global_batch", "global_batch": layout.global_batch,
                    "grad_accum": layout.grad_accum})


def make_profiler(run: Run) -> StepProfiler | None:
    m = run.cfg.metrics
    if not m.profile_start:
        return None
    if m.profile_start + m.profile_steps - 1 <= run.progress.step and run.ctx.is_main:
        log.warning("metrics.profile_start=%d: the run resumes at step %d, past the profiled steps; nothing is profiled",
                    m.profile_start, run.progress.step)
    return StepProfiler(m.profile_start, m.profile_steps, run.out_dir, run.ctx.rank, run.ctx.device)


def log_profile(run: Run, writer: MetricsWriter, files: list[Path]) -> None:
    if files and run.ctx.is_main:
        log.info("profile written: %s (open the trace in https://ui.perfetto.dev); every rank wrote its own to %s",
                 ", ".join(f.name for f in files), files[0].parent)
        writer.log({"step": run.progress.step, "event": "profile", "files": [str(f) for f in files]})


def _nothing_to_train(run: Run) -> bool:
    """Resumed at or past train.max_steps from this run's own checkpoint of that step (says so). By name only, so
    every rank decides alike. One converted from another layout, or read from another run, is saved again: that
    writes it in this run's layout, into this run's directory."""
    step, path = run.progress.step, run.resumed_exactly_from
    own = run.out_dir / "checkpoints" / ckpt.tag_for(step)
    if step < run.cfg.train.max_steps or path is None or os.path.abspath(path) != os.path.abspath(own):
        return False
    if run.ctx.is_main:
        log.info("nothing to train: the checkpoint is at step %d, train.max_steps=%d; raise train.max_steps to "
                 "train on", step, run.cfg.train.max_steps)
    return True


class _Meter:
    """Throughput window, logged-step records and the progress bar."""

    def __init__(self, peak: float | None, bar):
        self.peak, self.bar = peak, bar
        self.start, self.steps = time.perf_counter(), 0

    def step(self, run: Run, loss_t: torch.Tensor | None, writer: MetricsWriter, summary: RunSummary,
             stop: StopRequest) -> bool:
        """Count a step; on logging steps (``loss_t`` given) read the metrics back, write a record, and
        return whether any rank was asked to stop (False on other steps, which read nothing)."""
        self.steps += 1
        stop_agreed = False
        if loss_t is not None:
            loss, grad_norm, stop_agreed = read_log_values(run, loss_t, stop)
            if not math.isfinite(loss) and run.nan.policy == "skip":  # every micro-batch was skipped
                writer.log({"step": run.progress.step, "tokens": run.progress.tokens, "loss": None})
                loss_t = None
        if loss_t is not None:
            check_finite(loss, run.progress.step, run.out_dir)
            writer.log(_step_record(run, loss, grad_norm, self.steps / (time.perf_counter() - self.start), self.peak))
            summary.losses.append(loss)
            run.controller.observe_loss(run.progress.step, loss)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}")
            self.start, self.steps = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)
        return stop_agreed

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def handle_nonfinite(run: Run, loss_t: torch.Tensor, writer: MetricsWriter) -> bool:
    """Count skipped micro-batches; under rollback, roll back on a non-finite step. True if it rolled back."""
    guard, step = run.nan, run.progress.step
    if guard.skipped_micro:
        guard.count(step, run.out_dir, f"{guard.skipped_micro} micro-batch(es) with a non-finite loss skipped")
        writer.log({"step": step, "event": "nan_skip", "micro_batches": guard.skipped_micro})
    if guard.policy != "rollback":
        return False
    loss = mean_over(loss_t, run.groups.dp_group)
    if math.isfinite(loss):
        return False
    guard.count(step, run.out_dir, f"loss {loss}: rolling back to the latest checkpoint")
    rollback(run, writer)
    return True


def rollback(run: Run, writer: MetricsWriter) -> None:
    """Reload the latest checkpoint and mark the batch just trained on as never to be used again."""
    root = run.out_dir / "checkpoints"
    settle_save(run, writer)  # a save still being written is of a finite step: the one to roll back to
    path = ckpt.latest_checkpoint(root)
    if path is None:
        raise MegascaleError(
            f"loss became non-finite at step {run.progress.step} and train.nan_policy=rollback found no checkpoint in {root}; "
            f"set train.save_every so there is one to roll back to"
        )
    meta = ckpt.read_meta(path)
    bad_step = run.progress.step
    run.nan.bad_batches.append(run.nan.position)
    ckpt.load_checkpoint(run.engine, path)
    restore_position(run, meta)
    writer.log({"step": bad_step, "event": "nan_rollback", "to_step": meta["step"], "skipped_batch": run.nan.position})
    if run.ctx.is_main:
        log.warning("rolled back from step %d to %s; the batch at data position %s will be skipped",
                    bad_step, path.name, run.nan.position)


def _log_preempted(run: Run, writer: MetricsWriter, summary: RunSummary) -> None:
    writer.log({"step": run.progress.step, "tokens": run.progress.tokens, "event": "preempted", "signal": summary.preempted})
    if run.ctx.is_main:
        log.warning("stopping at step %d on %s: saving a checkpoint, then exiting with code %d so the job is requeued",
                    run.progress.step, summary.preempted, PREEMPTED_EXIT)


def make_probe(run: Run):
    """The per-unit gradient probe when an untie rule reads it (untie.probe_every > 0), else None."""
    if not (run.controller.active and run.cfg.untie.probe_every > 0):
        return None
    from megascale.train.probe import CoherenceProbe  # noqa: PLC0415

    sequence_parallel = run.cfg.parallel.sequence_parallel and run.groups.dims.tp > 1
    return CoherenceProbe(run.engine.module, run.model.plan, run.groups, sequence_parallel)


def log_probe(run: Run, probe, writer: MetricsWriter) -> None:
    """Reduce this step's captured per-unit gradients; feed the controller; write coherence per group."""
    result = probe.finish()
    run.controller.observe_probe(run.model.plan, {g: {"rho": c.rho, "alignment": c.alignment, **c.unit_shares()}
                                                  for g, c in result.groups.items()})
    writer.log({"step": run.progress.step, "tokens": run.progress.tokens, "event": "probe", **result.to_record()})


def out_of_memory_explained(cfg: Config, ctx: DistContext, groups: ParallelGroups, grad_accum: int, where: str,
                            plan: SharingPlan, **how):
    """An allocation failure as one line: the layout's memory estimate with ``plan``'s blocks, and what to change
    (``how``: preflight.out_of_memory_explained's ``untying`` and ``then``)."""
    dims = groups.dims
    return preflight.out_of_memory_explained(cfg, dims, effective_zero_stage(cfg, dims.dp_cp), grad_accum, where,
                                             ctx.rank, ctx.device, plan, **how)


def run_out_of_memory_explained(run: Run, where: str):
    """The same for a running ``run``, whose plan is its current one (after any untie)."""
    return out_of_memory_explained(run.cfg, run.ctx, run.groups, run.info["grad_accum"], where, run.model.plan)


def untie_now(run: Run, probe, decisions, writer: MetricsWriter):
    """Untie, record the event, and return a probe attached to the new engine."""
    from megascale.untie.untie import untie_run  # noqa: PLC0415

    if probe is not None:
        probe.remove()
    event = untie_run(run, decisions)
    run.untie_history.append({k: event[k] for k in ("step", "tokens", "groups", "units", "reasons", "plan_after")})
    writer.log(event)
    return make_probe(run)


def report_state_memory(run: Run, writer: MetricsWriter) -> None:
    """Per rank: local parameters and the bytes of weights, gradients, optimizer state — formula vs measured."""
    c, dims = run.cfg, run.groups.dims
    params = local_param_count(run.engine)
    formula = state_formula(c, params, dims.dp_cp, run.pipelined)
    measured = measured_state_bytes(run.engine)
    mine = {"rank": run.ctx.rank, "stage": run.groups.stage, "tp_rank": run.groups.tp_rank, "params": params,
            "formula": dataclasses.asdict(formula),
            "measured": {**dataclasses.asdict(measured), "grads": run.grad_bytes}}
    reports = [None] * run.ctx.world_size
    dist.all_gather_object(reports, mine)
    writer.log({"step": run.progress.step, "event": "state_memory", "ranks": reports})
    if run.ctx.is_main:
        for r in reports:
            f, m = r["formula"], r["measured"]
            grads = "n/a" if m["grads"] is None else f"{m['grads'] / 2**20:.2f}"
            log.info(
                "rank %d (stage %d, tp %d): %s params; MiB weights %.2f/%.2f, grads %.2f/%s, optimizer %.2f/%.2f (formula/measured)",
                r["rank"], r["stage"], r["tp_rank"], f"{r['params']:,}", f["weights"] / 2**20, m["weights"] / 2**20,
                f["grads"] / 2**20, grads, f["optimizer"] / 2**20, m["optimizer"] / 2**20,
            )


def _progress_bar(ctx: DistContext, t, start: int, desc: str):
    if not (ctx.is_main and t.progress):
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=t.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def _step_record(run: Run, loss: float, grad_norm: float | None, steps_per_s: float, peak: float | None) -> dict[str, Any]:
    info, engine = run.info, run.engine
    tokens_per_s = steps_per_s * info["tokens_per_step"]
    record = {
        "step": run.progress.step,
        "tokens": run.progress.tokens,
        "loss": loss,
        "lr": engine.get_lr()[0],
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": info["flops_per_token"] * tokens_per_s / run.ctx.world_size / 1e12,
        **memory_stats(run.ctx.device),
    }
    record["mfu"] = record["tflops_per_device"] / peak if peak else None
    recomputed = recomputed_layers(run)
    if recomputed:  # hardware FLOPs: the recomputed forwards too (Megatron's TFLOP/s counts them)
        hardware = info["flops_per_token"] + run.model.recompute_flops_per_token(run.cfg.data.seq_len, recomputed)
        record["hardware_tflops_per_device"] = hardware * tokens_per_s / run.ctx.world_size / 1e12
        record["hfu"] = record["hardware_tflops_per_device"] / peak if peak else None
    return record


def recomputed_layers(run: Run) -> int:
    """Applied layers that recompute their forward in backward, over the whole model (every stage)."""
    p, n_layers = run.cfg.parallel, run.cfg.model.n_layers
    if not p.activation_checkpointing:
        return 0
    if not run.pipelined:
        return n_layers if p.checkpoint_layers == 0 else min(p.checkpoint_layers, n_layers)
    parts = run.engine.module.parts  # layer-list bounds of every stage: [embed, L blocks, norm, head]
    blocks = [max(0, min(hi, n_layers + 1) - max(lo, 1)) for lo, hi in zip(parts, parts[1:])]  # indices 1..L
    return sum(b if p.checkpoint_layers == 0 else min(p.checkpoint_layers, b) for b in blocks)


def _log_eval(run: Run, writer: MetricsWriter) -> float:
    with run_out_of_memory_explained(run, f"in evaluation at step {run.progress.step}"):
        val_loss = evaluate(run)
    extra = run.stage.evaluate(run) if run.stage is not None else {}  # e.g. generation accuracy
    parts = blend_part_losses(run)
    writer.log({"step": run.progress.step, "tokens": run.progress.tokens, "val_loss": val_loss,
                **({"val_loss_parts": parts} if parts else {}), **extra})
    if run.ctx.is_main:
        log.info("step %d: validation loss %.4f%s%s", run.progress.step, val_loss,
                 f" ({', '.join(f'{k} {v:.4f}' for k, v in parts.items())})" if parts else "",
                 "".join(f", {k} {v:.4g}" for k, v in extra.items() if isinstance(v, float)))
    return val_loss


def blend_part_losses(run: Run) -> dict[str, float]:
    """data.blend: each part's own validation loss, by the path the blend names it with ({} otherwise).

    The blend's loss mixes the parts by weight; a part that gets worse while another gets
    better shows only here. Each part is scored like the blend (``eval_batches`` of its own
    validation split); one too short for a batch per data-parallel rank is left out.
    """
    if not run.data.blend or not run.cfg.data.eval_parts:
        return {}
    return {str(part.path): evaluate(run, split) for part, split in zip(run.data.blend, run.data.val.files)
            if eval_batch_count(run, split) > 0}


def _save(run: Run, writer: MetricsWriter, wait: bool = True) -> Path:
    """Checkpoint this step. Under train.async_save with ``wait`` False, return once the state is copied to
    host memory: the files are written in the background and published at a later logging step."""
    check_update_finite(run)
    settle_save(run, writer)  # one save in flight at a time
    start = time.perf_counter()
    pending = ckpt.start_save(run.engine, run.out_dir / "checkpoints", run.progress.step, checkpoint_meta(run),
                              run.ctx.is_main, run.cfg.train.keep_checkpoints)
    if wait or pending.writes is None:
        path = pending.finish()
        _log_saved(run, writer, pending, time.perf_counter() - start)
        return path
    run.pending_save = pending
    pending.paused_seconds = time.perf_counter() - start
    if run.ctx.is_main:
        log.info("checkpoint %s: state copied to host memory in %.2f s, writing in the background",
                 pending.path.name, pending.paused_seconds)
    return pending.path


def publish_if_written(run: Run, writer: MetricsWriter) -> None:
    """Publish the background save if every rank has written its files (one small all-reduce)."""
    pending = run.pending_save
    if pending.written_everywhere(run.ctx.device):
        run.pending_save = None
        pending.publish_written()
        _log_saved(run, writer, pending, pending.paused_seconds)


def settle_save(run: Run, writer: MetricsWriter) -> None:
    """Wait for a background save and publish it (before another save, a rollback, the end of the run)."""
    pending, run.pending_save = run.pending_save, None
    if pending is not None:
        start = time.perf_counter()
        pending.finish()
        _log_saved(run, writer, pending, pending.paused_seconds + time.perf_counter() - start)


def _log_saved(run: Run, writer: MetricsWriter, pending: ckpt.PendingSave, paused: float) -> None:
    """``paused``: the seconds training stood still for this save (a background save: the copy, and any wait)."""
    background = pending.writes is not None
    record = {"step": run.progress.step, "event": "checkpoint", "saved_step": pending.step, "path": str(pending.path),
              "paused_s": round(paused, 3)}
    if background:
        record["write_s"] = round(pending.writes.seconds, 3)
    writer.log(record)
    if run.ctx.is_main:
        how = f" (written in the background in {pending.writes.seconds:.1f} s)" if background else ""
        log.info("checkpoint saved: %s%s", pending.path, how)


@contextmanager
def inference_model(run: Run) -> Iterator[Any]:
    """What generation and scoring call: the plain model, or this rank's pipeline stage run as one
    (megascale.parallel.pipeline_infer), on whole sequences. Sequence and context parallelism are off
    inside: one-token steps and prompts of any length cannot be cut into shares; the weights are the
    same, only the collectives change."""
    module = run.engine.module
    with sequence_parallel_off(module), context_parallel_off(module):
        if not run.pipelined:
            yield module
            return
        from megascale.parallel.pipeline_infer import PipelinedLM  # noqa: PLC0415 (the pipeline imports Triton)

        yield PipelinedLM(module, run.groups, run.model.cfg, run.model.plan, run.model.full_logits)


def _finish(run: Run, summary: RunSummary) -> None:
    if run.ctx.is_main and run.cfg.metrics.plot and summary.metrics.exists():
        summary.loss_png = plot_loss_curve(summary.metrics, summary.out_dir / "loss.png",
                                           title=f"{summary.out_dir.name}: {run.model.plan.spec}")
    if run.cfg.train.sample_tokens and not summary.preempted:
        # All ranks generate: under ZeRO-3 and tensor parallelism every forward is collective, and
        # every pipeline stage takes part in each token.
        run.engine.eval()
        prompt = run.data.tokenizer.encode(run.cfg.train.sample_prompt)
        with inference_model(run) as model:
            ids = greedy_generate(model, prompt, run.cfg.train.sample_tokens)
        summary.sample = run.cfg.train.sample_prompt + run.data.tokenizer.decode(ids)
