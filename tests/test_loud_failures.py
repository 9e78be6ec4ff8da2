"""Issue 15, "nothing silently wrong": each probe that once gave a wrong result quietly now fails
in one line naming the file (or key) and the item. Probes of one module live beside its other
tests (test_records, test_rl, test_config, test_data, ...); these cut across modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icdrl import groups as G
from icdrl import rewards as R
from icdrl import train as T
from icdrl.records import SchemaError, check_csv_complete, read_jsonl, write_jsonl
from icdrl.selector import PointerSelector
from icdrl.synthetic import synthetic_groups

SMALL_V3 = dict(rce_epochs=1, grpo_epochs=2, batch_queries=8, val_fraction=0.25)


def _syn(n_groups=3):
    return synthetic_groups(n_groups=n_groups, n_cands=6, pool_size=10, depth=2, dim=8, seed=0)


def _write_files(tmp_path, syn):
    """Scored and rewards files holding the synthetic groups."""
    recs = []
    for g in syn.groups:
        recs.append(
            {
                "anchor_id": g.query_id,
                "pool": list(g.pool),
                "zero_shot_logprob": -1.0,
                "zero_shot_prob": 0.3,
                "candidates": [
                    {
                        "source": src,
                        "icd_ids": [g.pool[p] for p in s],
                        "icd_pos": list(s),
                        "info_score": info,
                        "step_gains": [info / len(s)] * len(s),
                        "prediction_raw": "a",
                        "prediction": "a",
                        "vqa_correct": int(h),
                        "vqa_acc_score": float(h),
                    }
                    for s, src, info, h in zip(g.seqs, g.sources, g.info, g.hard)
                ],
            }
        )
    write_jsonl(tmp_path / "scored.jsonl", "icdrl.scored", recs)
    R.write_rewards(
        tmp_path / "scored.jsonl", "hard_plus_soft", out_path=tmp_path / "rewards.jsonl"
    )
    return recs


# ---------------------------------------------------------------------------- empty groups


def test_group_refuses_zero_sequences():
    with pytest.raises(ValueError, match="anchor 4: a group needs at least one candidate sequence"):
        G.Group(4, (1, 2), (), (), (), (), ())


def test_loaders_skip_and_count_empty_groups_and_refuse_all_empty(tmp_path, caplog):
    syn = _syn()
    recs = _write_files(tmp_path, syn)
    rews = read_jsonl(tmp_path / "rewards.jsonl", "icdrl.rewards")
    recs[1]["candidates"], rews[1]["rewards"], rews[1]["hard"] = [], [], []
    write_jsonl(tmp_path / "s1.jsonl", "icdrl.scored", recs)
    write_jsonl(tmp_path / "r1.jsonl", "icdrl.rewards", rews)
    with caplog.at_level("WARNING", logger="icdrl.groups"):
        groups = G.load_groups(tmp_path / "s1.jsonl", tmp_path / "r1.jsonl")
    assert [g.query_id for g in groups] == [recs[0]["anchor_id"], recs[2]["anchor_id"]]
    assert "1 of 3 anchors have no candidate sequence and are skipped" in caplog.text
    for r, w in zip(recs, rews):
        r["candidates"], w["rewards"], w["hard"] = [], [], []
    write_jsonl(tmp_path / "s0.jsonl", "icdrl.scored", recs)
    write_jsonl(tmp_path / "r0.jsonl", "icdrl.rewards", rews)
    # train_v3 with every group empty: refused before training, naming the file
    with pytest.raises(
        ValueError, match=r"s0.jsonl: no anchor has a candidate sequence \(3 empty groups\)"
    ):
        G.load_groups(tmp_path / "s0.jsonl", tmp_path / "r0.jsonl")
    with pytest.raises(ValueError, match=r"s0.jsonl: no anchor has a candidate sequence"):
        G.load_candidate_groups(tmp_path / "s0.jsonl")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no training groups"):
        T.train_v3(
            PointerSelector(8, hidden_size=16), [], syn.table, T.V3Config(**SMALL_V3), True, 0
        )
    with pytest.raises(ValueError, match="no groups to pack"):
        G.pack_groups([], syn.table)


# ---------------------------------------------------------------------------- NaN rewards


@pytest.mark.parametrize("bad", ["NaN", "null"])
def test_a_nan_or_null_reward_is_an_error_naming_file_and_anchor(tmp_path, bad):
    # issue 15: a NaN reward in a rewards file loaded as 0.0 with no warning
    _write_files(tmp_path, _syn())
    lines = (tmp_path / "rewards.jsonl").read_text().splitlines()
    rec = json.loads(lines[3])
    aid = rec["anchor_id"]
    text = json.dumps({**rec, "rewards": ["@"] + rec["rewards"][1:]}).replace('"@"', bad)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:3] + [text] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl.*anchor {aid}.*(NaN|None)") as e:
        G.load_groups(tmp_path / "scored.jsonl", tmp_path / "bad.jsonl")
    assert "scored.jsonl" not in str(e.value)  # the rewards file is the one named


# ---------------------------------------------------------------------------- other outputs


def test_metrics_csv_cut_short_is_refused_by_the_report(tmp_path):
    from icdrl.report.inputs import load_metrics

    rows = [T._row("grpo", e, loss=0.1 * e, groups_kept=3, groups_skipped=0) for e in range(1, 5)]
    p = tmp_path / "m" / "metrics.csv"
    p.parent.mkdir()
    T.write_metrics(rows, p)
    assert check_csv_complete(p) == 4
    assert len(load_metrics([p])["metrics"]) == 4
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:3]) + "\n")  # cut at a line boundary: 2 epochs of 4
    with pytest.raises(SchemaError, match=r"metrics.csv: incomplete: no end line"):
        load_metrics([p])
    p.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # a middle row deleted
    with pytest.raises(SchemaError, match=r"metrics.csv: incomplete: 3 rows, its end line says 4"):
        load_metrics([p])


def test_truncated_embeddings_and_checkpoints_name_the_file(tmp_path):
    from icdrl.embeddings import EmbeddingTable

    np.savez(tmp_path / "e.npz", ids=np.arange(500), emb=np.ones((500, 16), np.float32))
    data = (tmp_path / "e.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    for load in (EmbeddingTable.load,):  # the one loader (icdrl.train had a second)
        with pytest.raises(SchemaError, match=r"cut.npz: cannot be read, cut short or corrupt"):
            load(tmp_path / "cut.npz")
    torch.manual_seed(0)
    PointerSelector(8, hidden_size=16).save(tmp_path / "s.pt", {"phase": "v2"})
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SchemaError, match=r"cut.pt: cannot be read, cut short or corrupt"):
        PointerSelector.load(tmp_path / "cut.pt")
    assert PointerSelector.load(tmp_path / "s.pt").config["d_in"] == 8
