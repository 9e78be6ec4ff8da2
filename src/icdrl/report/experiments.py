"""One table per configured experiment (docs/science.md §9, §10): every level of its contrasted axis against
the reference level, per shot, with paired bootstrap intervals.

An experiment arrives as :meth:`icdrl.grid.Experiment.as_dict` (the report rule's ``experiments``
param): its axes, contrast, reference and members (levels → cell). Its points are grouped by
**context** (their levels on the other axes); within a context each non-reference level is
compared with the reference level's cell at every shot. Two levels that train the same cell
(the mode ignores the contrasted knob, or the setting has no effect) are named as such and
not tested; a pair of cells already compared under another context is listed once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from icdrl.grid import PAIR_AXES, Cell, fmt_float
from icdrl.rewards import KNOBS

from .compare import compare, method_accuracy
from .inputs import EvalData
from .tables import (
    _COMP_COLS,
    ALL_SHOTS,
    Table,
    _ci,
    _comp_display,
    _frame,
    _na_rows,
    _pending,
    _resolve,
    _shot_key,
)

__all__ = ["ExperimentSpec", "experiment_table", "experiment_names", "fmt_level"]


def fmt_level(axis: str, v: Any) -> str:
    """A level as a reader sees it: ``rank``/``z-score``, ``(1, 0.5)``, ``0.2``, ``legacy``."""
    if axis == "use_rank":
        return "rank" if v else "z-score"
    if axis in PAIR_AXES:
        return "(" + ", ".join(fmt_float(float(x)) for x in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return fmt_float(v)
    return "null" if v is None else str(v)


def _canon(axis: str, v: Any) -> Any:
    return tuple(float(x) for x in v) if axis in PAIR_AXES else v


@dataclass(frozen=True)
class ExperimentSpec:
    """The report's view of one experiment."""

    name: str
    title: str
    contrast: str
    reference: Any
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    members: tuple[tuple[tuple[tuple[str, Any], ...], Cell], ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExperimentSpec:
        try:
            axes = tuple((a, tuple(_canon(a, v) for v in lv)) for a, lv in d["axes"])
            members = tuple(
                (
                    tuple((a, _canon(a, m["levels"][a])) for a, _ in axes),
                    Cell.from_dict(m["cell"], f"experiment {d['name']}"),
                )
                for m in d["members"]
            )
            return cls(
                str(d["name"]),
                str(d.get("title") or d["name"]),
                str(d["contrast"]),
                _canon(d["contrast"], d["reference"]),
                axes,
                members,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"report: experiment {d.get('name', '?')!r} is malformed ({e})"
            ) from None

    def context_label(self, levels: Sequence[tuple[str, Any]]) -> str:
        """The point's levels on the other axes that vary: ``hard_plus_soft, z-score``."""
        varied = {a for a, lv in self.axes if len(lv) > 1 and a != self.contrast}
        parts = []
        for a, v in levels:
            if a in varied:
                parts.append(
                    fmt_level(a, v)
                    if a in ("reward_modes", "use_rank")
                    else f"{a}={fmt_level(a, v)}"
                )
        return ", ".join(parts)


def experiment_names(experiments: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(e["name"]) for e in experiments]


def _same_cell_reason(spec: ExperimentSpec, cell: Cell) -> str:
    axis = spec.contrast
    if axis == "reward_modes":
        return "same cell as the reference"
    if axis in PAIR_AXES or axis in KNOBS:
        return f"same cell as the reference: {cell.mode} does not read {axis}"
    if axis == "use_rank":
        return "same cell as the reference"
    return f"same cell as the reference: {axis} has no effect in this setting"


_COLS = [
    "experiment",
    "contrast",
    "context",
    "level",
    "reference",
    "cell",
    "reference_cell",
    "acc_level",
    "acc_level_low",
    "acc_level_high",
]


def experiment_table(
    data: EvalData, spec: ExperimentSpec, n_boot: int, seed: int, level: float = 0.95
) -> Table:
    """Δ = accuracy(level) − accuracy(reference level) per context and shot, in points."""
    rows: list[dict] = []
    contrast, ref = spec.contrast, spec.reference
    by_context: dict[tuple, dict[Any, Cell]] = {}
    for levels, cell in spec.members:
        ctx = tuple((a, v) for a, v in levels if a != contrast)
        by_context.setdefault(ctx, {})[dict(levels)[contrast]] = cell
    compared: dict[tuple[str, str], str] = {}
    for ctx, cells in by_context.items():
        label = spec.context_label(ctx)
        ref_cell = cells.get(ref)
        for lev, cell in cells.items():
            if lev == ref:
                continue
            lead = {
                "experiment": spec.name,
                "contrast": contrast,
                "context": label,
                "level": fmt_level(contrast, lev),
                "reference": fmt_level(contrast, ref),
                "cell": cell.slug,
                "reference_cell": ref_cell.slug if ref_cell else "",
            }
            if ref_cell is None:
                rows += [
                    lead | r for r in _na_rows(data.shots, "the reference level was not run here")
                ]
                continue
            if cell == ref_cell:
                rows.append(
                    lead | {"k": ALL_SHOTS, "n_queries": 0, "note": _same_cell_reason(spec, cell)}
                )
                continue
            key = (cell.slug, ref_cell.slug)
            if key in compared:
                rows.append(
                    lead
                    | {
                        "k": ALL_SHOTS,
                        "n_queries": 0,
                        "note": f"same comparison as under '{compared[key] or 'all'}'",
                    }
                )
                continue
            compared[key] = label
            a, b = f"v3:{cell.slug}", f"v3:{ref_cell.slug}"
            for k in data.shots:
                acc = method_accuracy(data, a, k, n_boot, seed, level)
                accd = (
                    {
                        "acc_level": acc.interval.estimate,
                        "acc_level_low": acc.interval.low,
                        "acc_level_high": acc.interval.high,
                    }
                    if acc
                    else {}
                )
                rows.append(lead | accd | _pending(compare(data, a, b, k, n_boot, seed, level)))
    if not rows:
        rows = [
            {"experiment": spec.name, "contrast": contrast} | r
            for r in _na_rows(data.shots, f"{contrast} has a single level")
        ]
    rows, fam = _resolve(rows, data)  # the experiment's comparisons are one family (Holm)
    df = _frame(rows, _COLS + _COMP_COLS)
    sections = []
    for ctx in dict.fromkeys(df["context"].fillna("")):
        sub = df[df["context"].fillna("") == ctx]
        sub = sub.iloc[sorted(range(len(sub)), key=lambda i: (_shot_key(sub["k"]).iloc[i],))]
        disp = _comp_display(
            sub, {"level": contrast}, f"Δ vs {fmt_level(contrast, ref)} (pts) [95% CI]"
        )
        disp.insert(
            2,
            "accuracy [95% CI]",
            [
                "" if pd.isna(r.acc_level) else _ci(r.acc_level, r.acc_level_low, r.acc_level_high)
                for r in sub.itertuples()
            ],
        )
        sections.append((ctx or None, disp))
    return Table(
        f"exp-{spec.name}",
        spec.title,
        f"Experiment '{spec.name}': Δ = accuracy({contrast} = level) − accuracy({contrast} = "
        f"{fmt_level(contrast, ref)}), same other settings and seed, in points, paired over test queries. "
        "Levels that train the same cell as the reference are named, not tested; significance is judged "
        "after Holm's correction over the experiment's comparisons (p_holm).",
        df,
        sections,
        fam,
    )
