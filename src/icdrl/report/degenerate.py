"""Comparisons that cannot differ (docs/science.md §10): detected, so the report says so instead of testing them.

Two ways a paired delta is zero by construction:

* **(a) order-equivalent rewards.** Two rewards files whose rewards order every RL group's
  candidates the same way (the same ties, the same ranks) give identical rank advantages
  (``use_rank: true``) and identical rank RCE weights, so two rank cells that differ only in
  those rewards train on the same signal. Typical case: ``hard_plus_soft`` at any weights (and
  ``hard_plus_soft_v2``) on a single-answer dataset, where s = h and every such reward is a
  positive multiple of h. More generally, since h = 1[s ≥ threshold], every w_h·h + w_s·s with
  w_s > 0 increases with s, so all such weightings order candidates as s does. Found from the
  rewards files (:func:`reward_equivalence`).
* **(b) identical choices.** Two methods that choose the same demonstrations for every test
  query at a shot (same seeds), and so get the same answers: found from the evaluation records
  (:func:`identical_choices`).

API: :func:`reward_equivalence` (once per report, stored in ``EvalData.reward_orders``),
:func:`cannot_differ` (one comparison: the note why, or ""), :func:`canonical` (one
representative per group of identical methods at a shot, to count duplicated comparisons once)
and :func:`distinct_selectors` (the v3 cells grouped by identical choices at every shot).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .inputs import EvalData, MethodInfo, RewardGroups

__all__ = [
    "RewardEquivalence",
    "reward_equivalence",
    "reward_label",
    "identical_choices",
    "cannot_differ",
    "canonical",
    "distinct_selectors",
]

SINGLE_ANSWER = "single-answer dataset (soft = hard on every candidate)"
BY_SOFT = "every such reward increases with soft (hard is soft thresholded), so it orders candidates as soft does"
ORDER = "the rewards order every group's candidates the same way"


@dataclass(frozen=True)
class RewardEquivalence:
    """Rewards-file labels grouped by the order their rewards give every group (classes ≥ 2 only)."""

    classes: tuple[tuple[str, ...], ...]
    why: Mapping[str, str]  # label -> the cause shared by its class

    def same_order(self, a: str | None, b: str | None) -> str:
        """The reason two rewards files order every group identically, or "" if they do not."""
        if a is None or b is None or a == b:
            return ""
        for cls in self.classes:
            if a in cls and b in cls:
                return (
                    f"{self.why.get(a, ORDER)}: {a} and {b} rank every RL group's candidates identically, "
                    "so rank advantages (and rank RCE weights) are equal by construction"
                )
        return ""


def _order_signature(g: RewardGroups) -> str:
    """A digest of every group's tie pattern and ranks (dense ranks of the rewards) and of h."""
    h = hashlib.sha256()
    h.update(repr([len(r) for r in g.rewards]).encode())
    h.update(repr(g.anchors).encode())
    for r, hard in zip(g.rewards, g.hard):
        dense = np.unique(r, return_inverse=True)[1].astype(np.int64)
        h.update(dense.tobytes())
        h.update(np.asarray(hard, dtype=np.int8).tobytes())
    return h.hexdigest()


def _soft_is_hard(g: RewardGroups) -> bool:
    return g.soft is not None and all(np.array_equal(s, h) for s, h in zip(g.soft, g.hard))


def _orders_as_soft(g: RewardGroups) -> bool:
    """Every group's rewards have the tie pattern and ranks of its soft scores."""
    return g.soft is not None and all(
        np.array_equal(np.unique(r, return_inverse=True)[1], np.unique(s, return_inverse=True)[1])
        for r, s in zip(g.rewards, g.soft)
    )


