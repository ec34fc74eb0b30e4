"""Fit an allocation mapping to your own runs (Chinchilla approaches 2 and 3).

Input: megascale run directories (``metrics.jsonl``) or a CSV of N, D, loss.
For every run:

* **N** = applied parameters, embeddings included (``params_applied``: what
  Chinchilla counts; with tied blocks, compute-side parameters);
* **D** = tokens trained (``tokens`` of the last record);
* **loss** = the final validation loss, or — without validation — the mean of
  the last 5 logged training losses;
* **C** = ``flops_per_token × D`` (the trainer's exact count, default) or 6·N·D.

Approach 2 (IsoFLOP profiles): runs are grouped by budget (C within 25%); per
budget a parabola in ln N is fitted to the losses and its vertex is N_opt(C)
(likewise D_opt from a parabola in ln D); then ln N_opt = ln G + a·ln C by least
squares.

Approach 3 (parametric loss), as in Hoffmann et al. 2022 (section 3.3, D.2):
minimise Σ Huber_δ(LSE(a − α·ln N, b − β·ln D, e) − ln L) with δ = 1e-3 over
(a, b, e, α, β), A = e^a, B = e^b, E = e^e, by L-BFGS from the paper's grid of
initialisations (α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25}:
4,500 points). The objective is evaluated at every grid point and L-BFGS runs
from the best ``starts`` of them (all of them with ``starts=0``). The Huber
losses are *summed*, not averaged: Besiroglu et al. 2024 traced the original
fit's premature stop to averaging (a ~400× smaller objective under the same
tolerances).

Budgets whose parabola vertex lies outside their sampled sizes are reported but
left out of the power law whenever 2+ other budgets have an interior minimum.

Confidence intervals: percentile bootstrap (2.5–97.5%) — of the parabolas'
residuals (sizes kept) for approach 2, of the runs for approach 3 (re-fitted
from the full-data optimum, as Besiroglu et al. do).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megascale.errors import MegascaleError
from megascale.planner.mappings import PARAMS, ParametricMapping, PowerLawMapping, sci

log = logging.getLogger(__name__)

MIN_RUNS = 6  # approach 3 has 5 parameters
BUDGET_TOLERANCE = 1.25  # runs whose C differ by less than 25% share a budget
HUBER_DELTA = 1e-3
SMOOTH_LAST = 5
GOOD_RMS = 0.03  # approach 3 is preferred when its rms error in ln L is below this


@dataclass(frozen=True)
class RunPoint:
    """One finished run: (N, D, C, loss)."""

    name: str
    params: float
    tokens: float
    flops: float
    loss: float
    loss_source: str = "val"  # val | train (mean of the last logged losses) | csv


# ------------------------------------------------------------------ reading runs


def collect_runs(paths: list[str | Path], flops_model: str = "exact") -> tuple[list[RunPoint], list[str]]:
    """Read run directories (searched recursively for metrics.jsonl) and CSV files; (points, notes)."""
    points, notes = [], []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() == ".csv":
            points += read_csv(path, flops_model, notes)
        elif path.is_file() and path.name == "metrics.jsonl":
            _add_run(path.parent, flops_model, points, notes)
        elif path.is_dir():
            found = sorted(path.rglob("metrics.jsonl"))
            if not found:
                raise MegascaleError(f"no metrics.jsonl under '{path}'; pass megascale run directories (train.out_dir) or a CSV with columns N, D, loss")
            for metrics in found:
                _add_run(metrics.parent, flops_model, points, notes)
        else:
            raise MegascaleError(f"'{path}' is neither a run directory nor a .csv file; pass run directories or a CSV with columns N, D, loss")
    return points, notes


def _add_run(run_dir: Path, flops_model: str, points: list[RunPoint], notes: list[str]) -> None:
    try:
        point = read_run(run_dir, flops_model)
    except _Skip as why:
        notes.append(f"skipped {run_dir}: {why}")
        return
    points.append(point)


class _Skip(Exception):
    pass


def read_run(run_dir: Path, flops_model: str = "exact") -> RunPoint:
    """The (N, D, C, loss) of one finished megascale run."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    starts = [r for r in records if r.get("event") == "start"]
    if not starts:
        raise _Skip("metrics.jsonl has no start record")
    start = starts[-1]
    steps = [r for r in records if "loss" in r and r.get("loss") is not None]
    evals = [r for r in records if r.get("val_loss") is not None]
    planned = _planned_steps(run_dir)
    last_step = max([r["step"] for r in steps + evals], default=0)
    if planned is not None and last_step < planned:
        raise _Skip(f"unfinished ({last_step} of {planned} steps)")
    if evals:
        tokens, loss, source = evals[-1]["tokens"], evals[-1]["val_loss"], "val"
    elif steps:
        tail = steps[-SMOOTH_LAST:]
        tokens, loss, source = steps[-1]["tokens"], float(np.mean([r["loss"] for r in tail])), "train"
    else:
        raise _Skip("no losses logged")
    if not tokens:
        raise _Skip("no tokens trained")
    n = float(start["params_applied"])
    c = float(start["flops_per_token"]) * tokens if flops_model == "exact" else 6.0 * n * tokens
    return RunPoint(run_dir.name, n, float(tokens), c, float(loss), source)


