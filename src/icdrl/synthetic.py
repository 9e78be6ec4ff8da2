"""Synthetic groups with a planted preference, for tests, benchmarks and smoke runs of the workflow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icdrl.embeddings import EmbeddingTable
from icdrl.groups import Group


@dataclass(frozen=True)
class Synthetic:
    """Synthetic groups with a planted preference: an item's quality is emb · direction."""

    groups: list[Group]
    table: EmbeddingTable
    direction: np.ndarray

    def planted_reward(self, group: Group, seq: Sequence[int]) -> float:
        """Mean quality of the pool items at positions ``seq`` (the planted sequence reward)."""
        rows = self.table.rows([group.pool[p] for p in seq], "pool item")
        return float((self.table.emb[rows].astype(np.float64) @ self.direction).mean())


def synthetic_groups(
    n_groups: int = 64,
    n_cands: int = 15,
    pool_size: int = 64,
    depth: int = 2,
    dim: int = 32,
    seed: int = 0,
    mode: str = "hard_plus_soft_v2",
    n_items: int | None = None,
) -> Synthetic:
    """Random unit embeddings, pools drawn from them, and N random candidate sequences per anchor.

    A candidate's InfoScore is its planted reward (mean item quality); ``hard`` = 1 when that is
    above 0.1, ``soft`` = clip(0.5 + 2·quality, 0, 1); rewards follow ``mode``. The first
    candidate of each group is the pool's best sequence (the planted optimum, source "beam").
    """
    from icdrl.rewards import reward

    rng = np.random.RandomState(seed)
    n_items = n_items or max(4 * pool_size, n_groups + pool_size + 1)
    emb = rng.randn(n_items, dim).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    direction = rng.randn(dim)
    direction /= np.linalg.norm(direction)
    quality = emb.astype(np.float64) @ direction
    ids = np.arange(1000, 1000 + n_items, dtype=np.int64)
    table = EmbeddingTable(ids=ids, emb=emb, path="synthetic")
    groups = []
    for a in range(n_groups):
        others = np.delete(np.arange(n_items), a)
        pool_idx = rng.choice(others, size=pool_size, replace=False)
        q = quality[pool_idx]
        best = tuple(int(p) for p in np.argsort(-q, kind="stable")[:depth])
        seqs = [best] + [
            tuple(int(p) for p in rng.choice(pool_size, size=depth, replace=False))
            for _ in range(n_cands - 1)
        ]
        info = np.array([q[list(s)].mean() for s in seqs])
        hard = (info > 0.1).astype(np.float64)
        soft = np.clip(0.5 + 2.0 * info, 0.0, 1.0)
        r = reward(mode, hard=hard, soft=soft, info=info)
        groups.append(
            Group(
                query_id=int(ids[a]),
                pool=tuple(int(ids[i]) for i in pool_idx),
                seqs=tuple(seqs),
                rewards=tuple(float(x) for x in r),
                hard=tuple(float(x) for x in hard),
                info=tuple(float(x) for x in info),
                sources=("beam",) + ("random",) * (n_cands - 1),
            )
        )
    return Synthetic(groups, table, direction)
