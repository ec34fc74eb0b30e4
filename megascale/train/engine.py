"""The DeepSpeed engine, configured from our typed config.

The DeepSpeed JSON is *generated* (``deepspeed_config``) rather than kept as a
hand-written twin of the YAML, so ZeRO stage, precision, clipping and
accumulation can never disagree between the two.

The optimizer is ``torch.optim.AdamW`` handed to DeepSpeed as a client
optimizer: it runs on CPU and CUDA alike (``fused=True`` on CUDA), where
DeepSpeed's own Adam needs a compiled op. With ``train.offload_optimizer=cpu``
it is DeepSpeed's ``DeepSpeedCPUAdam`` (JIT-built on first use), the optimizer
DeepSpeed's ZeRO-Offload steps on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megascale.config import FP32_STATE, Config, OptimConfig, parse_batch_rampup
from megascale.errors import MegascaleError
from megascale.model.init import check_full_weights, materialize, piece_of
from megascale.train.memory import StateBytes, formula_state_bytes


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits over data-parallel ranks and accumulation steps."""

    micro_batch: int
    grad_accum: int
    dp_size: int
    cp_size: int = 1  # context-parallel ranks share each sequence: they read the same samples

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp_size

    @property
    def dp_cp(self) -> int:
        """Ranks that average their gradients and share ZeRO partitions: dp × cp, as ``ParallelDims.dp_cp``."""
        return self.dp_size * self.cp_size


