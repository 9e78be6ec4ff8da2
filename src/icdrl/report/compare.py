"""Paired comparisons of two evaluated methods at one shot, and families of them (docs/science.md §10).

Seeds: when both methods have runs for some common seeds, only those seeds are used, paired
(a v3 cell of seed s against legacy of seed s; one seed draw for both sides). When they share no
seed (e.g. a seeded selector against an unseeded baseline), each side's seeds are resampled on
their own. Queries: those present in every run used, resampled by image (one draw for both
sides); see :mod:`.bootstrap`. Comparisons that cannot differ are marked (:mod:`.degenerate`).

:func:`family` then treats one experiment's comparisons as a family: comparisons that repeat an
earlier one between identical selectors are counted once, and the tested ones get Holm-adjusted
p-values and flags (:mod:`.multiplicity`). Every delta table goes through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import reduce

import numpy as np
import pandas as pd

from .bootstrap import Interval, paired_bootstrap, resample, trend
from .degenerate import cannot_differ, canonical
from .inputs import EvalData
from .multiplicity import holm_flags

__all__ = ["Comparison", "compare", "family", "method_accuracy", "MethodAccuracy", "ALPHA", "POWER"]

ALPHA = 0.05  # two-sided level of every test (the 95% intervals)
POWER = 0.8  # power of the minimum detectable effect
TESTED = "tested"
CANNOT_DIFFER = "cannot differ"
DUPLICATE = "duplicate"
NOT_AVAILABLE = "not available"

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
    degenerate: str = ""  # why the delta is zero by construction ("" = it can differ)
    duplicate_of: str = ""  # "a − b" of the earlier comparison between the same selectors
    p_holm: float | None = None
    significant_holm: bool | None = None
    family_size: int = 0  # tested comparisons in the family (Holm's m)

    @property
    def available(self) -> bool:
        return self.interval is not None

    @property
    def tested(self) -> bool:
        """Available, able to differ, and not a repeat: it counts in its family."""
        return self.available and not self.degenerate and not self.duplicate_of

    @property
    def status(self) -> str:
        if not self.available:
            return NOT_AVAILABLE
        if self.degenerate:
            return CANNOT_DIFFER
        return DUPLICATE if self.duplicate_of else TESTED

    @property
    def p(self) -> float | None:
        return None if self.interval is None else self.interval.p

    @property
    def mde(self) -> float | None:
        """Minimum detectable effect (points) at 80% power, two-sided 5%, from this comparison's variance."""
        return None if self.interval is None else self.interval.mde(ALPHA, POWER)

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


def compare(
    data: EvalData, a: str, b: str, k: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Comparison:
    """Paired two-level bootstrap of acc(a) − acc(b) at shot k, in points (see module docstring)."""
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
        seeded = common != [None]
        iv = paired_bootstrap(
            A,
            B,
            n_boot=n_boot,
            seed=seed,
            level=level,
            clusters=data.clusters(q),
            paired=True,
            seeded=(seeded, seeded),
        ).scaled(100.0)
        per_seed = tuple((s, float((A[i] - B[i]).mean() * 100.0)) for i, s in enumerate(common))
        return Comparison(
            a, b, k, iv, tuple(common), per_seed, PAIRED, degenerate=cannot_differ(data, a, b, k)
        )
    seeds_a, seeds_b = data.seeds(a, k), data.seeds(b, k)
    sa, sb = [ra[s] for s in seeds_a], [rb[s] for s in seeds_b]
    q = _common_queries(sa + sb)
    if len(q) == 0:
        return Comparison(a, b, k, reason="no test queries in common")
    A, B = _stack(sa, q), _stack(sb, q)
    iv = paired_bootstrap(
        A,
        B,
        n_boot=n_boot,
        seed=seed,
        level=level,
        clusters=data.clusters(q),
        paired=False,
        seeded=(seeds_a != [None], seeds_b != [None]),
    ).scaled(100.0)
    per_seed: tuple = ()
    if seeds_b == [None]:
        per_seed = tuple((s, float((A[i] - B[0]).mean() * 100.0)) for i, s in enumerate(seeds_a))
    elif seeds_a == [None]:
        per_seed = tuple((s, float((A[0] - B[i]).mean() * 100.0)) for i, s in enumerate(seeds_b))
    seeds = tuple(s for s in seeds_a + seeds_b if s is not None)
    return Comparison(
        a,
        b,
        k,
        iv,
        tuple(sorted(set(seeds))),
        per_seed,
        MEANS,
        degenerate=cannot_differ(data, a, b, k),
    )


def family(
    comparisons: Sequence[Comparison], data: EvalData | None = None, alpha: float = ALPHA
) -> list[Comparison]:
    """One experiment's comparisons as a family: repeats marked, Holm applied to the tested ones.

    A comparison whose two sides cannot differ (``degenerate``) is not tested. One that pairs
    the same selectors as an earlier one at the same shot (by :func:`.degenerate.canonical`,
    given ``data``) is a repeat: it shows the earlier one's numbers and is counted once. The m
    tested comparisons get ``p_holm`` (Holm's step-down over their bootstrap p-values),
    ``significant_holm`` (p_holm ≤ alpha) and ``family_size`` = m. Order is kept.
    """
    out = list(comparisons)
    first: dict[tuple, int] = {}
    original: dict[int, int] = {}
    for i, c in enumerate(out):
        if not c.available or c.degenerate:
            continue
        key = (
            (canonical(data, c.a, c.k), canonical(data, c.b, c.k), c.k)
            if data is not None
            else (c.a, c.b, c.k)
        )
        j = first.setdefault(key, i)
        if j != i:
            original[i] = j
            out[i] = replace(c, duplicate_of=f"{_name(data, out[j].a)} − {_name(data, out[j].b)}")
    tested = [i for i, c in enumerate(out) if c.tested]
    adj, flags = holm_flags([out[i].p for i in tested], alpha)
    m = len(tested)
    for i, pa, fl in zip(tested, adj, flags):
        out[i] = replace(out[i], p_holm=float(pa), significant_holm=bool(fl), family_size=m)
    for i, j in original.items():  # a repeat shows its original's adjusted values
        out[i] = replace(
            out[i], p_holm=out[j].p_holm, significant_holm=out[j].significant_holm, family_size=m
        )
    return out


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


def method_accuracy(
    data: EvalData, key: str, k: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> MethodAccuracy | None:
    """Mean accuracy over the queries common to all seeds, with a two-level clustered interval."""
    runs = data.acc.get((key, k))
    if not runs:
        return None
    seeds = data.seeds(key, k)
    series = [runs[s] for s in seeds]
    q = _common_queries(series)
    if len(q) == 0:
        return None
    A = _stack(series, q)
    iv = resample(
        A,
        clusters=data.clusters(q),
        seeded=(seeds != [None], False),
        n_boot=n_boot,
        seed=seed,
        level=level,
    ).scaled(100.0)
    per_seed = tuple((s, float(A[i].mean() * 100.0)) for i, s in enumerate(seeds))
    return MethodAccuracy(key, k, iv, tuple(seeds), per_seed)


def _name(data: EvalData | None, key: str) -> str:
    m = data.methods.get(key) if data is not None else None
    return m.long() if m is not None else key
