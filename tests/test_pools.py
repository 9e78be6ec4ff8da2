"""Anchors, test queries and per-query pools (docs/science.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stage_fakes import make_examples, patch_dataset, random_table, save_table

from icdrl.pools import SAMPLERS, build_pools, sample_pool, top_k, write_pools
from icdrl.records import PoolRecord, read_jsonl, read_records

# train 0..59; examples 50..59 duplicate the image and question of 0..9
TRAIN = make_examples(60, dup_of={50 + i: i for i in range(10)})
# eval 1000..1019; 1000..1004 duplicate train 20..24 (same image id and question)
EVAL = make_examples(20, start=1000, dup_of={1000 + i: 20 + i for i in range(5)})
TRAIN_T = random_table([ex.id for ex in TRAIN], seed=1)
EVAL_T = random_table([ex.id for ex in EVAL], seed=2)


def _dups(ex, train):
    return {t.id for t in train if (t.image_id, t.question) == (ex.image_id, ex.question)}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("role", ["anchors", "test"])
def test_pools_never_hold_query_or_duplicate(sampler, role):
    queries = TRAIN[:12] + TRAIN[50:53] if role == "anchors" else EVAL
    qt = TRAIN_T if role == "anchors" else EVAL_T
    recs = build_pools(
        queries,
        TRAIN,
        sampler=sampler,
        size=16,
        seed=3,
        role=role,
        query_table=qt,
        train_table=TRAIN_T,
    )
    assert [r.query_id for r in recs] == [q.id for q in queries]
    for q, r in zip(queries, recs):
        assert len(r.pool) == 16 == len(set(r.pool))
        assert not (set(r.pool) & _dups(q, TRAIN))
        if role == "anchors":
            assert q.id not in r.pool
    # pools differ between queries (docs/defects.md defect 9: not the same first K items for everyone)
    assert len({r.pool for r in recs}) == len(recs)


def test_similarity_samplers_take_the_nearest():
    q = EVAL[10]
    for sampler, kind in (("image_sim", "img"), ("text_sim", "txt")):
        (rec,) = build_pools(
            [q],
            TRAIN,
            sampler=sampler,
            size=5,
            seed=0,
            role="test",
            query_table=EVAL_T,
            train_table=TRAIN_T,
        )
        sims = TRAIN_T.vectors([t.id for t in TRAIN], kind) @ EVAL_T.vector(q.id, kind)
        assert list(rec.pool) == [TRAIN[i].id for i in np.argsort(-sims)[:5]]
    (mix,) = build_pools(
        [q],
        TRAIN,
        sampler="mix",
        size=6,
        seed=0,
        role="test",
        query_table=EVAL_T,
        train_table=TRAIN_T,
    )
    sims = TRAIN_T.emb @ EVAL_T.vector(q.id)
    assert list(mix.pool[:3]) == [TRAIN[i].id for i in np.argsort(-sims)[:3]]


def test_random_pool_depends_only_on_seed_and_query():
    a = build_pools(TRAIN[:5], TRAIN, sampler="random", size=8, seed=0)
    b = build_pools(TRAIN[3:5], TRAIN, sampler="random", size=8, seed=0)
    c = build_pools(TRAIN[:5], TRAIN, sampler="random", size=8, seed=1)
    assert a[3:] == b and a != c


def test_pool_too_large_and_missing_embeddings():
    with pytest.raises(ValueError, match="exceeds the 58 eligible"):
        build_pools(TRAIN[:1], TRAIN, sampler="random", size=59, seed=0)
    with pytest.raises(ValueError, match="needs query and train embeddings"):
        build_pools(TRAIN[:1], TRAIN, sampler="image_sim", size=5, seed=0)
    with pytest.raises(ValueError, match="sampler"):
        build_pools(TRAIN[:1], TRAIN, sampler="nearest", size=5, seed=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 8), st.data())
def test_top_k_matches_stable_sort(vals, k, data):
    sims = np.array(vals, dtype=float)
    banned = data.draw(st.sets(st.integers(0, len(vals) - 1), max_size=len(vals)))
    sims[list(banned)] = -np.inf
    want = [i for i in sorted(range(len(vals)), key=lambda i: (-sims[i], i)) if i not in banned][:k]
    assert list(top_k(sims, k)) == want


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SAMPLERS), st.integers(0, 10_000), st.sets(st.integers(0, 29), max_size=10))
def test_sample_pool_avoids_banned_rows(sampler, seed, banned):
    rng = np.random.default_rng(seed)
    vecs = {k: random_table(range(30), seed=seed).__dict__[k] for k in ("emb", "img", "txt")}
    q = {k: v[0] for k, v in vecs.items()}
    rows = sample_pool(sampler, 12, np.array(sorted(banned), dtype=np.int64), 30, rng, q, vecs)
    assert len(rows) == 12 == len(set(rows.tolist())) and not set(rows.tolist()) & banned


def test_write_pools_both_roles(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": EVAL})
    tr, ev = tmp_path / "train.npz", tmp_path / "eval.npz"
    save_table(TRAIN_T, tr)
    save_table(EVAL_T, ev)
    cfg = {"sampler": "text_sim", "size": 10, "n_anchors": 7, "n_test": 6, "seed": 0}
    write_pools({}, "anchors", cfg, str(tr), str(tr), str(tmp_path / "anchors.jsonl"))
    write_pools({}, "test", cfg, str(ev), str(tr), str(tmp_path / "test.jsonl"))
    anchors = read_records(tmp_path / "anchors.jsonl", PoolRecord)
    test = read_records(tmp_path / "test.jsonl", PoolRecord)
    assert len(anchors) == 7 and len(test) == 6
    # nested in n: fewer anchors are a subset of more
    write_pools(
        {}, "anchors", {**cfg, "n_anchors": 3}, str(tr), str(tr), str(tmp_path / "a3.jsonl")
    )
    a3 = read_records(tmp_path / "a3.jsonl", PoolRecord)
    assert {r.query_id for r in a3} <= {r.query_id for r in anchors}
    assert all(r in anchors for r in a3)  # and a query's pool does not depend on the others
    train_ids = {ex.id for ex in TRAIN}
    assert {r.query_id for r in anchors} <= train_ids and {r.query_id for r in test} <= {
        ex.id for ex in EVAL
    }
    for r in anchors + test:
        assert set(r.pool) <= train_ids and r.query_id not in r.pool
    assert set(read_jsonl(tmp_path / "test.jsonl", "icdrl.pools")[0]) == {"query_id", "pool"}
    with pytest.raises(ValueError, match="role"):
        write_pools({}, "dev", cfg, str(ev), str(tr), str(tmp_path / "x.jsonl"))


def test_validation_queries_are_disjoint_from_test_queries(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": EVAL})
    tr, ev = tmp_path / "train.npz", tmp_path / "eval.npz"
    save_table(TRAIN_T, tr)
    save_table(EVAL_T, ev)
    n = len(EVAL)
    cfg = {
        "sampler": "text_sim",
        "size": 10,
        "n_anchors": 7,
        "n_test": n // 2,
        "n_val": n - n // 2,
        "seed": 0,
    }
    write_pools({}, "test", cfg, str(ev), str(tr), str(tmp_path / "test.jsonl"))
    write_pools({}, "val", cfg, str(ev), str(tr), str(tmp_path / "val.jsonl"))
    test = read_records(tmp_path / "test.jsonl", PoolRecord)
    val = read_records(tmp_path / "val.jsonl", PoolRecord)
    # together they use the whole split, without overlap
    assert len(val) == n - n // 2 and not {r.query_id for r in val} & {r.query_id for r in test}
    assert {r.query_id for r in val} | {r.query_id for r in test} == {ex.id for ex in EVAL}
    # nested in n_val, independent of n_test, and pools built as for the test queries
    write_pools(
        {}, "val", {**cfg, "n_val": 2, "n_test": 1}, str(ev), str(tr), str(tmp_path / "v2.jsonl")
    )
    v2 = read_records(tmp_path / "v2.jsonl", PoolRecord)
    assert {r.query_id for r in v2} <= {r.query_id for r in val}
    for r in val:
        assert len(r.pool) == 10 and r.query_id not in r.pool
    with pytest.raises(ValueError, match="pools.n_val: .* must be disjoint"):
        write_pools(
            {}, "val", {**cfg, "n_val": n - n // 2 + 1}, str(ev), str(tr), str(tmp_path / "x.jsonl")
        )
