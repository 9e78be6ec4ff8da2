"""Reward modes (docs/science.md §6) at their boundaries, the reference implementation's own numbers, and write_rewards."""

from __future__ import annotations

import itertools
import json
import logging
import math

import numpy as np
import pytest
import torch

from icdrl import rewards as R
from icdrl.records import read_jsonl, write_jsonl

H = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
S = np.array([0.0, 1.0, 0.0, 1.0, 0.6, 0.7])
INFO = np.array([0.0, 0.05, -0.02, 0.2, 0.1, 0.03])


def test_modes_and_unknown_mode_lists_valid_ones():
    assert R.MODES == ("legacy", "hard_plus_soft", "hard_plus_soft_v2", "hybrid", "adaptive")
    assert tuple(R.REGISTRY) == R.MODES
    with pytest.raises(ValueError) as e:
        R.reward("plan5", hard=1, soft=1, info=0)
    for m in R.MODES:
        assert m in str(e.value)
    with pytest.raises(ValueError):
        R.knobs_used("nope")


def test_seed_numbers_v2():
    assert R.reward("hard_plus_soft_v2", hard=1, soft=1, info=0) == 3.0
    assert R.reward("hard_plus_soft_v2", hard=0, soft=0, info=0) == 0.0
    # positives in [2, 3], negatives in [0, 1] (the reference implementation's gap)
    s = np.linspace(0, 1, 11)
    pos = R.reward("hard_plus_soft_v2", hard=np.ones(11), soft=s, info=None)
    neg = R.reward("hard_plus_soft_v2", hard=np.zeros(11), soft=s, info=None)
    assert pos.min() == 2.0 and pos.max() == 3.0 and neg.min() == 0.0 and neg.max() == 1.0
    # weights: w_s·s + 2·w_h·h
    assert (
        R.reward("hard_plus_soft_v2", hard=1, soft=0.5, info=0, hard_weight=2.0, soft_weight=0.5)
        == 4.25
    )


def test_hard_plus_soft():
    assert R.reward("hard_plus_soft", hard=1, soft=1, info=9) == 2.0
    assert R.reward("hard_plus_soft", hard=0, soft=0.99, info=9) == pytest.approx(
        0.99
    )  # negatives reach ~1
    for hw, sw in [(1, 1), (2, 1), (1, 0.5), (2, 0.5)]:
        got = R.reward("hard_plus_soft", hard=H, soft=S, info=INFO, hard_weight=hw, soft_weight=sw)
        np.testing.assert_allclose(got, hw * H + sw * S)


def test_legacy():
    np.testing.assert_allclose(
        R.reward("legacy", hard=H, soft=S, info=INFO), INFO
    )  # α=1, β=0: InfoScore
    # the reference implementation's "plan 5": α=0, β=1 → correctness only
    np.testing.assert_allclose(
        R.reward("legacy", hard=H, soft=S, info=INFO, alpha=0.0, beta=1.0), H
    )
    assert R.reward("legacy", hard=1, soft=0, info=0.1, alpha=2.0, beta=0.5) == pytest.approx(0.7)


