"""build_report end to end on realistic synthetic inputs, plus the RL-data and table logic."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import report_synth

from icdrl.records import write_jsonl
from icdrl.report import REPORT_FILES, build_report, report_files
from icdrl.report.experiments import ExperimentSpec, experiment_table
from icdrl.report.inputs import RewardGroups, labelled_paths, load_eval, load_rewards
from icdrl.report.tables import accuracy_table, group_stats, vs_legacy_table

CFG = {"n_boot": 200, "seed": 0}
SEEDS = (0, 1)
SHOTS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_in")
    # 2 seeds, 4 modes, both use_rank values; weights (1,1) and (2,1) -> exp 3.3/3.4 absent
    return report_synth.make_inputs(root, n_queries=120, seeds=SEEDS, n_anchors=60)


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out")
    build_report(
        inputs["eval_paths"],
        inputs["metrics_paths"],
        inputs["rewards_paths"],
        inputs["scored_path"],
        CFG,
        out,
        experiments=inputs["experiments"],
        answers=inputs["answers"],
    )
    return out


@pytest.fixture(scope="module")
def files(inputs):
    return report_files("", [e["name"] for e in inputs["experiments"]])


@pytest.fixture(scope="module")
def data(inputs):
    return load_eval(inputs["eval_paths"])


def _csv(report: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(
        report / f"{name}.csv",
        keep_default_na=False,
        na_values=[""],
        dtype={"experiment": str, "setting": str},
    )


def test_writes_exactly_the_declared_files_all_non_empty(report, files):
    written = sorted(p.name for p in report.iterdir())
    assert written == sorted(files)
    assert {
        "exp-modes.csv",
        "exp-modes.md",
        "exp-modes.html",
        "exp-modes-delta.png",
        "exp-weights-delta.svg",
        "exp-use_rank.csv",
    } <= set(files)
    assert report_files(report) == [str(report / f) for f in REPORT_FILES]
    for name in files:
        assert (report / name).stat().st_size > 0, name


def test_plot_files_are_valid_images(report, files):
    for name in [f for f in files if f.endswith(".png")]:
        head = (report / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", name
        assert (report / name).stat().st_size > 10_000, f"{name} looks blank"
    for name in [f for f in files if f.endswith(".svg")]:
        root = ET.parse(report / name).getroot()
        assert root.tag.endswith("svg"), name


def test_accuracy_table_has_every_method_and_shot(report, inputs):
    acc = _csv(report, "accuracy")
    cells = {c["cell"] for c in inputs["cells"]}
    expected = {
        (m, k) for m in ("zero_shot", "random", "similarity", "rices", "copy", "v2") for k in SHOTS
    } | {(c, k) for c in cells for k in SHOTS}  # the ablations have a table of their own
    got = {(r.cell if r.method_kind == "v3" else r.method_kind, int(r.k)) for r in acc.itertuples()}
    assert got == expected and len(acc) == len(expected)
    assert (acc["n_queries"] == 120).all()
    v3 = acc[acc["method_kind"] == "v3"]
    assert (v3["n_seeds"] == 2).all() and (v3["seeds"] == "0,1").all()
    assert ((acc["ci_low"] <= acc["acc_mean"]) & (acc["acc_mean"] <= acc["ci_high"])).all()
    assert acc["acc_mean"].between(0, 100).all()
    md = (report / "accuracy.md").read_text()
    for c in [
        "zero_shot",
        "random",
        "similarity (within pool)",
        "RICES (image+question)",
        "copy (RICES majority answer)",
        "v2",
    ]:
        assert f"| {c} " in md
    assert "shuffled" not in md and "no demonstration images" not in md


def test_accuracy_matches_records(report, inputs):
    """The table's mean equals the mean over seeds and queries computed straight from the files."""
    rows = []
    for p in inputs["eval_paths"]:
        lines = Path(p).read_text().splitlines()[1:]
        rows += [json.loads(x) for x in lines]
    df = pd.DataFrame(rows)
    cell = inputs["cells"][3]["cell"]
    want = df[(df.cell == cell) & (df.k == 2)]["acc"].mean() * 100
    acc = _csv(report, "accuracy")
    got = acc[(acc.cell == cell) & (acc.k == 2)]["acc_mean"].item()
    assert got == pytest.approx(want, abs=1e-3)


