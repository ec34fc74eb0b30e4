"""The pretraining loop: data → model → DeepSpeed engine → steps, evaluation, checkpoints.

``pretrain(cfg, ctx)`` is the whole run; each stage is a short function so the
trace fine-tuning stage can reuse them (DESIGN.md: no second copy of the loop).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megascale.config import Config
from megascale.data import DistributedBatchSampler, Tokenizer, TokenFile, batch_from_indices, ensure_stdlib_dataset, load_manifest
from megascale.errors import MegascaleError
from megascale.model import Transformer
from megascale.model.attention import resolve_backend
from megascale.model.generate import greedy_generate
from megascale.train import checkpoint as ckpt
from megascale.train.dist import DistContext
from megascale.train.engine import BatchLayout, batch_layout, build_engine
from megascale.train.metrics import MetricsWriter, device_peak_tflops, memory_stats, plot_loss_curve

log = logging.getLogger(__name__)


@dataclass
class Data:
    tokenizer: Tokenizer
    train: TokenFile
    val: TokenFile
    path: Path


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


# ------------------------------------------------------------------ setup


def open_data(cfg: Config, ctx: DistContext) -> Data:
    """Open the token files; build the embedded stdlib corpus first if it is missing."""
    path = Path(cfg.data.path)
    if cfg.data.corpus == "stdlib":
        # Every rank calls this: a file lock lets one build while the others wait.
        ensure_stdlib_dataset(path, cfg.model.vocab_size, cfg.data.stdlib_max_bytes, seed=0)
    manifest = load_manifest(path)
    tokenizer = Tokenizer(path / manifest["tokenizer"])
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise MegascaleError(
            f"tokenizer in {path} has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    return Data(tokenizer, TokenFile(path / "train"), TokenFile(path / "val"), path)


def build_model(cfg: Config, ctx: DistContext) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    backend, why = resolve_backend(cfg.model.attention, ctx.device)
    model.set_attention_backend(backend)
    if ctx.is_main:
        log.info("attention backend: %s (%s)", backend, why)
    return model


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


def log_startup(ctx: DistContext, info: dict[str, Any], cfg: Config) -> None:
    if not ctx.is_main:
        return
    log.info("launcher %s, backend %s, device %s, world size %d", ctx.launcher, ctx.backend, ctx.device, ctx.world_size)
    log.info("sharing plan: %s", info["sharing"])
    log.info(
        "parameters: %s unique (memory), %s applied (compute); %.3g FLOPs/token; weights+grads+Adam ≈ %.1f MiB/replica before ZeRO",
        f"{info['params_unique']:,}", f"{info['params_applied']:,}", info["flops_per_token"], info["state_bytes_formula"] / 2**20,
    )
    log.info(
        "batch: %d sequences × %d tokens per step (micro %d, accumulation %d, dp %d); ZeRO stage %d, %s",
        info["global_batch"], cfg.data.seq_len, cfg.train.micro_batch_size, info["grad_accum"], ctx.world_size,
        cfg.train.zero_stage, cfg.train.precision,
    )


# ------------------------------------------------------------------ steps


def train_step(engine, data: Data, sampler: DistributedBatchSampler, seq_len: int, device: torch.device) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns the mean loss (on device, not synced)."""
    micro_batches = sampler.next_global_batch()
    total = torch.zeros((), device=device)
    for indices in micro_batches:
        inputs, targets = batch_from_indices(data.train, indices, seq_len)
        loss = engine(inputs.to(device), targets.to(device))
        engine.backward(loss)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        total += loss.detach().float()
    return total / len(micro_batches)


def mean_over_ranks(value: torch.Tensor) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


