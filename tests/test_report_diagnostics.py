"""Copy-rate diagnostics and ablation deltas (docs/science.md §8, §10), from the evaluation records and the
training answers table alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import report_synth

from icdrl.answers import AnswersTable, answers_table, load_answers, write_answers
from icdrl.data import Example
from icdrl.metrics import normalize_answer
from icdrl.records import write_jsonl
from icdrl.report.diagnostics import (
    ablations_table,
    answer_flags,
    diagnostics_table,
    ratio_interval,
)
from icdrl.report.inputs import load_eval

N_BOOT = 200


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    cells = report_synth.cells(modes=("legacy", "hybrid"), use_rank=(True,), weights=((1.0, 1.0),))
    paths = report_synth.write_eval(
        root,
        cells,
        n_queries=80,
        seeds=(0, 1),
        baselines=("zero_shot", "random", "rices", "copy", "v2"),
        ablate_v2=True,
    )
    return paths, report_synth.write_answers(root)


def _records(paths):
    rows = []
    for p in paths:
        rows += [json.loads(x) for x in Path(p).read_text().splitlines()[1:]]
    return pd.DataFrame(rows)


def test_diagnostics_are_re_derived_from_the_records_and_the_answers(synth):
    paths, answers_path = synth
    answers = load_answers(answers_path)
    t = diagnostics_table(load_eval(paths), answers, N_BOOT, 0)
    df = _records(paths)
    vocab = {normalize_answer(a) for a in report_synth.VOCAB}
    norm = normalize_answer
    for method, k in (("v2", 3), ("rices", 1), ("random", 4), ("no_images", 2), ("shuffled", 4)):
        sub = df[(df.method == method) & (df.k == k)]
        demo = sub.icd_ids.map(lambda ids: [norm(report_synth.train_answer(i)) for i in ids])
        pred = sub.prediction.map(norm)
        any_ = np.array([p in d for p, d in zip(pred, demo)])
        last = np.array([p == d[-1] for p, d in zip(pred, demo)])
        wrong = np.array([p not in vocab for p in pred])
        acc = sub.acc.to_numpy()
        row = t.data[(t.data.method_kind == method) & (t.data.k == k)].iloc[0]
        assert row.copies_any == pytest.approx(100 * any_.mean(), abs=1e-3)
        assert row.copies_last == pytest.approx(100 * last.mean(), abs=1e-3)
        assert row.wrong_form == pytest.approx(100 * wrong.mean(), abs=1e-3)
        assert (
            row.acc_copy == pytest.approx(100 * acc[any_].mean(), abs=1e-3)
            and row.n_copy == any_.sum()
        )
        assert (
            row.acc_no_copy == pytest.approx(100 * acc[~any_].mean(), abs=1e-3)
            and row.n_no_copy == (~any_).sum()
        )
        for c in ("copies_any", "copies_last", "wrong_form", "acc_copy", "acc_no_copy"):
            assert row[f"{c}_low"] <= row[c] <= row[f"{c}_high"]
        assert row.copies_last <= row.copies_any
    # the synthetic copy-happy RICES copies its last demonstration more than random does

    def get(m, k):
        return t.data[(t.data.method_kind == m) & (t.data.k == k)].iloc[0]

    assert get("rices", 2).copies_last > get("random", 2).copies_last
    # zero-shot has no demonstration: no copy rate, but a wrong-form share (its verbose answers)
    z = get("zero_shot", 1)
    assert (
        pd.isna(z.copies_any)
        and pd.isna(z.acc_copy)
        and z.wrong_form > 50
        and "no demonstrations" in z.note
    )
    md = "\n".join(f.to_markdown() for _, f in t.sections)
    assert "RICES (image+question)" in md and "v2 [shuffled order]" in md


def test_without_answers_or_a_closed_vocabulary_the_columns_say_so(synth):
    paths, answers_path = synth
    data = load_eval(paths)
    t = diagnostics_table(data, None, N_BOOT, 0)
    ran = t.data[t.data.n_queries > 0]
    assert len(ran) == len(t.data) - 1  # the shuffled ablation has no k=1
    assert t.data["note"][t.data.n_queries == 0].item() == "not available: not evaluated at k=1"
    assert t.data["copies_any"].isna().all() and ran["note"].str.contains("no answers table").all()
    open_vocab = AnswersTable(load_answers(answers_path).answers, None)
    t = diagnostics_table(data, open_vocab, N_BOOT, 0)
    assert t.data["wrong_form"].isna().all() and t.data["copies_any"].notna().any()
    assert t.data[t.data.n_queries > 0]["note"].str.contains("no closed answer form").all()


def test_ablations_are_paired_deltas_against_the_ablated_method(synth):
    paths, _ = synth
    t = ablations_table(load_eval(paths), N_BOOT, 0)
    df = _records(paths)
    for ablation in ("shuffled", "no_images"):
        for k in (1, 2, 3, 4):
            row = t.data[(t.data.ablation == ablation) & (t.data.k == k)].iloc[0]
            if ablation == "shuffled" and k == 1:
                assert (
                    pd.isna(row.delta)
                    and row.note == "not available: one demonstration has no order"
                )
                continue
            a = df[(df.method == ablation) & (df.k == k)].set_index(["seed", "query_id"]).acc
            b = df[(df.method == "v2") & (df.k == k)].set_index(["seed", "query_id"]).acc
            assert row.delta == pytest.approx(100 * (a - b.reindex(a.index)).mean(), abs=1e-3)
            assert row.acc_base == pytest.approx(100 * b.mean(), abs=1e-3)
            assert row.ci_low <= row.delta <= row.ci_high and row.method == "v2"
    # no ablations: one row says why
    base_only = [p for p in paths if ".shuffled" not in p and ".no_images" not in p]
    t = ablations_table(load_eval(base_only), N_BOOT, 0)
    assert len(t.data) == 1 and "evaluation.ablate is empty" in t.data.note.iloc[0]


def test_answer_flags_and_ratio_interval():
    ans = AnswersTable({1: "Red", 2: "two", 3: "blue"}, frozenset({"red", "2", "blue"}))
    assert answer_flags("red", (1, 3), ans) == (True, False, False)
    assert answer_flags("2", (2, 1), ans) == (
        True,
        False,
        False,
    )  # "two" == "2" after normalisation
    assert answer_flags("blue.", (1, 3), ans) == (True, True, False)
    assert answer_flags("the answer is red", (1,), ans) == (False, False, True)
    with pytest.raises(KeyError, match="ICD 9 is not in the answers table"):
        answer_flags("red", (9,), ans)
    num, den = np.array([[1.0, 0, 1, 0]]), np.array([[1.0, 1, 1, 0]])
    iv = ratio_interval(num, den, 500, 0, 0.95)
    assert iv.estimate == pytest.approx(2 / 3) and 0 <= iv.low <= iv.estimate <= iv.high <= 1
    assert ratio_interval(num, np.zeros_like(den), 100, 0, 0.95) is None


def test_answers_table_round_trip_and_errors(tmp_path, monkeypatch):
    train = [
        Example(i, f"/x/{i}.png", "what color?", (a,), a)
        for i, a in enumerate(["red", "Blue", "circle"])
    ]
    t = answers_table(train, "easyvqa")
    assert (
        t.vocabulary == {"red", "blue", "circle"}
        and t.wrong_form("the answer is red")
        and not t.wrong_form("Red")
    )
    assert (
        answers_table(train, "vqa").vocabulary is None
        and answers_table(train, "vqa").wrong_form("x") is None
    )
    import icdrl.data

    monkeypatch.setattr(icdrl.data, "load_dataset", lambda cfg, split: train)
    write_answers({"name": "easyvqa"}, tmp_path / "a.json")
    back = load_answers(tmp_path / "a.json")
    assert (
        dict(back.answers) == {0: "red", 1: "Blue", 2: "circle"} and back.vocabulary == t.vocabulary
    )
    (tmp_path / "bad.json").write_text(
        json.dumps({"schema": "icdrl.answers", "version": 1, "answers": [[1, 2]]})
    )
    with pytest.raises(ValueError, match="bad.json: field 'answers'"):
        load_answers(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="answers table not found"):
        load_answers(tmp_path / "none.json")
    write_jsonl(tmp_path / "e.jsonl", "icdrl.eval", [])  # (an eval file is not an answers table)
    with pytest.raises(ValueError, match="not valid JSON|not an icdrl.answers"):
        load_answers(tmp_path / "e.jsonl")
