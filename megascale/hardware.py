"""Accelerators: dense bf16 peak throughput and memory, from the vendors' datasheets.

Two tables, one source of truth:

* ``GPUS`` — the planner's catalogue, looked up by name (``--gpu H100``);
* ``PEAK_TFLOPS`` — substrings of CUDA device names → peak, which the metrics
  use to compute MFU on the device a run actually got (first match wins, so
  "H200" comes before "H100").

Peaks are *dense* (no 2:4 sparsity), in TFLOP/s per device. V100 has no bf16;
its entry is the fp16 tensor-core peak.

The links are the planner's, for choosing a parallel layout, per GPU and in one
direction, in GB/s: ``link_gbs`` between GPUs of a node (NVLink, Infinity Fabric
or PCIe: half the vendor's bidirectional figure) and ``net_gbs`` between nodes,
the reference system's network over its GPUs (DGX: one 400 Gb/s NDR port a GPU
for Hopper and Blackwell, 200 Gb/s HDR for A100; AWS g5.48xlarge for A10G).
Clusters differ: ``launch/plan.py --net-gbs`` and ``--gpus-per-node`` override.
"""

from __future__ import annotations

from dataclasses import dataclass

from megascale.errors import MegascaleError


@dataclass(frozen=True)
class GPU:
    """One accelerator model."""

    name: str
    peak_tflops: float  # dense bf16 TFLOP/s per device
    memory_gib: float  # device memory
    note: str = ""
    link_gbs: float = 0.0  # GB/s one way per GPU inside a node (0: unknown)
    net_gbs: float = 0.0  # GB/s one way per GPU between nodes, the reference system's (0: unknown)
    gpus_per_node: int = 8

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("A100", 312.0, 80, "A100 SXM/PCIe 80 GB; NVLink 3, DGX A100 network", 300.0, 25.0),
        GPU("A100-40GB", 312.0, 40, "A100 40 GB; NVLink 3, DGX A100 network", 300.0, 25.0),
        GPU("H100", 989.0, 80, "H100 SXM5 80 GB; NVLink 4, DGX H100 network", 450.0, 50.0),
        GPU("H100-PCIE", 756.0, 80, "H100 PCIe 80 GB; PCIe 5 x16, a 200 Gb/s port a GPU", 64.0, 25.0),
        GPU("H200", 989.0, 141, "H200 SXM 141 GB; NVLink 4, DGX H200 network", 450.0, 50.0),
        GPU("B200", 2250.0, 180, "B200 (DGX B200: 180 GB per GPU); NVLink 5", 900.0, 50.0),
        GPU("L40S", 362.0, 48, "L40S 48 GB; PCIe 4 x16, a 200 Gb/s port a GPU", 32.0, 25.0),
        GPU("A10G", 125.0, 24, "A10G 24 GB (AWS g5.48xlarge: PCIe 4, 100 Gb/s a node of 8)", 32.0, 1.5625),
        GPU("MI300X", 1307.0, 192, "AMD Instinct MI300X 192 GB; Infinity Fabric, a 400 Gb/s port a GPU", 448.0, 50.0),
        GPU("V100", 125.0, 32, "V100 32 GB; fp16 tensor cores, no bf16; NVLink 2, DGX-1 network", 150.0, 6.25),
    )
}

_ALIASES = {"H100-SXM": "H100", "H100SXM": "H100", "H100-SXM5": "H100", "H100PCIE": "H100-PCIE", "A100-80GB": "A100"}

# CUDA device-name substring → dense bf16 peak (TFLOP/s), for MFU at run time.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe parts are lower — set metrics.peak_tflops for those
    "A100": 312.0,
    "B200": 2250.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "V100": 125.0,
}


def lookup_gpu(name: str) -> GPU:
    """The catalogue entry for ``name`` (case-insensitive, ``_`` or ``-``); one-line error otherwise."""
    key = str(name).strip().upper().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise MegascaleError(
            f"unknown GPU '{name}'; known: {', '.join(GPUS)} — or give its dense bf16 peak with --peak-tflops"
        )
    return GPUS[key]