def batch_layout(cfg: Config, dp_size: int, cp_size: int = 1, completed_steps: int | None = None) -> BatchLayout:
    """Derive gradient accumulation from the global batch (train.global_batch_size, or train.batch_rampup's
    after ``completed_steps`` steps when given); one line if it does not divide."""
    micro = cfg.train.micro_batch_size
    global_batch = cfg.train.global_batch_size or micro * dp_size
    what = f"train.global_batch_size={global_batch}"
    for batch, until in parse_batch_rampup(cfg.train.batch_rampup) if completed_steps is not None else ():
        if completed_steps < until:
            global_batch, what = batch, f"train.batch_rampup's batch {batch} (until step {until})"
            break
    if global_batch % (micro * dp_size):
        raise MegascaleError(
            f"{what} is not a multiple of micro_batch_size*dp = {micro}*{dp_size}; "
            f"use a multiple of {micro * dp_size}"
        )
    return BatchLayout(micro, global_batch // (micro * dp_size), dp_size, cp_size)


def ramp_layouts(cfg: Config, dp_size: int, cp_size: int = 1) -> list[tuple[int, BatchLayout]]:
    """(first step, layout) of each train.batch_rampup stage and of the final batch; checks each divides."""
    starts = [0] + [until for _, until in parse_batch_rampup(cfg.train.batch_rampup)]
    return [(start, batch_layout(cfg, dp_size, cp_size, start)) for start in starts]


def planned_tokens(cfg: Config, dp_size: int) -> int:
    """Tokens over train.max_steps, each step at the global batch train.batch_rampup gives it."""
    stages = ramp_layouts(cfg, dp_size) + [(cfg.train.max_steps, None)]
    return sum(max(0, min(end, cfg.train.max_steps) - start) * layout.global_batch * cfg.data.seq_len
               for (start, layout), (end, _) in zip(stages, stages[1:]))


def set_global_batch(engine, layout: BatchLayout) -> None:
    """Switch a built engine to ``layout``'s accumulation at a step boundary (train.batch_rampup).

    DeepSpeed finds the accumulation boundary by (micro_steps + 1) % gradient_accumulation_steps, with
    micro_steps counted over the whole run: restarted at 0, as a freshly built engine has it (a resume
    with another global batch), the boundary falls after the new count. ZeRO-1/2 keep their own copy of
    the count: the installed DeepSpeed no longer reads it, but older releases (requirements.txt allows
    >= 0.15) chose by it whether to accumulate gradients on the host under offload, so it is set too.
    """
    engine.set_train_batch_size(layout.global_batch * layout.cp_size)  # the pipeline engine's micro_batches too
    engine.micro_steps = 0
    if hasattr(engine.optimizer, "gradient_accumulation_steps"):
        engine.optimizer.gradient_accumulation_steps = layout.grad_accum


def effective_zero_stage(cfg: Config, dp: int) -> int:
    """The ZeRO stage DeepSpeed runs: train.zero_stage, except fp32 stages 1-2 at one data-parallel rank run as 0,
    and 16-bit weights at stage 0 run as 1.

    With dp = 1, ZeRO-1/2 partition nothing, yet DeepSpeed still keeps a flat fp32 clone
    of every weight, copies the gradients into it and the result back each step: pure
    overhead (BENCHMARKS.md, "framework overhead"; on two stages of the tiny model the
    optimizer held 1.58 MB for ZeRO-0's 1.05 MB). Stage 0 in fp32 is the torch
    optimizer on the parameters themselves. bf16/fp16 keep their stage (the fp32
    master copy is needed there) and ZeRO-3 keeps its own checkpoint format. Pipeline
    stages kept theirs until their ZeRO-0 clip was right (``clip_by_global_norm``) and
    their ZeRO-0 state convertible (``checkpoint.optimizer_names``).
    At stage 0 the checkpoint holds the full weights in ``mp_rank_00_model_states.pt``:
    DeepSpeed's ``zero_to_fp32`` has nothing to merge there; ``launch/consolidate.py``
    reads every stage.

    DeepSpeed's 16-bit optimizers without ZeRO train differently from the same run at
    ZeRO-1 (tiny model, bf16, 8 steps: loss 6.0914 one rank and 6.1728 over two
    stages, against 6.0700 for ZeRO-1 and 6.0694 for fp32): the unfused one steps Adam
    once on zero gradients when it is built (the bias correction one step ahead, the
    weights decayed once), and the BF16 optimizer a pipeline gets clips by another
    gradient norm (1.07 against every other layout's 1.20 at the first step). ZeRO-1
    keeps the same fp32 masters and Adam state, partitioned over the data-parallel
    ranks (so never more memory).
    """
    return zero_stage_run(cfg.train.zero_stage, cfg.train.precision, cfg.train.optimizer_on_host, dp)


def zero_stage_run(stage: int, precision: str, on_host: bool, dp: int) -> int:
    """``effective_zero_stage`` from the settings themselves (a checkpoint's saved config, say)."""
    if precision not in FP32_STATE:
        return max(stage, 1)
    return 0 if dp == 1 and stage in (1, 2) and not on_host else stage  # offload is a ZeRO feature


def state_formula(cfg: Config, local_params: int, dp: int, pipelined: bool = False) -> StateBytes:
    """The bytes of weights, gradients and optimizer state a rank should hold for this run's layout."""
    return formula_state_bytes(local_params, cfg.train.precision, effective_zero_stage(cfg, dp), dp, pipelined,
                               offload=cfg.train.optimizer_on_host)


def zero_config(cfg: Config, dp: int, device_type: str) -> dict[str, Any]:
    """DeepSpeed's zero_optimization section: the effective stage, and overlap of the gradient reduction."""
    stage = effective_zero_stage(cfg, dp)
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2) and dp > 1 and device_type == "cuda":
        # Reduce full gradient buckets on a side stream while backward goes on (DeepSpeed's
        # default for ZeRO-3 only). CPU devices have no streams to overlap on: left out there.
        zero["overlap_comm"] = cfg.train.overlap_comm
    if cfg.train.optimizer_on_host:
        # Pinned host buffers make the gradient copies out and the weight copies back asynchronous.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if cfg.train.weights_on_host:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return zero


