"""Stage 8: evaluation at shots 1–4 for every method (docs/science.md §8).

Every pool method chooses, for each test query and each k in ``evaluation.shots``, k positions
in the query's OWN pool (docs/defects.md defect 9); the LVLM answers greedily with those ICDs and the
answer's VQA accuracy is recorded (``icdrl.eval``: one line per method, k, query).

* ``zero_shot``: no ICD; answered once per query, the record repeated for every k in
  ``evaluation.shots`` (so every method has a value at every shot).
* ``random``: the first k of a permutation of the pool seeded by (seed, query id), so the k-shot
  ICDs extend the (k−1)-shot ones; seed = ``seed`` if given, else ``evaluation.random_seed``.
* ``similarity`` ("similarity (within pool)" in the report): the k pool items most
  cosine-similar to the query (``emb`` vectors), laid out least similar first, so the most
  similar is nearest the query.
* ``rices_image`` / ``rices_text`` / ``rices``: the same over the whole training split, by the
  image, question or mixed embeddings (``icdrl.retrieval``; no pool positions).
* ``copy`` (:func:`write_copy_baseline`): no LVLM; the most frequent answer of the k ``rices``
  demonstrations.
* ``v2`` / ``v3``: the selector in ``selector_ckpt`` decodes k positions greedily
  (``icdrl.selector.select_for_query``); they go into the prompt in the order it was taught
  (``label_order: prompt``) or one by one by the insertion rule (``selection``), docs/science.md §7.
* ``per_shot`` (:func:`select_per_shot`): at each k, the records of the v3 cell with the best
  accuracy on the validation queries (per seed), relabelled; no LVLM call.

Before the LVLM answers anything, every prompt passes the integrity checks of
``icdrl.integrity`` (k distinct ICDs, no exact duplicate of the query, with
``pools.exclude_same_image`` none of its image); a violation fails the job naming method, query
and k. The ablations (``icdrl.ablations``) re-answer another method's records through
:func:`answer_jobs`.

Generation runs in chunks of whole queries (every k of a query together, so that its prompts
share their cached demonstration prefixes) of at least ``chunk_prompts`` prompts; finished
chunks go to ``<out>.partial``, so a killed evaluation resumes where it stopped. The output
lists the records by k, then query, whatever the chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from icdrl.beam import examples_by_id, lookup, model_fingerprint
from icdrl.data import Example
from icdrl.grid import canonical_shots
from icdrl.integrity import check_icds
from icdrl.lvlm.base import Generation, LVLMBackend
from icdrl.records import EvalRecord, PartialJsonl, PoolRecord, fingerprint, read_records
from icdrl.retrieval import RICES_METHODS, plan_rices

log = logging.getLogger(__name__)

#: the methods that run the LVLM on their own choice of ICDs (``per_shot`` reuses the chosen
#: cells' records, ``copy`` runs no LVLM, ablations re-run another method's ICDs: icdrl.ablations)
LVLM_METHODS = ("zero_shot", "random", "similarity", *RICES_METHODS, "v2", "v3")
#: methods that choose k positions in the query's own pool
POOL_METHODS = ("zero_shot", "random", "similarity", "v2", "v3")


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


def cell_fields(cell: dict | None) -> tuple[str | None, dict | None]:
    """``(slug, canonical dict)`` of a v3 cell for its eval records (checked by
    :meth:`icdrl.grid.Cell.from_dict`), or ``(None, None)``."""
    if cell is None:
        return None, None
    from icdrl.grid import Cell

    c = Cell.from_dict(cell, "evaluation cell")
    return c.slug, c.as_dict()


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
    if method not in POOL_METHODS:
        raise ValueError(f"method must be one of {POOL_METHODS}, got {method!r}")
    if any(k < 1 for k in shots):
        raise ValueError(f"evaluation.shots must all be >= 1, got {list(shots)}")
    if method == "zero_shot":
        return [(r.query_id, k, []) for k in shots for r in pools]
    if method in ("similarity", "v2", "v3") and (query_vecs is None or pool_vecs is None):
        raise ValueError(f"method {method!r} needs query and pool embeddings")
    if method in ("v2", "v3"):
        if selector is None:
            raise ValueError(f"method {method!r} needs a selector checkpoint")
        from icdrl.selector import prompt_sequence, select_for_query

        meta = getattr(selector, "checkpoint_config", None) or {}
        order, insert = meta.get("label_order", "prompt"), meta.get("insert", "first")
    jobs = []
    for k in shots:
        for i, r in enumerate(pools):
            if method == "random":
                pos = random_positions(len(r.pool), k, seed, r.query_id)
            elif method == "similarity":
                pos = similarity_positions(query_vecs[i], pool_vecs[i], k)
            else:
                pos = prompt_sequence(
                    select_for_query(selector, query_vecs[i], pool_vecs[i], k), order, insert
                )
            jobs.append((r.query_id, k, pos))
    return jobs


def summarize(records: Sequence[dict]) -> dict[int, float]:
    """Mean accuracy per k."""
    by_k: dict[int, list[float]] = {}
    for d in records:
        by_k.setdefault(int(d["k"]), []).append(float(d["acc"]))
    return {k: float(np.mean(v)) for k, v in sorted(by_k.items())}


@dataclass(frozen=True)
class Job:
    """One (query, k) prompt to answer and record: its ICDs in prompt order and the record's labels."""

    query_id: int
    k: int
    icd_pos: tuple[
        int, ...
    ]  # positions in the query's pool (empty where not chosen from a pool: RICES)
    icd_ids: tuple[int, ...]
    cell: str | None = None
    seed: int | None = None
    spec: dict | None = field(default=None, hash=False)


