"""icdrl.grid: canonical spelling, cell merging, slugs and the results layout."""

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
    Layout,
    canonical_json,
    cells,
    content,
    experiment_cells,
    fmt_float,
    parse_baseline,
    parse_cell,
    parse_reward_slug,
    reward_spec,
    reward_specs,
    seeds,
    short_hash,
)
from icdrl.rewards import KNOBS, MODES, knobs_used

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
    [(1.0, "1"), (1, "1"), (0.5, "0.5"), (2.0, "2"), (0.0, "0"), (-0.0, "0"), (1e-05, "0.00001"),
     (-2.5, "-2.5"), (100.0, "100"), (0.1, "0.1"), (1e20, "100000000000000000000")],
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


# ----------------------------------------------------------------------------- cells


def test_reward_spec_drops_ignored_knobs():
    spec = reward_spec("legacy", alpha=1, beta=0, hard_weight=5, soft_weight=7, info_scale=3)
    assert spec.hard_weight is None and spec.soft_weight is None and spec.info_scale is None
    assert spec.slug == "legacy-a1-b0"
    assert reward_spec("hard_plus_soft", hard_weight=2, soft_weight=0.5).slug == "hard_plus_soft-hw2-sw0.5"


def test_reward_spec_requires_used_knobs():
    with pytest.raises(ValueError, match="soft_weight"):
        reward_spec("hard_plus_soft", hard_weight=1.0)
    with pytest.raises(ValueError, match="finite"):
        reward_spec("hard_plus_soft", hard_weight=math.nan, soft_weight=1)


def test_hybrid_hard_weight_is_clipped_like_the_formula():
    # SPEC §6: alpha = clip(hard_weight, 0, 1); hw=2 and hw=1 give the same rewards
    assert reward_spec("hybrid", hard_weight=2.0, info_scale=10) == reward_spec("hybrid", hard_weight=1, info_scale=10)
    assert reward_spec("hybrid", hard_weight=-1.0, info_scale=10).hard_weight == 0.0
    assert reward_spec("hybrid", hard_weight=0.25, info_scale=10).slug == "hybrid-hw0.25-is10"


_knob = st.floats(min_value=-100, max_value=100, allow_nan=False).map(lambda x: round(x, 4))


@given(st.sampled_from(MODES), st.fixed_dictionaries({k: _knob for k in KNOBS}), st.booleans())
def test_slug_round_trip(mode, knobs, use_rank):
    spec = reward_spec(mode, **{k: v for k, v in knobs.items() if k in knobs_used(mode)})
    assert parse_reward_slug(spec.slug) == spec
    cell = Cell(spec.mode, use_rank, spec.hard_weight, spec.soft_weight, spec.alpha, spec.beta, spec.info_scale)
    assert parse_cell(spec.slug, cell.adv) == cell
    assert cell.slug == f"{spec.slug}-{'rank' if use_rank else 'zscore'}"


@pytest.mark.parametrize(
    "slug",
    ["legacy", "hard_plus_soft-hw1", "hard_plus_soft-sw1-hw1", "legacy-a1-b0-hw1", "hybrid-hw2-is10",
     "hard_plus_soft-hw1.0-sw1", "nonsense-hw1", "hard_plus_soft-hw1-hw1-sw1"],
)
def test_parse_reward_slug_rejects_non_canonical(slug):
    with pytest.raises(ValueError, match="slug"):
        parse_reward_slug(slug)


def test_parse_baseline():
    assert parse_baseline("random-r3") == ("random", 3)
    assert parse_baseline("zero_shot") == ("zero_shot", None)
    with pytest.raises(ValueError):
        parse_baseline("v2")


def test_default_grid_merges_cells_modes_ignore(default_cfg):
    got = cells(default_cfg)
    # 4 modes x 2 use_rank x 2 weight pairs = 16 requested; legacy ignores weights (2 -> 1),
    # hybrid clips hard_weight 1 and 2 to 1 and ignores soft_weight (2 -> 1)
    assert len(got) == 12
    assert len(set(got)) == len(got)
    by_mode = {m: [c for c in got if c.mode == m] for m in MODES}
    assert {len(v) for v in by_mode.values()} == {2, 4}
    assert len(by_mode["legacy"]) == len(by_mode["hybrid"]) == 2
    for c in got:
        for k in KNOBS:
            assert (getattr(c, k) is None) == (k not in knobs_used(c.mode))
    assert len(reward_specs(got)) == 6  # 1 legacy + 2 hps + 2 hps_v2 + 1 hybrid