def deepspeed_config(cfg: Config, layout: BatchLayout, device_type: str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config dict for this run."""
    t = cfg.train
    ds: dict[str, Any] = {
        # DeepSpeed counts a "sample" per rank of its data-parallel group; under context parallelism
        # cp ranks hold the shares of one sample, so its batch is cp times ours.
        "train_batch_size": layout.global_batch * layout.cp_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero_config(cfg, layout.dp_cp, device_type),
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": t.check_grad_overflow},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # fp32 weights, bf16 compute: DeepSpeed's forward runs under torch.autocast.
        "torch_autocast": {"enabled": t.precision == "bf16-autocast", "dtype": "bfloat16"},
        "steps_per_print": 10**9,  # megascale logs its own metrics
        "wall_clock_breakdown": False,
        # ZeRO partitions hold a client optimizer (torch AdamW), which DeepSpeed flags as untested.
        "zero_allow_untested_optimizer": True,
    }
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        # DeepSpeed's pipeline sends 1/tp of an activation per tensor rank and re-gathers it, which
        # assumes the activation is replicated over tensor ranks; sequence-parallel slices are not.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return ds


def lr_lambda(o: OptimConfig, max_steps: int):
    """Multiplier of optim.lr at each step: linear warm-up, then cosine/linear/constant/wsd decay.

    wsd (warmup-stable-decay) holds the peak until the last ``decay_fraction`` of max_steps, then
    decays. The LR depends only on (step, max_steps), so a checkpoint of the stable phase resumed
    with a larger train.max_steps trains on at the peak and decays at the new end.
    """
    decay_start = max(o.warmup_steps, max_steps - round(o.decay_fraction * max_steps))

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            if step < decay_start:
                return 1.0
            progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay_shape(o.decay_shape, progress)
        progress = min(1.0, (step - o.warmup_steps) / max(1, max_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay_shape(o.schedule, progress)

    return factor


def decay_shape(name: str, progress: float) -> float:
    """1 at progress 0, 0 at progress 1."""
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if name == "1-sqrt":
        return 1 - math.sqrt(progress)
    return 1 - progress  # linear


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights), not norms: the usual LLM recipe."""
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied tensor appears once
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter's own tensor is empty
        (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's wrappers (ZeRO, BF16 optimizer), or the engine's own."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_settings(engine) -> list[dict[str, Any]]:
    """What each param group steps with now (LR, betas, eps, weight decay): for the run's start record."""
    keys = ("lr", "betas", "eps", "weight_decay")
    return [{k: group[k] for k in keys if k in group} for group in base_optimizer(engine).param_groups]


def build_optimizer(module: torch.nn.Module, cfg: Config, device: torch.device):
    """AdamW over the decay / no-decay groups: torch's, or DeepSpeed's CPU Adam when the optimizer is offloaded."""
    o = cfg.optim
    groups = param_groups(module, o.weight_decay)
    if cfg.train.optimizer_on_host:
        # The step runs on the host over DeepSpeed's fp32 partitions: its vectorized, multi-threaded
        # op is the one DeepSpeed expects there (a torch optimizer on the host would be far slower).
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # noqa: PLC0415 (JIT-builds its op on first use)

        optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.train.max_steps))
    return optimizer, scheduler


