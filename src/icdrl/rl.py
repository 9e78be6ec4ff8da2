"""Offline RL losses of the v3 selector (docs/science.md §7): advantages, RCE warm-up, GRPO.

Every function takes per-candidate tensors shaped ``[N]`` (one group) or ``[G, N]`` (a batch of
groups padded to N with ``mask`` marking real candidates). A group with no real candidate (all
masked, or N = 0) is never trained on: the losses skip it and count it in ``groups_skipped``,
and its advantages and weights are empty (or 0 where masked). Rewards are the raw rewards of
:mod:`icdrl.rewards`; they are normalised once, here. Internally group statistics are computed
in float64 after dividing by the group's largest |reward|, so huge or tiny rewards give neither
overflow nor NaN; results come back in the dtype of the log-probs (or of the rewards).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp (keeps ratios and k3 finite)


# ---------------------------------------------------------------------------- helpers


def _as_groups(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """View ``x`` as [G, N]; return it, a bool mask [G, N] and whether the input was one group.

    ``mask`` may be shaped like ``x`` or already [G, N]."""
    x = torch.as_tensor(x)
    if x.dim() not in (1, 2):
        raise ValueError(f"expected rewards/log-probs shaped [N] or [G, N], got {tuple(x.shape)}")
    single = x.dim() == 1
    if single:
        x = x.unsqueeze(0)
    if mask is None:
        m = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    else:
        m = torch.as_tensor(mask, device=x.device).to(torch.bool)
        if m.dim() == 1:
            m = m.unsqueeze(0)
        if m.shape != x.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from values {tuple(x.shape)}")
    return x, m, single


def _check_finite(name: str, x: Tensor, m: Tensor) -> None:
    if not bool(torch.isfinite(torch.where(m, x, torch.zeros_like(x))).all()):
        raise ValueError(f"{name} holds NaN or infinite values at unmasked positions")


def _scaled(r: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """float64 rewards divided by each group's max |r| (1 where that is 0); returns (r', scale)."""
    r64 = torch.where(m, r.to(torch.float64), torch.zeros((), dtype=torch.float64, device=r.device))
    if r64.shape[-1] == 0:  # no candidates: nothing to scale
        return r64, torch.ones((*r64.shape[:-1], 1), dtype=torch.float64, device=r.device)
    scale = r64.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return r64 / scale, scale


def flat_groups(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """Bool [G] (or scalar for [N]): group has zero reward variance (≤ 1 candidate or all equal)."""
    r, m, single = _as_groups(rewards, mask)
    if r.shape[-1] == 0:  # N = 0: every group is empty, hence flat
        flat = torch.ones(r.shape[:-1], dtype=torch.bool, device=r.device)
        return flat[0] if single else flat
    big = torch.finfo(torch.float64).max
    r64 = r.to(torch.float64)
    hi = torch.where(m, r64, torch.full_like(r64, -big)).amax(dim=-1)
    lo = torch.where(m, r64, torch.full_like(r64, big)).amin(dim=-1)
    flat = (m.sum(-1) <= 1) | (hi == lo)
    return flat[0] if single else flat


def descending_ranks(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """0-based rank of each candidate in descending reward order, ties by candidate order.

    This is the reference implementation's ``argsort(descending).argsort()`` with a stable sort; masked
    candidates rank after all real ones.
    """
    r, m, single = _as_groups(rewards, mask)
    r64 = torch.where(
        m, r.to(torch.float64), torch.full_like(r, float("-inf"), dtype=torch.float64)
    )
    order = torch.argsort(r64, dim=-1, descending=True, stable=True)
    ranks = torch.argsort(order, dim=-1, stable=True)
    return ranks[0] if single else ranks


def positive_ratio(hard: Tensor, mask: Tensor | None = None) -> Tensor:
    """Share of candidates with h = 1 (``hard ≥ 0.5``) per group; 0 for an empty group."""
    h, m, single = _as_groups(hard, mask)
    pos = ((h.to(torch.float64) >= 0.5) & m).sum(-1).to(torch.float64)
    n = m.sum(-1).to(torch.float64)
    ratio = torch.where(n > 0, pos / n.clamp_min(1.0), torch.zeros_like(n))
    return ratio[0] if single else ratio


def keep_groups(
    rewards: Tensor,
    mask: Tensor | None = None,
    *,
    hard: Tensor | None = None,
    min_positive_ratio: float = 0.0,
    drop_flat: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Which groups a loss trains on: (keep, flat, low_positive), bool [G] each.

    ``low_positive``: positive ratio below ``min_positive_ratio`` (seed plan 4; off at 0).
    ``flat``: zero reward variance; dropped when ``drop_flat`` (GRPO). Empty groups are never kept.
    """
    r, m, single = _as_groups(rewards, mask)
    flat = flat_groups(r, m)
    if min_positive_ratio > 0:
        if hard is None:
            raise ValueError(
                "min_positive_ratio > 0 needs the per-candidate 'hard' (vqa_correct) values"
            )
        h, _, _ = _as_groups(hard, m)
        if h.shape != r.shape:
            raise ValueError(f"hard shape {tuple(h.shape)} differs from rewards {tuple(r.shape)}")
        low = positive_ratio(h, m) < min_positive_ratio
    else:
        low = torch.zeros_like(flat)
    keep = (m.sum(-1) > 0) & ~low
    if drop_flat:
        keep = keep & ~flat
    if single:
        return keep[0], flat[0], low[0]
    return keep, flat, low


