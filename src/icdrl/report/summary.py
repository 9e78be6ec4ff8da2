"""``summary.md`` / ``summary.html``: headline findings generated from the tables' numbers."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .bootstrap import LEVEL_SEEDS
from .compare import ALPHA, compare
from .degenerate import distinct_selectors
from .inputs import EvalData
from .multiplicity import expected_by_chance
from .power import plan_lines, power_plan
from .tables import NA, Table, render_html

__all__ = ["Summary", "build_summary"]

MAX_ITEMS = 10


@dataclass
class Summary:
    """A list of blocks: ("h1"|"h2"|"p", text) or ("ul", [items])."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h1(self, t: str) -> None:
        self.blocks.append(("h1", t))

    def h2(self, t: str) -> None:
        self.blocks.append(("h2", t))

    def p(self, t: str) -> None:
        self.blocks.append(("p", t))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind == "h1":
                out += [f"# {v}", ""]
            elif kind == "h2":
                out += [f"## {v}", ""]
            elif kind == "p":
                out += [str(v), ""]
            else:
                out += [f"- {item}" for item in v] + [""]
        return "\n".join(out)

    def html(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind in ("h1", "h2"):
                out.append(f"<{kind}>{html.escape(str(v))}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{html.escape(str(v))}</p>")
            else:
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in v) + "</ul>")
        title = next((str(v) for k, v in self.blocks if k == "h1"), "Summary")
        return render_html(title, "\n".join(out))


def _fmt_delta(r) -> str:
    return f"{r.delta:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"


def _cap(items: list[str], what: str) -> list[str]:
    if len(items) <= MAX_ITEMS:
        return items
    return items[:MAX_ITEMS] + [f"… and {len(items) - MAX_ITEMS} more {what} (see the table)"]


@dataclass(frozen=True)
class FamilyCounts:
    """What one family of comparisons found (the numbers the summary prints)."""

    tested: int
    holm_up: int
    holm_down: int
    unadjusted: int  # intervals that exclude 0, before any adjustment
    by_chance: float  # unadjusted exclusions expected with no true difference (α·m)
    cannot_differ: int
    duplicates: int
    not_available: int

    @property
    def holm(self) -> int:
        return self.holm_up + self.holm_down


def family_counts(comparisons, alpha: float = ALPHA) -> FamilyCounts:
    """Counts over one family (``Table.comparisons``): adjusted flags, chance rate, untested kinds."""
    tested = [c for c in comparisons if c.tested]
    sig = [c for c in tested if c.significant_holm]
    return FamilyCounts(
        tested=len(tested),
        holm_up=sum(c.interval.estimate > 0 for c in sig),
        holm_down=sum(c.interval.estimate < 0 for c in sig),
        unadjusted=sum(bool(c.distinguishable) for c in tested),
        by_chance=expected_by_chance(len(tested), alpha),
        cannot_differ=sum(bool(c.available and c.degenerate) for c in comparisons),
        duplicates=sum(bool(c.duplicate_of) for c in comparisons),
        not_available=sum(not c.available for c in comparisons),
    )


