"""The plain-PyTorch model and its sharing plan (no DeepSpeed here)."""

from megascale.model.llama import ParamCounts, Transformer
from megascale.model.sharing import SharingPlan

__all__ = ["ParamCounts", "SharingPlan", "Transformer"]
