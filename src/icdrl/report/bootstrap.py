"""Seeded, vectorised percentile bootstrap over test queries (SPEC §10).

Every interval here resamples *queries*. For a paired comparison of methods A and B at one
shot, the per-query difference is ``d_q = acc_A(q) - acc_B(q)``; with several seeds present
for both methods, ``d_q`` is first averaged over those seeds (rows of a ``[S, Q]`` array).
Because every seed is evaluated on the same test queries, averaging over seeds and then
resampling queries is the same as resampling queries jointly across seeds with one shared
index vector (the statistic is a mean). Resampling the seeds themselves is not done: with
1–3 seeds it gives no usable interval; the per-seed deltas are reported beside the interval
instead, so that training noise stays visible.

One ``[n_boot, N]`` index matrix is drawn per (N, n_boot, seed) from
``numpy.random.default_rng(seed)`` and reused, so an interval does not depend on the order
in which comparisons are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "Interval",
    "bootstrap_mean",
    "index_matrix",
    "paired_bootstrap",
    "trend",
    "TREND_UP",
    "TREND_DOWN",
    "TREND_NS",
]

TREND_UP = "up"
TREND_DOWN = "down"
TREND_NS = "n.s."


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval, over ``n`` resampled units."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def contains_zero(self) -> bool:
        """True when 0 lies inside the closed interval (the delta is not distinguishable)."""
        return self.low <= 0.0 <= self.high

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (e.g. ×100 for percentage points)."""
        return Interval(self.estimate * factor, self.low * factor, self.high * factor, self.n, self.level)


@lru_cache(maxsize=4)  # a report uses one or two query counts
def _cached_index_matrix(n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)
    idx.setflags(write=False)
    return idx


def index_matrix(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The ``[n_boot, n]`` matrix of resampled query indices for this seed (read-only)."""
    if n < 1:
        raise ValueError(f"bootstrap needs at least one query, got n={n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return _cached_index_matrix(int(n), int(n_boot), int(seed))


def bootstrap_mean(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of ``values`` (1-D, finite) with a ``level`` percentile bootstrap interval.

    The estimate is the plain sample mean; the interval is the (1±level)/2 quantiles of the
    means of ``n_boot`` resamples drawn with replacement.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bootstrap_mean expects a 1-D array, got shape {v.shape}")
    if v.size == 0:
        raise ValueError("bootstrap_mean: no values (no queries in common?)")
    if not np.all(np.isfinite(v)):
        raise ValueError("bootstrap_mean: values contain NaN or inf")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = index_matrix(v.size, n_boot, seed)
    means = v[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    est = float(v.mean())
    # a constant sample gives a zero-width interval exactly at the estimate
    if np.ptp(v) == 0.0:
        low = high = est
    return Interval(est, float(low), float(high), int(v.size), level)


def paired_bootstrap(acc_a, acc_b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval for mean(acc_A − acc_B) over paired queries.

    ``acc_a`` and ``acc_b`` are aligned arrays, either ``[Q]`` (one run each) or ``[S, Q]``
    (S seeds present for both, same query order); with seeds the per-query difference is
    averaged over seeds before queries are resampled (see the module docstring).
    """
    a = np.asarray(acc_a, dtype=np.float64)
    b = np.asarray(acc_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: shapes differ {a.shape} vs {b.shape}")
    if a.ndim not in (1, 2):
        raise ValueError(f"paired_bootstrap expects [Q] or [S, Q] arrays, got shape {a.shape}")
    d = a - b
    if d.ndim == 2:
        if d.shape[0] == 0:
            raise ValueError("paired_bootstrap: no seeds")
        d = d.mean(axis=0)
    return bootstrap_mean(d, n_boot=n_boot, seed=seed, level=level)


def trend(iv: Interval) -> str:
    """'up' when the whole interval is above 0, 'down' when below, else 'n.s.'."""
    if iv.low > 0.0:
        return TREND_UP
    if iv.high < 0.0:
        return TREND_DOWN
    return TREND_NS
