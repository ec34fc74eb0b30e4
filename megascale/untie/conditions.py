"""When to untie: the ``untie.*`` config parsed into per-group rules, and the controller that checks them.

Pure Python (no torch): every rank feeds the controller the same numbers — the
data-parallel mean loss and the world-reduced probe statistics — so every rank
takes the same decision at the same step without a collective of its own.

Groups are those of the *configured* plan (``model.sharing``). After a partial
untie the units still tied keep answering to their original group id, so a
rule such as ``0=coherence`` goes on watching what is left of group 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megascale.errors import MegascaleError
from megascale.model.sharing import SharingPlan
from megascale.untie.moments import UnitStats, mean_unit_stats

KINDS = ("step", "tokens", "plateau", "coherence")


@dataclass(frozen=True)
class Condition:
    kind: str  # one of KINDS
    value: float = 0.0  # step count (step) or fraction of planned tokens (tokens)


@dataclass(frozen=True)
class Rule:
    group: int  # group id in the configured plan
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class UnitSelection:
    lowest: int = 0  # 0: every tied unit; k: the k units that align least with the group's gradient


@dataclass(frozen=True)
class Decision:
    group: int  # configured group id
    units: list[int]  # layers that get their own block
    reason: str


def parse_conditions(spec: str, where: str) -> tuple[Condition, ...]:
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        kind, _, raw = part.partition(":")
        if kind not in KINDS:
            raise MegascaleError(f"{where}: '{part}' is not a condition; use step:N, tokens:F, plateau or coherence")
        if kind in ("step", "tokens"):
            try:
                value = float(raw)
            except ValueError:
                raise MegascaleError(f"{where}: '{part}' needs a number, e.g. step:500 or tokens:0.5") from None
            if (kind == "step" and value < 1) or (kind == "tokens" and not 0 < value <= 1):
                raise MegascaleError(f"{where}: '{part}' out of range; step:N needs N >= 1, tokens:F needs 0 < F <= 1")
            out.append(Condition(kind, value))
        elif raw:
            raise MegascaleError(f"{where}: '{part}' takes no value; its settings are untie.{kind}_*")
        else:
            out.append(Condition(kind))
    return tuple(out)


def _group_ids(spec: str, n_groups: int, where: str) -> list[int]:
    if spec.strip() == "all":
        return list(range(n_groups))
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise MegascaleError(f"{where}='{spec}' must be all or a comma-separated list of group ids") from None
    bad = [g for g in ids if not 0 <= g < n_groups]
    if bad:
        raise MegascaleError(f"{where}: groups {bad} do not exist; model.sharing has groups 0..{n_groups - 1}")
    return ids


def _per_group(spec: str, n_groups: int) -> dict[int, tuple[Condition, ...]]:
    out: dict[int, tuple[Condition, ...]] = {}
    for item in (i.strip() for i in spec.split(";") if i.strip()):
        group, sep, conds = item.partition("=")
        if not sep:
            raise MegascaleError(f"untie.per_group: '{item}' is not of the form group=conditions, e.g. 0=coherence;1=step:200")
        for g in _group_ids(group, n_groups, "untie.per_group"):
            out[g] = parse_conditions(conds, f"untie.per_group[{g}]")
    return out


def parse_units(spec: str) -> UnitSelection:
    spec = spec.strip()
    if spec == "all":
        return UnitSelection()
    kind, _, raw = spec.partition(":")
    if kind == "lowest" and raw.isdigit() and int(raw) >= 1:
        return UnitSelection(int(raw))
    raise MegascaleError(f"untie.units='{spec}' must be all or lowest:k with k >= 1")


def parse_rules(cfg) -> tuple[list[Rule], UnitSelection]:
    """The per-group rules of ``cfg.untie`` (groups with a single unit are never tied, so get none)."""
    u = cfg.untie
    plan = SharingPlan.parse(cfg.model.sharing, cfg.model.n_layers)
    default = parse_conditions(u.when, "untie.when")
    override = _per_group(u.per_group, plan.n_groups)
    eligible = set(_group_ids(u.groups, plan.n_groups, "untie.groups")) | set(override)
    rules = [Rule(g, override.get(g, default)) for g in sorted(eligible)]
    rules = [r for r in rules if r.conditions and len(plan.units_of(r.group)) > 1]
    units = parse_units(u.units)
    kinds = {c.kind for r in rules for c in r.conditions}
    reads_probes = "coherence" in kinds or units.lowest or (rules and u.moments == "probe")
    if reads_probes and u.probe_every <= 0:
        raise MegascaleError("untie: coherence, units=lowest:k and moments=probe read gradient probes; "
                             "set untie.probe_every > 0 (e.g. 10)")
    if u.plateau_window < 1 or not 0 <= u.plateau_smoothing < 1 or u.coherence_probes < 1:
        raise MegascaleError("untie: plateau_window and coherence_probes must be >= 1 and plateau_smoothing in [0, 1)")
    return rules, units


@dataclass
class ControllerState:
    """Everything the controller remembers; saved in megascale.json so a resume decides identically."""

    ema: float | None = None
    history: list[list[float]] = field(default_factory=list)  # [step, smoothed loss]
    low_probes: dict[str, int] = field(default_factory=dict)  # group → consecutive probes below threshold
    alignment: dict[str, dict[str, float]] = field(default_factory=dict)  # group → {unit: cosine}, last probe
    fired: list[list[Any]] = field(default_factory=list)  # [group, condition kind]
    # group → its last coherence_probes probes' per-unit pull and energy (untie.moments=probe)
    unit_probes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class UntieController:
    """Checks the rules after every step and says which units to untie, and why."""

    def __init__(self, cfg, planned_tokens: int):
        self.cfg = cfg.untie
        self.rules, self.selection = parse_rules(cfg)
        self.base = SharingPlan.parse(cfg.model.sharing, cfg.model.n_layers)
        self.planned_tokens = planned_tokens
        self.state = ControllerState()

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def probe_due(self, step: int) -> bool:
        """Whether the step about to run (``step``) captures per-unit gradients."""
        return self.active and self.cfg.probe_every > 0 and step % self.cfg.probe_every == 0

    # -------------------------------------------------------- observations

    def observe_loss(self, step: int, loss: float) -> None:
        s, beta = self.state, self.cfg.plateau_smoothing
        s.ema = loss if s.ema is None else beta * s.ema + (1 - beta) * loss
        s.history.append([step, s.ema])
        # Keep what the window can still reach (plus the entry just before it).
        horizon = step - self.cfg.plateau_window
        while len(s.history) > 2 and s.history[1][0] <= horizon:
            s.history.pop(0)

    def observe_probe(self, plan: SharingPlan, groups: dict[int, dict[str, Any]]) -> None:
        """Probe statistics keyed by *current* group: {"rho": float, "alignment": {layer: cosine}}."""
        for current, stats in groups.items():
            units = plan.units_of(current)
            if len(units) < 2:
                continue
            g = str(self.base.group_of[units[0]])
            low = stats["rho"] < self.cfg.coherence_threshold
            self.state.low_probes[g] = self.state.low_probes.get(g, 0) + 1 if low else 0
            self.state.alignment[g] = {str(u): float(c) for u, c in stats["alignment"].items()}
            if "pull" in stats:
                recent = self.state.unit_probes.setdefault(g, [])
                recent.append({"units": list(units), **{k: {str(u): float(v) for u, v in stats[k].items()}
                                                       for k in ("pull", "energy")}})
                del recent[:-self.cfg.coherence_probes]

    def unit_stats(self, plan: SharingPlan) -> dict[int, UnitStats | None]:
        """Per group of ``plan`` (≥ 2 units): the mean of its recent probes' per-unit statistics."""
        out = {}
        for group in range(plan.n_groups):
            units = plan.units_of(group)
            if len(units) > 1:
                out[group] = mean_unit_stats(self.state.unit_probes.get(str(self.base.group_of[units[0]]), []))
        return out

    # -------------------------------------------------------- decisions

    def tied_units(self, plan: SharingPlan, group: int) -> list[int]:
        """Units of configured ``group`` that still share a block with another unit."""
        return [u for u in self.base.units_of(group) if len(plan.units_of(plan.group_of[u])) > 1]

    def decide(self, step: int, tokens: int, plan: SharingPlan) -> list[Decision]:
        if not self.active or step < self.cfg.min_step:
            return []
        decisions = []
        for rule in self.rules:
            tied = self.tied_units(plan, rule.group)
            if len(tied) < 2:
                continue
            for cond in rule.conditions:
                if [rule.group, cond.kind] in self.state.fired:
                    continue
                why = self._holds(cond, rule.group, step, tokens)
                if why:
                    self.state.fired.append([rule.group, cond.kind])
                    self.state.low_probes.pop(str(rule.group), None)
                    decisions.append(Decision(rule.group, *self._select(rule.group, tied, why)))
                    break
        return decisions

    def _holds(self, cond: Condition, group: int, step: int, tokens: int) -> str:
        c = self.cfg
        if cond.kind == "step" and step >= cond.value:
            return f"step {step} >= {int(cond.value)}"
        if cond.kind == "tokens" and tokens >= cond.value * self.planned_tokens:
            return f"{tokens:,} tokens >= {cond.value:g} of the planned {self.planned_tokens:,}"
        if cond.kind == "plateau":
            return self._plateau(step)
        if cond.kind == "coherence" and self.state.low_probes.get(str(group), 0) >= c.coherence_probes:
            return f"coherence below {c.coherence_threshold:g} for {c.coherence_probes} probes"
        return ""

    def _plateau(self, step: int) -> str:
        s, c = self.state, self.cfg
        old = [(st, v) for st, v in s.history if st <= step - c.plateau_window]
        if not old or s.ema is None:
            return ""
        _, before = old[-1]
        improvement = (before - s.ema) / abs(before) if before else 0.0
        if improvement < c.plateau_threshold:
            return f"smoothed loss improved {improvement:.2%} < {c.plateau_threshold:.2%} over {c.plateau_window} steps"
        return ""

    def _select(self, group: int, tied: list[int], why: str) -> tuple[list[int], str]:
        k = self.selection.lowest
        if not k or k >= len(tied):
            return tied, why
        cos = self.state.alignment.get(str(group), {})
        if not all(str(u) in cos for u in tied):
            return tied, why + "; no probe yet, so the whole group"
        chosen = sorted(tied, key=lambda u: cos[str(u)])[:k]
        detail = ", ".join(f"unit {u} {cos[str(u)]:+.2f}" for u in chosen)
        return sorted(chosen), f"{why}; least aligned: {detail}"

    # -------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        return {"ema": s.ema, "history": s.history, "low_probes": s.low_probes, "alignment": s.alignment, "fired": s.fired,
                "unit_probes": s.unit_probes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = ControllerState(**state)
