"""Advantages, RCE and GRPO (docs/science.md §7) at their boundaries; docs/defects.md defects 3, 4, 7, 11."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icdrl import rl

T = torch.tensor


def seed_rank_advantage(r: torch.Tensor) -> torch.Tensor:
    """The reference implementation's formula, verbatim in spirit: argsort(desc).argsort(), A = 1 − 2·rank/(N−1)."""
    ranks = r.argsort(descending=True, stable=True).argsort().double()
    return 1.0 - 2.0 * ranks / (len(r) - 1)


# ---------------------------------------------------------------------------- advantages


def test_rank_advantages_of_five_distinct_rewards():
    assert rl.advantages(T([3.0, 2.0, 1.0, 0.0, -1.0]), use_rank=True).tolist() == [
        1,
        0.5,
        0,
        -0.5,
        -1,
    ]
    # order follows the rewards, not the positions
    assert rl.advantages(T([0.1, 0.9, 0.5, 0.3, 0.7]), use_rank=True).tolist() == [
        -1,
        1,
        0,
        -0.5,
        0.5,
    ]


def test_rank_advantages_reproduce_seed_ordinal_ranks_with_stable_ties():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 20):
        r = torch.randn(n, generator=g, dtype=torch.float64)
        assert torch.equal(rl.advantages(r, use_rank=True), seed_rank_advantage(r))
    # ties: distinct ordinal ranks, the earlier candidate first (the reference implementation's behaviour the
    # diagnosis criticises: an all-negative flat group still gets [1 … −1])
    assert rl.advantages(T([0.0] * 5), use_rank=True).tolist() == [1, 0.5, 0, -0.5, -1]
    a = rl.advantages(T([2.0, 1.0, 1.0, 0.0]), use_rank=True)
    assert torch.allclose(a, T([1.0, 1 / 3, -1 / 3, -1.0]))


def test_zscore_of_seed_example():
    r = [2.0, 1.3, 0.0, 0.0, 0.0]
    a = rl.advantages(T(r, dtype=torch.float64), use_rank=False, min_std=0.1)
    mean, std = statistics.mean(r), statistics.stdev(r)  # unbiased
    assert std == pytest.approx(0.937017, abs=1e-6)
    np.testing.assert_allclose(a.numpy(), [(x - mean) / std for x in r], rtol=1e-12)
    np.testing.assert_allclose(
        a.numpy(), [1.430070, 0.683019, -0.704363, -0.704363, -0.704363], atol=1e-6
    )


def test_min_std_acts_on_raw_rewards():
    # defect 3: rewards normalised before the advantage made min_std dead; on raw rewards with a
    # small spread the floor applies: A = (r − mean)/0.1, far below the ±1 a second z-score gives
    r = T([0.01, 0.0, 0.0], dtype=torch.float64)
    a = rl.advantages(r, use_rank=False, min_std=0.1)
    assert torch.allclose(a, (r - r.mean()) / 0.1)
    assert a.abs().max() < 0.07
    twice = rl.advantages((r - r.mean()) / r.std(), use_rank=False, min_std=0.1)
    assert (
        twice.abs().max() > 1.1
    )  # what the reference implementation's double normalisation produced


def test_single_candidate_and_flat_groups_give_zero():
    # defect 4: N = 1 gave NaN
    for use_rank in (True, False):
        assert rl.advantages(T([0.7]), use_rank=use_rank).tolist() == [0.0]
    # all-equal (values whose float mean is inexact) give exactly 0 under z-score
    for v in (0.1, 0.3, 1e-30, 1e30, 0.0):
        a = rl.advantages(T([v] * 7, dtype=torch.float64), use_rank=False)
        assert torch.equal(a, torch.zeros(7, dtype=torch.float64))
    assert rl.flat_groups(T([[1.0, 1.0], [1.0, 2.0]])).tolist() == [True, False]
    assert rl.flat_groups(T([[5.0, 1.0]]), mask=T([[True, False]])).tolist() == [True]


