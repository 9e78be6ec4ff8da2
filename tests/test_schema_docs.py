"""The config schema and config/README.md say the same thing.

* every property of ``workflow/schemas/config.schema.yaml`` (top-level sections, nested keys, the
  properties of ``$defs`` such as the experiment) and every ``$defs`` entry has a description;
* every key of a section is named in backticks in that section of config/README.md (``### `pools```
  and so on), and every backticked name there is a key of that section, a value the schema
  allows there, another section, or one of the few words listed in ``NOT_KEYS``; a dotted name
  that starts with a section (``train.v3.kl_beta``) must be a key path anywhere in the README;
* a default the README states (in a key table, or as "`key` value" / "`key` (value)" in prose)
  equals the schema's default.

The README is parsed loosely on purpose: sections by their ``### `name``` heading, names as
backticked words (fenced code blocks left out), so rewording a sentence never breaks the test;
only a key or a default that is missing or wrong does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from icdrl.config import load_schema

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "config" / "README.md"
SCHEMA_NAME = "workflow/schemas/config.schema.yaml"

#: Backticked words in a README section that are neither keys nor values the schema lists there,
#: each with why it is there.
NOT_KEYS: dict[str, dict[str, str]] = {
    "dataset": {
        "okvqa": "an example value of dataset.label, which takes any slug",
    },
    "model": {
        "cuda": "a value of model.device, which the schema checks by a pattern, not an enum",
        "auto": "a value of model.device (pattern)",
        "sdpa": "an example value of attn_implementation, which takes any string",
    },
    "scoring": {
        "vqa_acc_score": "a field of the scored records (icdrl.records), not a config key",
        "acc": "a field of the evaluation records",
    },
    "evaluation": {
        "evaluate_rices": "the Snakefile rule that runs the RICES variants and copy",
        "img": "the image-embedding array of the embeddings file RICES reads",
        "txt": "the question-embedding array",
        "emb": "the mixed-embedding array",
        "ablations": "the report table of the ablations",
    },
    "report": {
        # the columns of the report's delta tables (CSV), not config keys
        "p": "CSV column",
        "p_holm": "CSV column",
        "significant_holm": "CSV column",
        "family_size": "CSV column",
        "mde": "CSV column",
        "status": "CSV column",
        "n_clusters": "CSV column",
        "resampled": "CSV column",
    },
}

#: Key-table defaults written in words because the schema's default is null (or absent) and the
#: code derives the value; the test checks the README still says this, and does not parse it.
PROSE_DEFAULTS: dict[tuple[str, str], str] = {
    ("dataset", "label"): "`name`",  # null: results/<dataset.name>
    ("dataset", "root"): "package data",  # null: the easy-vqa package's folder
    ("embeddings", "name"): "`clip-<folder name>`",  # null: derived from clip_path
    (
        "grid",
        "reward_modes",
    ): "all five",  # the schema lists the five modes (test_config checks them)
    (
        "grid",
        "alpha_beta",
    ): "[[rewards.alpha, rewards.beta]]",  # absent: legacy reads rewards.alpha/beta
}
NO_DEFAULT = "—"  # a key-table default cell meaning "the schema has no default"


# ----------------------------------------------------------------------------- schema walking


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return load_schema()


def _resolve(node: Any, schema: dict[str, Any]) -> Any:
    if isinstance(node, dict) and "$ref" in node:
        target = schema
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return target
    return node


def _subschemas(node: dict[str, Any], schema: dict[str, Any]):
    """The schemas a value at ``node`` is checked against that can hold keys (refs resolved)."""
    node = _resolve(node, schema)
    if not isinstance(node, dict):
        return
    yield node
    for k in ("items", "additionalProperties"):
        if isinstance(node.get(k), dict):
            yield from _subschemas(node[k], schema)
    for k in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(k) or ():
            yield from _subschemas(sub, schema)


def all_properties(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """(path, node) of every ``$defs`` entry and every property, wherever it is declared."""
    out: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for k, v in (node.get("properties") or {}).items():
            out.append((f"{path}{k}", v))
            walk(v, f"{path}{k}.")

    for name, node in schema["$defs"].items():
        out.append((f"$defs.{name}", node))
        walk(node, f"$defs.{name}.")
    walk(schema, "")
    return out


def section_keys(schema: dict[str, Any], section: str) -> dict[str, list[dict[str, Any]]]:
    """Every key name under ``section`` (any depth, refs resolved) -> the schema nodes of that name."""
    keys: dict[str, list[dict[str, Any]]] = {}

    def walk(node: Any) -> None:
        for sub in _subschemas(node, schema):
            parent_default = sub.get("default") if isinstance(sub.get("default"), dict) else {}
            for k, v in (sub.get("properties") or {}).items():
                node = _resolve(v, schema) | {k2: v[k2] for k2 in v if k2 != "$ref"}
                if (
                    "default" not in node and k in parent_default
                ):  # kind_weights: {colour: 1.0, ...}
                    node["default"] = parent_default[k]
                keys.setdefault(k, []).append(node)
                walk(v)

    walk(schema["properties"][section])
    return keys


def schema_values(schema: dict[str, Any]) -> set[str]:
    """Every string the schema allows or defaults to anywhere: enum values (also of
    ``propertyNames``, e.g. the train.v3 knobs an experiment may vary) and defaults."""
    found: set[str] = set()

    def walk(x: Any, value: bool = False) -> None:
        if isinstance(x, str) and value:
            found.add(x)
        elif isinstance(x, list):
            for v in x:
                walk(v, value)
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, value or k in ("enum", "default"))

    walk(schema)
    return found


def key_path_exists(schema: dict[str, Any], dotted: str) -> bool:
    node: Any = schema
    for part in dotted.split("."):
        nxt = None
        for sub in _subschemas(node, schema):
            if part in (sub.get("properties") or {}):
                nxt = sub["properties"][part]
                break
            extra = sub.get("additionalProperties")
            if isinstance(extra, dict) and _resolve(extra, schema).get("properties"):
                nxt = extra  # a name of the user's (grid.experiments.<name>)
                break
        if nxt is None:
            return False
        node = nxt
    return True


# ----------------------------------------------------------------------------- README parsing

_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_HEADING = re.compile(r"^### `(\w+)`.*$", re.MULTILINE)
_TICKED = re.compile(r"`([^`\n]+)`")
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_DOTTED = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+")


def readme_sections(text: str) -> dict[str, str]:
    """``### `name` ...`` heading -> its text up to the next heading, fenced code blocks left out."""
    text = _FENCE.sub("", text)
    heads = list(_HEADING.finditer(text))
    out = {}
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        body = text[m.end() : end]
        out[m.group(1)] = body.split("\n## ")[0]  # a following level-2 heading ends it too
    return out


