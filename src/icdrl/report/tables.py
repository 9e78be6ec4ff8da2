"""The report's tables: pandas frames for CSV plus display sections for Markdown/HTML.

Units: accuracies and deltas are VQA accuracy in percentage points (0–100). Every delta
carries a 95% paired bootstrap interval (seeds, then image clusters of test queries; see
:mod:`.bootstrap`); trend is "up"/"down" when the interval excludes 0 and "n.s." (not
distinguishable) when it contains 0. Each delta table is one family (:func:`.compare.family`):
``p`` is the bootstrap p-value, ``p_holm``/``significant_holm`` Holm's step-down over the
family's tested comparisons, ``mde`` the minimum detectable effect (80% power, two-sided 5%).
``status`` is "tested", "cannot differ" (zero by construction: not tested, the note says why),
"duplicate" (the same selectors as an earlier row: counted once) or "not available" (the note
says why).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from icdrl.grid import reward_spec
from icdrl.records import atomic_write_text

from .compare import Comparison, compare, family, method_accuracy
from .inputs import MODE_ORDER, EvalData, MethodInfo, RewardGroups

__all__ = [
    "Table",
    "TABLE_NAMES",
    "accuracy_table",
    "vs_legacy_table",
    "vs_v2_table",
    "rl_groups_table",
    "rl_advantages_table",
    "sources_table",
    "training_table",
    "write_table",
    "group_stats",
    "within_group_gaps",
    "advantage_values",
]

TABLE_NAMES = (
    "accuracy",
    "vs_legacy",
    "vs_v2",
    "per_shot",
    "rl_groups",
    "rl_advantages",
    "candidates_by_source",
    "training_summary",
    "diagnostics",  # .diagnostics
    "ablations",  # .diagnostics
)
POS_RATIO_THRESHOLD = 0.2  # the reference implementation's plan-4 min_positive_ratio
ADV_MIN_STD = 0.1
ADV_CLIP = 5.0
NA = "not available"


@dataclass
class Table:
    """One report table: ``data`` goes to CSV; ``sections`` (heading, frame) to Markdown/HTML."""

    name: str
    title: str
    intro: str
    data: pd.DataFrame
    sections: list[tuple[str | None, pd.DataFrame]] = field(default_factory=list)
    comparisons: list[Comparison] = field(
        default_factory=list
    )  # the family, row order (delta tables)


# ----------------------------------------------------------------------------- formatting


def _f(x: float | None, nd: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _ci(est: float, low: float, high: float, sign: bool = False) -> str:
    return f"{_f(est, 2, sign)} [{_f(low, 2, sign)}, {_f(high, 2, sign)}]"


def _seeds(seeds: Sequence) -> str:
    s = [str(x) for x in seeds if x is not None]
    return ",".join(s) if s else "-"


def _per_seed(per_seed: Sequence, sign: bool = True) -> str:
    return "; ".join(f"s{s}: {_f(v, 2, sign)}" for s, v in per_seed if s is not None)


def _yn(v: bool | None) -> str:
    return "" if v is None else ("yes" if v else "no")


def _w(w: float | None) -> str:
    return "-" if w is None else f"{w:g}"


# ----------------------------------------------------------------------------- accuracy


def accuracy_table(data: EvalData, n_boot: int, seed: int, level: float = 0.95) -> Table:
    """One row per method × shot: mean over seeds, per-seed spread, 95% CI over queries."""
    rows, wide = [], {}
    for m in data.main():  # ablations: the ablations table
        wide_row = {"method": m.long()}
        for k in data.shots:
            acc = method_accuracy(data, m.key, k, n_boot, seed, level)
            row = _method_cols(m) | {"k": k}
            if acc is None:
                row |= {
                    "n_queries": 0,
                    "n_seeds": 0,
                    "seeds": "",
                    "note": f"{NA}: not evaluated at k={k}",
                }
                wide_row[f"k={k}"] = NA
            else:
                vals = [v for _, v in acc.per_seed]
                iv = acc.interval
                row |= {
                    "n_queries": iv.n,
                    "n_seeds": len([s for s in acc.seeds if s is not None]),
                    "seeds": _seeds(acc.seeds),
                    "acc_mean": iv.estimate,
                    "ci_low": iv.low,
                    "ci_high": iv.high,
                    "seed_sd": acc.seed_sd,
                    "seed_min": min(vals) if len(vals) > 1 else None,
                    "seed_max": max(vals) if len(vals) > 1 else None,
                    "per_seed_acc": _per_seed(acc.per_seed, sign=False),
                    "note": "",
                }
                wide_row[f"k={k}"] = _ci(iv.estimate, iv.low, iv.high)
            rows.append(row)
        wide[m.key] = wide_row
    df = _frame(
        rows,
        _METHOD_COLS
        + [
            "k",
            "n_queries",
            "n_seeds",
            "seeds",
            "acc_mean",
            "ci_low",
            "ci_high",
            "seed_sd",
            "seed_min",
            "seed_max",
            "per_seed_acc",
            "note",
        ],
    )
    long_disp = pd.DataFrame(
        {
            "method": df["method"],
            "k": df["k"],
            "n": df["n_queries"],
            "seeds": df["seeds"],
            "accuracy [95% CI]": [
                _ci(r.acc_mean, r.ci_low, r.ci_high) if not r.note else r.note
                for r in df.itertuples()
            ],
            "seed sd": [_f(v) for v in df["seed_sd"]],
            "seed min–max": [
                "–" if r.note or pd.isna(r.seed_min) else f"{_f(r.seed_min)}–{_f(r.seed_max)}"
                for r in df.itertuples()
            ],
        }
    )
    return Table(
        "accuracy",
        "Accuracy per method and shot",
        "VQA accuracy (%) on the test queries. The interval is a 95% bootstrap interval that resamples "
        "the seeds (where there are two or more), then the test queries (questions about one image "
        "together); 'seed sd' and 'seed min–max' are "
        "the spread of the per-seed accuracies (v2/v3 have seeds; other methods one run).",
        df,
        [
            ("Mean accuracy [95% CI] by shot", pd.DataFrame(list(wide.values()))),
            ("Details", long_disp),
        ],
    )


_METHOD_COLS = ["method", "method_kind", "cell", "mode", "use_rank", "knobs", "train"]


def _method_cols(m: MethodInfo) -> dict:
    c = m.cell
    return {
        "method": m.long(),
        "method_kind": m.method,
        "cell": c.slug if c else "",
        "mode": c.mode if c else "",
        "use_rank": "" if c is None else c.use_rank,
        "knobs": json.dumps(c.reward.as_dict(), sort_keys=True) if c else "",
        "train": json.dumps(dict(c.train), sort_keys=True) if c and c.train else "",
    }


_COUNT_COLS = ("n_clusters", "family_size")  # counts that are blank where no comparison was made


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for c in _COUNT_COLS:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c]).astype("Int64")
    for c in df.columns:
        if df[c].dtype == object:
            continue
        if pd.api.types.is_float_dtype(df[c]):
            df[c] = df[c].round(4)
    return df


# ----------------------------------------------------------------------------- comparisons

_COMP_COLS = [
    "k",
    "n_queries",
    "n_clusters",
    "seeds",
    "resampled",
    "delta",
    "ci_low",
    "ci_high",
    "trend",
    "distinguishable",
    "p",
    "p_holm",
    "significant_holm",
    "family_size",
    "mde",
    "per_seed_delta",
    "seeds_agree",
    "pairing",
    "status",
    "note",
]


def _comp_cols(c: Comparison) -> dict:
    if not c.available:
        return {
            "k": c.k,
            "n_queries": 0,
            "seeds": "",
            "trend": "",
            "distinguishable": "",
            "per_seed_delta": "",
            "seeds_agree": "",
            "pairing": "",
            "status": c.status,
            "note": f"{NA}: {c.reason}",
        }
    iv = c.interval
    if c.degenerate:
        note = c.degenerate
    elif c.duplicate_of:
        note = f"same selectors as {c.duplicate_of}: the same comparison, counted once"
    elif not c.distinguishable:
        note = "not distinguishable (interval contains 0)"
    elif not c.significant_holm:
        note = (
            f"interval excludes 0, but not significant after Holm over {c.family_size} comparisons"
        )
    else:
        note = ""
    return {
        "k": c.k,
        "n_queries": iv.n,
        "n_clusters": iv.n_clusters,
        "seeds": _seeds(c.seeds),
        "resampled": iv.levels,
        "delta": iv.estimate,
        "ci_low": iv.low,
        "ci_high": iv.high,
        "trend": c.trend if not c.degenerate else "",
        "distinguishable": c.distinguishable if not c.degenerate else "",
        "p": iv.p if not c.degenerate else None,
        "p_holm": c.p_holm,
        "significant_holm": c.significant_holm if c.significant_holm is not None else "",
        "family_size": c.family_size if c.tested or c.duplicate_of else None,
        "mde": c.mde if not c.degenerate else None,
        "per_seed_delta": _per_seed(c.per_seed),
        "seeds_agree": _yn(c.seeds_agree),
        "pairing": c.pairing,
        "status": c.status,
        "note": note,
    }


_PENDING = "_comparison"


def _pending(c: Comparison) -> dict:
    """A row's comparison, resolved with its family by :func:`_resolve` before the frame is built."""
    return {_PENDING: c}