def test_hybrid_documented_formula_and_boundaries():
    # defect 10: hybrid must be a·min(1, max(0, I·scale)) + (1−a)·(h + 0.5·s), a = hybrid_alpha
    assert R.reward("hybrid", hard=1, soft=0.8, info=0.05, hybrid_alpha=0.5) == pytest.approx(
        0.5 * 0.5 + 0.5 * 1.4
    )
    assert R.reward("hybrid", hard=1, soft=0.8, info=0.05) == pytest.approx(
        0.5 * 0.5 + 0.5 * 1.4
    )  # default 0.5
    # a = 1: the info part only, clipped to [0, 1]
    assert R.reward("hybrid", hard=1, soft=1, info=0.5, hybrid_alpha=1.0) == 1.0
    assert R.reward("hybrid", hard=1, soft=1, info=-0.3, hybrid_alpha=1.0) == 0.0
    assert R.reward("hybrid", hard=0, soft=0, info=0.03, hybrid_alpha=1.0) == pytest.approx(0.3)
    # a = 0: correctness only, h + 0.5·s; InfoScore has no weight
    assert R.reward("hybrid", hard=1, soft=1, info=0.9, hybrid_alpha=0.0) == 1.5
    assert R.reward("hybrid", hard=0, soft=0.4, info=0.9, hybrid_alpha=0.0) == pytest.approx(0.2)
    # a outside [0, 1] is an error (no silent clipping); the weights are not read
    with pytest.raises(ValueError, match="hybrid_alpha"):
        R.reward("hybrid", hard=1, soft=1, info=0.03, hybrid_alpha=1.5)
    assert R.reward("hybrid", hard=1, soft=1, info=0.03, hard_weight=2.0) == R.reward(
        "hybrid", hard=1, soft=1, info=0.03
    )
    # info_scale
    assert R.reward(
        "hybrid", hard=0, soft=0, info=0.03, info_scale=20.0, hybrid_alpha=1.0
    ) == pytest.approx(0.6)
    got = R.reward("hybrid", hard=H, soft=S, info=INFO, hybrid_alpha=0.3)
    np.testing.assert_allclose(got, 0.3 * np.clip(INFO * 10, 0, 1) + 0.7 * (H + 0.5 * S))


def test_adaptive_weight_follows_the_groups_positive_ratio():

    def hyb(a, h, s, i):
        return R.group_rewards("hybrid", hard=h, soft=s, info=i, hybrid_alpha=a)

    s, i = np.array([0.2, 0.9, 0.5, 1.0]), np.array([0.01, 0.05, -0.02, 0.3])
    # p_g = 0 (all wrong) and p_g = 1 (all right): correctness cannot separate them -> InfoScore only
    for h in (np.zeros(4), np.ones(4)):
        assert R.adaptive_alpha(h) == 1.0
        np.testing.assert_array_equal(
            R.group_rewards("adaptive", hard=h, soft=s, info=i), hyb(1.0, h, s, i)
        )
    # p_g = 0.5: correctness separates them best -> correctness only
    h = np.array([1.0, 0.0, 1.0, 0.0])
    assert R.adaptive_alpha(h) == 0.0
    np.testing.assert_array_equal(R.group_rewards("adaptive", hard=h, soft=s, info=i), h + 0.5 * s)
    # p_g = 0.25: a = 1 − 4·0.25·0.75 = 0.25
    h = np.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(
        R.group_rewards("adaptive", hard=h, soft=s, info=i), hyb(0.25, h, s, i)
    )
    # it needs the group: the per-candidate reward refuses it
    with pytest.raises(ValueError, match="group_rewards"):
        R.reward("adaptive", hard=1, soft=1, info=0)


def test_group_rewards_boundaries_for_every_mode():
    for mode in R.MODES:
        # a group of one candidate
        one = R.group_rewards(mode, hard=[1.0], soft=[1.0], info=[0.02])
        assert one.shape == (1,) and np.isfinite(one).all()
        # all-equal and all-zero inputs give equal (finite) rewards
        flat = R.group_rewards(mode, hard=np.ones(5), soft=np.ones(5), info=np.full(5, 0.1))
        assert np.ptp(flat) == 0.0 and np.isfinite(flat).all()
        zero = R.group_rewards(mode, hard=np.zeros(5), soft=np.zeros(5), info=np.zeros(5))
        assert np.ptp(zero) == 0.0
        # an empty group gives an empty array
        assert R.group_rewards(mode, hard=[], soft=[], info=[]).shape == (0,)
        # for every mode but adaptive, the group rewards are the per-candidate rewards
        if not R.REGISTRY[mode].per_group:
            np.testing.assert_array_equal(
                R.group_rewards(mode, hard=H, soft=S, info=INFO),
                R.reward(mode, hard=H, soft=S, info=INFO),
            )
    with pytest.raises(ValueError, match="1-D"):
        R.group_rewards("legacy", hard=[[1.0]], soft=[[1.0]], info=[[0.0]])
    with pytest.raises(ValueError, match="unknown reward knob"):
        R.group_rewards("legacy", hard=H, soft=S, info=INFO, gamma=1.0)


