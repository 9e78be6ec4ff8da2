"""Holm's step-down adjustment over one family of comparisons (docs/science.md §10).

For m p-values sorted ascending p_(1) ≤ … ≤ p_(m), the adjusted values are
``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j))``; a comparison is significant at level α after
the adjustment when ``p̃ ≤ α``. This controls the family-wise error rate at α (the chance of
any false "distinguishable" in the family) under any dependence between the comparisons.
Tied p-values get the same adjusted value, whatever their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["holm", "holm_flags", "expected_by_chance"]


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the order given."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm: expected a 1-D list of p-values, got shape {p.shape}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out = np.empty(m, dtype=np.float64)
    out[order] = np.maximum.accumulate(stepped) if m else stepped
    return out


def holm_flags(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(adjusted p-values, significant after adjustment) for one family."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    adj = holm(pvalues)
    return adj, adj <= alpha


def expected_by_chance(m: int, alpha: float = 0.05) -> float:
    """Unadjusted "distinguishable" deltas expected among m comparisons with no true difference."""
    return alpha * m