def _resolve(rows: list[dict], data: EvalData) -> tuple[list[dict], list[Comparison]]:
    """Apply :func:`.compare.family` to the comparisons of ``rows`` (one table = one family)."""
    idx = [i for i, r in enumerate(rows) if _PENDING in r]
    fam = family([rows[i][_PENDING] for i in idx], data)
    out = [dict(r) for r in rows]
    for i, c in zip(idx, fam):
        del out[i][_PENDING]
        out[i] |= _comp_cols(c)
    return out, fam


ALL_SHOTS = "all"


def _na_rows(shots: Sequence[int], reason: str) -> list[dict]:
    """One row standing for every shot of a comparison the data cannot make (k = "all")."""
    return [{"k": ALL_SHOTS, "n_queries": 0, "note": f"{NA}: {reason}"}]


def _shot_key(s: pd.Series) -> pd.Series:
    return s.map(lambda v: -1 if v == ALL_SHOTS else v)


def _blank(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.notna(), "")


def _delta_str(r) -> str:
    """The Δ cell of a display row: the interval, or why there is none (never '– [–, –]')."""
    if pd.isna(r.delta):
        return r.note if isinstance(r.note, str) and r.note else NA
    return _ci(r.delta, r.ci_low, r.ci_high, sign=True)


def _p(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or pd.isna(v):
        return ""
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def _comp_display(df: pd.DataFrame, label_cols: dict[str, str], delta_name: str) -> pd.DataFrame:
    """Display frame: shot | <labels> | Δ [95% CI] | trend | p (Holm) | Holm | MDE | seeds | n | per-seed Δ | note."""
    out = {"shot": df["k"]}
    for col, name in label_cols.items():
        out[name] = df[col]
    out[delta_name] = [_delta_str(r) for r in df.itertuples()]
    status = (
        df["status"].astype(object).where(df["status"].notna(), "")
        if "status" in df
        else pd.Series("", df.index)
    )
    out["trend"] = [
        t if st in ("tested", "duplicate") else (st if st == "cannot differ" else "")
        for t, st in zip(_blank(df["trend"]), status)
    ]
    out["p (Holm)"] = [
        "" if not _p(a) else f"{_p(a)} ({_p(b)})" for a, b in zip(df["p"], df["p_holm"])
    ]
    out["Holm 5%"] = [
        _yn(v) if isinstance(v, (bool, np.bool_)) else "" for v in df["significant_holm"]
    ]
    out["MDE"] = ["" if pd.isna(v) else _f(v, 1) for v in df["mde"]]
    out["seeds"] = _blank(df["seeds"])
    out["n"] = df["n_queries"]
    out["per-seed Δ"] = _blank(df["per_seed_delta"])
    out["note"] = [
        n if isinstance(n, str) and not n.startswith((NA, "not distinguishable")) else ""
        for n in df["note"]
    ]
    return pd.DataFrame(out)


def _sections_by(
    df: pd.DataFrame,
    by: str,
    heading: Callable[[str], str],
    label_cols: dict[str, str],
    delta_name: str,
) -> list[tuple[str | None, pd.DataFrame]]:
    sections = []
    for val in dict.fromkeys(df[by]):
        sub = df[df[by] == val].sort_values("k", kind="stable", key=_shot_key)
        sections.append((heading(val), _comp_display(sub, label_cols, delta_name)))
    return sections


def _modes(data: EvalData) -> list[str]:
    present = {m.mode for m in data.v3()}
    return [m for m in MODE_ORDER if m in present] + sorted(present - set(MODE_ORDER))


def _cell_label(m: MethodInfo) -> str:
    return m.short()


def _legacy_reference(data: EvalData, m: MethodInfo) -> MethodInfo | None:
    """The legacy cell ``m`` is compared with: same use_rank and training overrides, at the default
    legacy knobs (alpha 1, beta 0: InfoScore) if that cell was run, else the first such cell."""
    same = [
        b
        for b in data.v3()
        if b.mode == "legacy" and b.use_rank == m.use_rank and b.cell.train == m.cell.train
    ]
    default = reward_spec("legacy")
    return next((b for b in same if b.cell.reward == default), same[0] if same else None)


def vs_legacy_table(data: EvalData, n_boot: int, seed: int, level: float = 0.95) -> Table:
    """The reference implementation's "shot | new vs old | trend" for every mode: each v3 cell vs legacy (same use_rank,
    training overrides and seed)."""
    rows = []
    others = [m for m in data.v3() if m.mode != "legacy"]
    for m in others:
        b = _legacy_reference(data, m)
        lead = _method_cols(m) | {"cell_label": _cell_label(m)}
        if b is None:
            reason = f"no legacy cell with use_rank={str(m.use_rank).lower()} and the same training settings"
            rows += [lead | {"baseline": ""} | r for r in _na_rows(data.shots, reason)]
            continue
        for k in data.shots:
            c = compare(data, m.key, b.key, k, n_boot, seed, level)
            rows.append(lead | {"baseline": b.long()} | _pending(c))
    if not others:
        rows += [
            {"mode": "", "cell_label": "", "baseline": ""} | r
            for r in _na_rows(data.shots, "no v3 cell of a mode other than legacy")
        ]
    rows, fam = _resolve(rows, data)
    df = _frame(rows, _METHOD_COLS + ["cell_label", "baseline"] + _COMP_COLS)
    sections = _sections_by(
        df,
        "mode",
        lambda v: f"{v} vs legacy" if v else "vs legacy",
        {"cell_label": "cell", "baseline": "legacy cell"},
        "Δ vs legacy (pts) [95% CI]",
    )
    return Table(
        "vs_legacy",
        "Every reward mode vs legacy (the reference implementation's 'shot | new vs old | trend')",
        "Δ = accuracy(cell) − accuracy(legacy with the same use_rank and training settings, at α=1, β=0 "
        "where run), in points, paired over test queries and seeds. 'n.s.' = the 95% interval contains 0: "
        "not distinguishable.",
        df,
        sections,
        fam,
    )


def vs_v2_table(data: EvalData, n_boot: int, seed: int, level: float = 0.95) -> Table:
    """Each v3 cell vs the v2 (SFT) selector it starts from (same seed)."""
    rows = []
    has_v2 = "v2" in data.methods
    for m in data.v3():
        lead = _method_cols(m) | {"cell_label": _cell_label(m)}
        if not has_v2:
            rows += [lead | r for r in _na_rows(data.shots, "no v2 results")]
            continue
        for k in data.shots:
            rows.append(lead | _pending(compare(data, m.key, "v2", k, n_boot, seed, level)))
    if not data.v3():
        rows += [{"mode": ""} | r for r in _na_rows(data.shots, "no v3 results")]
    rows, fam = _resolve(rows, data)
    df = _frame(rows, _METHOD_COLS + ["cell_label"] + _COMP_COLS)
    sections = _sections_by(
        df,
        "mode",
        lambda v: f"v3 {v} vs v2" if v else "v3 vs v2",
        {"cell_label": "cell"},
        "Δ vs v2 (pts) [95% CI]",
    )
    return Table(
        "vs_v2",
        "v3 cells vs the v2 SFT selector",
        "Δ = accuracy(v3 cell) − accuracy(v2), in points, paired over test queries and seeds.",
        df,
        sections,
        fam,
    )


def per_shot_table(data: EvalData) -> Table:
    """Which v3 cell ``per_shot`` uses at each shot and seed, and its validation accuracy (docs/science.md §8)."""
    rows = []
    for (s_, k), (cell, acc, n) in sorted(
        data.per_shot.items(), key=lambda kv: (kv[0][1], -1 if kv[0][0] is None else kv[0][0])
    ):
        m = data.methods.get(f"v3:{cell}")
        rows.append(
            {
                "k": k,
                "seed": s_,
                "cell": cell,
                "method": m.long() if m else f"v3 {cell}",
                "val_acc": 100.0 * acc,
                "n_val": n,
                "note": "",
            }
        )
    if not rows:
        rows = [
            {
                "k": ALL_SHOTS,
                "note": f"{NA}: no per_shot results (pools.n_val is 0, or no v3 cells)",
            }
        ]
    df = _frame(rows, ["k", "seed", "cell", "method", "val_acc", "n_val", "note"])
    disp = pd.DataFrame(
        {
            "shot": df["k"],
            "seed": _blank(df["seed"]),
            "chosen cell": _blank(df["method"]),
            "validation accuracy (%)": [_f(v) for v in df["val_acc"]],
            "validation queries": _blank(df["n_val"]),
            "note": df["note"],
        }
    )
    return Table(
        "per_shot",
        "per_shot: the v3 cell chosen at each shot on the validation queries",
        "per_shot (the reference implementation's 'different strategies per shot') uses, at each k and seed, the v3 cell with the "
        "best accuracy on the validation queries (disjoint from the test queries; ties: first cell by slug). "
        "Nothing here is chosen on the test queries; its test accuracy is in the accuracy table.",
        df,
        [(None, disp)],
    )


# ----------------------------------------------------------------------------- RL data


def group_stats(g: RewardGroups) -> dict:
    """Shares of flat / all-negative / all-positive groups and the reward range of one file."""
    n = g.n_groups
    if n == 0:
        return {"n_groups": 0}
    sizes = np.array([len(r) for r in g.rewards])
    flat = np.array([len(r) == 0 or np.ptp(r) == 0.0 for r in g.rewards])
    pos_ratio = np.array([h.mean() if len(h) else 0.0 for h in g.hard])
    allr = np.concatenate(g.rewards) if sizes.sum() else np.zeros(0)
    allh = np.concatenate(g.hard) if sizes.sum() else np.zeros(0)
    st = {
        "n_groups": n,
        "mean_group_size": float(sizes.mean()),
        "share_flat": float(flat.mean()),
        "share_all_negative": float((pos_ratio == 0).mean()),
        "share_all_positive": float((pos_ratio == 1).mean()),
        "share_mixed": float(((pos_ratio > 0) & (pos_ratio < 1)).mean()),
        "share_pos_ratio_ge_0.2": float((pos_ratio >= POS_RATIO_THRESHOLD).mean()),
        "mean_positive_ratio": float(pos_ratio.mean()),
        "share_flat_mixed": float((flat & (pos_ratio > 0) & (pos_ratio < 1)).mean()),
        "reward_min": float(allr.min()) if allr.size else None,
        "reward_max": float(allr.max()) if allr.size else None,
        "reward_mean": float(allr.mean()) if allr.size else None,
        "reward_std": float(allr.std()) if allr.size else None,
        "pos_reward_min": float(allr[allh == 1].min()) if (allh == 1).any() else None,
        "neg_reward_max": float(allr[allh == 0].max()) if (allh == 0).any() else None,
        "missing_inputs": int(g.missing.sum()),
        "anchors_with_missing": int((g.missing > 0).sum()),
    }
    return st | within_group_gaps(g)


TIE_TOL = 1e-12


def within_group_gaps(g: RewardGroups) -> dict:
    """Correct vs incorrect candidates *within* each mixed group (GRPO sees only these differences).

    Per group with both h = 1 and h = 0: gap = lowest reward of a correct candidate − highest of an
    incorrect one. ``share_inverted``: groups with gap < 0 (an incorrect candidate outscores a
    correct one); ``share_tied``: gap = 0 (|gap| ≤ 1e-12); ``within_gap_min`` / ``_median``.
    """
    gaps = np.array(
        [
            float(r[h == 1].min() - r[h == 0].max())
            for r, h in zip(g.rewards, g.hard)
            if (h == 1).any() and (h == 0).any()
        ]
    )
    if gaps.size == 0:
        return {
            "n_mixed": 0,
            "share_inverted": None,
            "share_tied": None,
            "within_gap_min": None,
            "within_gap_median": None,
        }
    tied = np.abs(gaps) <= TIE_TOL
    return {
        "n_mixed": int(gaps.size),
        "share_inverted": float(((gaps < 0) & ~tied).mean()),
        "share_tied": float(tied.mean()),
        "within_gap_min": float(gaps.min()),
        "within_gap_median": float(np.median(gaps)),
    }


_GROUP_COLS = [
    "label",
    "n_groups",
    "mean_group_size",
    "share_flat",
    "share_all_negative",
    "share_all_positive",
    "share_mixed",
    "share_flat_mixed",
    "share_pos_ratio_ge_0.2",
    "mean_positive_ratio",
    "reward_min",
    "reward_max",
    "reward_mean",
    "reward_std",
    "pos_reward_min",
    "neg_reward_max",
    "n_mixed",
    "share_inverted",
    "share_tied",
    "within_gap_min",
    "within_gap_median",
    "missing_inputs",
    "anchors_with_missing",
    "note",
]


def rl_groups_table(rewards: dict[str, RewardGroups]) -> Table:
    """Per rewards file: the group shares the reference implementation's diagnosis is about, and the reward range."""
    rows = [
        {"label": lab} | group_stats(g) | {"note": "" if g.n_groups else "empty file"}
        for lab, g in rewards.items()
    ]
    if not rows:
        rows = [{"label": "", "note": f"{NA}: no rewards files given"}]
    df = _frame(rows, _GROUP_COLS)

    def pct(v):
        return "–" if pd.isna(v) else f"{100 * v:.1f}%"

    disp = pd.DataFrame(
        {
            "rewards": df["label"],
            "groups": df["n_groups"],
            "size": [_f(v, 1) for v in df["mean_group_size"]],
            "flat": [pct(v) for v in df["share_flat"]],
            "all-neg": [pct(v) for v in df["share_all_negative"]],
            "all-pos": [pct(v) for v in df["share_all_positive"]],
            "mixed": [pct(v) for v in df["share_mixed"]],
            "pos ratio ≥ 0.2": [pct(v) for v in df["share_pos_ratio_ge_0.2"]],
            "reward range": [
                f"{_f(a, 3)} … {_f(b, 3)}" for a, b in zip(df["reward_min"], df["reward_max"])
            ],
            "min pos / max neg": [
                f"{_f(a, 3)} / {_f(b, 3)}"
                for a, b in zip(df["pos_reward_min"], df["neg_reward_max"])
            ],
            "within group: inverted / tied": [
                f"{pct(a)} / {pct(b)}" for a, b in zip(df["share_inverted"], df["share_tied"])
            ],
            "min within-group gap": [_f(v, 3) for v in df["within_gap_min"]],
            "missing": df["missing_inputs"],
            "note": df["note"],
        }
    )
    return Table(
        "rl_groups",
        "RL data diagnostics: groups and rewards",
        "One RL group = the scored candidates of one anchor. flat = all rewards equal (zero advantage, "
        "no GRPO signal); all-neg / all-pos = every candidate has vqa_correct 0 / 1; mixed = both; "
        "'pos ratio ≥ 0.2' = share of groups the reference implementation's conditional GRPO (plan 4) would keep; "
        "'min pos / max neg' = lowest reward of a correct candidate / highest of an incorrect one, over "
        "all groups; GRPO sees only differences within a group, so 'within group' counts the mixed groups "
        "(both correct and incorrect candidates) where an incorrect candidate outscores a correct one "
        "(inverted) or ties the worst correct one (tied), and 'min within-group gap' is the smallest "
        "correct-minus-incorrect gap (negative = inverted); missing = inputs counted as 0.",
        df,
        [(None, disp)],
    )


def advantage_values(
    g: RewardGroups, use_rank: bool, advantages_fn: Callable | None = None
) -> np.ndarray:
    """All advantages of one rewards file (groups concatenated in file order).

    Uses ``icdrl.rl.advantages`` on the groups padded to one ``[G, N]`` tensor with a mask
    (min_std 0.1, clip 5), so the report shows exactly what training sees.
    """
    import torch

    if advantages_fn is None:
        from icdrl.rl import advantages as advantages_fn
    sizes = np.array([len(r) for r in g.rewards], dtype=np.int64)
    if sizes.sum() == 0:
        return np.zeros(0)
    n = int(sizes.max())
    vals = np.zeros((len(sizes), n), dtype=np.float64)
    mask = np.arange(n)[None, :] < sizes[:, None]
    vals[mask] = np.concatenate(g.rewards)
    a = advantages_fn(
        torch.as_tensor(vals),
        use_rank=use_rank,
        min_std=ADV_MIN_STD,
        clip=ADV_CLIP,
        mask=torch.as_tensor(mask),
    )
    a = np.asarray(a.detach().cpu().numpy(), dtype=np.float64)
    if a.shape != vals.shape:
        raise ValueError(
            f"{g.path}: icdrl.rl.advantages returned shape {a.shape} for {vals.shape} rewards"
        )
    out = a[mask]
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{g.path}: icdrl.rl.advantages returned NaN/inf (use_rank={use_rank})")
    return out


def rl_advantages_table(adv: dict[tuple[str, bool], np.ndarray]) -> Table:
    """Distribution summary of advantages per rewards file × use_rank."""
    rows = []
    for (lab, ur), a in adv.items():
        row = {
            "label": lab,
            "use_rank": ur,
            "advantage": "rank" if ur else "z-score",
            "n": int(a.size),
        }
        if a.size:
            q = np.quantile(a, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
            row |= {
                "mean": float(a.mean()),
                "std": float(a.std()),
                "mean_abs": float(np.abs(a).mean()),
                "share_zero": float((np.abs(a) < 1e-9).mean()),
                "share_clipped": float((np.abs(a) >= ADV_CLIP - 1e-6).mean()),
                "min": q[0],
                "p05": q[1],
                "p25": q[2],
                "median": q[3],
                "p75": q[4],
                "p95": q[5],
                "max": q[6],
                "note": "",
            }
        else:
            row["note"] = "no candidates"
        rows.append(row)
    if not rows:
        rows = [{"label": "", "note": f"{NA}: no rewards files given"}]
    cols = [
        "label",
        "use_rank",
        "advantage",
        "n",
        "mean",
        "std",
        "mean_abs",
        "share_zero",
        "share_clipped",
        "min",
        "p05",
        "p25",
        "median",
        "p75",
        "p95",
        "max",
        "note",
    ]
    df = _frame(rows, cols)
    disp = df[
        [
            "label",
            "advantage",
            "n",
            "mean_abs",
            "std",
            "share_zero",
            "share_clipped",
            "min",
            "p05",
            "median",
            "p95",
            "max",
            "note",
        ]
    ].copy()
    for c in ["mean_abs", "std", "min", "p05", "median", "p95", "max"]:
        disp[c] = [_f(v, 3) for v in disp[c]]
    for c in ["share_zero", "share_clipped"]:
        disp[c] = ["–" if pd.isna(v) else f"{100 * v:.1f}%" for v in disp[c]]
    disp = disp.rename(
        columns={
            "label": "rewards",
            "mean_abs": "mean |A|",
            "share_zero": "A = 0",
            "share_clipped": f"|A| = {ADV_CLIP:g}",
        }
    )
    return Table(
        "rl_advantages",
        "RL data diagnostics: advantages",
        f"Advantages from icdrl.rl.advantages per group (min_std={ADV_MIN_STD}, clip=±{ADV_CLIP:g}) for both "
        "use_rank settings. 'A = 0' is the share of candidates that carry no GRPO signal.",
        df,
        [(None, disp)],
    )


def sources_table(scored: pd.DataFrame | None) -> Table:
    """Per candidate source (beam/random/similar): counts, share correct, mean acc and InfoScore."""
    cols = [
        "source",
        "n_candidates",
        "share_of_candidates",
        "share_correct",
        "mean_vqa_acc",
        "mean_info_score",
        "missing_vqa",
        "missing_info",
        "note",
    ]
    if scored is None or scored.empty:
        df = _frame(
            [
                {
                    "source": "",
                    "note": f"{NA}: no scored candidates file given"
                    if scored is None
                    else f"{NA}: the scored file has no candidates",
                }
            ],
            cols,
        )
        return Table(
            "candidates_by_source", "Candidates by source", "", df, [(None, df[["source", "note"]])]
        )
    rows = []
    total = len(scored)
    for src, sub in list(scored.groupby("source", sort=True)) + [("all", scored)]:
        rows.append(
            {
                "source": src,
                "n_candidates": len(sub),
                "share_of_candidates": len(sub) / total,
                "share_correct": _mean_or_none(sub["vqa_correct"]),
                "mean_vqa_acc": _mean_or_none(sub["vqa_acc_score"]),
                "mean_info_score": _mean_or_none(sub["info_score"]),
                "missing_vqa": int(sub["vqa_correct"].isna().sum()),
                "missing_info": int(sub["info_score"].isna().sum()),
                "note": "",
            }
        )
    df = _frame(rows, cols)
    disp = df[["source", "n_candidates"]].copy()
    disp["share"] = [f"{100 * v:.1f}%" for v in df["share_of_candidates"]]
    disp["correct"] = ["–" if pd.isna(v) else f"{100 * v:.1f}%" for v in df["share_correct"]]
    disp["mean VQA acc"] = [_f(v, 3) for v in df["mean_vqa_acc"]]
    disp["mean InfoScore"] = [_f(v, 4) for v in df["mean_info_score"]]
    disp["missing (vqa / info)"] = [
        f"{a} / {b}" for a, b in zip(df["missing_vqa"], df["missing_info"])
    ]
    return Table(
        "candidates_by_source",
        "Scored candidates by source",
        "Candidate sequences of the RL data by where they came from (InfoScore beam, random, similar): "
        "share correct (vqa_correct = 1), mean VQA accuracy and mean InfoScore; missing values are not "
        "counted in the means.",
        df,
        [(None, disp)],
    )


def _mean_or_none(s: pd.Series) -> float | None:
    s = s.dropna()
    return float(s.mean()) if len(s) else None


def training_table(metrics: dict[str, pd.DataFrame]) -> Table:
    """Per training run and phase: epochs, first/last loss and the last epoch's GRPO health."""
    rows = []
    for lab, df in metrics.items():
        if df.empty:
            rows.append({"label": lab, "note": "empty metrics file"})
            continue
        for phase in dict.fromkeys(df["phase"]):
            sub = df[df["phase"] == phase]
            last = sub.iloc[-1]
            kept, skipped = last["groups_kept"], last["groups_skipped"]
            tot = (0 if pd.isna(kept) else kept) + (0 if pd.isna(skipped) else skipped)
            rows.append(
                {
                    "label": lab,
                    "phase": phase,
                    "epochs": len(sub),
                    "loss_first": _num(sub["loss"].iloc[0]),
                    "loss_last": _num(last["loss"]),
                    "kl_last": _num(last["kl"]),
                    "ratio_mean_last": _num(last["ratio_mean"]),
                    "ratio_max_max": _num(sub["ratio_max"].max()),
                    "clip_frac_last": _num(last["clip_frac"]),
                    "adv_std_last": _num(last["adv_std"]),
                    "groups_kept_last": _num(kept),
                    "groups_skipped_last": _num(skipped),
                    "share_kept_last": (kept / tot) if tot > 0 and not pd.isna(kept) else None,
                    "val_reward_first": _num(sub["val_reward"].iloc[0]),
                    "val_reward_last": _num(last["val_reward"]),
                    "note": "",
                }
            )
    if not rows:
        rows = [{"label": "", "note": f"{NA}: no training metrics given"}]
    cols = [
        "label",
        "phase",
        "epochs",
        "loss_first",
        "loss_last",
        "kl_last",
        "ratio_mean_last",
        "ratio_max_max",
        "clip_frac_last",
        "adv_std_last",
        "groups_kept_last",
        "groups_skipped_last",
        "share_kept_last",
        "val_reward_first",
        "val_reward_last",
        "note",
    ]
    df = _frame(rows, cols)
    disp = df.copy()
    for c in cols[3:-1]:
        nd = 0 if c.startswith(("groups_kept", "groups_skipped")) else 3
        disp[c] = [_f(v, nd) for v in disp[c]]
    disp["epochs"] = ["" if pd.isna(v) else str(int(v)) for v in disp["epochs"]]
    disp = disp.rename(columns={"label": "run", "clip_frac_last": "clip binding (last)"})
    return Table(
        "training_summary",
        "Training runs: first and last epoch per phase",
        "Per run and phase (v2 = SFT, rce = RCE warm-up, grpo): loss at the first and last epoch and the "
        "last epoch's KL, mean ratio, binding clip share, advantage std and kept/skipped groups; "
        "ratio_max_max is the largest ratio seen in the phase; 'clip binding' (CSV clip_frac_last) is the "
        "share of candidates whose PPO clip binds (ratio < 1−ε with a negative advantage or > 1+ε with a "
        "positive one, TRL's clip_ratio): they give no gradient. Metrics files written before this "
        "definition counted every ratio outside [1−ε, 1+ε]. '–' = not logged in that phase.",
        df,
        [(None, disp)],
    )


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------- writing

_CSS = (
    "body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:14px;margin:1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em 0}"
    "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}"
    "th{background:#f0f0f0}tr:nth-child(even){background:#fafafa}"
    "h1{font-size:1.3em}h2{font-size:1.1em}p{max-width:60em}"
)


def _strings(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as text; missing values as empty strings."""
    return df.astype(object).where(df.notna(), "").astype(str)


def _md_frame(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(no rows)_"
    return _strings(df).to_markdown(index=False, disable_numparse=True)


def _html_frame(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>(no rows)</em></p>"
    return _strings(df).to_html(index=False, escape=True, border=0)


def render_markdown(t: Table) -> str:
    parts = [f"# {t.title}", ""]
    if t.intro:
        parts += [t.intro, ""]
    for heading, frame in t.sections:
        if heading:
            parts += [f"## {heading}", ""]
        parts += [_md_frame(frame), ""]
    return "\n".join(parts)


def render_html(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )


def _html_body(t: Table) -> str:
    parts = [f"<h1>{html.escape(t.title)}</h1>"]
    if t.intro:
        parts.append(f"<p>{html.escape(t.intro)}</p>")
    for heading, frame in t.sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.append(_html_frame(frame))
    return "\n".join(parts)


def write_table(t: Table, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.html`` (atomically); return the paths."""
    out = Path(out_dir)
    paths = [out / f"{t.name}.csv", out / f"{t.name}.md", out / f"{t.name}.html"]
    atomic_write_text(paths[0], t.data.to_csv(index=False, lineterminator="\n"))
    atomic_write_text(paths[1], render_markdown(t))
    atomic_write_text(paths[2], render_html(t.title, _html_body(t)))
    return paths
