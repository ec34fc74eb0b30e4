"""Training throughput: megascale (DeepSpeed engine) against a plain PyTorch loop, in one run.

    python bench/train_throughput.py                         # GPU: 125m, 350m, 1.3b; seq 2048, bf16, ZeRO-1
    python bench/train_throughput.py --cpu                   # CPU: the tiny config, fp32 — framework overhead
    python bench/train_throughput.py --configs 125m --micro-batch 8 --ckpt off --json out.json
    python bench/train_throughput.py --cpu --variants "train.compile=false;train.compile=true"   # before/after

For every config, sharing (untied `none`, tied `all`) and activation checkpointing
(off, on), both trainers run the same model on the same random token batches:

* megascale: ``megascale.train.engine.build_engine`` (DeepSpeed, ZeRO stage of the
  config, torch AdamW inside it, the attention backend megascale picks) and the
  forward/backward/step sequence of ``megascale.train.loop.train_step``;
* plain: the same ``Transformer``, ``torch.optim.AdamW(fused=True)`` on CUDA,
  SDPA attention, bf16 autocast over fp32 weights, no DeepSpeed.

Each runs ``--warmup`` steps, then ``--steps`` timed steps (synchronised at the
end only); on CPU both stay in memory and are timed in alternating windows of 5
steps (median over windows), because a shared CPU's speed drifts. Reported: tokens/s, model TFLOP/s per device (FLOPs per token from
*applied* parameters plus the attention term, ``Transformer.flops_per_token``),
MFU against the device's dense bf16 peak (``megascale.hardware``; none on CPU;
the JSON states it), peak memory, megascale's weights + optimizer state measured
and by ``megascale.train.memory``'s formula (the tied model's must be lower by
what sharing saves), and megascale over plain. ``--micro-batch auto`` doubles the
micro-batch from 1 until the untied plain loop runs out of memory or passes
``--max-micro`` (256 on GPU; 16 on CPU, where memory never runs out first) and uses
half the largest that fit (headroom for DeepSpeed's buffers), for the tied model
too, so both do the same work per step. A table on stdout; ``--json`` writes it with device, date and versions, after
every row (a run cut off by a time limit keeps what it measured).

``--accum N`` gives both trainers N micro-batches per optimizer step (gradient
accumulation, as the configs train: their global batches are tens of micro-batches),
so the update is paid once per N forward/backward passes; a "step" in the table is
still one micro-batch, and the timed steps and warm-up are rounded up to whole
optimizer steps. The default, 1, steps the optimizer after every micro-batch.

``--variants`` runs several megascale trainers, each with its own config overrides
(semicolon-separated sets, comma-separated overrides within a set), against the
same plain loop in the same run: an optimisation's before/after figure.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import torch  # noqa: E402

from megascale.config import Config, load_config  # noqa: E402
from megascale.model import Transformer  # noqa: E402
from megascale.model.attention import resolve_backend  # noqa: E402
from megascale.model.ops import apply_ops_backend  # noqa: E402


@dataclass
class Result:
    config: str
    sharing: str
    ckpt: bool
    trainer: str
    micro_batch: int
    tokens_per_s: float
    tflops: float
    mfu: float | None
    peak_gib: float | None
    step_ms: float  # per micro-batch
    variant: str = ""  # megascale config overrides of this trainer ("" = the config's defaults)
    state_gib: float | None = None  # megascale: weights + optimizer state held between steps, measured (each storage once)
    state_formula_gib: float | None = None  # megascale: the same by megascale.train.memory's formula
    accum: int = 1  # micro-batches per optimizer step


def bench_config(name: str, args, variant: str = "") -> Config:
    accum = getattr(args, "accum", 1)  # one process: the global batch is micro-batch x accumulation steps
    overrides = [f"model.sharing={args.sharing}", "train.zero_stage=1", f"train.micro_batch_size={args.micro}",
                 f"train.global_batch_size={args.micro * accum if accum > 1 else 0}",
                 f"parallel.activation_checkpointing={str(args.ckpt_on).lower()}"]
    if args.cpu:
        overrides += ["train.precision=fp32", f"data.seq_len={args.seq or 128}"]
    else:
        overrides += ["train.precision=bf16", f"data.seq_len={args.seq or 2048}"]
    overrides += [o.strip() for o in variant.split(",") if o.strip()]
    return load_config(ROOT / "configs" / f"{name}.yaml", overrides)


def make_model(cfg: Config, device: torch.device, backend: str) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: a 1.3b model takes seconds to initialise on CPU
        model = Transformer(cfg.model)
    model.set_attention_backend(backend)
    return model


def random_batches(cfg: Config, n: int, device: torch.device, micro: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (micro or cfg.train.micro_batch_size, cfg.data.seq_len + 1)
    out = []
    for _ in range(n):
        seq = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def timed(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` after ``warmup``, synchronising only at the ends."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_trainer(cfg: Config, device: torch.device):
    model = make_model(cfg, device, "torch")
    model.activation_checkpointing, model.checkpoint_layers = cfg.parallel.activation_checkpointing, cfg.parallel.checkpoint_layers
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def forward(batch):
        with autocast:
            return model(*batch)

    accum = accumulation_steps(cfg)
    calls = [0]

    def backward(loss):
        (loss / accum if accum > 1 else loss).backward()

    def update():  # called after every micro-batch, as DeepSpeed's engine.step(): steps at the boundary only
        calls[0] += 1
        if calls[0] % accum:
            return
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, _composed(forward, backward, update)


def accumulation_steps(cfg: Config) -> int:
    """Micro-batches per optimizer step of a one-process run (global batch / micro-batch; 0 means one)."""
    return max(1, cfg.train.global_batch_size // cfg.train.micro_batch_size)


def megascale_trainer(cfg: Config, device: torch.device, ctx, groups):
    from megascale.train.engine import batch_layout, build_engine  # noqa: PLC0415

    backend, _ = resolve_backend(cfg.model.attention, device, cfg.model.head_dim, torch.bfloat16)
    model = make_model(cfg, device, backend)
    # As launch/pretrain.py's build_model does: until 2026-11-26 this was missing, and a model.fused_ops=triton
    # variant (the second H200 session's) measured the torch ops.
    apply_ops_backend(model, cfg.model.fused_ops, device, cfg.train.compile)
    engine = build_engine(model, cfg, batch_layout(cfg, 1), device, groups)

    # train_step's sequence for one micro-batch per step
    step = _composed(lambda batch: engine(*batch), engine.backward, engine.step)
    step.engine = engine  # for the state-memory columns, read once the optimizer state exists
    return model, step


def _composed(forward, backward, update):
    """One training step from its phases; ``step.phases`` keeps them for bench/step_profile.py to time apart."""
    def step(batch):
        backward(forward(batch))
        update()

    step.phases = {"forward": forward, "backward": backward, "update": update}
    return step


def state_memory(step, cfg: Config) -> tuple[float | None, float | None]:
    """(measured, formula) GiB of a megascale trainer's weights + optimizer state; plain: none.

    Gradients are left out: between steps they are freed or zeroed, so what they cost shows in peak memory.
    """
    engine = getattr(step, "engine", None)
    if engine is None:
        return None, None
    from megascale.train.engine import state_formula  # noqa: PLC0415
    from megascale.train.memory import local_param_count, measured_state_bytes  # noqa: PLC0415

    formula = state_formula(cfg, local_param_count(engine), 1)
    measured = measured_state_bytes(engine)
    return (measured.weights + measured.optimizer) / 2**30, (formula.weights + formula.optimizer) / 2**30


def interleaved(steps: list, batches, warmup: int, rounds: int, per_round: int, device: torch.device) -> list[float]:
    """Seconds per step of each trainer, timed in turn within every round; the median over rounds.

    On a shared CPU the speed drifts by tens of percent within a minute; alternating
    short windows exposes both trainers to the same drift, which timing one after the
    other does not.
    """
    for step in steps:
        for i in range(warmup):
            step(batches[i % len(batches)])
    samples: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            samples[i].append(timed(step, batches, 0, per_round, device))
    return [statistics.median(s) for s in samples]


def measure_all_cpu(name: str, args, device, ctx, groups) -> tuple[list[Result], list[Failure]]:
    """Plain and every megascale variant on CPU, all in memory, interleaved (see ``interleaved``).

    A variant that cannot be built or cannot take a first step is reported as a failure; the rest are timed.
    """
    cfg = bench_config(name, args)
    batches = random_batches(cfg, 4, device)
    trainers, failures = [("plain", "", cfg, *plain_trainer(cfg, device))], []
    for v in args.variant_list:
        try:
            variant_cfg = bench_config(name, args, v)
            model, step = megascale_trainer(variant_cfg, device, ctx, groups)
            for _ in range(accumulation_steps(variant_cfg)):  # one more warm-up optimizer step: a variant that
                step(batches[0])  # cannot train fails here, not mid-timing
        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
            failures.append(Failure(name, args.sharing, args.ckpt_on, v, one_line(exc)))
            continue
        trainers.append(("megascale", v, variant_cfg, model, step))
    accum = accumulation_steps(cfg)
    per_round = -(-5 // accum) * accum  # whole optimizer steps per window
    rounds = max(1, args.steps // per_round)
    secs = interleaved([step for *_, step in trainers], batches, args.warmup, rounds, per_round, device)
    return [result(name, trainer, trainer_cfg, model, s, device, args, variant, step)
            for (trainer, variant, trainer_cfg, model, step), s in zip(trainers, secs)], failures


def result(name: str, trainer: str, cfg: Config, model: Transformer, seconds: float, device, args,
           variant: str = "", step=None) -> Result:
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len / seconds
    tflops = model.flops_per_token(cfg.data.seq_len) * tokens / 1e12
    peak = peak_tflops(device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Result(name, args.sharing, args.ckpt_on, trainer, cfg.train.micro_batch_size, tokens, tflops,
                  tflops / peak if peak else None, mem, seconds * 1e3, variant, *state_memory(step, cfg),
                  accumulation_steps(cfg))


def measure(name: str, trainer: str, args, device, ctx, groups, variant: str = "") -> Result:
    cfg = bench_config(name, args, variant)
    if device.type == "cuda":
        gc.collect()  # the previous trainer's reference cycles, before its memory counts toward this one's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, step = plain_trainer(cfg, device) if trainer == "plain" else megascale_trainer(cfg, device, ctx, groups)
    try:  # a variant that fails mid-timing must not leave its engine to the next one either
        seconds = timed(step, random_batches(cfg, 4, device), args.warmup, args.steps, device)
        return result(name, trainer, cfg, model, seconds, device, args, variant, step)
    finally:
        release(step)


def release(step) -> None:
    """Free what a trainer holds before the next one is built.

    A DeepSpeed engine is not freed by dropping the last Python reference: its optimizer's
    gradient-accumulation hooks live on the parameters (in autograd's C++ nodes, which Python's
    garbage collector cannot see), and they reference the engine. Until 2026-11-26 nothing released
    them, so every megascale variant after the first measured its peak memory on top of the previous
    engine's weights, gradients and optimizer state (the H200 sessions' 1.3b peaks: 72.9-98.0 GiB).
    """
    engine = getattr(step, "engine", None)
    if engine is not None:
        engine.destroy()
        del step.engine


def peak_tflops(device: torch.device) -> float | None:
    from megascale.train.metrics import device_peak_tflops  # noqa: PLC0415

    return device_peak_tflops(device, 0.0)


def largest_micro_batch(name: str, args, device, cap: int) -> int:
    """Double the micro-batch until the plain loop runs out of memory or passes ``cap``; half the largest that fit.

    One model and optimizer serve every size (building a 1.3b model per size would cost more
    than the measurement); the halving leaves headroom for DeepSpeed's own buffers. On CPU
    nothing runs out of memory first: the search ends at the cap (the same code path, so the
    CPU smoke run exercises what a GPU run does).
    """
    args.micro = 1
    cfg = bench_config(name, args)
    model, step = plain_trainer(cfg, device)
    best, micro = 0, 1
    while micro <= cap:
        try:
            step(random_batches(cfg, 1, device, micro)[0])
            sync(device)
        except torch.cuda.OutOfMemoryError:
            break
        best, micro = micro, micro * 2
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not best:
        raise SystemExit(f"{name}: micro-batch 1 does not fit on {torch.cuda.get_device_name(device)}")
    return max(1, best // 2)


def row(r: Result, base: Result | None) -> str:
    mfu = f"{r.mfu:6.1%}" if r.mfu is not None else "   n/a"
    mem = f"{r.peak_gib:7.1f}" if r.peak_gib is not None else "    n/a"
    ratio = f"{r.tokens_per_s / base.tokens_per_s:6.3f}" if base else "      "
    state = f"{r.state_gib:7.2f} / {r.state_formula_gib:<7.2f}" if r.state_gib is not None else " " * 17
    micro = f"{r.micro_batch}x{r.accum}" if r.accum > 1 else str(r.micro_batch)
    return (f"{r.config:<6} {r.sharing:<5} {'on' if r.ckpt else 'off':<4} {r.trainer:<9} {micro:>5} "
            f"{r.step_ms:9.1f} {r.tokens_per_s:11,.0f} {r.tflops:8.2f} {mfu} {mem} {state} {ratio}  {r.variant}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=None, help="comma-separated configs/*.yaml names (default 125m,350m,1.3b; --cpu: tiny)")
    p.add_argument("--cpu", action="store_true", help="run on CPU (fp32, tiny config): framework overhead per step")
    p.add_argument("--sharings", default="none,all")
    p.add_argument("--ckpt", default="off,on", help="activation checkpointing settings to run: off,on")
    p.add_argument("--micro-batch", default="auto", help="sequences per step, or auto: half the largest that fits, "
                   "up to --max-micro; per config as name=N,name=N (auto for configs not named)")
    p.add_argument("--max-micro", type=int, default=0, help="auto's largest try (default 256 on GPU; 16 on CPU, "
                   "where nothing runs out of memory first: micro-batch 8)")
    p.add_argument("--seq", type=int, default=0, help="sequence length (default 2048 on GPU, 128 on CPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation), "
                   "both trainers; steps and warm-up are rounded up to whole optimizer steps")
    p.add_argument("--variants", default="", help='megascale override sets, e.g. "train.compile=false;train.compile=true"')
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.variant_list = args.variants.split(";") if args.variants else [""]
    if args.accum < 1:
        raise SystemExit(f"--accum {args.accum}: give 1 or more micro-batches per optimizer step")
    args.steps, args.warmup = (-(-n // args.accum) * args.accum for n in (args.steps, args.warmup))
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from megascale.train.dist import init_distributed  # noqa: PLC0415
    from megascale.train.loop import make_groups  # noqa: PLC0415

    ctx = init_distributed()
    device = ctx.device
    configs = (args.configs or ("tiny" if args.cpu else "125m,350m,1.3b")).split(",")
    record = Record(args.json, device)
    print("config sharing ckpt trainer   micro  step ms    tokens/s   TFLOP/s    MFU  mem GiB  state GiB/formula  "
          "megascale/plain  variant")
    for name in configs:
        for ckpt in args.ckpt.split(","):
            args.ckpt_on = ckpt == "on"
            # One micro-batch for every sharing: tied and untied then do the same work per step.
            args.sharing = "none"  # before micro_batch: on CUDA it builds the config to probe sizes
            args.micro = micro_batch(name, args, device)
            for sharing in args.sharings.split(","):
                args.sharing = sharing
                groups = make_groups(bench_config(name, args), ctx)
                if device.type == "cuda":  # one at a time: two large models would not share the memory
                    plain = measure(name, "plain", args, device, ctx, groups)
                    record.keep(plain, None)
                    for v in args.variant_list:
                        try:
                            record.keep(measure(name, "megascale", args, device, ctx, groups, v), plain)
                        except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
                            record.fail(Failure(name, args.sharing, args.ckpt_on, v, one_line(exc)))
                else:
                    (plain, *ours), failures = measure_all_cpu(name, args, device, ctx, groups)
                    for r in [plain, *ours]:
                        record.keep(r, None if r is plain else plain)
                    for f in failures:
                        record.fail(f)
    if record.failed:
        raise SystemExit(f"{len(record.failed)} variant(s) failed: "
                         f"{'; '.join(f.variant or 'defaults' for f in record.failed)}")


@dataclass
class Failure:
    """A megascale variant that raised: reported and recorded, and the run goes on with the next."""
    config: str
    sharing: str
    ckpt: bool
    variant: str
    error: str


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


@dataclass
class Record:
    """What the run measured and what failed, printed as it comes and, with --json, rewritten after each:
    a run stopped by a time limit keeps what it measured."""
    json_path: Path | None
    device: torch.device
    results: list[Result] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def keep(self, r: Result, plain: Result | None) -> None:
        print(row(r, plain), flush=True)
        self.results.append(r)
        self._write()

    def fail(self, f: Failure) -> None:
        print(f"{f.config:<6} {f.sharing:<5} {'on' if f.ckpt else 'off':<4} megascale FAILED  {f.variant}: {f.error}",
              flush=True)
        self.failed.append(f)
        gc.collect()  # what the failed trainer held, before the next one is built
        if self.device.type == "cuda":
            torch._dynamo.reset()  # a failed compile leaves its graphs cached
            torch.cuda.empty_cache()
        self._write()

    def _write(self) -> None:
        if self.json_path:
            write_json(self.json_path, self.results, self.device, self.failed)


def micro_batch(name: str, args, device: torch.device) -> int:
    """--micro-batch: "auto", one size for every config, or one per config ("350m=16,1.3b=8"; auto for the rest)."""
    chosen = args.micro_batch
    if "=" in chosen:
        sizes = dict(item.split("=", 1) for item in chosen.split(","))
        chosen = sizes.get(name, "auto")
    if chosen != "auto":
        return int(chosen)
    return largest_micro_batch(name, args, device, args.max_micro or (256 if device.type == "cuda" else 16))


def write_json(path: Path, results: list[Result], device: torch.device, failed: list | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "command": " ".join(sys.argv),
        "peak_tflops": peak_tflops(device),  # the MFU denominator: dense bf16 peak of this device (none on CPU)
        "results": [r.__dict__ for r in results],
        "failed": [f.__dict__ for f in failed or []]}, indent=2))

if __name__ == "__main__":
    main()
    from megascale.train.dist import exit_process  # noqa: PLC0415

    exit_process(0)