def test_registering_a_mode_declares_everything_once():
    name = "test_only_mode"
    try:

        @R.register(name, knobs=("hard_weight",), inputs=("hard",))
        def _f(h, s, i, *, hard_weight):
            return hard_weight * h

        assert (
            name in R.REGISTRY
            and R.knobs_used(name) == {"hard_weight"}
            and R.inputs_used(name) == ("hard",)
        )
        np.testing.assert_array_equal(
            R.group_rewards(name, hard=H, soft=None, info=None, hard_weight=3.0), 3 * H
        )
        with pytest.raises(ValueError, match="registered twice"):
            R.register(name, knobs=(), inputs=())(_f)
        with pytest.raises(ValueError, match="unknown knobs"):
            R.register("other", knobs=("nope",), inputs=())
    finally:
        R.REGISTRY.pop(name, None)


def test_missing_values_count_as_zero():
    for mode in R.MODES:
        a = R.group_rewards(
            mode,
            hard=[1.0, None, float("nan")],
            soft=[None, 0.5, 1.0],
            info=[0.02, float("nan"), None],
        )
        b = R.group_rewards(mode, hard=[1.0, 0.0, 0.0], soft=[0.0, 0.5, 1.0], info=[0.02, 0.0, 0.0])
        np.testing.assert_array_equal(a, b)
        assert not np.isnan(a).any()
        # a whole input missing
        np.testing.assert_array_equal(
            R.group_rewards(mode, hard=H, soft=None, info=INFO),
            R.group_rewards(mode, hard=H, soft=np.zeros(6), info=INFO),
        )
        if not R.REGISTRY[mode].per_group:
            assert R.reward(mode, hard=None, soft=None, info=None) == 0.0


