"""The report's figures (matplotlib, Agg canvas; PNG and SVG, one file pair per category).

Figures are built on ``matplotlib.figure.Figure`` directly, so no pyplot state or global
backend is touched. Every plot function returns a Figure; :func:`save_figure` writes
``<name>.png`` and ``<name>.svg`` atomically. A category with no data still gets its files,
holding a one-line message, so the set of outputs does not depend on the inputs.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from icdrl.records import atomic_path

from .inputs import MODE_ORDER, RewardGroups

__all__ = [
    "PLOT_NAMES",
    "RC",
    "accuracy_plot",
    "delta_plot",
    "experiment_plot",
    "reward_hist_plot",
    "advantage_hist_plot",
    "training_curves_plot",
    "save_figure",
]

PLOT_NAMES = (
    "accuracy_vs_shot",
    "delta_vs_legacy",
    "reward_hist",
    "advantage_hist",
    "training_curves",
    "copy_rates",
    "ablation_delta",
)  # the last two: .diagnostics

RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "icdrl-report",  # stable SVG ids
    "svg.fonttype": "none",  # text stays text: small, fast SVGs
}
PNG_DPI = 100

BASELINE_STYLE = {
    "zero_shot": {"color": "#000000", "linestyle": ":", "marker": "x"},
    "random": {"color": "#7f7f7f", "linestyle": "--", "marker": "v"},
    "similarity": {"color": "#8c564b", "linestyle": "-.", "marker": "^"},
    "rices_image": {"color": "#bc80bd", "linestyle": "-.", "marker": "<"},
    "rices_text": {"color": "#80b1d3", "linestyle": "-.", "marker": ">"},
    "rices": {"color": "#e7298a", "linestyle": "-", "marker": "*", "linewidth": 2.0},
    "copy": {"color": "#a6761d", "linestyle": ":", "marker": "P"},
    "v2": {"color": "#9467bd", "linestyle": "-", "marker": "D", "linewidth": 2.2},
    "per_shot": {"color": "#1b9e77", "linestyle": "-", "marker": "h"},
}
# colours for v3 weight settings (no grey/brown/purple: those are the baselines)
CELL_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#17becf",
    "#bcbd22",
    "#e377c2",
    "#393b79",
]
PHASE_COLORS = {"v2": "#7f7f7f", "rce": "#ff7f0e", "grpo": "#1f77b4"}
#: (column, axis label, phases drawn or None = all): RCE (and v2) loss and GRPO loss differ by
#: orders of magnitude (≈6 vs ≈0), so each gets its own axis
CURVE_METRICS = (
    ("loss", "v2 / RCE loss", ("v2", "rce")),
    ("loss", "GRPO loss", ("grpo",)),
    ("kl", "KL", None),
    ("ratio_mean", "mean ratio", None),
    ("adv_std", "advantage std", None),
    ("groups_kept", "groups kept", None),
)


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.svg`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    paths = []
    with mpl.rc_context(RC):
        for ext, kw in (
            ("png", {"dpi": PNG_DPI, "metadata": {"Software": None}}),
            ("svg", {"metadata": {"Date": None, "Creator": None}}),
        ):
            p = out / f"{name}.{ext}"
            with atomic_path(p, suffix=f".{ext}") as tmp:
                fig.savefig(tmp, format=ext, **kw)
            paths.append(p)
    return paths


def _wrap(s: str, width: int = 28) -> str:
    return (
        "\n".join(textwrap.wrap(s, width=width, break_long_words=True, break_on_hyphens=True)) or s
    )


def _text_w(n_chars: int, fontsize: float = 9.0) -> float:
    """Approximate width in inches of ``n_chars`` characters of DejaVu Sans at ``fontsize``."""
    return n_chars * 0.6 * fontsize / 72.0


def _fix_layout(
    fig: Figure,
    nrows: int,
    ncols: int,
    ax_w: float,
    ax_h: float,
    *,
    left: float,
    right: float,
    top: float,
    bottom: float,
    wspace: float,
    hspace: float,
) -> tuple[float, float]:
    """Size the figure and place its subplot grid from margins in inches; return (W, H).

    A fixed layout instead of matplotlib's constrained layout: the margins are known from
    the fonts used here, and solving the layout costs as much as drawing the figure again.
    """
    W = left + ncols * ax_w + (ncols - 1) * wspace + right
    H = top + nrows * ax_h + (nrows - 1) * hspace + bottom
    fig.set_size_inches(W, H)
    fig.subplots_adjust(
        left=left / W,
        right=1 - right / W,
        bottom=bottom / H,
        top=1 - top / H,
        wspace=wspace / ax_w,
        hspace=hspace / ax_h,
    )
    return W, H


def _suptitle(fig: Figure, text: str, H: float) -> None:
    fig.suptitle(text, y=1 - 0.12 / H, va="top", fontsize=11.5)


def _message(text: str, title: str) -> Figure:
    with mpl.rc_context(RC):
        fig = Figure(figsize=(7, 2.2))
        ax = fig.add_subplot()
        ax.axis("off")
        ax.set_title(title)
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, transform=ax.transAxes)
    return fig


def _mode_list(modes) -> list[str]:
    present = list(dict.fromkeys(m for m in modes if isinstance(m, str) and m))
    return [m for m in MODE_ORDER if m in present] + sorted(set(present) - set(MODE_ORDER))


def _setting(r) -> tuple[str, str]:
    """A cell's reward knobs and training overrides (its colour key, whatever its mode and use_rank)."""
    return (
        str(r.knobs) if isinstance(r.knobs, str) else "",
        str(r.train) if isinstance(r.train, str) else "",
    )