def _comparison_block(
    s: Summary, t: Table, describe, heading: str, level: float, n_boot: int
) -> None:
    df = t.data
    n_na = int(df["note"].astype(str).str.startswith(NA).sum())
    n_same = int(df["note"].astype(str).str.startswith("same ").sum())
    s.h2(heading)
    if n_same:
        s.p(
            f"{n_same} {'level trains' if n_same == 1 else 'levels train'} the same cell as {'its' if n_same == 1 else 'their'} "
            f"reference, or repeat a comparison listed under another setting: identical by construction, not tested "
            f"(see {t.name}.md)."
        )
    fc = family_counts(t.comparisons)
    if fc.tested + fc.cannot_differ + fc.duplicates == 0:
        s.p(
            f"No comparison is available ({n_na} {'row says' if n_na == 1 else 'rows say'} why in {t.name}.md)."
        )
        return
    pct = int(round(100 * level))
    line = (
        f"{fc.holm} of {fc.tested} tested deltas are significant after Holm's correction over this family "
        f"({fc.holm_up} up, {fc.holm_down} down). Unadjusted, {fc.unadjusted} of {fc.tested} {pct}% intervals "
        f"exclude 0, where chance alone would give about {fc.by_chance:.1f}."
    )
    if fc.cannot_differ:
        line += (
            f" {fc.cannot_differ} {'comparison cannot' if fc.cannot_differ == 1 else 'comparisons cannot'} "
            f"differ by construction and {'is' if fc.cannot_differ == 1 else 'are'} not tested (see the notes "
            f"in {t.name}.md)."
        )
    if fc.duplicates:
        line += (
            f" {fc.duplicates} {'row repeats a comparison' if fc.duplicates == 1 else 'rows repeat comparisons'} "
            f"between identical selectors and {'counts' if fc.duplicates == 1 else 'count'} once."
        )
    if n_na:
        line += f" {n_na} {'comparison is' if n_na == 1 else 'comparisons are'} not available (reasons in {t.name}.md)."
    p_min = 2.0 / (n_boot + 1)
    if fc.tested and fc.tested * p_min > ALPHA:
        line += (
            f" With {n_boot} resamples no p-value falls below {p_min:.4f}, too coarse for Holm over "
            f"{fc.tested} comparisons: raise report.n_boot."
        )
    s.p(line)
    rows = {id(c): r for c, r in zip(t.comparisons, _comparison_rows(df))}
    shown = [c for c in t.comparisons if c.tested and c.significant_holm]
    label = "significant after Holm"
    if not shown:
        shown = [c for c in t.comparisons if c.tested and c.distinguishable]
        label = "unadjusted only; none survives Holm"
    items = []
    for c in sorted(shown, key=lambda c: (c.k, c.interval.estimate)):
        r = rows[id(c)]
        agree = {"yes": "seeds agree", "no": "SEEDS DISAGREE in sign"}.get(
            str(r.seeds_agree), "one seed"
        )
        items.append(
            f"k={r.k} {describe(r)}: {_fmt_delta(r)} points ({r.trend}; p={c.p:.4f}, Holm "
            f"{c.p_holm:.4f}; {agree}; n={r.n_queries})"
        )
    if items:
        s.p(f"Deltas whose interval excludes 0 ({label}):")
    s.ul(_cap(items, "deltas"))
    tested = [rows[id(c)] for c in t.comparisons if c.tested]
    disagree = [r for r in tested if str(r.seeds_agree) == "no"]
    if disagree:
        s.p(
            f"{len(disagree)} of {len(tested)} deltas change sign between seeds: training noise is "
            "of the size of the effect there (see per_seed_delta)."
        )


def _comparison_rows(df: pd.DataFrame) -> list:
    """The table rows that hold a comparison, in order (one per entry of ``Table.comparisons``)."""
    return [r for r in df.itertuples() if isinstance(r.status, str) and r.status and r.k != "all"]