def parallelize(model: torch.nn.Module, cfg: Config, groups, device: torch.device,
                weights: Mapping[str, torch.Tensor] | None = None, then=None):
    """Apply tensor and context parallelism, activation checkpointing and the pipeline split, in that order.

    Returns the module DeepSpeed should wrap: the model itself, or this stage's PipelineModule.
    A model built on the meta device gets storage on ``device`` here, for the parameters
    this rank holds only (its tensor shard, its pipeline stage): drawn from train.seed, or
    cut from ``weights`` (full plain-model weights by name) when given (megascale.model.init);
    ``then(p)`` runs on each such parameter as soon as it exists (``zero3_partitioner``).
    """
    if weights is not None:
        check_full_weights(model, weights)

    draw_on = torch.device("cpu") if cfg.train.init_device == "cpu" else device

    def give_storage(module: torch.nn.Module) -> None:
        materialize(module, cfg.train.seed, device, weights, then, draw_on)

    from megascale.parallel.context_parallel import apply_context_parallel  # noqa: PLC0415
    from megascale.parallel.pipeline import build_pipeline_module  # noqa: PLC0415
    from megascale.parallel.tensor_parallel import apply_tensor_parallel  # noqa: PLC0415

    p = cfg.parallel
    model.fused_loss = cfg.train.fused_loss
    model.lm_head.chunk_tokens = cfg.train.loss_chunk_tokens
    apply_tensor_parallel(model, groups.tp_group, p.sequence_parallel, groups.kv_group)
    apply_context_parallel(model, groups.context)
    if cfg.train.compile:
        for block in model.blocks.values():
            block.compile()  # in place: the block keeps its parameters and their names
    if groups.dims.pp == 1:
        model.activation_checkpointing, model.checkpoint_layers = p.activation_checkpointing, p.checkpoint_layers
        give_storage(model)
        return model
    return build_pipeline_module(model, groups, p.partition, p.activation_checkpointing, p.sequence_parallel,
                                 checkpoint_layers=p.checkpoint_layers,
                                 fused_loss=cfg.train.fused_loss, give_storage=give_storage)


def check_precision(precision: str) -> None:
    """Refuse, in one line, a precision the accelerator DeepSpeed detected cannot train in."""
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    accel = get_accelerator()
    supported = {"fp16": accel.is_fp16_supported, "bf16": accel.is_bf16_supported,
                 "bf16-autocast": accel.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        raise MegascaleError(
            f"train.precision={precision} is not supported on this device ({accel.device_name()}); "
            f"use train.precision=bf16 or fp32 (fp16 needs a GPU, or a CPU with fp16 kernels such as AVX512-FP16)"
        )


def build_engine(model: torch.nn.Module, cfg: Config, layout: BatchLayout, device: torch.device, groups,
                 weights: Mapping[str, torch.Tensor] | None = None):
    """Parallelize ``model`` over ``groups`` and wrap it in a DeepSpeed engine with AdamW and the LR schedule.

    ``weights``: full plain-model weights by name to start from (a meta-device model only).
    """
    import deepspeed  # noqa: PLC0415

    check_precision(cfg.train.precision)
    from megascale.parallel.pipeline import install_coalesced_tied_reduction  # noqa: PLC0415

    ds_config = deepspeed_config(cfg, layout, device.type)
    zero3 = effective_zero_stage(cfg, layout.dp_cp) == 3
    module = parallelize(model, cfg, groups, device, weights, zero3_partitioner(ds_config, groups) if zero3 else None)
    optimizer, scheduler = build_optimizer(module, cfg, device)
    pipelined = groups.dims.pp > 1
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=None if pipelined else groups.grid,  # a PipelineModule brings its own grid
    )
    if pipelined:
        install_coalesced_tied_reduction(engine)
    if cfg.train.async_save:
        from megascale.train import async_save  # noqa: PLC0415

        async_save.install(engine)
    if effective_zero_stage(cfg, layout.dp_cp) == 0 and cfg.train.precision in FP32_STATE:
        clip_by_global_norm(engine, groups.tp_rank, groups.grid.get_model_parallel_group())
    if weights is not None and cfg.train.precision not in FP32_STATE:
        restore_fp32_masters(engine, weights)
    return engine


