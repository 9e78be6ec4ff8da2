"""Evaluation at shots 1–4 (SPEC §8) with a fake backend: every method picks from the query's own pool."""

from __future__ import annotations

import numpy as np
import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl.evaluate import evaluate_method, random_positions, similarity_positions
from icdrl.metrics import vqa_accuracy
from icdrl.records import EvalRecord, PoolRecord, read_jsonl, read_records, write_records
from icdrl.selector import PointerSelector, select_for_query

TRAIN = make_examples(40)
EVAL = make_examples(6, start=500)
TRAIN_T = random_table([ex.id for ex in TRAIN], seed=3)
EVAL_T = random_table([ex.id for ex in EVAL], seed=4)
SHOTS = [1, 2, 3, 4]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": EVAL})
    rng = np.random.default_rng(0)
    pools = [PoolRecord(ex.id, tuple(int(x) for x in rng.choice(40, 8, replace=False))) for ex in EVAL]
    write_records(tmp_path / "test_pools.jsonl", pools)
    save_table(TRAIN_T, tmp_path / "train.npz")
    save_table(EVAL_T, tmp_path / "eval.npz")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    sel = PointerSelector(d_in=8, hidden_size=16)
    sel.save(tmp_path / "sel.pt")
    return tmp_path, {r.query_id: r.pool for r in pools}


def run(tmp, method, out="e.jsonl", backend=None, **kw):
    return evaluate_method({}, {"batch_size": 4}, None, str(tmp / "test_pools.jsonl"), str(tmp / "eval.npz"),
                           str(tmp / "train.npz"), method, {"shots": SHOTS, "random_seed": 5, "chunk_prompts": 5},
                           str(tmp / out), backend=backend or FakeBackend(), **kw)


def test_similarity_puts_most_similar_last():
    q = np.array([1.0, 0.0])
    pool = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    assert similarity_positions(q, pool, 3) == [2, 3, 1]
    assert similarity_positions(q, pool, 1) == [1]


def test_random_positions_nested_and_seeded():
    a = random_positions(16, 4, 0, 7)
    assert random_positions(16, 2, 0, 7) == a[:2] and len(set(a)) == 4 and all(0 <= p < 16 for p in a)
    assert random_positions(16, 4, 1, 7) != a and random_positions(16, 4, 0, 8) != a


@pytest.mark.parametrize("method", ["zero_shot", "random", "similarity", "v2"])
def test_methods_choose_from_own_pool(setup, method):
    tmp, pool_of = setup
    kw = {"selector_ckpt": str(tmp / "sel.pt"), "seed": 0} if method == "v2" else {}
    fb = FakeBackend()
    summary = run(tmp, method, backend=fb, **kw)
    recs = read_records(tmp / "e.jsonl", EvalRecord)
    by_id = {ex.id: ex for ex in EVAL}
    assert sorted((r.k, r.query_id) for r in recs) == sorted((k, q) for k in SHOTS for q in pool_of)
    # every distinct prompt is answered once: zero-shot once per query, not once per k
    assert len(fb.gen_prompts) == len({(tuple(r.icd_ids), r.query_id) for r in recs})
    if method == "zero_shot":
        assert len(fb.gen_prompts) == len(pool_of) and all(r.icd_ids == () for r in recs)
    sel = PointerSelector.load(tmp / "sel.pt")
    for r in recs:
        assert r.method == method and len(r.icd_ids) == (0 if method == "zero_shot" else r.k) == len(set(r.icd_ids))
        assert [pool_of[r.query_id][p] for p in r.icd_pos] == list(r.icd_ids)
        assert r.acc == vqa_accuracy(r.prediction, by_id[r.query_id].answers)
        assert r.image_id == by_id[r.query_id].image_id  # the report's bootstrap clusters by image
        if method == "similarity":
            assert list(r.icd_pos) == similarity_positions(EVAL_T.vector(r.query_id),
                                                           TRAIN_T.vectors(pool_of[r.query_id]), r.k)
        if method == "v2":
            assert list(r.icd_pos) == select_for_query(sel, EVAL_T.vector(r.query_id),
                                                       TRAIN_T.vectors(pool_of[r.query_id]), r.k)
        if method == "random":
            assert r.seed == 5 and list(r.icd_pos) == random_positions(8, r.k, 5, r.query_id)
    for k in SHOTS:
        assert summary[k] == pytest.approx(np.mean([r.acc for r in recs if r.k == k]))
    head = read_jsonl(tmp / "e.jsonl", "icdrl.eval")[0]
    assert {"method", "cell", "seed", "k", "query_id", "icd_ids", "prediction", "acc"} <= set(head)


