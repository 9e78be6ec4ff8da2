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

from icdrl.records import check_csv_complete, read_jsonl

__all__ = [
    "BASELINES",
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

BASELINES = ("zero_shot", "random", "similarity", "v2")
METHODS = BASELINES + ("v3",)
MODE_ORDER = ("legacy", "hard_plus_soft", "hard_plus_soft_v2", "hybrid")
METRIC_COLUMNS = (
    "phase", "epoch", "loss", "ppo_loss", "kl", "ratio_mean", "ratio_max", "clip_frac",
    "adv_std", "groups_kept", "groups_skipped", "val_reward",
)


def _fmt_w(w: float | None) -> str:
    if w is None:
        return "-"
    return f"{w:g}"


@dataclass(frozen=True)
class MethodInfo:
    """One evaluated method: a baseline, or a v3 grid cell (seeds are replicates of it)."""

    key: str
    method: str
    cell: str | None = None
    mode: str | None = None
    use_rank: bool | None = None
    hard_weight: float | None = None
    soft_weight: float | None = None
    alpha: float | None = None
    beta: float | None = None
    info_scale: float | None = None

    @property
    def weights(self) -> tuple[float | None, float | None]:
        return (self.hard_weight, self.soft_weight)

    @property
    def uses_weights(self) -> bool:
        return self.hard_weight is not None or self.soft_weight is not None

    def short(self) -> str:
        """A compact label: 'rank, w=(1,1)' for a v3 cell, the method name otherwise."""
        if self.method != "v3":
            return self.method
        parts = ["rank" if self.use_rank else "z-score"]
        if self.uses_weights:
            parts.append(f"w=({_fmt_w(self.hard_weight)},{_fmt_w(self.soft_weight)})")
        if self.alpha is not None or self.beta is not None:
            parts.append(f"α={_fmt_w(self.alpha)},β={_fmt_w(self.beta)}")
        return ", ".join(parts)

    def long(self) -> str:
        """'v3 <mode> rank, w=(1,1)' for a v3 cell, the method name otherwise."""
        return self.method if self.method != "v3" else f"v3 {self.mode} {self.short()}"

    def sort_key(self) -> tuple:
        if self.method != "v3":
            return (BASELINES.index(self.method),)
        mode_rank = MODE_ORDER.index(self.mode) if self.mode in MODE_ORDER else len(MODE_ORDER)
        knobs = tuple(-math.inf if v is None else v
                      for v in (self.hard_weight, self.soft_weight, self.alpha, self.beta, self.info_scale))
        return (len(BASELINES), mode_rank, self.mode or "", 0 if self.use_rank else 1) + knobs + (self.cell or "",)


@dataclass
class EvalData:
    """Per-query accuracies: ``acc[(key, k)][seed]`` is a Series indexed by query_id."""

    methods: dict[str, MethodInfo]
    acc: dict[tuple[str, int], dict[int | None, pd.Series]]
    shots: list[int]
    sources: list[str] = field(default_factory=list)

    def v3(self) -> list[MethodInfo]:
        return [m for m in self.methods.values() if m.method == "v3"]

    def seeds(self, key: str, k: int) -> list[int | None]:
        runs = self.acc.get((key, k), {})
        return sorted(runs, key=lambda s: -1 if s is None else s)

    def has(self, key: str, k: int) -> bool:
        return bool(self.acc.get((key, k)))


def _opt_float(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where} must be a finite number or null, got {v!r}")
    return float(v)


def _require(rec: dict, name: str, where: str):
    if name not in rec:
        raise ValueError(f"{where}: missing field {name!r}")
    return rec[name]


def load_eval(paths: Sequence[str | os.PathLike]) -> EvalData:
    """Read ``icdrl.eval`` files into :class:`EvalData`, validating every record.

    A (method, cell, seed, k, query_id) seen twice is an error; so is a v3 cell whose records
    disagree on its knobs, or a v3 record without the knob fields.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("report: eval_paths is empty; nothing to report")
    methods: dict[str, MethodInfo] = {}
    rows: dict[tuple[str, int, int | None], dict] = {}
    for path in paths:
        for i, rec in enumerate(read_jsonl(path, "icdrl.eval"), start=1):
            where = f"{path}: record {i}"
            method = _require(rec, "method", where)
            if method not in METHODS:
                raise ValueError(f"{where}: field 'method' is {method!r}, expected one of {METHODS}")
            cell = rec.get("cell")
            seed = rec.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"{where}: field 'seed' must be an int or null, got {seed!r}")
            k = _require(rec, "k", where)
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"{where}: field 'k' must be a non-negative int, got {k!r}")
            qid = _require(rec, "query_id", where)
            acc = _require(rec, "acc", where)
            if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not (0.0 <= acc <= 1.0):
                raise ValueError(f"{where}: field 'acc' must be a number in [0, 1], got {acc!r}")
            if method == "v3":
                if not isinstance(cell, str) or not cell:
                    raise ValueError(f"{where}: v3 record needs a non-empty 'cell' slug")
                mode = _require(rec, "mode", where)
                use_rank = _require(rec, "use_rank", where)
                if not isinstance(use_rank, bool):
                    raise ValueError(f"{where}: field 'use_rank' must be true/false, got {use_rank!r}")
                info = MethodInfo(
                    key=f"v3:{cell}",
                    method="v3",
                    cell=cell,
                    mode=str(mode),
                    use_rank=use_rank,
                    hard_weight=_opt_float(rec.get("hard_weight"), f"{where}: field 'hard_weight'"),
                    soft_weight=_opt_float(rec.get("soft_weight"), f"{where}: field 'soft_weight'"),
                    alpha=_opt_float(rec.get("alpha"), f"{where}: field 'alpha'"),
                    beta=_opt_float(rec.get("beta"), f"{where}: field 'beta'"),
                    info_scale=_opt_float(rec.get("info_scale"), f"{where}: field 'info_scale'"),
                )
            else:
                info = MethodInfo(key=method, method=method)
            old = methods.setdefault(info.key, info)
            if old != info:
                raise ValueError(f"{where}: cell {cell!r} has knobs {info} but earlier records say {old}")
            bucket = rows.setdefault((info.key, k, seed), {})
            if qid in bucket:
                raise ValueError(
                    f"{where}: duplicate record for method={info.key} seed={seed} k={k} query_id={qid!r}"
                )
            bucket[qid] = float(acc)
    ordered = dict(sorted(methods.items(), key=lambda kv: kv[1].sort_key()))
    acc: dict[tuple[str, int], dict[int | None, pd.Series]] = {}
    for (key, k, seed), qa in rows.items():
        s = pd.Series(qa, dtype=np.float64)
        s = s.sort_index() if _sortable(s.index) else s
        acc.setdefault((key, k), {})[seed] = s
    shots = sorted({k for (_, k) in acc})
    return EvalData(methods=ordered, acc=acc, shots=shots, sources=[str(p) for p in paths])


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

    @property
    def n_groups(self) -> int:
        return len(self.rewards)


def load_rewards(paths) -> dict[str, RewardGroups]:
    """Read ``icdrl.rewards`` files, checking list lengths and finiteness."""
    out = {}
    for label, path in labelled_paths(paths, "rewards_paths").items():
        rewards, hard, missing = [], [], []
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
        out[label] = RewardGroups(label, str(path), rewards, hard, np.asarray(missing, dtype=np.int64))
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
    return pd.DataFrame(rows, columns=["anchor_id", "source", "vqa_correct", "vqa_acc_score", "info_score"])


def _num_or_none(v):
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
