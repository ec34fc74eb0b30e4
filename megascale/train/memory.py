"""Measured memory: bytes held by live tensors, each storage counted once.

On CUDA the allocator has exact counters; on CPU there is none, so we walk the
live tensors (gc) and sum their distinct storages. Tied parameters share one
storage and are counted once — which is the point of measuring it.
"""

from __future__ import annotations

import gc

import torch


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
