"""Stage 4: candidate ICD sequences per training anchor by InfoScore beam search (docs/science.md §4).

For an anchor q with target answer a_q and pool C (K training examples),
``InfoScore(c | S) = P(a_q | S ⊕ c, q) − P(a_q | S, q)``. Beam search of width B and depth D
expands every beam by every unused pool item, scores *all* expansions of a step in one
``answer_logprobs`` call (the backend batches internally and caches preprocessed images), and
keeps the top B sequences by the cumulative score ``P(a_q | S_D, q) − P(a_q | ∅, q)``. The
zero-shot probability is computed once per anchor and every P(a_q | S, q) is memoised, so no
prompt is ever scored twice for an anchor.

Sequences are tuples of pool positions in *prompt order* (first = farthest from the query).
``insert="first"`` (the reference implementation's default) puts each new ICD at the front, farthest from the
query; ``insert="last"`` appends it next to the query. The t-th build step of a sequence is
therefore its last t items (``first``) or its first t items (``last``); step gains of every
candidate, beam or extra, are measured along that build order.

Extra candidates widen each RL group: ``n_random`` sequences of D distinct pool items (seeded
per anchor) and ``n_similar`` sequences of the pool items most similar to the anchor (most
similar nearest the query), both distinct from the beams and from each other, both with an
``info_score`` and step gains.

``generate_shard`` is the workflow entry point: anchors ``i % n_shards == shard`` (round robin
over the pools file, so shards are balanced); finished anchors go to ``<out>.partial`` at once,
so a killed run resumes with them and the final file is moved into place atomically.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icdrl.data import Example
from icdrl.lvlm.base import AnswerScore, LVLMBackend
from icdrl.records import (
    Candidate,
    CandidateRecord,
    PartialJsonl,
    PoolRecord,
    fingerprint,
    read_records,
)

log = logging.getLogger(__name__)

INSERT_SIDES = ("first", "last")

Seq = tuple[int, ...]


@dataclass(frozen=True)
class BeamConfig:
    """Settings of candidate generation (config section ``candidates``)."""

    beam_width: int = 5
    depth: int = 2
    insert: str = "first"
    n_random: int = 5
    n_similar: int = 5
    seed: int = 0

    def __post_init__(self):
        if self.beam_width < 1:
            raise ValueError(f"candidates.beam_width must be >= 1, got {self.beam_width}")
        if self.depth < 1:
            raise ValueError(f"candidates.depth must be >= 1, got {self.depth}")
        if self.insert not in INSERT_SIDES:
            raise ValueError(
                f"candidates.insert must be one of {INSERT_SIDES}, got {self.insert!r}"
            )
        if self.n_random < 0 or self.n_similar < 0:
            raise ValueError("candidates.n_random and candidates.n_similar must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> BeamConfig:
        """Build from the config section; ``shards`` belongs to the workflow and is ignored."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"shards"}
        if unknown:
            raise ValueError(f"candidates: unknown keys {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Sequences
# ---------------------------------------------------------------------------------------------


def extend(seq: Seq, c: int, insert: str) -> Seq:
    """``seq`` with pool position ``c`` added on the ``insert`` side."""
    return (c, *seq) if insert == "first" else (*seq, c)


def build_steps(seq: Seq, insert: str) -> list[Seq]:
    """The partial sequences of lengths 1..len(seq) that build ``seq`` with this insert side."""
    n = len(seq)
    if insert == "first":
        return [seq[n - t :] for t in range(1, n + 1)]
    return [seq[:t] for t in range(1, n + 1)]


class AnchorScorer:
    """P(a_q | S, q) for one anchor, memoised by sequence of pool positions.

    Every call to :meth:`scores` sends the sequences not seen before in ONE ``answer_logprobs``
    call; ``n_prompts`` counts the prompts sent.
    """

    def __init__(self, backend: LVLMBackend, query: Example, pool: Sequence[Example]):
        self.backend = backend
        self.query = query
        self.pool = list(pool)
        self.cache: dict[Seq, AnswerScore] = {}
        self.n_prompts = 0

    def scores(self, seqs: Sequence[Seq]) -> list[AnswerScore]:
        todo = list(dict.fromkeys(s for s in seqs if s not in self.cache))
        if todo:
            prompts = [([self.pool[p] for p in s], self.query) for s in todo]
            out = self.backend.answer_logprobs(prompts, [self.query.answer] * len(todo))
            if len(out) != len(todo):
                raise RuntimeError(f"backend returned {len(out)} scores for {len(todo)} prompts")
            for s, sc in zip(todo, out):
                if not np.isfinite(sc.sum_logprob) or sc.n_tokens < 1:
                    raise RuntimeError(
                        f"anchor {self.query.id}: backend gave an invalid answer score {sc} for positions {s}"
                    )
                self.cache[s] = sc
            self.n_prompts += len(todo)
        return [self.cache[s] for s in seqs]

    def probs(self, seqs: Sequence[Seq]) -> list[float]:
        return [sc.prob for sc in self.scores(seqs)]


@dataclass(frozen=True)
class Beam:
    """A sequence of pool positions (prompt order) with P(a|S,q), its info score and step gains."""

    pos: Seq
    prob: float
    info_score: float
    step_gains: tuple[float, ...]


def _rank_key(b: Beam) -> tuple:
    # descending score; ties broken by the positions, so the order never depends on expansion order
    return (-b.info_score, b.pos)


def beam_search(
    scorer: AnchorScorer, *, beam_width: int, depth: int, insert: str = "first"
) -> list[Beam]:
    """Top ``beam_width`` sequences of ``depth`` pool items by cumulative InfoScore, best first.

    Each step expands every beam by every unused position and scores all expansions in one
    batched backend call (the zero-shot prompt joins the first step's call); every probability
    is memoised in ``scorer``, so the zero-shot one is scored once per anchor.
    """
    k = len(scorer.pool)
    if depth > k:
        raise ValueError(f"anchor {scorer.query.id}: depth {depth} exceeds the pool size {k}")
    if insert not in INSERT_SIDES:
        raise ValueError(f"insert must be one of {INSERT_SIDES}, got {insert!r}")
    # the zero-shot prompt rides with the first step's expansions: one call, scored once
    scorer.scores([(), *(extend((), c, insert) for c in range(k))])
    p0 = scorer.probs([()])[0]
    beams = [Beam((), p0, 0.0, ())]
    for _ in range(depth):
        children: dict[Seq, Beam] = {}
        for b in beams:
            used = set(b.pos)
            for c in range(k):
                if c not in used:
                    children.setdefault(extend(b.pos, c, insert), b)
        seqs = list(children)
        probs = scorer.probs(seqs)
        expanded = [
            Beam(s, p, p - p0, children[s].step_gains + (p - children[s].prob,))
            for s, p in zip(seqs, probs)
        ]
        expanded.sort(key=_rank_key)
        beams = expanded[:beam_width]
    return beams


def score_sequence(scorer: AnchorScorer, seq: Seq, insert: str) -> Beam:
    """Info score and step gains of a given sequence along its build order (memoised prefixes)."""
    steps = build_steps(seq, insert)
    p0, *ps = scorer.probs([(), *steps])
    gains, prev = [], p0
    for p in ps:
        gains.append(p - prev)
        prev = p
    return Beam(seq, prev, prev - p0, tuple(gains))


def random_sequences(
    pool_size: int, depth: int, n: int, rng: np.random.Generator, exclude: set[Seq]
) -> list[Seq]:
    """``n`` distinct sequences of ``depth`` distinct positions, none in ``exclude``.

    Small spaces (at most 20,000 ordered sequences) are enumerated and sampled without
    replacement; large ones by rejection. Fewer than ``n`` only when the pool cannot supply them.
    """
    if n == 0 or depth > pool_size:
        return []
    total = 1
    for i in range(depth):
        total *= pool_size - i
    if total <= 20_000:
        space = [s for s in itertools.permutations(range(pool_size), depth) if s not in exclude]
        idx = rng.permutation(len(space))[:n]
        return [tuple(int(x) for x in space[i]) for i in idx]
    out: list[Seq] = []
    seen = set(exclude)
    n = min(n, total - len(exclude))
    while len(out) < n:  # the space is far larger than n + |exclude|: terminates quickly
        s = tuple(int(x) for x in rng.choice(pool_size, size=depth, replace=False))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def similar_sequences(sim_order: Sequence[int], depth: int, n: int, exclude: set[Seq]) -> list[Seq]:
    """``n`` sequences of the most similar pool items, most similar nearest the query.

    ``sim_order`` lists pool positions by descending similarity to the anchor. Sets of ``depth``
    similarity ranks are taken by increasing rank sum (then lexicographically): {0,1}, {0,2},
    {0,3}, {1,2}, ...; each is laid out least similar first. Sequences in ``exclude`` are skipped.
    """
    k = len(sim_order)
    if depth > k or n == 0:
        return []
    m = min(k, depth + n + len(exclude))
    combos = sorted(itertools.combinations(range(m), depth), key=lambda r: (sum(r), r))
    out: list[Seq] = []
    for r in combos:
        s = tuple(int(sim_order[i]) for i in reversed(r))
        if s not in exclude and s not in out:
            out.append(s)
            if len(out) == n:
                break
    return out


def similarity_order(query_vec: np.ndarray, pool_vecs: np.ndarray) -> list[int]:
    """Pool positions by descending cosine similarity (vectors L2-normalised); ties by position."""
    sims = pool_vecs @ query_vec
    return [int(i) for i in np.lexsort((np.arange(len(sims)), -sims))]


def anchor_candidates(
    backend: LVLMBackend,
    anchor: Example,
    pool: Sequence[Example],
    pool_ids: Sequence[int],
    cfg: BeamConfig,
    sim_order: Sequence[int] | None = None,
) -> tuple[CandidateRecord, int]:
    """All candidates of one anchor: beams, then random, then similar. Returns (record, prompts sent)."""
    scorer = AnchorScorer(backend, anchor, pool)
    beams = beam_search(scorer, beam_width=cfg.beam_width, depth=cfg.depth, insert=cfg.insert)
    cands: list[tuple[str, Beam]] = [("beam", b) for b in beams]
    taken = {b.pos for b in beams}
    rng = np.random.default_rng([cfg.seed, anchor.id])
    extra: list[tuple[str, Seq]] = [
        ("random", s) for s in random_sequences(len(pool), cfg.depth, cfg.n_random, rng, taken)
    ]
    taken |= {s for _, s in extra}
    if cfg.n_similar:
        if sim_order is None:
            raise ValueError(
                f"anchor {anchor.id}: n_similar > 0 needs a similarity order of the pool"
            )
        extra += [
            ("similar", s) for s in similar_sequences(sim_order, cfg.depth, cfg.n_similar, taken)
        ]
    # score every prefix of every extra sequence in one call, then read them back memoised
    scorer.scores([p for _, s in extra for p in build_steps(s, cfg.insert)])
    cands += [(src, score_sequence(scorer, s, cfg.insert)) for src, s in extra]
    zero = scorer.scores([()])[0]
    rec = CandidateRecord(
        anchor_id=anchor.id,
        pool=tuple(int(i) for i in pool_ids),
        zero_shot_logprob=zero.mean_logprob,
        zero_shot_prob=zero.prob,
        candidates=tuple(
            Candidate(
                source=src,
                icd_ids=tuple(int(pool_ids[p]) for p in b.pos),
                icd_pos=b.pos,
                info_score=b.info_score,
                step_gains=b.step_gains,
            )
            for src, b in cands
        ),
    )
    return rec, scorer.n_prompts


# ---------------------------------------------------------------------------------------------
# Workflow entry point
# ---------------------------------------------------------------------------------------------


def shard_indices(n: int, shard: int, n_shards: int) -> list[int]:
    """Indices ``i`` in ``range(n)`` with ``i % n_shards == shard``."""
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    return list(range(shard, n, n_shards))


def examples_by_id(examples: Sequence[Example], what: str) -> dict[int, Example]:
    by_id = {ex.id: ex for ex in examples}
    if len(by_id) != len(examples):
        raise ValueError(f"{what}: example ids are not unique")
    return by_id


def lookup(by_id: dict[int, Example], ids: Sequence[int], where: str) -> list[Example]:
    """Examples for ``ids``, with a one-line error naming ``where`` for an unknown id."""
    try:
        return [by_id[i] for i in ids]
    except KeyError as e:
        raise KeyError(f"{where}: id {e.args[0]} is not in the dataset split") from None


#: model keys that change speed or memory, not scores (numbers agree to float rounding)
RESULT_NEUTRAL_MODEL_KEYS = ("batch_size", "device", "image_cache_size", "prefix_cache_size")


def model_fingerprint(model_cfg: dict, model_path) -> dict:
    """What of the model identity decides scores (batch size and device do not)."""
    return {
        "path": str(model_path) if model_path else None,
        "cfg": {k: v for k, v in (model_cfg or {}).items() if k not in RESULT_NEUTRAL_MODEL_KEYS},
    }


def generate_shard(
    dataset_cfg: dict,
    model_cfg: dict,
    model_path,
    pools_path,
    train_emb_path,
    cand_cfg: dict,
    shard: int,
    n_shards: int,
    out_path,
    *,
    backend: LVLMBackend | None = None,
) -> None:
    """Write ``icdrl.candidates`` for the anchors of one shard of ``pools_path`` (resumable).

    ``backend`` (tests, benchmarks) replaces ``icdrl.lvlm.load_backend(model_cfg, model_path)``.
    """
    from icdrl.data import load_dataset
    from icdrl.embeddings import EmbeddingTable

    cfg = BeamConfig.from_dict(cand_cfg)
    pools = read_records(pools_path, PoolRecord)
    mine = [pools[i] for i in shard_indices(len(pools), shard, n_shards)]
    train = examples_by_id(load_dataset(dataset_cfg, "train"), "train split")
    table = EmbeddingTable.load(train_emb_path) if cfg.n_similar else None

    fp = fingerprint(
        {
            "cfg": cfg.__dict__,
            "model": model_fingerprint(model_cfg, model_path),
            "pools": [(r.query_id, r.pool) for r in mine],
        }
    )
    partial = PartialJsonl(out_path, CandidateRecord.SCHEMA, fp)
    done = partial.load()
    todo = [r for r in mine if r.query_id not in done]
    log.info(
        "shard %d/%d: %d anchors, %d finished earlier, %d to do",
        shard,
        n_shards,
        len(mine),
        len(mine) - len(todo),
        len(todo),
    )
    if todo and backend is None:
        from icdrl.lvlm import load_backend

        backend = load_backend(model_cfg, model_path)
    if hasattr(backend, "prefix_max_demos"):  # no prompt here has more than `depth` demonstrations
        backend.prefix_max_demos = cfg.depth - 1
    try:
        for i, r in enumerate(todo):
            t0 = time.perf_counter()
            where = f"{pools_path} (query {r.query_id})"
            anchor = lookup(train, [r.query_id], where)[0]
            pool = lookup(train, r.pool, where)
            sim = None
            if table is not None:
                sim = similarity_order(table.vector(r.query_id), table.vectors(r.pool))
            rec, n = anchor_candidates(backend, anchor, pool, r.pool, cfg, sim)
            d = rec.to_dict()
            partial.append([d])
            done[r.query_id] = d
            log.info(
                "anchor %d (%d/%d): %d candidates, %d prompts, %.2f s",
                r.query_id,
                i + 1,
                len(todo),
                len(rec.candidates),
                n,
                time.perf_counter() - t0,
            )
    finally:
        partial.close()
    partial.finish([done[r.query_id] for r in mine])
