"""Reading and validating the report's inputs (eval records, training metrics, rewards).

Errors are one line naming the file and the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from icdrl.grid import Cell
from icdrl.records import METHODS as RECORD_METHODS
from icdrl.records import METRIC_COLUMNS, check_csv_complete, read_jsonl
from icdrl.rewards import MODES

__all__ = [
    "ABLATIONS",
    "BASELINES",
    "DISPLAY",
    "MODE_ORDER",
    "MethodInfo",
    "EvalData",
    "RewardGroups",
    "load_eval",
    "load_metrics",
    "load_rewards",
    "load_scored",
    "labelled_paths",
    "METRIC_COLUMNS",
]

#: ablations of another method (``icdrl.ablations``): reported against it, not as methods of their own
ABLATIONS = ("shuffled", "no_images")
#: every other method but the v3 grid cells, in the record's order (``icdrl.records.METHODS``)
BASELINES = tuple(m for m in RECORD_METHODS if m != "v3" and m not in ABLATIONS)
#: the report's order: the baselines, then the v3 cells, then the ablations
METHODS = BASELINES + ("v3",) + ABLATIONS
#: what a reader sees for a method (the record's ``method`` stays the key)
DISPLAY = {
    "similarity": "similarity (within pool)",
    "rices_image": "RICES (image)",
    "rices_text": "RICES (question)",
    "rices": "RICES (image+question)",
    "copy": "copy (RICES majority answer)",
}
ABLATION_DISPLAY = {"shuffled": "shuffled order", "no_images": "no demonstration images"}
MODE_ORDER = MODES


@dataclass(frozen=True)
class MethodInfo:
    """One evaluated method: a baseline, ``per_shot``, a v3 grid cell (seeds are replicates of it),
    or an ablation of one of them (``of``: the ablated method's key, ``of_label`` its name)."""

    key: str
    method: str
    cell: Cell | None = None
    of: str | None = None
    of_label: str | None = None

    @property
    def ablation(self) -> str | None:
        return self.method if self.method in ABLATIONS else None

    @property
    def mode(self) -> str | None:
        return self.cell.mode if self.cell else None

    @property
    def use_rank(self) -> bool | None:
        return self.cell.use_rank if self.cell else None

    def short(self) -> str:
        """The cell's label without its mode ('z-score hw=1 sw=1'), the method name otherwise."""
        if self.cell is None:
            return self.method
        return self.cell.label()[len(self.cell.mode) + 1 :]

    def long(self) -> str:
        """'v3 <cell label>' for a v3 cell, '<method> [<ablation>]' for an ablation, the method's
        display name otherwise ('similarity (within pool)', 'RICES (image)', ...)."""
        if self.ablation:
            return f"{self.of_label} [{ABLATION_DISPLAY[self.method]}]"
        return (
            DISPLAY.get(self.method, self.method)
            if self.cell is None
            else f"v3 {self.cell.label()}"
        )

    def sort_key(self) -> tuple:
        if self.ablation:
            return (len(BASELINES) + 1, str(self.of_label), ABLATIONS.index(self.method))
        if self.cell is None:
            return (BASELINES.index(self.method),)
        c = self.cell
        return (
            len(BASELINES),
            MODE_ORDER.index(c.mode) if c.mode in MODE_ORDER else len(MODE_ORDER),
            c.mode,
            len(c.train),
            0 if c.use_rank else 1,
            c.reward.knobs,
            c.slug,
        )


@dataclass
class EvalData:
    """Per-query accuracies: ``acc[(key, k)][seed]`` is a Series indexed by query_id.

    ``image_of[query_id]``: the query's image (records' ``image_id``; absent if not recorded),
    the cluster of the bootstrap. ``icds[(key, k)][seed][query_id]``: the demonstrations chosen
    (ids in prompt order). ``reward_orders``: which rewards files order every RL group the same
    way (:class:`icdrl.report.degenerate.RewardEquivalence`, set by the report when it has the
    rewards files).
    """

    methods: dict[str, MethodInfo]
    acc: dict[tuple[str, int], dict[int | None, pd.Series]]
    shots: list[int]
    sources: list[str] = field(default_factory=list)
    #: per_shot's choice: ``{(seed, k): (cell slug, validation accuracy, validation queries)}``
    per_shot: dict[tuple[int | None, int], tuple[str, float, int]] = field(default_factory=dict)
    image_of: dict = field(default_factory=dict)
    icds: dict = field(default_factory=dict)
    reward_orders: object | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    #: what the diagnostics read: ``answers[(key, k)][seed][query_id] = (prediction, icd_ids)``
    answers: dict[tuple[str, int], dict[int | None, dict]] = field(default_factory=dict)

    def clusters(self, query_ids) -> list | None:
        """The image of each query (None where unknown), or None when no record names an image."""
        if not self.image_of:
            return None
        return [self.image_of.get(q) for q in query_ids]

    def v3(self) -> list[MethodInfo]:
        return [m for m in self.methods.values() if m.method == "v3"]

    def main(self) -> list[MethodInfo]:
        """Every method but the ablations (those are reported against the method they ablate)."""
        return [m for m in self.methods.values() if not m.ablation]

    def ablations(self) -> list[MethodInfo]:
        return [m for m in self.methods.values() if m.ablation]

    def seeds(self, key: str, k: int) -> list[int | None]:
        runs = self.acc.get((key, k), {})
        return sorted(runs, key=lambda s: -1 if s is None else s)

    def has(self, key: str, k: int) -> bool:
        return bool(self.acc.get((key, k)))


def _require(rec: dict, name: str, where: str):
    if name not in rec:
        raise ValueError(f"{where}: missing field {name!r}")
    return rec[name]


def load_eval(paths: Sequence[str | os.PathLike]) -> EvalData:
    """Read ``icdrl.eval`` files into :class:`EvalData`, validating every record.

    A (method, cell, seed, k, query_id) seen twice is an error; so is a v3 record whose ``spec``
    (the cell's canonical dict) is missing or disagrees with its ``cell`` slug.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("report: eval_paths is empty; nothing to report")
    methods: dict[str, MethodInfo] = {}
    rows: dict[tuple[str, int, int | None], dict] = {}
    per_shot: dict[tuple[int | None, int], tuple[str, float, int]] = {}
    chosen: dict[tuple[str, int, int | None], dict] = {}
    image_of: dict = {}
    answers: dict[tuple[str, int], dict[int | None, dict]] = {}
    for path in paths:
        for i, rec in enumerate(read_jsonl(path, "icdrl.eval"), start=1):
            where = f"{path}: record {i}"
            method = _require(rec, "method", where)
            if method not in METHODS:
                raise ValueError(
                    f"{where}: field 'method' is {method!r}, expected one of {METHODS}"
                )
            cell = rec.get("cell")
            seed = rec.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"{where}: field 'seed' must be an int or null, got {seed!r}")
            k = _require(rec, "k", where)
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"{where}: field 'k' must be a non-negative int, got {k!r}")
            qid = _require(rec, "query_id", where)
            acc = _require(rec, "acc", where)
            if (
                isinstance(acc, bool)
                or not isinstance(acc, (int, float))
                or not (0.0 <= acc <= 1.0)
            ):
                raise ValueError(f"{where}: field 'acc' must be a number in [0, 1], got {acc!r}")
            if method == "v3":
                if not isinstance(cell, str) or not cell:
                    raise ValueError(f"{where}: v3 record needs a non-empty 'cell' slug")
                try:
                    c = Cell.from_dict(_require(rec, "spec", where) or {}, f"{where}: field 'spec'")
                except ValueError as e:
                    raise ValueError(str(e)) from None
                if c.slug != cell:
                    raise ValueError(
                        f"{where}: field 'cell' is {cell!r} but its spec says {c.slug!r}"
                    )
                info = MethodInfo(key=f"v3:{cell}", method="v3", cell=c)
            elif method in ABLATIONS:
                info = _ablation_info(method, rec.get("spec"), where)
            else:
                info = MethodInfo(key=method, method=method)
                if method == "per_shot":
                    spec = _require(rec, "spec", where) or {}
                    choice = (
                        str(cell),
                        float(spec.get("val_acc", math.nan)),
                        int(spec.get("n_val", 0)),
                    )
                    if per_shot.setdefault((seed, k), choice) != choice:
                        raise ValueError(
                            f"{where}: per_shot records of seed {seed} at k={k} name two cells"
                        )
            old = methods.setdefault(info.key, info)
            if old != info:
                raise ValueError(
                    f"{where}: cell {cell!r} has spec {info} but earlier records say {old}"
                )
            bucket = rows.setdefault((info.key, k, seed), {})
            if qid in bucket:
                raise ValueError(
                    f"{where}: duplicate record for method={info.key} seed={seed} k={k} query_id={qid!r}"
                )
            bucket[qid] = float(acc)
            icd_ids = rec.get("icd_ids")
            chosen.setdefault((info.key, k, seed), {})[qid] = (
                tuple(icd_ids) if isinstance(icd_ids, list) else None
            )
            answers.setdefault((info.key, k), {}).setdefault(seed, {})[qid] = (
                str(rec.get("prediction", "")),
                tuple(rec.get("icd_ids") or ()),
            )
            img = rec.get("image_id")
            if img is not None:
                if not isinstance(img, str):
                    raise ValueError(
                        f"{where}: field 'image_id' must be a string or null, got {img!r}"
                    )
                if image_of.setdefault(qid, img) != img:
                    raise ValueError(
                        f"{where}: query_id {qid!r} has image_id {img!r} but earlier records say "
                        f"{image_of[qid]!r}"
                    )
    ordered = dict(sorted(methods.items(), key=lambda kv: kv[1].sort_key()))
    acc: dict[tuple[str, int], dict[int | None, pd.Series]] = {}
    for (key, k, seed), qa in rows.items():
        s = pd.Series(qa, dtype=np.float64)
        s = s.sort_index() if _sortable(s.index) else s
        acc.setdefault((key, k), {})[seed] = s
    icds: dict = {}
    for (key, k, seed), qc in chosen.items():
        icds.setdefault((key, k), {})[seed] = qc
    shots = sorted({k for (_, k) in acc})
    return EvalData(
        methods=ordered,
        acc=acc,
        shots=shots,
        sources=[str(p) for p in paths],
        per_shot=per_shot,
        image_of=image_of,
        icds=icds,
        answers=answers,
    )


def _ablation_info(method: str, spec, where: str) -> MethodInfo:
    """The :class:`MethodInfo` of an ablation record: keyed by the ablation and the method it ablates."""
    of = (spec or {}).get("of") if isinstance(spec, dict) else None
    if not isinstance(of, dict) or of.get("method") not in BASELINES + ("v3",):
        raise ValueError(f"{where}: an ablation ({method}) needs spec.of naming the ablated method")
    if of["method"] == "v3":
        c = Cell.from_dict(of.get("spec") or {}, f"{where}: field 'spec.of.spec'")
        of_key, of_label = f"v3:{c.slug}", f"v3 {c.label()}"
    else:
        of_key, of_label = of["method"], DISPLAY.get(of["method"], of["method"])
    return MethodInfo(key=f"{method}:{of_key}", method=method, of=of_key, of_label=of_label)


def _sortable(index: pd.Index) -> bool:
    try:
        index.sort_values()
        return True
    except TypeError:
        return False


def labelled_paths(paths, what: str) -> dict[str, str]:
    """Normalise ``paths`` (mapping label → path, or a list of paths) to an ordered dict.

    For a list, each label is the path relative to the deepest folder common to all paths,
    without its suffix (``a/b/metrics.csv``, ``a/c/metrics.csv`` → ``b/metrics``,
    ``c/metrics``): unique and readable without any sidecar file.
    """
    if paths is None:
        return {}
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, Mapping):
        out = {}
        for label, p in paths.items():
            if not isinstance(label, str) or not label:
                raise ValueError(f"report: {what} labels must be non-empty strings, got {label!r}")
            out[label] = str(p)
        return out
    plist = [Path(p) for p in paths]
    if not plist:
        return {}
    if len(set(plist)) != len(plist):
        raise ValueError(f"report: {what} lists the same path twice")
    if len(plist) == 1:
        return {plist[0].stem: str(plist[0])}
    common = Path(os.path.commonpath([str(p.absolute()) for p in plist]))
    out = {}
    for p in plist:
        rel = p.absolute().relative_to(common)
        out[str(rel.with_suffix(""))] = str(p)
    return out


def load_metrics(paths) -> dict[str, pd.DataFrame]:
    """Read training-metrics CSVs (ARCHITECTURE columns). Rows keep file order."""
    out = {}
    for label, path in labelled_paths(paths, "metrics_paths").items():
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: metrics file not found")
        n_rows = check_csv_complete(path)
        df = pd.read_csv(path, comment="#")
        if len(df) != n_rows:  # pragma: no cover - check_csv_complete counted the same lines
            raise ValueError(f"{path}: {len(df)} rows read, its end line says {n_rows}")
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: metrics CSV lacks columns {missing}")
        for c in METRIC_COLUMNS[1:]:
            try:
                df[c] = pd.to_numeric(df[c], errors="raise")
            except (TypeError, ValueError):
                raise ValueError(f"{path}: column {c!r} holds a non-numeric value") from None
            if np.any(np.isinf(df[c].to_numpy(dtype=np.float64))):
                raise ValueError(f"{path}: column {c!r} contains inf")
        df["phase"] = df["phase"].astype(str)
        out[label] = df.reset_index(drop=True)
    return out


@dataclass
class RewardGroups:
    """The RL groups of one rewards file (one per anchor, candidate order kept)."""

    label: str
    path: str
    rewards: list[np.ndarray]
    hard: list[np.ndarray]
    missing: np.ndarray  # [G] missing-input counts
    soft: list[np.ndarray] | None = None  # per group; None if a file lacks the field
    anchors: list | None = None  # anchor_id per group

    @property
    def n_groups(self) -> int:
        return len(self.rewards)


def load_rewards(paths) -> dict[str, RewardGroups]:
    """Read ``icdrl.rewards`` files, checking list lengths and finiteness."""
    out = {}
    for label, path in labelled_paths(paths, "rewards_paths").items():
        rewards, hard, missing, soft, anchors = [], [], [], [], []
        for i, rec in enumerate(read_jsonl(path, "icdrl.rewards"), start=1):
            where = f"{path}: record {i}"
            r = np.asarray(_require(rec, "rewards", where), dtype=np.float64)
            h = np.asarray(_require(rec, "hard", where), dtype=np.float64)
            if r.ndim != 1 or h.shape != r.shape:
                raise ValueError(f"{where}: 'rewards' and 'hard' must be lists of equal length")
            if not np.all(np.isfinite(r)):
                raise ValueError(f"{where}: field 'rewards' contains NaN or inf")
            if not np.all((h == 0) | (h == 1)):
                raise ValueError(f"{where}: field 'hard' must hold 0/1 values")
            rewards.append(r)
            hard.append(h)
            missing.append(int(rec.get("missing", 0) or 0))
            anchors.append(rec.get("anchor_id"))
            sv = rec.get("soft")
            if (
                soft is not None
                and isinstance(sv, list)
                and len(sv) == len(r)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in sv)
            ):
                soft.append(np.asarray(sv, dtype=np.float64))
            else:  # a missing or null soft value: unknown for this file
                soft = None
        out[label] = RewardGroups(
            label, str(path), rewards, hard, np.asarray(missing, dtype=np.int64), soft, anchors
        )
    return out


def load_scored(path) -> pd.DataFrame | None:
    """One row per scored candidate: anchor_id, source, vqa_correct, vqa_acc_score, info_score."""
    if path is None:
        return None
    rows = []
    for i, rec in enumerate(read_jsonl(path, "icdrl.scored"), start=1):
        where = f"{path}: record {i}"
        aid = _require(rec, "anchor_id", where)
        for j, c in enumerate(_require(rec, "candidates", where)):
            cw = f"{where} candidate {j}"
            rows.append(
                {
                    "anchor_id": aid,
                    "source": str(_require(c, "source", cw)),
                    "vqa_correct": _num_or_none(c.get("vqa_correct")),
                    "vqa_acc_score": _num_or_none(c.get("vqa_acc_score")),
                    "info_score": _num_or_none(c.get("info_score")),
                }
            )
    return pd.DataFrame(
        rows, columns=["anchor_id", "source", "vqa_correct", "vqa_acc_score", "info_score"]
    )


def _num_or_none(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
