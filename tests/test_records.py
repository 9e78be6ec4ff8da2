"""Record dataclasses, schema versions, shard concatenation and the resume companion file."""

from __future__ import annotations

import json

import pytest

from icdrl.records import (
    Candidate,
    CandidateRecord,
    EvalRecord,
    PartialJsonl,
    PoolRecord,
    SchemaError,
    ScoredCandidate,
    ScoredRecord,
    concat_jsonl,
    fingerprint,
    read_jsonl,
    read_records,
    write_jsonl,
    write_records,
)


def cand(source="beam", pos=(1, 0), pool=(10, 11, 12)):
    return Candidate(source=source, icd_ids=tuple(pool[p] for p in pos), icd_pos=pos, info_score=0.25,
                     step_gains=(0.1, 0.15))


def test_candidate_and_scored_round_trip(tmp_path):
    rec = CandidateRecord(anchor_id=5, pool=(10, 11, 12), zero_shot_logprob=-0.5, zero_shot_prob=0.6,
                          candidates=(cand(), cand("random", (2, 1))))
    write_records(tmp_path / "c.jsonl", [rec])
    assert read_records(tmp_path / "c.jsonl", CandidateRecord) == [rec]
    sc = ScoredCandidate.from_candidate(rec.candidates[0], prediction_raw=" Red\n", prediction="red",
                                        vqa_acc_score=1.0, vqa_correct=1)
    srec = ScoredRecord(anchor_id=5, pool=rec.pool, zero_shot_logprob=-0.5, zero_shot_prob=0.6, candidates=(sc,))
    write_records(tmp_path / "s.jsonl", [srec])
    assert read_records(tmp_path / "s.jsonl", ScoredRecord) == [srec]
    d = read_jsonl(tmp_path / "s.jsonl", "icdrl.scored")[0]["candidates"][0]
    assert set(d) == {"source", "icd_ids", "icd_pos", "info_score", "step_gains", "prediction_raw", "prediction",
                      "vqa_acc_score", "vqa_correct"}
    # a candidates file is not a scored file
    with pytest.raises(SchemaError, match="expected 'icdrl.scored'"):
        read_records(tmp_path / "c.jsonl", ScoredRecord)


def test_validation_names_file_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = CandidateRecord(anchor_id=1, pool=(10, 11, 12), zero_shot_logprob=-1.0, zero_shot_prob=0.37,
                           candidates=(cand(),)).to_dict()
    bad = json.loads(json.dumps(good))
    bad["candidates"][0]["icd_pos"] = [2, 0]  # positions no longer match the ids
    write_jsonl(p, "icdrl.candidates", [bad])
    with pytest.raises(SchemaError, match=r"bad.jsonl:2 \(anchor 1\).*icd_pos 2 does not hold icd_id 11"):
        read_records(p, CandidateRecord)
    del good["zero_shot_prob"]
    write_jsonl(p, "icdrl.candidates", [good])
    with pytest.raises(SchemaError, match="'zero_shot_prob' is missing"):
        read_records(p, CandidateRecord)
    with pytest.raises(SchemaError, match="source"):
        cand(source="greedy")


def test_unknown_version_is_rejected(tmp_path):
    p = tmp_path / "v1.jsonl"
    p.write_text(json.dumps({"schema": "icdrl.eval", "version": 1}) + "\n{}\n")
    with pytest.raises(SchemaError, match="v1.jsonl: icdrl.eval version 1 is not supported"):
        read_records(p, EvalRecord)


def test_eval_record_fields(tmp_path):
    from icdrl.grid import Cell, reward_spec

    cell = Cell(reward_spec("hard_plus_soft", hard_weight=2.0), True, (("kl_beta", 0),))
    r = EvalRecord(method="v3", cell=cell.slug, seed=0, k=2, query_id=9, icd_ids=(4, 7), icd_pos=(1, 0),
                   prediction_raw="Blue", prediction="blue", acc=1.0, spec=cell.as_dict())
    write_records(tmp_path / "e.jsonl", [r])
    back = read_records(tmp_path / "e.jsonl", EvalRecord)
    assert back == [r] and Cell.from_dict(back[0].spec) == cell
    with pytest.raises(SchemaError, match="method"):
        EvalRecord.from_dict({**r.to_dict(), "method": "oracle"})
    with pytest.raises(SchemaError, match="required for method v3"):
        EvalRecord.from_dict({**r.to_dict(), "spec": None})
    with pytest.raises(SchemaError, match="spec"):
        EvalRecord.from_dict({**r.to_dict(), "spec": [1]})


def test_concat_refuses_duplicates(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, [PoolRecord(1, (2, 3)), PoolRecord(4, (5, 6))])
    write_records(b, [PoolRecord(7, (8, 9))])
    assert concat_jsonl([a, b], "icdrl.pools", tmp_path / "ab.jsonl") == 3
    assert [r.query_id for r in read_records(tmp_path / "ab.jsonl", PoolRecord)] == [1, 4, 7]
    write_records(b, [PoolRecord(4, (8, 9))])
    with pytest.raises(SchemaError, match="record 4 also appears"):
        concat_jsonl([a, b], "icdrl.pools", tmp_path / "ab2.jsonl")
    assert not (tmp_path / "ab2.jsonl").exists()


def test_partial_file_resume_and_discard(tmp_path):
    out = tmp_path / "o.jsonl"
    p = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    assert p.load() == {}
    p.append([{"query_id": 1, "pool": [2]}])
    p.append([{"query_id": 3, "pool": [4]}])
    p.close()
    with open(p.path, "a") as fh:
        fh.write('{"query_id": 5, "po')  # torn
    q = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    assert sorted(q.load()) == [1, 3]
    q.append([{"query_id": 5, "pool": [6]}])
    assert q.finish([{"query_id": i, "pool": [i + 1]} for i in (1, 3, 5)]) == 3
    assert not q.path.exists() and [r.query_id for r in read_records(out, PoolRecord)] == [1, 3, 5]
    # other inputs: the partial file is discarded
    r = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    r.append([{"query_id": 1, "pool": [2]}])
    r.close()
    assert PartialJsonl(out, "icdrl.pools", fingerprint({"a": 2})).load() == {}
    assert fingerprint({"x": [1, 2]}) == fingerprint({"x": (1, 2)}) != fingerprint({"x": [2, 1]})


def test_nan_never_written(tmp_path):
    with pytest.raises(ValueError):
        write_jsonl(tmp_path / "n.jsonl", "icdrl.pools", [{"query_id": 1, "x": float("nan")}])
    with pytest.raises(SchemaError, match="finite"):
        Candidate.from_dict({"source": "beam", "icd_ids": [1], "icd_pos": [0], "info_score": float("nan"),
                             "step_gains": [0.0]})