def holds_fp32_master(param: torch.nn.Parameter) -> bool:
    """True when DeepSpeed keeps the fp32 state of ``param`` in its own partitions (ZeRO 1-3, its BF16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def restore_fp32_masters(engine, weights: Mapping[str, torch.Tensor]) -> None:
    """Set the fp32 master copies DeepSpeed keeps of 16-bit weights from the full fp32 ``weights`` the engine
    was built from: it made them from the module's 16-bit values, so a run converted from another layout, or
    started from fp32 weights, would step from rounded ones."""
    from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415

    for p in filter(holds_fp32_master, engine.module.parameters()):
        if hasattr(p, "_hp_mapping") and p._hp_mapping is None:
            continue  # ZeRO 1-2: none of its fp32 partition is on this rank; skip reading its piece
        device = p.device if p.device.type != "meta" else torch.device("cpu")
        safe_set_full_fp32_param(p, piece_of(p, weights).to(device, torch.float32))


def zero3_partitioner(ds_config: dict[str, Any], groups):
    """A function that partitions one parameter over the data-parallel group, as ``deepspeed.zero.Init`` does.

    Given to ``materialize``: each parameter is split right after it is drawn, so a
    ZeRO-3 rank holds 1/dp of the model plus one whole tensor at most — the point of
    ZeRO-3 for a model that does not fit one device. DeepSpeed's engine then finds the
    parameters partitioned already and keeps them as they are.
    """
    import deepspeed  # noqa: PLC0415

    init = deepspeed.zero.Init(data_parallel_group=groups.dp_group, config_dict_or_path=ds_config, mpu=groups.grid)

    def partition(p: torch.nn.Parameter) -> None:
        # Inside `with zero.Init()` tensors are created in the training dtype; here they were drawn
        # in fp32, and DeepSpeed's engine never casts parameters that are partitioned already: without
        # this cast a bf16 ZeRO-3 run would hold, gather and compute with fp32 weights.
        if p.is_floating_point():
            p.data = p.data.to(init.dtype)
        init._convert_to_zero_parameters([p])  # Init(module=...) does this for a whole module

    return partition


def clip_by_global_norm(engine, tp_rank: int, model_group) -> None:
    """fp32 ZeRO-0: clip by the norm of the whole model's gradient, and keep it for ``get_global_grad_norm``.

    DeepSpeed's own clip at ZeRO-0 (``runtime.utils.clip_grad_norm_``) asks the grid for
    its "model-parallel rank", which for a ``PipelineParallelGrid`` is the rank among
    every stage and tensor rank: past the first stage it counts only tensor-sharded
    weights, and it counts a tied module on each stage that holds it. Two stages of the
    tiny model reported 1.07 where one process has 1.20, and clipped by it. ZeRO-1-3
    ask for the tensor rank instead and skip pipeline replicas, as ``counts_once``
    does here (no host read either). ``model_group``: every stage and tensor rank of
    this data-parallel replica.
    """

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        norm = global_grad_norm(params, tp_rank, model_group)
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        torch._foreach_mul_([p.grad for p in params], coef)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip


def counts_once(p: torch.nn.Parameter, tp_rank: int) -> bool:
    """Whether this rank's copy of ``p`` is the one that counts in the model's gradient norm: not a pipeline
    stage's replica of a tied module, and either a tensor-parallel shard or on tensor rank 0."""
    from deepspeed.runtime.constants import PIPE_REPLICATED  # noqa: PLC0415
    from deepspeed.runtime.utils import is_model_parallel_parameter  # noqa: PLC0415

    if getattr(p, PIPE_REPLICATED, False):
        return False
    return tp_rank == 0 or is_model_parallel_parameter(p)  # the marks ZeRO-1-3 read, by DeepSpeed's own test


def global_grad_norm(params: list[torch.nn.Parameter], tp_rank: int, model_group) -> torch.Tensor:
    """The L2 norm of the gradient of the whole model, each parameter counted once over ``model_group``."""
    import torch.distributed as dist  # noqa: PLC0415

    norms = [p.grad.detach().float().norm() for p in params if counts_once(p, tp_rank)]
    device = params[0].grad.device if params else torch.device("cpu")
    squares = torch.stack(norms).pow(2).sum() if norms else torch.zeros((), device=device)
    dist.all_reduce(squares, group=model_group)
    return squares.sqrt()