def test_seed_experiments(seed_cfg):
    per = experiment_cells(seed_cfg)
    assert set(per) == {"exp1_reward_modes", "exp2_use_rank", "exp3_weights"}
    assert [c.mode for c in per["exp1_reward_modes"]] == list(MODES)
    assert {c.use_rank for c in per["exp2_use_rank"]} == {True, False}
    assert {(c.hard_weight, c.soft_weight) for c in per["exp3_weights"]} == {(1, 1), (2, 1), (1, 0.5), (2, 0.5)}
    merged = cells(seed_cfg)
    # exp2's z-score cell is exp1's hard_plus_soft_v2 cell; exp3's (1, 1) is exp1's hard_plus_soft
    assert len(merged) == 4 + 1 + 3
    assert seeds(seed_cfg) == [0, 1, 2]


def test_empty_grid_is_an_error(default_cfg):
    cfg = copy.deepcopy(default_cfg)
    cfg["grid"]["reward_modes"] = []
    with pytest.raises(ValueError, match="grid"):
        cells(cfg)


# ----------------------------------------------------------------------------- layout


def _paths(cfg) -> dict[str, str]:
    L = Layout(cfg)
    out = {k: v for k, v in vars(L).items() if isinstance(v, str)}
    out["all_rewards"] = " ".join(L.all_rewards())
    out["all_eval"] = " ".join(L.all_eval())
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
    assert "{reward}/{adv}/seed{seed}" in L.v3_ckpt
    assert L.eval_baseline.endswith("eval-n200-k1.2.3.4-mnt10-official/{method}.jsonl")
    assert "/scored-t1-mnt10-official/" in L.scored
    assert "random-r0" in " ".join(L.all_eval())


def test_reward_weight_changes_only_reward_training_eval_paths(default_cfg):
    changed = _changed(default_cfg, lambda c: c["grid"].__setitem__("weights", [[1, 1], [3, 1]]))
    assert changed == {"all_rewards", "all_eval"}  # patterns stay; only the expanded cells move


def test_v3_settings_do_not_move_lvlm_or_v2_paths(default_cfg):
    changed = _changed(default_cfg, lambda c: c["train"]["v3"].__setitem__("grpo_epochs", 3))
    assert changed == {"v3_tag", "v3_ckpt", "v3_metrics", "eval_v3", "all_eval"}


def test_v2_settings_move_v2_and_v3(default_cfg):
    changed = _changed(default_cfg, lambda c: c["train"]["v2"].__setitem__("epochs", 3))
    assert changed == {"v2_tag", "v2_ckpt", "v2_metrics", "eval_v2", "v3_tag", "v3_ckpt", "v3_metrics",
                       "eval_v3", "all_eval"}


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
    assert "candidates" not in changed and "v2_ckpt" not in changed and "eval_baseline" not in changed
    assert {"scored", "rewards", "v3_ckpt", "eval_v3"} <= changed


def test_scoring_metric_moves_scored_and_every_evaluation(default_cfg):
    # the metric decides vqa_acc_score (scored) and every evaluation record's acc (SPEC §5)
    changed = _changed(default_cfg, lambda c: c["scoring"].__setitem__("metric", "normalised"))
    assert "candidates" not in changed and "v2_ckpt" not in changed and "pools_test" not in changed
    assert {"scored", "rewards", "v3_ckpt", "eval_v3", "eval_v2", "eval_baseline", "all_eval"} <= changed
    assert "-normalised" in Layout(_with(default_cfg, "scoring", "metric", "normalised")).eval_v2


def _with(cfg, section, key, value):
    new = copy.deepcopy(cfg)
    new[section][key] = value
    return new


def test_embedded_lvlm_knobs_move_everything_that_used_the_model(default_cfg):
    changed = _changed(default_cfg, lambda c: c["embedded_lvlm"].__setitem__("steps", 5))
    assert {"lvlm_model", "emb", "candidates", "eval_baseline"} <= changed
    # the in-context check's own knobs do not retrain the model
    assert _changed(default_cfg, lambda c: c["embedded_lvlm"]["check"].__setitem__("n_test", 7)) == set()


def test_clip_embeddings_do_not_depend_on_the_model(seed_cfg):
    changed = _changed(seed_cfg, lambda c: c["model"].__setitem__("name", "other-model"))
    assert "emb" not in changed and "pools_anchors" not in changed
    assert {"candidates", "eval_baseline", "report_dir"} <= changed
