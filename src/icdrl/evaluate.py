"""Stage 5: evaluation at shots 1–4 for every method (SPEC §8).

Every method chooses, for each test query and each k in ``evaluation.shots``, k positions in
the query's OWN pool (ANCHORS defect 9); the LVLM answers greedily with those ICDs and the
answer's VQA accuracy is recorded (``icdrl.eval``: one line per method, k, query).

* ``zero_shot``: no ICD; answered once per query, the record repeated for every k in
  ``evaluation.shots`` (so every method has a value at every shot).
* ``random``: the first k of a permutation of the pool seeded by (seed, query id), so the k-shot
  ICDs extend the (k−1)-shot ones; seed = ``seed`` if given, else ``evaluation.random_seed``.
* ``similarity``: the k pool items most cosine-similar to the query (``emb`` vectors), laid out
  least similar first, so the most similar is nearest the query.
* ``v2`` / ``v3``: the selector in ``selector_ckpt`` decodes k positions greedily
  (``icdrl.selector.select_for_query``); its output order is the prompt order.

Generation runs in chunks of at least ``chunk_prompts`` prompts; finished chunks go to
``<out>.partial``, so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icdrl.beam import examples_by_id, lookup, model_fingerprint
from icdrl.grid import canonical_shots
from icdrl.lvlm.base import Generation, LVLMBackend
from icdrl.records import METHODS, EvalRecord, PartialJsonl, PoolRecord, fingerprint, read_records

log = logging.getLogger(__name__)

#: knobs a v3 record carries from its grid cell (null where the mode ignores them)
CELL_KNOBS = ("mode", "use_rank", "hard_weight", "soft_weight", "alpha", "beta", "info_scale")
_FLOAT_KNOBS = ("hard_weight", "soft_weight", "alpha", "beta", "info_scale")


def random_positions(pool_size: int, k: int, seed: int, query_id: int) -> list[int]:
    """The first ``k`` of a permutation of ``range(pool_size)`` seeded by (seed, query id)."""
    if k > pool_size:
        raise ValueError(f"query {query_id}: k={k} exceeds the pool size {pool_size}")
    return [int(i) for i in np.random.default_rng([seed, query_id]).permutation(pool_size)[:k]]


def similarity_positions(query_vec: np.ndarray, pool_vecs: np.ndarray, k: int) -> list[int]:
    """Top-k pool positions by cosine, least similar first (the most similar nearest the query)."""
    if k > len(pool_vecs):
        raise ValueError(f"k={k} exceeds the pool size {len(pool_vecs)}")
    sims = pool_vecs.astype(np.float64) @ query_vec.astype(np.float64)
    best_first = np.lexsort((np.arange(len(sims)), -sims))[:k]
    return [int(i) for i in best_first[::-1]]


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def cell_fields(cell: dict | None) -> dict:
    """``cell`` slug and knobs for an eval record (``slug`` or ``name``; ``mode`` or ``reward_mode``)."""
    if cell is None:
        return {"cell": None, **{k: None for k in CELL_KNOBS}}
    slug = cell.get("slug", cell.get("name"))
    if not isinstance(slug, str) or not slug:
        raise ValueError(f"cell {cell!r} has no 'slug'")
    mode = cell.get("mode", cell.get("reward_mode"))
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"cell {slug!r} has no reward 'mode'")
    if not isinstance(cell.get("use_rank"), bool):
        raise ValueError(f"cell {slug!r}: 'use_rank' must be true or false, got {cell.get('use_rank')!r}")
    out = {"cell": slug, "mode": mode, "use_rank": cell["use_rank"]}
    for k in _FLOAT_KNOBS:
        out[k] = None if cell.get(k) is None else float(cell[k])
    return out


def plan_method(
    method: str,
    pools: Sequence[PoolRecord],
    shots: Sequence[int],
    *,
    seed: int | None = None,
    query_vecs: np.ndarray | None = None,
    pool_vecs: Sequence[np.ndarray] | None = None,
    selector=None,
) -> list[tuple[int, int, list[int]]]:
    """(query id, k, pool positions in prompt order) for every query and k of ``method``.

    ``query_vecs[i]`` and ``pool_vecs[i]`` ([K, d]) are the embeddings of ``pools[i]``'s query and
    pool (similarity, v2, v3); ``selector`` is a ``PointerSelector`` (v2, v3).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if any(k < 1 for k in shots):
        raise ValueError(f"evaluation.shots must all be >= 1, got {list(shots)}")
    if method == "zero_shot":
        return [(r.query_id, k, []) for k in shots for r in pools]
    if method in ("similarity", "v2", "v3") and (query_vecs is None or pool_vecs is None):
        raise ValueError(f"method {method!r} needs query and pool embeddings")
    if method in ("v2", "v3"):
        if selector is None:
            raise ValueError(f"method {method!r} needs a selector checkpoint")
        from icdrl.selector import select_for_query
    jobs = []
    for k in shots:
        for i, r in enumerate(pools):
            if method == "random":
                pos = random_positions(len(r.pool), k, seed, r.query_id)
            elif method == "similarity":
                pos = similarity_positions(query_vecs[i], pool_vecs[i], k)
            else:
                pos = select_for_query(selector, query_vecs[i], pool_vecs[i], k)
            jobs.append((r.query_id, k, pos))
    return jobs


def summarize(records: Sequence[dict]) -> dict[int, float]:
    """Mean accuracy per k."""
    by_k: dict[int, list[float]] = {}
    for d in records:
        by_k.setdefault(int(d["k"]), []).append(float(d["acc"]))
    return {k: float(np.mean(v)) for k, v in sorted(by_k.items())}


