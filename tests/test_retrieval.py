"""RICES over the whole training split and the copy baseline (docs/science.md §8)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl.evaluate import evaluate_method, write_copy_baseline
from icdrl.metrics import normalize_answer, vqa_accuracy
from icdrl.pools import build_pools
from icdrl.records import EvalRecord, PoolRecord, read_records, write_records
from icdrl.retrieval import RICES_METHODS, copy_answer, plan_rices, rices_rows

# train 0..79; 70..74 duplicate the image and question of eval 500..504; 75..79 show the image of
# eval 505..509 with another question; train 10..19 share images in pairs
TRAIN = make_examples(80)
TRAIN = [
    dataclasses.replace(
        ex, image_id=f"img{500 + ex.id - 70}", question=f"question number {500 + ex.id - 70} ?"
    )
    if 70 <= ex.id < 75
    else ex
    for ex in TRAIN
]
TRAIN = [
    dataclasses.replace(ex, image_id=f"img{505 + ex.id - 75}") if 75 <= ex.id < 80 else ex
    for ex in TRAIN
]
TRAIN = [
    dataclasses.replace(ex, image_id=f"img{ex.id - ex.id % 2}") if 10 <= ex.id < 20 else ex
    for ex in TRAIN
]
EVAL = make_examples(12, start=500)
SHOTS = [1, 2, 3, 4]


def _tables(seed=0):
    """Train vectors where the planted duplicates and same-image items are the query's nearest."""
    tt = random_table([ex.id for ex in TRAIN], seed=3 + seed)
    et = random_table([ex.id for ex in EVAL], seed=4 + seed)
    for kind in ("emb", "img", "txt"):
        a = getattr(tt, kind)
        for i in range(70, 80):
            a[i] = getattr(et, kind)[(i - 70) % 10]  # identical: cosine 1
    return tt, et


def brute_force(q_vec, train_vecs, ids, banned_ids, k):
    """Top-k by cosine with a plain Python scan (norms recomputed), ties by train order; least similar first."""
    scored = []
    for r, (i, v) in enumerate(zip(ids, train_vecs)):
        if i in banned_ids:
            continue
        cos = float(np.dot(v, q_vec) / (np.linalg.norm(v) * np.linalg.norm(q_vec)))
        scored.append((-round(cos, 9), r, i))
    return [i for _, _, i in sorted(scored)[:k]][::-1]


@pytest.mark.parametrize("method", list(RICES_METHODS))
@pytest.mark.parametrize("exclude_same_image", [False, True])
def test_rices_is_the_top_k_of_a_brute_force_scan(method, exclude_same_image):
    tt, et = _tables()
    kind = RICES_METHODS[method]
    ids = [ex.id for ex in TRAIN]
    plan = plan_rices(
        method,
        EVAL,
        TRAIN,
        et.vectors([q.id for q in EVAL], kind),
        tt.vectors(ids, kind),
        SHOTS,
        exclude_same_image=exclude_same_image,
    )
    assert [(q, k) for q, k, _ in plan] == [(q.id, k) for k in SHOTS for q in EVAL]
    got = {(q, k): ids_ for q, k, ids_ in plan}
    for q in EVAL:
        banned = {t.id for t in TRAIN if (t.image_id, t.question) == (q.image_id, q.question)}
        if exclude_same_image:
            banned |= {t.id for t in TRAIN if t.image_id == q.image_id}
        for k in SHOTS:
            want = brute_force(et.vector(q.id, kind), tt.vectors(ids, kind), ids, banned, k)
            assert list(got[(q.id, k)]) == want
            assert (
                got[(q.id, k)][1:] == got[(q.id, k - 1)] if k > 1 else True
            )  # nested: k extends k-1
    # the planted items are what the exclusions remove: duplicates always, same-image ones on request
    firsts = {q: ids_[-1] for (q, k), ids_ in got.items() if k == 1}
    assert not any(firsts[500 + i] == 70 + i for i in range(5))
    same_image_nearest = [firsts[505 + i] == 75 + i for i in range(5)]
    assert not any(same_image_nearest) if exclude_same_image else all(same_image_nearest)


def test_rices_rows_orders_ties_and_refuses_large_k():
    vecs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    assert rices_rows(np.array([1.0, 0.0]), vecs, np.array([], dtype=np.int64), 3) == [
        3,
        2,
        0,
    ]  # tie 0/2: row 0 nearest
    assert rices_rows(np.array([1.0, 0.0]), vecs, np.array([0]), 2) == [3, 2]
    with pytest.raises(ValueError, match="k=4 exceeds the 3 eligible"):
        rices_rows(np.array([1.0, 0.0]), vecs, np.array([1]), 4)