def _planned_steps(run_dir: Path) -> int | None:
    """train.max_steps from the latest checkpoint's megascale.json, when there is one."""
    root = run_dir / "checkpoints"
    try:
        tag = (root / "latest").read_text().strip()
        meta = json.loads((root / tag / "megascale.json").read_text())
        return int(meta["config"]["train"]["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_COLUMNS = {"params": ("n", "params", "parameters"), "tokens": ("d", "tokens"), "loss": ("loss", "l", "val_loss"),
            "flops": ("c", "flops", "compute")}


def read_csv(path: Path, flops_model: str, notes: list[str]) -> list[RunPoint]:
    """Rows of N, D, loss (and optionally C) — header names case-insensitive: N|params, D|tokens, loss|L, C|flops."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise MegascaleError(f"CSV '{path}' has no rows; it needs a header N,D,loss and one row per run")
    header = {k.strip().lower(): k for k in rows[0] if k}
    cols = {}
    for key, names in _COLUMNS.items():
        cols[key] = next((header[n] for n in names if n in header), None)
    missing = [k for k in ("params", "tokens", "loss") if cols[k] is None]
    if missing:
        raise MegascaleError(f"CSV '{path}' lacks a column for {', '.join(missing)}; expected a header like N,D,loss[,C]")
    if flops_model == "exact" and cols["flops"] is None:
        notes.append(f"{path.name}: no C column, so C = 6ND")
    points = []
    for i, row in enumerate(rows, start=2):
        try:
            n, d, loss = (float(row[cols[k]]) for k in ("params", "tokens", "loss"))
            c = float(row[cols["flops"]]) if cols["flops"] and flops_model == "exact" else 6.0 * n * d
        except (TypeError, ValueError):
            raise MegascaleError(f"CSV '{path}' line {i}: N, D, loss (and C) must be numbers") from None
        if min(n, d, loss, c) <= 0:
            raise MegascaleError(f"CSV '{path}' line {i}: N, D, loss and C must be positive")
        points.append(RunPoint(f"{path.stem}:{i}", n, d, c, loss, "csv"))
    return points


# ------------------------------------------------------------------ budgets


def group_by_budget(points: list[RunPoint], tolerance: float = BUDGET_TOLERANCE) -> list[list[RunPoint]]:
    """Runs sorted by C, split where C jumps by more than ``tolerance`` × the group's first C."""
    groups: list[list[RunPoint]] = []
    for p in sorted(points, key=lambda p: p.flops):
        if groups and p.flops <= groups[-1][0].flops * tolerance:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def budget_of(group: list[RunPoint]) -> float:
    return float(np.exp(np.mean([math.log(p.flops) for p in group])))


def check_fit_input(points: list[RunPoint]) -> list[list[RunPoint]]:
    if len(points) < MIN_RUNS:
        raise MegascaleError(
            f"a fit needs at least {MIN_RUNS} finished runs, found {len(points)}; run an IsoFLOP sweep "
            f"(`launch/plan.py sweep`: 3+ sizes at each of 2+ budgets)"
        )
    groups = group_by_budget(points)
    if len(groups) < 2:
        raise MegascaleError(
            f"all {len(points)} runs are at one budget (C ≈ {sci(budget_of(groups[0]))} FLOPs); scaling exponents need "
            f"runs at 2+ budgets (`launch/plan.py sweep --budgets C1,C2,...`)"
        )
    return groups


# ------------------------------------------------------------------ approach 2


@dataclass
class IsoFLOP:
    """One budget's parabola fit: loss ≈ p2·x² + p1·x + p0 with x = ln N."""

    flops: float
    points: list[RunPoint]
    coeffs: tuple[float, float, float] | None  # (p2, p1, p0), None when no minimum
    params_opt: float | None = None
    tokens_opt: float | None = None
    loss_opt: float | None = None
    inside: bool = True  # the vertex lies within the sampled sizes


def fit_isoflop(group: list[RunPoint]) -> IsoFLOP:
    iso = IsoFLOP(budget_of(group), group, None)
    x = np.log([p.params for p in group])
    if len(np.unique(np.round(x, 6))) < 3:
        return iso
    y = np.array([p.loss for p in group])
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        return iso
    x_opt = -p1 / (2 * p2)
    xd = np.log([p.tokens for p in group])
    q2, q1, _ = np.polyfit(xd, y, 2)
    iso.coeffs = (float(p2), float(p1), float(p0))
    iso.params_opt = float(math.exp(x_opt))
    iso.tokens_opt = float(math.exp(-q1 / (2 * q2))) if q2 > 0 else iso.flops / (6 * iso.params_opt)
    iso.loss_opt = float(p0 + p1 * x_opt + p2 * x_opt**2)
    iso.inside = bool(x.min() <= x_opt <= x.max())
    return iso


def _power_law(flops: list[float], values: list[float]) -> tuple[float, float]:
    """(exponent, ln coefficient) of values = k·C^exponent by least squares in log-log."""
    slope, intercept = np.polyfit(np.log(flops), np.log(values), 1)
    return float(slope), float(intercept)


@dataclass
class Approach2:
    isoflops: list[IsoFLOP]
    a: float
    ln_g: float
    b: float
    ln_h: float
    reference_flops: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_samples: int = 0

    def params_opt(self, flops: float) -> float:
        return math.exp(self.ln_g + self.a * math.log(flops))

    def mapping(self, name: str = "fit-approach2", flops_model: str = "exact") -> PowerLawMapping:
        return PowerLawMapping(
            name, "IsoFLOP fit of your runs (Chinchilla approach 2)",
            f"launch/plan.py fit: parabolas in ln N per budget, power law over {len(self.used)} budgets; C = {flops_model}",
            param_count=PARAMS, a=self.a, anchor_flops=self.reference_flops, anchor_params=self.params_opt(self.reference_flops),
            extra={"fitted": True, "approach": 2, "b": self.b, "D_coefficient": math.exp(self.ln_h),
                   "flops_model": flops_model, "ci95": self.ci, "bootstrap_samples": self.bootstrap_samples},
        )

    @property
    def valid(self) -> list[IsoFLOP]:
        return [i for i in self.isoflops if i.params_opt is not None]

    @property
    def used(self) -> list[IsoFLOP]:
        """The budgets the power law goes through."""
        return _usable(self.isoflops)


def fit_approach2(groups: list[list[RunPoint]], bootstrap: int = 100, seed: int = 0) -> Approach2 | None:
    """Parabola per budget, then power laws; None when fewer than 2 budgets have a minimum."""
    isoflops = [fit_isoflop(g) for g in groups]
    fit = _approach2_from(isoflops)
    if fit is None:
        return None
    fit.isoflops = isoflops
    fit.ci, fit.bootstrap_samples = _bootstrap_approach2(groups, fit.reference_flops, bootstrap, seed)
    return fit


def _approach2_from(isoflops: list[IsoFLOP]) -> Approach2 | None:
    """Power laws through the budgets' optima — only those inside their sampled sizes when 2+ are."""
    usable = _usable(isoflops)
    if len(usable) < 2:
        return None
    c = [i.flops for i in usable]
    a, ln_g = _power_law(c, [i.params_opt for i in usable])
    b, ln_h = _power_law(c, [i.tokens_opt for i in usable])
    ref = float(np.exp(np.mean(np.log(c))))
    return Approach2(isoflops, a, ln_g, b, ln_h, ref)


def _usable(isoflops: list[IsoFLOP]) -> list[IsoFLOP]:
    """Budgets with a minimum; an extrapolated one (outside the sampled sizes) only if fewer than 2 are inside."""
    valid = [i for i in isoflops if i.params_opt is not None]
    inside = [i for i in valid if i.inside]
    return inside if len(inside) >= 2 else valid


def _bootstrap_approach2(groups, ref: float, samples: int, seed: int) -> tuple[dict[str, tuple[float, float]], int]:
    """Residual bootstrap: the sizes of each budget stay, the parabola's residuals are resampled.

    With 4-6 runs a budget, resampling the runs themselves often leaves three nearly equal
    sizes and a vertex anywhere; keeping the design fixed measures the noise of the losses.
    """
    rng = np.random.default_rng(seed)
    fits = [fit_isoflop(g) for g in groups]
    draws: dict[str, list[float]] = {"a": [], "b": [], "params_opt_ref": []}
    for _ in range(samples):
        fit = _approach2_from([fit_isoflop(_resampled_losses(g, iso, rng)) for g, iso in zip(groups, fits)])
        if fit is None:
            continue
        draws["a"].append(fit.a)
        draws["b"].append(fit.b)
        draws["params_opt_ref"].append(fit.params_opt(ref))
    return _percentiles(draws), len(draws["a"])


def _resampled_losses(group: list[RunPoint], iso: IsoFLOP, rng) -> list[RunPoint]:
    if iso.coeffs is None:
        return group
    p2, p1, p0 = iso.coeffs
    x = np.log([p.params for p in group])
    fitted = p2 * x * x + p1 * x + p0
    resid = np.array([p.loss for p in group]) - fitted
    resid *= math.sqrt(len(group) / max(1, len(group) - 3))  # degrees of freedom of a 3-parameter fit
    new = fitted + rng.choice(resid, size=len(group), replace=True)
    return [RunPoint(p.name, p.params, p.tokens, p.flops, float(y), p.loss_source) for p, y in zip(group, new)]


def _percentiles(draws: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items() if len(v) >= 10}


# ------------------------------------------------------------------ approach 3


PAPER_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}


