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
    return Candidate(
        source=source,
        icd_ids=tuple(pool[p] for p in pos),
        icd_pos=pos,
        info_score=0.25,
        step_gains=(0.1, 0.15),
    )


def test_candidate_and_scored_round_trip(tmp_path):
    rec = CandidateRecord(
        anchor_id=5,
        pool=(10, 11, 12),
        zero_shot_logprob=-0.5,
        zero_shot_prob=0.6,
        candidates=(cand(), cand("random", (2, 1))),
    )
    write_records(tmp_path / "c.jsonl", [rec])
    assert read_records(tmp_path / "c.jsonl", CandidateRecord) == [rec]
    sc = ScoredCandidate.from_candidate(
        rec.candidates[0],
        prediction_raw=" Red\n",
        prediction="red",
        vqa_acc_score=1.0,
        vqa_correct=1,
    )
    srec = ScoredRecord(
        anchor_id=5, pool=rec.pool, zero_shot_logprob=-0.5, zero_shot_prob=0.6, candidates=(sc,)
    )
    write_records(tmp_path / "s.jsonl", [srec])
    assert read_records(tmp_path / "s.jsonl", ScoredRecord) == [srec]
    d = read_jsonl(tmp_path / "s.jsonl", "icdrl.scored")[0]["candidates"][0]
    assert set(d) == {
        "source",
        "icd_ids",
        "icd_pos",
        "info_score",
        "step_gains",
        "prediction_raw",
        "prediction",
        "vqa_acc_score",
        "vqa_correct",
    }
    # a candidates file is not a scored file
    with pytest.raises(SchemaError, match="expected 'icdrl.scored'"):
        read_records(tmp_path / "c.jsonl", ScoredRecord)


def test_validation_names_file_and_field(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = CandidateRecord(
        anchor_id=1,
        pool=(10, 11, 12),
        zero_shot_logprob=-1.0,
        zero_shot_prob=0.37,
        candidates=(cand(),),
    ).to_dict()
    bad = json.loads(json.dumps(good))
    bad["candidates"][0]["icd_pos"] = [2, 0]  # positions no longer match the ids
    write_jsonl(p, "icdrl.candidates", [bad])
    with pytest.raises(
        SchemaError, match=r"bad.jsonl:2 \(anchor 1\).*icd_pos 2 does not hold icd_id 11"
    ):
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
    r = EvalRecord(
        method="v3",
        cell=cell.slug,
        seed=0,
        k=2,
        query_id=9,
        icd_ids=(4, 7),
        icd_pos=(1, 0),
        prediction_raw="Blue",
        prediction="blue",
        acc=1.0,
        spec=cell.as_dict(),
    )
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
        Candidate.from_dict(
            {
                "source": "beam",
                "icd_ids": [1],
                "icd_pos": [0],
                "info_score": float("nan"),
                "step_gains": [0.0],
            }
        )


# ---------------------------------------------------------------------------- completeness


def _pools_file(path, n=4):
    write_records(path, [PoolRecord(i, (10 + i, 20 + i)) for i in range(n)])
    return path.read_text().splitlines()


def test_end_line_is_written_last_and_is_no_record(tmp_path):
    p = tmp_path / "p.jsonl"
    lines = _pools_file(p, 3)
    assert json.loads(lines[0]) == {"schema": "icdrl.pools", "version": 1}
    assert json.loads(lines[-1]) == {"end": "icdrl.pools", "records": 3}
    assert [d["query_id"] for d in read_jsonl(p, "icdrl.pools")] == [0, 1, 2]
    write_jsonl(tmp_path / "empty.jsonl", "icdrl.pools", [])
    assert read_jsonl(tmp_path / "empty.jsonl", "icdrl.pools") == []


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_a_file_cut_at_a_line_boundary_is_refused(tmp_path, keep):
    # issue 15: a shard trimmed to its first lines flowed downstream with rc 0
    p = tmp_path / "cut.jsonl"
    lines = _pools_file(p, 4)
    p.write_text("\n".join(lines[:keep]) + "\n")
    with pytest.raises(
        SchemaError,
        match=r"cut.jsonl: incomplete: no end line .*; remake it: snakemake --force .*cut.jsonl",
    ):
        read_jsonl(p, "icdrl.pools")


def test_a_file_missing_a_middle_line_or_with_lines_after_its_end_is_refused(tmp_path):
    p = tmp_path / "mid.jsonl"
    lines = _pools_file(p, 4)
    p.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(SchemaError, match=r"mid.jsonl: incomplete: 3 records, its end line says 4"):
        read_jsonl(p, "icdrl.pools")
    p.write_text("\n".join(lines[:-1] + [lines[-1], lines[1], lines[-1]]) + "\n")
    with pytest.raises(SchemaError, match=r"mid.jsonl:7: a line after the end line"):
        read_jsonl(p, "icdrl.pools")
    # an end line of another schema is no end line
    p.write_text("\n".join(lines[:-1] + [json.dumps({"end": "icdrl.eval", "records": 4})]) + "\n")
    with pytest.raises(SchemaError, match="no end line"):
        read_jsonl(p, "icdrl.pools")


def test_a_long_last_record_without_end_line_is_refused(tmp_path):
    p = tmp_path / "long.jsonl"
    write_records(p, [PoolRecord(1, tuple(range(5000)))])
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:2]) + "\n")  # the last line is longer than the tail block read
    with pytest.raises(SchemaError, match="no end line"):
        read_jsonl(p, "icdrl.pools")


