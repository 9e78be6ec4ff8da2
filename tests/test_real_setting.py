"""The real-setting path: Qwen2.5-VL architecture (tiny, random) on VQA-format data, stages 1–5.

Uses the official-VQA-format fixture (tests/fixtures/vqa: 6 train, 3 val questions with 10
answers each) through ``icdrl.data.load_dataset`` and the real ``HFBackend`` through
``icdrl.lvlm.load_backend``. Numbers from a random model mean nothing; the test checks that
every stage runs end to end, writes valid records, and that the batched, image-cached backend
finds the same beams as the naive one-prompt-per-forward path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from icdrl.beam import BeamConfig, anchor_candidates, generate_shard
from icdrl.data import load_dataset
from icdrl.embeddings import EmbeddingTable, embed_split
from icdrl.evaluate import evaluate_method
from icdrl.pools import write_pools
from icdrl.records import (
    CandidateRecord,
    EvalRecord,
    PoolRecord,
    ScoredRecord,
    concat_jsonl,
    read_records,
)
from icdrl.scoring import score_shard

FIX = Path(__file__).parent / "fixtures" / "vqa"
DATASET = {
    "name": "vqa",
    "label": "fixture",
    "train": {
        "questions": str(FIX / "train_questions.json"),
        "annotations": str(FIX / "train_annotations.json"),
        "images": str(FIX / "images" / "train2014"),
    },
    "eval": {
        "questions": str(FIX / "val_questions.json"),
        "annotations": str(FIX / "val_annotations.json"),
        "images": str(FIX / "images" / "val2014"),
    },
}
MODEL = {
    "name": "tiny-qwen",
    "kind": "hf",
    "device": "cpu",
    "dtype": "float32",
    "batch_size": 8,
    "max_new_tokens": 4,
}
CAND = {
    "beam_width": 3,
    "depth": 2,
    "insert": "first",
    "n_random": 2,
    "n_similar": 2,
    "seed": 0,
    "shards": 2,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from icdrl.lvlm.tiny import save_tiny_qwen

    words = set()
    for split in ("train", "eval"):
        for ex in load_dataset(DATASET, split):
            for text in (ex.question, *ex.answers):
                words |= set(re.findall(r"\w+", text)) | set(re.findall(r"\w+", text.lower()))
    return str(save_tiny_qwen(tmp_path_factory.mktemp("qwen"), sorted(words), seed=0))


def test_stages_1_to_5_on_vqa_format_with_tiny_qwen(model_dir, tmp_path):
    from icdrl.selector import PointerSelector

    emb = {"encoder": "lvlm", "batch_size": 4}
    for split in ("train", "eval"):
        embed_split(DATASET, split, emb, MODEL, model_dir, str(tmp_path / f"{split}.npz"))
    train_t = EmbeddingTable.load(tmp_path / "train.npz")
    assert sorted(train_t.ids) == [90, 91, 250, 300, 420, 421]

    pools_cfg = {"sampler": "mix", "size": 4, "n_anchors": 4, "n_test": 3, "seed": 0}
    write_pools(
        DATASET,
        "anchors",
        pools_cfg,
        str(tmp_path / "train.npz"),
        str(tmp_path / "train.npz"),
        str(tmp_path / "anchors.jsonl"),
    )
    write_pools(
        DATASET,
        "test",
        pools_cfg,
        str(tmp_path / "eval.npz"),
        str(tmp_path / "train.npz"),
        str(tmp_path / "test.jsonl"),
    )
    anchors = read_records(tmp_path / "anchors.jsonl", PoolRecord)
    assert len(anchors) == 4 and all(r.query_id not in r.pool for r in anchors)

    shards = [tmp_path / f"cand{s}.jsonl" for s in range(2)]
    for s, path in enumerate(shards):
        generate_shard(
            DATASET,
            MODEL,
            model_dir,
            str(tmp_path / "anchors.jsonl"),
            str(tmp_path / "train.npz"),
            CAND,
            s,
            2,
            str(path),
        )
    concat_jsonl([str(p) for p in shards], "icdrl.candidates", str(tmp_path / "cand.jsonl"))
    cands = read_records(tmp_path / "cand.jsonl", CandidateRecord)
    assert sorted(r.anchor_id for r in cands) == sorted(r.query_id for r in anchors)
    for r in cands:
        beams = [c for c in r.candidates if c.source == "beam"]
        assert len(beams) == 3 and [c.info_score for c in beams] == sorted(
            (c.info_score for c in beams), reverse=True
        )
        assert {c.source for c in r.candidates} == {"beam", "random", "similar"}
        assert 0 < r.zero_shot_prob <= 1 and np.isfinite([c.info_score for c in r.candidates]).all()

    score_shard(
        DATASET,
        MODEL,
        model_dir,
        str(tmp_path / "cand.jsonl"),
        {"correct_threshold": 1.0},
        str(tmp_path / "scored.jsonl"),
    )
    scored = read_records(tmp_path / "scored.jsonl", ScoredRecord)
    assert [r.anchor_id for r in scored] == [r.anchor_id for r in cands]
    for r in scored:
        for c in r.candidates:
            assert (
                0.0 <= c.vqa_acc_score <= 1.0
                and c.vqa_correct in (0, 1)
                and c.prediction == c.prediction.lower()
            )

    import torch

    torch.manual_seed(0)
    PointerSelector(d_in=train_t.emb.shape[1], hidden_size=16).save(tmp_path / "v2.pt")
    ev = {"shots": [1, 2, 3, 4], "random_seed": 0}
    for method in ("zero_shot", "random", "similarity", "v2"):
        kw = {"selector_ckpt": str(tmp_path / "v2.pt"), "seed": 0} if method == "v2" else {}
        summary = evaluate_method(
            DATASET,
            MODEL,
            model_dir,
            str(tmp_path / "test.jsonl"),
            str(tmp_path / "eval.npz"),
            str(tmp_path / "train.npz"),
            method,
            ev,
            str(tmp_path / f"eval_{method}.jsonl"),
            **kw,
        )
        recs = read_records(tmp_path / f"eval_{method}.jsonl", EvalRecord)
        assert len(recs) == 12 and set(summary) == {1, 2, 3, 4}
        assert all(0.0 <= v <= 1.0 for v in summary.values())
    first = json.loads((tmp_path / "eval_v2.jsonl").read_text().splitlines()[1])
    assert first["method"] == "v2" and first["seed"] == 0 and len(first["icd_ids"]) == first["k"]


def test_batched_cached_beams_equal_naive_path(model_dir):
    """The project's path (batches + image cache) and the reference implementation's (one prompt per forward, images
    re-processed every time) give the same candidates for every anchor."""
    from icdrl.lvlm import load_backend

    train = {ex.id: ex for ex in load_dataset(DATASET, "train")}
    fast = load_backend({**MODEL, "batch_size": 16}, model_dir)
    naive = load_backend({**MODEL, "batch_size": 1, "image_cache": "none"}, model_dir)
    cfg = BeamConfig(beam_width=3, depth=2, n_random=2, n_similar=0)
    ids = sorted(train)
    for anchor in ids[:3]:
        pool_ids = [i for i in ids if i != anchor]
        pool = [train[i] for i in pool_ids]
        a, n_a = anchor_candidates(fast, train[anchor], pool, pool_ids, cfg)
        b, n_b = anchor_candidates(naive, train[anchor], pool, pool_ids, cfg)
        assert n_a == n_b and [c.icd_pos for c in a.candidates] == [c.icd_pos for c in b.candidates]
        np.testing.assert_allclose(
            [c.info_score for c in a.candidates], [c.info_score for c in b.candidates], atol=1e-5
        )
    assert naive.stats["forward_batches"] > 4 * fast.stats["forward_batches"]
    # each distinct image is preprocessed once by the cached path, never by the naive one
    assert fast.stats["image_preprocess"] == len({ex.image for ex in train.values()}) == 4
    assert naive.stats["image_preprocess"] == 0