def chunks_by_query(jobs: Sequence[Job], min_prompts: int) -> list[list[Job]]:
    """``jobs`` in chunks of whole queries, each of at least ``min_prompts`` jobs (the last may
    hold fewer).

    Every k of a query lands in the same chunk, hence in one ``generate`` call, where the backend
    runs the prompt with the most demonstrations first and the query's shorter prompts, whose
    demonstrations it starts with (a k-shot selection extends the (k−1)-shot one), on its cached
    prefix. Queries keep the order of their first job, each query's jobs their order in ``jobs``.
    """
    by_query: dict[int, list] = {}
    for j in jobs:
        by_query.setdefault(j.query_id, []).append(j)
    out, cur = [], []
    for group in by_query.values():
        cur += group
        if len(cur) >= min_prompts:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def method_label(method: str, cell: str | None) -> str:
    """The name of a method in log lines and errors (``v3 <cell slug>``)."""
    return method if not cell else f"{method} {cell}"


def plan_rices_from_files(
    method: str,
    pools,
    queries: dict[int, Example],
    train_list: Sequence[Example],
    eval_emb_path,
    train_emb_path,
    shots: Sequence[int],
    *,
    where: str,
    exclude_same_image: bool,
) -> list[tuple[int, int, tuple[int, ...]]]:
    """:func:`icdrl.retrieval.plan_rices` for the pools' queries, on the vectors of the RICES
    ``method``'s kind read from the embedding files; ``where`` names the source in errors."""
    from icdrl.embeddings import EmbeddingTable

    kind = RICES_METHODS[method]
    qt, tt = EmbeddingTable.load(eval_emb_path), EmbeddingTable.load(train_emb_path)
    qs = lookup(queries, [r.query_id for r in pools], where)
    return plan_rices(
        method,
        qs,
        train_list,
        qt.vectors([q.id for q in qs], kind),
        tt.vectors([ex.id for ex in train_list], kind),
        shots,
        exclude_same_image=exclude_same_image,
    )


def check_jobs(
    method: str,
    jobs: Sequence[Job],
    queries: dict[int, Example],
    train: dict[int, Example],
    where: str,
    *,
    exclude_same_image: bool = False,
) -> None:
    """:func:`icdrl.integrity.check_icds` on every job before the LVLM answers any (docs/science.md §8)."""
    for j in jobs:
        w = f"{where} (query {j.query_id})"
        check_icds(
            method_label(method, j.cell),
            lookup(queries, [j.query_id], w)[0],
            j.k,
            lookup(train, j.icd_ids, w),
            exclude_same_image=exclude_same_image,
        )


def eval_metric(eval_cfg: dict) -> str:
    """The VQA accuracy of every record's ``acc``: ``eval_cfg['metric']`` (the workflow passes
    ``scoring.metric``; default ``official``)."""
    from icdrl.metrics import METRICS

    metric = eval_cfg.get("metric", "official")
    if metric not in METRICS:
        raise ValueError(
            f"evaluation metric (scoring.metric) must be one of {METRICS}, got {metric!r}"
        )
    return metric