def _setting_colors(df: pd.DataFrame) -> dict[tuple, str]:
    """One colour per (knobs, training overrides), sorted, so a setting keeps its colour per figure."""
    keys = sorted({_setting(r) for r in df.itertuples()})
    return {k: CELL_COLORS[i % len(CELL_COLORS)] for i, k in enumerate(keys)}


def _is_rank(v) -> bool:
    return v is True or v == "True" or v == "true" or (isinstance(v, (bool, np.bool_)) and bool(v))


# ----------------------------------------------------------------------------- accuracy


def _line_with_band(ax, g: pd.DataFrame, x_off: float, label: str, style: dict, band: bool) -> None:
    g = g.sort_values("k")
    x = g["k"].to_numpy(dtype=float) + x_off
    st = {"linewidth": 1.6, "markersize": 5} | style
    ax.plot(x, g["acc_mean"], label=label, **st)
    if band:
        ax.fill_between(x, g["ci_low"], g["ci_high"], color=st["color"], alpha=0.13, linewidth=0)


def accuracy_plot(acc: pd.DataFrame) -> Figure:
    """Accuracy vs shot with 95% interval bands.

    First panel: the baselines (zero-shot, random, similarity within the pool, RICES, copy, v2,
    per_shot), each with its band. Then one
    panel per v3 reward mode: its cells with bands (colour = weights, solid = rank, dashed =
    z-score) and v2 as a thin reference line without band.
    """
    acc = acc[acc["acc_mean"].notna()]
    if acc.empty:
        return _message("no accuracy results", "Accuracy vs shot")
    base = acc[acc["method_kind"] != "v3"]
    v3 = acc[acc["method_kind"] == "v3"]
    modes = _mode_list(v3["mode"])
    panels = (["baselines"] if not base.empty else []) + modes
    colors = _setting_colors(v3) if not v3.empty else {}
    shots = sorted(acc["k"].unique())
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        mode_axes = [ax for ax, p in zip(axes, panels) if p != "baselines"]
        for ax in mode_axes[1:]:  # the mode panels share one y scale; the baselines keep their own
            ax.sharey(mode_axes[0])
        for ax, panel in zip(axes, panels):
            if panel == "baselines":
                groups = list(base.groupby("method", sort=False))
                for i, (name, g) in enumerate(groups):
                    _line_with_band(
                        ax,
                        g,
                        (i - (len(groups) - 1) / 2) * 0.03,
                        name,
                        BASELINE_STYLE.get(g["method_kind"].iloc[0], {"color": "0.3"}),
                        band=True,
                    )
                ax.set_title("Baselines")
            else:
                if "v2" in set(base["method"]):
                    ref = base[base["method"] == "v2"]
                    _line_with_band(
                        ax,
                        ref,
                        0.0,
                        "v2 (reference)",
                        BASELINE_STYLE["v2"] | {"linewidth": 1.0, "markersize": 3},
                        band=False,
                    )
                groups = list(v3[v3["mode"] == panel].groupby("method", sort=False))
                for i, (name, g) in enumerate(groups):
                    r = g.iloc[0]
                    style = {
                        "color": colors[_setting(r)],
                        "linestyle": "-" if _is_rank(r.use_rank) else "--",
                        "marker": "o" if _is_rank(r.use_rank) else "s",
                    }
                    label = name[len(f"v3 {panel} ") :] if name.startswith(f"v3 {panel} ") else name
                    _line_with_band(
                        ax, g, (i - (len(groups) - 1) / 2) * 0.03, label, style, band=True
                    )
                ax.set_title(f"v3 {panel}")
            ax.set_ylabel("VQA accuracy (%)")
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        axes[-1].set_xticks(shots)
        axes[-1].set_xlabel("shots (k)")
        longest = max(len(t) for ax in axes for t in ax.get_legend_handles_labels()[1])
        _, H = _fix_layout(
            fig,
            len(panels),
            1,
            6.8,
            2.3,
            left=0.85,
            right=0.9 + _text_w(longest),
            top=0.75,
            bottom=0.6,
            wspace=0.0,
            hspace=0.45,
        )
        _suptitle(fig, "Accuracy vs shot (bands: 95% bootstrap interval over test queries)", H)
    return fig


