"""Power (docs/science.md §10): minimum detectable effects and the test set that would resolve a given delta.

Each comparison's bootstrap carries :class:`~icdrl.report.bootstrap.VarianceParts` (seed,
query and seed × query variance, per unit). Its variance with S seeds and Q queries is
``seed/S + query/Q + noise/(S·Q)``; the minimum detectable effect at ``power`` (two-sided
``alpha``) is ``(z_{1−α/2} + z_power)·√variance``. :func:`power_plan` summarises, over a list
of comparisons, how many test queries each would need for an MDE ≤ ``delta`` at 1, 2, 3, 5
seeds (and the current count); :func:`plan_lines` prints it (the report's summary and
``icdrl power`` show the same lines).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .bootstrap import z_mde

__all__ = ["PlanRow", "PowerPlan", "power_plan", "plan_lines"]

SEED_OPTIONS = (1, 2, 3, 5)


@dataclass(frozen=True)
class PlanRow:
    n_seeds: int
    median_queries: float  # inf: the seed variance alone keeps the MDE above delta
    max_queries: float
    n_resolvable: int  # comparisons that some finite query count resolves at these seeds


@dataclass(frozen=True)
class PowerPlan:
    delta: float
    alpha: float
    power: float
    n_comparisons: int
    n_queries: tuple[int, ...]  # test queries of the comparisons (distinct values)
    n_clusters: tuple[int, ...]
    n_seeds: tuple[int, ...]
    mde_median: float | None
    mde_range: tuple[float, float] | None
    seed_measured: bool  # False: some comparison has one seeded run per side
    rows: tuple[PlanRow, ...]
    n_no_variance: int = 0  # left out: no query (and no seed) differs, so nothing to scale


def _need(c, delta: float, s: int, alpha: float, power: float) -> float:
    q = c.interval.parts.queries_needed(delta, s, alpha, power)
    return math.inf if q is None else float(q)


def power_plan(
    comparisons: Sequence,
    delta: float = 1.0,
    alpha: float = 0.05,
    power: float = 0.8,
    seeds: Sequence[int] | None = None,
) -> PowerPlan:
    """The plan over ``comparisons`` (``Comparison`` objects; untested ones are skipped)."""
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    cs = [
        c
        for c in comparisons
        if getattr(c, "tested", c.available)
        and c.interval is not None
        and c.interval.parts is not None
    ]

    def measured(c) -> float:
        return c.interval.parts.at(c.interval.parts.n_seeds, c.interval.parts.n_queries)

    flat = [c for c in cs if measured(c) <= 0.0]
    cs = [c for c in cs if measured(c) > 0.0]
    z = z_mde(alpha, power)
    mdes = [
        z * math.sqrt(c.interval.parts.at(c.interval.parts.n_seeds, c.interval.parts.n_queries))
        for c in cs
    ]
    current = sorted({c.interval.parts.n_seeds for c in cs})
    opts = sorted(set(seeds or SEED_OPTIONS) | set(current))
    rows = []
    for s in opts:
        need = np.array([_need(c, delta, s, alpha, power) for c in cs]) if cs else np.zeros(0)
        fin = need[np.isfinite(need)]
        rows.append(
            PlanRow(
                s,
                float(np.median(need)) if need.size else math.nan,
                float(need.max()) if need.size else math.nan,
                int(fin.size),
            )
        )
    return PowerPlan(
        delta,
        alpha,
        power,
        len(cs),
        tuple(sorted({c.interval.n for c in cs})),
        tuple(sorted({c.interval.n_clusters or c.interval.n for c in cs})),
        tuple(current),
        float(np.median(mdes)) if mdes else None,
        (float(min(mdes)), float(max(mdes))) if mdes else None,
        all(c.interval.parts.seed_measured for c in cs),
        tuple(rows),
        len(flat),
    )


def _count(x: float) -> str:
    if math.isinf(x):
        return "no number of queries (seed noise alone is too large)"
    return f"{int(x):,}"


def _span(v: tuple[int, ...]) -> str:
    if not v:
        return "0"
    return str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}"


def _unit(unit: str, x: float) -> str:
    return unit[:-1] if x == 1 and unit.endswith("s") else unit


def plan_lines(plan: PowerPlan, unit: str = "points") -> list[str]:
    """The plan as sentences (the report's summary and ``icdrl power`` print these)."""
    if plan.n_comparisons == 0:
        return ["No tested comparison with any variance: nothing to plan from."]
    lo, hi = plan.mde_range
    out = [
        f"{plan.n_comparisons} comparisons on {_span(plan.n_queries)} test queries ({_span(plan.n_clusters)} "
        f"independent clusters) and {_span(plan.n_seeds)} seed(s): minimum detectable effect at "
        f"{int(round(100 * plan.power))}% power (two-sided {100 * plan.alpha:g}%) median {plan.mde_median:.2f} "
        f"{unit} (range {lo:.2f}–{hi:.2f}).",
        f"Test queries needed to resolve {plan.delta:g} {_unit(unit, plan.delta)} (MDE ≤ {plan.delta:g}), at the "
        "same questions per image:",
    ]
    for r in plan.rows:
        if not plan.seed_measured and r.n_seeds not in plan.n_seeds:
            continue  # seed variance unknown: more seeds cannot be planned
        out.append(
            f"  {r.n_seeds} seed{'s' if r.n_seeds > 1 else ''}: median comparison {_count(r.median_queries)}; "
            f"every comparison {_count(r.max_queries)}"
        )
    if plan.n_no_variance:
        out.append(
            f"{plan.n_no_variance} tested comparison{'s' if plan.n_no_variance > 1 else ''} where the two "
            "sides score the same on every query (zero observed variance) are left out of the plan."
        )
    if not plan.seed_measured:
        out.append(
            "One seeded run per method: the seed-to-seed variance is not measured and counted as 0, so "
            "these counts are lower bounds, and how more seeds would help cannot be said; a run with 2+ "
            "seeds measures it."
        )
    return out