def answer_jobs(
    method: str,
    jobs: Sequence[Job],
    *,
    queries: dict[int, Example],
    train: dict[int, Example],
    model_cfg: dict,
    model_path,
    eval_cfg: dict,
    out_path,
    fp_inputs: dict,
    where: str,
    backend: LVLMBackend | None = None,
    demo_view: Callable[[Example], Example] | None = None,
) -> dict[int, float]:
    """Answer every job with the LVLM, write ``icdrl.eval`` records to ``out_path`` and return the
    mean accuracy per k. Identical prompts are answered once; finished chunks go to
    ``<out_path>.partial`` (``fp_inputs`` + the jobs + the model decide whether a partial file is
    resumed). ``demo_view`` changes how a demonstration is shown (the no-image ablation), never
    which ICDs the record names. ``where`` names the inputs in errors.
    """
    from icdrl.metrics import vqa_accuracy

    metric = eval_metric(eval_cfg)
    fp = fingerprint(
        {
            **fp_inputs,
            "method": method,
            "metric": metric,
            "model": model_fingerprint(model_cfg, model_path),
            "jobs": [dataclasses.astuple(j) for j in jobs],
        }
    )
    partial = PartialJsonl(out_path, EvalRecord.SCHEMA, fp)
    done = partial.load()

    def key(j: Job):
        return (method, j.cell, j.seed, j.k, j.query_id)

    todo = [j for j in jobs if key(j) not in done]
    log.info(
        "%s: %d answers, %d finished earlier, %d to do",
        out_path,
        len(jobs),
        len(jobs) - len(todo),
        len(todo),
    )
    if todo and backend is None:
        from icdrl.lvlm import load_backend

        backend = load_backend(model_cfg, model_path)
    chunk = int(eval_cfg.get("chunk_prompts", 4 * int(model_cfg.get("batch_size", 32))))
    # identical prompts (zero-shot at every k) are answered once, also across a resume
    answered: dict[tuple[int, tuple[int, ...]], Generation] = {
        (d["query_id"], tuple(d["icd_ids"])): Generation(d["prediction_raw"], d["prediction"])
        for d in done.values()
    }
    try:
        for part in chunks_by_query(todo, chunk):
            t0 = time.perf_counter()
            need = list(
                dict.fromkeys(
                    (j.query_id, j.icd_ids) for j in part if (j.query_id, j.icd_ids) not in answered
                )
            )
            prompts = []
            for q, ids in need:
                w = f"{where} (query {q})"
                demos = lookup(train, ids, w)
                prompts.append(
                    (
                        [demo_view(d) for d in demos] if demo_view else demos,
                        lookup(queries, [q], w)[0],
                    )
                )
            gens = backend.generate(prompts) if prompts else []
            if len(gens) != len(prompts):
                raise RuntimeError(
                    f"backend returned {len(gens)} generations for {len(prompts)} prompts"
                )
            answered.update(zip(need, gens))
            recs = []
            for j in part:
                g = answered[(j.query_id, j.icd_ids)]
                rec = EvalRecord(
                    method=method,
                    cell=j.cell,
                    seed=j.seed,
                    k=j.k,
                    query_id=j.query_id,
                    icd_ids=j.icd_ids,
                    icd_pos=j.icd_pos,
                    prediction_raw=g.raw,
                    prediction=g.answer,
                    acc=float(vqa_accuracy(g.answer, queries[j.query_id].answers, metric)),
                    spec=j.spec,
                    image_id=queries[j.query_id].image_id or None,
                )
                d = rec.to_dict()
                done[key(j)] = d
                recs.append(d)
            partial.append(recs)
            log.info(
                "%d answers (%d generated) in %.2f s (%d/%d)",
                len(part),
                len(prompts),
                time.perf_counter() - t0,
                len(done),
                len(jobs),
            )
    finally:
        partial.close()
    final = [done[key(j)] for j in jobs]
    partial.finish(final)
    return summarize(final)


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
    exclude_same_image: bool = False,
) -> dict[int, float]:
    """Write ``icdrl.eval`` for one method (one v3 cell) and return the mean accuracy per k.

    ``seed``: the v2/v3 training seed written into the records; for ``random`` it replaces
    ``eval_cfg['random_seed']``. ``eval_cfg['metric']`` (:func:`eval_metric`) is the VQA accuracy of
    ``acc``. ``backend`` (tests) replaces ``icdrl.lvlm.load_backend``. The queries are those of ``test_pools_path``; RICES methods retrieve from the whole training
    split instead of their pools. ``exclude_same_image`` (``pools.exclude_same_image``): RICES
    never shows an example of the query's image, and the integrity checks refuse one.
    """
    from icdrl.data import load_dataset
    from icdrl.embeddings import EmbeddingTable

    if method not in LVLM_METHODS:
        raise ValueError(
            f"method must be one of {LVLM_METHODS} (per_shot: select_per_shot), got {method!r}"
        )
    if method == "v3" and cell is None:
        raise ValueError("method 'v3' needs its grid cell (slug and knobs)")
    eval_metric(eval_cfg)
    shots = canonical_shots(eval_cfg.get("shots", [1, 2, 3, 4]))
    if method == "random":
        seed = int(eval_cfg.get("random_seed", 0)) if seed is None else int(seed)
    elif method in ("zero_shot", "similarity") or method in RICES_METHODS:
        seed = None
    pools = read_records(test_pools_path, PoolRecord)
    queries_list = load_dataset(dataset_cfg, "eval")
    train_list = load_dataset(dataset_cfg, "train")
    queries = examples_by_id(queries_list, "eval split")
    train = examples_by_id(train_list, "train split")
    pool_of = {r.query_id: r.pool for r in pools}
    slug, spec = cell_fields(cell if method == "v3" else None)
    ckpt_digest = None
    if method in RICES_METHODS:
        plan = plan_rices_from_files(
            method,
            pools,
            queries,
            train_list,
            eval_emb_path,
            train_emb_path,
            shots,
            where=f"{test_pools_path} (RICES)",
            exclude_same_image=exclude_same_image,
        )
        jobs = [Job(q, k, (), ids, slug, seed, spec) for q, k, ids in plan]
    else:
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
            ckpt_digest = _file_digest(selector_ckpt)
        plan = plan_method(
            method,
            pools,
            shots,
            seed=seed,
            query_vecs=query_vecs,
            pool_vecs=pool_vecs,
            selector=selector,
        )
        jobs = [
            Job(q, k, tuple(pos), tuple(int(pool_of[q][p]) for p in pos), slug, seed, spec)
            for q, k, pos in plan
        ]
    check_jobs(
        method, jobs, queries, train, str(test_pools_path), exclude_same_image=exclude_same_image
    )
    summary = answer_jobs(
        method,
        jobs,
        queries=queries,
        train=train,
        model_cfg=model_cfg,
        model_path=model_path,
        eval_cfg=eval_cfg,
        out_path=out_path,
        where=str(test_pools_path),
        backend=backend,
        fp_inputs={
            "base": {"method": method, "seed": seed, "cell": slug, "spec": spec},
            "pools": [(r.query_id, r.pool) for r in pools],
            "ckpt": ckpt_digest,
        },
    )
    log.info(
        "%s accuracy by k: %s",
        method_label(method, slug),
        ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in summary.items()),
    )
    return summary