def build_summary(
    data: EvalData,
    tables: dict[str, Table],
    n_boot: int,
    seed: int,
    level: float,
    experiments: Sequence[Table] = (),
) -> Summary:
    """Headline findings: best method per shot, distinguishable deltas per comparison family
    (every mode vs legacy, each configured experiment, v3 vs v2), per_shot's choices, power, RL-data shares."""
    s = Summary()
    s.h1("Report summary")
    acc = tables["accuracy"].data
    good = acc[acc["acc_mean"].notna()]
    nq = sorted(set(int(n) for n in good["n_queries"])) if not good.empty else []
    seeds_v3 = sorted(
        {x for m in data.v3() for k in data.shots for x in data.seeds(m.key, k) if x is not None}
    )
    s.p(
        f"{len(data.main())} methods ({len(data.v3())} v3 cells), shots {', '.join(map(str, data.shots))}; "
        f"test queries per (method, shot): {nq[0] if len(nq) == 1 else (f'{nq[0]}–{nq[-1]}' if nq else 0)}; "
        f"v3 seeds: {', '.join(map(str, seeds_v3)) or 'none'}."
    )
    families = [tables["vs_legacy"], *experiments, tables["vs_v2"]]
    comps = [c for t in families for c in t.comparisons if c.available]
    s.p(_intervals_text(comps, n_boot, seed, level))
    widths = [(c.interval.high - c.interval.low) / 2 for c in comps if c.tested]
    mdes = [c.mde for c in comps if c.tested and c.mde is not None]
    if widths:
        s.p(
            f"Resolution: the median half-width of a tested delta's interval is {np.median(widths):.2f} points "
            f"(range {min(widths):.2f}–{max(widths):.2f}); its minimum detectable effect (80% power, two-sided "
            f"5%) is {np.median(mdes):.2f} points. Smaller differences cannot be told apart here."
        )
    groups = distinct_selectors(data)
    if data.v3():
        same = [g for g in groups if len(g) > 1]
        line = f"The {len(data.v3())} v3 cells are {len(groups)} distinct selectors."
        if same:
            names = "; ".join(" = ".join(data.methods[k].long() for k in g) for g in same)
            line += (
                f" These choose the same demonstrations for every (query, k), or cannot differ by "
                f"construction, and count once in every test: {names}."
            )
        s.p(line)

    s.h2("Best method per shot")
    items = []
    for k in data.shots:
        sub = good[good["k"] == k]
        if sub.empty:
            continue
        best = sub.loc[sub["acc_mean"].idxmax()]
        best_key = _key_of(data, best)
        ties = []
        for r in sub.itertuples():
            key = _key_of(data, r)
            if key == best_key:
                continue
            c = compare(data, key, best_key, k, n_boot, seed, level)
            if c.available and not c.distinguishable:
                ties.append(r.method)
        line = (
            f"k={k}: {best['method']} {best['acc_mean']:.2f}% [{best['ci_low']:.2f}, {best['ci_high']:.2f}]; "
            f"{len(ties)} of {len(sub) - 1} other methods are not distinguishable from it"
        )
        if ties:
            shown = "; ".join(ties[:6]) + (f"; … (+{len(ties) - 6})" if len(ties) > 6 else "")
            line += f" ({shown})"
        items.append(line + ".")
    s.ul(items)

    def cell(r) -> str:
        return f"{r.mode} {r.cell_label}"

    _comparison_block(
        s,
        tables["vs_legacy"],
        lambda r: f"{cell(r)} vs legacy",
        "Reward modes vs legacy",
        level,
        n_boot,
    )
    for t in experiments:
        _comparison_block(
            s,
            t,
            lambda r: (
                (f"{r.context}: " if isinstance(r.context, str) and r.context else "")
                + f"{r.contrast} {r.level} vs {r.reference}"
            ),
            f"Experiment {t.name[4:]}: {t.title}",
            level,
            n_boot,
        )
    _comparison_block(
        s, tables["vs_v2"], lambda r: f"v3 {cell(r)} vs v2", "v3 cells vs v2", level, n_boot
    )
    _per_shot_block(s, tables["per_shot"])
    _retrieval_block(s, data, n_boot, seed, level)
    _diagnostics_block(s, tables.get("diagnostics"), tables.get("ablations"), level)

    s.h2("Power: what would resolve 1 point")
    plan = power_plan([c for t in families for c in t.comparisons], delta=1.0)
    lines = plan_lines(plan)
    items = [ln.strip() for ln in lines if ln.startswith("  ")]
    for ln in lines:
        if not ln.startswith("  "):
            s.p(ln)
        elif ln.strip() == items[0]:
            s.ul(items)
    s.p("The same plan from any finished run: icdrl power RESULTS_DIR --delta 1.")

    s.h2("RL data")
    g = tables["rl_groups"].data
    g = g[g["n_groups"].notna() & (g["n_groups"] > 0)] if "n_groups" in g else g.iloc[0:0]
    if g.empty:
        s.p("No rewards files were given.")
    else:
        items = []
        for r in g.itertuples():
            items.append(
                f"{r.label}: {int(r.n_groups)} groups, flat {100 * r.share_flat:.1f}%, "
                f"all-negative {100 * r.share_all_negative:.1f}%, "
                f"all-positive {100 * r.share_all_positive:.1f}%, "
                f"reward range [{r.reward_min:.3f}, {r.reward_max:.3f}]{_within_text(r)}."
            )
        s.ul(_cap(items, "rewards files"))
        a = tables["rl_advantages"].data
        if "share_zero" in a and a["share_zero"].notna().any():
            worst = a.loc[a["share_zero"].fillna(-1).idxmax()]
            s.p(
                f"Largest share of zero advantages: {worst['label']} with {worst['advantage']} advantages, "
                f"{100 * worst['share_zero']:.1f}% of candidates carry no GRPO signal."
            )
    return s


def _per_shot_block(s: Summary, t: Table) -> None:
    df = t.data
    if "cell" not in df or not df["cell"].map(lambda v: isinstance(v, str) and bool(v)).any():
        return
    s.h2("per_shot: the cell chosen at each shot (on validation queries)")
    s.ul(
        [
            f"k={r.k}" + (f" seed {int(r.seed)}" if pd.notna(r.seed) else "") + f": {r.method} "
            f"(validation accuracy {r.val_acc:.2f}% over {int(r.n_val)} queries)"
            for r in df.itertuples()
        ]
    )


def _within_text(r) -> str:
    """Correct vs incorrect within the mixed groups (GRPO sees only within-group differences)."""
    n = 0 if pd.isna(r.n_mixed) else int(r.n_mixed)
    if n == 0:
        return "; no group has both correct and incorrect candidates"
    inv, tied = r.share_inverted, r.share_tied
    if inv == 0 and tied == 0:
        return (
            f"; within each of the {n} mixed groups every correct candidate scores above every incorrect "
            f"one (smallest within-group gap {r.within_gap_min:.3f})"
        )
    parts = []
    if inv > 0:
        parts.append(
            f"in {100 * inv:.1f}% an incorrect candidate outscores a correct one (by up to "
            f"{-r.within_gap_min:.3f})"
        )
    if tied > 0:
        parts.append(
            f"in {100 * tied:.1f}% the best incorrect candidate ties the worst correct one"
        )
    return f"; of its {n} mixed groups, " + " and ".join(parts)