def test_vs_legacy_has_a_row_per_cell_and_shot_with_intervals(report, inputs):
    t = _csv(report, "vs_legacy")
    non_legacy = [c for c in inputs["cells"] if c["mode"] != "legacy"]
    assert len(t) == len(non_legacy) * len(SHOTS)
    assert t["delta"].notna().all()
    assert ((t["ci_low"] <= t["delta"]) & (t["delta"] <= t["ci_high"])).all()
    contains0 = (t["ci_low"] <= 0) & (t["ci_high"] >= 0)
    assert (t.loc[contains0, "trend"] == "n.s.").all()
    assert (t.loc[~contains0, "trend"].isin(["up", "down"])).all()
    assert (t["distinguishable"].astype(str) == (~contains0).astype(str)).all()
    # the baseline is legacy with the same use_rank
    for r in t.itertuples():
        assert r.baseline.startswith(
            "v3 legacy " + ("rank" if r.use_rank in (True, "True") else "z-score")
        )
    md = (report / "vs_legacy.md").read_text()
    assert "## hard_plus_soft vs legacy" in md
    assert re.search(
        r"^\| shot +\| cell +\| legacy cell +\| Δ vs legacy \(pts\) \[95% CI\] +\| trend", md, re.M
    )


def test_one_table_per_experiment_with_its_contrast(report, inputs):
    modes = _csv(report, "exp-modes")
    # every non-legacy mode vs legacy, per use_rank context, at every shot
    assert set(modes["level"]) == {"hard_plus_soft", "hard_plus_soft_v2", "hybrid"}
    assert set(modes["reference"]) == {"legacy"} and set(modes["context"]) == {"rank", "z-score"}
    assert len(modes) == 3 * 2 * len(SHOTS) and modes["delta"].notna().all()
    assert ((modes["ci_low"] <= modes["delta"]) & (modes["delta"] <= modes["ci_high"])).all()
    ur = _csv(report, "exp-use_rank")
    assert set(ur["level"]) == {"z-score"} and set(ur["reference"]) == {"rank"}
    assert ur["delta"].notna().all() and len(ur) == 4 * len(SHOTS)
    w = _csv(report, "exp-weights")
    assert set(w["level"]) == {"(2, 1)"} and set(w["reference"]) == {"(1, 1)"}
    # hybrid does not read the weights: named as the same cell, not tested, never '– [–, –]'
    hyb = w[w["context"].str.startswith("hybrid")]
    assert len(hyb) == 2 and (hyb["k"].astype(str) == "all").all()
    assert (
        hyb["note"].str.startswith("same cell as the reference: hybrid does not read weights").all()
    )
    assert hyb["delta"].isna().all()
    md = (report / "exp-weights.md").read_text()
    assert "same cell as the reference: hybrid does not read weights" in md and "– [–, –]" not in md
    avail = w[w["delta"].notna()]
    assert len(avail) == 2 * 2 * len(SHOTS)  # 2 modes x 2 use_rank that read the weights
    s = (report / "summary.md").read_text()
    for e in inputs["experiments"]:
        assert f"Experiment {e['name']}: {e['title']}" in s
    assert "2 levels train the same cell as their reference" in s


def test_experiment_table_matches_a_direct_comparison(data, inputs):
    from icdrl.report.compare import compare

    spec = ExperimentSpec.from_dict(next(e for e in inputs["experiments"] if e["name"] == "modes"))
    t = experiment_table(data, spec, 100, 3).data
    row = t[(t["level"] == "hard_plus_soft") & (t["context"] == "z-score") & (t["k"] == 1)].iloc[0]
    c = compare(data, f"v3:{row.cell}", f"v3:{row.reference_cell}", 1, 100, 3)
    assert (row.delta, row.ci_low, row.ci_high) == pytest.approx(
        (c.interval.estimate, c.interval.low, c.interval.high), abs=1e-4
    )
    assert row.reference_cell.startswith("legacy-") and row.reference_cell.endswith("-zscore")


def test_rl_tables_and_csvs_have_no_nan_strings(report, files):
    g = _csv(report, "rl_groups")
    assert len(g) == 6
    for c in ["share_flat", "share_all_negative", "share_all_positive", "share_mixed"]:
        assert g[c].between(0, 1).all()
    assert np.allclose(g["share_all_negative"] + g["share_all_positive"] + g["share_mixed"], 1.0)
    a = _csv(report, "rl_advantages")
    assert len(a) == 12 and set(a["advantage"]) == {"rank", "z-score"}
    assert (a["max"] <= 5.0).all() and (a["min"] >= -5.0).all()
    rank = a[a.advantage == "rank"]
    assert ((rank["min"] == -1.0) & (rank["max"] == 1.0)).all()
    for name in files:
        if name.endswith((".csv", ".md", ".html")):
            text = (report / name).read_text()
            assert "nan" not in text.lower().replace("nano", ""), name