def write_copy_baseline(
    dataset_cfg: dict,
    test_pools_path,
    eval_emb_path,
    train_emb_path,
    eval_cfg: dict,
    out_path,
    *,
    exclude_same_image: bool = False,
) -> dict[int, float]:
    """Write the copy baseline's ``icdrl.eval`` records (no LVLM, :func:`icdrl.retrieval.copy_answer`):
    at each k, the most frequent answer among the k ``rices`` demonstrations, scored like every
    method (``icdrl.metrics.vqa_accuracy`` under :func:`eval_metric`). Returns the mean accuracy per k."""
    from icdrl.data import load_dataset
    from icdrl.metrics import vqa_accuracy
    from icdrl.records import write_records
    from icdrl.retrieval import COPY_SOURCE, copy_answer

    shots = canonical_shots(eval_cfg.get("shots", [1, 2, 3, 4]))
    metric = eval_metric(eval_cfg)
    pools = read_records(test_pools_path, PoolRecord)
    queries = examples_by_id(load_dataset(dataset_cfg, "eval"), "eval split")
    train_list = load_dataset(dataset_cfg, "train")
    train = examples_by_id(train_list, "train split")
    plan = plan_rices_from_files(
        COPY_SOURCE,
        pools,
        queries,
        train_list,
        eval_emb_path,
        train_emb_path,
        shots,
        where=f"{test_pools_path} (copy)",
        exclude_same_image=exclude_same_image,
    )
    jobs = [Job(q, k, (), ids) for q, k, ids in plan]
    check_jobs(
        "copy", jobs, queries, train, str(test_pools_path), exclude_same_image=exclude_same_image
    )
    recs = []
    for j in jobs:
        ans = copy_answer([train[i].answer for i in j.icd_ids])
        recs.append(
            EvalRecord(
                method="copy",
                cell=None,
                seed=None,
                k=j.k,
                query_id=j.query_id,
                icd_ids=j.icd_ids,
                icd_pos=(),
                prediction_raw=ans,
                prediction=ans,
                acc=float(vqa_accuracy(ans, queries[j.query_id].answers, metric)),
                image_id=queries[j.query_id].image_id or None,
            )
        )
    write_records(out_path, recs)
    summary = summarize([r.to_dict() for r in recs])
    log.info(
        "copy accuracy by k: %s", ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in summary.items())
    )
    return summary


