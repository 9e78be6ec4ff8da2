"""Loading, validating and overriding a workflow config.

* :func:`load_config` reads a YAML file and validates it.
* :func:`validate` checks a config against ``workflow/schemas/config.schema.yaml``, fills in the
  schema's defaults and raises :class:`ConfigError` with one line naming the key (NaN and ±inf
  are refused in every numeric key); :func:`name_sources` adds the config file(s) to a message.
* :func:`apply_env_overrides` applies the reference implementation's environment variables (``REWARD_MODE``,
  ``HARD_WEIGHT``, ``SOFT_WEIGHT``, ``REWARD_ALPHA``, ``REWARD_BETA``, ``USE_RANK_ADVANTAGE``):
  each one that is set replaces its grid dimension everywhere (top-level grid and every
  experiment), e.g. ``REWARD_MODE=hybrid`` restricts the grid to hybrid cells.
* :func:`check_inputs` checks, before any job runs, that the dataset files and model folders
  the config names exist; a missing one raises one line naming the config key and the path.

Imported by the Snakefile at parse time: keep it free of torch.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from icdrl.rewards import MODES

#: the schema shipped with the workflow
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

#: the reference implementation's environment variables (docs/science.md §6, its train_v3.sh) -> the override each one sets
ENV_VARS: dict[str, str] = {
    "REWARD_MODE": "reward_mode",
    "HARD_WEIGHT": "hard_weight",
    "SOFT_WEIGHT": "soft_weight",
    "REWARD_ALPHA": "alpha",
    "REWARD_BETA": "beta",
    "USE_RANK_ADVANTAGE": "use_rank",
}
_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


class ConfigError(ValueError):
    """A config (or a path it names) is invalid; the message is one line naming the key."""


# ----------------------------------------------------------------------------- validation


def _key(path: Any) -> str:
    """``grid.weights[1][0]`` from a jsonschema error path."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _message(err) -> str:
    """One line for a jsonschema ``ValidationError``, naming the offending key."""
    where = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        prefix = f"{where}." if err.absolute_path else ""
        keys = ", ".join(prefix + k for k in extra)
        return f"config key {keys}: unknown key (allowed here: {', '.join(allowed)})"
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        prefix = f"{where}." if err.absolute_path else ""
        return f"config key {prefix}{missing}: required but missing"
    if err.validator == "enum":
        return f"config key {where}: {err.instance!r} is not one of {', '.join(map(str, err.validator_value))}"
    return f"config key {where}: {err.message}"


def _deepest(errors):
    """The most specific error: the deepest path, descending into anyOf/oneOf branches."""
    err = max(errors, key=lambda e: len(e.absolute_path))
    while err.context:
        err = max(err.context, key=lambda e: len(e.absolute_path))
    return err


def _validator(schema: Mapping[str, Any]):
    """A Draft 2020-12 validator that fills in ``default`` values while it validates."""
    from jsonschema import Draft202012Validator, validators

    base = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from base(validator, properties, instance, schema_)

    cls = validators.extend(Draft202012Validator, {"properties": properties_with_defaults})
    return cls(schema)


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    with open(path) as fh:
        return yaml.safe_load(fh)