def test_summary_names_distinguishable_findings(report):
    s = (report / "summary.md").read_text()
    assert "Best method per shot" in s and "Reward modes vs legacy" in s
    vs = _csv(report, "vs_legacy")
    tested = vs[vs["status"] == "tested"]
    n_holm = int(tested["significant_holm"].astype(str).eq("True").sum())
    n_dist = int(tested["distinguishable"].astype(str).eq("True").sum())
    assert f"{n_holm} of {len(tested)} tested deltas are significant after Holm" in s
    assert (
        f"Unadjusted, {n_dist} of {len(tested)} 95% intervals exclude 0, where chance alone would give "
        f"about {0.05 * len(tested):.1f}."
    ) in s
    assert "Test queries needed to resolve 1 point" in s
    assert "<h1>Report summary</h1>" in (report / "summary.html").read_text()


DELTA_TABLES = ("vs_legacy", "vs_v2", "exp-modes", "exp-use_rank", "exp-weights")


@pytest.mark.parametrize("name", DELTA_TABLES)
def test_delta_tables_carry_holm_mde_and_status(report, name):
    t = _csv(report, name)
    for col in (
        "p",
        "p_holm",
        "significant_holm",
        "mde",
        "family_size",
        "status",
        "n_clusters",
        "resampled",
    ):
        assert col in t.columns, col
    tested = t[t["status"] == "tested"]
    assert len(tested) > 0
    assert tested["p"].between(0, 1).all() and (tested["p_holm"] >= tested["p"] - 1e-12).all()
    assert (tested["family_size"] == len(tested)).all()  # one table = one family
    assert (tested["mde"] > 0).all()
    assert (tested["n_clusters"] == 60).all()  # 120 queries, two per image
    holm_sig = tested["significant_holm"].astype(str).eq("True")
    assert (tested.loc[holm_sig, "p_holm"] <= 0.05).all() and (
        tested.loc[~holm_sig, "p_holm"] > 0.05
    ).all()
    # Holm never flags more than the unadjusted intervals do
    assert holm_sig.sum() <= tested["distinguishable"].astype(str).eq("True").sum()
    v3_pairs = tested[tested["pairing"] == "paired by seed"]
    assert (v3_pairs["resampled"] == "seeds, then queries").all()


def test_rank_weight_cells_cannot_differ_and_are_not_tested(report):
    # the synthetic soft is 1 where hard is 1, so every positive weighting orders candidates as soft
    e3 = _csv(report, "exp-weights")
    rank = e3[
        e3["context"].isin(["hard_plus_soft, rank", "hard_plus_soft_v2, rank"])
        & e3["delta"].notna()
    ]
    assert len(rank) == 2 * len(SHOTS) and (rank["status"] == "cannot differ").all()
    assert rank["note"].str.contains("increases with soft").all()
    assert rank["p_holm"].isna().all()
    # their synthetic accuracies differ: the note says the records do not reproduce each other
    assert rank["note"].str.contains("did not reproduce").all()
    s = (report / "summary.md").read_text()
    assert "cannot differ by construction and are not tested" in s


def test_summary_says_what_the_intervals_resample(report):
    s = (report / "summary.md").read_text()
    assert "Seeds are resampled, then test queries" in s
    assert "60 images for 120 queries" in s
    assert "by -0.000" not in s and "by 0.000" not in s


