"""How the LVLM uses its demonstrations (docs/science.md §8, §10): copy rates, answer form, ablations.

Everything here is computed from the evaluation records (prediction, ICD ids, accuracy) and the
training split's answers table (:mod:`icdrl.answers`), so it can be re-derived and re-plotted
without running the LVLM.

**Diagnostics** (per method × k, with 95% bootstrap intervals over test queries, seeds averaged
per query as for accuracy):

* ``copies_any``: share of predictions equal, after VQA normalisation, to the answer of some
  demonstration in the prompt;
* ``copies_last``: share equal to the last demonstration's (the one nearest the query);
* ``acc_copy`` / ``acc_no_copy``: accuracy on the (query, seed) answers that copy some
  demonstration / that do not (a ratio: the interval resamples queries, the numerator and the
  denominator together);
* ``wrong_form``: where the dataset defines an answer form (a closed vocabulary: easy-VQA), the
  share of predictions that are no word of it (the embedded LVLM's verbose "the answer is …").

**Ablations**: each ablated method (``shuffled``, ``no_images``, ``icdrl.ablations``) against the
method it ablates, paired query by query (same ICDs), per k.
"""

from __future__ import annotations

import functools

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from icdrl.answers import AnswersTable
from icdrl.metrics import normalize_answer

from .bootstrap import Interval, bootstrap_mean, index_matrix
from .compare import _common_queries, compare, method_accuracy
from .inputs import ABLATION_DISPLAY, EvalData, MethodInfo
from .plots import (
    BASELINE_STYLE,
    CELL_COLORS,
    RC,
    _delta_legend,
    _draw_deltas,
    _fix_layout,
    _message,
    _suptitle,
    _text_w,
)
from .tables import (
    _COMP_COLS,
    _METHOD_COLS,
    NA,
    Table,
    _ci,
    _comp_cols,
    _f,
    _frame,
    _method_cols,
    _seeds,
)

__all__ = [
    "answer_flags",
    "ratio_interval",
    "diagnostics_table",
    "ablations_table",
    "diagnostics_plot",
    "ablation_plot",
    "DIAG_COLS",
]

SHARES = ("copies_any", "copies_last", "wrong_form")
DIAG_COLS = (
    _METHOD_COLS
    + ["k", "n_queries", "seeds"]
    + [f"{c}{x}" for c in SHARES for x in ("", "_low", "_high")]
    + [
        "acc_copy",
        "acc_copy_low",
        "acc_copy_high",
        "n_copy",
        "acc_no_copy",
        "acc_no_copy_low",
        "acc_no_copy_high",
        "n_no_copy",
        "note",
    ]
)


_normalize = functools.lru_cache(maxsize=1 << 16)(normalize_answer)


def answer_flags(
    prediction: str, icd_ids, answers: AnswersTable, where: str = ""
) -> tuple[bool, bool, bool | None]:
    """(copies some demonstration's answer, copies the last one's, in the wrong form or None)."""
    p = _normalize(prediction)
    demo = [_normalize(answers.answer(int(i), where)) for i in icd_ids]
    return (p in demo, bool(demo) and p == demo[-1], answers.wrong_form(prediction))


def ratio_interval(
    num: np.ndarray, den: np.ndarray, n_boot: int, seed: int, level: float
) -> Interval | None:
    """sum(num) / sum(den) over ``[S, Q]`` arrays, with a percentile bootstrap over queries (columns);
    resamples with an empty denominator are left out. None when the denominator is 0."""
    num, den = np.atleast_2d(num).astype(np.float64), np.atleast_2d(den).astype(np.float64)
    if den.sum() <= 0:
        return None
    n_q = num.sum(axis=0), den.sum(axis=0)
    idx = index_matrix(num.shape[1], n_boot, seed)
    top, bottom = n_q[0][idx].sum(axis=1), n_q[1][idx].sum(axis=1)
    ok = bottom > 0
    ratios = top[ok] / bottom[ok]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    est = float(num.sum() / den.sum())
    return Interval(est, float(min(low, est)), float(max(high, est)), int(num.shape[1]), level)


