"""Measured memory: bytes held by live tensors, each storage counted once.

On CUDA the allocator has exact counters; on CPU there is none, so we walk the
live tensors (gc) and sum their distinct storages. Tied parameters share one
storage and are counted once — which is the point of measuring it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megascale.config import FP32_STATE


def live_tensor_bytes(device_type: str = "cpu") -> int:
    """Total bytes of the distinct storages of all live tensors on ``device_type``."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != device_type:
                continue
            storage = obj.untyped_storage()
        except (ReferenceError, RuntimeError):  # weakref proxies, tensors without storage
            continue
        if storage.data_ptr():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def saved_activation_bytes(model: torch.nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs, ``model``'s
    parameters left out: what a training forward keeps as activations (the planner's count is checked by it)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # activations only, each storage once
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())


# ------------------------------------------------------------ per-rank state accounting
#
# Bytes per *local* parameter (after tensor and pipeline splitting), with P the local
# parameter count, w the bytes of the training dtype (4 fp32, 2 bf16/fp16) and dp the
# data-parallel size:
#
#   weights    P·w            (ZeRO-3: P·w/dp — parameters are partitioned too)
#   gradients  P·w            held at the end of backward (ZeRO >= 1: P·w/dp — each rank keeps
#                             only its partition once the reduction is done; the full P·w is transient)
#   optimizer  P·(m + 8)/dp'  Adam's two fp32 moments plus an fp32 master copy m = 4 bytes
#                             (DeepSpeed keeps one whenever it partitions, even in fp32;
#                             plain fp32 ZeRO-0 has none), dp' = dp when partitioned, else 1.
#
# Which DeepSpeed optimizer holds the state decides what is partitioned (DeepSpeed 0.19,
# engine._do_optimizer_sanity_check):
#   ZeRO >= 1                   its ZeRO optimizer: master and moments partitioned over dp.
#   bf16/fp16 ZeRO-0            FP16_(Unfused)Optimizer: an fp32 copy of every parameter and
#                               its moments on every rank, dp' = 1.
#   bf16 ZeRO-0 in a pipeline   BF16_Optimizer: master and moments partitioned over dp, and a
#                               full fp32 gradient-accumulation buffer (gradients P·4).
# Flat buffers are padded to alignment, so measurement runs a little above the formula
# for tiny models.
#
# With the optimizer offloaded (train.offload_optimizer=cpu, ZeRO >= 1) the master copy,
# the moments and the master's gradient partition live in host memory (DeepSpeed's
# ZeRO-Offload): optimizer P·(12 + w)/dp — the extra w a staging buffer the updated
# weights are copied back through — and gradients P·4/dp, fp32 whatever the training
# precision, both on the host. The device keeps the weights and transient buckets.
# With the weights offloaded too (train.offload_params=cpu, ZeRO-3 only) the weight
# partition P·w/dp moves to the host as well: the bytes are the same, the device holds
# only the layers gathered for compute.


@dataclass(frozen=True)
class StateBytes:
    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def formula_state_bytes(local_params: int, precision: str, zero_stage: int, dp: int,
                        pipelined: bool = False, offload: bool = False) -> StateBytes:
    """This rank's weights, gradients and optimizer state in bytes (the table above); ``zero_stage`` as run."""
    if precision in FP32_STATE:  # bf16-autocast casts in the forward only: everything held is fp32
        precision = "fp32"
    w = 4 if precision == "fp32" else 2
    if offload:  # ZeRO-Offload: gradients and optimizer on the host, partitioned
        if zero_stage == 3:  # its gradient partitions and the master's fp32 gradient; no staging buffer
            return StateBytes(local_params * w / dp, local_params * (w + 4) / dp, local_params * 12 / dp)
        return StateBytes(local_params * w, local_params * 4 / dp, local_params * (12 + w) / dp)
    bf16_optimizer = precision == "bf16" and zero_stage == 0 and pipelined
    partitioned = zero_stage >= 1 or bf16_optimizer
    master = 0 if (precision == "fp32" and zero_stage == 0) else 4
    weights = local_params * w / (dp if zero_stage == 3 else 1)
    grads = local_params * (4 if bf16_optimizer else w) / (dp if zero_stage >= 1 else 1)
    optimizer = local_params * (master + 8) / (dp if partitioned else 1)
    return StateBytes(weights, grads, optimizer)


def _storage_bytes(tensors) -> dict[int, int]:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return seen


def _flat(items) -> list:
    out = []
    for item in items or []:
        out.extend(_flat(item) if isinstance(item, (list, tuple)) else [item])
    return out


def _weight_tensors(engine) -> list:
    return [getattr(p, "ds_tensor", p.data) for p in engine.module.parameters()]


def _optimizer_tensors(engine) -> list:
    zero = engine.optimizer
    base = getattr(zero, "optimizer", zero)
    tensors = [v for state in base.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    masters = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
               "fp32_groups", "fp32_groups_flat")  # ZeRO 1-2, ZeRO-3, BF16_Optimizer, FP16_(Unfused)Optimizer
    for name in (*masters, "param_buffer_of_bit16_for_cpu_offload_groups"):  # the last: ZeRO-Offload's staging
        tensors += _flat(getattr(zero, name, None))
    return tensors


def _master_grads(engine) -> list:
    """Gradients DeepSpeed keeps on its fp32 master partitions (ZeRO-Offload accumulates there, on the host)."""
    zero = engine.optimizer
    masters = _flat(getattr(zero, "single_partition_of_fp32_groups", None)) + _flat(getattr(zero, "fp32_partitioned_groups_flat", None))
    return [m.grad for m in masters if isinstance(m, torch.Tensor)]


def _grad_tensors(engine) -> list:
    zero = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters()]
    for name in ("grads_in_partition", "averaged_gradients", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"):
        value = getattr(zero, name, None)
        tensors += _flat(value.values() if isinstance(value, dict) else value)
    tensors += _flat(getattr(zero, "fp32_groups_gradient_flat_partition", None))
    return tensors + _master_grads(engine)


def measured_state_bytes(engine) -> StateBytes:
    """Bytes held by this rank's weights, gradient buffers and optimizer state, each storage once."""
    weights = _storage_bytes(_weight_tensors(engine))
    optimizer = {k: v for k, v in _storage_bytes(_optimizer_tensors(engine)).items() if k not in weights}
    grads = {k: v for k, v in _storage_bytes(_grad_tensors(engine)).items() if k not in weights and k not in optimizer}
    return StateBytes(sum(weights.values()), sum(grads.values()), sum(optimizer.values()))


def local_param_count(engine) -> int:
    """Parameters stored on this rank before ZeRO partitioning (ZeRO-3 keeps the full size in ds_numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