def test_clip_and_dtype():
    a = rl.advantages(T([10.0] + [0.0] * 29), use_rank=False, clip=5.0)
    assert a[0] == 5.0 and a.dtype == torch.float32
    a = rl.advantages(T([1.0, 0.0]), use_rank=True, clip=0.5)
    assert a.tolist() == [0.5, -0.5]


def test_ragged_groups_match_unpadded():
    groups = [[0.3, 0.1, 0.9], [1.0], [2.0, 2.0, 0.0, 1.0, 5.0], [0.0, 0.0]]
    n = max(map(len, groups))
    r = torch.zeros(len(groups), n)
    m = torch.zeros(len(groups), n, dtype=torch.bool)
    for i, g in enumerate(groups):
        r[i, : len(g)] = T(g)
        r[i, len(g) :] = 99.0  # padding values must not matter
        m[i, : len(g)] = True
    for use_rank in (True, False):
        batched = rl.advantages(r, use_rank=use_rank, mask=m)
        for i, g in enumerate(groups):
            assert torch.allclose(batched[i, : len(g)], rl.advantages(T(g), use_rank=use_rank))
            assert (batched[i, len(g) :] == 0).all()
        w = rl.rce_weights(r, tau=0.7, use_rank=use_rank, mask=m)
        for i, g in enumerate(groups):
            assert torch.allclose(w[i, : len(g)], rl.rce_weights(T(g), tau=0.7, use_rank=use_rank))
            assert (w[i, len(g) :] == 0).all()


# ---------------------------------------------------------------------------- RCE


