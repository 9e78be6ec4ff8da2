"""The experiment grid (docs/science.md §9): reward settings, cells, experiments, seeds.

A v3 **cell** (:class:`Cell`) is one reward setting (:class:`RewardSpec`: a mode and the knobs it
reads), one advantage kind (``use_rank``) and the v3 training overrides of its experiment (any
``train.v3`` knob: ``min_positive_ratio``, ``gate_rce``, ``kl_beta``, ``label_order``, epochs, ...).
Seeds are a separate dimension. The same :class:`Cell`, or its canonical dict
(:meth:`Cell.as_dict`), travels into selector checkpoints, evaluation records and the report.

An **experiment** (:class:`Experiment`, one entry of ``grid.experiments``) is data: its axes
(``reward_modes``, ``use_rank``, ``weights``, ``alpha_beta``, any reward knob, any v3 training knob
under ``train:``), the contrasted axis and its reference level. Axes it leaves out take the
top-level ``grid`` lists. The grid is the union of every experiment's cells and the top-level
cross product; cells equal once ignored knobs are dropped are one job.

Spelling: numbers appear in paths in one canonical spelling (:func:`fmt_float`); sections too
long for a path appear as the short hash of their canonical JSON (:func:`short_hash`), only of
that section, so unrelated edits do not invalidate results. The paths themselves are
:class:`icdrl.layout.Layout`'s.

This module is imported by the Snakefile at parse time: keep it free of torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from icdrl.rewards import KNOBS, MODES, check_knobs, knobs_used

# ----------------------------------------------------------------------------- spelling


def fmt_float(x: float | int) -> str:
    """Canonical spelling of a number in a path: shortest round-trip digits, positional, no
    trailing ``.0`` (1.0 -> "1", 0.5 -> "0.5", 1e-05 -> "0.00001", -2.0 -> "-2")."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"fmt_float needs a number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"fmt_float: {x!r} is not a finite number")
    if x == 0:
        return "0"
    text = format(Decimal(repr(x)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def canonical(obj: Any) -> Any:
    """``obj`` with every number spelled canonically, so YAML ``1`` and ``1.0`` hash alike.

    Integral floats become ints; other floats are kept; mappings get sorted string keys.
    """
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float)):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ValueError(f"canonical: {obj!r} is not a finite number")
        return int(obj) if float(obj).is_integer() and abs(obj) < 2**53 else float(obj)
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    raise TypeError(f"canonical: cannot spell {type(obj).__name__} {obj!r}")