# ----------------------------------------------------------------------------- deltas


def _draw_deltas(ax, g: pd.DataFrame, x_off: float, color: str, marker: str, label: str) -> None:
    """One comparison's Δ per shot with its interval; hollow markers = not distinguishable."""
    g = g.sort_values("k")
    x = g["k"].to_numpy(dtype=float) + x_off
    d = g["delta"].to_numpy(dtype=float)
    yerr = np.vstack(
        [d - g["ci_low"].to_numpy(dtype=float), g["ci_high"].to_numpy(dtype=float) - d]
    )
    ax.errorbar(x, d, yerr=yerr, fmt="none", ecolor=color, elinewidth=1.4, capsize=3)
    dist = g["distinguishable"].astype(bool).to_numpy()
    ax.scatter(x[dist], d[dist], marker=marker, s=36, color=color, zorder=3)
    ax.scatter(
        x[~dist],
        d[~dist],
        marker=marker,
        s=36,
        facecolors="white",
        edgecolors=color,
        linewidths=1.4,
        zorder=3,
    )
    ax.plot([], [], marker=marker, color=color, linestyle="none", label=label)


def _delta_legend(ax) -> None:
    ax.axhline(0.0, color="black", linewidth=0.9)
    ax.set_ylabel("Δ accuracy (points)")
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="o", color="0.3", linestyle="none"),
        Line2D([], [], marker="o", markerfacecolor="white", color="0.3", linestyle="none"),
    ]
    labels += ["interval excludes 0", "n.s. (contains 0)"]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _finish_delta_panels(fig: Figure, axes, shots, ax_h: float, hspace: float, title: str) -> None:
    """Shot ticks, a layout that fits the legends, and the title of a column of delta panels."""
    axes[-1].set_xticks(shots)
    axes[-1].set_xlabel("shots (k)")
    longest = max(
        [len("interval excludes 0")]
        + [len(t) for ax in axes for t in ax.get_legend_handles_labels()[1]]
    )
    _, H = _fix_layout(
        fig,
        len(axes),
        1,
        6.8,
        ax_h,
        left=0.85,
        right=0.9 + _text_w(longest),
        top=0.75,
        bottom=0.6,
        wspace=0.0,
        hspace=hspace,
    )
    _suptitle(fig, title, H)