def _method_rows(
    data: EvalData,
    m: MethodInfo,
    k: int,
    answers: AnswersTable | None,
    n_boot: int,
    seed: int,
    level: float,
) -> dict:
    runs = data.answers.get((m.key, k), {})
    row = _method_cols(m) | {"k": k}
    if not runs:
        return row | {"n_queries": 0, "note": f"{NA}: not evaluated at k={k}"}
    seeds = data.seeds(m.key, k)
    acc_runs = data.acc[(m.key, k)]
    q = _common_queries([acc_runs[s] for s in seeds])
    row |= {"n_queries": len(q), "seeds": _seeds(seeds)}
    if answers is None:
        return row | {"note": f"{NA}: no answers table given"}
    flags = np.zeros((3, len(seeds), len(q)))
    has_demo = np.zeros((len(seeds), len(q)), dtype=bool)
    acc = np.stack([acc_runs[s].reindex(q).to_numpy(dtype=np.float64) for s in seeds])
    for i, s in enumerate(seeds):
        for j, qid in enumerate(q):
            pred, ids = runs[s][qid]
            any_, last, wrong = answer_flags(pred, ids, answers, f"{m.long()} k={k} query {qid}")
            flags[:, i, j] = (any_, last, bool(wrong))
            has_demo[i, j] = bool(ids)
    notes = []
    for c, f in zip(SHARES, flags):
        if c == "wrong_form" and answers.vocabulary is None:
            continue
        if c != "wrong_form" and not has_demo.all():
            continue
        iv = bootstrap_mean(f.mean(axis=0), n_boot=n_boot, seed=seed, level=level).scaled(100.0)
        row |= {c: iv.estimate, f"{c}_low": iv.low, f"{c}_high": iv.high}
    if answers.vocabulary is None:
        notes.append("the dataset has no closed answer form")
    if not has_demo.any():
        notes.append("no demonstrations")
    elif has_demo.all():
        copy = flags[0]
        for name, sel in (("acc_copy", copy), ("acc_no_copy", 1.0 - copy)):
            iv = ratio_interval(acc * sel, sel, n_boot, seed, level)
            row[f"n_{name[4:]}"] = int(sel.sum())
            if iv is not None:
                iv = iv.scaled(100.0)
                row |= {name: iv.estimate, f"{name}_low": iv.low, f"{name}_high": iv.high}
    return row | {"note": "; ".join(notes)}


def diagnostics_table(
    data: EvalData, answers: AnswersTable | None, n_boot: int, seed: int, level: float = 0.95
) -> Table:
    """Copy rates, accuracy when copying or not, and the wrong-form share, per method (ablations
    included) × shot."""
    rows = [
        _method_rows(data, m, k, answers, n_boot, seed, level)
        for m in data.methods.values()
        for k in data.shots
    ]
    if not rows:
        rows = [{"k": "all", "n_queries": 0, "note": f"{NA}: no evaluation records"}]
    df = _frame(rows, DIAG_COLS)

    def ci(r, c):
        v = getattr(r, c)
        return "–" if pd.isna(v) else _ci(v, getattr(r, f"{c}_low"), getattr(r, f"{c}_high"))

    def cond(r, c):
        n = getattr(r, f"n_{c[4:]}")
        return "–" if pd.isna(n) else f"{ci(r, c)} (n={int(n)})"

    disp = pd.DataFrame(
        {
            "method": df["method"],
            "k": df["k"],
            "n": df["n_queries"],
            "copies a demo's answer (%)": [ci(r, "copies_any") for r in df.itertuples()],
            "copies the last demo's (%)": [ci(r, "copies_last") for r in df.itertuples()],
            "accuracy when copying": [cond(r, "acc_copy") for r in df.itertuples()],
            "accuracy otherwise": [cond(r, "acc_no_copy") for r in df.itertuples()],
            "wrong answer form (%)": [ci(r, "wrong_form") for r in df.itertuples()],
            "note": df["note"],
        }
    )
    return Table(
        "diagnostics",
        "How the LVLM uses the demonstrations: copy rates and answer form",
        "Per method and shot, from the evaluation records and the training answers: the share of predictions "
        "equal (after VQA normalisation) to some demonstration's answer, and to the last one's (nearest the "
        "query); the accuracy of the answers that copy and of those that do not (n = answers, seeds × queries); "
        "and, where the dataset has a closed answer vocabulary (easy-VQA), the share of predictions that are "
        "no word of it (the embedded LVLM's verbose 'the answer is …'). 95% bootstrap intervals over test "
        "queries. Ablated methods are listed too.",
        df,
        [(None, disp)],
    )


