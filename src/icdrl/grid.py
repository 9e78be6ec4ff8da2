"""The experiment grid and the results layout (SPEC §9).

A grid **cell** is one reward setting (mode plus the knobs that mode reads) and one advantage
kind (``use_rank``); seeds are a separate dimension. The grid is the union of cross products:
the top-level ``grid`` lists (``reward_modes × use_rank × weights``) and every entry of
``grid.experiments`` (its own lists; keys it leaves out default to the top-level lists).
Cells that differ only in knobs their mode ignores (:func:`icdrl.rewards.knobs_used`) are merged
into one, so they become one job, not several.

Paths: every output path carries exactly the settings its content depends on. Numbers appear in
one canonical spelling (:func:`fmt_float`); sections too long for a path appear as the short
hash of their canonical JSON (:func:`short_hash`) — only of that section, so unrelated edits do
not invalidate results. :class:`Layout` builds every path pattern of the workflow from a config.

This module is imported by the Snakefile at parse time: keep it free of torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any

from icdrl.rewards import KNOBS, MODES, knobs_used

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


# ----------------------------------------------------------------------------- cells

#: short key of each reward knob in a slug, in slug order
KNOB_KEYS: dict[str, str] = {
    "hard_weight": "hw",
    "soft_weight": "sw",
    "alpha": "a",
    "beta": "b",
    "info_scale": "is",
}
ADV = {True: "rank", False: "zscore"}
_ADV_INV = {v: k for k, v in ADV.items()}
_NUM = r"-?[0-9]+(?:\.[0-9]+)?"
_KEY_INV = {v: k for k, v in KNOB_KEYS.items()}
#: regex of a reward slug (a Snakemake wildcard constraint)
REWARD_SLUG_RE = (
    "(?:" + "|".join(sorted(MODES, key=len, reverse=True)) + ")"
    + "(?:-(?:" + "|".join(KNOB_KEYS.values()) + ")" + _NUM + ")*"
)


@dataclass(frozen=True, order=True)
class RewardSpec:
    """One reward file: a mode and the knobs it reads (the others are ``None``)."""

    mode: str
    hard_weight: float | None = None
    soft_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    info_scale: float | None = None

    @property
    def slug(self) -> str:
        """``mode`` then ``-<key><value>`` per used knob, e.g. ``hard_plus_soft-hw2-sw0.5``."""
        parts = [self.mode]
        for knob, key in KNOB_KEYS.items():
            v = getattr(self, knob)
            if v is not None:
                parts.append(f"{key}{fmt_float(v)}")
        return "-".join(parts)

    def knobs(self) -> dict[str, float]:
        """The knobs this mode reads, by name."""
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}


def reward_spec(mode: str, **knobs: float | None) -> RewardSpec:
    """The canonical :class:`RewardSpec` of ``mode``: knobs the mode ignores are dropped (set to
    ``None``), the ones it reads are required. ``hybrid`` reads ``hard_weight`` only through
    clip(hard_weight, 0, 1) (SPEC §6), so it is stored clipped: hw=2 and hw=1 are one cell."""
    used = knobs_used(mode)
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown reward knob(s) {sorted(unknown)}; known: {list(KNOBS)}")
    vals: dict[str, float | None] = {}
    for k in KNOBS:
        if k not in used:
            vals[k] = None
            continue
        v = knobs.get(k)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"reward mode {mode}: knob {k} needs a finite number, got {v!r}")
        v = float(v)
        if mode == "hybrid" and k == "hard_weight":
            v = min(1.0, max(0.0, v))
        vals[k] = v
    return RewardSpec(mode, **vals)


def parse_reward_slug(slug: str) -> RewardSpec:
    """Inverse of :attr:`RewardSpec.slug`; raises ``ValueError`` naming the slug if malformed."""
    if not re.fullmatch(REWARD_SLUG_RE, slug):
        raise ValueError(f"not a reward slug: {slug!r} (expected e.g. 'hard_plus_soft-hw1-sw1')")
    mode = next(m for m in sorted(MODES, key=len, reverse=True) if slug == m or slug.startswith(m + "-"))
    knobs: dict[str, float] = {}
    keys = "|".join(KNOB_KEYS.values())
    for key, num in re.findall(r"-(" + keys + r")(" + _NUM + ")", slug[len(mode):]):
        name = _KEY_INV[key]
        if name in knobs:
            raise ValueError(f"reward slug {slug!r} names {key} twice")
        knobs[name] = float(num)
    extra = set(knobs) - knobs_used(mode)
    if extra:
        raise ValueError(f"reward slug {slug!r}: mode {mode} ignores {sorted(extra)}")
    try:
        spec = reward_spec(mode, **{k: knobs.get(k) for k in knobs_used(mode)})
    except ValueError as e:
        raise ValueError(f"reward slug {slug!r}: {e}") from None
    if spec.slug != slug:
        raise ValueError(f"reward slug {slug!r} is not canonical (expected {spec.slug!r})")
    return spec


@dataclass(frozen=True, order=True)
class Cell:
    """One v3 training setting: a reward setting and the advantage kind (SPEC §7, §9)."""

    mode: str
    use_rank: bool
    hard_weight: float | None = None
    soft_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    info_scale: float | None = None

    @property
    def reward(self) -> RewardSpec:
        return RewardSpec(self.mode, self.hard_weight, self.soft_weight, self.alpha, self.beta,
                          self.info_scale)

    @property
    def adv(self) -> str:
        """``rank`` or ``zscore``: the path segment of ``use_rank``."""
        return ADV[self.use_rank]

    @property
    def slug(self) -> str:
        """``<reward slug>-<adv>``, e.g. ``hard_plus_soft-hw2-sw0.5-zscore``."""
        return f"{self.reward.slug}-{self.adv}"

    def as_record(self) -> dict[str, Any]:
        """The cell's knobs as a plain dict (what v3 evaluation records carry)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def make_cell(spec: RewardSpec, use_rank: bool) -> Cell:
    return Cell(spec.mode, bool(use_rank), spec.hard_weight, spec.soft_weight, spec.alpha,
                spec.beta, spec.info_scale)