@torch.no_grad()
def evaluate(engine, val: TokenFile, cfg: Config, ctx: DistContext) -> float:
    """Mean loss over the first ``eval_batches`` validation micro-batches, round-robin over ranks.

    The set does not depend on the number of ranks (beyond rounding to a multiple
    of it), so 1-rank and N-rank runs report comparable validation losses.
    """
    seq, micro, world = cfg.data.seq_len, cfg.train.micro_batch_size, ctx.world_size
    available = val.num_samples(seq) // micro
    n_batches = min(cfg.train.eval_batches, available)
    n_batches -= n_batches % world  # every rank runs the same number of forwards (ZeRO-3 gathers)
    if n_batches == 0:
        raise MegascaleError(
            f"validation split has {val.num_samples(seq)} sequences of {seq} tokens, fewer than the {micro * world} "
            f"needed for one batch per rank; prepare more data, or lower data.seq_len or train.micro_batch_size"
        )
    engine.eval()
    total = torch.zeros((), device=ctx.device)
    mine = range(ctx.rank, n_batches, world)
    for b in mine:
        inputs, targets = batch_from_indices(val, range(b * micro, (b + 1) * micro), seq)
        total += engine(inputs.to(ctx.device), targets.to(ctx.device)).float()
    engine.train()
    return mean_over_ranks(total / len(mine))


def check_finite(loss: float, step: int, out_dir: Path) -> None:
    if not math.isfinite(loss):
        raise MegascaleError(
            f"loss became {loss} at step {step}; lower optim.lr or use train.precision=fp32/bf16, "
            f"then resume from the last good checkpoint in {out_dir / 'checkpoints'} (train.resume=auto)"
        )


# ------------------------------------------------------------------ the run


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0


def checkpoint_meta(cfg: Config, model: Transformer, data: Data, sampler, progress: Progress, info: dict) -> dict[str, Any]:
    return {
        "format": ckpt.META_FORMAT,
        "version": ckpt.META_VERSION,
        "step": progress.step,
        "tokens": progress.tokens,
        "config": cfg.to_dict(),
        "sharing_plan": model.plan.to_list(),
        "params": {"unique": info["params_unique"], "applied": info["params_applied"], "flops_per_token": info["flops_per_token"]},
        "tokenizer": {"path": str(data.tokenizer.path.resolve()), "vocab_size": data.tokenizer.vocab_size},
        "data": {"path": str(data.path.resolve()), "sampler": sampler.state_dict()},
        "world_size": sampler.dp_size,
        "untie_history": [],
    }


def resume_if_asked(cfg: Config, model: Transformer) -> tuple[Path | None, dict[str, Any] | None]:
    """Find and check the checkpoint to resume from, before any engine exists (so nothing is touched on error)."""
    path = ckpt.resolve_checkpoint(cfg.train.resume, Path(cfg.train.out_dir))
    if path is None:
        return None, None
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, cfg.to_dict()["model"], model.plan.to_list())
    return path, meta


def pretrain(cfg: Config, ctx: DistContext) -> RunSummary:
    """Run pretraining as configured; every rank calls this."""
    out_dir = Path(cfg.train.out_dir)
    data = open_data(cfg, ctx)
    model = build_model(cfg, ctx)
    layout = batch_layout(cfg, ctx.world_size)
    info = describe_model(model, cfg, layout)
    log_startup(ctx, info, cfg)
    sampler = DistributedBatchSampler(
        data.train.num_samples(cfg.data.seq_len), layout.global_batch, layout.micro_batch,
        ctx.rank, ctx.world_size, cfg.train.seed, cfg.data.shuffle,
    )
    resume_path, meta = resume_if_asked(cfg, model)
    engine = build_engine(model, cfg, layout, ctx.device)
    progress = Progress()
    if resume_path is not None:
        ckpt.load_checkpoint(engine, resume_path)
        sampler.load_state_dict(meta["data"]["sampler"])
        progress = Progress(meta["step"], meta["tokens"])
        if ctx.is_main:
            log.info("resumed from %s at step %d", resume_path, progress.step)
    return run_loop(engine, model, cfg, ctx, data, sampler, info, progress, out_dir)