def ablations_table(data: EvalData, n_boot: int, seed: int, level: float = 0.95) -> Table:
    """Each ablation against the method it ablates, per shot: both accuracies and the paired Δ."""
    rows = []
    for m in data.ablations():
        base = data.methods.get(m.of)
        lead = {
            "method": m.of_label,
            "method_key": m.of,
            "ablation": m.method,
            "ablation_label": ABLATION_DISPLAY[m.method],
        }
        for k in data.shots:
            if not data.has(m.key, k):
                why = (
                    "one demonstration has no order"
                    if m.method == "shuffled" and k == 1
                    else f"not evaluated at k={k}"
                )
                rows.append(lead | {"k": k, "n_queries": 0, "note": f"{NA}: {why}"})
                continue
            if base is None:
                rows.append(
                    lead | {"k": k, "n_queries": 0, "note": f"{NA}: no results of {m.of_label}"}
                )
                continue
            c = compare(data, m.key, m.of, k, n_boot, seed, level)
            a, b = (
                method_accuracy(data, m.of, k, n_boot, seed, level),
                method_accuracy(data, m.key, k, n_boot, seed, level),
            )
            rows.append(
                lead
                | {
                    "acc_base": a.interval.estimate if a else None,
                    "acc_ablated": b.interval.estimate if b else None,
                }
                | _comp_cols(c)
            )
    if not rows:
        rows = [
            {
                "k": "all",
                "n_queries": 0,
                "note": f"{NA}: no ablations were run (evaluation.ablate is empty)",
            }
        ]
    df = _frame(
        rows,
        ["method", "method_key", "ablation", "ablation_label", "acc_base", "acc_ablated"]
        + _COMP_COLS,
    )

    def delta(r):
        if pd.isna(r.delta):
            return r.note if isinstance(r.note, str) and r.note else NA
        return _ci(r.delta, r.ci_low, r.ci_high, sign=True)

    sections = []
    for key in dict.fromkeys(df["method_key"]):
        sub = df[df["method_key"] == key] if isinstance(key, str) else df
        disp = pd.DataFrame(
            {
                "shot": sub["k"],
                "ablation": sub["ablation_label"],
                "accuracy (%)": [_f(v) for v in sub["acc_base"]],
                "ablated (%)": [_f(v) for v in sub["acc_ablated"]],
                "Δ ablated − method (pts) [95% CI]": [delta(r) for r in sub.itertuples()],
                "trend": sub["trend"].astype(object).where(sub["trend"].notna(), ""),
                "n": sub["n_queries"],
            }
        )
        sections.append((str(sub["method"].iloc[0]) if isinstance(key, str) else None, disp))
    return Table(
        "ablations",
        "Ablations: shuffled demonstration order and demonstrations without images",
        "Each ablated method answers the same test queries with the same ICDs, shown differently: 'shuffled "
        "order' = a seeded permutation that changes their order (k ≥ 2); 'no demonstration images' = the "
        "demonstrations' question and answer text without their images (the query keeps its image). Δ = "
        "accuracy(ablated) − accuracy(method), in points, paired over test queries and seeds, with a 95% "
        "bootstrap interval; 'n.s.' = the interval contains 0.",
        df,
        sections,
    )


# ----------------------------------------------------------------------------- plots

_PANELS = (
    ("copies_any", "copies a demonstration's answer (%)"),
    ("copies_last", "copies the last one's (%)"),
    ("wrong_form", "wrong answer form (%)"),
)


