"""``icdrl power RESULTS_DIR --delta 1``: the summary's power plan from a finished run's records."""

from __future__ import annotations

import report_synth

from icdrl.cli import main
from icdrl.report import build_report
from icdrl.report.discover import find_eval_groups, find_rewards


def test_power_prints_the_plan_of_the_report_summary(tmp_path, capsys):
    inp = report_synth.make_inputs(
        tmp_path / "results",
        n_queries=60,
        seeds=(0, 1),
        n_anchors=30,
        modes=("legacy", "hard_plus_soft"),
        weights=((1.0, 1.0), (2.0, 1.0)),
    )
    out = tmp_path / "report"
    build_report(
        inp["eval_paths"],
        inp["metrics_paths"],
        inp["rewards_paths"],
        inp["scored_path"],
        {"n_boot": 300, "seed": 0},
        out,
    )
    summary = (out / "summary.md").read_text()
    assert main(["power", str(tmp_path / "results"), "--delta", "1", "--n-boot", "300"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith(
        f"{len(inp['eval_paths'])} evaluation files, {len(inp['rewards_paths'])} rewards files"
    )
    plan = [ln.strip() for ln in printed[1:]]
    assert any(ln.startswith("Test queries needed to resolve 1 point") for ln in plan)
    assert any(
        ln.startswith("2 seeds: median comparison") for ln in plan
    )  # two seeds: seeds can be planned
    for ln in plan:  # the same plan as the summary, line for line
        assert ln in summary, ln


def test_power_groups_runs_and_reports_missing_records(tmp_path, capsys):
    assert main(["power", str(tmp_path / "nowhere")]) == 1
    assert "no such results folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["power", str(tmp_path / "empty")]) == 1
    assert "no evaluation records" in capsys.readouterr().err
    assert main(["power", str(tmp_path / "empty"), "--delta", "0"]) == 2
    # the workflow's layout: baselines under <run>/test-<tag>/, selectors' files named test-<tag>.jsonl
    # (and val-<tag>.jsonl on the validation queries, which no report reads)
    run = tmp_path / "res" / "ds" / "model" / "lvlm" / "random-K8-s0"
    base = run / "test-n5-k1-mnt10-official" / "zero_shot.jsonl"
    cell = run / "anchors-n9" / "B5" / "scored-t1" / "v3-x" / "legacy-a1-b0" / "rank" / "seed0"
    v3, val = cell / "test-n5-k1-mnt10-official.jsonl", cell / "val-n3-k1-mnt10-official.jsonl"
    other = run / "test-n7-k1-mnt10-official" / "zero_shot.jsonl"
    rew = run / "anchors-n9" / "B5" / "scored-t1" / "rewards" / "legacy-a1-b0.jsonl"
    from icdrl.records import write_jsonl

    for p in (base, v3, val, other):
        write_jsonl(p, "icdrl.eval", [])
    write_jsonl(rew, "icdrl.rewards", [])
    (run / "notes.jsonl").write_text("not json\n")
    groups = find_eval_groups(tmp_path / "res")
    assert groups == {
        "ds/model/lvlm/random-K8-s0/test-n5-k1-mnt10-official": [str(v3), str(base)],
        "ds/model/lvlm/random-K8-s0/test-n7-k1-mnt10-official": [str(other)],
    }
    assert find_rewards([str(v3)], tmp_path / "res") == {"legacy-a1-b0": str(rew)}