def canonical_json(obj: Any) -> str:
    """Compact JSON of :func:`canonical` (sorted keys): the text that :func:`short_hash` hashes."""
    return json.dumps(canonical(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


#: per hashed section, keys that change how fast or where a job runs (or what it logs), never
#: what it computes: left out of that section's path hash
RUNTIME_KEYS: dict[str, frozenset[str]] = {
    "embedded_lvlm": frozenset({"threads", "log_every", "check"}),  # check: only icl_check.json
    "train.v2": frozenset({"device", "save_epochs"}),
    "train.v3": frozenset({"device", "save_epochs"}),
}


def content(section: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Config section ``name`` without its :data:`RUNTIME_KEYS` (what its path hash covers)."""
    drop = RUNTIME_KEYS.get(name, frozenset())
    return {k: v for k, v in section.items() if k not in drop}


def short_hash(obj: Any, n: int = 8) -> str:
    """First ``n`` hex digits of the SHA-256 of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


# ----------------------------------------------------------------------------- reward specs

ADV = {True: "rank", False: "zscore"}
_ADV_INV = {v: k for k, v in ADV.items()}
_NUM = r"-?[0-9]+(?:\.[0-9]+)?"
_KEY_INV = {k.key: name for name, k in KNOBS.items()}
#: regex of a reward slug (a Snakemake wildcard constraint)
REWARD_SLUG_RE = (
    "(?:"
    + "|".join(sorted(MODES, key=len, reverse=True))
    + ")"
    + "(?:-(?:"
    + "|".join(sorted(_KEY_INV, key=len, reverse=True))
    + ")"
    + _NUM
    + ")*"
)


@dataclass(frozen=True, order=True)
class RewardSpec:
    """One rewards file: a mode and the knobs it reads, ``(name, value)`` in :data:`KNOBS` order."""

    mode: str
    knobs: tuple[tuple[str, float], ...] = ()

    @property
    def slug(self) -> str:
        """``mode`` then ``-<key><value>`` per knob it reads, e.g. ``hard_plus_soft-hw2-sw0.5``."""
        return "-".join([self.mode] + [f"{KNOBS[k].key}{fmt_float(v)}" for k, v in self.knobs])

    def knob(self, name: str) -> float | None:
        """The value of knob ``name``, or None when the mode does not read it."""
        return dict(self.knobs).get(name)

    def as_dict(self) -> dict[str, float]:
        """The knobs this mode reads, by name."""
        return dict(self.knobs)


def reward_spec(mode: str, **knobs: float | None) -> RewardSpec:
    """The canonical :class:`RewardSpec` of ``mode``: knobs the mode ignores are dropped, the ones
    it reads take ``knobs`` or their defaults (:data:`icdrl.rewards.KNOBS`)."""
    used = check_knobs(mode, {k: v for k, v in knobs.items() if v is not None})
    return RewardSpec(mode, tuple((k, used[k]) for k in KNOBS if k in used))


def parse_reward_slug(slug: str) -> RewardSpec:
    """Inverse of :attr:`RewardSpec.slug`; raises ``ValueError`` naming the slug if malformed."""
    if not re.fullmatch(REWARD_SLUG_RE, slug):
        raise ValueError(f"not a reward slug: {slug!r} (expected e.g. 'hard_plus_soft-hw1-sw1')")
    mode = next(
        m for m in sorted(MODES, key=len, reverse=True) if slug == m or slug.startswith(m + "-")
    )
    knobs: dict[str, float] = {}
    keys = "|".join(sorted(_KEY_INV, key=len, reverse=True))
    for key, num in re.findall(r"-(" + keys + r")(" + _NUM + ")", slug[len(mode) :]):
        name = _KEY_INV[key]
        if name in knobs:
            raise ValueError(f"reward slug {slug!r} names {key} twice")
        knobs[name] = float(num)
    missing = knobs_used(mode) - set(knobs)
    extra = set(knobs) - knobs_used(mode)
    if extra or missing:
        raise ValueError(
            f"reward slug {slug!r}: mode {mode} reads exactly {sorted(knobs_used(mode))}"
        )
    try:
        spec = reward_spec(mode, **knobs)
    except ValueError as e:
        raise ValueError(f"reward slug {slug!r}: {e}") from None
    if spec.slug != slug:
        raise ValueError(f"reward slug {slug!r} is not canonical (expected {spec.slug!r})")
    return spec


# ----------------------------------------------------------------------------- training overrides

#: ``train.v3`` keys that change how or where training runs, never what it computes: not axes
TRAIN_RUNTIME = RUNTIME_KEYS["train.v3"]


def effective_v3(base: Mapping[str, Any], overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """The v3 training settings a cell trains with: ``base`` (``train.v3``, defaults filled in)
    updated by ``overrides``, canonical, without runtime keys. Settings that cannot change the
    result are normalised, so that they cannot make two jobs of one: ``gate_rce`` is false when
    ``min_positive_ratio`` is 0 (nothing to gate)."""
    eff = canonical({**content(base, "train.v3"), **dict(overrides)})
    if not eff.get("min_positive_ratio"):
        eff["gate_rce"] = False
    return eff


def train_overrides(
    base: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[tuple[str, Any], ...]:
    """The overrides that differ from ``base`` once normalised (:func:`effective_v3`), sorted by key."""
    eff, ref = effective_v3(base, overrides), effective_v3(base)
    return tuple((k, eff[k]) for k in sorted(eff) if eff[k] != ref.get(k))


def label_order(v2: Mapping[str, Any], v3: Mapping[str, Any]) -> str:
    """The label order (docs/science.md §7) of a v3 selector: ``train.v3.label_order``, or v2's when null."""
    return v3.get("label_order") or v2.get("label_order") or "prompt"


def _spell(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return fmt_float(v)
    return str(v)


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True, order=True)
class Cell:
    """One v3 training setting (docs/science.md §7, §9): reward setting, advantage kind, training overrides.

    ``train`` holds only the ``train.v3`` knobs whose value differs from the config's own (after
    :func:`effective_v3`), so an override equal to the default is the same cell as none.
    """

    reward: RewardSpec
    use_rank: bool
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def mode(self) -> str:
        return self.reward.mode

    @property
    def adv(self) -> str:
        """``rank`` or ``zscore``: the path segment of ``use_rank``."""
        return ADV[self.use_rank]

    @property
    def slug(self) -> str:
        """``<reward slug>-<adv>`` plus ``[knob=value,...]`` for training overrides, e.g.
        ``hard_plus_soft_v2-hw1-sw1-zscore[min_positive_ratio=0.2]``; unique per cell."""
        base = f"{self.reward.slug}-{self.adv}"
        if not self.train:
            return base
        return base + "[" + ",".join(f"{k}={_spell(v)}" for k, v in self.train) + "]"

    def label(self) -> str:
        """A reader's name: ``hard_plus_soft z-score hw=2 sw=1 min_positive_ratio=0.2``."""
        parts = [self.mode, "rank" if self.use_rank else "z-score"]
        parts += [f"{KNOBS[k].key}={_spell(v)}" for k, v in self.reward.knobs]
        parts += [f"{k}={_spell(v)}" for k, v in self.train]
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """Canonical plain dict (what checkpoints and evaluation records carry)."""
        return {
            "slug": self.slug,
            "mode": self.mode,
            "knobs": self.reward.as_dict(),
            "use_rank": self.use_rank,
            "train": dict(self.train),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "cell") -> Cell:
        """Inverse of :meth:`as_dict` (checks the slug agrees)."""
        try:
            mode, knobs, use_rank = d["mode"], dict(d.get("knobs") or {}), d["use_rank"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{where}: a cell needs 'mode', 'knobs' and 'use_rank', got {d!r}"
            ) from None
        if not isinstance(use_rank, bool):
            raise ValueError(f"{where}: 'use_rank' must be true or false, got {use_rank!r}")
        train = d.get("train") or {}
        if not isinstance(train, Mapping):
            raise ValueError(f"{where}: 'train' must be a mapping, got {train!r}")
        cell = cls(
            reward_spec(mode, **knobs), use_rank, tuple(sorted(canonical(dict(train)).items()))
        )
        if "slug" in d and d["slug"] != cell.slug:
            raise ValueError(
                f"{where}: slug {d['slug']!r} does not match its knobs (expected {cell.slug!r})"
            )
        return cell


# ----------------------------------------------------------------------------- experiments

#: experiment keys that describe it rather than span an axis
EXPERIMENT_META = ("title", "contrast", "reference")
#: axes whose levels are pairs of reward knobs
PAIR_AXES = {"weights": ("hard_weight", "soft_weight"), "alpha_beta": ("alpha", "beta")}
#: axes an experiment takes from the top-level grid when it leaves them out
GRID_AXES = ("reward_modes", "use_rank", "weights", "alpha_beta")


@dataclass(frozen=True)
class Member:
    """One point of an experiment: its level on every axis, and the cell that trains it."""

    levels: tuple[tuple[str, Any], ...]
    cell: Cell

    def level(self, axis: str) -> Any:
        return dict(self.levels)[axis]


@dataclass(frozen=True)
class Experiment:
    """One configured experiment (``grid.experiments.<name>``, docs/science.md §9)."""

    name: str
    title: str
    axes: tuple[tuple[str, tuple[Any, ...]], ...]  # (axis, levels), in config order
    contrast: str
    reference: Any
    members: tuple[Member, ...]

    def levels(self, axis: str) -> tuple[Any, ...]:
        return dict(self.axes)[axis]

    @property
    def varied(self) -> tuple[str, ...]:
        """The axes with more than one level, in config order."""
        return tuple(a for a, lv in self.axes if len(lv) > 1)

    def cells(self) -> list[Cell]:
        return list(dict.fromkeys(m.cell for m in self.members))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (what the report rule receives)."""
        return {
            "name": self.name,
            "title": self.title,
            "contrast": self.contrast,
            "reference": _json_level(self.reference),
            "axes": [[a, [_json_level(v) for v in lv]] for a, lv in self.axes],
            "members": [
                {"levels": {a: _json_level(v) for a, v in m.levels}, "cell": m.cell.as_dict()}
                for m in self.members
            ],
        }


def _json_level(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _level(axis: str, v: Any, where: str) -> Any:
    """One level of ``axis`` in canonical form (pairs as tuples of floats)."""
    if axis in PAIR_AXES:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(f"config key {where}: each entry must be a pair [x, y], got {v!r}")
        return (float(v[0]), float(v[1]))
    if axis == "use_rank":
        if not isinstance(v, bool):
            raise ValueError(
                f"config key {where}: use_rank levels must be true or false, got {v!r}"
            )
        return v
    if axis == "reward_modes":
        if v not in MODES:
            raise ValueError(f"config key {where}: unknown mode {v!r}; valid: {', '.join(MODES)}")
        return v
    if axis in KNOBS:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"config key {where}: {axis} levels must be finite numbers, got {v!r}")
        return float(v)
    return canonical(v)  # a training knob (validated against the schema by icdrl.config)


def _axes(block: Mapping[str, Any], grid: Mapping[str, Any], where: str) -> list[tuple[str, tuple]]:
    """(axis, levels) of one experiment block; grid axes it leaves out come from ``grid``."""
    axes: list[tuple[str, tuple]] = []
    names = [k for k in block if k not in EXPERIMENT_META and k != "train"]
    for k in GRID_AXES:
        # a pair the block sets a knob of (e.g. hard_weight) is not inherited: it would overwrite it
        if (
            k not in names
            and grid.get(k)
            and not any(knob in block for knob in PAIR_AXES.get(k, ()))
        ):
            names.append(k)
    for k in names:
        if k not in GRID_AXES and k not in KNOBS:
            raise ValueError(
                f"config key {where}.{k}: not an axis (axes: {', '.join(GRID_AXES + tuple(KNOBS))},"
                " or a train.v3 knob under train:)"
            )
        vals = block[k] if k in block else grid[k]
        axes.append(
            (k, tuple(dict.fromkeys(_level(k, v, f"{where}.{k}[{i}]") for i, v in enumerate(vals))))
        )
    for k, vals in (block.get("train") or {}).items():
        if k in TRAIN_RUNTIME:
            raise ValueError(
                f"config key {where}.train.{k}: a runtime setting, not an experiment axis"
            )
        axes.append((k, tuple(dict.fromkeys(_level(k, v, f"{where}.train.{k}") for v in vals))))
    for pair, knobs in PAIR_AXES.items():
        both = [k for k in knobs if any(a == k for a, _ in axes)]
        if both and any(a == pair for a, _ in axes) and pair in block:
            raise ValueError(f"config key {where}: give {pair} or {'/'.join(knobs)}, not both")
    for a, lv in axes:
        if not lv:
            raise ValueError(f"config key {where}.{a}: needs at least one level")
    return axes


def _member(
    levels: Mapping[str, Any],
    train_axes: set[str],
    rewards_cfg: Mapping[str, Any],
    v3_base: Mapping[str, Any],
) -> Member:
    knobs: dict[str, Any] = {k: rewards_cfg.get(k) for k in KNOBS if rewards_cfg.get(k) is not None}
    for axis, value in levels.items():
        if axis in PAIR_AXES:
            knobs.update(zip(PAIR_AXES[axis], value))
        elif axis in KNOBS:
            knobs[axis] = value
    overrides = {a: v for a, v in levels.items() if a in train_axes}
    cell = Cell(
        reward_spec(levels["reward_modes"], **knobs),
        bool(levels.get("use_rank", False)),
        train_overrides(v3_base, overrides),
    )
    return Member(tuple(levels.items()), cell)


def _members(
    block: Mapping[str, Any], config: Mapping[str, Any], where: str
) -> tuple[list[tuple[str, tuple]], tuple[Member, ...]]:
    """The axes of one grid block and its cross product, one :class:`Member` per combination."""
    axes = _axes(block, config.get("grid", {}), where)
    axis_names = [a for a, _ in axes]
    if "reward_modes" not in axis_names or not dict(axes)["reward_modes"]:
        raise ValueError(
            f"config key {where}.reward_modes: no reward mode (here or at the top level of grid)"
        )
    train_axes = set(block.get("train") or {})
    v3_base = config.get("train", {}).get("v3", {})
    members = tuple(
        _member(dict(zip(axis_names, combo)), train_axes, config.get("rewards", {}), v3_base)
        for combo in itertools.product(*(lv for _, lv in axes))
    )
    return axes, members


def experiment(name: str, block: Mapping[str, Any], config: Mapping[str, Any]) -> Experiment:
    """The :class:`Experiment` of one ``grid.experiments`` entry."""
    where = f"grid.experiments.{name}"
    axes, members = _members(block, config, where)
    axis_names = [a for a, _ in axes]
    varied = [a for a, lv in axes if len(lv) > 1]
    contrast = block.get("contrast")
    if contrast is None:
        if len(varied) != 1:
            raise ValueError(
                f"config key {where}.contrast: required when {len(varied)} axes vary "
                f"({', '.join(varied) or 'none'})"
            )
        contrast = varied[0]
    if contrast not in axis_names:
        raise ValueError(
            f"config key {where}.contrast: {contrast!r} is not one of its axes ({', '.join(axis_names)})"
        )
    levels = dict(axes)[contrast]
    reference = (
        levels[0]
        if block.get("reference") is None
        else _level(contrast, block["reference"], f"{where}.reference")
    )
    if reference not in levels:
        raise ValueError(
            f"config key {where}.reference: {block.get('reference')!r} is not a level of "
            f"{contrast} ({', '.join(map(str, levels))})"
        )
    title = (
        block.get("title")
        or f"{contrast} levels vs {_spell(list(reference) if isinstance(reference, tuple) else reference)}"
    )
    return Experiment(name, title, tuple(axes), contrast, reference, members)


def experiments(config: Mapping[str, Any]) -> list[Experiment]:
    """The configured experiments, in config order."""
    return [
        experiment(name, block, config)
        for name, block in (config.get("grid", {}).get("experiments") or {}).items()
    ]


def experiment_cells(config: Mapping[str, Any]) -> dict[str, list[Cell]]:
    """Cells per named block (``grid`` for the top-level cross product), each deduplicated but
    not yet merged across blocks: which experiment asked for which cell."""
    out = {}
    grid = config.get("grid", {})
    if grid.get("reward_modes"):
        _, members = _members({k: grid[k] for k in GRID_AXES if k in grid}, config, "grid")
        out["grid"] = list(dict.fromkeys(m.cell for m in members))
    for e in experiments(config):
        out[e.name] = e.cells()
    return out


def cells(config: Mapping[str, Any]) -> list[Cell]:
    """The merged, deduplicated grid cells of a (validated) config, in first-seen order."""
    merged = list(dict.fromkeys(c for block in experiment_cells(config).values() for c in block))
    if not merged:
        raise ValueError(
            "config key grid: the grid is empty (no reward_modes at top level or in any experiment)"
        )
    return merged


def reward_specs(cell_list: Sequence[Cell]) -> list[RewardSpec]:
    """The distinct reward files the cells need, in first-seen order."""
    return list(dict.fromkeys(c.reward for c in cell_list))


def seeds(config: Mapping[str, Any]) -> list[int]:
    """The training seeds (deduplicated, in config order)."""
    return list(dict.fromkeys(int(s) for s in config.get("grid", {}).get("seeds", [0])))


# ----------------------------------------------------------------------------- shots


def canonical_shots(shots: Sequence[int]) -> list[int]:
    """``evaluation.shots`` sorted and deduplicated: ``[4, 1, 2, 1]`` and ``[1, 2, 4]`` name one file."""
    return sorted({int(k) for k in shots})