@dataclass
class Approach3:
    E: float  # noqa: N815
    A: float  # noqa: N815
    B: float  # noqa: N815
    alpha: float
    beta: float
    objective: float
    rms_log_residual: float
    starts: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_samples: int = 0

    def mapping(self, name: str = "fit-approach3", flops_model: str = "exact") -> ParametricMapping:
        return ParametricMapping(
            name, "parametric-loss fit of your runs (Chinchilla approach 3)",
            f"launch/plan.py fit: Huber (delta={HUBER_DELTA:g}) on ln L, L-BFGS from the paper's grid; C = {flops_model}; "
            f"N_opt in closed form under C = 6ND",
            param_count=PARAMS, E=self.E, A=self.A, B=self.B, alpha=self.alpha, beta=self.beta,
            extra={"fitted": True, "approach": 3, "a": self.beta / (self.alpha + self.beta), "flops_model": flops_model,
                   "huber_objective": self.objective, "rms_log_residual": self.rms_log_residual,
                   "ci95": self.ci, "bootstrap_samples": self.bootstrap_samples},
        )


def _objective(theta, ln_n, ln_d, ln_l, delta: float):
    """Summed Huber loss of ln L against LSE(a - α ln N, b - β ln D, e), for a batch of θ = (a, b, e, α, β)."""
    import torch  # noqa: PLC0415 (torch only when fitting)

    a, b, e, alpha, beta = (theta[..., i : i + 1] for i in range(5))
    pred = torch.logsumexp(torch.stack(torch.broadcast_tensors(a - alpha * ln_n, b - beta * ln_d, e)), dim=0)
    r = pred - ln_l
    huber = torch.where(r.abs() <= delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta))
    return huber.sum(-1)