def test_concat_refuses_a_cut_shard_and_writes_nothing(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _pools_file(a, 2)
    lines = _pools_file(b, 3)
    b.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(SchemaError, match=r"b.jsonl: incomplete"):
        concat_jsonl([a, b], "icdrl.pools", tmp_path / "ab.jsonl")
    assert not (tmp_path / "ab.jsonl").exists()


def test_partial_file_finish_writes_the_end_line(tmp_path):
    out = tmp_path / "o.jsonl"
    p = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    p.append([{"query_id": 1, "pool": [2]}])
    p.close()
    assert "end" not in p.path.read_text()  # a partial file is never mistaken for a complete one
    q = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    assert sorted(q.load()) == [1]
    q.finish([{"query_id": 1, "pool": [2]}, {"query_id": 2, "pool": [3]}])
    assert json.loads(out.read_text().splitlines()[-1]) == {"end": "icdrl.pools", "records": 2}
    # a damaged (non-finite) record in a partial file is recomputed, with what follows it
    r = PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1}))
    r.append([{"query_id": 1, "pool": [2]}])
    r.close()
    with open(r.path, "a") as fh:
        fh.write('{"query_id": 2, "pool": [NaN]}\n{"query_id": 3, "pool": [4]}\n')
    assert sorted(PartialJsonl(out, "icdrl.pools", fingerprint({"a": 1})).load()) == [1]


def test_nan_or_infinity_in_a_file_names_the_file_the_record_and_the_field(tmp_path):
    # issue 15: a NaN reward loaded as 0.0 with no warning
    p = tmp_path / "rewards.jsonl"
    write_jsonl(
        p,
        "icdrl.rewards",
        [
            {"anchor_id": 3, "rewards": [1.0, 2.0], "hard": [0, 1]},
            {"anchor_id": 7, "rewards": [0.5, 1.5], "hard": [0, 1]},
        ],
    )
    text = p.read_text()
    for const in ("NaN", "Infinity", "-Infinity"):
        p.write_text(text.replace("1.5", const))
        with pytest.raises(
            SchemaError,
            match=rf"rewards.jsonl:3: anchor 7: field rewards\[1\] is {const}, not a finite",
        ):
            read_jsonl(p, "icdrl.rewards")


def test_read_table_keeps_integer_ids_and_has_no_schema_or_end_row(tmp_path):
    import pandas as pd

    from icdrl.records import read_table

    recs = [
        EvalRecord(
            method="zero_shot",
            cell=None,
            seed=None,
            k=0,
            query_id=q,
            icd_ids=(),
            icd_pos=(),
            prediction_raw="Blue",
            prediction="blue",
            acc=1.0,
        )
        for q in (3, 5)
    ]
    recs.append(
        EvalRecord(
            method="random",
            cell=None,
            seed=0,
            k=1,
            query_id=9,
            icd_ids=(4,),
            icd_pos=(0,),
            prediction_raw="red",
            prediction="red",
            acc=0.0,
        )
    )
    write_records(tmp_path / "e.jsonl", recs)
    df = read_table(tmp_path / "e.jsonl")
    assert len(df) == 3 and "schema" not in df.columns and "end" not in df.columns
    assert df["query_id"].dtype == "int64" and df["query_id"].tolist() == [3, 5, 9]
    assert df["k"].dtype == "int64"
    assert str(df["seed"].dtype) == "Int64" and df["seed"].isna().tolist() == [True, True, False]
    assert df["acc"].tolist() == [1.0, 1.0, 0.0] and df["icd_ids"].tolist() == [[], [], [4]]
    # pandas' own reader, for contrast: the schema and end lines become rows, ids turn float
    raw = pd.read_json(tmp_path / "e.jsonl", lines=True)
    assert len(raw) == 5 and raw["query_id"].dtype == "float64"


def test_read_table_refuses_a_cut_file_and_reads_checked_csv(tmp_path):
    from icdrl.records import csv_end_line, read_table

    write_jsonl(
        tmp_path / "p.jsonl",
        "icdrl.pools",
        [{"query_id": 1, "pool": [2, 3]}, {"query_id": 4, "pool": [5]}],
    )
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(SchemaError, match="cut.jsonl: incomplete"):
        read_table(tmp_path / "cut.jsonl")
    (tmp_path / "m.csv").write_text("step,loss\n0,1.5\n1,0.5\n" + csv_end_line(2) + "\n")
    df = read_table(tmp_path / "m.csv")
    assert df["step"].tolist() == [0, 1] and df["loss"].tolist() == [1.5, 0.5]
    (tmp_path / "short.csv").write_text("step,loss\n0,1.5\n" + csv_end_line(2) + "\n")
    with pytest.raises(SchemaError, match="short.csv: incomplete"):
        read_table(tmp_path / "short.csv")
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(SchemaError, match="x.jsonl: no icdrl schema header"):
        read_table(tmp_path / "x.jsonl")