def evaluate_method(
    dataset_cfg: dict,
    model_cfg: dict,
    model_path,
    test_pools_path,
    eval_emb_path,
    train_emb_path,
    method: str,
    eval_cfg: dict,
    out_path,
    *,
    selector_ckpt=None,
    cell: dict | None = None,
    seed: int | None = None,
    backend: LVLMBackend | None = None,
) -> dict[int, float]:
    """Write ``icdrl.eval`` for one method (one v3 cell) and return the mean accuracy per k.

    ``seed``: the v2/v3 training seed written into the records; for ``random`` it replaces
    ``eval_cfg['random_seed']``. ``backend`` (tests) replaces ``icdrl.lvlm.load_backend``.
    """
    from icdrl.data import load_dataset
    from icdrl.embeddings import EmbeddingTable
    from icdrl.metrics import vqa_accuracy

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "v3" and cell is None:
        raise ValueError("method 'v3' needs its grid cell (slug and knobs)")
    shots = canonical_shots(eval_cfg.get("shots", [1, 2, 3, 4]))
    if method == "random":
        seed = int(eval_cfg.get("random_seed", 0)) if seed is None else int(seed)
    elif method in ("zero_shot", "similarity"):
        seed = None
    pools = read_records(test_pools_path, PoolRecord)
    selector = None
    query_vecs = pool_vecs = None
    if method in ("similarity", "v2", "v3"):
        qt, tt = EmbeddingTable.load(eval_emb_path), EmbeddingTable.load(train_emb_path)
        query_vecs = qt.vectors([r.query_id for r in pools])
        pool_vecs = [tt.vectors(r.pool) for r in pools]
    if method in ("v2", "v3"):
        if not selector_ckpt or not Path(selector_ckpt).exists():
            raise FileNotFoundError(f"selector checkpoint {selector_ckpt!r} not found")
        from icdrl.selector import PointerSelector

        selector = PointerSelector.load(selector_ckpt)
    jobs = plan_method(method, pools, shots, seed=seed, query_vecs=query_vecs, pool_vecs=pool_vecs,
                       selector=selector)

    queries = examples_by_id(load_dataset(dataset_cfg, "eval"), "eval split")
    train = examples_by_id(load_dataset(dataset_cfg, "train"), "train split")
    pool_of = {r.query_id: r.pool for r in pools}
    base = {"method": method, "seed": seed, **cell_fields(cell if method == "v3" else None)}
    fp = fingerprint({"base": base, "model": model_fingerprint(model_cfg, model_path), "jobs": jobs,
                      "pools": [(r.query_id, r.pool) for r in pools],
                      "ckpt": _file_digest(selector_ckpt) if selector is not None else None})
    partial = PartialJsonl(out_path, EvalRecord.SCHEMA, fp)
    done = partial.load()

    def key(q: int, k: int):
        return (method, base["cell"], seed, k, q)

    todo = [j for j in jobs if key(j[0], j[1]) not in done]
    log.info("%s: %d answers, %d finished earlier, %d to do", out_path, len(jobs), len(jobs) - len(todo), len(todo))
    if todo and backend is None:
        from icdrl.lvlm import load_backend

        backend = load_backend(model_cfg, model_path)
    chunk = int(eval_cfg.get("chunk_prompts", 4 * int(model_cfg.get("batch_size", 32))))
    # identical prompts (zero-shot at every k) are answered once, also across a resume
    answered: dict[tuple[int, tuple[int, ...]], Generation] = {
        (d["query_id"], tuple(d["icd_ids"])): Generation(d["prediction_raw"], d["prediction"]) for d in done.values()
    }
    try:
        for start in range(0, len(todo), chunk):
            t0 = time.perf_counter()
            part = [(q, k, pos, tuple(int(pool_of[q][p]) for p in pos)) for q, k, pos in todo[start:start + chunk]]
            need = list(dict.fromkeys((q, ids) for q, _k, _pos, ids in part if (q, ids) not in answered))
            prompts = []
            for q, ids in need:
                where = f"{test_pools_path} (query {q})"
                prompts.append((lookup(train, ids, where), lookup(queries, [q], where)[0]))
            gens = backend.generate(prompts) if prompts else []
            if len(gens) != len(prompts):
                raise RuntimeError(f"backend returned {len(gens)} generations for {len(prompts)} prompts")
            answered.update(zip(need, gens))
            recs = []
            for q, k, pos, ids in part:
                g = answered[(q, ids)]
                rec = EvalRecord(
                    method=method, cell=base["cell"], seed=seed, k=k, query_id=q, icd_ids=ids, icd_pos=tuple(pos),
                    prediction_raw=g.raw, prediction=g.answer, acc=float(vqa_accuracy(g.answer, queries[q].answers)),
                    **{kn: base[kn] for kn in CELL_KNOBS},
                )
                d = rec.to_dict()
                done[key(q, k)] = d
                recs.append(d)
            partial.append(recs)
            log.info("%d answers (%d generated) in %.2f s (%d/%d)", len(part), len(prompts),
                     time.perf_counter() - t0, len(done), len(jobs))
    finally:
        partial.close()
    final = [done[key(q, k)] for q, k, _ in jobs]
    partial.finish(final)
    summary = summarize(final)
    label = method if method != "v3" else f"v3 {base['cell']}"
    log.info("%s accuracy by k: %s", label, ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in summary.items()))
    return summary