def parse_cell(reward_slug: str, adv: str) -> Cell:
    """The cell of a ``{reward}`` and ``{adv}`` path segment pair."""
    if adv not in _ADV_INV:
        raise ValueError(f"advantage segment must be one of {sorted(_ADV_INV)}, got {adv!r}")
    return make_cell(parse_reward_slug(reward_slug), _ADV_INV[adv])


def _pairs(value: Any, name: str) -> list[tuple[float, float]]:
    out = []
    for p in value:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"config key {name}: each entry must be a pair [x, y], got {p!r}")
        out.append((float(p[0]), float(p[1])))
    return out


def _expand(block: Mapping[str, Any], defaults: Mapping[str, Any], rewards_cfg: Mapping[str, Any],
            where: str) -> list[Cell]:
    """Cross product of one grid block; missing lists come from ``defaults``."""
    get = lambda k: block[k] if k in block else defaults.get(k)  # noqa: E731
    modes = get("reward_modes") or []
    use_rank = get("use_rank")
    use_rank = [False] if use_rank is None else use_rank
    weights = _pairs(get("weights") or [[1.0, 1.0]], f"{where}.weights")
    ab_default = [[rewards_cfg.get("alpha", 1.0), rewards_cfg.get("beta", 0.0)]]
    alpha_beta = _pairs(get("alpha_beta") or ab_default, f"{where}.alpha_beta")
    info_scale = float(rewards_cfg.get("info_scale", 10.0))
    cells = []
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"config key {where}.reward_modes: unknown mode {mode!r}; valid: {', '.join(MODES)}")
        for hw, sw in weights:
            for a, b in alpha_beta:
                spec = reward_spec(mode, **{k: v for k, v in dict(
                    hard_weight=hw, soft_weight=sw, alpha=a, beta=b, info_scale=info_scale
                ).items() if k in knobs_used(mode)})
                for r in use_rank:
                    cells.append(make_cell(spec, bool(r)))
    return cells


def reward_specs(cell_list: Sequence[Cell]) -> list[RewardSpec]:
    """The distinct reward files the cells need, in first-seen order."""
    return list(dict.fromkeys(c.reward for c in cell_list))


def seeds(config: Mapping[str, Any]) -> list[int]:
    """The training seeds (deduplicated, in config order)."""
    return list(dict.fromkeys(int(s) for s in config.get("grid", {}).get("seeds", [0])))


def experiment_cells(config: Mapping[str, Any]) -> dict[str, list[Cell]]:
    """Cells per named block (``grid`` for the top-level cross product), each deduplicated but
    not yet merged across blocks: which experiment asked for which cell."""
    grid = config.get("grid", {})
    rewards_cfg = config.get("rewards", {})
    out = {}
    top = list(dict.fromkeys(_expand(grid, {}, rewards_cfg, "grid")))
    if top:
        out["grid"] = top
    for name, block in (grid.get("experiments") or {}).items():
        out[name] = list(dict.fromkeys(_expand(block, grid, rewards_cfg, f"grid.experiments.{name}")))
    return out