def test_rce_weights():
    r = T([3.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.allclose(rl.rce_weights(r, tau=2.0, use_rank=False), torch.softmax(r / 2.0, 0))
    # rank: ascending rank/(N−1) = [1, 0, 0.5]
    want = torch.softmax(T([1.0, 0.0, 0.5], dtype=torch.float64) / 0.5, 0)
    assert torch.allclose(rl.rce_weights(r, tau=0.5, use_rank=True), want)
    # ties weigh the earlier candidate more, consistent with the advantage's order
    w = rl.rce_weights(T([1.0, 1.0]), tau=1.0, use_rank=True)
    assert w[0] > w[1]
    assert rl.rce_weights(T([4.0]), tau=0.5, use_rank=True).tolist() == [1.0]
    with pytest.raises(ValueError):
        rl.rce_weights(r, tau=0.0, use_rank=False)


def test_rce_loss_value_and_gate():
    lp = T([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    r = T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    hard = T([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, d = rl.rce_loss(lp, r, tau=1.0, use_rank=False)
    w = torch.softmax(r, -1)
    assert loss.item() == pytest.approx(float((w * -lp.detach()).sum(-1).mean()))
    assert d["groups_kept"] == 2
    loss, d = rl.rce_loss(lp, r, tau=1.0, use_rank=False, hard=hard, min_positive_ratio=0.2)
    assert d["groups_kept"] == 1 and d["groups_skipped"] == 1 and d["groups_low_positive"] == 1
    loss.backward()
    assert (lp.grad[1] == 0).all() and (lp.grad[0] != 0).all()


# ---------------------------------------------------------------------------- GRPO


def test_kl_k3():
    lp = T([-1.0, -2.0])
    assert torch.equal(rl.kl_k3(lp, lp), torch.zeros(2))
    k = rl.kl_k3(T([-1.0]), T([-0.5]))
    assert k.item() == pytest.approx(math.exp(0.5) - 0.5 - 1)
    assert (rl.kl_k3(T([-3.0, 0.0]), T([-1.0, -9.0])) > 0).all()


def test_grpo_loss_hand_example():
    rewards = T([1.0, 0.0])  # z-score: A = ±0.7071
    a = 1 / math.sqrt(2)
    logp_old = T([-1.0, -1.0])
    logp = T([-1.0 + math.log(1.5), -1.0 + math.log(0.5)], requires_grad=True)
    loss, d = rl.grpo_loss(logp, logp_old, logp_old, rewards, use_rank=False, kl_beta=0.0)
    # ρ = [1.5, 0.5]: positive A clipped at 1.2; negative A takes the clipped 0.8 (pessimistic)
    assert loss.item() == pytest.approx(-(1.2 * a + 0.8 * -a) / 2, rel=1e-6)
    assert d["ratio_max"] == pytest.approx(1.5) and d["ratio_mean"] == pytest.approx(1.0)
    assert d["clip_frac"] == 1.0 and d["adv_std"] == pytest.approx(a)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2))  # both clipped: no gradient
    # the KL term to π_ref
    logp2 = T([-1.0, -1.0], requires_grad=True)
    ref = T([-0.5, -1.0])
    loss2, d2 = rl.grpo_loss(logp2, logp2.detach(), ref, rewards, use_rank=False, kl_beta=0.1)
    kl = (math.exp(0.5) - 0.5 - 1) / 2
    assert d2["kl"] == pytest.approx(kl) and d2["ppo_loss"] == pytest.approx(0.0, abs=1e-7)
    assert loss2.item() == pytest.approx(0.1 * kl)


def test_clip_frac_counts_only_binding_clips():
    # TRL's clip_ratio: a clip binds when ρ < 1−ε with A < 0 or ρ > 1+ε with A > 0; the other
    # ratios outside [1−ε, 1+ε] keep their gradient and are not clipped in effect
    rewards = T([1.0, 0.0, 1.0, 0.0])  # A = +, −, +, −
    old = T([-1.0] * 4)
    ratios = [0.5, 1.5, 1.5, 1.1]  # + below (free), − above (free), + above (binds), inside
    logp = (old + T([math.log(r) for r in ratios])).requires_grad_(True)
    loss, d = rl.grpo_loss(logp, old, old, rewards, use_rank=False, kl_beta=0.0)
    assert d["clip_frac"] == pytest.approx(0.25)  # every ratio outside the band would give 0.75
    loss.backward()
    # binding = the candidates whose gradient the clip removes
    assert (logp.grad == 0).tolist() == [False, False, True, False]


def test_grpo_identical_policies_ratio_exactly_one():
    lp = torch.randn(3, 6).clamp(max=-0.1)
    _, d = rl.grpo_loss(lp, lp.clone(), lp.clone(), torch.randn(3, 6), use_rank=False)
    assert (
        d["ratio_mean"] == 1.0
        and d["ratio_max"] == 1.0
        and d["kl"] == 0.0
        and d["clip_frac"] == 0.0
    )


@pytest.mark.parametrize("use_rank", [True, False])
def test_flat_and_low_positive_groups_get_exactly_zero_gradient(use_rank):
    # defect 7 (flat groups) and 11 (conditional training): such groups add nothing, KL included
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(4, 5, generator=g) - 3).requires_grad_(True)
    old = lp.detach() + 0.1 * torch.randn(4, 5, generator=g)
    ref = lp.detach() - 0.2
    rewards = T(
        [
            [1.0, 0.0, 2.0, 0.5, 0.0],  # trained
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all-zero (flat)
            [0.3, 0.3, 0.3, 0.3, 0.3],  # flat
            [0.2, 0.1, 0.4, 0.0, 0.3],
        ]
    )  # no positive: gated at 0.2
    hard = T([[1, 0, 1, 0, 0], [0] * 5, [1] * 5, [0] * 5], dtype=torch.float32)
    loss, d = rl.grpo_loss(
        lp, old, ref, rewards, use_rank=use_rank, hard=hard, min_positive_ratio=0.2
    )
    loss.backward()
    assert d["groups_kept"] == 1 and d["groups_skipped"] == 3
    assert d["groups_flat"] == 2 and d["groups_low_positive"] == 2
    assert (lp.grad[1:] == 0).all() and (lp.grad[0] != 0).any()
    # the loss equals that of the kept group alone
    alone, _ = rl.grpo_loss(lp[:1].detach(), old[:1], ref[:1], rewards[:1], use_rank=use_rank)
    assert loss.item() == pytest.approx(alone.item())
    # off by default: the gated group trains
    _, d0 = rl.grpo_loss(lp.detach(), old, ref, rewards, use_rank=use_rank)
    assert d0["groups_kept"] == 2
    with pytest.raises(ValueError, match="hard"):
        rl.grpo_loss(lp.detach(), old, ref, rewards, use_rank=use_rank, min_positive_ratio=0.2)


def test_positive_ratio_threshold_is_inclusive():
    hard = T([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    assert torch.allclose(rl.positive_ratio(hard), T([0.2, 0.4], dtype=torch.float64))
    keep, _, low = rl.keep_groups(
        T([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]]), hard=hard, min_positive_ratio=0.2
    )
    assert keep.tolist() == [True, True] and low.tolist() == [False, False]
    keep, _, _ = rl.keep_groups(
        T([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0]]), hard=hard, min_positive_ratio=0.3
    )
    assert keep.tolist() == [False, True]


def test_single_candidate_groups_and_empty_batches_are_finite():
    # defect 4: one candidate → NaN that spread to every parameter
    lp = T([[-1.0], [-2.0]], requires_grad=True)
    loss, d = rl.grpo_loss(lp, lp.detach(), lp.detach(), T([[1.0], [0.0]]), use_rank=False)
    loss.backward()
    assert loss.item() == 0.0 and d["groups_kept"] == 0 and torch.equal(lp.grad, torch.zeros(2, 1))
    loss, _ = rl.rce_loss(lp, T([[1.0], [0.0]]), tau=1.0, use_rank=True)
    assert torch.isfinite(loss)
    empty = torch.zeros(0, 3, requires_grad=True)
    loss, d = rl.grpo_loss(empty, empty.detach(), empty.detach(), torch.zeros(0, 3), use_rank=True)
    loss.backward()
    assert loss.item() == 0.0 and d["groups_kept"] == 0
    masked = T([[-1.0, -2.0]], requires_grad=True)
    loss, d = rl.rce_loss(
        masked, T([[1.0, 2.0]]), tau=1.0, use_rank=False, mask=T([[False, False]])
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(masked.grad).all()


def test_batched_loss_is_mean_of_group_losses():
    g = torch.Generator().manual_seed(3)
    sizes = [3, 5, 2, 4]
    r = torch.randn(4, 5, generator=g)
    lp = torch.randn(4, 5, generator=g) - 2
    old = lp + 0.3 * torch.randn(4, 5, generator=g)
    ref = lp - 0.1
    m = torch.zeros(4, 5, dtype=torch.bool)
    for i, n in enumerate(sizes):
        m[i, :n] = True
    for use_rank in (True, False):
        loss, _ = rl.grpo_loss(lp, old, ref, r, use_rank=use_rank, mask=m)
        each = [
            rl.grpo_loss(lp[i, :n], old[i, :n], ref[i, :n], r[i, :n], use_rank=use_rank)[0].item()
            for i, n in enumerate(sizes)
        ]
        assert loss.item() == pytest.approx(sum(each) / len(each), rel=1e-6)


def test_non_finite_inputs_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        rl.advantages(T([1.0, float("nan")]), use_rank=False)
    with pytest.raises(ValueError, match="logp"):
        rl.grpo_loss(
            T([float("-inf"), -1.0]),
            T([-1.0, -1.0]),
            T([-1.0, -1.0]),
            T([1.0, 0.0]),
            use_rank=False,
        )


# ---------------------------------------------------------------------------- property test

_special = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 1e-30, -1e-30, 3.0])
_reward = st.one_of(st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False), _special)


@st.composite
def _groups(draw):
    g = draw(st.integers(1, 4))
    n = draw(st.integers(1, 20))
    kinds = draw(
        st.lists(
            st.sampled_from(["random", "ties", "equal", "zero", "huge", "tiny"]),
            min_size=g,
            max_size=g,
        )
    )
    rows, masks, hards = [], [], []
    for kind in kinds:
        size = draw(st.integers(1, n))
        if kind == "random":
            vals = draw(st.lists(_reward, min_size=size, max_size=size))
        elif kind == "ties":
            pool = draw(st.lists(_reward, min_size=1, max_size=3))
            vals = [pool[draw(st.integers(0, len(pool) - 1))] for _ in range(size)]
        elif kind == "equal":
            vals = [draw(_reward)] * size
        elif kind == "zero":
            vals = [0.0] * size
        elif kind == "huge":
            vals = draw(
                st.lists(
                    st.floats(-1e30, 1e30).filter(lambda x: abs(x) > 1e20),
                    min_size=size,
                    max_size=size,
                )
            )
        else:
            vals = draw(st.lists(st.floats(-1e-30, 1e-30), min_size=size, max_size=size))
        rows.append(vals + [draw(_reward)] * (n - size))  # junk padding
        masks.append([True] * size + [False] * (n - size))
        hards.append([float(draw(st.booleans())) for _ in range(n)])
    lp = draw(st.lists(st.floats(-50.0, 0.0), min_size=g * n, max_size=g * n))
    shift = draw(st.lists(st.floats(-30.0, 30.0), min_size=g * n, max_size=g * n))
    return (T(rows, dtype=torch.float32), T(masks), T(hards), T(lp).view(g, n), T(shift).view(g, n))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_groups(), st.booleans(), st.sampled_from([0.0, 0.2, 1.0]))