def test_within_group_gaps_and_tie_wording():
    from icdrl.report.summary import _within_text
    from icdrl.report.tables import within_group_gaps

    g = RewardGroups(
        "x",
        "x",
        [
            np.array([1.0, 0.5, 0.7]),  # mixed: correct 1.0 / 0.5 vs incorrect 0.7 -> gap -0.2
            np.array([1.0, 1.0]),  # mixed: tie
            np.array([2.0, 0.0]),  # mixed: gap 2
            np.array([0.3, 0.1]),
        ],  # all incorrect: not mixed
        [np.array([1, 1, 0.0]), np.array([1, 0.0]), np.array([1, 0.0]), np.array([0, 0.0])],
        np.zeros(4, dtype=int),
    )
    st = within_group_gaps(g)
    assert st["n_mixed"] == 3
    assert st["share_inverted"] == pytest.approx(1 / 3) and st["share_tied"] == pytest.approx(1 / 3)
    assert st["within_gap_min"] == pytest.approx(-0.2) and st["within_gap_median"] == pytest.approx(
        0.0
    )
    row = pd.Series(st)
    text = _within_text(row)
    assert "33.3% an incorrect candidate outscores a correct one (by up to 0.200)" in text
    assert "33.3% the best incorrect candidate ties the worst correct one" in text
    tie_only = pd.Series(
        within_group_gaps(
            RewardGroups(
                "t", "t", [np.array([1.0, 1.0])], [np.array([1, 0.0])], np.zeros(1, dtype=int)
            )
        )
    )
    assert "-0.000" not in _within_text(tie_only) and "ties" in _within_text(tie_only)
    sep = pd.Series(
        within_group_gaps(
            RewardGroups(
                "s", "s", [np.array([2.0, 0.0])], [np.array([1, 0.0])], np.zeros(1, dtype=int)
            )
        )
    )
    assert "every correct candidate scores above every incorrect one" in _within_text(sep)


def test_group_stats_known_case():
    g = RewardGroups(
        label="x",
        path="x",
        rewards=[
            np.array([0.0, 0.0, 0.0]),  # flat, all negative
            np.array([0.0, 2.0, 1.0]),  # mixed
            np.array([3.0, 3.0]),  # flat, all positive
            np.array([2.5, 0.5, 0.5, 0.2]),
        ],  # mixed, 1 of 4 positive
        hard=[
            np.array([0, 0, 0.0]),
            np.array([0, 1, 0.0]),
            np.array([1, 1.0]),
            np.array([1, 0, 0, 0.0]),
        ],
        missing=np.array([0, 2, 0, 0]),
    )
    st = group_stats(g)
    assert st["share_flat"] == 0.5
    assert st["share_all_negative"] == 0.25 and st["share_all_positive"] == 0.25
    assert st["share_mixed"] == 0.5
    assert st["share_pos_ratio_ge_0.2"] == 0.75  # 1/3, 1, 1/4 >= 0.2
    assert (st["reward_min"], st["reward_max"]) == (0.0, 3.0)
    assert (st["pos_reward_min"], st["neg_reward_max"]) == (2.0, 1.0)
    assert (st["missing_inputs"], st["anchors_with_missing"]) == (2, 1)


def test_advantages_come_from_icdrl_rl(tmp_path):
    rl = pytest.importorskip("icdrl.rl")
    import torch

    from icdrl.report.tables import advantage_values

    g = RewardGroups(
        "x",
        "x",
        [np.array([1.0, 0.0, 0.5]), np.array([2.0]), np.array([1.0, 1.0])],
        [np.array([1.0, 0, 0]), np.array([1.0]), np.array([1.0, 1.0])],
        np.zeros(3, dtype=int),
    )
    for ur in (True, False):
        got = advantage_values(g, ur)
        want = np.concatenate(
            [
                rl.advantages(torch.tensor(r), use_rank=ur, min_std=0.1, clip=5.0).numpy()
                for r in g.rewards
            ]
        )
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert advantage_values(g, False)[3:].tolist() == [0.0, 0.0, 0.0]  # single and flat groups