def cells(config: Mapping[str, Any]) -> list[Cell]:
    """The merged, deduplicated grid cells of a (validated) config, in first-seen order."""
    merged = list(dict.fromkeys(c for block in experiment_cells(config).values() for c in block))
    if not merged:
        raise ValueError("config key grid: the grid is empty (no reward_modes at top level or in any experiment)")
    return merged


# ----------------------------------------------------------------------------- layout

def canonical_shots(shots: Sequence[int]) -> list[int]:
    """``evaluation.shots`` sorted and deduplicated: ``[4, 1, 2, 1]`` and ``[1, 2, 4]`` name one file."""
    return sorted({int(k) for k in shots})


#: the ``{method}`` segment of a baseline's eval file: random carries its seed (random-r0)
BASELINE_RE = "zero_shot|similarity|random-r[0-9]+"


def parse_baseline(segment: str) -> tuple[str, int | None]:
    """``(method, seed)`` of a baseline eval file name segment (``random-r3`` -> random, 3)."""
    if not re.fullmatch(BASELINE_RE, segment):
        raise ValueError(f"not a baseline method segment: {segment!r} (expected {BASELINE_RE})")
    if segment.startswith("random-r"):
        return "random", int(segment[len("random-r"):])
    return segment, None


def dataset_tag(ds: Mapping[str, Any]) -> str:
    """``results/<tag>``: the dataset's label (default: its name) plus any seeded subset, e.g.
    ``easyvqa-train1000-eval300`` (``s<seed>`` is added for a non-zero subset seed). The files a
    label stands for are the user's to keep fixed: change the label when the data changes."""
    tag = ds.get("label") or ds["name"]
    for split in ("train", "eval"):
        sec = ds.get(split) or {}
        if sec.get("subset") is not None:
            tag += f"-{split}{sec['subset']}"
            if sec.get("subset_seed", 0):
                tag += f"s{sec['subset_seed']}"
    return tag


def _join(*parts: str) -> str:
    return str(PurePosixPath(*parts))


