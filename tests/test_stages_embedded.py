"""Every pipeline stage (embeddings → pools → candidates → scoring → evaluation) on a small
embedded configuration: easy-VQA subsets and an untrained model of the embedded LVLM's
architecture at its test size (``icdrl.lvlm.embedded.TEST_PRESET``), served by ``load_backend``."""

from __future__ import annotations

import numpy as np
import pytest

from icdrl.beam import generate_shard
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

DATASET = {
    "name": "easyvqa",
    "train": {"subset": 60, "subset_seed": 0},
    "eval": {"subset": 8, "subset_seed": 0},
}
MODEL = {"name": "embedded", "kind": "embedded", "batch_size": 16, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    from icdrl.data import load_dataset
    from icdrl.lvlm import embedded

    cfg = embedded.EmbeddedConfig.from_dict(embedded.TEST_PRESET)
    words = embedded.vocabulary(load_dataset(DATASET, "train") + load_dataset(DATASET, "eval"))
    proc = embedded.build_processor(cfg, words)
    torch.manual_seed(0)
    model = embedded.build_model(cfg, proc.tokenizer)
    out = tmp_path_factory.mktemp("embedded")
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return str(out)


def test_all_stages_on_small_embedded_config(model_dir, tmp_path):
    for split in ("train", "eval"):
        embed_split(
            DATASET,
            split,
            {"encoder": "lvlm", "batch_size": 32},
            MODEL,
            model_dir,
            str(tmp_path / f"{split}.npz"),
        )
    assert len(EmbeddingTable.load(tmp_path / "train.npz")) == 60

    pools_cfg = {"sampler": "image_sim", "size": 8, "n_anchors": 6, "n_test": 5, "seed": 0}
    tr = str(tmp_path / "train.npz")
    write_pools(DATASET, "anchors", pools_cfg, tr, tr, str(tmp_path / "anchors.jsonl"))
    write_pools(
        DATASET, "test", pools_cfg, str(tmp_path / "eval.npz"), tr, str(tmp_path / "test.jsonl")
    )
    for r in read_records(tmp_path / "anchors.jsonl", PoolRecord):
        assert r.query_id not in r.pool and len(set(r.pool)) == 8

    cand = {
        "beam_width": 2,
        "depth": 2,
        "insert": "first",
        "n_random": 2,
        "n_similar": 2,
        "seed": 0,
        "shards": 2,
    }
    shards = [str(tmp_path / f"c{s}.jsonl") for s in range(2)]
    from icdrl.lvlm import load_backend

    backend = load_backend(MODEL, model_dir)
    for s in range(2):
        generate_shard(
            DATASET,
            MODEL,
            model_dir,
            str(tmp_path / "anchors.jsonl"),
            tr,
            cand,
            s,
            2,
            shards[s],
            backend=backend,
        )
    assert backend.prefix_max_demos == 1  # depth 2: only 1-demonstration prefixes are read again
    assert {pk.n_images for pk in backend._prefix_kv.values()} == {
        0,
        1,
    }  # the chat header, 1 demonstration
    concat_jsonl(shards, "icdrl.candidates", str(tmp_path / "cand.jsonl"))
    recs = read_records(tmp_path / "cand.jsonl", CandidateRecord)
    assert len(recs) == 6
    for r in recs:
        assert [c.source for c in r.candidates] == ["beam"] * 2 + ["random"] * 2 + ["similar"] * 2
        beams = [c.info_score for c in r.candidates[:2]]
        assert beams == sorted(beams, reverse=True)

    score_shard(
        DATASET,
        MODEL,
        model_dir,
        str(tmp_path / "cand.jsonl"),
        {"correct_threshold": 1.0},
        str(tmp_path / "scored.jsonl"),
    )
    scored = read_records(tmp_path / "scored.jsonl", ScoredRecord)
    assert [len(r.candidates) for r in scored] == [len(r.candidates) for r in recs]

    ev = {"shots": [1, 2, 3, 4], "random_seed": 0}
    for method in ("zero_shot", "random", "similarity"):
        summary = evaluate_method(
            DATASET,
            MODEL,
            model_dir,
            str(tmp_path / "test.jsonl"),
            str(tmp_path / "eval.npz"),
            tr,
            method,
            ev,
            str(tmp_path / f"{method}.jsonl"),
        )
        out = read_records(tmp_path / f"{method}.jsonl", EvalRecord)
        assert len(out) == 20 and set(summary) == {1, 2, 3, 4}
        assert np.isclose(summary[2], np.mean([r.acc for r in out if r.k == 2]))