# --------------------------------------------------------------------------- per_shot (docs/science.md §8)


def _accuracy_by_cell_and_k(paths: Sequence, what: str) -> dict[str, dict[int, dict[int, float]]]:
    """``acc[cell][k][query_id]`` from v3 eval files of one seed."""
    acc: dict[str, dict[int, dict[int, float]]] = {}
    seeds = set()
    for path in paths:
        for r in read_records(path, EvalRecord):
            if r.method != "v3":
                raise ValueError(
                    f"{path}: per_shot chooses among v3 cells; found a {r.method} record"
                )
            seeds.add(r.seed)
            acc.setdefault(r.cell, {}).setdefault(r.k, {})[r.query_id] = r.acc
    if len(seeds) > 1:
        raise ValueError(f"per_shot: the {what} files mix seeds {sorted(seeds)}; choose per seed")
    return acc


def choose_per_shot(
    val_acc: dict[str, dict[int, dict[int, float]]],
) -> dict[int, tuple[str, float]]:
    """At each k, the cell with the highest mean validation accuracy: ``{k: (cell, val_acc)}``.

    Ties go to the first cell in sorted slug order, so the choice does not depend on file order.
    Every cell must have been evaluated at k on the same validation queries.
    """
    shots = sorted({k for per_k in val_acc.values() for k in per_k})
    out = {}
    for k in shots:
        queries = {c: frozenset(per_k.get(k, {})) for c, per_k in val_acc.items()}
        if len(set(queries.values())) != 1 or not next(iter(queries.values())):
            raise ValueError(
                f"per_shot: the v3 cells were not all evaluated on the same validation queries at k={k}"
            )
        means = {c: float(np.mean(list(val_acc[c][k].values()))) for c in sorted(val_acc)}
        best = max(means.values())
        cell = next(c for c in sorted(means) if means[c] == best)
        out[k] = (cell, best)
    return out


def select_per_shot(
    val_paths: Sequence, test_paths: Sequence, out_path
) -> dict[int, tuple[str, float]]:
    """Write the ``per_shot`` method's test records (docs/science.md §8): at each k, the test records of the
    v3 cell best on the validation queries (:func:`choose_per_shot`); returns the choice.

    ``val_paths`` / ``test_paths``: the v3 cells' eval files on the validation / test queries, one
    seed. Only validation accuracies decide; the test records are copied, relabelled.
    """
    from icdrl.records import write_records

    val_acc = _accuracy_by_cell_and_k(val_paths, "validation")
    choice = choose_per_shot(val_acc)
    n_val = {k: len(val_acc[c][k]) for k, (c, _) in choice.items()}
    test = [r for p in test_paths for r in read_records(p, EvalRecord)]
    missing = {c for c, _ in choice.values()} - {r.cell for r in test}
    if missing:
        raise ValueError(f"per_shot: no test records of the chosen cell(s) {sorted(missing)}")
    out = []
    for r in test:
        if r.k in choice and r.cell == choice[r.k][0]:
            spec = {"chosen": r.spec, "val_acc": choice[r.k][1], "n_val": n_val[r.k]}
            out.append(dataclasses.replace(r, method="per_shot", spec=spec))
    out.sort(key=lambda r: (r.k, r.query_id))
    write_records(out_path, out)
    for k, (c, a) in choice.items():
        log.info(
            "per_shot k=%d: %s (validation accuracy %.2f%% over %d queries)",
            k,
            c,
            100 * a,
            n_val[k],
        )
    return choice
