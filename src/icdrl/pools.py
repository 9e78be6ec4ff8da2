"""Stage 3: training anchors, test and validation queries, and one pool of K train examples per query (docs/science.md §2).

One code path builds pools for every role: ``anchors`` (queries = a seeded subset of the train
split), ``test`` (queries = a seeded subset of the eval split) and ``val`` (validation queries:
another seeded subset of the eval split, disjoint from the test queries, docs/science.md §8). A pool never holds its query
nor an exact duplicate of it (same image and same question), so no leakage at training or
test time, and each query gets its own pool (docs/defects.md defect 9). With ``pools.exclude_same_image``
a pool holds no train example that shows the query's image at all (:class:`Exclusions`, shared
with RICES, ``icdrl.retrieval``).

Samplers (config ``pools.sampler``), each over the eligible train examples:

* ``random``: K drawn without replacement, seeded per (seed, role, query id), so a query's pool
  does not depend on which other queries are drawn.
* ``image_sim`` / ``text_sim``: the K most cosine-similar by the image-only / question-only
  embeddings (``img`` / ``txt`` arrays), most similar first; ties by train order.
* ``mix``: the ⌊K/2⌋ most similar by the combined embedding ``emb``, then K − ⌊K/2⌋ drawn at
  random (seeded as ``random``) from the remaining eligible examples.

Queries (:func:`role_queries`): one seeded permutation of the split (``pools.seed``); anchors
and test queries are its first n, validation queries its last ``n_val``, each kept in the
split's order. So each role is nested in its n (a smaller n gives a subset of a larger n's
queries), and test and validation queries never overlap while ``n_test + n_val`` fits the split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from icdrl.data import Example, seeded_subset
from icdrl.embeddings import EmbeddingTable
from icdrl.records import PoolRecord, write_jsonl

log = logging.getLogger(__name__)

SAMPLERS = ("random", "image_sim", "text_sim", "mix")
ROLES = {
    "anchors": ("train", 0),
    "test": ("eval", 1),
    "val": ("eval", 2),
}  # role -> (split, rng salt)
N_KEY = {"anchors": "n_anchors", "test": "n_test", "val": "n_val"}  # role -> its pools config key


def image_key(ex: Example) -> str:
    """Two examples with the same key show the same image (its dataset id, else its file)."""
    return ex.image_id or ex.image


def duplicate_key(ex: Example) -> tuple[str, str]:
    """Two examples with the same key are exact duplicates (same image, same question)."""
    return (image_key(ex), " ".join(ex.question.lower().split()))


class Exclusions:
    """Which train rows a query may never be shown (docs/science.md §2, §8): its exact duplicates (same image
    and question), itself when it is a train example, and with ``exclude_same_image`` every train
    example showing its image."""

    def __init__(self, train: Sequence[Example], exclude_same_image: bool = False):
        self.exclude_same_image = bool(exclude_same_image)
        self.train_ids = np.array([ex.id for ex in train], dtype=np.int64)
        self._by_dup: dict[tuple[str, str], list[int]] = {}
        self._by_image: dict[str, list[int]] = {}
        for r, ex in enumerate(train):
            self._by_dup.setdefault(duplicate_key(ex), []).append(r)
            self._by_image.setdefault(image_key(ex), []).append(r)

    def rows(self, query: Example, is_train: bool) -> np.ndarray:
        """Sorted unique train rows banned for ``query`` (``is_train``: it is a train example)."""
        banned = list(self._by_dup.get(duplicate_key(query), []))
        if self.exclude_same_image:
            banned += self._by_image.get(image_key(query), [])
        if is_train:
            banned += np.flatnonzero(self.train_ids == query.id).tolist()
        return np.unique(np.asarray(banned, dtype=np.int64))


def top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest finite ``sims``, largest first; ties by index."""
    k = min(k, int(np.isfinite(sims).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(sims, len(sims) - k)[len(sims) - k]
    cand = np.flatnonzero(sims >= kth)  # every index tied at the boundary is considered
    order = np.lexsort((cand, -sims[cand]))
    return cand[order[:k]]


def sample_pool(
    sampler: str,
    k: int,
    banned: np.ndarray,
    n_train: int,
    rng: np.random.Generator,
    query_vecs: dict[str, np.ndarray] | None = None,
    train_vecs: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Row indices (into the train arrays) of one pool; rows in ``banned`` are never drawn.

    ``query_vecs``/``train_vecs`` map ``emb``/``img``/``txt`` to the query's vector and the
    train rows' vectors; only the similarity samplers need them.
    """
    banned = np.unique(np.asarray(banned, dtype=np.int64))
    n_eligible = n_train - len(banned)
    if n_eligible < k:
        raise ValueError(f"pool size {k} exceeds the {n_eligible} eligible train examples")

    def most_similar(kind: str, n: int) -> np.ndarray:
        if (
            query_vecs is None
            or train_vecs is None
            or kind not in query_vecs
            or kind not in train_vecs
        ):
            raise ValueError(f"sampler {sampler!r} needs {kind!r} embeddings")
        sims = (train_vecs[kind] @ query_vecs[kind]).astype(np.float64)
        sims[banned] = -np.inf
        return top_k(sims, n)

    def random_rows(n: int, also_banned: np.ndarray) -> np.ndarray:
        eligible = np.setdiff1d(
            np.arange(n_train, dtype=np.int64), np.concatenate([banned, also_banned])
        )
        return rng.choice(eligible, size=n, replace=False)

    if sampler == "random":
        return random_rows(k, np.zeros(0, dtype=np.int64))
    if sampler == "image_sim":
        return most_similar("img", k)
    if sampler == "text_sim":
        return most_similar("txt", k)
    if sampler == "mix":
        sim = most_similar("emb", k // 2)
        return np.concatenate([sim, random_rows(k - len(sim), sim)])
    raise ValueError(f"pools.sampler must be one of {SAMPLERS}, got {sampler!r}")


def _vecs(table: EmbeddingTable, rows: np.ndarray | int) -> dict[str, np.ndarray]:
    return {
        kind: getattr(table, kind)[rows]
        for kind in ("emb", "img", "txt")
        if getattr(table, kind) is not None
    }


def build_pools(
    queries: Sequence[Example],
    train: Sequence[Example],
    *,
    sampler: str,
    size: int,
    seed: int,
    role: str = "anchors",
    query_table: EmbeddingTable | None = None,
    train_table: EmbeddingTable | None = None,
    exclude_same_image: bool = False,
) -> list[PoolRecord]:
    """A pool of ``size`` train ids for every query (see the module docstring).

    ``role`` says where the queries come from: ``anchors`` = the train split (a query is then
    excluded from its own pool by id too), ``test`` = the eval split. ``exclude_same_image``:
    no train example showing the query's image (``pools.exclude_same_image``).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    split, salt = ROLES[role]
    if sampler not in SAMPLERS:
        raise ValueError(f"pools.sampler must be one of {SAMPLERS}, got {sampler!r}")
    excl = Exclusions(train, exclude_same_image)
    train_ids = excl.train_ids
    train_vecs = None
    if sampler != "random":
        if query_table is None or train_table is None:
            raise ValueError(f"sampler {sampler!r} needs query and train embeddings")
        train_vecs = _vecs(train_table, train_table.rows(train_ids))
    out = []
    for q in queries:
        banned = excl.rows(q, is_train=split == "train")
        n_eligible = len(train) - len(banned)
        if size > n_eligible:
            raise ValueError(
                f"query {q.id}: pool size {size} exceeds the {n_eligible} eligible train examples"
            )
        rng = np.random.default_rng([seed, salt, q.id])
        qv = _vecs(query_table, query_table.row(q.id)) if train_vecs is not None else None
        rows = sample_pool(sampler, size, banned, len(train), rng, qv, train_vecs)
        out.append(PoolRecord(query_id=q.id, pool=tuple(int(i) for i in train_ids[rows])))
    return out


def role_queries(
    examples: Sequence[Example], role: str, n: int, seed: int, n_test: int = 0
) -> list[Example]:
    """The ``n`` queries of ``role`` (see the module docstring); ``n_test`` is only checked for
    ``val`` (test and validation queries must fit the split together)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    if role != "val":
        return seeded_subset(examples, n, seed)
    if n_test + n > len(examples):
        raise ValueError(
            f"pools.n_val: {n} validation and {n_test} test queries exceed the {len(examples)} "
            "examples of the eval split (they must be disjoint)"
        )
    perm = np.random.default_rng(seed).permutation(len(examples))
    keep = np.sort(perm[len(examples) - n :]) if n else np.zeros(0, dtype=np.int64)
    return [examples[i] for i in keep]


def write_pools(
    dataset_cfg: dict, role: str, pools_cfg: dict, query_emb_path, train_emb_path, out_path
) -> None:
    """Write ``icdrl.pools`` for role ``anchors`` (n_anchors train queries), ``test`` (n_test eval
    queries) or ``val`` (n_val eval queries, disjoint from the test queries)."""
    from icdrl.data import load_dataset

    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    split, _ = ROLES[role]
    n_key = N_KEY[role]
    n = int(pools_cfg[n_key])
    seed = int(pools_cfg.get("seed", 0))
    train = load_dataset(dataset_cfg, "train")
    candidates = train if split == "train" else load_dataset(dataset_cfg, split)
    if n > len(
        candidates
    ):  # the path says n: never write fewer (icdrl.checks refuses it up front too)
        raise ValueError(
            f"config key pools.{n_key}: {n} exceeds the {len(candidates)} examples of the {split} split"
        )
    queries = role_queries(candidates, role, n, seed, int(pools_cfg.get("n_test", 0)))
    sampler = pools_cfg.get("sampler", "random")
    need_emb = sampler != "random"
    recs = build_pools(
        queries,
        train,
        sampler=sampler,
        size=int(pools_cfg.get("size", 64)),
        seed=seed,
        role=role,
        query_table=EmbeddingTable.load(query_emb_path) if need_emb else None,
        train_table=EmbeddingTable.load(train_emb_path) if need_emb else None,
        exclude_same_image=bool(pools_cfg.get("exclude_same_image", False)),
    )
    write_jsonl(out_path, PoolRecord.SCHEMA, [r.to_dict() for r in recs])
    log.info(
        "%s: %d %s queries, pools of %d (%s)",
        out_path,
        len(recs),
        role,
        int(pools_cfg.get("size", 64)),
        sampler,
    )
