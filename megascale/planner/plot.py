"""The IsoFLOP figure of a fit: loss against N per budget, then N_opt(C) and D_opt(C)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from megascale.planner.fit import FitReport, budget_of
from megascale.planner.mappings import PUBLISHED, sci


def plot_fit(report: FitReport, png_path: Path | str) -> Path:
    """Three panels: IsoFLOP profiles with parabolas (approach 2) and approach 3's curves; N_opt(C); D_opt(C)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.cm.viridis(np.linspace(0.05, 0.85, len(report.groups)))
    _isoflop_panel(axes[0], report, colors)
    _optimum_panel(axes[1], report, colors, "params")
    _optimum_panel(axes[2], report, colors, "tokens")
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    return _save(fig, png_path)


def _save(fig, png_path: Path | str) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def _title(report: FitReport) -> str:
    parts = [f"{len(report.points)} runs, {len(report.groups)} budgets, C = {report.flops_model}"]
    if report.approach2:
        parts.append(f"approach 2: N_opt ∝ C^{report.approach2.a:.3f}")
    if report.approach3:
        a3 = report.approach3
        parts.append(f"approach 3: L = {a3.E:.3g} + {a3.A:.3g}/N^{a3.alpha:.3f} + {a3.B:.3g}/D^{a3.beta:.3f} "
                     f"(a = {a3.beta / (a3.alpha + a3.beta):.3f})")
    return " · ".join(parts)


def _isoflop_panel(ax, report: FitReport, colors) -> None:
    a2 = {id(i.points): i for i in report.approach2.isoflops} if report.approach2 else {}
    for group, color in zip(report.groups, colors):
        n = np.array([p.params for p in group])
        d = np.array([p.tokens for p in group])
        loss = np.array([p.loss for p in group])
        c = budget_of(group)
        ax.scatter(n, loss, color=color, s=22, zorder=3, label=f"C = {sci(c, 2)}")
        grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
        iso = a2.get(id(group))
        if iso is not None and iso.coeffs is not None:
            p2, p1, p0 = iso.coeffs
            x = np.log(grid)
            ax.plot(grid, p2 * x * x + p1 * x + p0, color=color, lw=1.2)
            if iso.inside:  # an extrapolated vertex would only stretch the axes; the text report has it
                ax.scatter([iso.params_opt], [iso.loss_opt], marker="*", s=120, color=color, edgecolor="k", zorder=4)
        if report.approach3 is not None and len(np.unique(n)) >= 2:
            # D along this budget: the runs' own ln D ~ ln N line (exact FLOPs are not exactly C/6N).
            v, u = np.polyfit(np.log(n), np.log(d), 1)
            a3 = report.approach3
            pred = a3.E + a3.A / grid**a3.alpha + a3.B / np.exp(u + v * np.log(grid)) ** a3.beta
            ax.plot(grid, pred, color=color, lw=1.0, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (applied, incl. embeddings)")
    ax.set_ylabel("final loss (nats/token)")
    ax.set_title("IsoFLOP profiles: parabolas (approach 2) — dashed: approach 3", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _optimum_panel(ax, report: FitReport, colors, what: str) -> None:
    budgets = [budget_of(g) for g in report.groups]
    c_grid = np.geomspace(min(budgets) / 2, max(budgets) * 2, 50)
    label = "N_opt" if what == "params" else "D_opt"
    if report.approach2:
        a2 = report.approach2
        used = [id(i) for i in a2.used]
        for iso, color in zip(a2.isoflops, colors):
            value = iso.params_opt if what == "params" else iso.tokens_opt
            if value is not None:  # hollow: extrapolated and left out of the power law
                face = color if id(iso) in used else "none"
                ax.scatter([iso.flops], [value], facecolor=face, marker="*", s=120, edgecolor="k", zorder=3)
        exp, ln_k = (a2.a, a2.ln_g) if what == "params" else (a2.b, a2.ln_h)
        ax.plot(c_grid, np.exp(ln_k + exp * np.log(c_grid)), "k-", lw=1.2, label=f"approach 2: ∝ C^{exp:.3f}")
    if report.approach3:
        m = report.approach3.mapping()
        values = [getattr(m.allocate(c), what) for c in c_grid]
        ax.plot(c_grid, values, "C3--", lw=1.2, label=f"approach 3: ∝ C^{(m.a if what == 'params' else m.b):.3f}")
    ref = PUBLISHED["chinchilla-2"]
    ax.plot(c_grid, [getattr(ref.allocate(c), what) for c in c_grid], color="0.6", ls=":", lw=1.2,
            label="Chinchilla approach 2 (published)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compute C (FLOPs)")
    ax.set_ylabel(f"{label} ({'parameters' if what == 'params' else 'tokens'})")
    ax.set_title(f"{label}(C)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if not math.isfinite(ax.get_ylim()[0]):
        ax.set_yscale("linear")


STEP_PARTS = (("compute", "#2b7bba"), ("recompute", "#9ecae1"), ("bubble", "#fdae6b"), ("tensor", "#e6550d"),
              ("context", "#a63603"), ("data", "#756bb1"), ("pipeline", "#bcbddc"))


def plot_layouts(plan, png_path: Path | str) -> Path:
    """The chosen layout and the runners-up as bars of their modelled step: where each second goes, by cause."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    r = plan.recipe
    rows = [(f"chosen: tp {r.tp} · pp {r.pp} · cp {r.cp} · ZeRO-{r.zero_stage} · micro {r.micro_batch}", plan.step)]
    rows += [(f"tp {x.tp} · pp {x.pp} · cp {x.cp} · ZeRO-{x.zero_stage} · micro {x.micro_batch}", x.step)
             for x in plan.alternatives]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * len(rows)))
    for i, (_, step) in enumerate(reversed(rows)):
        left = 0.0
        for name, color in STEP_PARTS:
            share = getattr(step, name) / step.total
            ax.barh(i, share, left=left, color=color, label=name if i == len(rows) - 1 else None)
            left += share
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of a modelled optimizer step")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{plan.budget.describe()}\n{plan.shape.describe()}", fontsize=8)
    fig.tight_layout()
    return _save(fig, png_path)
