"""The selector's training data: one group per anchor, read from validated records, padded into tensors.

* :class:`Group` — an anchor's pool and candidate sequences (pool positions) with their rewards.
* :func:`load_candidate_groups` / :func:`load_groups` — groups from ``icdrl.candidates`` /
  ``icdrl.scored`` files (parsed as :class:`icdrl.records.CandidateRecord` /
  :class:`~icdrl.records.ScoredRecord`, so every position is checked against its pool and ids
  there) and an ``icdrl.rewards`` file.
* :func:`sft_group`, :func:`in_label_order`, :func:`split_val` — the v2 targets, the label
  order (docs/science.md §7) and the deterministic train/val split of anchors.
* :class:`Packed` / :func:`pack_groups` and :class:`Batch` / :func:`make_batch` — groups as
  padded CPU tensors, and one step's groups gathered onto the device.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from icdrl.embeddings import EmbeddingTable
from icdrl.records import CandidateRecord, ScoredRecord, header_schema, read_jsonl, read_records
from icdrl.selector import label_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    """One anchor's RL group: its pool and N candidate sequences (pool positions) with scores.

    ``hard`` is None for unscored candidate files (v2); ``rewards`` there are the InfoScores.
    """

    query_id: int
    pool: tuple[int, ...]
    seqs: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...]
    hard: tuple[float, ...] | None
    info: tuple[float, ...]
    sources: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.seqs)
        where = f"anchor {self.query_id}"
        if not self.pool:
            raise ValueError(f"{where}: empty pool")
        if n == 0:
            raise ValueError(f"{where}: a group needs at least one candidate sequence, got none")
        for name in ("rewards", "info", "sources") + (("hard",) if self.hard is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{where}: {len(getattr(self, name))} {name} for {n} candidate sequences"
                )
        for name in ("rewards", "info") + (("hard",) if self.hard is not None else ()):
            if not all(math.isfinite(x) for x in getattr(self, name)):
                raise ValueError(f"{where}: non-finite value in {name}")
        k = len(self.pool)
        for s in self.seqs:
            if not s:
                raise ValueError(f"{where}: empty candidate sequence")
            if any(not 0 <= p < k for p in s):
                raise ValueError(
                    f"{where}: sequence {list(s)} has a position outside the pool of {k}"
                )
            if len(set(s)) != len(s):
                raise ValueError(f"{where}: sequence {list(s)} repeats a pool position")


def _num(path: Any, aid: Any, name: str, v: Any) -> float:
    """A finite number of a rewards file; ``None`` and NaN are errors naming the file and the anchor."""
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{path}: anchor {aid}: {name}={v!r} is not a finite number")
    return float(v)


def _group(
    path: Any, rec: CandidateRecord, rewards: tuple[float, ...], hard: tuple[float, ...] | None
) -> Group:
    """The group of a validated record (positions already checked against its pool and ids)."""
    cands = rec.candidates
    try:
        return Group(
            query_id=rec.anchor_id,
            pool=rec.pool,
            seqs=tuple(c.icd_pos for c in cands),
            rewards=rewards,
            hard=hard,
            info=tuple(c.info_score for c in cands),
            sources=tuple(c.source for c in cands),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_candidate_groups(candidates_path: str | os.PathLike) -> list[Group]:
    """Groups from an ``icdrl.candidates`` (or ``icdrl.scored``) file; rewards = info_score, hard = None."""
    # a file that cannot be read or has no header is CandidateRecord's: read_records says why
    scored = header_schema(candidates_path) == ScoredRecord.SCHEMA
    cls: type[CandidateRecord] = ScoredRecord if scored else CandidateRecord
    groups: list[Group] = []
    empty: list = []
    for rec in read_records(candidates_path, cls):
        if not rec.candidates:
            empty.append(rec.anchor_id)
            continue
        info = tuple(c.info_score for c in rec.candidates)
        groups.append(_group(candidates_path, rec, info, None))
    return _non_empty(groups, empty, candidates_path)


def load_groups(scored_path: str | os.PathLike, rewards_path: str | os.PathLike) -> list[Group]:
    """RL groups: an ``icdrl.scored`` file joined with an ``icdrl.rewards`` file on anchor_id.

    Every candidate is kept (no top-k filtering) and rewards are taken raw from the rewards file.
    """
    scored = read_records(scored_path, ScoredRecord)
    rewards = {}
    for r in read_jsonl(rewards_path, "icdrl.rewards"):
        if "anchor_id" not in r or "rewards" not in r or "hard" not in r:
            raise ValueError(f"{rewards_path}: a record lacks 'anchor_id', 'rewards' or 'hard'")
        rewards[r["anchor_id"]] = r
    groups: list[Group] = []
    empty: list = []
    for rec in scored:
        aid = rec.anchor_id
        if aid not in rewards:
            raise ValueError(f"{rewards_path}: no rewards for anchor {aid} of {scored_path}")
        rr = rewards[aid]
        cands = rec.candidates
        if len(rr["rewards"]) != len(cands) or len(rr["hard"]) != len(cands):
            raise ValueError(
                f"{rewards_path}: anchor {aid} has {len(rr['rewards'])} rewards for {len(cands)} scored candidates"
            )
        r = tuple(_num(rewards_path, aid, "rewards", x) for x in rr["rewards"])
        h = tuple(_num(rewards_path, aid, "hard", x) for x in rr["hard"])
        if not cands:
            empty.append(aid)
            continue
        groups.append(_group(scored_path, rec, r, h))
    extra = set(rewards) - {rec.anchor_id for rec in scored}
    if extra:
        raise ValueError(
            f"{rewards_path}: {len(extra)} anchors not in {scored_path} (e.g. {sorted(extra)[0]})"
        )
    return _non_empty(groups, empty, scored_path)


def _non_empty(groups: list[Group], empty: list, path: Any) -> list[Group]:
    """``groups``, after logging how many anchors had no candidate (skipped); none left is an error."""
    if empty:
        log.warning(
            "%s: %d of %d anchors have no candidate sequence and are skipped (e.g. anchor %s)",
            path,
            len(empty),
            len(empty) + len(groups),
            empty[0],
        )
    if not groups:
        raise ValueError(f"{path}: no anchor has a candidate sequence ({len(empty)} empty groups)")
    return groups


def sft_group(g: Group, top_beams: int) -> Group | None:
    """The v2 targets of an anchor: its ``top_beams`` best beams by InfoScore (ties: file order)."""
    beams = [i for i, s in enumerate(g.sources) if s == "beam"]
    if not beams:
        return None
    beams = sorted(beams, key=lambda i: -g.info[i])[:top_beams]  # sorted() is stable

    def pick(xs):
        return tuple(xs[i] for i in beams)

    return Group(
        g.query_id,
        g.pool,
        pick(g.seqs),
        pick(g.rewards),
        None if g.hard is None else pick(g.hard),
        pick(g.info),
        pick(g.sources),
    )


def in_label_order(groups: Sequence[Group], label_order: str, insert: str) -> list[Group]:
    """``groups`` with every candidate sequence in the order the selector is taught (docs/science.md §7)."""
    if label_order == "prompt":
        return list(groups)
    return [
        dataclasses.replace(g, seqs=tuple(label_sequence(s, label_order, insert) for s in g.seqs))
        for g in groups
    ]


@dataclass
class Packed:
    """Groups as padded tensors (CPU); a batch gathers rows and moves them to the device."""

    query_rows: Tensor  # [G] embedding rows of the anchors
    pool_rows: Tensor  # [G, K] embedding rows of pool items (0 at padding)
    pool_mask: Tensor  # [G, K] bool
    seqs: Tensor  # [G, N, T] pool positions, −1 padding
    cand_mask: Tensor  # [G, N] bool
    rewards: Tensor  # [G, N] float32 raw rewards (0 at padding)
    hard: Tensor  # [G, N] float32 vqa_correct (0 at padding or when unknown)

    def __len__(self) -> int:
        return int(self.query_rows.shape[0])


def pack_groups(groups: Sequence[Group], table: EmbeddingTable) -> Packed:
    """Pad ``groups`` into tensors; checks every id has an embedding and every sequence is valid."""
    if not groups:
        raise ValueError("pack_groups: no groups to pack")
    g = len(groups)
    k = max((len(x.pool) for x in groups), default=1)
    n = max((len(x.seqs) for x in groups), default=1)
    t = max((len(s) for x in groups for s in x.seqs), default=1)
    query_rows = torch.tensor(table.rows([x.query_id for x in groups], "anchor"), dtype=torch.long)
    pool_rows = torch.zeros((g, k), dtype=torch.long)
    pool_mask = torch.zeros((g, k), dtype=torch.bool)
    seqs = torch.full((g, n, t), -1, dtype=torch.long)
    cand_mask = torch.zeros((g, n), dtype=torch.bool)
    rewards = torch.zeros((g, n), dtype=torch.float32)
    hard = torch.zeros((g, n), dtype=torch.float32)
    for i, x in enumerate(groups):
        pool_rows[i, : len(x.pool)] = torch.tensor(
            table.rows(x.pool, f"pool item of anchor {x.query_id}")
        )
        pool_mask[i, : len(x.pool)] = True
        for j, s in enumerate(x.seqs):
            seqs[i, j, : len(s)] = torch.tensor(s)
        cand_mask[i, : len(x.seqs)] = True
        rewards[i, : len(x.seqs)] = torch.tensor(x.rewards, dtype=torch.float64).to(torch.float32)
        if x.hard is not None:
            hard[i, : len(x.seqs)] = torch.tensor(x.hard)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards overflow float32")
    return Packed(query_rows, pool_rows, pool_mask, seqs, cand_mask, rewards, hard)


@dataclass
class Batch:
    query: Tensor
    pool: Tensor
    pool_mask: Tensor
    seqs: Tensor
    cand_mask: Tensor
    rewards: Tensor
    hard: Tensor


def make_batch(p: Packed, idx: Tensor, table: EmbeddingTable, device: torch.device) -> Batch:
    """Gather groups ``idx`` into device tensors, trimmed to the batch's own max sizes."""
    pm = p.pool_mask[idx]
    cm = p.cand_mask[idx]
    seqs = p.seqs[idx]
    k = int(pm.sum(-1).max())
    n = max(int(cm.sum(-1).max()), 1)
    tt = max(int((seqs >= 0).sum(-1).max()), 1)
    emb = table.tensor
    return Batch(
        query=emb[p.query_rows[idx]].to(device),
        pool=emb[p.pool_rows[idx, :k]].to(device),
        pool_mask=pm[:, :k].to(device),
        seqs=seqs[:, :n, :tt].to(device),
        cand_mask=cm[:, :n].to(device),
        rewards=p.rewards[idx, :n].to(device),
        hard=p.hard[idx, :n].to(device),
    )


def split_val(
    groups: Sequence[Group], val_fraction: float, val_seed: int
) -> tuple[list[Group], list[Group]]:
    """Deterministic train/val split of anchors (by a seeded permutation of the sorted anchor ids)."""
    ids = sorted({g.query_id for g in groups})
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and len(ids) > 1:
        n_val = min(max(n_val, 1), len(ids) - 1)
    else:
        n_val = 0
    perm = np.random.RandomState(val_seed).permutation(len(ids))
    val_ids = {ids[i] for i in perm[:n_val]}
    return [g for g in groups if g.query_id not in val_ids], [
        g for g in groups if g.query_id in val_ids
    ]
