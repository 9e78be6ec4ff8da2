"""Seeded, vectorised two-level clustered percentile bootstrap (docs/science.md §10).

One comparison at one shot has, per side (method A, method B), a matrix ``X[s, q]`` of
per-query accuracies: one row per training seed (one row for a method without seeds), one
column per test query that both sides share, in one order. Each query carries a cluster label:
questions about one image are one cluster (VQAv2 has about five per image); unlabelled queries
are clusters of one.

One resample ``b`` draws

* **queries**: the C clusters with replacement (multiplicities ``w[b, c]``), one draw shared by
  both sides and every seed; the query part is the ratio mean
  ``Σ_c w[b,c]·sum_c / Σ_c w[b,c]·n_c`` of the seed-averaged per-query delta (``sum_c``: its
  sum over the cluster's queries, ``n_c``: their number);
* **seeds** (each side with S ≥ 2 rows): S seeds with replacement (multiplicities ``u[b, s]``),
  one draw shared by both sides when they are paired by seed (seed s of A against seed s of B),
  independent draws otherwise; the seed part is ``κ·Σ_s u[b,s]·(r_s − r̄)/S`` with ``r_s`` the
  seed's mean over the queries.

``T_b`` = query part + seed parts. The interval is the percentile interval of ``T``; the
p-value of "Δ = 0" is its two-sided achieved significance level
``min(1, 2·min(1 + #{T ≤ 0}, 1 + #{T ≥ 0}) / (n_boot + 1))`` (so p < 5% exactly when 0 lies
outside the 95% interval, up to the +1); the standard error is the standard deviation of ``T``.

**Why κ** (the adjusted two-stage bootstrap of Davison & Hinkley 1997, §3.8). Seeds and queries
are crossed: every seed answers the same queries. The variance of the mean delta is
``σ²_seed/S + σ²_query/Q + σ²_noise/(S·Q)`` (seed effect, query effect, seed × query noise).
The seed-averaged query part alone carries the last two terms exactly. A seed's row mean carries
``σ²_seed`` plus the noise ``v_int = σ²_noise/Q`` a second time, and a bootstrap of S values
shrinks their spread by (S − 1)/S. Hence ``κ² = S/(S − 1) · max(0, 1 − v_int/s²_r)``, with
``s²_r`` the unbiased variance of the row means and ``v_int`` estimated, cluster-robustly, from
the two-way residuals ``X − row mean − column mean + grand mean``. The bootstrap variance is
then unbiased for the variance above. With one row per side only queries are resampled, and
:attr:`Interval.levels` says so.

Coverage of the 95% interval on synthetic paired data with a known delta
(``tests/test_report_stats.py``; 1000 datasets each unless said): one seed, 300 queries: 94.5%;
100 images of 1–6 questions with a shared image effect: 94.5% clustered, 68.8% when the
questions are resampled singly; 5 seeds × 200 queries with a seed effect: 94.7%; with 2 seeds
93.2%, 3 seeds 94.0% (averaging the seeds and resampling queries: 91.1%, 91.6%); 3 seeds and a
seed effect twice as large (500 datasets): 88.8% (seed-averaged: 81.0%). The seed level rests
on S values, so with 2–3 seeds and a large seed effect it under-covers; more seeds are the
remedy.

The query draws of one ``(C, n_boot, seed)`` and the seed draws of one ``(S, n_boot, seed,
stream)`` come from ``numpy.random.default_rng`` keyed by those values alone, so an interval does
not depend on the order in which comparisons are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from statistics import NormalDist

import numpy as np

__all__ = [
    "Interval",
    "VarianceParts",
    "bootstrap_mean",
    "cluster_codes",
    "index_matrix",
    "paired_bootstrap",
    "resample",
    "z_mde",
    "trend",
    "TREND_UP",
    "TREND_DOWN",
    "TREND_NS",
    "LEVEL_QUERIES",
    "LEVEL_SEEDS",
]

TREND_UP = "up"
TREND_DOWN = "down"
TREND_NS = "n.s."
LEVEL_QUERIES = "queries"
LEVEL_SEEDS = "seeds, then queries"
_BLOCK = 1024  # rows of query draws per RNG block (draws do not depend on n_boot's other rows)
_SEED_STREAM = 0x5EED


def z_mde(alpha: float = 0.05, power: float = 0.8) -> float:
    """``z_{1−α/2} + z_power``: a two-sided test at level α detects Δ = this × SE with ``power``."""
    if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha}, {power}")
    nd = NormalDist()
    return nd.inv_cdf(1.0 - alpha / 2.0) + nd.inv_cdf(power)


@dataclass(frozen=True)
class VarianceParts:
    """Where the variance of an estimate comes from, in units per seed / per query.

    ``at(S, Q) = seed_unit/S + query_unit/Q + noise_unit/(S·Q)`` is the variance of the estimate
    with S seeds and Q test queries (the same mix of cluster sizes); ``at(n_seeds, n_queries)``
    is the one measured. ``seed_measured`` is False where a side has a single seeded run: its
    seed-to-seed variance is unknown and counted as 0 (its seed × query noise is then part of
    ``query_unit``, which does not shrink with more seeds).
    """

    seed_unit: float
    query_unit: float
    noise_unit: float
    n_seeds: int
    n_queries: int
    n_clusters: int
    seed_measured: bool

    def at(self, n_seeds: int, n_queries: float) -> float:
        if n_seeds < 1 or n_queries <= 0:
            raise ValueError(f"need n_seeds >= 1 and n_queries > 0, got {n_seeds}, {n_queries}")
        return (
            self.seed_unit / n_seeds
            + self.query_unit / n_queries
            + self.noise_unit / (n_seeds * n_queries)
        )

    def queries_needed(
        self, delta: float, n_seeds: int, alpha: float = 0.05, power: float = 0.8
    ) -> int | None:
        """Test queries for a minimum detectable effect ≤ ``delta`` at ``n_seeds`` seeds.

        None when the seed variance alone keeps the MDE above ``delta`` (more seeds needed).
        """
        if delta <= 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        room = (delta / z_mde(alpha, power)) ** 2 - self.seed_unit / n_seeds
        per_query = self.query_unit + self.noise_unit / n_seeds
        if per_query <= 0.0:
            return 1 if room >= 0 else None
        if room <= 0.0:
            return None
        return max(1, math.ceil(per_query / room - 1e-9))

    def scaled(self, factor: float) -> VarianceParts:
        f2 = factor * factor
        return replace(
            self,
            seed_unit=self.seed_unit * f2,
            query_unit=self.query_unit * f2,
            noise_unit=self.noise_unit * f2,
        )


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval.

    ``n``: test queries; ``n_clusters``: independent units among them (images); ``n_seeds``: seeds
    resampled (1: none); ``levels``: :data:`LEVEL_SEEDS` or :data:`LEVEL_QUERIES`; ``p``: two-sided
    bootstrap p-value of "estimate = 0" (deltas only); ``se``: bootstrap standard error.
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95
    p: float | None = None
    se: float | None = None
    n_clusters: int | None = None
    n_seeds: int = 1
    levels: str = LEVEL_QUERIES
    parts: VarianceParts | None = None

    @property
    def contains_zero(self) -> bool:
        """True when 0 lies inside the closed interval (the delta is not distinguishable)."""
        return self.low <= 0.0 <= self.high

    def mde(self, alpha: float = 0.05, power: float = 0.8) -> float | None:
        """Minimum detectable effect: (z_{1−α/2} + z_power) × SE (two-sided α, that power)."""
        return None if self.se is None else z_mde(alpha, power) * self.se

    def scaled(self, factor: float) -> Interval:
        """The same interval in other units (e.g. ×100 for percentage points)."""
        return replace(
            self,
            estimate=self.estimate * factor,
            low=self.low * factor,
            high=self.high * factor,
            se=None if self.se is None else self.se * abs(factor),
            parts=None if self.parts is None else self.parts.scaled(factor),
        )


# ----------------------------------------------------------------------------- draws


def _check_sizes(n: int, n_boot: int) -> None:
    if n < 1:
        raise ValueError(f"bootstrap needs at least one query, got n={n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _draw_blocks(n: int, n_boot: int, seed: int):
    for start in range(0, n_boot, _BLOCK):
        rows = min(_BLOCK, n_boot - start)
        rng = np.random.default_rng([int(seed), int(n), start // _BLOCK])
        yield rng.integers(0, n, size=(rows, n), dtype=np.int64)


def index_matrix(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The ``[n_boot, n]`` matrix of resampled unit indices (clusters, or queries) for this seed."""
    _check_sizes(n, n_boot)
    idx = np.concatenate(list(_draw_blocks(n, n_boot, seed)))
    idx.setflags(write=False)
    return idx


