"""``summary.md`` / ``summary.html``: headline findings generated from the tables' numbers."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .compare import compare
from .inputs import EvalData
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


def _comparison_block(s: Summary, t: Table, describe, heading: str, level: float) -> None:
    df = t.data
    avail = df[df["delta"].notna()] if "delta" in df else df.iloc[0:0]
    n_na = int(df["note"].astype(str).str.startswith(NA).sum())
    n_same = int(df["note"].astype(str).str.startswith("same ").sum())
    s.h2(heading)
    if n_same:
        s.p(f"{n_same} {'level trains' if n_same == 1 else 'levels train'} the same cell as {'its' if n_same == 1 else 'their'} "
            f"reference, or repeat a comparison listed under another setting: identical by construction, not tested "
            f"(see {t.name}.md).")
    if avail.empty:
        s.p(f"No comparison is available ({n_na} {'row says' if n_na == 1 else 'rows say'} why in {t.name}.md).")
        return
    dist = avail[avail["distinguishable"].astype(bool)]
    up = int((dist["trend"] == "up").sum())
    down = int((dist["trend"] == "down").sum())
    line = (f"{len(dist)} of {len(avail)} deltas are distinguishable from 0 at {int(round(100 * level))}% "
            f"({up} up, {down} down); {len(avail) - len(dist)} are not (n.s.).")
    if n_na:
        line += f" {n_na} {'comparison is' if n_na == 1 else 'comparisons are'} not available (reasons in {t.name}.md)."
    s.p(line)
    items = []
    for r in dist.sort_values(["k", "delta"], kind="stable").itertuples():
        agree = {"yes": "seeds agree", "no": "SEEDS DISAGREE in sign"}.get(str(r.seeds_agree), "one seed")
        items.append(f"k={r.k} {describe(r)}: {_fmt_delta(r)} points ({r.trend}; {agree}; n={r.n_queries})")
    s.ul(_cap(items, "distinguishable deltas"))
    disagree = avail[avail["seeds_agree"].astype(str) == "no"]
    if len(disagree):
        s.p(f"{len(disagree)} of {len(avail)} deltas change sign between seeds: training noise is "
            "of the size of the effect there (see per_seed_delta).")


def build_summary(data: EvalData, tables: dict[str, Table], n_boot: int, seed: int, level: float,
                  experiments: Sequence[Table] = ()) -> Summary:
    """Headline findings: best method per shot, distinguishable deltas per comparison family
    (every mode vs legacy, each configured experiment, v3 vs v2), per_shot's choices, RL-data shares."""
    s = Summary()
    s.h1("Report summary")
    acc = tables["accuracy"].data
    good = acc[acc["acc_mean"].notna()]
    nq = sorted(set(int(n) for n in good["n_queries"])) if not good.empty else []
    seeds_v3 = sorted({x for m in data.v3() for k in data.shots for x in data.seeds(m.key, k) if x is not None})
    s.p(f"{len(data.main())} methods ({len(data.v3())} v3 cells), shots {', '.join(map(str, data.shots))}; "
        f"test queries per (method, shot): {nq[0] if len(nq) == 1 else (f'{nq[0]}–{nq[-1]}' if nq else 0)}; "
        f"v3 seeds: {', '.join(map(str, seeds_v3)) or 'none'}.")
    s.p(f"Intervals: {int(round(level * 100))}% percentile bootstrap over test queries ({n_boot} resamples, seed {seed}); "
        "a delta is paired per query and averaged over the seeds both methods share before resampling. "
        "The intervals cover test-set sampling, not training noise: compare the per-seed deltas in the tables. "
        "'n.s.' = the interval contains 0 (not distinguishable).")
    widths = []
    for t in [tables["vs_legacy"], *experiments, tables["vs_v2"]]:
        d = t.data
        if "delta" in d:
            d = d[d["delta"].notna()]
            widths += list((d["ci_high"] - d["ci_low"]) / 2)
    if widths:
        s.p(f"Resolution: the median half-width of a paired delta's interval is {np.median(widths):.2f} points "
            f"(range {min(widths):.2f}–{max(widths):.2f}); smaller differences cannot be told apart here.")

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
        line = (f"k={k}: {best['method']} {best['acc_mean']:.2f}% [{best['ci_low']:.2f}, {best['ci_high']:.2f}]; "
                f"{len(ties)} of {len(sub) - 1} other methods are not distinguishable from it")
        if ties:
            shown = "; ".join(ties[:6]) + (f"; … (+{len(ties) - 6})" if len(ties) > 6 else "")
            line += f" ({shown})"
        items.append(line + ".")
    s.ul(items)

    def cell(r) -> str:
        return f"{r.mode} {r.cell_label}"

    _comparison_block(s, tables["vs_legacy"], lambda r: f"{cell(r)} vs legacy", "Reward modes vs legacy", level)
    for t in experiments:
        _comparison_block(s, t, lambda r: (f"{r.context}: " if isinstance(r.context, str) and r.context else "")
                          + f"{r.contrast} {r.level} vs {r.reference}", f"Experiment {t.name[4:]}: {t.title}", level)
    _comparison_block(s, tables["vs_v2"], lambda r: f"v3 {cell(r)} vs v2", "v3 cells vs v2", level)
    _per_shot_block(s, tables["per_shot"])
    _retrieval_block(s, data, n_boot, seed, level)
    _diagnostics_block(s, tables.get("diagnostics"), tables.get("ablations"), level)

    s.h2("RL data")
    g = tables["rl_groups"].data
    g = g[g["n_groups"].notna() & (g["n_groups"] > 0)] if "n_groups" in g else g.iloc[0:0]
    if g.empty:
        s.p("No rewards files were given.")
    else:
        items = []
        for r in g.itertuples():
            sep = ""
            if pd.notna(r.pos_reward_min) and pd.notna(r.neg_reward_max):
                gap = r.pos_reward_min - r.neg_reward_max
                sep = (f"; correct candidates always score higher (gap {gap:.3f})" if gap > 0 else
                       f"; an incorrect candidate can outscore a correct one (by {-gap:.3f})")
            items.append(f"{r.label}: {int(r.n_groups)} groups, flat {100 * r.share_flat:.1f}%, "
                         f"all-negative {100 * r.share_all_negative:.1f}%, "
                         f"all-positive {100 * r.share_all_positive:.1f}%, "
                         f"reward range [{r.reward_min:.3f}, {r.reward_max:.3f}]{sep}.")
        s.ul(_cap(items, "rewards files"))
        a = tables["rl_advantages"].data
        if "share_zero" in a and a["share_zero"].notna().any():
            worst = a.loc[a["share_zero"].fillna(-1).idxmax()]
            s.p(f"Largest share of zero advantages: {worst['label']} with {worst['advantage']} advantages, "
                f"{100 * worst['share_zero']:.1f}% of candidates carry no GRPO signal.")
    return s