def ticked(text: str) -> list[str]:
    """Backticked words, a trailing colon dropped (``train:`` names the key ``train``)."""
    return [t.strip().rstrip(":") for t in _TICKED.findall(text)]


def _number(s: str) -> Any:
    if s in ("true", "false"):
        return s == "true"
    if s == "null":
        return None
    try:
        return int(s)
    except ValueError:
        return float(s)


def _same(a: Any, b: Any) -> bool:
    """Equal, with booleans equal only to booleans (``true`` is not ``1``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _cell_value(cell: str) -> Any:
    import yaml

    raw = cell.strip().strip("`")
    try:
        return _number(raw)
    except ValueError:
        return yaml.safe_load(raw)


def table_defaults(body: str) -> list[tuple[str, str]]:
    """(key, default cell) of every row of the section's ``| key | default | meaning |`` tables."""
    rows: list[tuple[str, str]] = []
    in_table = False
    for line in body.splitlines():
        cells = (
            [c.strip() for c in line.strip().strip("|").split("|")]
            if line.startswith("|")
            else None
        )
        if cells is None:
            in_table = False
            continue
        if cells[:2] == ["key", "default"]:
            in_table = True
            continue
        if not in_table or set(cells[0]) <= set("-: "):
            continue
        keys = [t for t in ticked(cells[0]) if _NAME.fullmatch(t)]
        defaults = [d.strip() for d in cells[1].split(",")] if len(keys) > 1 else [cells[1]]
        if len(keys) > 1 and len(defaults) == 1:
            defaults = defaults * len(keys)
        assert len(defaults) == len(keys), (
            f"config/README.md: table row {line!r}: {len(keys)} keys, {len(defaults)} defaults"
        )
        rows += list(zip(keys, defaults))
    return rows


#: "`key` value" / "`key` (value)": a number, true, false or null, or a word (an enum value, e.g.
#: "`label_order` prompt"); "`chunk_prompts` (4 × ...)", "80%" or "last|best" are not defaults.
_PROSE_DEFAULT = re.compile(
    r"`([a-z_][a-z0-9_]*)`\s+\(?(-?\d[\d.e+-]*|true|false|null|[a-z]\w*)(?![\w.%|])(?!\s*×)"
)


def prose_defaults(body: str) -> list[tuple[str, str]]:
    """("key", "value") of every "`key` value" or "`key` (value)" outside the tables."""
    text = "\n".join(line for line in body.splitlines() if not line.startswith("|"))
    return _PROSE_DEFAULT.findall(text)


def _is_literal(raw: str) -> bool:
    return raw in ("true", "false", "null") or raw[0].isdigit() or raw[0] == "-"


@pytest.fixture(scope="module")
def sections() -> dict[str, str]:
    return readme_sections(README.read_text())


# ----------------------------------------------------------------------------- tests


