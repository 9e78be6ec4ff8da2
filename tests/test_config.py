"""icdrl.config: schema validation (one line naming the key), defaults, env overrides, input checks."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from icdrl.config import (
    ENV_VARS,
    ConfigError,
    apply_env_overrides,
    check_inputs,
    env_overrides,
    load_config,
    load_schema,
    validate,
)
from icdrl.grid import cells, experiments
from icdrl.rewards import MODES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture()
def default_raw():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cells(cfg)


def test_three_configs_shipped():
    assert {p.name for p in CONFIGS} >= {"config.yaml", "test.yaml", "okvqa_qwen2.5vl3b.yaml"}


def test_defaults_filled(schema):
    cfg = validate(
        {"dataset": {"name": "easyvqa"}, "model": {"name": "embedded", "kind": "embedded"}}, schema
    )
    assert cfg["pools"]["size"] == 64 and cfg["candidates"]["beam_width"] == 5
    assert cfg["candidates"]["depth"] == 2 and cfg["scoring"]["correct_threshold"] == 1.0
    assert cfg["train"]["v3"]["clip_eps"] == 0.2 and cfg["embedded_lvlm"]["check"]["n_test"] == 500
    assert cfg["grid"]["use_rank"] == [True, False]
    assert cfg["dataset"].get("train") is None  # split sections get no keys the loader would reject


def _error(cfg, schema) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg, schema)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["pools"].__setitem__("sizee", 3), "pools.sizee"),
        (lambda c: c.__setitem__("poolz", {}), "poolz"),
        (lambda c: c["pools"].__setitem__("size", -1), "pools.size"),
        (lambda c: c["candidates"].__setitem__("depth", 9), "candidates.depth"),
        (lambda c: c["candidates"].__setitem__("insert", "middle"), "candidates.insert"),
        (
            lambda c: c["grid"].__setitem__("reward_modes", ["legacy", "bogus"]),
            "grid.reward_modes[1]",
        ),
        (lambda c: c["grid"].__setitem__("weights", [[1, 1], [2]]), "grid.weights[1]"),
        (lambda c: c["train"]["v3"].__setitem__("clip_epsilon", 0.2), "train.v3.clip_epsilon"),
        (lambda c: c["train"]["v2"].__setitem__("epochs", "ten"), "train.v2.epochs"),
        (lambda c: c["model"].__setitem__("kind", "remote"), "model.kind"),
        (lambda c: c["embedded_lvlm"].__setitem__("stepz", 3), "embedded_lvlm.stepz"),
        (
            lambda c: c["dataset"].__setitem__("train", {"questionz": "x"}),
            "dataset.train.questionz",
        ),
        (
            lambda c: c["model"].__setitem__("system_prompt", "Here are four examples."),
            "model.system_prompt",
        ),
        (lambda c: c["candidates"].__setitem__("shards", 10_000), "candidates.shards"),
        (lambda c: c["evaluation"].__setitem__("shots", [1, 99]), "evaluation.shots"),
        (lambda c: c["embeddings"].__setitem__("encoder", "clip"), "embeddings.clip_path"),
    ],
)
def test_invalid_config_names_the_key(default_raw, schema, edit, key):
    edit(default_raw)
    msg = _error(default_raw, schema)
    assert msg.startswith(f"config key {key}:"), msg


def test_hf_model_needs_a_path(default_raw, schema):
    default_raw["model"] = {"name": "qwen", "kind": "hf"}
    assert _error(default_raw, schema).startswith("config key model.path:")


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


# ----------------------------------------------------------------------------- schema vs library


def _props(schema, *path):
    node = schema["properties"]
    for p in path:
        node = node[p]["properties"] if "properties" in node[p] else node[p]
    return node


def _dataclass_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
            out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
    return out


@pytest.mark.parametrize(
    "module, cls, path",
    [
        ("icdrl.train", "V2Config", ("train", "v2")),
        ("icdrl.train", "V3Config", ("train", "v3")),
        ("icdrl.lvlm.embedded", "EmbeddedConfig", ("embedded_lvlm",)),
        ("icdrl.lvlm.embedded", "CheckConfig", ("embedded_lvlm", "check")),
        ("icdrl.beam", "BeamConfig", ("candidates",)),
    ],
)
def test_schema_matches_library_config_classes(schema, module, cls, path):
    """Every knob of the library's config dataclasses is in the schema with the same default,
    so the path hashes (which hash the filled-in section) see explicit and implicit defaults alike."""
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    props = _props(schema, *path)
    want = _dataclass_defaults(klass)
    workflow_only = {"shards"} if cls == "BeamConfig" else set()
    assert set(props) - workflow_only == set(want)
    filled = validate(
        {"dataset": {"name": "easyvqa"}, "model": {"name": "e", "kind": "embedded"}}, schema
    )
    node = filled
    for p in path:
        node = node[p]
    assert {k: node[k] for k in want} == want


def test_model_schema_matches_backend_defaults(schema):
    from icdrl.lvlm import MODEL_DEFAULTS

    props = _props(schema, "model")
    assert set(props) == set(MODEL_DEFAULTS)
    for k, v in MODEL_DEFAULTS.items():
        if k not in ("name", "kind"):
            assert props[k].get("default") == v, k


# ----------------------------------------------------------------------------- env overrides


def test_env_overrides():
    env = {
        "REWARD_MODE": "legacy",
        "HARD_WEIGHT": "2",
        "SOFT_WEIGHT": "0.5",
        "REWARD_ALPHA": "0.0",
        "REWARD_BETA": "1.0",
        "USE_RANK_ADVANTAGE": "False",
        "UNRELATED": "x",
    }
    assert env_overrides(env) == {
        "reward_mode": "legacy",
        "hard_weight": 2.0,
        "soft_weight": 0.5,
        "alpha": 0.0,
        "beta": 1.0,
        "use_rank": False,
    }
    assert env_overrides({"USE_RANK_ADVANTAGE": "1", "HARD_WEIGHT": ""}) == {"use_rank": True}
    assert env_overrides({}) == {}
    for env, var in [
        ({"USE_RANK_ADVANTAGE": "maybe"}, "USE_RANK_ADVANTAGE"),
        ({"HARD_WEIGHT": "two"}, "HARD_WEIGHT"),
        ({"REWARD_MODE": "plan4"}, "REWARD_MODE"),
        ({"REWARD_BETA": "nan"}, "REWARD_BETA"),
    ]:
        with pytest.raises(ValueError, match=var):
            env_overrides(env)


def test_config_grid_and_layout_import_no_torch():
    """The Snakefile imports these at parse time (every dry run): torch must stay out."""
    import subprocess
    import sys

    code = "import sys, icdrl.config, icdrl.grid, icdrl.layout; sys.exit(1 if 'torch' in sys.modules else 0)"
    env_overrides({"REWARD_MODE": "hybrid"})  # the parsing lives here, not in the trainer
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_no_env_vars_no_change(default_raw, schema):
    cfg = validate(default_raw, schema)
    assert apply_env_overrides(cfg, {}) is cfg


def test_reward_mode_env_restricts_the_grid(schema):
    cfg = load_config(ROOT / "config" / "config.yaml")
    new = validate(apply_env_overrides(cfg, {"REWARD_MODE": "hybrid"}), schema)
    got = cells(new)
    assert {c.mode for c in got} == {"hybrid"}
    assert {c.use_rank for c in got} == {True, False}
    assert {c.mode for c in cells(cfg)} == set(MODES) - {
        "hard_plus_soft"
    }  # a copy: the original is untouched
    # the modes experiment keeps its contrast, and says its reference level was not run here
    e = next(x for x in experiments(new) if x.name == "reward_modes")
    assert e.contrast == "reward_modes" and e.levels("reward_modes") == ("hybrid",)


def test_weight_and_rank_env_vars(schema):
    cfg = load_config(ROOT / "config" / "config.yaml")
    env = {"REWARD_MODE": "hard_plus_soft", "HARD_WEIGHT": "2.0", "USE_RANK_ADVANTAGE": "false"}
    got = cells(validate(apply_env_overrides(cfg, env), schema))
    # weights (1, 1) -> hard weight 2; the training-knob experiments on hard_plus_soft_v2
    # become hard_plus_soft cells with their training overrides
    assert {
        (c.mode, c.use_rank, c.reward.knob("hard_weight"), c.reward.knob("soft_weight"))
        for c in got
    } == {("hard_plus_soft", False, 2.0, 1.0)}
    assert {c.train for c in got} == {
        (),
        (("min_positive_ratio", 0.2),),
        (("gate_rce", True), ("min_positive_ratio", 0.2)),
        (("label_order", "selection"),),
    }


def test_env_vars_reach_every_experiment(schema):
    cfg = load_config(ROOT / "config" / "okvqa_qwen2.5vl3b.yaml")
    env = {"SOFT_WEIGHT": "0.25", "REWARD_ALPHA": "0", "REWARD_BETA": "1"}
    got = cells(validate(apply_env_overrides(cfg, env), schema))
    assert {
        c.reward.knob("soft_weight") for c in got if c.reward.knob("soft_weight") is not None
    } == {0.25}
    legacy = [c for c in got if c.mode == "legacy"]
    assert [(c.reward.knob("alpha"), c.reward.knob("beta")) for c in legacy] == [
        (0.0, 1.0)
    ]  # the reference implementation's "plan 5"
    assert {c.mode for c in got} == set(MODES)


def test_bad_env_value_names_the_variable():
    cfg = load_config(ROOT / "config" / "config.yaml")
    with pytest.raises(ValueError, match="HARD_WEIGHT"):
        apply_env_overrides(cfg, {"HARD_WEIGHT": "heavy"})


def test_load_config_applies_environ(tmp_path):
    cfg = load_config(ROOT / "config" / "config.yaml", environ={"REWARD_MODE": "legacy"})
    assert {c.mode for c in cells(cfg)} == {"legacy"}


# ----------------------------------------------------------------------------- input checks


def test_check_inputs_missing_model_folder(tmp_path):
    cfg = load_config(ROOT / "config" / "config.yaml")
    cfg = copy.deepcopy(cfg)
    cfg["model"].update(kind="hf", path=str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError) as e:
        check_inputs(cfg)
    assert (
        str(e.value)
        == f"config key model.path: model folder {tmp_path / 'no-such-model'} not found"
    )


def test_check_inputs_missing_dataset_file(tmp_path):
    cfg = load_config(ROOT / "config" / "okvqa_qwen2.5vl3b.yaml")
    cfg = copy.deepcopy(cfg)
    for split in ("train", "eval"):
        cfg["dataset"][split]["questions"] = str(tmp_path / f"{split}_questions.json")
    with pytest.raises(ValueError) as e:
        check_inputs(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "dataset.train.questions" in msg and "train_questions.json" in msg


def test_schema_reward_modes_are_the_library_modes(schema):
    from icdrl.rewards import MODES

    assert schema["$defs"]["reward_mode"]["enum"] == list(MODES)
    assert schema["properties"]["grid"]["properties"]["reward_modes"]["default"] == list(MODES)


# ----------------------------------------------------------------------------- the CLI


def test_cli_validate_and_grid(capsys, monkeypatch):
    from icdrl.cli import main

    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(["validate", str(ROOT / "config" / "okvqa_qwen2.5vl3b.yaml")]) == 0
    assert "valid (15 grid cells x 3 seeds)" in capsys.readouterr().out
    assert main(["grid", str(ROOT / "config" / "test.yaml")]) == 0
    out = capsys.readouterr().out
    assert "merged: 4 cells x seeds [0]" in out and "hard_plus_soft-hw1-sw1-rank" in out
    assert "modes (reward_modes vs legacy):" in out and "per_shot:" in out
    monkeypatch.setenv("REWARD_MODE", "hybrid")
    assert main(["grid", str(ROOT / "config" / "test.yaml")]) == 0
    assert "merged: 2 cells" in capsys.readouterr().out


def test_cli_validate_reports_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: {name: easyvqa}\nmodel: {name: m, kind: embedded}\npools: {size: 0}\n")
    from icdrl.cli import main

    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("icdrl: config key pools.size:") and "\n" not in err


def test_test_config_uses_the_embedded_test_preset():
    from icdrl.lvlm.embedded import TEST_PRESET

    raw = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    assert raw["embedded_lvlm"] == TEST_PRESET
