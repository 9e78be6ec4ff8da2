"""Ablations (docs/science.md §8): shuffled demonstration order and demonstrations without images, on the
same ICDs as the ablated method's records."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from stage_fakes import FakeBackend, make_examples, patch_dataset, random_table, save_table

from icdrl.ablations import evaluate_ablation, plan_ablation, shuffled_order, strip_image
from icdrl.evaluate import evaluate_method
from icdrl.metrics import vqa_accuracy
from icdrl.records import EvalRecord, PoolRecord, read_records, write_records

TRAIN = make_examples(40)
EVAL = make_examples(6, start=500)
SHOTS = [1, 2, 3, 4]


def test_shuffled_order_always_changes_the_order_uniformly():
    ids = (7, 3, 9)
    assert shuffled_order(ids, 0, 5) == shuffled_order(ids, 0, 5)  # seeded
    draws = Counter(shuffled_order(ids, s, 5) for s in range(3000))
    assert ids not in draws and set(draws) == set(itertools.permutations(ids)) - {ids}
    assert max(draws.values()) / min(draws.values()) < 1.25  # the five others about equally often
    assert shuffled_order((1, 2), 0, 0) == (2, 1)
    with pytest.raises(ValueError, match="no order"):
        shuffled_order((4,), 0, 9)
    with pytest.raises(ValueError, match="not distinct"):
        shuffled_order((4, 4), 0, 9)


def test_strip_image_keeps_the_text():
    ex = TRAIN[3]
    bare = strip_image(ex)
    assert bare.image == "" and (bare.id, bare.question, bare.answer) == (
        ex.id,
        ex.question,
        ex.answer,
    )


@pytest.fixture
def base(tmp_path, monkeypatch):
    patch_dataset(monkeypatch, {"train": TRAIN, "eval": EVAL})
    rng = np.random.default_rng(0)
    write_records(
        tmp_path / "pools.jsonl",
        [PoolRecord(ex.id, tuple(int(x) for x in rng.choice(40, 8, replace=False))) for ex in EVAL],
    )
    save_table(random_table([ex.id for ex in TRAIN], seed=3), tmp_path / "train.npz")
    save_table(random_table([ex.id for ex in EVAL], seed=4), tmp_path / "eval.npz")
    evaluate_method(
        {},
        {"batch_size": 4},
        None,
        str(tmp_path / "pools.jsonl"),
        str(tmp_path / "eval.npz"),
        str(tmp_path / "train.npz"),
        "similarity",
        {"shots": SHOTS},
        str(tmp_path / "sim.jsonl"),
        backend=FakeBackend(),
    )
    return tmp_path


def _ablate(tmp, ablation, fb, **kw):
    return evaluate_ablation(
        {},
        {"batch_size": 4},
        None,
        str(tmp / "sim.jsonl"),
        ablation,
        {"shots": SHOTS, "random_seed": 3, "chunk_prompts": 5},
        str(tmp / f"{ablation}.jsonl"),
        backend=fb,
        **kw,
    )


def test_shuffled_ablation_reorders_the_same_icds(base):
    fb = FakeBackend()
    summary = _ablate(base, "shuffled", fb)
    ref = {(r.query_id, r.k): r for r in read_records(base / "sim.jsonl", EvalRecord)}
    recs = read_records(base / "shuffled.jsonl", EvalRecord)
    assert sorted((r.query_id, r.k) for r in recs) == sorted(
        key for key in ref if key[1] >= 2
    )  # k=1: no order
    by_id = {ex.id: ex for ex in EVAL}
    for r in recs:
        b = ref[(r.query_id, r.k)]
        assert r.method == "shuffled" and r.seed == b.seed and r.cell == b.cell
        assert r.icd_ids == shuffled_order(b.icd_ids, 3, r.query_id) != b.icd_ids
        assert sorted(zip(r.icd_ids, r.icd_pos)) == sorted(
            zip(b.icd_ids, b.icd_pos)
        )  # positions follow their ids
        assert r.spec == {
            "ablation": "shuffled",
            "of": {"method": "similarity", "cell": None, "spec": None},
            "shuffle_seed": 3,
        }
        assert r.acc == vqa_accuracy(r.prediction, by_id[r.query_id].answers)
    assert sorted(fb.gen_prompts) == sorted((list(r.icd_ids), r.query_id) for r in recs)
    assert set(summary) == {2, 3, 4}


def test_no_images_ablation_shows_the_text_only(base):
    class Recording(FakeBackend):
        def generate(self, prompts, max_new_tokens=None):
            self.images = getattr(self, "images", []) + [
                [d.image for d in demos] + [q.image] for demos, q in prompts
            ]
            return super().generate(prompts, max_new_tokens)

    fb = Recording()
    _ablate(base, "no_images", fb)
    ref = read_records(base / "sim.jsonl", EvalRecord)
    recs = read_records(base / "no_images.jsonl", EvalRecord)
    assert [(r.query_id, r.k, r.icd_ids, r.icd_pos) for r in recs] == [
        (r.query_id, r.k, r.icd_ids, r.icd_pos) for r in ref
    ]
    assert all(r.method == "no_images" and r.spec["ablation"] == "no_images" for r in recs)
    assert len(fb.images) == len(ref)
    assert all(imgs[:-1] == [""] * (len(imgs) - 1) and imgs[-1] for imgs in fb.images)


def test_ablation_of_per_shot_keeps_each_records_cell(tmp_path):
    from icdrl.grid import Cell, reward_spec

    cells = [Cell(reward_spec("legacy"), True), Cell(reward_spec("hybrid"), False)]
    recs = [
        EvalRecord(
            "per_shot",
            cells[k % 2].slug,
            0,
            k,
            q,
            tuple(range(10, 10 + k)),
            tuple(range(k)),
            "a",
            "a",
            1.0,
            {"chosen": cells[k % 2].as_dict(), "val_acc": 0.5, "n_val": 3},
        )
        for k in (1, 2)
        for q in (1, 2)
    ]
    jobs = plan_ablation("no_images", recs, 0)
    assert [(j.cell, j.seed, j.spec["of"]["cell"]) for j in jobs] == [
        (r.cell, 0, r.cell) for r in recs
    ]
    assert all(
        j.spec["of"]["method"] == "per_shot" and j.spec["of"]["spec"] == r.spec
        for j, r in zip(jobs, recs)
    )
    with pytest.raises(ValueError, match="one of"):
        plan_ablation(
            "no_images", [EvalRecord("zero_shot", None, None, 1, 1, (), (), "a", "a", 1.0)], 0
        )
    with pytest.raises(ValueError, match="ablation must be"):
        plan_ablation("reversed", recs, 0)
    # ablation records are valid eval records
    out = [
        EvalRecord(
            "no_images",
            j.cell,
            j.seed,
            j.k,
            j.query_id,
            j.icd_ids,
            j.icd_pos,
            "a",
            "a",
            1.0,
            j.spec,
        )
        for j in jobs
    ]
    write_records(tmp_path / "x.jsonl", out)
    assert read_records(tmp_path / "x.jsonl", EvalRecord) == out
    bad = EvalRecord(
        "no_images", None, 0, 1, 1, (10,), (0,), "a", "a", 1.0, {"ablation": "no_images"}
    )
    write_records(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(ValueError, match="must name the method it ablates"):
        read_records(tmp_path / "bad.jsonl", EvalRecord)


def test_killed_ablation_resumes(base):
    _ablate(base, "no_images", FakeBackend())
    want = read_records(base / "no_images.jsonl", EvalRecord)
    (base / "no_images.jsonl").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        _ablate(base, "no_images", FakeBackend(fail_after=2))
    fb = FakeBackend()
    _ablate(base, "no_images", fb)
    # chunks of whole queries, at least chunk_prompts = 5: two queries x 4 shots each
    assert len(fb.gen_prompts) == len(want) - 2 * 2 * len(SHOTS)
    assert read_records(base / "no_images.jsonl", EvalRecord) == want