def validate(config: dict[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` in place (filling schema defaults); return it.

    Raises :class:`ConfigError` with one line naming the first offending key (the most
    specific error, so an unknown key deep inside a section is reported as that key).
    """
    schema = load_schema() if schema is None else schema
    lvlm = config.get("embedded_lvlm")
    if isinstance(lvlm, Mapping):
        from icdrl.lvlm.embedded import REMOVED_KEYS

        for k in sorted(set(lvlm) & set(REMOVED_KEYS)):
            raise ConfigError(f"config key embedded_lvlm.{k}: {REMOVED_KEYS[k]}")
    bad = _non_finite(config)
    if bad is not None:  # JSON schema's "number" (and most of its bounds) let NaN and ±inf through
        raise ConfigError(f"config key {bad[0]}: {bad[1]} is not a finite number")
    validator = _validator(schema)
    errors = list(validator.iter_errors(config))
    if errors:
        raise ConfigError(_message(_deepest(errors)))
    from icdrl.grid import canonical_shots

    # one spelling of a list that enters result paths: [2, 1, 1] is [1, 2]
    config["evaluation"]["shots"] = canonical_shots(config["evaluation"]["shots"])
    _check_semantics(config, schema)
    return config


def _non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """(key, value) of the first NaN or ±inf anywhere in ``obj``, e.g. ``("grid.weights[0][1]", nan)``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "<top level>", obj
    if isinstance(obj, Mapping):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, v in items:
        found = _non_finite(v, key)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- naming the file(s)

_KEY_RE = re.compile(r"^(?:config key )?([A-Za-z_]\w*(?:\.\w+|\[\d+\])*)[:,]")


def _key_parts(key: str) -> list[str | int]:
    """``grid.weights[0][1]`` -> ``["grid", "weights", 0, 1]``."""
    return [int(m[1]) if m[1] else m[2] for m in re.finditer(r"\[(\d+)\]|([^.\[\]]+)", key)]


def _sets(doc: Any, parts: Sequence[str | int]) -> bool:
    """Whether a parsed YAML document sets the key ``parts`` (the value at that path exists)."""
    node = doc
    for p in parts:
        if isinstance(p, int) and isinstance(node, list) and p < len(node):
            node = node[p]
        elif isinstance(p, str) and isinstance(node, Mapping) and p in node:
            node = node[p]
        else:
            return False
    return True


def name_sources(
    message: str, files: Sequence[str | os.PathLike], cli: Mapping[str, Any] | None = None
) -> str:
    """``message`` (a one-line config error) with the config file(s) it is about appended:
    ``(set in b.yaml)`` where one or more of ``files`` (or ``--config``, ``cli``) sets the key the
    message names, else ``(config file(s): a.yaml, b.yaml)``. Errors about the reference implementation's
    environment variables are returned as they are."""
    if any(message.startswith(v + "=") for v in ENV_VARS):
        return message
    files = [str(f) for f in files]
    m = _KEY_RE.match(message)
    setters: list[str] = []
    if m:
        parts = _key_parts(m.group(1))
        for f in files:
            try:
                with open(f) as fh:
                    doc = yaml.safe_load(fh)
            except (OSError, yaml.YAMLError):
                continue
            if _sets(doc, parts):
                setters.append(f)
        if cli and _sets(dict(cli), parts):
            setters.append("--config")
    if setters:
        return f"{message} (set in {', '.join(setters)})"
    if not files:
        return message
    return f"{message} (config file{'s' if len(files) > 1 else ''}: {', '.join(files)})"


def _check_semantics(config: Mapping[str, Any], schema: Mapping[str, Any] | None = None) -> None:
    """Checks JSON schema cannot express compactly."""
    model, emb = config["model"], config["embeddings"]
    from icdrl.lvlm import check_model_cfg

    try:
        check_model_cfg(model)
    except ValueError as e:
        raise ConfigError(f"config key {e}") from None
    if model["kind"] == "hf" and not model.get("path"):
        raise ConfigError(
            "config key model.path: required when model.kind is hf (a local model folder)"
        )
    if model["kind"] == "embedded" and model.get("path"):
        raise ConfigError(
            "config key model.path: must be null when model.kind is embedded (the workflow trains it)"
        )
    if emb["encoder"] == "clip" and not emb.get("clip_path"):
        raise ConfigError(
            "config key embeddings.clip_path: required when embeddings.encoder is clip"
        )
    if config["dataset"]["name"] == "vqa":
        for split in ("train", "eval"):
            for k in ("questions", "annotations", "images"):
                if not config["dataset"].get(split, {}).get(k):
                    raise ConfigError(
                        f"config key dataset.{split}.{k}: required when dataset.name is vqa"
                    )
    cand, pools = config["candidates"], config["pools"]
    if cand["depth"] > pools["size"]:
        raise ConfigError(
            f"config key candidates.depth: {cand['depth']} exceeds the pool size pools.size={pools['size']}"
        )
    if max(config["evaluation"]["shots"]) > pools["size"]:
        raise ConfigError(
            f"config key evaluation.shots: {max(config['evaluation']['shots'])} exceeds pools.size={pools['size']}"
        )
    if cand["shards"] > pools["n_anchors"]:
        raise ConfigError(
            f"config key candidates.shards: {cand['shards']} shards for only {pools['n_anchors']} anchors"
        )
    for m in config["evaluation"].get("ablate") or ():
        if m == "per_shot" and not pools.get("n_val"):
            raise ConfigError(
                "config key evaluation.ablate: per_shot needs validation queries (pools.n_val > 0)"
            )
        if m.startswith("rices") and m not in config["evaluation"].get("rices", ()):
            raise ConfigError(
                f"config key evaluation.ablate: {m} is not evaluated (add it to evaluation.rices)"
            )
    from icdrl.grid import cells

    try:
        cells(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_experiment_train_levels(config, schema)


def _check_experiment_train_levels(
    config: Mapping[str, Any], schema: Mapping[str, Any] | None
) -> None:
    """Every level of an experiment's ``train:`` axis is a valid ``train.v3`` value of that knob."""
    schema = load_schema() if schema is None else schema
    v3_props = schema["properties"]["train"]["properties"]["v3"]["properties"]
    for name, block in (config["grid"].get("experiments") or {}).items():
        for knob, levels in (block.get("train") or {}).items():
            sub = _validator(v3_props[knob])
            for i, v in enumerate(levels):
                errors = list(sub.iter_errors(v))
                if errors:
                    raise ConfigError(
                        f"config key grid.experiments.{name}.train.{knob}[{i}]: {errors[0].message}"
                    )


def load_config(
    path: str | os.PathLike,
    schema: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Read a YAML config, apply env-var overrides (``environ``, default none) and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    with open(path) as fh:
        try:
            config = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {path}: not valid YAML ({str(e).splitlines()[0]})"
            ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    try:
        validate(config, schema)
        if environ is not None:
            config = apply_env_overrides(config, environ)
            validate(config, schema)
    except ConfigError as e:
        raise ConfigError(name_sources(str(e), [path])) from None
    return config


# ----------------------------------------------------------------------------- env overrides


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The reference implementation's environment variables, typed: {reward_mode, hard_weight, soft_weight, alpha, beta, use_rank}.

    Unset or empty variables are left out (the reference implementation's ``${VAR:-default}``). A value that does
    not parse raises ``ValueError`` naming the variable.
    """
    out: dict[str, Any] = {}
    for var, key in ENV_VARS.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        v = raw.strip()
        if key == "reward_mode":
            if v not in MODES:
                raise ValueError(f"{var}={raw!r} is not a reward mode; valid: {', '.join(MODES)}")
            out[key] = v
        elif key == "use_rank":
            if v.lower() not in _TRUE | _FALSE:
                raise ValueError(f"{var}={raw!r} is not a boolean (use true/false, 1/0, yes/no)")
            out[key] = v.lower() in _TRUE
        else:
            try:
                x = float(v)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number") from None
            if not math.isfinite(x):
                raise ValueError(f"{var}={raw!r} is not a finite number")
            out[key] = x
    return out


def _replace_pairs(pairs: list, index: int, value: float) -> list:
    out = []
    for p in pairs:
        q = list(p)
        q[index] = value
        if q not in out:
            out.append(q)
    return out


def apply_env_overrides(
    config: dict[str, Any], environ: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of ``config`` with the reference implementation's env vars applied to the grid.

    ``overrides`` (default: :func:`env_overrides` of ``environ``) maps ``reward_mode``,
    ``hard_weight``, ``soft_weight``, ``alpha``, ``beta``, ``use_rank`` to values; each one
    present replaces that dimension in the top-level grid and in every experiment.
    """
    ov = dict(env_overrides(environ) if overrides is None else overrides)
    if not ov:
        return config
    config = copy.deepcopy(config)
    grid = config.setdefault("grid", {})
    blocks = [grid] + list((grid.get("experiments") or {}).values())
    pinned = _pin_contrasts(config)
    rewards = config.setdefault("rewards", {})
    if "alpha" in ov:
        rewards["alpha"] = float(ov["alpha"])
    if "beta" in ov:
        rewards["beta"] = float(ov["beta"])
    for i, block in enumerate(blocks):
        top = i == 0
        if "reward_mode" in ov and (
            block.get("reward_modes") or (top and not grid.get("experiments"))
        ):
            block["reward_modes"] = [ov["reward_mode"]]
        if "use_rank" in ov and ("use_rank" in block or top):
            block["use_rank"] = [bool(ov["use_rank"])]
        for knob, idx in (("hard_weight", 0), ("soft_weight", 1)):
            if knob in ov and ("weights" in block or top):
                block["weights"] = _replace_pairs(
                    block.get("weights") or [[1.0, 1.0]], idx, float(ov[knob])
                )
        for knob, idx in (("alpha", 0), ("beta", 1)):
            if knob in ov and ("alpha_beta" in block or top):
                default = [[rewards.get("alpha", 1.0), rewards.get("beta", 0.0)]]
                block["alpha_beta"] = _replace_pairs(
                    block.get("alpha_beta") or default, idx, float(ov[knob])
                )
        for knob in ("hard_weight", "soft_weight", "alpha", "beta"):
            if knob in ov and knob in block:  # an experiment's own list of that knob
                block[knob] = [float(ov[knob])]
    _unpin_lost_references(config, pinned)
    return config


def _pin_contrasts(config: dict[str, Any]) -> dict[str, Any]:
    """Write every experiment's contrast and reference into its block (as the unrestricted grid
    resolves them), so that restricting an axis cannot change what an experiment compares."""
    from icdrl.grid import experiments

    pinned = {}
    try:
        resolved = experiments(config)
    except ValueError:
        return pinned  # validation reports the problem
    for e in resolved:
        block = config["grid"]["experiments"][e.name]
        block["contrast"] = e.contrast
        block["reference"] = list(e.reference) if isinstance(e.reference, tuple) else e.reference
        pinned[e.name] = block["reference"]
    return pinned


def _unpin_lost_references(config: dict[str, Any], pinned: Mapping[str, Any]) -> None:
    """A restricted experiment whose reference level was removed compares its remaining levels
    with the first of them (the report says which)."""
    from icdrl.grid import experiment

    for name in pinned:
        block = config["grid"]["experiments"][name]
        try:
            experiment(name, block, config)
        except ValueError as e:
            if ".reference:" in str(e):
                block.pop("reference")


def prepare(
    config: dict[str, Any], environ: Mapping[str, str], schema: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Validate ``config`` and apply the env overrides, *in place* (the Snakefile's global
    ``config`` stays the same object); return the overrides applied (empty if none)."""
    validate(config, schema)
    overrides = env_overrides(environ)
    if overrides:
        new = validate(apply_env_overrides(config, environ, overrides), schema)
        config.clear()
        config.update(new)
    return overrides


def describe_overrides(overrides: Mapping[str, Any]) -> str:
    """One line saying which env vars changed the grid (printed by the Snakefile)."""
    return "icdrl: env overrides applied to the grid: " + ", ".join(
        f"{k}={v}" for k, v in sorted(overrides.items())
    )


# ----------------------------------------------------------------------------- input checks


def _check_model_folder(key: str, path: str | None) -> None:
    p = Path(str(path)) if path else None
    if p is None or not p.is_dir():
        raise ConfigError(f"config key {key}: model folder {path} not found")
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"config key {key}: {path} holds no config.json (not a Hugging Face model folder)"
        )


def check_inputs(config: Mapping[str, Any]) -> None:
    """Fail with one line if a dataset file or a model folder the config names is missing, a
    configured size exceeds what the data holds, or an image is cut short (:mod:`icdrl.checks`).

    Run before the first job (the Snakefile's ``onstart``), never in a dry run.
    """
    from icdrl.checks import check_data

    check_data(config)  # both splits load; sizes fit the data; images are whole (icdrl.checks)
    if config["model"]["kind"] == "hf":
        _check_model_folder("model.path", config["model"]["path"])
    if config["embeddings"]["encoder"] == "clip":
        _check_model_folder("embeddings.clip_path", config["embeddings"]["clip_path"])