def reward_equivalence(rewards: Mapping[str, RewardGroups]) -> RewardEquivalence:
    """Group rewards files whose rewards order every group's candidates the same way.

    Same order = same groups (anchors, sizes, h) and, in every group, ``sign(r_i − r_j)`` equal
    for every pair of candidates (equal rewards stay equal): exactly what the rank advantage,
    the rank RCE weights and the flat-group test see. An empty file is never grouped.
    """
    by_sig: dict[str, list[str]] = {}
    for label, g in rewards.items():
        if g.n_groups:
            by_sig.setdefault(_order_signature(g), []).append(label)
    classes = tuple(tuple(v) for v in by_sig.values() if len(v) >= 2)
    why = {}
    for cls in classes:
        if all(_soft_is_hard(rewards[lab]) for lab in cls):
            cause = SINGLE_ANSWER
        elif all(_orders_as_soft(rewards[lab]) for lab in cls):
            cause = BY_SOFT
        else:
            cause = ORDER
        why.update(dict.fromkeys(cls, cause))
    return RewardEquivalence(classes, why)


def reward_label(m: MethodInfo) -> str | None:
    """The rewards-file label of a v3 cell (its reward slug), else None."""
    if m.method != "v3" or m.cell is None:
        return None
    return m.cell.reward.slug


def _run_pairs(ra: Mapping, rb: Mapping) -> list[tuple]:
    common = [s for s in ra if s in rb]
    return [(s, s) for s in common] if common else [(sa, sb) for sa in ra for sb in rb]


def identical_choices(data: EvalData, a: str, b: str, k: int) -> bool:
    """True when ``a`` and ``b`` chose the same demonstrations and scored the same on every query.

    Runs are paired by seed where the two share seeds (else every run against every run), on
    the queries both have; at least one query and one demonstration are needed.
    """
    ia, ib = data.icds.get((a, k), {}), data.icds.get((b, k), {})
    aa, ab = data.acc.get((a, k), {}), data.acc.get((b, k), {})
    if not ia or not ib:
        return False
    for sa, sb in _run_pairs(ia, ib):
        ca, cb = ia[sa], ib[sb]
        q = [x for x in ca if x in cb]
        if not q or any(not ca[x] or ca[x] != cb[x] for x in q):
            return False
        if not np.array_equal(aa[sa].reindex(q).to_numpy(), ab[sb].reindex(q).to_numpy()):
            return False
    return True


def _rank_equivalent(data: EvalData, a: str, b: str) -> str:
    eq = data.reward_orders
    ma, mb = data.methods.get(a), data.methods.get(b)
    if not isinstance(eq, RewardEquivalence) or ma is None or mb is None:
        return ""
    if not (ma.use_rank is True and mb.use_rank is True):
        return ""
    if ma.cell.train != mb.cell.train:  # other training settings can make them differ
        return ""
    return eq.same_order(reward_label(ma), reward_label(mb))


def cannot_differ(data: EvalData, a: str, b: str, k: int) -> str:
    """Why ``a − b`` at shot ``k`` is zero by construction, or "" if it can differ."""
    why = _rank_equivalent(data, a, b)
    if why:
        if data.icds.get((a, k)) and data.icds.get((b, k)) and not identical_choices(data, a, b, k):
            why += "; yet their records differ (choices or answers), so the two trainings did not reproduce each other"
        return f"cannot differ: {why}"
    if identical_choices(data, a, b, k):
        if all(identical_choices(data, a, b, kk) for kk in data.shots):
            return "cannot differ: both choose the same demonstrations for every (query, k): identical selectors"
        return f"cannot differ: both choose the same demonstrations for every query at k={k}"
    return ""


def canonical(data: EvalData, key: str, k: int) -> str:
    """The first method (in report order) that cannot differ from ``key`` at shot ``k``."""
    table = data.cache.get(("canonical", k))
    if table is None:
        keys = list(data.methods)
        parent = {x: x for x in keys}
        for i, x in enumerate(keys):
            for y in keys[:i]:
                if parent[x] == x and parent[y] == y and cannot_differ(data, y, x, k):
                    parent[x] = y
                    break
        table = parent
        data.cache[("canonical", k)] = table
    return table.get(key, key)


def distinct_selectors(data: EvalData) -> list[list[str]]:
    """v3 cells grouped by "cannot differ at every shot" (groups in report order)."""
    groups: list[list[str]] = []
    for m in data.v3():
        for grp in groups:
            if all(cannot_differ(data, grp[0], m.key, k) for k in data.shots):
                grp.append(m.key)
                break
        else:
            groups.append([m.key])
    return groups