# ---------------------------------------------------------------------------- advantages


def advantages(
    rewards: Tensor,
    *,
    use_rank: bool,
    min_std: float = 0.1,
    clip: float = 5.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages (docs/science.md §7), same shape and dtype as ``rewards``; 0 where masked.

    rank:    A = 1 − 2·rank/(n−1), rank in descending order with ties by candidate order
             (the reference implementation's ordinal ranks: equal rewards still get distinct advantages).
    z-score: A = (r − mean)/max(std, min_std), unbiased std; groups with zero variance give
             exactly 0.
    A group of one candidate gives 0 in both. Then A is clipped to ±clip.
    """
    r, m, single = _as_groups(rewards, mask)
    out_dtype = r.dtype if r.is_floating_point() else torch.get_default_dtype()
    _check_finite("rewards", r, m)
    if min_std <= 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    n = m.sum(-1, keepdim=True).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    if use_rank:
        ranks = descending_ranks(r, m).to(torch.float64)
        a = torch.where(n > 1, 1.0 - 2.0 * ranks / (n - 1).clamp_min(1.0), zero)
    else:
        rs, scale = _scaled(r, m)
        mean = rs.sum(-1, keepdim=True) / n.clamp_min(1.0)
        dev = torch.where(m, rs - mean, zero)
        std = (dev.pow(2).sum(-1, keepdim=True) / (n - 1).clamp_min(1.0)).sqrt()
        a = dev / torch.maximum(std, min_std / scale)
        flat = flat_groups(r, m).unsqueeze(-1)
        a = torch.where(flat, zero, a)
    a = torch.where(m, a.clamp(-clip, clip), zero).to(out_dtype)
    return a[0] if single else a


# ---------------------------------------------------------------------------- RCE


def rce_weights(
    rewards: Tensor, *, tau: float, use_rank: bool, mask: Tensor | None = None
) -> Tensor:
    """Per-group candidate weights of the RCE loss, summing to 1 over real candidates.

    w = softmax(r/τ), or with ``use_rank`` softmax((ascending rank/(n−1))/τ) where the
    ascending rank is n−1 − descending rank (ties: the earlier candidate weighs more, as in
    :func:`advantages`). A one-candidate group has weight 1; masked candidates 0.
    """
    if not tau > 0:
        raise ValueError(f"RCE temperature tau must be > 0, got {tau}")
    r, m, single = _as_groups(rewards, mask)
    _check_finite("rewards", r, m)
    out_dtype = r.dtype if r.is_floating_point() else torch.get_default_dtype()
    n = m.sum(-1, keepdim=True).to(torch.float64)
    if use_rank:
        asc = (n - 1) - descending_ranks(r, m).to(torch.float64)
        score = torch.where(n > 1, asc / (n - 1).clamp_min(1.0), torch.zeros_like(asc))
    else:
        score = r.to(torch.float64)
    logits = torch.where(m, score / tau, torch.full_like(score, float("-inf")))
    # a group with no real candidate would be all -inf: give it zeros instead of NaN
    empty = ~m.any(-1, keepdim=True)
    logits = torch.where(empty, torch.zeros_like(logits), logits)
    w = torch.softmax(logits, dim=-1)
    w = torch.where(m, w, torch.zeros_like(w)).to(out_dtype)
    return w[0] if single else w


def rce_loss(
    logp: Tensor,
    rewards: Tensor,
    *,
    tau: float,
    use_rank: bool,
    mask: Tensor | None = None,
    hard: Tensor | None = None,
    min_positive_ratio: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """RCE warm-up loss: mean over kept groups of Σ_i w_i·(−log π(y_i)) (= Σ_t CE per sequence).

    ``logp``: sequence log-probs [G, N] (or [N]). Groups are kept unless their positive ratio
    is below ``min_positive_ratio`` (0 = off). Flat groups are kept (their weights are uniform).
    With no group kept the loss is a differentiable 0.
    """
    lp, m, _ = _as_groups(logp, mask)
    r, _, _ = _as_groups(rewards, m)
    keep, flat, low = keep_groups(
        r, m, hard=hard, min_positive_ratio=min_positive_ratio, drop_flat=False
    )
    keep = keep.reshape(-1)
    w = rce_weights(r, tau=tau, use_rank=use_rank, mask=m).to(lp.dtype)
    nll = torch.where(m, -lp, torch.zeros_like(lp))
    per_group = (w * nll).sum(-1)
    n_keep = int(keep.sum())
    loss = torch.where(keep, per_group, torch.zeros_like(per_group)).sum() / max(n_keep, 1)
    diag = {
        "loss": float(loss.detach()),
        "groups_kept": n_keep,
        "groups_skipped": int(keep.numel() - n_keep),
        "groups_flat": int(flat.reshape(-1).sum()),
        "groups_low_positive": int(low.reshape(-1).sum()),
        "tau": float(tau),
    }
    return loss, diag


# ---------------------------------------------------------------------------- GRPO


def kl_k3(logp: Tensor, logp_ref: Tensor) -> Tensor:
    """Per-sequence k3 KL estimate exp(lr) − lr − 1 with lr = logp_ref − logp (≥ 0, 0 iff equal)."""
    lr = (logp_ref - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(lr) - lr - 1.0


def grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    logp_ref: Tensor,
    rewards: Tensor,
    *,
    use_rank: bool,
    mask: Tensor | None = None,
    hard: Tensor | None = None,
    min_positive_ratio: float = 0.0,
    clip_eps: float = 0.2,
    kl_beta: float = 0.1,
    min_std: float = 0.1,
    adv_clip: float = 5.0,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss (docs/science.md §7) on sequence log-probs [G, N] (or [N]) and raw rewards.

    ρ = exp(logp − logp_old) per sequence; per kept group
    L_g = −mean_i min(ρ_i A_i, clip(ρ_i, 1−ε, 1+ε) A_i) + β·mean_i k3_i; loss = mean_g L_g.
    Kept groups have non-zero reward variance and a positive ratio ≥ ``min_positive_ratio``;
    every other group contributes exactly zero gradient (to the PPO and KL terms alike).
    ``logp_old``/``logp_ref`` are treated as constants. Diagnostics are over kept candidates;
    ``clip_frac`` is the share whose clip binds (TRL's ``clip_ratio``: ρ < 1−ε with A < 0 or
    ρ > 1+ε with A > 0), not every ratio outside [1−ε, 1+ε].
    """
    lp, m, _ = _as_groups(logp, mask)
    old, _, _ = _as_groups(logp_old, m)
    ref, _, _ = _as_groups(logp_ref, m)
    r, _, _ = _as_groups(rewards, m)
    if not (lp.shape == old.shape == ref.shape == r.shape):
        raise ValueError("logp, logp_old, logp_ref and rewards must share one shape")
    _check_finite("logp", lp.detach(), m)
    _check_finite("logp_old", old, m)
    _check_finite("logp_ref", ref, m)
    old, ref = old.detach(), ref.detach()
    keep, flat, low = keep_groups(
        r, m, hard=hard, min_positive_ratio=min_positive_ratio, drop_flat=True
    )
    keep = keep.reshape(-1)
    adv = advantages(r, use_rank=use_rank, min_std=min_std, clip=adv_clip, mask=m).to(lp.dtype)
    zero = torch.zeros_like(lp)
    log_ratio = torch.where(m, lp - old, zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = torch.where(m, kl_k3(lp, ref), zero)
    n = m.sum(-1).clamp_min(1).to(lp.dtype)
    ppo_g = -torch.where(m, surr, zero).sum(-1) / n
    kl_g = kl.sum(-1) / n
    n_keep = int(keep.sum())
    denom = max(n_keep, 1)
    ppo = torch.where(keep, ppo_g, torch.zeros_like(ppo_g)).sum() / denom
    kl_mean = torch.where(keep, kl_g, torch.zeros_like(kl_g)).sum() / denom
    loss = ppo + kl_beta * kl_mean

    with torch.no_grad():
        sel = m & keep.unsqueeze(-1)
        n_sel = int(sel.sum())
        if n_sel:
            rs = ratio[sel].to(torch.float64)
            a_sel = adv[sel].to(torch.float64)
            diag_ratio_mean = float(rs.mean())
            diag_ratio_max = float(rs.max())
            # TRL's clip_ratio: the share of candidates whose clip binds (the min takes the clipped
            # term, so the candidate gives no gradient): ρ < 1−ε with A < 0, or ρ > 1+ε with A > 0
            binds = ((rs < 1.0 - clip_eps) & (a_sel < 0)) | ((rs > 1.0 + clip_eps) & (a_sel > 0))
            diag_clip = float(binds.to(torch.float64).mean())
            diag_adv_std = float(a_sel.std(unbiased=False))
            diag_adv_mean = float(a_sel.mean())
        else:
            diag_ratio_mean = diag_ratio_max = 1.0
            diag_clip = diag_adv_std = diag_adv_mean = 0.0
    diag = {
        "loss": float(loss.detach()),
        "ppo_loss": float(ppo.detach()),
        "kl": float(kl_mean.detach()),
        "ratio_mean": diag_ratio_mean,
        "ratio_max": diag_ratio_max,
        "clip_frac": diag_clip,
        "adv_std": diag_adv_std,
        "adv_mean": diag_adv_mean,
        "n_candidates": n_sel,
        "groups_kept": n_keep,
        "groups_skipped": int(keep.numel() - n_keep),
        "groups_flat": int(flat.reshape(-1).sum()),
        "groups_low_positive": int(low.reshape(-1).sum()),
    }
    return loss, diag