def experiment_plot(df: pd.DataFrame, title: str) -> Figure:
    """Δ (level − reference) per shot of one experiment table, one panel per context."""
    df = df[df["delta"].notna()] if "delta" in df else df.iloc[0:0]
    if df.empty:
        return _message("no comparison of this experiment is available", title)
    contexts = list(dict.fromkeys(df["context"]))
    shots = sorted(df["k"].unique())
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(len(contexts), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
        for ax, ctx in zip(axes, contexts):
            groups = list(df[df["context"] == ctx].groupby("level", sort=False))
            n = len(groups)
            for i, (lev, g) in enumerate(groups):
                _draw_deltas(
                    ax,
                    g,
                    (i - (n - 1) / 2) * (0.6 / max(n, 1)),
                    CELL_COLORS[i % len(CELL_COLORS)],
                    "o",
                    f"{lev} − {g['reference'].iloc[0]}",
                )
            ax.set_title(ctx or "all")
            _delta_legend(ax)
        _finish_delta_panels(
            fig, axes, shots, 2.3, 0.5, f"{title}: Δ with 95% paired bootstrap intervals"
        )
    return fig


def delta_plot(vs_legacy: pd.DataFrame) -> Figure:
    """Δ accuracy vs legacy per shot with 95% paired intervals; hollow markers = not distinguishable."""
    df = vs_legacy[vs_legacy["delta"].notna()] if "delta" in vs_legacy else vs_legacy.iloc[0:0]
    if df.empty:
        return _message("no mode vs legacy comparison is available", "Δ accuracy vs legacy")
    modes = _mode_list(df["mode"])
    colors = _setting_colors(df)
    shots = sorted(df["k"].unique())
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(len(modes), 1, sharex=True, squeeze=False)[:, 0]
        for ax, mode in zip(axes, modes):
            sub = df[df["mode"] == mode]
            groups = list(sub.groupby(["method", "baseline"], sort=False))
            n = len(groups)
            for i, ((_method, _), g) in enumerate(groups):
                g = g.sort_values("k")
                r = g.iloc[0]
                color = colors[_setting(r)]
                marker = "o" if _is_rank(r.use_rank) else "s"
                _draw_deltas(
                    ax, g, (i - (n - 1) / 2) * (0.6 / max(n, 1)), color, marker, r.cell_label
                )
            ax.set_title(f"{mode} − legacy (same use_rank, paired seeds)")
            _delta_legend(ax)
        _finish_delta_panels(
            fig,
            axes,
            shots,
            2.5,
            0.45,
            "Δ accuracy vs legacy with 95% paired bootstrap intervals (o = rank, □ = z-score)",
        )
    return fig


# ----------------------------------------------------------------------------- RL data


def _grid(n: int, ncols: int = 3) -> tuple[int, int]:
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


def reward_hist_plot(rewards: Mapping[str, RewardGroups], stats: Mapping[str, dict]) -> Figure:
    """Histogram of candidate rewards per rewards file, stacked by vqa_correct (red 0, green 1)."""
    labels = [lab for lab, g in rewards.items() if g.n_groups]
    if not labels:
        return _message("no rewards files given", "Reward distributions")
    nrows, ncols = _grid(len(labels))
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, lab in zip(axes, labels):
            g = rewards[lab]
            r, h = np.concatenate(g.rewards), np.concatenate(g.hard)
            lo, hi = float(r.min()), float(r.max())
            if hi - lo < 1e-12:
                lo, hi = lo - 0.5, hi + 0.5
            bins = np.linspace(lo, hi, 31)
            ax.hist(
                [r[h == 0], r[h == 1]],
                bins=bins,
                stacked=True,
                histtype="stepfilled",
                color=["#d62728", "#2ca02c"],
                label=["incorrect (h=0)", "correct (h=1)"],
            )
            st = stats.get(lab, {})
            ax.set_title(
                f"{_wrap(lab, 40)}\nflat {100 * st.get('share_flat', 0):.0f}% · "
                f"all-neg {100 * st.get('share_all_negative', 0):.0f}% · "
                f"all-pos {100 * st.get('share_all_positive', 0):.0f}%",
                fontsize=9.5,
            )
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
            ax.set_xlabel("reward")
            ax.set_ylabel("candidates")
        _finish_panel_grid(
            fig,
            axes,
            len(labels),
            nrows,
            ncols,
            "Candidate rewards per rewards file (stacked by vqa_correct)\nand the shares of groups "
            "that are flat / all-negative / all-positive",
        )
    return fig


def _finish_panel_grid(fig: Figure, axes, n_used: int, nrows: int, ncols: int, title: str) -> None:
    """Blank the unused panels, lay the grid out, and put the first panel's legend and the title below/above."""
    for ax in axes[n_used:]:
        ax.axis("off")
    handles, hl = axes[0].get_legend_handles_labels()
    _, H = _fix_layout(
        fig,
        nrows,
        ncols,
        3.6,
        2.3,
        left=0.8,
        right=0.25,
        top=1.0,
        bottom=1.0,
        wspace=0.8,
        hspace=1.05,
    )
    fig.legend(
        handles, hl, loc="lower center", bbox_to_anchor=(0.5, 0.08 / H), ncols=2, frameon=False
    )
    _suptitle(fig, title, H)


def advantage_hist_plot(adv: Mapping[tuple[str, bool], np.ndarray]) -> Figure:
    """Advantage distributions per rewards file, rank (use_rank=true) vs z-score, as ECDFs.

    Empirical CDFs show discrete rank advantages and continuous z-scores on one scale; the
    jump at 0 is the share of candidates without GRPO signal (also in each panel's title).
    """
    labels = list(dict.fromkeys(lab for lab, _ in adv))
    labels = [
        lab for lab in labels if any(adv.get((lab, u), np.zeros(0)).size for u in (True, False))
    ]
    if not labels:
        return _message("no rewards files given", "Advantage distributions")
    nrows, ncols = _grid(len(labels))
    style = {
        True: ("rank (use_rank=true)", "#1f77b4", "-"),
        False: ("z-score (use_rank=false)", "#ff7f0e", "-"),
    }
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, lab in zip(axes, labels):
            zero = []
            for u in (True, False):
                a = adv.get((lab, u), np.zeros(0))
                if a.size == 0:
                    continue
                name, color, ls = style[u]
                ax.ecdf(a, color=color, linestyle=ls, linewidth=1.6, label=name)
                zero.append(f"{'rank' if u else 'z'} {100 * float((np.abs(a) < 1e-9).mean()):.0f}%")
            ax.axvline(0.0, color="0.5", linewidth=0.8, linestyle=":")
            ax.set_title(f"{_wrap(lab, 40)}\nA = 0: " + ", ".join(zero), fontsize=9.5)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
            ax.set_xlabel("advantage")
            ax.set_ylabel("cumulative share")
            ax.set_ylim(0, 1.02)
        _finish_panel_grid(
            fig,
            axes,
            len(labels),
            nrows,
            ncols,
            "Advantages per rewards file (empirical CDF; min_std 0.1, clip ±5)\n"
            "A = 0: share of candidates with no GRPO signal",
        )
    return fig


# ----------------------------------------------------------------------------- training

_SEPS = ("-", "_", "/", " ", ":")


def _split_run(label: str) -> tuple[str, str]:
    """(column, short label) of a training run: its reward mode, 'v2', or 'other'.

    Labels as the workflow writes them (``v2 seed0``, ``v3 <cell slug> seed0``) or as
    :func:`icdrl.report.inputs.labelled_paths` derives them (``hard_plus_soft-hw1-sw1-rank/seed0/metrics``):
    a leading ``v3`` is dropped, then the longest mode name (or ``v2``) the label starts with.
    """
    base = label
    if base.startswith("v3") and base[2:3] in _SEPS:
        base = base[3:]
    for name in sorted(MODE_ORDER + ("v2",), key=len, reverse=True):
        if base == name or (base.startswith(name) and base[len(name) : len(name) + 1] in _SEPS):
            return name, base[len(name) :].strip("".join(_SEPS)) or name
    return "other", label


def _run_group(label: str) -> str:
    return _split_run(label)[0]


def identical_runs(metrics: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """label -> the earlier label whose training metrics are identical (identical runs).

    Every column but ``val_reward`` is compared: that one is the mean reward of the selector's
    choices under the run's own reward, so two identical trainings on rewards of different scale
    (e.g. 2h and 3h) differ there and nowhere else.
    """
    first: dict[str, str] = {}
    twin: dict[str, str] = {}
    for lab, df in metrics.items():
        if df.empty:
            continue
        key = df.drop(columns=["val_reward"], errors="ignore").to_csv(index=False)
        if key in first:
            twin[lab] = first[key]
        else:
            first[key] = lab
    return twin


def training_curves_plot(metrics: Mapping[str, pd.DataFrame]) -> Figure:
    """Rows = metrics, columns = run groups (v2 and each reward mode); one line per run.

    x is the epoch in file order across phases; RCE (and v2) epochs are dashed, GRPO solid. RCE and
    GRPO losses have separate rows (their scales differ by orders of magnitude). A run whose
    training metrics equal an earlier run's (:func:`identical_runs`) is drawn with hollow markers
    over it and its legend entry says which run it repeats, so identical runs do not hide each
    other.
    """
    labels = [lab for lab, df in metrics.items() if not df.empty]
    if not labels:
        return _message("no training metrics given", "Training curves")
    twins = identical_runs(metrics)
    groups: dict[str, list[str]] = {}
    for lab in labels:
        groups.setdefault(_run_group(lab), []).append(lab)
    order = [g for g in ("v2",) + MODE_ORDER if g in groups] + sorted(
        set(groups) - set(("v2",) + MODE_ORDER)
    )
    nrows, ncols = len(CURVE_METRICS), len(order)
    with mpl.rc_context(RC):
        fig = Figure()
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex="col")
        ax_h = 1.7
        most_runs = max(len(v) for v in groups.values())
        for j, grp in enumerate(order):
            runs = groups[grp]
            colors = {}
            legend = []
            for n_run, lab in enumerate(runs):
                df = metrics[lab]
                x = np.arange(len(df))
                color = (
                    CELL_COLORS[n_run % len(CELL_COLORS)]
                    if len(runs) <= len(CELL_COLORS)
                    else mpl.colormaps["viridis"](n_run / max(1, len(runs) - 1))
                )
                colors[lab] = color
                short = _split_run(lab)[1] or lab
                twin = twins.get(lab)
                if twin is not None:
                    tg, ts = _split_run(twin)
                    short = f"{short} = {ts if tg == grp else (twin if tg == 'other' else f'{tg} {ts}')} (identical)"
                legend.append((color, short, twin is not None))
                for i, (col, _name, phases) in enumerate(CURVE_METRICS):
                    ax = axes[i, j]
                    y = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
                    for phase in dict.fromkeys(df["phase"]):
                        if phases is not None and phase not in phases:
                            continue
                        m = (df["phase"] == phase).to_numpy() & np.isfinite(y)
                        if not m.any():
                            continue
                        if twin is None:
                            ax.plot(
                                x[m],
                                y[m],
                                color=color,
                                linestyle="-" if phase == "grpo" else "--",
                                linewidth=1.3,
                            )
                        else:
                            ax.plot(
                                x[m],
                                y[m],
                                color=color,
                                linestyle="none",
                                marker="o",
                                markersize=3.5,
                                markerfacecolor="none",
                                markeredgewidth=0.9,
                            )
            for i, (col, name, _) in enumerate(CURVE_METRICS):
                ax = axes[i, j]
                ax.locator_params(nbins=4)
                if not ax.lines:
                    ax.axis("off")  # no ticks to lay out: cheaper, and nothing to read there anyway
                    ax.text(
                        0.5,
                        0.5,
                        f"{name}:\nnot logged",
                        ha="center",
                        va="center",
                        color="0.5",
                        transform=ax.transAxes,
                    )
                elif col == "ratio_mean":
                    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
                if i == 0:
                    ax.set_title(grp if grp != "other" else "other runs")
            if j == len(order) - 1:  # each row's metric name on its first panel with data
                for i, (_, name, _) in enumerate(CURVE_METRICS):
                    first = next((axes[i, c] for c in range(ncols) if axes[i, c].lines), None)
                    if first is not None:
                        first.set_ylabel(name)
            shown = [i for i in range(nrows) if axes[i, j].lines]
            if shown:  # x tick labels on the lowest panel with data (shared x hides the others)
                axes[shown[-1], j].tick_params(labelbottom=True)
                axes[shown[-1], j].set_xlabel("epoch (all phases)")
            handles = [
                Line2D([], [], color=c, linewidth=1.6)
                if not tw
                else Line2D([], [], color=c, linestyle="none", marker="o", markerfacecolor="none")
                for c, _, tw in legend
            ]
            axes[-1, j].legend(
                handles,
                [t for _, t, _ in legend],
                loc="upper center",
                bbox_to_anchor=(0.5, -0.6 / ax_h),
                frameon=False,
                fontsize=8,
                ncols=1,
                title="run",
                title_fontsize=8,
            )
        _, H = _fix_layout(
            fig,
            nrows,
            ncols,
            3.2,
            ax_h,
            left=0.95,
            right=0.25,
            top=0.8,
            bottom=0.75 + 0.17 * (most_runs + 1),
            wspace=0.7,
            hspace=0.3,
        )
        _suptitle(
            fig,
            "Training curves (dashed = v2/RCE, solid = GRPO; hollow markers = identical to an earlier run)",
            H,
        )
    return fig
