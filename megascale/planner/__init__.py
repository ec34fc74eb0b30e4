"""The compute planner (seed 3, the Chinchilla allocation mapping).

budget (FLOPs, or GPUs × hours × peak × MFU) → ``mappings`` (N_opt, D_opt) →
``shapes`` (a Llama shape within 2% of N_opt) → ``plan`` (tokens under a stated
FLOPs model, batch, steps, LR, ZeRO stage, memory, time, a config that
``launch/pretrain.py`` runs) — and back: ``sweep`` writes IsoFLOP sweeps,
``fit`` fits approaches 2 and 3 to their runs, ``plot`` draws the IsoFLOP figure.
"""

from megascale.planner.fit import FitReport, RunPoint, collect_runs, fit_runs
from megascale.planner.mappings import (
    DEFAULT_MAPPING,
    PUBLISHED,
    Allocation,
    Mapping,
    ModelScaleMapping,
    ParametricMapping,
    PowerLawMapping,
    get_mapping,
)
from megascale.planner.plan import Budget, Plan, make_budget, make_plan, plan_config, write_config
from megascale.planner.shapes import Shape, count, solve_shape
from megascale.planner.sweep import PRESETS, SweepSettings, plan_sweep, write_sweep

__all__ = [
    "DEFAULT_MAPPING", "PRESETS", "PUBLISHED", "Allocation", "Budget", "FitReport", "Mapping", "ModelScaleMapping",
    "ParametricMapping", "Plan", "PowerLawMapping", "RunPoint", "Shape", "SweepSettings", "collect_runs", "count",
    "fit_runs", "get_mapping", "make_budget", "make_plan", "plan_config", "plan_sweep", "solve_shape", "write_config",
    "write_sweep",
]
