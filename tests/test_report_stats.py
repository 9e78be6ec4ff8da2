"""The report's statistics on synthetic data with known answers (docs/science.md §10).

Coverage, power and the seed level are checked by simulation (vectorised data, the library's
own bootstrap per dataset); Holm against a hand-worked example; the detection of comparisons
that cannot differ on small fixtures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from icdrl.report.bootstrap import (
    LEVEL_QUERIES,
    LEVEL_SEEDS,
    VarianceParts,
    cluster_codes,
    index_matrix,
    paired_bootstrap,
    resample,
    z_mde,
)
from icdrl.report.compare import Comparison, compare, family
from icdrl.report.degenerate import (
    BY_SOFT,
    ORDER,
    SINGLE_ANSWER,
    cannot_differ,
    distinct_selectors,
    identical_choices,
    reward_equivalence,
)
from icdrl.report.inputs import EvalData, MethodInfo, RewardGroups
from icdrl.report.multiplicity import expected_by_chance, holm, holm_flags
from icdrl.report.power import plan_lines, power_plan
from icdrl.rewards import MODES

N_SETS = 1000  # simulated datasets per coverage check: binomial SE of a 95% rate = 0.7 points
DELTA = 0.05


# ----------------------------------------------------------------------------- synthetic data


def single_level(rng, n_sets: int, q: int, delta: float = DELTA):
    """Paired 0/1 accuracies with known mean delta: per query p_B ~ U(0.3, 0.6), p_A = p_B + delta,
    and the two answers share their uniform draw half of the time (positively correlated)."""
    pb = rng.uniform(0.3, 0.6, (n_sets, q))
    u = rng.random((n_sets, q))
    v = np.where(rng.random((n_sets, q)) < 0.5, u, rng.random((n_sets, q)))
    return (v < pb + delta).astype(float), (u < pb).astype(float)


def clustered(rng, n_sets: int, n_clusters: int = 100, tau: float = 0.25, rho: float = 0.8):
    """Questions on one image (1–6 per image) share a cluster effect ±tau on the delta and, with
    probability rho, one uniform draw; E[A − B] = DELTA exactly."""
    sizes = np.resize(np.arange(1, 7), n_clusters)
    cl = np.repeat(np.arange(n_clusters), sizes)
    pb = rng.uniform(0.3, 0.6, (n_sets, n_clusters))
    pa = pb + DELTA + tau * rng.choice([-1.0, 1.0], (n_sets, n_clusters))
    uc = rng.random((n_sets, n_clusters))
    u = np.where(rng.random((n_sets, cl.size)) < rho, uc[:, cl], rng.random((n_sets, cl.size)))
    return (u < pa[:, cl]).astype(float), (u < pb[:, cl]).astype(float), cl


def coverage(ivs, truth: float) -> float:
    return float(np.mean([iv.low <= truth <= iv.high for iv in ivs]))


# ----------------------------------------------------------------------------- coverage


def test_single_level_interval_covers_the_true_delta():
    a, b = single_level(np.random.default_rng(1), N_SETS, 300)
    ivs = [paired_bootstrap(a[i], b[i], n_boot=1000, seed=0) for i in range(N_SETS)]
    cov = coverage(ivs, DELTA)
    assert 0.93 <= cov <= 0.97, cov  # measured: 0.957
    assert all(iv.levels == LEVEL_QUERIES and iv.n_seeds == 1 for iv in ivs)


def test_clustered_interval_covers_and_ignoring_clusters_under_covers():
    a, b, cl = clustered(np.random.default_rng(2), N_SETS)
    by_image = [
        paired_bootstrap(a[i], b[i], n_boot=1000, seed=0, clusters=cl) for i in range(N_SETS)
    ]
    by_query = [paired_bootstrap(a[i], b[i], n_boot=1000, seed=0) for i in range(N_SETS)]
    cov, naive = coverage(by_image, DELTA), coverage(by_query, DELTA)
    assert 0.93 <= cov <= 0.97, cov  # measured: 0.941
    assert naive < 0.85, naive  # measured: 0.702: questions on one image are not independent
    assert by_image[0].n_clusters == 100 and by_image[0].n == cl.size


def _seeded(rng, n_sets, s, q, sd_seed, sd_query=0.3, sd_noise=0.6):
    """Deltas d[s, q] = DELTA + seed effect + query effect + noise (seeds crossed with queries)."""
    return (
        DELTA
        + rng.normal(0, sd_seed, (n_sets, s, 1))
        + rng.normal(0, sd_query, (n_sets, 1, q))
        + rng.normal(0, sd_noise, (n_sets, s, q))
    )


def test_two_level_interval_covers_with_seed_noise_and_query_only_does_not():
    rng = np.random.default_rng(3)
    d = _seeded(rng, N_SETS, 5, 200, sd_seed=0.03)
    two = [resample(d[i], np.zeros_like(d[i]), n_boot=1000, seed=0) for i in range(N_SETS)]
    cov = coverage(two, DELTA)
    assert 0.93 <= cov <= 0.97, cov
    assert two[0].levels == LEVEL_SEEDS and two[0].n_seeds == 5
    # a larger seed effect: averaging seeds and resampling queries only misses training noise
    n = N_SETS // 2
    d = _seeded(rng, n, 3, 200, sd_seed=0.06)
    two = [resample(d[i], np.zeros_like(d[i]), n_boot=1000, seed=0) for i in range(n)]
    avg = [resample(d[i].mean(axis=0), n_boot=1000, seed=0) for i in range(n)]
    assert coverage(avg, DELTA) < 0.85 < coverage(two, DELTA), (
        coverage(avg, DELTA),
        coverage(two, DELTA),
    )


def test_two_level_variance_matches_the_crossed_design():
    # no seed effect: the seed part must not double-count the seed x query noise (kappa ~ 0)
    rng = np.random.default_rng(4)
    d = _seeded(rng, 300, 4, 200, sd_seed=0.0, sd_query=0.1, sd_noise=0.7)
    true_se = math.sqrt(0.1**2 / 200 + 0.7**2 / (4 * 200))
    ses = [resample(x, np.zeros_like(x), n_boot=500, seed=0).se for x in d]
    assert np.mean(ses) == pytest.approx(true_se, rel=0.15)  # a naive seed x query bootstrap: ~1.6x
    parts = resample(d[0], np.zeros_like(d[0]), n_boot=500, seed=0).parts
    assert parts.noise_unit == pytest.approx(0.7**2, rel=0.1)


# ----------------------------------------------------------------------------- resampling contract


def test_paired_resamples_share_indices_and_are_deterministic():
    rng = np.random.default_rng(5)
    a, b = rng.random(80), rng.random(80)
    iv = paired_bootstrap(a, b, n_boot=400, seed=3)
    idx = index_matrix(80, 400, 3)
    means = (a - b)[idx].mean(axis=1)  # one index vector for both sides
    assert iv.low == pytest.approx(np.quantile(means, 0.025), abs=1e-12)
    assert iv.high == pytest.approx(np.quantile(means, 0.975), abs=1e-12)
    assert iv == paired_bootstrap(a, b, n_boot=400, seed=3)
    assert iv != paired_bootstrap(a, b, n_boot=400, seed=4)
    # clusters: the same draws over clusters whatever the labels' spelling
    cl = np.repeat(np.arange(40), 2)
    lab = [f"img{c}" for c in cl]
    assert paired_bootstrap(a, b, n_boot=400, seed=3, clusters=cl) == paired_bootstrap(
        a, b, n_boot=400, seed=3, clusters=lab
    )


def test_seed_draws_are_shared_when_paired_and_separate_when_not():
    rng = np.random.default_rng(6)
    a = rng.random((3, 60)) + np.array([[0.2], [0.0], [-0.2]])  # strong seed effect
    b = a - 0.1 + 0.01 * rng.random((3, 60))
    paired = paired_bootstrap(a, b, n_boot=1000, seed=0)
    unpaired = paired_bootstrap(a, b, n_boot=1000, seed=0, paired=False)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    # the shared seed effect cancels in the paired delta only
    assert paired.high - paired.low < 0.25 * (unpaired.high - unpaired.low)
    assert paired.levels == unpaired.levels == LEVEL_SEEDS


def test_cluster_codes_number_images_by_first_appearance():
    assert cluster_codes(["b", "a", None, "b", "", "a"]).tolist() == [0, 1, 2, 0, 3, 1]
    assert cluster_codes(None, 3).tolist() == [0, 1, 2]


def test_p_value_agrees_with_the_interval():
    a, b = single_level(np.random.default_rng(7), 200, 150, delta=0.06)
    for i in range(200):
        iv = paired_bootstrap(a[i], b[i], n_boot=2000, seed=0)
        if min(abs(iv.low), abs(iv.high)) > 0.005:  # away from the boundary the two decide alike
            assert (iv.p < 0.05) == (not iv.contains_zero), (iv.p, iv.low, iv.high)
    same = paired_bootstrap(a[0], a[0], n_boot=500, seed=0)
    assert same.p == 1.0 and (same.low, same.high) == (0.0, 0.0)
    assert paired_bootstrap(np.ones(30), np.zeros(30), n_boot=500).p == pytest.approx(2 / 501)


# ----------------------------------------------------------------------------- Holm


def test_holm_hand_worked_example_with_ties_and_one():
    p = [0.01, 0.04, 0.03, 0.005, 0.04, 1.0]
    # sorted: 0.005 (x6=0.03), 0.01 (x5=0.05), 0.03 (x4=0.12), 0.04 (x3=0.12), 0.04 (x2=0.08 -> 0.12),
    # 1.0 (x1=1.0); step-down keeps the running maximum
    assert holm(p).tolist() == pytest.approx([0.05, 0.12, 0.12, 0.03, 0.12, 1.0])
    adj, sig = holm_flags(p, alpha=0.05)
    assert sig.tolist() == [True, False, False, True, False, False]
    assert holm([0.02, 0.02]).tolist() == [0.04, 0.04]  # ties: the same value in either order
    assert holm([1.0, 1.0, 1.0]).tolist() == [1.0, 1.0, 1.0]
    assert holm([0.3, 0.6]).tolist() == [0.6, 0.6]  # capped at 1, then monotone
    assert holm([]).size == 0
    assert expected_by_chance(40) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="p-values"):
        holm([0.5, 1.5])


# ----------------------------------------------------------------------------- power


def discordant(rng, n_sets: int, q: int, delta: float, r: float = 0.2):
    """Paired 0/1 answers: A alone right w.p. r + δ/2, B alone right w.p. r − δ/2, else both right or
    both wrong (equally likely). E[A − B] = δ and Var(A − B) = 2r − δ² hardly moves with δ, so
    a variance observed at one effect holds at another."""
    u = rng.random((n_sets, q))
    a_only, b_only = u < r + delta / 2, (u >= r + delta / 2) & (u < 2 * r)
    both = (u >= 2 * r) & (u < 2 * r + (1 - 2 * r) / 2)
    return (a_only | both).astype(float), (b_only | both).astype(float)


def test_simulation_at_the_reported_mde_detects_it_80_percent_of_the_time():
    rng = np.random.default_rng(8)
    q = 400
    # the MDE the report gives for this design: each pilot's from its own observed paired variance
    pa, pb = discordant(rng, 20, q, DELTA)
    pilots = [paired_bootstrap(pa[i], pb[i], n_boot=1000, seed=0) for i in range(20)]
    assert pilots[0].mde() == pytest.approx(z_mde() * pilots[0].se)
    mde = float(np.median([iv.mde() for iv in pilots]))
    a, b = discordant(rng, N_SETS, q, mde)
    detected = np.mean(
        [paired_bootstrap(a[i], b[i], n_boot=1000, seed=0).p < 0.05 for i in range(N_SETS)]
    )
    assert 0.75 <= detected <= 0.85, (mde, detected)
    # and the MDE is not a tautology: at half of it the power is far lower
    a, b = discordant(rng, N_SETS // 2, q, mde / 2)
    assert (
        np.mean(
            [paired_bootstrap(a[i], b[i], n_boot=1000, seed=0).p < 0.05 for i in range(N_SETS // 2)]
        )
        < 0.4
    )


def test_queries_needed_solves_the_variance_formula():
    parts = VarianceParts(
        seed_unit=0.0,
        query_unit=0.25,
        noise_unit=0.0,
        n_seeds=1,
        n_queries=100,
        n_clusters=100,
        seed_measured=True,
    )
    z = z_mde()
    need = parts.queries_needed(0.01, 1)
    assert z * math.sqrt(parts.at(1, need)) <= 0.01 < z * math.sqrt(parts.at(1, need - 1))
    # seed noise: more seeds lower the count; too much of it makes any count insufficient
    noisy = VarianceParts(1e-4, 0.25, 0.2, 2, 100, 100, True)
    assert noisy.queries_needed(0.01, 2) is None
    assert noisy.queries_needed(0.05, 2) > noisy.queries_needed(0.05, 5)


def test_power_plan_lines_and_unmeasured_seeds():
    rng = np.random.default_rng(9)
    a, b = single_level(rng, 3, 200)
    comps = [
        Comparison(
            "x",
            "y",
            k,
            paired_bootstrap(a[k], b[k], n_boot=500, seed=0, seeded=(True, True)).scaled(100),
        )
        for k in range(3)
    ]
    plan = power_plan(comps, delta=1.0)
    assert plan.n_comparisons == 3 and plan.n_queries == (200,) and not plan.seed_measured
    lines = plan_lines(plan)
    assert "Test queries needed to resolve 1 point" in lines[1]
    assert [ln.strip().split(":")[0] for ln in lines if ln.startswith("  ")] == ["1 seed"]
    assert "lower bounds" in lines[-1]
    med = sorted(c.interval.parts.queries_needed(1.0, 1) for c in comps)[1]
    assert f"median comparison {med:,}" in lines[2]


# ----------------------------------------------------------------------------- cannot differ


def _rewards_file(label, fn, hard, soft, info):
    """A RewardGroups file whose rewards are fn(h, s, i) per group."""
    n_groups = len(hard)
    return RewardGroups(
        label,
        label,
        [fn(h, s, i) for h, s, i in zip(hard, soft, info)],
        hard,
        np.zeros(n_groups, dtype=int),
        soft,
        list(range(n_groups)),
    )


def _one_answer_rewards(rng, n_groups=30, n_cands=8):
    """Rewards files of one single-answer scored set (s = h): legacy, hard_plus_soft(_v2)."""
    hard = [(rng.random(n_cands) < 0.4).astype(float) for _ in range(n_groups)]
    soft = [h.copy() for h in hard]
    info = [rng.normal(0, 0.1, n_cands) for _ in range(n_groups)]

    def file(label, fn):
        return _rewards_file(label, fn, hard, soft, info)

    return {
        "legacy-a1-b0": file("legacy-a1-b0", lambda h, s, i: i),
        "hard_plus_soft-hw1-sw1": file("hard_plus_soft-hw1-sw1", lambda h, s, i: h + s),
        "hard_plus_soft-hw2-sw1": file("hard_plus_soft-hw2-sw1", lambda h, s, i: 2 * h + s),
        "hard_plus_soft_v2-hw1-sw1": file("hard_plus_soft_v2-hw1-sw1", lambda h, s, i: s + 2 * h),
    }


def _eval_data(cells: dict, n_q=20, shots=(1, 2)) -> EvalData:
    """cells: key -> (MethodInfo, {k: list of icd tuples per query}, {k: accuracies})."""
    methods, acc, icds = {}, {}, {}
    for key, (info, ch, ac) in cells.items():
        methods[key] = info
        for k in shots:
            acc[(key, k)] = {0: pd.Series(ac[k], index=range(n_q), dtype=float)}
            icds[(key, k)] = {0: dict(zip(range(n_q), ch[k]))}
    return EvalData(methods=methods, acc=acc, shots=list(shots), icds=icds)


def _v3(slug, mode, use_rank, hw=None, sw=None):
    """A v3 method; a mode that is not registered ("x") stands for some other distinct cell."""
    from icdrl.grid import Cell, reward_spec

    spec = (
        reward_spec(mode, hard_weight=hw, soft_weight=sw)
        if mode in MODES
        else reward_spec("legacy", alpha=float(sum(map(ord, slug))))
    )
    return MethodInfo(key=f"v3:{slug}", method="v3", cell=Cell(spec, use_rank))


def test_finds_the_hard_plus_soft_rank_cells_on_a_one_answer_fixture():
    eq = reward_equivalence(_one_answer_rewards(np.random.default_rng(10)))
    assert eq.classes == (
        ("hard_plus_soft-hw1-sw1", "hard_plus_soft-hw2-sw1", "hard_plus_soft_v2-hw1-sw1"),
    )
    why = eq.same_order("hard_plus_soft-hw1-sw1", "hard_plus_soft-hw2-sw1")
    assert why.startswith(SINGLE_ANSWER)
    assert eq.same_order("legacy-a1-b0", "hard_plus_soft-hw1-sw1") == ""
    rng = np.random.default_rng(11)
    choice = {
        k: [tuple(rng.choice(50, k, replace=False).tolist()) for _ in range(20)] for k in (1, 2)
    }
    other = {
        k: [tuple(rng.choice(50, k, replace=False).tolist()) for _ in range(20)] for k in (1, 2)
    }
    accs = {k: rng.random(20).round(1).tolist() for k in (1, 2)}
    accs2 = {k: rng.random(20).round(1).tolist() for k in (1, 2)}
    data = _eval_data(
        {
            "v3:hard_plus_soft-hw1-sw1-rank": (
                _v3("hard_plus_soft-hw1-sw1-rank", "hard_plus_soft", True, 1, 1),
                choice,
                accs,
            ),
            "v3:hard_plus_soft-hw2-sw1-rank": (
                _v3("hard_plus_soft-hw2-sw1-rank", "hard_plus_soft", True, 2, 1),
                other,
                accs2,
            ),
            "v3:hard_plus_soft-hw1-sw1-zscore": (
                _v3("hard_plus_soft-hw1-sw1-zscore", "hard_plus_soft", False, 1, 1),
                choice,
                accs,
            ),
            "v3:hard_plus_soft-hw2-sw1-zscore": (
                _v3("hard_plus_soft-hw2-sw1-zscore", "hard_plus_soft", False, 2, 1),
                other,
                accs2,
            ),
        }
    )
    data.reward_orders = eq
    # (a) rank cells on order-equivalent rewards: by construction, even where the records differ
    assert cannot_differ(
        data, "v3:hard_plus_soft-hw2-sw1-rank", "v3:hard_plus_soft-hw1-sw1-rank", 1
    ).startswith("cannot differ: " + SINGLE_ANSWER)
    # z-score cells with different choices can differ; (b) z-score cell with the same choices cannot
    assert (
        cannot_differ(
            data, "v3:hard_plus_soft-hw2-sw1-zscore", "v3:hard_plus_soft-hw1-sw1-zscore", 1
        )
        == ""
    )
    assert "identical selectors" in cannot_differ(
        data, "v3:hard_plus_soft-hw1-sw1-zscore", "v3:hard_plus_soft-hw1-sw1-rank", 2
    )
    assert not identical_choices(
        data, "v3:hard_plus_soft-hw1-sw1-rank", "v3:hard_plus_soft-hw2-sw1-rank", 1
    )
    groups = distinct_selectors(data)
    assert sorted(map(sorted, groups)) == sorted(
        map(
            sorted,
            [
                [
                    "v3:hard_plus_soft-hw1-sw1-rank",
                    "v3:hard_plus_soft-hw2-sw1-rank",
                    "v3:hard_plus_soft-hw1-sw1-zscore",
                ],
                ["v3:hard_plus_soft-hw2-sw1-zscore"],
            ],
        )
    )


def _ten_answer_rewards(rng, n_groups=30, n_cands=8):
    """VQA-style soft scores (0, .3, .6, .9, 1) with h = 1[s >= 1], and InfoScore."""
    soft = [rng.choice([0.0, 0.3, 0.6, 0.9, 1.0], n_cands) for _ in range(n_groups)]
    hard = [(s >= 1.0).astype(float) for s in soft]
    info = [rng.normal(0, 0.1, n_cands) for _ in range(n_groups)]

    def file(label, fn):
        return _rewards_file(label, fn, hard, soft, info)

    return {
        "legacy-a1-b0": file("legacy-a1-b0", lambda h, s, i: i),
        "hard_plus_soft-hw1-sw1": file("hard_plus_soft-hw1-sw1", lambda h, s, i: h + s),
        "hard_plus_soft-hw2-sw0.5": file(
            "hard_plus_soft-hw2-sw0.5", lambda h, s, i: 2 * h + 0.5 * s
        ),
        "hard_plus_soft-hw1-sw0": file("hard_plus_soft-hw1-sw0", lambda h, s, i: h + 0 * s),
        "hybrid-hw0.5-is10": file(
            "hybrid-hw0.5-is10", lambda h, s, i: 0.5 * np.clip(10 * i, 0, 1) + 0.5 * (h + 0.5 * s)
        ),
    }


def test_rewards_that_order_groups_differently_are_not_flagged():
    rewards = _ten_answer_rewards(np.random.default_rng(12))
    eq = reward_equivalence(rewards)
    # with h = 1[s >= 1] every positive weighting of h and s orders candidates as s does ...
    assert eq.classes == (("hard_plus_soft-hw1-sw1", "hard_plus_soft-hw2-sw0.5"),)
    assert eq.same_order("hard_plus_soft-hw1-sw1", "hard_plus_soft-hw2-sw0.5").startswith(BY_SOFT)
    # ... but hard alone ties the partial credits, and InfoScore orders differently
    for other in ("hard_plus_soft-hw1-sw0", "legacy-a1-b0", "hybrid-hw0.5-is10"):
        assert eq.same_order("hard_plus_soft-hw1-sw1", other) == "", other
    # order-equivalent for another reason: flagged with the general one
    base = rewards["legacy-a1-b0"]
    scaled = RewardGroups(
        "x3",
        "x3",
        [3 * r + 1 for r in base.rewards],
        base.hard,
        base.missing,
        base.soft,
        base.anchors,
    )
    eq = reward_equivalence({"a": base, "x3": scaled})
    assert eq.same_order("a", "x3").startswith(ORDER)
    assert reward_equivalence({"a": base, "b": rewards["hard_plus_soft-hw1-sw0"]}).classes == ()


def test_same_choices_but_different_answers_are_not_flagged():
    ch = {k: [(i, i + 1)[:k] for i in range(20)] for k in (1, 2)}
    data = _eval_data(
        {
            "v3:a-rank": (_v3("a-rank", "x", True), ch, {k: [1.0] * 20 for k in (1, 2)}),
            "v3:b-rank": (_v3("b-rank", "x", True), ch, {k: [1.0] * 19 + [0.0] for k in (1, 2)}),
        }
    )
    assert not identical_choices(data, "v3:a-rank", "v3:b-rank", 1)
    assert cannot_differ(data, "v3:a-rank", "v3:b-rank", 1) == ""


def test_family_counts_repeats_once_and_leaves_untestable_out_of_holm():
    rng = np.random.default_rng(14)
    n = 60
    base = rng.random(n).round(1)
    better = np.clip(base + 0.3, 0, 1)
    ch1 = {k: [(i,) * 1 if k == 1 else (i, i + 100) for i in range(n)] for k in (1, 2)}
    ch2 = {k: [(i + 1,) if k == 1 else (i + 1, i + 101) for i in range(n)] for k in (1, 2)}
    ch3 = {k: [(i + 2,) if k == 1 else (i + 2, i + 102) for i in range(n)] for k in (1, 2)}
    data = _eval_data(
        {
            "v3:legacy-rank": (
                _v3("legacy-rank", "legacy", True),
                ch3,
                {1: base.tolist(), 2: base.tolist()},
            ),
            "v3:a-rank": (_v3("a-rank", "x", True), ch1, {1: better.tolist(), 2: better.tolist()}),
            "v3:b-rank": (
                _v3("b-rank", "x", True),
                ch1,
                {1: better.tolist(), 2: better.tolist()},
            ),  # = a
            "v3:c-rank": (_v3("c-rank", "x", True), ch2, {1: base.tolist(), 2: base.tolist()}),
        },
        n_q=n,
    )
    comps = [
        compare(data, x, "v3:legacy-rank", k, n_boot=500)
        for k in (1, 2)
        for x in ("v3:a-rank", "v3:b-rank", "v3:c-rank")
    ]
    comps.append(compare(data, "v3:b-rank", "v3:a-rank", 1, n_boot=500))  # identical selectors
    fam = family(comps, data)
    status = [c.status for c in fam]
    assert status == ["tested", "duplicate", "tested"] * 2 + ["cannot differ"]
    assert all(c.family_size == 4 for c in fam if c.tested)
    tested_p = [c.p for c in fam if c.tested]
    assert [c.p_holm for c in fam if c.tested] == pytest.approx(holm(tested_p).tolist())
    dup = fam[1]
    assert (
        dup.duplicate_of.startswith(data.methods["v3:a-rank"].long())
        and dup.p_holm == fam[0].p_holm
    )
    assert fam[0].significant_holm is True and fam[2].significant_holm is False
    assert fam[-1].p_holm is None and "identical selectors" in fam[-1].degenerate


def test_eval_records_give_the_clusters(tmp_path):
    from icdrl.records import write_jsonl
    from icdrl.report.inputs import load_eval

    def rec(q, img, acc=1.0, method="random"):
        return {
            "method": method,
            "cell": None,
            "seed": None,
            "k": 1,
            "query_id": q,
            "icd_ids": [1],
            "prediction_raw": "x",
            "prediction": "x",
            "acc": acc,
            "image_id": img,
        }

    write_jsonl(tmp_path / "a.jsonl", "icdrl.eval", [rec(1, "i1"), rec(2, "i1"), rec(3, None)])
    data = load_eval([tmp_path / "a.jsonl"])
    assert data.clusters([1, 2, 3]) == ["i1", "i1", None]
    assert cluster_codes(data.clusters([1, 2, 3])).tolist() == [0, 0, 1]
    write_jsonl(tmp_path / "b.jsonl", "icdrl.eval", [rec(1, "i2", method="similarity")])
    with pytest.raises(ValueError, match="query_id 1 has image_id 'i2'"):
        load_eval([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    write_jsonl(tmp_path / "c.jsonl", "icdrl.eval", [{**rec(1, None), "image_id": None}])
    assert (
        load_eval([tmp_path / "c.jsonl"]).clusters([1]) is None
    )  # no image recorded: queries singly