def run_loop(engine, model, cfg, ctx, data, sampler, info, progress: Progress, out_dir: Path) -> RunSummary:
    t = cfg.train
    writer = MetricsWriter(out_dir, ctx.is_main, cfg.metrics.tensorboard)
    writer.log({"step": progress.step, "event": "start", "world_size": ctx.world_size, "device": str(ctx.device), **info})
    summary = RunSummary(out_dir, None, writer.path, None)
    peak = device_peak_tflops(ctx.device, cfg.metrics.peak_tflops)
    bar = _progress_bar(ctx, t, progress.step)
    if t.eval_every and progress.step == 0:
        summary.first_val_loss = _log_eval(engine, data, cfg, ctx, progress, writer)
    last_saved, window_start, window_steps = -1, time.perf_counter(), 0
    while progress.step < t.max_steps:
        loss_t = train_step(engine, data, sampler, cfg.data.seq_len, ctx.device)
        progress.step += 1
        progress.tokens += info["tokens_per_step"]
        window_steps += 1
        if progress.step % t.log_every == 0 or progress.step == t.max_steps:
            loss = mean_over_ranks(loss_t)
            check_finite(loss, progress.step, out_dir)
            elapsed = time.perf_counter() - window_start
            record = _step_record(engine, progress, loss, info, window_steps / elapsed, peak, ctx)
            writer.log(record)
            summary.losses.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}")
            window_start, window_steps = time.perf_counter(), 0
        if bar is not None:
            bar.update(1)
        if t.eval_every and progress.step % t.eval_every == 0 and progress.step < t.max_steps:
            _log_eval(engine, data, cfg, ctx, progress, writer)
        if t.save_every and progress.step % t.save_every == 0:
            summary.checkpoint = _save(engine, cfg, model, data, sampler, progress, info, ctx, out_dir)
            last_saved = progress.step
    if bar is not None:
        bar.close()
    if t.eval_every:
        summary.final_val_loss = _log_eval(engine, data, cfg, ctx, progress, writer)
    if last_saved != progress.step:
        summary.checkpoint = _save(engine, cfg, model, data, sampler, progress, info, ctx, out_dir)
    writer.close()
    _finish(summary, engine, cfg, ctx, data)
    return summary


def _progress_bar(ctx: DistContext, t, start: int):
    if not (ctx.is_main and t.progress):
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=t.max_steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)


def _step_record(engine, progress: Progress, loss: float, info: dict, steps_per_s: float, peak, ctx) -> dict[str, Any]:
    tokens_per_s = steps_per_s * info["tokens_per_step"]
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": progress.step,
        "tokens": progress.tokens,
        "loss": loss,
        "lr": engine.get_lr()[0],
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": info["flops_per_token"] * tokens_per_s / ctx.world_size / 1e12,
        **memory_stats(ctx.device),
    }
    record["mfu"] = record["tflops_per_device"] / peak if peak else None
    return record


def _log_eval(engine, data: Data, cfg: Config, ctx: DistContext, progress: Progress, writer: MetricsWriter) -> float:
    val_loss = evaluate(engine, data.val, cfg, ctx)
    writer.log({"step": progress.step, "tokens": progress.tokens, "val_loss": val_loss})
    if ctx.is_main:
        log.info("step %d: validation loss %.4f", progress.step, val_loss)
    return val_loss


def _save(engine, cfg, model, data, sampler, progress, info, ctx, out_dir: Path) -> Path:
    meta = checkpoint_meta(cfg, model, data, sampler, progress, info)
    path = ckpt.save_checkpoint(engine, out_dir / "checkpoints", progress.step, meta, ctx.is_main, cfg.train.keep_checkpoints)
    if ctx.is_main:
        log.info("checkpoint saved: %s", path)
    return path


def _finish(summary: RunSummary, engine, cfg: Config, ctx: DistContext, data: Data) -> None:
    if ctx.is_main and cfg.metrics.plot and summary.metrics.exists():
        summary.loss_png = plot_loss_curve(summary.metrics, summary.out_dir / "loss.png", title=f"{summary.out_dir.name}: {engine.module.plan.spec}")
    if cfg.train.sample_tokens:
        # All ranks generate: under ZeRO-3 every forward gathers parameters collectively.
        engine.eval()
        prompt = data.tokenizer.encode(cfg.train.sample_prompt)
        ids = greedy_generate(engine.module, prompt, cfg.train.sample_tokens)
        summary.sample = cfg.train.sample_prompt + data.tokenizer.decode(ids)