class _Says:
    """A backend that answers every prompt with the same text."""

    def __init__(self, text: str):
        self.text = text

    def generate(self, prompts, max_new_tokens=None):
        from icdrl.lvlm.base import Generation

        return [Generation(self.text, self.text) for _ in prompts]


def test_acc_uses_the_configured_metric(setup, monkeypatch):
    import dataclasses

    tmp, _ = setup
    unanimous = [dataclasses.replace(ex, answers=("dog",) * 10, answer="dog") for ex in EVAL]
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": unanimous})
    cfg = {"shots": [1], "random_seed": 5}
    accs = {}
    for metric in ("official", "normalised"):
        evaluate_method({}, {"batch_size": 4}, None, str(tmp / "test_pools.jsonl"), str(tmp / "eval.npz"),
                        str(tmp / "train.npz"), "random", {**cfg, "metric": metric}, str(tmp / f"{metric}.jsonl"),
                        backend=_Says("a dog"))
        accs[metric] = {r.acc for r in read_records(tmp / f"{metric}.jsonl", EvalRecord)}
    assert accs == {"official": {0.0}, "normalised": {1.0}}  # "a dog" vs ten "dog" (SPEC §5)
    with pytest.raises(ValueError, match="scoring.metric"):
        evaluate_method({}, {"batch_size": 4}, None, str(tmp / "test_pools.jsonl"), str(tmp / "eval.npz"),
                        str(tmp / "train.npz"), "random", {**cfg, "metric": "exact"}, str(tmp / "x.jsonl"),
                        backend=_Says("a dog"))


def test_v3_records_carry_cell_knobs(setup):
    tmp, _ = setup
    cell = {"slug": "hard_plus_soft-hw2-sw1-rank", "mode": "hard_plus_soft", "use_rank": True, "hard_weight": 2.0,
            "soft_weight": 1.0, "alpha": None, "beta": None, "info_scale": None}
    run(tmp, "v3", selector_ckpt=str(tmp / "sel.pt"), seed=3, cell=cell)
    recs = read_records(tmp / "e.jsonl", EvalRecord)
    assert {(r.cell, r.seed, r.mode, r.use_rank, r.hard_weight, r.soft_weight, r.alpha, r.beta, r.info_scale)
            for r in recs} == {("hard_plus_soft-hw2-sw1-rank", 3, "hard_plus_soft", True, 2.0, 1.0, None, None, None)}
    # the report reads these records as they are
    from icdrl.report.inputs import load_eval

    data = load_eval([str(tmp / "e.jsonl")])
    assert data.shots == SHOTS and data.v3()[0].hard_weight == 2.0
    with pytest.raises(ValueError, match="grid cell"):
        run(tmp, "v3", selector_ckpt=str(tmp / "sel.pt"))
    with pytest.raises(FileNotFoundError, match="selector checkpoint"):
        run(tmp, "v2", selector_ckpt=str(tmp / "missing.pt"))


def test_killed_evaluation_resumes(setup):
    tmp, _ = setup
    run(tmp, "random", out="ref.jsonl")
    ref = read_records(tmp / "ref.jsonl", EvalRecord)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp, "random", out="e.jsonl", backend=FakeBackend(fail_after=2))
    fb = FakeBackend()
    run(tmp, "random", out="e.jsonl", backend=fb)
    assert len(fb.gen_prompts) == len(ref) - 2 * 5  # two chunks of 5 answers were kept
    # zero-shot killed after its first chunk: answers of finished records are reused, not regenerated
    run(tmp, "zero_shot", out="z_ref.jsonl")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp, "zero_shot", out="z.jsonl", backend=FakeBackend(fail_after=1))
    fb = FakeBackend()
    run(tmp, "zero_shot", out="z.jsonl", backend=fb)
    assert len(fb.gen_prompts) == len(EVAL) - 5
    assert read_records(tmp / "z.jsonl", EvalRecord) == read_records(tmp / "z_ref.jsonl", EvalRecord)
    assert read_records(tmp / "e.jsonl", EvalRecord) == ref