def _lbfgs(theta0, data, delta: float):
    import torch  # noqa: PLC0415

    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    # Tolerances far below torch's defaults (1e-7, 1e-9): with δ = 1e-3 the summed objective is ~1e-4 and
    # its gradients ~1e-3, so the defaults stop tens of iterations early, far from the optimum.
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=1000, max_eval=2000, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _objective(theta, *data, delta)
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        value = float(_objective(theta, *data, delta))
    return theta.detach().numpy().copy(), value


def _tensors(points: list[RunPoint]):
    import torch  # noqa: PLC0415

    def t(values):
        return torch.tensor(np.log(values), dtype=torch.float64)

    return t([p.params for p in points]), t([p.tokens for p in points]), t([p.loss for p in points])


def _grid() -> np.ndarray:
    g = PAPER_GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), dtype=np.float64)


def _fit_parametric(points: list[RunPoint], starts: int, delta: float) -> tuple[np.ndarray, float]:
    import torch  # noqa: PLC0415

    data = _tensors(points)
    grid = _grid()
    with torch.no_grad():
        values = _objective(torch.from_numpy(grid), *data, delta).numpy()
    order = np.argsort(values, kind="stable")
    chosen = grid[order if starts <= 0 else order[:starts]]
    best_theta, best_value = None, math.inf
    for theta0 in chosen:
        theta, value = _lbfgs(theta0, data, delta)
        if np.all(np.isfinite(theta)) and value < best_value:
            best_theta, best_value = theta, value
    return best_theta, best_value


