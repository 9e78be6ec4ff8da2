"""Paired bootstrap and comparisons (icdrl.report.bootstrap / .compare) against known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from icdrl.grid import Cell, reward_spec
from icdrl.report.bootstrap import (
    Interval,
    bootstrap_mean,
    index_matrix,
    paired_bootstrap,
    trend,
)
from icdrl.report.compare import compare, method_accuracy
from icdrl.report.inputs import EvalData, MethodInfo


def test_identical_methods_give_zero_interval():
    rng = np.random.default_rng(3)
    acc = rng.choice([0.0, 0.3, 0.6, 1.0], size=150)
    iv = paired_bootstrap(acc, acc.copy(), n_boot=1000, seed=0)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert iv.contains_zero and trend(iv) == "n.s."


def test_symmetric_differences_give_interval_around_zero():
    # A wins on half the queries by exactly what it loses on the other half
    a = np.tile([1.0, 0.0], 100)
    b = np.tile([0.0, 1.0], 100)
    iv = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert iv.estimate == 0.0
    assert iv.low < 0.0 < iv.high
    assert abs(iv.low + iv.high) < 0.03  # roughly symmetric
    assert trend(iv) == "n.s."


def test_right_on_every_query_the_other_gets_wrong_gives_exact_delta():
    rng = np.random.default_rng(5)
    b = (rng.random(100) < 0.6).astype(float)  # right on some queries
    a = np.ones(100)  # right where b is, and also on every query b gets wrong
    iv = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert iv.estimate == pytest.approx((b == 0).mean(), abs=1e-12)
    assert iv.low > 0 and trend(iv) == "up"
    # the extreme case: A right everywhere, B wrong everywhere -> exactly 1, zero width
    iv = paired_bootstrap(np.ones(80), np.zeros(80), n_boot=1000, seed=0)
    assert (iv.estimate, iv.low, iv.high) == (1.0, 1.0, 1.0)
    iv = paired_bootstrap(np.zeros(80), np.ones(80), n_boot=1000, seed=0)
    assert (iv.estimate, iv.low, iv.high) == (-1.0, -1.0, -1.0) and trend(iv) == "down"


def test_interval_width_matches_normal_theory():
    rng = np.random.default_rng(11)
    x = rng.normal(0.3, 1.0, size=400)
    iv = bootstrap_mean(x, n_boot=4000, seed=2)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert iv.high - iv.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert iv.low < x.mean() < iv.high


def test_seeds_share_query_draws_and_add_a_seed_level():
    rng = np.random.default_rng(7)
    a1, b = rng.random(60), rng.random((2, 60))
    a = np.stack([a1, a1 + (b[1] - b[0])])  # every seed's delta has the same mean: no seed effect
    iv = paired_bootstrap(a, b, n_boot=500, seed=4)
    idx = index_matrix(60, 500, 4)
    # the same query indices in every seed; the seed part vanishes (row means equal)
    joint = (a[:, idx] - b[:, idx]).mean(axis=(0, 2))
    lo, hi = np.quantile(joint, [0.025, 0.975])
    assert iv.low == pytest.approx(lo, abs=1e-12)
    assert iv.high == pytest.approx(hi, abs=1e-12)
    assert iv.estimate == pytest.approx((a - b).mean(), abs=1e-12)
    assert iv.levels == "seeds, then queries" and iv.n_seeds == 2
    # a seed offset widens the interval beyond query resampling alone
    shifted = paired_bootstrap(a + np.array([[0.3], [-0.3]]), b, n_boot=500, seed=4)
    assert shifted.high - shifted.low > 2 * (iv.high - iv.low)


def test_deterministic_given_seed_and_seed_matters():
    x = np.random.default_rng(0).normal(size=50)
    assert bootstrap_mean(x, 300, seed=9) == bootstrap_mean(x, 300, seed=9)
    assert bootstrap_mean(x, 300, seed=9) != bootstrap_mean(x, 300, seed=10)
    m = index_matrix(50, 300, 9)
    assert m.shape == (300, 50) and m.min() >= 0 and m.max() < 50
    with pytest.raises(ValueError):
        m[0, 0] = 1  # shared, read-only


def test_trend_and_bad_inputs():
    assert trend(Interval(1.0, 0.1, 2.0, 10)) == "up"
    assert trend(Interval(-1.0, -2.0, -0.1, 10)) == "down"
    assert trend(Interval(0.5, 0.0, 1.0, 10)) == "n.s."  # touching 0 counts as containing it
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([0.0, float("nan")])
    with pytest.raises(ValueError, match="shapes differ"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_mean([1.0, 2.0], n_boot=0)


def _data(runs: dict) -> EvalData:
    """runs: (key, k, seed) -> dict query -> acc."""
    methods = {}
    acc = {}
    for (key, k, seed), qa in runs.items():
        cell = (
            Cell(reward_spec("hard_plus_soft", hard_weight=len(key)), True)
            if key.startswith("v3")
            else None
        )
        methods[key] = MethodInfo(key=key, method="v3" if key.startswith("v3") else key, cell=cell)
        acc.setdefault((key, k), {})[seed] = pd.Series(qa, dtype=float)
    return EvalData(methods=methods, acc=acc, shots=sorted({k for _, k in acc}))


def test_compare_pairs_common_seeds_only():
    q = list(range(10))
    runs = {
        ("v3:a", 1, 0): dict.fromkeys(q, 1.0),
        ("v3:a", 1, 1): dict.fromkeys(q, 0.0),
        ("v3:b", 1, 1): {i: 1.0 if i < 5 else 0.0 for i in q},
        ("v3:b", 1, 2): dict.fromkeys(q, 1.0),
    }
    c = compare(_data(runs), "v3:a", "v3:b", 1, n_boot=200, seed=0)
    assert c.seeds == (1,) and c.pairing == "paired by seed"
    assert c.interval.estimate == pytest.approx(-50.0)  # seed 1 only: 0 - 0.5, in points
    assert c.per_seed == ((1, pytest.approx(-50.0)),)


def test_compare_seeded_vs_unseeded_and_missing():
    q = list(range(8))
    runs = {
        ("v3:a", 2, 0): dict.fromkeys(q, 1.0),
        ("v3:a", 2, 1): dict.fromkeys(q, 0.5),
        ("random", 2, None): dict.fromkeys(q, 0.25),
        ("random", 3, None): dict.fromkeys(q, 0.25),
    }
    d = _data(runs)
    c = compare(d, "v3:a", "random", 2, n_boot=200, seed=0)
    assert c.pairing == "seed means" and c.seeds == (0, 1)
    assert c.interval.estimate == pytest.approx(50.0)  # mean(1, .5) - .25
    assert [s for s, _ in c.per_seed] == [0, 1]
    assert c.per_seed[0][1] == pytest.approx(75.0) and c.per_seed[1][1] == pytest.approx(25.0)
    assert c.seeds_agree is True
    miss = compare(d, "v3:a", "random", 3)
    assert (
        not miss.available and miss.reason.startswith("no results for v3") and "k=3" in miss.reason
    )


def test_compare_uses_queries_common_to_all_runs():
    runs = {
        ("v3:a", 1, 0): {1: 1.0, 2: 1.0, 3: 1.0},
        ("v3:b", 1, 0): {2: 0.0, 3: 1.0, 4: 0.0},
    }
    c = compare(_data(runs), "v3:a", "v3:b", 1, n_boot=100)
    assert c.interval.n == 2 and c.interval.estimate == pytest.approx(50.0)
    disjoint = {("v3:a", 1, 0): {1: 1.0}, ("v3:b", 1, 0): {2: 0.0}}
    c = compare(_data(disjoint), "v3:a", "v3:b", 1)
    assert not c.available and "no test queries in common" in c.reason


def test_method_accuracy_spread_over_seeds():
    q = list(range(20))
    runs = {("v2", 1, 0): dict.fromkeys(q, 0.5), ("v2", 1, 1): dict.fromkeys(q, 0.7)}
    m = method_accuracy(_data(runs), "v2", 1, n_boot=100, seed=0)
    assert m.interval.estimate == pytest.approx(60.0)
    assert [v for _, v in m.per_seed] == [pytest.approx(50.0), pytest.approx(70.0)]
    assert m.seed_sd == pytest.approx(np.std([50.0, 70.0], ddof=1))
