"""icdrl.grid and icdrl.layout: canonical spelling, cell merging, slugs and the results layout."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icdrl.config import load_config
from icdrl.grid import (
    Cell,
    canonical_json,
    cells,
    content,
    effective_v3,
    experiment,
    experiment_cells,
    experiments,
    fmt_float,
    parse_reward_slug,
    reward_spec,
    reward_specs,
    seeds,
    short_hash,
    train_overrides,
)
from icdrl.layout import Layout, parse_baseline
from icdrl.rewards import KNOBS, MODES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_cfg():
    return load_config(ROOT / "config" / "config.yaml")


@pytest.fixture(scope="module")
def seed_cfg():
    return load_config(ROOT / "config" / "okvqa_qwen2.5vl3b.yaml")


# ----------------------------------------------------------------------------- spelling


@pytest.mark.parametrize(
    "x, text",
    [
        (1.0, "1"),
        (1, "1"),
        (0.5, "0.5"),
        (2.0, "2"),
        (0.0, "0"),
        (-0.0, "0"),
        (1e-05, "0.00001"),
        (-2.5, "-2.5"),
        (100.0, "100"),
        (0.1, "0.1"),
        (1e20, "100000000000000000000"),
    ],
)
def test_fmt_float_canonical(x, text):
    assert fmt_float(x) == text


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, "1"])
def test_fmt_float_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        fmt_float(bad)


@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
def test_fmt_float_round_trips(x):
    text = fmt_float(x)
    assert float(text) == x or (x == 0 and text == "0")
    assert "e" not in text.lower() and not text.endswith(".0")


def test_hash_ignores_int_float_spelling_and_key_order():
    assert short_hash({"lr": 1, "b": [1.0, 2]}) == short_hash({"b": [1, 2.0], "lr": 1.0})
    assert short_hash({"lr": 1}) != short_hash({"lr": 1.5})
    assert canonical_json({"b": 0.5, "a": True}) == '{"a":true,"b":0.5}'


def test_runtime_keys_left_out_of_section_hashes():
    a = {"epochs": 10, "device": "cpu", "save_epochs": False}
    b = {"epochs": 10, "device": "cuda", "save_epochs": True}
    assert content(a, "train.v2") == content(b, "train.v2") == {"epochs": 10}
    # batch_size trains the embedded LVLM (not a runtime knob there); threads is one
    e = content({"batch_size": 8, "threads": 2, "check": {"n_test": 3}}, "embedded_lvlm")
    assert e == {"batch_size": 8}


# ----------------------------------------------------------------------------- reward specs


def test_reward_spec_drops_ignored_knobs_and_fills_defaults():
    spec = reward_spec("legacy", alpha=1, beta=0, hard_weight=5, soft_weight=7, info_scale=3)
    assert spec.knob("hard_weight") is None and spec.knob("info_scale") is None
    assert spec.slug == "legacy-a1-b0"
    assert (
        reward_spec("hard_plus_soft", hard_weight=2, soft_weight=0.5).slug
        == "hard_plus_soft-hw2-sw0.5"
    )
    # knobs left out take the registry's defaults
    assert reward_spec("hybrid").slug == "hybrid-ha0.5-is10"
    assert reward_spec("adaptive", hard_weight=9, hybrid_alpha=0.1).slug == "adaptive-is10"
    assert reward_spec("hard_plus_soft", hard_weight=1.0) == reward_spec("hard_plus_soft")


def test_reward_spec_rejects_bad_knobs():
    with pytest.raises(ValueError, match="finite"):
        reward_spec("hard_plus_soft", hard_weight=math.nan, soft_weight=1)
    with pytest.raises(ValueError, match=r"hybrid_alpha must be in \[0, 1\]"):
        reward_spec("hybrid", hybrid_alpha=2.0)
    with pytest.raises(ValueError, match="unknown reward knob"):
        reward_spec("legacy", gamma=1.0)


def test_hybrid_no_longer_reads_the_weights():
    # docs/science.md §6: hybrid's share is hybrid_alpha; hard_weight 1 and 2 are the same cell
    assert reward_spec("hybrid", hard_weight=2.0) == reward_spec("hybrid", hard_weight=1.0)
    assert reward_spec("hybrid", hybrid_alpha=0.25) != reward_spec("hybrid", hybrid_alpha=0.75)


_knob = st.floats(min_value=-100, max_value=100, allow_nan=False).map(lambda x: round(x, 4))
_unit = st.floats(min_value=0, max_value=1, allow_nan=False).map(lambda x: round(x, 4))


@given(
    st.sampled_from(MODES),
    st.fixed_dictionaries({k: (_unit if k == "hybrid_alpha" else _knob) for k in KNOBS}),
    st.booleans(),
)
def test_slug_round_trip(mode, knobs, use_rank):
    spec = reward_spec(mode, **knobs)
    assert parse_reward_slug(spec.slug) == spec
    cell = Cell(spec, use_rank)
    assert Cell.from_dict(cell.as_dict()) == cell
    assert cell.slug == f"{spec.slug}-{'rank' if use_rank else 'zscore'}"


@pytest.mark.parametrize(
    "slug",
    [
        "legacy",
        "hard_plus_soft-hw1",
        "hard_plus_soft-sw1-hw1",
        "legacy-a1-b0-hw1",
        "hybrid-hw2-is10",
        "hard_plus_soft-hw1.0-sw1",
        "nonsense-hw1",
        "hard_plus_soft-hw1-hw1-sw1",
        "hybrid-ha2-is10",
    ],
)
def test_parse_reward_slug_rejects_non_canonical(slug):
    with pytest.raises(ValueError, match="slug"):
        parse_reward_slug(slug)


def test_parse_baseline():
    assert parse_baseline("random-r3") == ("random", 3)
    assert parse_baseline("zero_shot") == ("zero_shot", None)
    with pytest.raises(ValueError):
        parse_baseline("v2")


# ----------------------------------------------------------------------------- training overrides


def test_train_overrides_keep_only_what_differs(default_cfg):
    base = default_cfg["train"]["v3"]
    assert train_overrides(base, {"kl_beta": base["kl_beta"]}) == ()
    assert train_overrides(base, {"kl_beta": 0, "clip_eps": 0.2}) == (("kl_beta", 0),)
    # gate_rce has nothing to gate at min_positive_ratio 0: one cell, not two
    assert train_overrides(base, {"gate_rce": True, "min_positive_ratio": 0}) == ()
    assert train_overrides(base, {"gate_rce": True, "min_positive_ratio": 0.2}) == (
        ("gate_rce", True),
        ("min_positive_ratio", 0.2),
    )
    # runtime keys never enter the effective settings
    assert "device" not in effective_v3(base) and "save_epochs" not in effective_v3(base)


def test_cell_slug_and_dict_carry_training_overrides():
    c = Cell(
        reward_spec("hard_plus_soft_v2"), False, (("gate_rce", True), ("min_positive_ratio", 0.2))
    )
    assert c.slug == "hard_plus_soft_v2-hw1-sw1-zscore[gate_rce=true,min_positive_ratio=0.2]"
    d = c.as_dict()
    assert d["train"] == {"gate_rce": True, "min_positive_ratio": 0.2} and d["knobs"] == {
        "hard_weight": 1.0,
        "soft_weight": 1.0,
    }
    assert Cell.from_dict(d) == c
    with pytest.raises(ValueError, match="does not match"):
        Cell.from_dict({**d, "slug": "other"})
    assert c.label() == "hard_plus_soft_v2 z-score hw=1 sw=1 gate_rce=true min_positive_ratio=0.2"


# ----------------------------------------------------------------------------- experiments


def test_default_config_experiments(default_cfg):
    exps = {e.name: e for e in experiments(default_cfg)}
    assert list(exps) == [
        "reward_modes",
        "use_rank",
        "hybrid_alpha",
        "conditional_grpo",
        "legacy_alpha_beta",
        "label_order",
    ]
    assert (
        exps["reward_modes"].contrast == "reward_modes"
        and exps["reward_modes"].reference == "legacy"
    )
    # hard_plus_soft is left out of the default (single-answer data: a multiple of hard_plus_soft_v2)
    assert {c.mode for c in exps["reward_modes"].cells()} == set(MODES) - {"hard_plus_soft"}
    # plan 4: (0, gate) and (0, no gate) are one cell; 0.2 with and without gating are two more
    plan4 = exps["conditional_grpo"]
    assert len(plan4.members) == 4 and len(plan4.cells()) == 3
    assert {c.train for c in plan4.cells()} == {
        (),
        (("min_positive_ratio", 0.2),),
        (("gate_rce", True), ("min_positive_ratio", 0.2)),
    }
    merged = cells(default_cfg)
    assert len(merged) == len(set(merged)) == 12
    # the reference cells are shared: hard_plus_soft_v2 (1, 1) z-score appears in four experiments, once
    shared = Cell(reward_spec("hard_plus_soft_v2"), False)
    assert sum(shared in e.cells() for e in exps.values()) == 4
    assert len(reward_specs(merged)) == 7


def test_seed_config_holds_every_plan(seed_cfg):
    per = experiment_cells(seed_cfg)
    assert set(per) == {
        "exp1_reward_modes",
        "exp2_use_rank",
        "exp3_weights",
        "plan2_hybrid_alpha",
        "plan4_conditional_grpo",
        "plan5_legacy_alpha_beta",
        "label_order",
    }
    assert [c.mode for c in per["exp1_reward_modes"]] == list(MODES)
    assert {c.use_rank for c in per["exp2_use_rank"]} == {True, False}
    assert {
        (c.reward.knob("hard_weight"), c.reward.knob("soft_weight")) for c in per["exp3_weights"]
    } == {(1, 1), (2, 1), (1, 0.5), (2, 0.5)}
    assert {c.reward.knob("hybrid_alpha") for c in per["plan2_hybrid_alpha"]} == {0.25, 0.5, 0.75}
    assert {c.reward.as_dict()["alpha"] for c in per["plan5_legacy_alpha_beta"]} == {0.0, 1.0}
    assert {dict(c.train).get("label_order", "prompt") for c in per["label_order"]} == {
        "prompt",
        "selection",
    }
    assert seeds(seed_cfg) == [0, 1, 2]


def _exp(cfg, block):
    return experiment("x", block, cfg)


def test_experiment_contrast_and_reference_are_checked(default_cfg):
    with pytest.raises(ValueError, match="contrast: required when 2 axes vary"):
        _exp(default_cfg, {"reward_modes": ["legacy", "hybrid"], "use_rank": [True, False]})
    with pytest.raises(ValueError, match="not one of its axes"):
        _exp(default_cfg, {"reward_modes": ["legacy", "hybrid"], "contrast": "kl_beta"})
    with pytest.raises(ValueError, match="reference: 'adaptive' is not a level"):
        _exp(default_cfg, {"reward_modes": ["legacy", "hybrid"], "reference": "adaptive"})
    with pytest.raises(ValueError, match="runtime setting"):
        _exp(default_cfg, {"reward_modes": ["legacy"], "train": {"device": ["cpu", "cuda"]}})
    e = _exp(default_cfg, {"reward_modes": ["hard_plus_soft"], "train": {"kl_beta": [0.1, 0]}})
    assert e.contrast == "kl_beta" and e.reference == 0.1  # the only varied axis; its first level
    assert [c.train for c in e.cells()] == [(), (("kl_beta", 0),)]


def test_an_experiment_over_one_weight_is_not_overwritten_by_the_grid_weights(default_cfg):
    cfg = copy.deepcopy(default_cfg)
    cfg["grid"]["weights"] = [[1, 1], [2, 1]]  # a pair axis the block would otherwise inherit
    e = _exp(cfg, {"reward_modes": ["hard_plus_soft"], "hard_weight": [1, 3]})
    assert e.contrast == "hard_weight" and "weights" not in dict(e.axes)
    got = [dict(c.reward.knobs)["hard_weight"] for c in e.cells()]
    assert got == [1.0, 3.0]
    # the grid's pairs still apply to an experiment that sets neither component
    e = _exp(
        cfg, {"reward_modes": ["hard_plus_soft"], "use_rank": [True, False], "contrast": "use_rank"}
    )
    assert dict(e.axes)["weights"] == ((1.0, 1.0), (2.0, 1.0))


def test_env_override_restricts_experiments(default_cfg):
    from icdrl.config import apply_env_overrides, validate

    cfg = validate(apply_env_overrides(copy.deepcopy(default_cfg), {}, {"reward_mode": "hybrid"}))
    assert {c.mode for c in cells(cfg)} == {"hybrid"}


def test_empty_grid_is_an_error(default_cfg):
    cfg = copy.deepcopy(default_cfg)
    cfg["grid"]["experiments"] = {}
    with pytest.raises(ValueError, match="grid"):
        cells(cfg)


# ----------------------------------------------------------------------------- layout


def _paths(cfg) -> dict[str, str]:
    L = Layout(cfg)
    out = {k: v for k, v in vars(L).items() if isinstance(v, str)}
    out["all_rewards"] = " ".join(L.all_rewards())
    out["all_eval"] = " ".join(L.all_eval())
    out["all_v2"] = " ".join(L.all_v2(L.v2_ckpt))
    out["all_v3"] = " ".join(L.all_v3(L.v3_ckpt))
    out["val_v3"] = " ".join(L.v3_evals("val"))
    return out


def _changed(cfg, edit) -> set[str]:
    new = copy.deepcopy(cfg)
    edit(new)
    a, b = _paths(cfg), _paths(new)
    return {k for k in a if a[k] != b[k]}


def test_paths_carry_config_segments(default_cfg):
    L = Layout(default_cfg)
    assert L.root == "results/easyvqa"
    assert "/B5-D2-first-r5-m5-s0/" in L.candidates
    assert "{shard}-of-2" in L.candidates_shard and "of-2" not in L.candidates
    assert L.rewards.endswith("rewards/{reward}.jsonl")
    assert "{v3}/{reward}/{adv}/seed{seed}" in L.v3_ckpt and "{v2}/seed{seed}" in L.v2_ckpt
    assert L.eval_baseline.endswith("test-n200-k1.2.3.4-mnt10-official/{method}.jsonl")
    assert "/scored-t1-mnt10-official/" in L.scored
    assert L.val_v3.endswith("val-n50-k1.2.3.4-mnt10-official.jsonl") and L.pools_val.endswith(
        "val-n50.jsonl"
    )
    assert "random-r0" in " ".join(L.all_eval()) and L.per_shot.format(seed=0) in L.all_eval()
    # training overrides move only their cells' {v3} folder; the label order also its v2
    tags = {tc.cell.slug: tc for tc in L.trained_cells()}
    base = tags["hard_plus_soft_v2-hw1-sw1-zscore"]
    assert tags["hard_plus_soft_v2-hw1-sw1-zscore[min_positive_ratio=0.2]"].v3_tag != base.v3_tag
    assert (
        tags["hard_plus_soft_v2-hw1-sw1-zscore[min_positive_ratio=0.2]"].v2_tag
        == base.v2_tag
        == L.v2_tag
    )
    sel = tags["hard_plus_soft_v2-hw1-sw1-zscore[label_order=selection]"]
    assert sel.v2_tag != L.v2_tag and L.v2_config(sel.v2_tag)["label_order"] == "selection"
    assert L.trained_cell(base.v3_tag, base.cell.reward.slug, "zscore") == base
    with pytest.raises(KeyError, match="no grid cell"):
        L.trained_cell("v3-00000000", base.cell.reward.slug, "zscore")


def test_reward_weight_changes_only_reward_training_eval_paths(default_cfg):
    def edit(c):
        c["grid"]["weights"] = [[3, 1]]  # the hard_plus_soft_v2 cells of every experiment

    assert _changed(default_cfg, edit) == {
        "all_rewards",
        "all_eval",
        "all_v3",
        "val_v3",
        "per_shot",
        "report_dir",
    }


def test_training_axis_moves_only_training_eval_and_report(default_cfg):
    def edit(c):
        c["grid"]["experiments"]["kl"] = {
            "reward_modes": ["hard_plus_soft_v2"],
            "train": {"kl_beta": [0.1, 0]},
        }

    assert _changed(default_cfg, edit) == {"all_eval", "all_v3", "val_v3", "per_shot", "report_dir"}


def test_v3_settings_do_not_move_lvlm_or_v2_paths(default_cfg):
    changed = _changed(default_cfg, lambda c: c["train"]["v3"].__setitem__("grpo_epochs", 3))
    assert changed == {"all_v3", "all_eval", "val_v3", "per_shot", "report_dir"}


def test_v2_settings_move_v2_and_v3(default_cfg):
    changed = _changed(default_cfg, lambda c: c["train"]["v2"].__setitem__("epochs", 3))
    assert changed == {"v2_tag", "all_v2", "all_v3", "all_eval", "val_v3", "per_shot", "report_dir"}


def test_runtime_knobs_move_nothing(default_cfg):
    def edit(c):
        c["model"]["device"] = "cuda"
        c["model"]["batch_size"] = 3
        c["train"]["v2"]["device"] = "cuda"
        c["train"]["v3"]["save_epochs"] = True
        c["embedded_lvlm"]["threads"] = 7
        c["embeddings"]["batch_size"] = 5
        c["report"]["n_boot"] = 10

    assert _changed(default_cfg, edit) == set()


def test_shard_count_only_in_shard_file_names(default_cfg):
    changed = _changed(default_cfg, lambda c: c["candidates"].__setitem__("shards", 5))
    assert changed == {"candidates_shard", "scored_shard"}


def test_scoring_threshold_keeps_candidates(default_cfg):
    changed = _changed(default_cfg, lambda c: c["scoring"].__setitem__("correct_threshold", 0.5))
    assert (
        "candidates" not in changed and "all_v2" not in changed and "eval_baseline" not in changed
    )
    assert {"scored", "rewards", "all_v3", "all_eval"} <= changed


def test_scoring_metric_moves_scored_and_every_evaluation(default_cfg):
    # the metric decides vqa_acc_score (scored) and every evaluation record's acc (docs/science.md §5)
    changed = _changed(default_cfg, lambda c: c["scoring"].__setitem__("metric", "normalised"))
    assert "candidates" not in changed and "all_v2" not in changed and "pools_test" not in changed
    assert {
        "scored",
        "rewards",
        "all_v3",
        "eval_v3",
        "eval_v2",
        "eval_baseline",
        "all_eval",
        "val_v3",
    } <= changed
    assert "-normalised" in Layout(_with(default_cfg, "scoring", "metric", "normalised")).eval_v2


def _with(cfg, section, key, value):
    new = copy.deepcopy(cfg)
    new[section][key] = value
    return new


def test_embedded_lvlm_knobs_move_everything_that_used_the_model(default_cfg):
    changed = _changed(default_cfg, lambda c: c["embedded_lvlm"].__setitem__("steps", 5))
    assert {"lvlm_model", "emb", "candidates", "eval_baseline"} <= changed
    # the in-context check's own knobs do not retrain the model
    assert (
        _changed(default_cfg, lambda c: c["embedded_lvlm"]["check"].__setitem__("n_test", 7))
        == set()
    )


def test_clip_embeddings_do_not_depend_on_the_model(seed_cfg):
    changed = _changed(seed_cfg, lambda c: c["model"].__setitem__("name", "other-model"))
    assert "emb" not in changed and "pools_anchors" not in changed
    assert {"candidates", "eval_baseline", "report_dir"} <= changed


def test_restricted_run_gets_its_own_report_folder(default_cfg):
    from icdrl.config import apply_env_overrides, validate

    restricted = validate(
        apply_env_overrides(copy.deepcopy(default_cfg), {}, {"reward_mode": "hybrid"})
    )
    assert Layout(restricted).report_dir != Layout(default_cfg).report_dir
    assert Layout(copy.deepcopy(default_cfg)).report_dir == Layout(default_cfg).report_dir


# ----------------------------------------------------------------------------- RICES, ablations, exclusions


def test_rices_copy_answers_and_ablation_paths(default_cfg):
    L = Layout(default_cfg)
    folder = L.eval_baseline.format(method="X")[: -len("X.jsonl")]
    assert L.eval_rices == {
        m: f"{folder}{m}.jsonl" for m in ("rices_image", "rices_text", "rices", "copy")
    }
    assert L.answers == "results/easyvqa/answers/train.json"
    # the default ablates v2 and per_shot (validation queries exist), at the first seed, beside their files
    assert L.ablate == ["v2", "per_shot"]
    v2, ps = L.eval_v2.format(v2=L.v2_tag, seed=0), L.per_shot.format(seed=0)
    assert L.ablation_bases() == [v2, ps]
    assert L.ablation_outputs(v2) == {
        "shuffled": v2[:-6] + ".shuffled-r0.jsonl",
        "no_images": v2[:-6] + ".no_images.jsonl",
    }
    evals = L.all_eval()
    assert set(L.eval_rices.values()) <= set(evals) and L.ablation_outputs(ps)["no_images"] in evals
    assert len(evals) == len(set(evals))
    # null: v2, plus per_shot only with validation queries; [] = none
    cfg = copy.deepcopy(default_cfg)
    cfg["evaluation"]["ablate"] = None
    assert Layout(cfg).ablate == ["v2", "per_shot"]
    cfg["pools"]["n_val"] = 0
    assert Layout(cfg).ablate == ["v2"]
    cfg["evaluation"]["ablate"] = []
    assert Layout(cfg).ablation_bases() == []
    cfg["evaluation"]["ablate"], cfg["evaluation"]["rices"] = (
        ["rices_text", "random"],
        ["rices_text"],
    )
    L2 = Layout(cfg)
    assert L2.ablation_bases() == [
        L2.eval_rices["rices_text"],
        L2.eval_baseline.format(method="random-r0"),
    ]
    assert set(L2.eval_rices) == {"rices_text", "copy"}


def test_ablation_config_errors(tmp_path):
    import yaml

    from icdrl.config import ConfigError

    base = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    for edit, match in (
        (
            lambda c: (
                c["pools"].__setitem__("n_val", 0),
                c["evaluation"].__setitem__("ablate", ["per_shot"]),
            ),
            "evaluation.ablate: per_shot needs validation queries",
        ),
        (
            lambda c: c["evaluation"].update(rices=["rices"], ablate=["rices_image"]),
            "evaluation.ablate: rices_image is not evaluated",
        ),
        (lambda c: c["evaluation"].__setitem__("ablate", ["copy"]), "evaluation.ablate"),
        (lambda c: c["evaluation"].__setitem__("rices", ["rices", "rices"]), "evaluation.rices"),
        (lambda c: c["pools"].__setitem__("exclude_same_image", "yes"), "pools.exclude_same_image"),
    ):
        cfg = copy.deepcopy(base)
        edit(cfg)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError, match=match):
            load_config(tmp_path / "c.yaml")


def test_exclude_same_image_moves_pools_and_everything_after(default_cfg):
    changed = _changed(default_cfg, lambda c: c["pools"].__setitem__("exclude_same_image", True))
    assert {
        "pools",
        "pools_test",
        "candidates",
        "eval_baseline",
        "all_eval",
        "report_dir",
    } <= changed
    assert "emb" not in changed and "answers" not in changed and "lvlm_model" not in changed
    assert Layout(
        {**default_cfg, "pools": {**default_cfg["pools"], "exclude_same_image": True}}
    ).pool_tag.endswith("-xi")
    assert not Layout(default_cfg).pool_tag.endswith("-xi")  # the default's paths are unchanged