def test_property_no_nan_or_inf(data, use_rank, mpr):
    r, m, hard, lp0, shift = data
    a = rl.advantages(r, use_rank=use_rank, mask=m)
    assert torch.isfinite(a).all() and (a.abs() <= 5.0).all() and (a[~m] == 0).all()
    w = rl.rce_weights(r, tau=0.5, use_rank=use_rank, mask=m)
    assert torch.isfinite(w).all()
    assert torch.allclose(
        w.sum(-1).double(), torch.ones(r.shape[0], dtype=torch.float64), atol=1e-5
    )
    lp = lp0.clone().requires_grad_(True)
    loss, _ = rl.rce_loss(
        lp, r, tau=2.0, use_rank=use_rank, mask=m, hard=hard, min_positive_ratio=mpr
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    lp = lp0.clone().requires_grad_(True)
    loss, d = rl.grpo_loss(
        lp,
        lp0 + shift,
        lp0 - shift,
        r,
        use_rank=use_rank,
        mask=m,
        hard=hard,
        min_positive_ratio=mpr,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(math.isfinite(v) for v in d.values())
    flat = rl.flat_groups(r, m)
    assert (lp.grad[flat] == 0).all()


# ---------------------------------------------------------------------------- empty groups (issue 15)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4)])
@pytest.mark.parametrize("use_rank", [True, False])
def test_empty_groups_are_skipped_and_counted(shape, use_rank):
    # issue 15: shape [0] / [G, 0] raised IndexError in advantages, rce_loss and grpo_loss
    n_groups = 1 if len(shape) == 1 else shape[0]
    a = rl.advantages(torch.zeros(shape), use_rank=use_rank)
    assert a.shape == shape
    lp = torch.zeros(shape, requires_grad=True)
    loss, d = rl.rce_loss(lp, torch.zeros(shape), tau=1.0, use_rank=use_rank)
    loss.backward()
    assert loss.item() == 0.0 and d["groups_kept"] == 0 and d["groups_skipped"] == n_groups
    lp = torch.zeros(shape, requires_grad=True)
    loss, d = rl.grpo_loss(
        lp,
        torch.zeros(shape),
        torch.zeros(shape),
        torch.zeros(shape),
        use_rank=use_rank,
        hard=torch.zeros(shape),
        min_positive_ratio=0.2,
    )
    loss.backward()
    assert loss.item() == 0.0 and d["groups_kept"] == 0 and d["groups_skipped"] == n_groups
    assert torch.isfinite(lp.grad).all() if lp.grad is not None else True
    flat = rl.flat_groups(torch.zeros(shape))
    assert bool(flat.all()) and flat.shape == shape[:-1]
