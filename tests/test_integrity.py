"""Integrity checks at evaluation time (docs/science.md §8): each fails the job naming method, query and k."""

from __future__ import annotations

import dataclasses

import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl.evaluate import evaluate_method
from icdrl.integrity import IntegrityError, check_icds
from icdrl.pools import build_pools
from icdrl.records import PoolRecord, write_records

TRAIN = make_examples(30)
Q = make_examples(1, start=100)[0]
# train 20 is an exact duplicate of the query; train 21 shows its image with another question
DUP = dataclasses.replace(TRAIN[20], image_id=Q.image_id, question=Q.question.upper())
SAME_IMAGE = dataclasses.replace(TRAIN[21], image_id=Q.image_id)
TRAIN = TRAIN[:20] + [DUP, SAME_IMAGE] + TRAIN[22:]


def test_clean_prompts_pass():
    check_icds("v2", Q, 2, TRAIN[:2])
    check_icds(
        "v2", Q, 1, [SAME_IMAGE]
    )  # another question about the query's image is allowed by default
    check_icds("zero_shot", Q, 4, [])  # zero-shot: no ICD at every k


@pytest.mark.parametrize(
    "icds, k, kw, match",
    [
        (TRAIN[:3], 2, {}, r"3 ICDs, expected exactly 2"),
        (TRAIN[:1], 2, {}, r"1 ICDs, expected exactly 2"),
        (
            [TRAIN[0], TRAIN[1], TRAIN[0]],
            3,
            {},
            r"ICD 0 appears more than once \(2 distinct of 3\)",
        ),
        ([TRAIN[0], DUP], 2, {}, r"ICD 20 has the query's image and question"),
        (
            [TRAIN[0], SAME_IMAGE],
            2,
            {"exclude_same_image": True},
            r"ICD 21 shows the query's image 'img100' "
            r"\(pools.exclude_same_image is true\)",
        ),
    ],
)
def test_each_check_fires_with_one_line_naming_method_query_and_k(icds, k, kw, match):
    with pytest.raises(
        IntegrityError,
        match=rf"^integrity: method v3 hybrid-ha0.5-is10-rank, query 100, k={k}: " + match,
    ) as e:
        check_icds("v3 hybrid-ha0.5-is10-rank", Q, k, icds, **kw)
    assert "\n" not in str(e.value)


def test_zero_shot_with_an_icd_fires():
    with pytest.raises(
        IntegrityError, match="method zero_shot, query 100, k=1: 1 ICDs, expected exactly 0"
    ):
        check_icds("zero_shot", Q, 1, TRAIN[:1])


@pytest.fixture
def files(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": [Q]})
    save_table(random_table([ex.id for ex in TRAIN], seed=1), tmp_path / "train.npz")
    save_table(random_table([Q.id], seed=2), tmp_path / "eval.npz")
    return tmp_path


def _evaluate(tmp, pool, method="random", fb=None, **kw):
    write_records(tmp / "pools.jsonl", [PoolRecord(Q.id, tuple(pool))])
    fb = fb or FakeBackend()
    evaluate_method(
        {},
        {"batch_size": 4},
        None,
        str(tmp / "pools.jsonl"),
        str(tmp / "eval.npz"),
        str(tmp / "train.npz"),
        method,
        {"shots": [1, 2, 3]},
        str(tmp / "out.jsonl"),
        backend=fb,
        **kw,
    )
    return fb


def test_evaluation_fails_before_the_lvlm_answers(files):
    # a pool that holds the query's duplicate (a broken pools file): random k=3 of 3 must show it
    fb = FakeBackend()
    with pytest.raises(
        IntegrityError,
        match=r"method random, query 100, k=\d: ICD 20 has the query's image and question",
    ):
        _evaluate(files, [0, 1, 20], fb=fb)
    assert fb.gen_calls == 0 and not (files / "out.jsonl").exists()
    # a pool listing one id twice
    with pytest.raises(
        IntegrityError, match=r"method similarity, query 100, k=\d: ICD 3 appears more than once"
    ):
        _evaluate(files, [3, 4, 3], method="similarity")
    # another question about the query's image: fine by default, refused with exclude_same_image
    _evaluate(files, [0, 1, 21])
    with pytest.raises(
        IntegrityError, match=r"method random, query 100, k=\d: ICD 21 shows the query's image"
    ):
        _evaluate(files, [0, 1, 21], exclude_same_image=True)
    for method in ("rices", "rices_image", "rices_text"):  # RICES excludes them itself
        fb = _evaluate(files, [0, 1, 2], method=method, exclude_same_image=True)
        assert fb.gen_prompts and not any({20, 21} & set(ids) for ids, _ in fb.gen_prompts)


def test_pools_exclude_same_image_on_request():
    for flag in (False, True):
        recs = build_pools(
            [Q],
            TRAIN,
            sampler="random",
            size=len(TRAIN) - 2,
            seed=0,
            role="test",
            exclude_same_image=flag,
        )
        pool = set(recs[0].pool)
        assert 20 not in pool and (21 in pool) is (not flag)
    with pytest.raises(ValueError, match="exceeds the 28 eligible"):
        build_pools(
            [Q], TRAIN, sampler="random", size=29, seed=0, role="test", exclude_same_image=True
        )
    # anchors (train queries): the other questions about an anchor's image leave its pool too
    twin = dataclasses.replace(TRAIN[5], id=99, question="another question ?")
    recs = build_pools(
        [TRAIN[5]],
        TRAIN + [twin],
        sampler="random",
        size=29,
        seed=0,
        role="anchors",
        exclude_same_image=True,
    )
    assert {5, 99}.isdisjoint(recs[0].pool)