@lru_cache(maxsize=4)  # a report uses a few cluster counts
def _weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n]`` multiplicities of each unit in each resample (rows sum to n), read-only.

    Stored as small unsigned integers (exact: a count is at most n), a quarter of float64's
    memory; ``einsum`` with float64 values casts in buffers and sums in float64.
    """
    out = np.empty((n_boot, n), dtype=np.uint16 if n <= np.iinfo(np.uint16).max else np.uint32)
    row = 0
    for idx in _draw_blocks(n, n_boot, seed):
        flat = idx + (np.arange(idx.shape[0], dtype=np.int64) * n)[:, None]
        out[row : row + idx.shape[0]] = np.bincount(flat.ravel(), minlength=idx.size).reshape(
            idx.shape
        )
        row += idx.shape[0]
    out.setflags(write=False)
    return out


@lru_cache(maxsize=16)
def _seed_weights(n_seeds: int, n_boot: int, seed: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed), _SEED_STREAM, int(n_seeds), int(stream)])
    idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    flat = idx + (np.arange(n_boot) * n_seeds)[:, None]
    w = (
        np.bincount(flat.ravel(), minlength=n_boot * n_seeds)
        .reshape(n_boot, n_seeds)
        .astype(np.float64)
    )
    w.setflags(write=False)
    return w


def cluster_codes(labels: Sequence | None, n: int | None = None) -> np.ndarray:
    """Cluster index per query (0..C−1 in order of first appearance); None/"" labels are singletons.

    ``labels`` None means no labels: ``n`` singleton clusters.
    """
    if labels is None:
        if n is None:
            raise ValueError("cluster_codes: give labels or n")
        return np.arange(n, dtype=np.int64)
    import pandas as pd

    arr = np.asarray(labels, dtype=object) if not isinstance(labels, np.ndarray) else labels
    if arr.dtype == object:
        arr = np.where(arr == "", None, arr)
    codes, _ = pd.factorize(arr, use_na_sentinel=True)  # first-appearance order; None/NaN -> -1
    codes = codes.astype(np.int64)
    missing = codes < 0
    if missing.any():  # unlabelled queries: one cluster each
        n_lab = int(codes.max()) + 1 if (~missing).any() else 0
        codes[missing] = n_lab + np.arange(int(missing.sum()))
        codes = pd.factorize(codes)[0].astype(np.int64)  # renumber by first appearance
    return codes


# ----------------------------------------------------------------------------- the bootstrap


def _as_rows(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected [Q] or [S, Q] values, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: no values (no seeds or no queries in common?)")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: values contain NaN or inf")
    return a


@dataclass(frozen=True)
class _SeedLevel:
    centred: np.ndarray  # [S] κ·(r_s − r̄)
    seed_unit: float  # σ²_seed estimate (per seed)
    noise_unit: float  # σ²_noise estimate (per seed-query cell)


def _seed_level(x: np.ndarray, codes: np.ndarray, n_clusters: int) -> _SeedLevel | None:
    """κ-scaled seed effects of one side (None with one row): see the module docstring."""
    s, q = x.shape
    if s < 2:
        return None
    r = x.mean(axis=1)
    s2r = float(r.var(ddof=1))
    resid = x - r[:, None] - x.mean(axis=0)[None, :] + r.mean()
    flat = (codes[None, :] + n_clusters * np.arange(s)[:, None]).ravel()
    by_cluster = np.bincount(flat, weights=resid.ravel(), minlength=s * n_clusters)
    v_int = float((by_cluster**2).sum()) / ((s - 1) * q * q)
    if n_clusters > 1:
        v_int *= n_clusters / (n_clusters - 1)
    seed_var = max(0.0, s2r - v_int)  # σ²_seed estimate
    kappa2 = s / (s - 1) * (seed_var / s2r) if s2r > 0.0 else 0.0
    return _SeedLevel(math.sqrt(kappa2) * (r - r.mean()), seed_var, v_int * q)


def resample(
    a,
    b=None,
    *,
    clusters: Sequence | None = None,
    paired: bool = True,
    seeded: tuple[bool, bool] = (True, True),
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Two-level clustered percentile bootstrap of ``mean(a) − mean(b)`` (or of ``mean(a)``).

    ``a``, ``b``: ``[Q]`` or ``[S, Q]`` values on the same Q queries (same column order).
    ``paired``: rows of ``a`` and ``b`` are the same seeds (same count, same order), resampled with
    one draw; otherwise each side's seeds are drawn on their own. ``clusters``: a label per query
    (same order; None or "" = a cluster of its own). ``seeded``: whether each side's runs are
    training seeds (False for a method without seeds: its single run has no seed noise).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    xa = _as_rows(a, "a")
    sides = [(xa, 1.0)]
    if b is not None:
        xb = _as_rows(b, "b")
        if xb.shape[1] != xa.shape[1]:
            raise ValueError(
                f"paired_bootstrap: shapes differ {xa.shape} vs {xb.shape} (queries must match)"
            )
        if paired:
            if xb.shape != xa.shape:
                raise ValueError(f"paired_bootstrap: shapes differ {xa.shape} vs {xb.shape}")
            sides = [(xa - xb, 1.0)]
        else:
            sides.append((xb, -1.0))
    q = xa.shape[1]
    codes = cluster_codes(clusters, q) if clusters is not None else np.arange(q, dtype=np.int64)
    if len(codes) != q:
        raise ValueError(f"clusters: {len(codes)} labels for {q} queries")
    n_clusters = int(codes.max()) + 1
    _check_sizes(n_clusters, n_boot)

    per_query = sum(sign * x.mean(axis=0) for x, sign in sides)
    est = float(per_query.mean())
    sums = np.bincount(codes, weights=per_query, minlength=n_clusters)
    sizes = np.bincount(codes, minlength=n_clusters).astype(np.float64)
    w = _weights(n_clusters, n_boot, seed)
    # einsum, not BLAS: a matrix-vector product gains nothing from threads and contends for cores
    t = np.einsum("bc,c->b", w, sums) / np.einsum("bc,c->b", w, sizes)

    if b is None:
        side_seeded = [seeded[0]]
    elif paired:
        side_seeded = [seeded[0] or seeded[1]]
    else:
        side_seeded = [seeded[0], seeded[1]]
    seed_unit = noise_unit = noise_in_query = 0.0
    n_seeds = 1
    measured = True
    for i, ((x, sign), is_seeded) in enumerate(zip(sides, side_seeded)):
        sl = _seed_level(x, codes, n_clusters)
        if sl is None:  # one run: nothing to resample; its seed noise is unknown if it was trained
            measured &= not is_seeded
            continue
        n_seeds = max(n_seeds, x.shape[0])
        u = _seed_weights(x.shape[0], n_boot, seed, i)  # paired: one side, one shared draw
        t = t + sign * (u @ sl.centred) / x.shape[0]
        seed_unit += sl.seed_unit
        noise_unit += sl.noise_unit
        noise_in_query += sl.noise_unit / (x.shape[0] * q)
    cluster_var = float(((sums - sizes * est) ** 2).sum()) / (q * q)
    if n_clusters > 1:
        cluster_var *= n_clusters / (n_clusters - 1)
    query_unit = max(0.0, cluster_var - noise_in_query) * q
    parts = VarianceParts(seed_unit, query_unit, noise_unit, n_seeds, q, n_clusters, measured)

    alpha = (1.0 - level) / 2.0
    constant = all(np.ptp(x) == 0.0 for x, _ in sides)
    if constant:  # every value equal: a zero-width interval exactly at the estimate
        low = high = est
        se = 0.0
        p = 1.0 if est == 0.0 else 2.0 / (n_boot + 1)
    else:
        low, high = (float(v) for v in np.quantile(t, [alpha, 1.0 - alpha]))
        se = float(t.std(ddof=1)) if n_boot > 1 else 0.0
        below, above = int((t <= 0.0).sum()), int((t >= 0.0).sum())
        p = min(1.0, 2.0 * min(below + 1, above + 1) / (n_boot + 1))
    return Interval(
        est,
        low,
        high,
        q,
        level,
        p=p if b is not None else None,
        se=se,
        n_clusters=n_clusters,
        n_seeds=n_seeds,
        levels=LEVEL_SEEDS if n_seeds > 1 else LEVEL_QUERIES,
        parts=parts,
    )


def bootstrap_mean(
    values,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    clusters: Sequence | None = None,
) -> Interval:
    """Mean of ``values`` (1-D, finite) with a ``level`` percentile bootstrap interval.

    The estimate is the plain sample mean; the interval is the (1±level)/2 quantiles of the
    means of ``n_boot`` resamples of the clusters (of the values, without ``clusters``).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bootstrap_mean expects a 1-D array, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("bootstrap_mean: no values (no queries in common?)")
    return resample(v, clusters=clusters, n_boot=n_boot, seed=seed, level=level)


def paired_bootstrap(
    acc_a,
    acc_b,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    *,
    clusters: Sequence | None = None,
    paired: bool = True,
    seeded: tuple[bool, bool] = (True, True),
) -> Interval:
    """Interval and p-value for mean(acc_A − acc_B) (see :func:`resample` and the module docstring).

    ``acc_a``/``acc_b``: aligned ``[Q]`` (one run each) or ``[S, Q]`` (S seeds, same query order).
    """
    return resample(
        acc_a,
        acc_b,
        clusters=clusters,
        paired=paired,
        seeded=seeded,
        n_boot=n_boot,
        seed=seed,
        level=level,
    )


def trend(iv: Interval) -> str:
    """'up' when the whole interval is above 0, 'down' when below, else 'n.s.'."""
    if iv.low > 0.0:
        return TREND_UP
    if iv.high < 0.0:
        return TREND_DOWN
    return TREND_NS