def fit_approach3(points: list[RunPoint], bootstrap: int = 100, seed: int = 0, starts: int = 16,
                  delta: float = HUBER_DELTA) -> Approach3 | None:
    """Hoffmann et al.'s parametric fit; None when it does not find positive exponents."""
    theta, value = _fit_parametric(points, starts, delta)
    if theta is None:
        return None
    a, b, e, alpha, beta = (float(v) for v in theta)
    if alpha <= 0 or beta <= 0:
        log.warning("approach 3 found non-positive exponents (alpha=%.3g, beta=%.3g): no finite optimum", alpha, beta)
        return None
    resid = _log_residuals(theta, points)
    fit = Approach3(math.exp(e), math.exp(a), math.exp(b), alpha, beta, value, float(np.sqrt(np.mean(resid**2))),
                    starts if starts > 0 else len(_grid()))
    fit.ci, fit.bootstrap_samples = _bootstrap_approach3(points, theta, bootstrap, seed, delta)
    return fit


def _log_residuals(theta: np.ndarray, points: list[RunPoint]) -> np.ndarray:
    a, b, e, alpha, beta = theta
    ln_n, ln_d = np.log([p.params for p in points]), np.log([p.tokens for p in points])
    pred = np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)
    return pred - np.log([p.loss for p in points])


def _bootstrap_approach3(points, theta, samples: int, seed: int, delta: float):
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in ("E", "A", "B", "alpha", "beta", "a")}
    for _ in range(samples):
        sample = [points[i] for i in rng.integers(0, len(points), len(points))]
        th, _ = _lbfgs(theta, _tensors(sample), delta)
        a, b, e, alpha, beta = th
        if not (np.all(np.isfinite(th)) and alpha > 0 and beta > 0):
            continue
        for key, value in (("E", math.exp(e)), ("A", math.exp(a)), ("B", math.exp(b)), ("alpha", alpha),
                           ("beta", beta), ("a", beta / (alpha + beta))):
            draws[key].append(float(value))
    return _percentiles(draws), len(draws["a"])


# ------------------------------------------------------------------ both