def test_kinds_and_shapes():
    assert isinstance(R.reward("hybrid", hard=1, soft=0.5, info=0.01), float)
    assert isinstance(R.group_rewards("hybrid", hard=[1], soft=[0.5], info=[0.01]), np.ndarray)
    out = R.reward("hard_plus_soft", hard=[1, 0], soft=[0.5, 0.5], info=[0, 0])
    assert isinstance(out, np.ndarray) and out.tolist() == [1.5, 0.5]
    t = R.reward(
        "hard_plus_soft_v2",
        hard=torch.tensor([[1.0, 0.0]]),
        soft=torch.tensor([[1.0, 0.2]]),
        info=torch.zeros(1, 2),
    )
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (1, 2)
    assert torch.allclose(t, torch.tensor([[3.0, 0.2]]))
    with pytest.raises(ValueError, match="shape"):
        R.reward("hard_plus_soft", hard=[1, 0], soft=[1, 0, 0], info=None)
    with pytest.raises(ValueError, match="infinite"):
        R.reward("legacy", hard=0, soft=0, info=float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        R.reward("legacy", hard=0, soft=0, info=0, alpha=float("nan"))


def test_knobs_used_match_the_formulas():
    assert R.knobs_used("legacy") == {"alpha", "beta"}
    assert (
        R.knobs_used("hard_plus_soft")
        == R.knobs_used("hard_plus_soft_v2")
        == {"hard_weight", "soft_weight"}
    )
    assert R.knobs_used("hybrid") == {"hybrid_alpha", "info_scale"}
    assert R.knobs_used("adaptive") == {"info_scale"}
    base = dict(
        hard_weight=0.4, soft_weight=0.7, alpha=0.9, beta=0.3, hybrid_alpha=0.6, info_scale=10.0
    )
    h = np.array([1.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # p = 1/3: adaptive's weight is neither 0 nor 1
    i = np.array([0.01, 0.05, 0.02, 0.06, 0.03, 0.04])  # inside the clip range at scale 10 and 5
    for mode in R.MODES:
        ref = R.group_rewards(mode, hard=h, soft=S, info=i, **base)
        for knob in R.KNOBS:
            changed = R.group_rewards(
                mode, hard=h, soft=S, info=i, **{**base, knob: base[knob] * 0.5}
            )
            if knob in R.knobs_used(mode):
                assert not np.allclose(changed, ref), (mode, knob)
            else:
                np.testing.assert_array_equal(changed, ref)
    # the inputs each mode reads: changing another one changes nothing
    for mode in R.MODES:
        vals = {"hard": h, "soft": S, "info": i}
        ref = R.group_rewards(mode, **vals, **base)
        for inp in R.INPUTS:
            other = R.group_rewards(mode, **{**vals, inp: np.roll(vals[inp], 1)}, **base)
            assert np.array_equal(other, ref) == (inp not in R.inputs_used(mode)), (mode, inp)


def _scored(path, cands_per_anchor):
    recs = []
    for aid, cands in cands_per_anchor.items():
        recs.append(
            {
                "anchor_id": aid,
                "pool": list(range(100, 108)),
                "candidates": [
                    {
                        "source": "beam",
                        "icd_ids": [100 + i, 101 + i],
                        "icd_pos": [i, i + 1],
                        "step_gains": [0.0, 0.0],
                        "prediction_raw": "x",
                        "prediction": "x",
                        **c,
                    }
                    for i, c in enumerate(cands)
                ],
            }
        )
    write_jsonl(path, "icdrl.scored", recs)


def test_write_rewards_counts_and_logs_missing(tmp_path, caplog):
    scored = tmp_path / "scored.jsonl"
    _scored(
        scored,
        {
            7: [
                {"info_score": 0.02, "vqa_correct": 1, "vqa_acc_score": 1.0},
                {"info_score": None, "vqa_correct": 0, "vqa_acc_score": 0.3},
            ],
            9: [{"info_score": 0.01, "vqa_correct": True, "vqa_acc_score": None}],
        },
    )
    out = tmp_path / "rewards.jsonl"
    with caplog.at_level(logging.INFO, logger="icdrl.rewards"):
        R.write_rewards(
            scored,
            "hard_plus_soft_v2",
            knobs={"hard_weight": 1.0, "soft_weight": 1.0},
            out_path=out,
        )
    recs = read_jsonl(out, "icdrl.rewards")
    assert [r["anchor_id"] for r in recs] == [7, 9]
    assert recs[0]["rewards"] == [3.0, 0.3] and recs[1]["rewards"] == [2.0]
    assert recs[0]["info"] == [0.02, 0.0] and recs[1]["soft"] == [0.0] and recs[1]["hard"] == [1.0]
    # v2 reads h and s: the missing info_score is not counted, the missing acc score is
    assert recs[0]["missing"] == 0 and recs[1]["missing"] == 1
    assert any("1 missing" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    R.write_rewards(scored, "legacy", knobs={"alpha": 1.0, "beta": 0.0}, out_path=out)
    recs = read_jsonl(out, "icdrl.rewards")
    assert recs[0]["missing"] == 1 and recs[1]["missing"] == 0
    assert recs[0]["rewards"] == [0.02, 0.0]
    # every line is strict JSON (no NaN)
    for line in out.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_write_rewards_rejects_bad_input(tmp_path):
    scored = tmp_path / "scored.jsonl"
    _scored(scored, {1: [{"info_score": "high", "vqa_correct": 1, "vqa_acc_score": 1.0}]})
    with pytest.raises(ValueError, match="info_score"):
        R.write_rewards(
            scored, "legacy", knobs={"alpha": 1, "beta": 0}, out_path=tmp_path / "r.jsonl"
        )
    with pytest.raises(ValueError, match="valid modes"):
        R.write_rewards(scored, "v3", out_path=tmp_path / "r.jsonl")
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("mode", R.MODES)
def test_reward_grid_is_finite_and_monotone_in_correctness(mode):
    # over a grid of inputs the reward is finite, and (for weights ≥ 0, hybrid a < 1) never
    # decreases when a candidate becomes correct (adaptive: with the rest of the group fixed, in
    # a group where its weight stays below 1)
    for s_, i in itertools.product([0.0, 0.5, 1.0], [-0.1, 0.0, 0.05, 0.5]):
        r0 = R.group_rewards(
            mode, hard=[0.0, 1.0, 0.0], soft=[s_, 1.0, 0.0], info=[i, 0.0, 0.0], beta=1.0
        )[0]
        r1 = R.group_rewards(
            mode, hard=[1.0, 1.0, 0.0], soft=[s_, 1.0, 0.0], info=[i, 0.0, 0.0], beta=1.0
        )[0]
        assert math.isfinite(r0) and math.isfinite(r1) and r1 >= r0, (s_, i, r0, r1)
