"""Stage 5: VQA scoring of candidate sequences (docs/science.md §5).

For every candidate sequence of every anchor, the LVLM answers the anchor greedily with the
candidate's ICDs; the record keeps the raw and post-processed prediction,
``vqa_acc_score = vqa_accuracy(prediction, anchor.answers, scoring.metric)`` and
``vqa_correct = 1[vqa_acc_score >= correct_threshold]``.

Identical sequences of one anchor are generated once. Anchors are sent in chunks of at least
``chunk_prompts`` prompts (the backend batches them); each finished chunk goes to
``<out>.partial`` at once, so a killed run resumes with the finished anchors, and the output
is moved into place atomically. One call scores one candidates file (a shard, as in stage 4).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from icdrl.beam import examples_by_id, lookup, model_fingerprint
from icdrl.data import Example
from icdrl.lvlm.base import LVLMBackend
from icdrl.records import (
    CandidateRecord,
    PartialJsonl,
    ScoredCandidate,
    ScoredRecord,
    fingerprint,
    read_records,
)

log = logging.getLogger(__name__)


def score_records(
    backend: LVLMBackend,
    records: Sequence[CandidateRecord],
    train_by_id: dict[int, Example],
    *,
    correct_threshold: float = 1.0,
    metric: str = "official",
    max_new_tokens: int | None = None,
    where: str = "candidates",
) -> list[ScoredRecord]:
    """Greedy answers and VQA scores for every candidate of ``records`` (one ``generate`` call)."""
    from icdrl.metrics import vqa_accuracy, vqa_correct

    keys: dict[tuple[int, tuple[int, ...]], int] = {}
    prompts = []
    for rec in records:
        anchor = lookup(train_by_id, [rec.anchor_id], where)[0]
        for c in rec.candidates:
            key = (rec.anchor_id, c.icd_ids)
            if key not in keys:
                keys[key] = len(prompts)
                prompts.append(
                    (lookup(train_by_id, c.icd_ids, f"{where} (anchor {rec.anchor_id})"), anchor)
                )
    gens = backend.generate(prompts, max_new_tokens) if prompts else []
    if len(gens) != len(prompts):
        raise RuntimeError(f"backend returned {len(gens)} generations for {len(prompts)} prompts")
    out = []
    for rec in records:
        answers = train_by_id[rec.anchor_id].answers
        scored = []
        for c in rec.candidates:
            g = gens[keys[(rec.anchor_id, c.icd_ids)]]
            acc = float(vqa_accuracy(g.answer, answers, metric))
            scored.append(
                ScoredCandidate.from_candidate(
                    c,
                    prediction_raw=g.raw,
                    prediction=g.answer,
                    vqa_acc_score=acc,
                    vqa_correct=int(vqa_correct(acc, correct_threshold)),
                )
            )
        out.append(
            ScoredRecord(
                anchor_id=rec.anchor_id,
                pool=rec.pool,
                zero_shot_logprob=rec.zero_shot_logprob,
                zero_shot_prob=rec.zero_shot_prob,
                candidates=tuple(scored),
            )
        )
    return out


def _metric(value, key: str) -> str:
    from icdrl.metrics import METRICS

    if value not in METRICS:
        raise ValueError(f"{key} must be one of {METRICS}, got {value!r}")
    return value


def chunks_by_prompts(
    records: Sequence[CandidateRecord], min_prompts: int
) -> list[list[CandidateRecord]]:
    """Consecutive groups of records holding at least ``min_prompts`` candidates (the last may hold fewer)."""
    out, cur, n = [], [], 0
    for r in records:
        cur.append(r)
        n += len({c.icd_ids for c in r.candidates})
        if n >= min_prompts:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def score_shard(
    dataset_cfg: dict,
    model_cfg: dict,
    model_path,
    candidates_path,
    scoring_cfg: dict,
    out_path,
    *,
    backend: LVLMBackend | None = None,
) -> None:
    """Write ``icdrl.scored`` for every anchor of ``candidates_path`` (resumable).

    ``scoring_cfg``: ``correct_threshold`` (default 1.0), ``metric`` (``official`` |
    ``normalised``, default official; ``icdrl.metrics``), optional ``chunk_prompts`` (default
    4 × model batch size). ``backend`` (tests) replaces ``icdrl.lvlm.load_backend``.
    """
    from icdrl.data import load_dataset

    threshold = float(scoring_cfg.get("correct_threshold", 1.0))
    metric = _metric(scoring_cfg.get("metric", "official"), "scoring.metric")
    chunk_prompts = int(scoring_cfg.get("chunk_prompts", 4 * int(model_cfg.get("batch_size", 32))))
    records = read_records(candidates_path, CandidateRecord)
    train = examples_by_id(load_dataset(dataset_cfg, "train"), "train split")
    fp = fingerprint(
        {
            "threshold": threshold,
            "metric": metric,
            "model": model_fingerprint(model_cfg, model_path),
            "cands": [(r.anchor_id, [c.icd_ids for c in r.candidates]) for r in records],
        }
    )
    partial = PartialJsonl(out_path, ScoredRecord.SCHEMA, fp)
    done = partial.load()
    todo = [r for r in records if r.anchor_id not in done]
    log.info(
        "%s: %d anchors, %d finished earlier, %d to do",
        candidates_path,
        len(records),
        len(records) - len(todo),
        len(todo),
    )
    if todo and backend is None:
        from icdrl.lvlm import load_backend

        backend = load_backend(model_cfg, model_path)
    try:
        for chunk in chunks_by_prompts(todo, chunk_prompts):
            t0 = time.perf_counter()
            scored = score_records(
                backend,
                chunk,
                train,
                correct_threshold=threshold,
                metric=metric,
                where=str(candidates_path),
            )
            dicts = [s.to_dict() for s in scored]
            partial.append(dicts)
            for s, d in zip(scored, dicts):
                done[s.anchor_id] = d
            log.info(
                "scored %d anchors in %.2f s (%d/%d done)",
                len(chunk),
                time.perf_counter() - t0,
                len(done),
                len(records),
            )
    finally:
        partial.close()
    partial.finish([done[r.anchor_id] for r in records])