class Layout:
    """Every path pattern of the workflow for one config.

    Config-dependent segments are filled in; the remaining ``{wildcards}`` are the dimensions
    one config spans: ``split`` (train/eval), ``shard``, ``reward``, ``adv``, ``seed``,
    ``method``. See config/README.md for the tree.
    """

    def __init__(self, config: Mapping[str, Any], results: str = "results"):
        ds, model, emb, pools = (config[k] for k in ("dataset", "model", "embeddings", "pools"))
        cand, scoring, train, ev = (config[k] for k in ("candidates", "scoring", "train", "evaluation"))
        self.config = config
        self.n_shards = int(cand["shards"])
        self.embedded = model["kind"] == "embedded"
        root = _join(results, dataset_tag(ds))
        self.root = root

        # the LVLM: the embedded model depends on its training knobs only
        self.lvlm_tag = f"{model['name']}-{short_hash(content(config['embedded_lvlm'], 'embedded_lvlm'))}" if self.embedded else None
        # (it is trained on easy-VQA whatever the dataset section says: not under the dataset)
        lvlm_dir = _join(results, "lvlm", self.lvlm_tag) if self.embedded else None
        self.lvlm_model = _join(lvlm_dir, "model") if self.embedded else None
        self.icl_check = _join(lvlm_dir, "icl_check.json") if self.embedded else None
        self.model_path = self.lvlm_model if self.embedded else str(model["path"])

        # model tag: name (+ embedded hash) + non-default output-changing settings
        mtag = self.lvlm_tag if self.embedded else model["name"]
        if model.get("dtype", "float32") != "float32":
            mtag += f"-{model['dtype']}"
        if model.get("system_prompt"):
            mtag += f"-sp{short_hash(model['system_prompt'], 6)}"
        self.model_tag = mtag

        # embeddings: the encoder (+ the model for the lvlm encoder)
        if emb["encoder"] == "lvlm":
            self.enc_tag = f"lvlm-{mtag}"
        else:
            self.enc_tag = emb.get("name") or f"clip-{PurePosixPath(str(emb['clip_path'])).name}"
        self.emb = _join(root, "emb", self.enc_tag, "{split}.npz")

        # pools: sampler, K, pool seed (+ n per role)
        self.pool_tag = f"{pools['sampler']}-K{pools['size']}-s{pools['seed']}"
        self.n_anchors, self.n_test = int(pools["n_anchors"]), int(pools["n_test"])
        self.pools = _join(root, "pools", self.enc_tag, self.pool_tag, "{role}-n{n}.jsonl")
        self.pools_anchors = self.pools.format(role="anchors", n=self.n_anchors)
        self.pools_test = self.pools.format(role="test", n=self.n_test)

        # everything the LVLM answered lives under <model>/<encoder>/<pools>
        # (encoder "lvlm" is this model itself: no need to repeat its tag)
        run = _join(root, mtag, "lvlm" if emb["encoder"] == "lvlm" else self.enc_tag, self.pool_tag)
        self.run_dir = run
        self.cand_tag = (
            f"B{cand['beam_width']}-D{cand['depth']}-{cand['insert']}"
            f"-r{cand['n_random']}-m{cand['n_similar']}-s{cand['seed']}"
        )
        cand_dir = _join(run, f"anchors-n{self.n_anchors}", self.cand_tag)
        self.cand_dir = cand_dir
        self.candidates_shard = _join(cand_dir, "shards", f"candidates-{{shard}}-of-{self.n_shards}.jsonl")
        self.candidates = _join(cand_dir, "candidates.jsonl")
        self.scored_tag = f"scored-t{fmt_float(scoring['correct_threshold'])}-mnt{model['max_new_tokens']}"
        scored_dir = _join(cand_dir, self.scored_tag)
        self.scored_shard = _join(scored_dir, "shards", f"scored-{{shard}}-of-{self.n_shards}.jsonl")
        self.scored = _join(scored_dir, "scored.jsonl")
        self.rewards = _join(scored_dir, "rewards", "{reward}.jsonl")

        # training: v2 on candidates; v3 on v2 + scored + rewards
        self.v2_tag = f"v2-{short_hash(content(train['v2'], 'train.v2'))}"
        v2_dir = _join(cand_dir, self.v2_tag, "seed{seed}")
        self.v2_ckpt = _join(v2_dir, "selector.pt")
        self.v2_metrics = _join(v2_dir, "metrics.csv")
        self.v3_tag = f"v3-{short_hash({'v2': content(train['v2'], 'train.v2'), 'v3': content(train['v3'], 'train.v3')})}"
        v3_dir = _join(scored_dir, self.v3_tag, "{reward}", "{adv}", "seed{seed}")
        self.v3_ckpt = _join(v3_dir, "selector.pt")
        self.v3_metrics = _join(v3_dir, "metrics.csv")

        # evaluation: test queries (n_test), shots, generation length (+ random's seed)
        self.eval_tag = (
            f"eval-n{self.n_test}-k{'.'.join(str(k) for k in canonical_shots(ev['shots']))}-mnt{model['max_new_tokens']}"
        )
        self.eval_baseline = _join(run, self.eval_tag, "{method}.jsonl")
        self.baselines = ["zero_shot", f"random-r{ev['random_seed']}", "similarity"]
        self.eval_v2 = _join(v2_dir, f"{self.eval_tag}.jsonl")
        self.eval_v3 = _join(v3_dir, f"{self.eval_tag}.jsonl")

        # the report covers this config's grid; one per dataset and model
        self.report_dir = _join(root, mtag, "report")

    # -------------------------------------------------------------- expansions for targets

    def cells(self) -> list[Cell]:
        return cells(self.config)

    def seeds(self) -> list[int]:
        return seeds(self.config)

    def reward_specs(self) -> list[RewardSpec]:
        return reward_specs(self.cells())

    def all_rewards(self) -> list[str]:
        return [self.rewards.format(reward=r.slug) for r in self.reward_specs()]

    def all_v2(self, pattern: str) -> list[str]:
        return [pattern.format(seed=s) for s in self.seeds()]

    def all_v3(self, pattern: str) -> list[str]:
        return [pattern.format(reward=c.reward.slug, adv=c.adv, seed=s)
                for c in self.cells() for s in self.seeds()]

    def all_eval(self) -> list[str]:
        return ([self.eval_baseline.format(method=m) for m in self.baselines]
                + self.all_v2(self.eval_v2) + self.all_v3(self.eval_v3))

    def labelled_metrics(self) -> dict[str, str]:
        """Training-metrics CSVs by label (``v2 seed0``, ``v3 <cell slug> seed0``)."""
        labels = ([f"v2 seed{s}" for s in self.seeds()]
                  + [f"v3 {c.slug} seed{s}" for c in self.cells() for s in self.seeds()])
        return dict(zip(labels, self.all_v2(self.v2_metrics) + self.all_v3(self.v3_metrics), strict=True))

    def shards(self, pattern: str) -> list[str]:
        return [pattern.format(shard=i) for i in range(self.n_shards)]