def test_every_schema_property_has_a_description(schema):
    props = all_properties(schema)
    assert len(props) > 150  # the walker reaches nested keys and $defs, not only the sections
    missing = [
        p
        for p, node in props
        if not (isinstance(node, dict) and str(node.get("description", "")).strip())
    ]
    assert not missing, f"{SCHEMA_NAME}: properties without a description: {', '.join(missing)}"


def test_readme_has_a_section_per_schema_section(schema, sections):
    assert set(sections) == set(schema["properties"]), (
        f"config/README.md '### `name`' sections {sorted(sections)} != schema sections {sorted(schema['properties'])}"
    )


def test_every_schema_key_is_named_in_its_readme_section(schema, sections):
    missing = []
    for sec in schema["properties"]:
        words = set()
        for t in ticked(sections.get(sec, "")):
            words.add(t)
            words.add(t.rsplit(".", 1)[-1])  # `model.batch_size` names batch_size
        missing += [f"{sec}: {k}" for k in section_keys(schema, sec) if k not in words]
    assert not missing, (
        f"schema keys the config/README.md section does not name in backticks: {'; '.join(missing)}"
    )


def test_every_name_in_a_readme_section_is_a_schema_key(schema, sections):
    unknown = []
    top, values = set(schema["properties"]), schema_values(schema)
    for sec, body in sections.items():
        if sec not in top:
            continue
        allowed = set(section_keys(schema, sec)) | values | top | set(NOT_KEYS.get(sec, {}))
        unknown += [
            f"{sec}: `{t}`" for t in ticked(body) if _NAME.fullmatch(t) and t not in allowed
        ]
    assert not unknown, (
        "config/README.md names what is not a key of its section (add it to the schema, fix the "
        f"README, or list it in NOT_KEYS with the reason): {'; '.join(unknown)}"
    )


def test_dotted_key_names_in_the_readme_exist(schema):
    text = README.read_text()
    top = set(schema["properties"])
    dotted = {t for t in ticked(text) if _DOTTED.fullmatch(t) and t.split(".")[0] in top}
    assert len(dotted) >= 10  # the README refers to keys as section.key throughout
    bad = sorted(t for t in dotted if not key_path_exists(schema, t))
    assert not bad, f"config/README.md names config keys the schema does not have: {', '.join(bad)}"


def test_not_keys_are_still_used(sections):
    """An entry of NOT_KEYS the README no longer uses is stale: remove it."""
    stale = [
        f"{sec}: {w}"
        for sec, words in NOT_KEYS.items()
        for w in words
        if w not in ticked(sections.get(sec, ""))
    ]
    assert not stale, f"NOT_KEYS entries config/README.md no longer uses: {', '.join(stale)}"


def test_readme_table_defaults_match_the_schema(schema, sections):
    checked, bad = 0, []
    for sec, body in sections.items():
        direct = schema["properties"][sec].get("properties", {})
        for key, cell in table_defaults(body):
            assert key in direct, (
                f"config/README.md section {sec}: table key {key} is not a key of {sec}"
            )
            node = _resolve(direct[key], schema) | direct[key]
            if (sec, key) in PROSE_DEFAULTS:
                assert cell == PROSE_DEFAULTS[sec, key], (
                    f"config/README.md {sec}.{key}: default cell {cell!r} changed"
                )
                continue
            checked += 1
            if cell == NO_DEFAULT:
                if "default" in node:
                    bad.append(f"{sec}.{key}: README says no default, schema {node['default']!r}")
            elif "default" not in node or not _same(_cell_value(cell), node["default"]):
                bad.append(
                    f"{sec}.{key}: README {cell!r}, schema {node.get('default', '(none)')!r}"
                )
    assert checked >= 30  # the tables were found and parsed
    assert not bad, f"config/README.md table defaults that differ from the schema: {'; '.join(bad)}"


def test_readme_prose_defaults_match_the_schema(schema, sections):
    """ "`lr` 0.001" or "`alpha` (1.0)" in a section: some key of that name there has that default.

    A name that occurs at two depths (``seed`` of embedded_lvlm and of its check, v2's and v3's
    ``batch_queries``) passes if either default matches."""
    checked, bad = 0, []
    for sec, body in sections.items():
        keys = section_keys(schema, sec)
        for key, raw in prose_defaults(body):
            if not _is_literal(
                raw
            ):  # a word: a default only where it is a value of that key's enum
                if not any(raw in (n.get("enum") or ()) for n in keys.get(key, [])):
                    continue
                value = raw
            else:
                value = _number(raw)
            defaults = [n["default"] for n in keys.get(key, []) if "default" in n]
            checked += 1
            if not any(_same(value, d) for d in defaults):
                bad.append(f"{sec}: `{key}` {raw} (schema: {defaults or 'no default'})")
    assert checked >= 50  # embedded_lvlm and train state most of their defaults this way
    assert not bad, f"config/README.md prose defaults that differ from the schema: {'; '.join(bad)}"
