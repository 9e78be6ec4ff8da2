"""RICES and the copy baseline (docs/science.md §8): retrieval over the whole training split.

**RICES** (retrieval-based in-context example selection, the field's standard baseline) shows a
test query the k training examples most cosine-similar to it, over the *whole* training split
(the ``similarity`` method only looks inside the query's pool of K). Three embeddings, one
method each (:data:`RICES_METHODS`): ``rices_image`` (the image-only ``img`` vectors),
``rices_text`` (question-only ``txt``) and ``rices`` (the mixed ``emb``). The query's exact
duplicates (same image and question) are never shown, and with ``pools.exclude_same_image`` no
example with the query's image (:class:`icdrl.pools.Exclusions`). The k picks go into the prompt
least similar first, so the most similar is nearest the query; ties go to the earlier training
example, and the k-shot ICDs extend the (k−1)-shot ones.

The **copy baseline** runs no LVLM: it answers with the most frequent answer (after VQA
normalisation) among the k ``rices`` demonstrations, ties going to the one nearest the query,
and is scored with the same metric as every other method.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from icdrl.data import Example
from icdrl.metrics import normalize_answer
from icdrl.pools import Exclusions, top_k

__all__ = ["RICES_METHODS", "COPY_SOURCE", "rices_rows", "plan_rices", "copy_answer"]

#: RICES method -> the embeddings array it ranks by
RICES_METHODS: dict[str, str] = {"rices_image": "img", "rices_text": "txt", "rices": "emb"}
#: the RICES variant whose demonstrations the copy baseline copies from
COPY_SOURCE = "rices"


def rices_rows(
    query_vec: np.ndarray, train_vecs: np.ndarray, banned: np.ndarray, k: int
) -> list[int]:
    """Rows of the ``k`` training vectors most cosine-similar to ``query_vec`` (rows in ``banned``
    never), least similar first: the most similar is last, nearest the query. Ties: lower row first
    among the best (so a lower row is nearer the query).

    ``train_vecs`` rows are L2-normalised (``icdrl.embeddings``), so cosine = dot product; the
    product is taken in float64 so the order does not depend on the BLAS summation order.
    """
    if k > len(train_vecs) - len(np.unique(banned)):
        raise ValueError(
            f"RICES: k={k} exceeds the {len(train_vecs) - len(np.unique(banned))} eligible training examples"
        )
    sims = train_vecs.astype(np.float64) @ np.asarray(query_vec, dtype=np.float64)
    sims[np.asarray(banned, dtype=np.int64)] = -np.inf
    best_first = top_k(sims, k)
    return [int(r) for r in best_first[::-1]]


def plan_rices(
    method: str,
    queries: Sequence[Example],
    train: Sequence[Example],
    query_vecs: np.ndarray,
    train_vecs: np.ndarray,
    shots: Sequence[int],
    *,
    exclude_same_image: bool = False,
) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(query id, k, train ids in prompt order)`` for every k of ``shots`` and every query.

    ``query_vecs[i]`` is ``queries[i]``'s vector and ``train_vecs[r]`` that of ``train[r]``, both
    of the embedding :data:`RICES_METHODS` names for ``method`` (the caller picks the array).
    """
    if method not in RICES_METHODS:
        raise ValueError(f"RICES method must be one of {tuple(RICES_METHODS)}, got {method!r}")
    if len(query_vecs) != len(queries) or len(train_vecs) != len(train):
        raise ValueError(
            f"{method}: {len(query_vecs)} query vectors for {len(queries)} queries, "
            f"{len(train_vecs)} training vectors for {len(train)} training examples"
        )
    excl = Exclusions(train, exclude_same_image)
    kmax = max(shots)
    best: dict[int, list[int]] = {}
    for q, vec in zip(queries, query_vecs):
        rows = rices_rows(vec, train_vecs, excl.rows(q, is_train=False), kmax)
        best[q.id] = [int(excl.train_ids[r]) for r in rows[::-1]]  # most similar first
    return [(q.id, k, tuple(best[q.id][:k][::-1])) for k in shots for q in queries]


def copy_answer(demo_answers: Sequence[str]) -> str:
    """The most frequent of the demonstrations' answers (compared after VQA normalisation); ties
    go to the demonstration nearest the query (the last one). Returns that demonstration's answer."""
    if not demo_answers:
        raise ValueError("copy baseline: no demonstrations to copy from")
    norm = [normalize_answer(a) for a in demo_answers]
    counts = Counter(norm)
    best = max(counts.values())
    for a, n in zip(reversed(demo_answers), reversed(norm)):
        if counts[n] == best:
            return a
    raise AssertionError("unreachable")
