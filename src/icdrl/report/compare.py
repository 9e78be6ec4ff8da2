"""Paired comparisons of two evaluated methods at one shot (SPEC §10).

Seeds: when both methods have runs for some common seeds, only those seeds are used and the
per-query difference is averaged over them (pairing by seed: a v3 cell of seed s is compared
with legacy of seed s). When they share no seed (e.g. a seeded selector against an unseeded
baseline), each side is first averaged over its own seeds. Queries: those present in every
run used; their count is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

import numpy as np
import pandas as pd

from .bootstrap import Interval, bootstrap_mean, paired_bootstrap, trend
from .inputs import EvalData

__all__ = ["Comparison", "compare", "method_accuracy", "MethodAccuracy"]

PAIRED = "paired by seed"
MEANS = "seed means"


@dataclass(frozen=True)
class Comparison:
    """Δ = A − B in percentage points, or the reason it is not available."""

    a: str
    b: str
    k: int
    interval: Interval | None = None
    seeds: tuple = ()
    per_seed: tuple = ()  # ((seed, delta_pts), ...)
    pairing: str = ""
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.interval is not None

    @property
    def trend(self) -> str:
        return trend(self.interval) if self.interval is not None else ""

    @property
    def distinguishable(self) -> bool | None:
        return None if self.interval is None else not self.interval.contains_zero

    @property
    def seeds_agree(self) -> bool | None:
        """True when every per-seed delta has the sign of the pooled one (None: < 2 seeds)."""
        if self.interval is None or len(self.per_seed) < 2:
            return None
        sign = np.sign(self.interval.estimate)
        return all(np.sign(d) == sign for _, d in self.per_seed)


def _common_queries(series: list[pd.Series]) -> pd.Index:
    idx = reduce(lambda x, y: x.intersection(y, sort=False), [s.index for s in series])
    try:
        return idx.sort_values()
    except TypeError:
        return idx


def _stack(series: list[pd.Series], q: pd.Index) -> np.ndarray:
    return np.stack([s.reindex(q).to_numpy(dtype=np.float64) for s in series])


def compare(data: EvalData, a: str, b: str, k: int, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> Comparison:
    """Paired bootstrap of acc(a) − acc(b) at shot k, in points (see module docstring)."""
    ra, rb = data.acc.get((a, k), {}), data.acc.get((b, k), {})
    if not ra or not rb:
        missing = a if not ra else b
        return Comparison(a, b, k, reason=f"no results for {_name(data, missing)} at k={k}")
    common = sorted(set(ra) & set(rb), key=lambda s: -1 if s is None else s)
    if common:
        sa, sb = [ra[s] for s in common], [rb[s] for s in common]
        q = _common_queries(sa + sb)
        if len(q) == 0:
            return Comparison(a, b, k, reason="no test queries in common")
        A, B = _stack(sa, q), _stack(sb, q)
        iv = paired_bootstrap(A, B, n_boot=n_boot, seed=seed, level=level).scaled(100.0)
        per_seed = tuple((s, float((A[i] - B[i]).mean() * 100.0)) for i, s in enumerate(common))
        return Comparison(a, b, k, iv, tuple(common), per_seed, PAIRED)
    seeds_a, seeds_b = data.seeds(a, k), data.seeds(b, k)
    sa, sb = [ra[s] for s in seeds_a], [rb[s] for s in seeds_b]
    q = _common_queries(sa + sb)
    if len(q) == 0:
        return Comparison(a, b, k, reason="no test queries in common")
    A, B = _stack(sa, q), _stack(sb, q)
    d = A.mean(axis=0) - B.mean(axis=0)
    iv = bootstrap_mean(d, n_boot=n_boot, seed=seed, level=level).scaled(100.0)
    per_seed: tuple = ()
    if seeds_b == [None]:
        per_seed = tuple((s, float((A[i] - B[0]).mean() * 100.0)) for i, s in enumerate(seeds_a))
    elif seeds_a == [None]:
        per_seed = tuple((s, float((A[0] - B[i]).mean() * 100.0)) for i, s in enumerate(seeds_b))
    seeds = tuple(s for s in seeds_a + seeds_b if s is not None)
    return Comparison(a, b, k, iv, tuple(sorted(set(seeds))), per_seed, MEANS)


@dataclass(frozen=True)
class MethodAccuracy:
    """Accuracy (points) of one method at one shot: seed-averaged, with spread over seeds."""

    key: str
    k: int
    interval: Interval
    seeds: tuple
    per_seed: tuple  # ((seed, acc_pts), ...)

    @property
    def seed_sd(self) -> float | None:
        vals = [v for _, v in self.per_seed]
        return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None


def method_accuracy(data: EvalData, key: str, k: int, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> MethodAccuracy | None:
    """Mean accuracy over the queries common to all seeds, with a query-bootstrap interval."""
    runs = data.acc.get((key, k))
    if not runs:
        return None
    seeds = data.seeds(key, k)
    series = [runs[s] for s in seeds]
    q = _common_queries(series)
    if len(q) == 0:
        return None
    A = _stack(series, q)
    iv = bootstrap_mean(A.mean(axis=0), n_boot=n_boot, seed=seed, level=level).scaled(100.0)
    per_seed = tuple((s, float(A[i].mean() * 100.0)) for i, s in enumerate(seeds))
    return MethodAccuracy(key, k, iv, tuple(seeds), per_seed)


def _name(data: EvalData, key: str) -> str:
    m = data.methods.get(key)
    return m.long() if m is not None else key