def diagnostics_plot(diag: pd.DataFrame) -> Figure:
    """Copy rates and the wrong-form share vs shot: baselines, v2 and per_shot with 95% intervals,
    v3 cells as thin grey lines (their intervals are in the table); ablations are left out."""
    df = diag[~diag["method_kind"].isin(ABLATION_DISPLAY) & diag["n_queries"].fillna(0).gt(0)]
    panels = [(c, t) for c, t in _PANELS if c in df and df[c].notna().any()]
    if df.empty or not panels:
        return _message(
            "no diagnostics available (no demonstrations' answers or records)", "Copy rates"
        )
    shots = sorted(int(k) for k in df["k"].unique())
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        named = [
            m
            for m in dict.fromkeys(df["method"])
            if (df[df["method"] == m]["method_kind"] != "v3").all()
        ]
        for ax, (col, title) in zip(axes, panels):
            for _name, g in df[df["method_kind"] == "v3"].groupby("method", sort=False):
                g = g[g[col].notna()].sort_values("k")
                ax.plot(g["k"], g[col], color="0.75", linewidth=0.8, zorder=1)
            for i, name in enumerate(named):
                g = df[(df["method"] == name) & df[col].notna()].sort_values("k")
                if g.empty:
                    continue
                kind = g["method_kind"].iloc[0]
                st = BASELINE_STYLE.get(
                    kind, {"color": CELL_COLORS[i % len(CELL_COLORS)], "marker": "o"}
                )
                x = g["k"].to_numpy(dtype=float) + (i - (len(named) - 1) / 2) * 0.04
                y = g[col].to_numpy(dtype=float)
                yerr = np.vstack(
                    [
                        y - g[f"{col}_low"].to_numpy(dtype=float),
                        g[f"{col}_high"].to_numpy(dtype=float) - y,
                    ]
                )
                ax.errorbar(
                    x,
                    y,
                    yerr=yerr,
                    color=st["color"],
                    marker=st.get("marker", "o"),
                    linestyle=st.get("linestyle", "-"),
                    markersize=4,
                    linewidth=1.3,
                    capsize=2,
                    label=name,
                )
            ax.set_title(title)
            ax.set_xticks(shots)
            ax.set_xlabel("shots (k)")
            ax.set_ylim(-3, 103)
        axes[0].set_ylabel("% of predictions")
        if (df["method_kind"] == "v3").any():
            axes[-1].plot([], [], color="0.75", linewidth=0.8, label="v3 cells")
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        longest = max(len(t) for t in axes[-1].get_legend_handles_labels()[1])
        _, H = _fix_layout(
            fig,
            1,
            len(panels),
            3.4,
            2.8,
            left=0.75,
            right=0.9 + _text_w(longest),
            top=0.8,
            bottom=0.6,
            wspace=0.55,
            hspace=0.0,
        )
        _suptitle(
            fig,
            "How predictions use the demonstrations (95% bootstrap intervals over test queries)",
            H,
        )
    return fig


def ablation_plot(abl: pd.DataFrame) -> Figure:
    """Δ accuracy (ablated − method) per shot with 95% paired intervals, one panel per ablation."""
    df = abl[abl["delta"].notna()] if "delta" in abl else abl.iloc[0:0]
    if df.empty:
        return _message("no ablation was run or none is comparable", "Ablations")
    kinds = [a for a in ABLATION_DISPLAY if a in set(df["ablation"])]
    colors = {
        m: CELL_COLORS[i % len(CELL_COLORS)] for i, m in enumerate(dict.fromkeys(df["method"]))
    }
    shots = sorted(int(k) for k in abl["k"].unique() if not isinstance(k, str))
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(len(kinds), 1, sharex=True, squeeze=False)[:, 0]
        for ax, kind in zip(axes, kinds):
            groups = list(df[df["ablation"] == kind].groupby("method", sort=False))
            for i, (name, g) in enumerate(groups):
                _draw_deltas(
                    ax,
                    g,
                    (i - (len(groups) - 1) / 2) * (0.5 / max(len(groups), 1)),
                    colors[name],
                    "o",
                    str(name),
                )
            ax.set_title(f"{ABLATION_DISPLAY[kind]} − unablated")
            _delta_legend(ax)
        axes[-1].set_xticks(shots)
        axes[-1].set_xlabel("shots (k)")
        longest = max(
            [len("interval excludes 0")]
            + [len(t) for ax in axes for t in ax.get_legend_handles_labels()[1]]
        )
        _, H = _fix_layout(
            fig,
            len(kinds),
            1,
            6.8,
            2.3,
            left=0.85,
            right=0.9 + _text_w(longest),
            top=0.75,
            bottom=0.6,
            wspace=0.0,
            hspace=0.5,
        )
        _suptitle(fig, "Ablations: Δ accuracy with 95% paired bootstrap intervals", H)
    return fig
