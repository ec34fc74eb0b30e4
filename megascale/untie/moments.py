"""The Adam moments an untied copy starts with: ``untie.moments`` = copy | scale | probe.

A tied block's moments were built from Σg, the sum of its K units' gradients. After
the untie, a copy applied by a subset S of those units receives g_S = Σ_{i∈S} g_i.
Its moments should be those of g_S: exp_avg ≈ E[g_S], exp_avg_sq ≈ E[g_S²]. Each
policy gives, per new block, the factors (a, b) that turn the shared block's
(exp_avg, exp_avg_sq) into the copy's (a · exp_avg, b · exp_avg_sq):

* ``copy``: (1, 1). Adam's second moment decays slowly (1/(1 − β2) steps), so a copy
  whose gradient is a fraction of Σg makes smaller updates until it has caught up.
* ``scale``: a = k/K, b = (k/K)², k = |S|: exact when the units agree (g_i ≈ Σg/K);
  when they disagree, b starts low and the first updates run large.
* ``probe``: from the coherence probe's statistics (megascale/train/probe.py) over its
  last ``untie.coherence_probes`` probes, each normalised by ‖Σg‖² so that probes
  at different loss scales weigh the same. Per unit: pull p_i = ⟨g_i, Σg⟩/‖Σg‖²
  (Σ p_i = 1) and energy e_i = ‖g_i‖²/‖Σg‖². Then a = Σ_S p_i, exactly the share of
  Σg that g_S carries along Σg, and b = ‖g_S‖²/‖Σg‖²: Σ_S e_i plus cross terms
  ⟨g_i, g_j⟩/‖Σg‖² for i ≠ j in S. The probe measures no pair of units, so a cross
  term is taken as p_i · p_j, its part along Σg (the residuals orthogonal to Σg are
  taken as uncorrelated). Computed over whichever of S and its complement D is
  smaller (b = 1 − 2 Σ_D p_i + ‖g_D‖²/‖Σg‖²), so a copy of one unit, and the
  group left behind when one unit is freed, are exact. b is kept ≥ a² (Cauchy–Schwarz).

Blocks without a probe since their group last changed fall back to ``scale``.
The factors are whole-block: one (a, b) per block, from its 7 matrices' statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from megascale.model.sharing import SharingPlan, block_sources

POLICIES = ("copy", "scale", "probe")
B_FLOOR = 1e-8  # a unit whose gradient vanished: keep exp_avg_sq positive


@dataclass(frozen=True)
class UnitStats:
    """Mean over recent probes of one tie group's per-unit pull p_i and energy e_i (see the module doc)."""

    units: tuple[int, ...]
    pull: dict[int, float]
    energy: dict[int, float]
    probes: int


def mean_unit_stats(probes: Sequence[dict]) -> UnitStats | None:
    """``probes``: records {"units": [...], "pull": {"u": p}, "energy": {"u": e}} of one group (the controller's
    state: unit keys are strings, as JSON keeps them in checkpoints).

    Only the probes of the group's latest unit set count; None without any finite one.
    """
    if not probes:
        return None
    units = tuple(int(u) for u in probes[-1]["units"])
    usable = [p for p in probes if tuple(int(u) for u in p["units"]) == units and _finite(p)]
    if not usable:
        return None

    def mean(key: str) -> dict[int, float]:
        return {u: sum(p[key][str(u)] for p in usable) / len(usable) for u in units}

    return UnitStats(units, mean("pull"), mean("energy"), len(usable))


def _finite(probe: dict) -> bool:
    return all(math.isfinite(float(v)) for key in ("pull", "energy") for v in probe[key].values())


def probe_factors(stats: UnitStats, subset: Sequence[int]) -> tuple[float, float]:
    """(a, b) for a copy applied by ``subset`` of ``stats.units``."""
    s = set(subset)
    if not s <= set(stats.units):
        raise ValueError(f"units {sorted(s)} are not all in the probed group {list(stats.units)}")
    rest = [u for u in stats.units if u not in s]
    a = sum(stats.pull[u] for u in s)
    if len(s) <= len(rest):
        b = _sq_norm(stats, sorted(s))
    else:  # g_S = Σg − g_D
        b = 1.0 - 2.0 * sum(stats.pull[u] for u in rest) + _sq_norm(stats, rest)
    return a, max(b, a * a, B_FLOOR)


def _sq_norm(stats: UnitStats, units: list[int]) -> float:
    """‖Σ_{i∈units} g_i‖² / ‖Σg‖², cross terms along Σg only."""
    pulls = [stats.pull[u] for u in units]
    cross = sum(pulls) ** 2 - sum(p * p for p in pulls)
    return sum(stats.energy[u] for u in units) + cross


def block_factors(old: SharingPlan, new: SharingPlan, how: str,
                  stats: dict[int, UnitStats | None] | None = None) -> dict[int, tuple[float, float, str]]:
    """Per block of ``new`` whose factors are not (1, 1): (a, b, where they came from).

    ``stats``: per group of ``old``, the probe statistics (``how == "probe"``).
    """
    if how not in POLICIES:
        raise ValueError(f"untie.moments={how!r} is not one of {', '.join(POLICIES)}")
    if how == "copy":
        return {}
    out = {}
    for g, src in block_sources(old, new).items():
        subset, group = new.units_of(g), old.units_of(src)
        if len(subset) == len(group):
            continue  # still applied by every unit it was: its moments are its own
        probed = (stats or {}).get(src) if how == "probe" else None
        if probed is not None and set(probed.units) == set(group):
            out[g] = (*probe_factors(probed, subset), f"probe ({probed.probes})")
        else:
            k = len(subset) / len(group)
            out[g] = (k, k * k, "units" if how == "scale" else "units (no probe yet)")
    return out