@dataclass
class FitReport:
    points: list[RunPoint]
    groups: list[list[RunPoint]]
    flops_model: str
    approach2: Approach2 | None
    approach3: Approach3 | None
    notes: list[str] = field(default_factory=list)

    def mappings(self) -> dict[str, Any]:
        out = {}
        if self.approach2 is not None:
            out["approach2"] = self.approach2.mapping(flops_model=self.flops_model)
        if self.approach3 is not None:
            out["approach3"] = self.approach3.mapping(flops_model=self.flops_model)
        return out

    def preferred(self, choice: str = "auto"):
        """The mapping ``plan`` should use.

        auto: approach 3 (it also predicts the loss) when it fits the runs to within 3% rms in
        ln L, else approach 2, else approach 3 anyway.
        """
        maps = self.mappings()
        if choice != "auto":
            if choice not in maps:
                raise MegascaleError(f"the {choice} fit did not succeed on these runs; use --use {next(iter(maps))}")
            return maps[choice]
        good3 = self.approach3 is not None and self.approach3.rms_log_residual < GOOD_RMS
        return maps["approach3"] if good3 or "approach2" not in maps else maps["approach2"]


def fit_runs(points: list[RunPoint], flops_model: str = "exact", bootstrap: int = 100, seed: int = 0,
             starts: int = 16) -> FitReport:
    """Both approaches on ``points``; raises one line when neither can be fitted."""
    groups = check_fit_input(points)
    notes = []
    a2 = fit_approach2(groups, bootstrap, seed)
    if a2 is None:
        notes.append("approach 2 skipped: fewer than 2 budgets have 3+ sizes with a loss minimum (a U-shaped IsoFLOP curve)")
    else:
        used = {id(i) for i in _usable(a2.isoflops)}
        notes += [f"approach 2: the minimum at C={sci(i.flops)} lies outside the sampled sizes (extrapolated"
                  f"{'' if id(i) in used else ', left out of the power law'}); widen that budget's sizes"
                  for i in a2.valid if not i.inside]
    a3 = fit_approach3(points, bootstrap, seed, starts)
    if a3 is None:
        notes.append("approach 3 did not converge to positive exponents")
    if a2 is None and a3 is None:
        raise MegascaleError("neither approach could be fitted: the losses show no minimum over model size at 2+ budgets; "
                             "sweep wider sizes (--spread) or more budgets")
    return FitReport(points, groups, flops_model, a2, a3, notes)


def report_to_dict(report: FitReport) -> dict[str, Any]:
    out: dict[str, Any] = {
        "flops_model": report.flops_model,
        "params_counted": "applied parameters, embeddings included (Chinchilla's N)",
        "runs": [p.__dict__ for p in report.points],
        "budgets": [budget_of(g) for g in report.groups],
        "notes": report.notes,
    }
    if report.approach2 is not None:
        a2 = report.approach2
        out["approach2"] = {
            "a": a2.a, "b": a2.b, "G": math.exp(a2.ln_g), "D_coefficient": math.exp(a2.ln_h), "reference_flops": a2.reference_flops,
            "params_opt_at_reference": a2.params_opt(a2.reference_flops), "ci95": a2.ci, "bootstrap_samples": a2.bootstrap_samples,
            "isoflops": [{"flops": i.flops, "params_opt": i.params_opt, "tokens_opt": i.tokens_opt, "loss_opt": i.loss_opt,
                          "inside_sampled_range": i.inside, "used_in_power_law": any(i is u for u in a2.used),
                          "runs": len(i.points)} for i in a2.isoflops],
        }
    if report.approach3 is not None:
        a3 = report.approach3
        out["approach3"] = {"E": a3.E, "A": a3.A, "B": a3.B, "alpha": a3.alpha, "beta": a3.beta,
                            "a": a3.beta / (a3.alpha + a3.beta), "b": a3.alpha / (a3.alpha + a3.beta),
                            "huber_objective": a3.objective, "rms_log_residual": a3.rms_log_residual,
                            "lbfgs_starts": a3.starts, "ci95": a3.ci, "bootstrap_samples": a3.bootstrap_samples}
    return out