def test_baselines_only_still_writes_every_file(tmp_path):
    cells = []
    paths = report_synth.write_eval(tmp_path, cells, n_queries=30, seeds=(0,), shots=(1, 2))
    out = tmp_path / "out"
    build_report(paths, None, None, None, {"n_boot": 50, "seed": 1}, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    assert all((out / f).stat().st_size > 0 for f in REPORT_FILES)
    vs = _csv(out, "vs_legacy")
    assert len(vs) == 1 and vs["note"].item().startswith("not available")
    assert "not available" in (out / "rl_groups.md").read_text()
    acc = _csv(out, "accuracy")
    assert len(acc) == 4 * 2


def test_tables_are_deterministic(data, inputs):
    specs = [ExperimentSpec.from_dict(e) for e in inputs["experiments"]]

    def tables():
        return [vs_legacy_table(data, 100, 3).data, accuracy_table(data, 100, 3).data] + [
            experiment_table(data, e, 100, 3).data for e in specs
        ]

    a, b = tables(), tables()
    for x, y in zip(a, b):
        pd.testing.assert_frame_equal(x, y)


def test_bad_inputs_fail_with_one_line_naming_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    write_jsonl(
        p,
        "icdrl.eval",
        [{"method": "v2", "cell": None, "seed": 0, "k": 1, "query_id": 1, "acc": 1.5}],
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1: field 'acc'"):
        load_eval([p])
    write_jsonl(
        p,
        "icdrl.eval",
        [{"method": "v3", "cell": "c", "seed": 0, "k": 1, "query_id": 1, "acc": 1.0}],
    )
    with pytest.raises(ValueError, match="missing field 'spec'"):
        load_eval([p])
    spec = {
        "slug": "legacy-a1-b0-rank",
        "mode": "legacy",
        "knobs": {"alpha": 1, "beta": 0},
        "use_rank": True,
    }
    write_jsonl(
        p,
        "icdrl.eval",
        [{"method": "v3", "cell": "c", "seed": 0, "k": 1, "query_id": 1, "acc": 1.0, "spec": spec}],
    )
    with pytest.raises(
        ValueError, match="field 'cell' is 'c' but its spec says 'legacy-a1-b0-rank'"
    ):
        load_eval([p])
    rec = {"method": "v2", "cell": None, "seed": 0, "k": 1, "query_id": 1, "acc": 1.0}
    write_jsonl(p, "icdrl.eval", [rec, rec])
    with pytest.raises(ValueError, match="duplicate record"):
        load_eval([p])
    r = tmp_path / "r.jsonl"
    write_jsonl(
        r,
        "icdrl.rewards",
        [
            {
                "anchor_id": 1,
                "rewards": [1.0, 2.0],
                "hard": [1],
                "soft": [],
                "info": [],
                "missing": 0,
            }
        ],
    )
    with pytest.raises(ValueError, match="equal length"):
        load_rewards({"x": r})
    with pytest.raises(ValueError, match="unknown keys"):
        build_report([p], None, None, None, {"n_boot": 10, "alpha": 1}, tmp_path / "o")


def test_labelled_paths_from_a_plain_list(tmp_path):
    got = labelled_paths(
        [tmp_path / "a" / "s0" / "metrics.csv", tmp_path / "b" / "s0" / "metrics.csv"], "m"
    )
    assert list(got) == ["a/s0/metrics", "b/s0/metrics"]
    assert labelled_paths({"x": "p"}, "m") == {"x": "p"}


def test_training_runs_are_grouped_by_mode_from_their_labels():
    from icdrl.report.plots import _split_run

    assert _split_run("v2 seed0") == ("v2", "seed0")
    assert _split_run("v3 hard_plus_soft_v2-hw1-sw1-rank seed1") == (
        "hard_plus_soft_v2",
        "hw1-sw1-rank seed1",
    )
    assert _split_run("v3 hard_plus_soft-hw2-sw0.5-zscore seed0")[0] == "hard_plus_soft"
    assert _split_run("legacy-a1-b0-rank/seed0/metrics") == ("legacy", "a1-b0-rank/seed0/metrics")
    assert _split_run("hybridish-run") == ("other", "hybridish-run")


def test_training_curves_separate_rce_and_grpo_loss_and_mark_identical_runs(inputs):
    from icdrl.report.inputs import load_metrics
    from icdrl.report.plots import identical_runs, training_curves_plot

    metrics = load_metrics(inputs["metrics_paths"])
    label = next(lab for lab in metrics if lab.startswith("v3 hard_plus_soft-hw1-sw1-rank"))
    twin_label = "v3 hard_plus_soft-hw2-sw1-rank seed9"
    twin = metrics[label].copy()
    twin["val_reward"] = twin["val_reward"] * 1.5  # the same training on a reward of another scale
    metrics = dict(metrics) | {twin_label: twin}
    assert identical_runs(metrics) == {twin_label: label}
    fig = training_curves_plot(metrics)
    ylabels = {ax.get_ylabel() for ax in fig.axes}
    assert {"v2 / RCE loss", "GRPO loss"} <= ylabels
    grpo_row = [ax for ax in fig.axes if ax.get_ylabel() == "GRPO loss"][0]
    rce_row = [ax for ax in fig.axes if ax.get_ylabel() == "v2 / RCE loss"][0]
    # each loss on its own axis: GRPO's range is not stretched by RCE's (about 2 here)
    assert grpo_row.get_ylim()[1] < 0.5 < rce_row.get_ylim()[1]
    legend_texts = [
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
    ]
    assert any(t.endswith("(identical)") and "hw2-sw1-rank seed9" in t for t in legend_texts)
    hollow = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert hollow and all(ln.get_linestyle() == "None" for ln in hollow)