def test_copy_answer_most_frequent_then_nearest():
    assert copy_answer(["red"]) == "red"
    assert copy_answer(["blue", "red", "blue"]) == "blue"  # majority wins although red is not last
    assert copy_answer(["blue", "red"]) == "red"  # tie: the last (nearest the query)
    assert copy_answer(["red", "blue", "red", "blue"]) == "blue"
    # counted after VQA normalisation; the nearest of the winning group is returned as written
    assert copy_answer(["Two", "2", "red"]) == "2"
    assert normalize_answer("Two") == normalize_answer("2")
    with pytest.raises(ValueError, match="no demonstrations"):
        copy_answer([])


@pytest.fixture
def files(tmp_path, monkeypatch):
    train = [
        dataclasses.replace(ex, answers=(f"a{ex.id % 3}",), answer=f"a{ex.id % 3}") for ex in TRAIN
    ]
    patch_dataset(monkeypatch, {"train": train, "eval": EVAL})
    tt, et = _tables()
    save_table(tt, tmp_path / "train.npz")
    save_table(et, tmp_path / "eval.npz")
    pools = build_pools(EVAL, train, sampler="random", size=8, seed=0, role="test")
    write_records(tmp_path / "pools.jsonl", pools)
    return tmp_path, train


def test_copy_baseline_records_are_scored_like_the_lvlm_methods(files):
    tmp, train = files
    by_id = {ex.id: ex for ex in train}
    q_by_id = {ex.id: ex for ex in EVAL}
    summary = write_copy_baseline(
        {},
        str(tmp / "pools.jsonl"),
        str(tmp / "eval.npz"),
        str(tmp / "train.npz"),
        {"shots": SHOTS},
        str(tmp / "copy.jsonl"),
    )
    recs = read_records(tmp / "copy.jsonl", EvalRecord)
    tt, et = _tables()
    plan = plan_rices(
        "rices",
        EVAL,
        train,
        et.vectors([q.id for q in EVAL]),
        tt.vectors([e.id for e in train]),
        SHOTS,
    )
    assert [(r.query_id, r.k, r.icd_ids) for r in recs] == plan
    for r in recs:
        assert r.method == "copy" and r.icd_pos == () and r.seed is None
        assert r.prediction == copy_answer([by_id[i].answer for i in r.icd_ids])
        assert r.acc == vqa_accuracy(r.prediction, q_by_id[r.query_id].answers)
    assert summary == {k: pytest.approx(np.mean([r.acc for r in recs if r.k == k])) for k in SHOTS}
    # the planted duplicates (train 70..74 = eval 500..504) are never copied from
    assert not any(70 + r.query_id - 500 in r.icd_ids for r in recs if r.query_id < 505)


@pytest.mark.parametrize("method", list(RICES_METHODS))
def test_rices_evaluation_records(files, method):
    tmp, train = files
    fb = FakeBackend()
    evaluate_method(
        {},
        {"batch_size": 4},
        None,
        str(tmp / "pools.jsonl"),
        str(tmp / "eval.npz"),
        str(tmp / "train.npz"),
        method,
        {"shots": SHOTS, "chunk_prompts": 7},
        str(tmp / f"{method}.jsonl"),
        backend=fb,
        exclude_same_image=True,
    )
    recs = read_records(tmp / f"{method}.jsonl", EvalRecord)
    tt, et = _tables()
    kind = RICES_METHODS[method]
    plan = plan_rices(
        method,
        EVAL,
        train,
        et.vectors([q.id for q in EVAL], kind),
        tt.vectors([e.id for e in train], kind),
        SHOTS,
        exclude_same_image=True,
    )
    assert [(r.query_id, r.k, r.icd_ids) for r in recs] == plan
    assert all(
        r.method == method and r.icd_pos == () and r.cell is None and r.seed is None for r in recs
    )
    # ICDs come from the whole training split, not only from the pools
    pool_ids = {i for r in read_records(tmp / "pools.jsonl", PoolRecord) for i in r.pool}
    assert any(i not in pool_ids for r in recs for i in r.icd_ids)
    assert sorted(fb.gen_prompts) == sorted((list(r.icd_ids), r.query_id) for r in recs)