def _per_shot_block(s: Summary, t: Table) -> None:
    df = t.data
    if "cell" not in df or not df["cell"].map(lambda v: isinstance(v, str) and bool(v)).any():
        return
    s.h2("per_shot: the cell chosen at each shot (on validation queries)")
    s.ul([f"k={r.k}" + (f" seed {int(r.seed)}" if pd.notna(r.seed) else "") + f": {r.method} "
          f"(validation accuracy {r.val_acc:.2f}% over {int(r.n_val)} queries)" for r in df.itertuples()])


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
                    items.append(f"k={k} {data.methods[key].long()} − {data.methods[ref].long()}: "
                                 f"{c.interval.estimate:+.2f} [{c.interval.low:+.2f}, {c.interval.high:+.2f}] points "
                                 f"({c.trend})")
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
            items.append(f"{sub['method'].iloc[0]} copies the last demonstration's answer in "
                         + ", ".join(f"{r.copies_last:.1f}% (k={r.k})" for r in sub.itertuples())
                         + " of its predictions; any demonstration's in "
                         + ", ".join(f"{r.copies_any:.1f}%" for r in sub.itertuples()) + ".")
    s.ul(items)
    if abl is not None and "delta" in abl.data:
        a = abl.data[abl.data["delta"].notna()]
        dist = a[a["distinguishable"].astype(bool)]
        s.p(f"Ablations: {len(dist)} of {len(a)} deltas are distinguishable from 0 at {int(round(100 * level))}% "
            f"(see ablations.md)." if len(a) else "No ablation comparison is available (see ablations.md).")
        s.ul(_cap([f"k={r.k} {r.method} [{r.ablation_label}]: {_fmt_delta(r)} points ({r.trend})"
                   for r in dist.itertuples()], "ablation deltas"))


def _key_of(data: EvalData, r) -> str:
    cell = r["cell"] if isinstance(r, pd.Series) else r.cell
    kind = r["method_kind"] if isinstance(r, pd.Series) else r.method_kind
    return f"v3:{cell}" if kind == "v3" else kind
