"""Evaluation at shots 1–4 (docs/science.md §8) with a fake backend: every method picks from the query's own pool."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl.evaluate import chunks_by_query, evaluate_method, random_positions, similarity_positions
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
    pools = [
        PoolRecord(ex.id, tuple(int(x) for x in rng.choice(40, 8, replace=False))) for ex in EVAL
    ]
    write_records(tmp_path / "test_pools.jsonl", pools)
    save_table(TRAIN_T, tmp_path / "train.npz")
    save_table(EVAL_T, tmp_path / "eval.npz")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    sel = PointerSelector(d_in=8, hidden_size=16)
    sel.save(tmp_path / "sel.pt")
    return tmp_path, {r.query_id: r.pool for r in pools}


def run(tmp, method, out="e.jsonl", backend=None, **kw):
    return evaluate_method(
        {},
        {"batch_size": 4},
        None,
        str(tmp / "test_pools.jsonl"),
        str(tmp / "eval.npz"),
        str(tmp / "train.npz"),
        method,
        {"shots": SHOTS, "random_seed": 5, "chunk_prompts": 5},
        str(tmp / out),
        backend=backend or FakeBackend(),
        **kw,
    )


def test_similarity_puts_most_similar_last():
    q = np.array([1.0, 0.0])
    pool = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    assert similarity_positions(q, pool, 3) == [2, 3, 1]
    assert similarity_positions(q, pool, 1) == [1]


def test_random_positions_nested_and_seeded():
    a = random_positions(16, 4, 0, 7)
    assert (
        random_positions(16, 2, 0, 7) == a[:2] and len(set(a)) == 4 and all(0 <= p < 16 for p in a)
    )
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
        assert r.method == method and len(r.icd_ids) == (
            0 if method == "zero_shot" else r.k
        ) == len(set(r.icd_ids))
        assert [pool_of[r.query_id][p] for p in r.icd_pos] == list(r.icd_ids)
        assert r.acc == vqa_accuracy(r.prediction, by_id[r.query_id].answers)
        assert r.image_id == by_id[r.query_id].image_id  # the report's bootstrap clusters by image
        if method == "similarity":
            assert list(r.icd_pos) == similarity_positions(
                EVAL_T.vector(r.query_id), TRAIN_T.vectors(pool_of[r.query_id]), r.k
            )
        if method == "v2":
            assert list(r.icd_pos) == select_for_query(
                sel, EVAL_T.vector(r.query_id), TRAIN_T.vectors(pool_of[r.query_id]), r.k
            )
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
        evaluate_method(
            {},
            {"batch_size": 4},
            None,
            str(tmp / "test_pools.jsonl"),
            str(tmp / "eval.npz"),
            str(tmp / "train.npz"),
            "random",
            {**cfg, "metric": metric},
            str(tmp / f"{metric}.jsonl"),
            backend=_Says("a dog"),
        )
        accs[metric] = {r.acc for r in read_records(tmp / f"{metric}.jsonl", EvalRecord)}
    assert accs == {
        "official": {0.0},
        "normalised": {1.0},
    }  # "a dog" vs ten "dog" (docs/science.md §5)
    with pytest.raises(ValueError, match="scoring.metric"):
        evaluate_method(
            {},
            {"batch_size": 4},
            None,
            str(tmp / "test_pools.jsonl"),
            str(tmp / "eval.npz"),
            str(tmp / "train.npz"),
            "random",
            {**cfg, "metric": "exact"},
            str(tmp / "x.jsonl"),
            backend=_Says("a dog"),
        )


def test_v3_records_carry_the_cell(setup):
    from icdrl.grid import Cell, reward_spec

    tmp, _ = setup
    cell = Cell(reward_spec("hard_plus_soft", hard_weight=2.0), True, (("kl_beta", 0),))
    run(tmp, "v3", selector_ckpt=str(tmp / "sel.pt"), seed=3, cell=cell.as_dict())
    recs = read_records(tmp / "e.jsonl", EvalRecord)
    assert {(r.cell, r.seed) for r in recs} == {(cell.slug, 3)}
    assert all(Cell.from_dict(r.spec) == cell for r in recs)
    # the report reads these records as they are
    from icdrl.report.inputs import load_eval

    data = load_eval([str(tmp / "e.jsonl")])
    assert data.shots == SHOTS and data.v3()[0].cell == cell
    with pytest.raises(ValueError, match="grid cell"):
        run(tmp, "v3", selector_ckpt=str(tmp / "sel.pt"))
    with pytest.raises(FileNotFoundError, match="selector checkpoint"):
        run(tmp, "v2", selector_ckpt=str(tmp / "missing.pt"))


def test_selection_order_selector_places_its_picks_by_the_insert_rule(setup):
    tmp, pool_of = setup
    sel = PointerSelector.load(tmp / "sel.pt")
    for order, insert in (("selection", "first"), ("selection", "last"), ("prompt", "first")):
        sel.save(tmp / "o.pt", {"label_order": order, "insert": insert})
        run(tmp, "v2", out=f"{order}-{insert}.jsonl", selector_ckpt=str(tmp / "o.pt"), seed=0)
        for r in read_records(tmp / f"{order}-{insert}.jsonl", EvalRecord):
            picks = select_for_query(
                sel, EVAL_T.vector(r.query_id), TRAIN_T.vectors(pool_of[r.query_id]), r.k
            )
            want = picks[::-1] if (order, insert) == ("selection", "first") else picks
            assert list(r.icd_pos) == want


def _v3_file(path, cell_slug, accs_by_k, seed=0):
    """An eval file of one v3 cell: accs_by_k[k] = per-query accuracies (query ids 0..n-1)."""
    from icdrl.grid import Cell, parse_reward_slug

    slug, adv = cell_slug.rsplit("-", 1)
    cell = Cell(parse_reward_slug(slug), adv == "rank")
    recs = [
        EvalRecord(
            method="v3",
            cell=cell.slug,
            seed=seed,
            k=k,
            query_id=q,
            icd_ids=(100 + q,),
            icd_pos=(0,),
            prediction_raw="a",
            prediction="a",
            acc=float(a),
            spec=cell.as_dict(),
        )
        for k, accs in accs_by_k.items()
        for q, a in enumerate(accs)
    ]
    write_records(path, recs)
    return cell


def test_per_shot_is_chosen_on_validation_queries_only(tmp_path):
    from icdrl.evaluate import choose_per_shot, select_per_shot

    # cell A is best on the validation queries at k=1, cell B at k=2; on the TEST queries it is the
    # other way round, so a choice made on the test queries would pick the other cell
    a = _v3_file(tmp_path / "a_val.jsonl", "legacy-a1-b0-zscore", {1: [1, 1, 0], 2: [0, 0, 1]})
    b = _v3_file(
        tmp_path / "b_val.jsonl", "hard_plus_soft-hw1-sw1-zscore", {1: [0, 1, 0], 2: [1, 1, 0]}
    )
    _v3_file(tmp_path / "a_test.jsonl", a.slug, {1: [0, 0, 0, 0], 2: [1, 1, 1, 1]})
    _v3_file(tmp_path / "b_test.jsonl", b.slug, {1: [1, 1, 1, 1], 2: [0, 0, 0, 0]})
    choice = select_per_shot(
        [tmp_path / "a_val.jsonl", tmp_path / "b_val.jsonl"],
        [tmp_path / "a_test.jsonl", tmp_path / "b_test.jsonl"],
        tmp_path / "ps.jsonl",
    )
    assert {k: c for k, (c, _) in choice.items()} == {1: a.slug, 2: b.slug}
    recs = read_records(tmp_path / "ps.jsonl", EvalRecord)
    assert {(r.method, r.k, r.cell) for r in recs} == {
        ("per_shot", 1, a.slug),
        ("per_shot", 2, b.slug),
    }
    # the planted test accuracies show the choice ignored them: the chosen cell is the worse one on test
    assert [r.acc for r in recs] == [0.0] * 8
    assert all(r.spec["n_val"] == 3 for r in recs)
    assert (
        recs[0].spec["val_acc"] == pytest.approx(2 / 3) and recs[0].spec["chosen"]["slug"] == a.slug
    )
    # ties go to the first cell by slug, whatever the file order
    tie = {"b": {1: {0: 1.0}}, "a": {1: {0: 1.0}}}
    assert choose_per_shot(tie) == {1: ("a", 1.0)}
    with pytest.raises(ValueError, match="same validation queries"):
        choose_per_shot({"a": {1: {0: 1.0}}, "b": {1: {1: 1.0}}})
    # the report lists the choice
    from icdrl.report.inputs import load_eval

    data = load_eval([str(tmp_path / "ps.jsonl")])
    assert data.per_shot == {
        (0, 1): (a.slug, pytest.approx(2 / 3), 3),
        (0, 2): (b.slug, pytest.approx(2 / 3), 3),
    }


def test_killed_evaluation_resumes(setup):
    tmp, _ = setup
    run(tmp, "random", out="ref.jsonl")
    ref = read_records(tmp / "ref.jsonl", EvalRecord)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp, "random", out="e.jsonl", backend=FakeBackend(fail_after=2))
    fb = FakeBackend()
    run(tmp, "random", out="e.jsonl", backend=fb)
    # two chunks were kept, each of whole queries (at least chunk_prompts = 5 answers: 2 queries x 4 shots)
    assert len(fb.gen_prompts) == len(ref) - 2 * 2 * len(SHOTS)
    # zero-shot killed after its first chunk: answers of finished records are reused, not regenerated
    run(tmp, "zero_shot", out="z_ref.jsonl")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp, "zero_shot", out="z.jsonl", backend=FakeBackend(fail_after=1))
    fb = FakeBackend()
    run(tmp, "zero_shot", out="z.jsonl", backend=fb)
    assert len(fb.gen_prompts) == len(EVAL) - 2  # the first chunk held 2 whole queries
    assert read_records(tmp / "z.jsonl", EvalRecord) == read_records(
        tmp / "z_ref.jsonl", EvalRecord
    )
    assert read_records(tmp / "e.jsonl", EvalRecord) == ref


def test_chunks_keep_every_shot_of_a_query_together():
    """Jobs come k by k; chunks hold whole queries (first-seen order), at least min_prompts jobs."""
    from icdrl.evaluate import Job

    jobs = [Job(q, k, (k,), (q + k,)) for k in SHOTS for q in (7, 3, 9, 1, 5)]
    chunks = chunks_by_query(jobs, 6)
    assert [[j.query_id for j in c] for c in chunks] == [
        [7] * 4 + [3] * 4,
        [9] * 4 + [1] * 4,
        [5] * 4,
    ]
    assert all(
        [j.k for j in c if j.query_id == q] == SHOTS
        for c in chunks
        for q in {j.query_id for j in c}
    )
    assert sorted((j.query_id, j.k) for c in chunks for j in c) == sorted(
        (j.query_id, j.k) for j in jobs
    )
    assert chunks_by_query(jobs, 1) == [
        [j for j in jobs if j.query_id == q] for q in (7, 3, 9, 1, 5)
    ]
    assert chunks_by_query([], 4) == []


def test_generate_calls_hold_a_querys_shots_and_records_keep_their_order(setup):
    """Each generate call gets every shot of its queries; the file lists records k by k, then query."""
    tmp, _ = setup
    fb = FakeBackend()
    calls = []
    gen = fb.generate
    fb.generate = lambda prompts, max_new_tokens=None: (
        calls.append([q.id for _, q in prompts]) or gen(prompts, max_new_tokens)
    )
    run(tmp, "random", backend=fb)
    assert all(
        set(Counter(c).values()) == {len(SHOTS)} for c in calls
    )  # every query with all its shots
    assert [len(c) for c in calls] == [8, 8, 8]
    recs = read_records(tmp / "e.jsonl", EvalRecord)
    assert [(r.k, r.query_id) for r in recs] == [(k, ex.id) for k in SHOTS for ex in EVAL]
