"""Sharing plans: which transformer layers apply which stored block.

For L layers a plan is a list ``group_of[layer]``. Layers with the same group
apply one block — one storage for weights, gradients and optimizer state.
FLOPs follow the L *applied* blocks; memory follows the G *unique* ones.

Named strategies (DESIGN.md, "Ties and unties"):

* ``none``        every layer its own block (G = L)
* ``all``         one block applied L times (G = 1)
* ``cycle:k``     layer i → group i mod k  (ALBERT-style repetition of a k-block stack)
* ``sequence:k``  k consecutive runs of L/k layers each share a block
* ``0,1,0,2``     an explicit list, renumbered by first appearance
"""

from __future__ import annotations

from dataclasses import dataclass

from megascale.errors import MegascaleError


@dataclass(frozen=True)
class SharingPlan:
    """An immutable layer → tie-group map."""

    group_of: tuple[int, ...]
    spec: str = "none"

    @classmethod
    def parse(cls, spec: str, n_layers: int) -> "SharingPlan":
        """Build the plan for ``n_layers`` from a strategy string."""
        spec = str(spec).strip()
        if spec == "none":
            groups = list(range(n_layers))
        elif spec == "all":
            groups = [0] * n_layers
        elif spec.startswith(("cycle:", "sequence:")):
            groups = _strided(spec, n_layers)
        else:
            groups = _explicit(spec, n_layers)
        return cls(tuple(_renumber(groups)), spec)

    @property
    def n_layers(self) -> int:
        return len(self.group_of)

    @property
    def n_groups(self) -> int:
        return max(self.group_of) + 1

    def units_of(self, group: int) -> list[int]:
        """The layers (model units) that apply ``group``'s block."""
        return [layer for layer, g in enumerate(self.group_of) if g == group]

    def describe(self) -> str:
        runs = ", ".join(f"g{g}:{self.units_of(g)}" for g in range(self.n_groups))
        return f"{self.spec} ({self.n_groups} unique blocks for {self.n_layers} layers: {runs})"

    def to_list(self) -> list[int]:
        return list(self.group_of)


def _strided(spec: str, n_layers: int) -> list[int]:
    kind, _, raw = spec.partition(":")
    try:
        k = int(raw)
    except ValueError:
        raise MegascaleError(f"model.sharing='{spec}': '{raw}' is not an integer; write e.g. {kind}:2") from None
    if not 1 <= k <= n_layers:
        raise MegascaleError(f"model.sharing='{spec}': k={k} must be between 1 and model.n_layers={n_layers}")
    if kind == "cycle":
        return [i % k for i in range(n_layers)]
    if n_layers % k:
        raise MegascaleError(f"model.sharing='{spec}': k={k} does not divide model.n_layers={n_layers}; pick a divisor")
    run = n_layers // k
    return [i // run for i in range(n_layers)]


def _explicit(spec: str, n_layers: int) -> list[int]:
    try:
        groups = [int(x) for x in spec.replace(" ", "").strip("[]").split(",") if x != ""]
    except ValueError:
        raise MegascaleError(
            f"model.sharing='{spec}' is not none, all, cycle:k, sequence:k or a comma-separated list of group ids"
        ) from None
    if len(groups) != n_layers or min(groups, default=0) < 0:
        raise MegascaleError(
            f"model.sharing lists {len(groups)} group ids but model.n_layers={n_layers}; give one non-negative id per layer"
        )
    return groups


def _renumber(groups: list[int]) -> list[int]:
    """Renumber group ids 0..G-1 in order of first appearance, so plans compare by structure."""
    first: dict[int, int] = {}
    return [first.setdefault(g, len(first)) for g in groups]


# ------------------------------------------------------------ untying


def untie_units(plan: SharingPlan, units: list[int]) -> SharingPlan:
    """The plan after giving each of ``units`` (layer indices) its own block.

    The remaining units of each group stay tied; a unit that is already alone is
    left as it is. Group ids are renumbered by first appearance so the new plan reads
    back identically through ``SharingPlan.parse`` (checkpoints and fine-tuning
    rebuild models from the plan list); ``block_sources`` says which old block
    each new one starts from.
    """
    groups = list(plan.group_of)
    bad = [u for u in units if not 0 <= u < plan.n_layers]
    if bad:
        raise MegascaleError(f"cannot untie units {bad}: the model has layers 0..{plan.n_layers - 1}")
    fresh = plan.n_groups
    for unit in sorted(set(units)):
        if len(plan.units_of(plan.group_of[unit])) > 1:
            groups[unit] = fresh  # a new group of one: its own block
            fresh += 1
    renumbered = _renumber(groups)
    return SharingPlan(tuple(renumbered), ",".join(map(str, renumbered)))


def block_sources(old: SharingPlan, new: SharingPlan) -> dict[int, int]:
    """For each group of ``new``, the group of ``old`` whose block its weights come from.

    Untying only splits groups, so all units of a new group came from one old group.
    """
    if old.n_layers != new.n_layers:
        raise MegascaleError(f"sharing plans for {old.n_layers} and {new.n_layers} layers cannot be compared")
    sources: dict[int, int] = {}
    for layer, g in enumerate(new.group_of):
        src = old.group_of[layer]
        if sources.setdefault(g, src) != src:
            raise MegascaleError(f"plan {new.to_list()} merges groups of {old.to_list()}: untying can only split groups")
    return sources


def replay_untie_history(plan: SharingPlan, history: list[dict]) -> SharingPlan:
    """The plan after the untie events recorded in a checkpoint's ``untie_history``, in order."""
    for event in history:
        plan = untie_units(plan, list(event["units"]))
    return plan