def _intervals_text(comps, n_boot: int, seed: int, level: float) -> str:
    """What the intervals resample, said from the comparisons themselves."""
    pct = int(round(level * 100))
    two = [c for c in comps if c.interval.levels == LEVEL_SEEDS]
    clustered = [c for c in comps if (c.interval.n_clusters or c.interval.n) < c.interval.n]
    text = (
        f"Intervals: {pct}% percentile bootstrap ({n_boot} resamples, seed {seed}), paired: one draw of "
        "seeds and queries for both sides of a delta; p-values from the same resamples. "
    )
    if two and len(two) == len(comps):
        text += "Seeds are resampled, then test queries (training noise and test-set sampling are both covered). "
    elif two:
        text += (
            f"{len(two)} of {len(comps)} deltas resample seeds, then test queries; the others have one run "
            "per side and resample test queries only. "
        )
    else:
        text += (
            "One seed per method: only test queries are resampled, so the intervals cover test-set sampling, "
            "not training noise (a second seed would measure it). "
        )
    if clustered:
        c = clustered[0].interval
        text += (
            f"Questions about the same image are resampled together ({c.n_clusters} images for {c.n} "
            "queries). "
        )
    else:
        text += "Each test query is its own cluster (no two share an image, or the records name no images). "
    return text + (
        "'n.s.' = the interval contains 0; significance within an experiment is judged after Holm's "
        "step-down correction over its comparisons."
    )


#: the trained methods compared with RICES and the copy baseline in the summary
_TRAINED = ("v2", "per_shot")


def _retrieval_block(s: Summary, data: EvalData, n_boot: int, seed: int, level: float) -> None:
    """The trained selectors (v2; per_shot, the v3 cells chosen on validation queries) against RICES
    and the copy baseline. No cell is chosen on the test queries here."""
    refs = [r for r in ("rices", "copy") if r in data.methods]
    trained = [t for t in _TRAINED if t in data.methods]
    if not refs or not trained:
        return
    s.h2("Trained selectors vs RICES and the copy baseline")
    items = []
    for k in data.shots:
        for key in trained:
            for ref in refs:
                c = compare(data, key, ref, k, n_boot, seed, level)
                if c.available:
                    items.append(
                        f"k={k} {data.methods[key].long()} − {data.methods[ref].long()}: "
                        f"{c.interval.estimate:+.2f} [{c.interval.low:+.2f}, {c.interval.high:+.2f}] points "
                        f"({c.trend})"
                    )
    s.ul(_cap(items, "comparisons"))


def _diagnostics_block(s: Summary, diag: Table | None, abl: Table | None, level: float) -> None:
    """Copy rates of RICES and v2, and the distinguishable ablation deltas."""
    if diag is None or "copies_last" not in diag.data or not diag.data["copies_last"].notna().any():
        return
    s.h2("How the LVLM uses the demonstrations")
    d = diag.data
    items = []
    for kind in ("rices", "v2", "per_shot"):
        sub = d[(d["method_kind"] == kind) & d["copies_last"].notna()]
        if len(sub):
            items.append(
                f"{sub['method'].iloc[0]} copies the last demonstration's answer in "
                + ", ".join(f"{r.copies_last:.1f}% (k={r.k})" for r in sub.itertuples())
                + " of its predictions; any demonstration's in "
                + ", ".join(f"{r.copies_any:.1f}%" for r in sub.itertuples())
                + "."
            )
    s.ul(items)
    if abl is not None and "delta" in abl.data:
        a = abl.data[abl.data["delta"].notna()]
        dist = a[a["distinguishable"].astype(bool)]
        s.p(
            f"Ablations: {len(dist)} of {len(a)} deltas are distinguishable from 0 at {int(round(100 * level))}% "
            f"(see ablations.md)."
            if len(a)
            else "No ablation comparison is available (see ablations.md)."
        )
        s.ul(
            _cap(
                [
                    f"k={r.k} {r.method} [{r.ablation_label}]: {_fmt_delta(r)} points ({r.trend})"
                    for r in dist.itertuples()
                ],
                "ablation deltas",
            )
        )


def _key_of(data: EvalData, r) -> str:
    cell = r["cell"] if isinstance(r, pd.Series) else r.cell
    kind = r["method_kind"] if isinstance(r, pd.Series) else r.method_kind
    return f"v3:{cell}" if kind == "v3" else kind
