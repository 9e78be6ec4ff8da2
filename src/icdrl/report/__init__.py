"""The report (docs/science.md §10): tables with paired bootstrap intervals, RL-data diagnostics, plots.

Entry point for the workflow's final rule::

    build_report(eval_paths, metrics_paths, rewards_paths, scored_path, report_cfg, out_dir, experiments)

* ``eval_paths``: list of ``icdrl.eval`` JSONL files (every method, every seed).
* ``metrics_paths``: training-metrics CSVs, either a mapping label → path (label = the cell slug
  with its seed, shown as the row title of the training-curves figure) or a plain list of paths
  (label = the path relative to the folder common to all of them, without suffix).
* ``rewards_paths``: ``icdrl.rewards`` JSONL files, mapping label → path or list (same rule).
* ``scored_path``: the gathered ``icdrl.scored`` JSONL, or None.
* ``report_cfg``: ``{"n_boot": 10000, "seed": 0}`` (both optional; other keys are errors).
  Intervals are 95% (``LEVEL``); p-values come from the same resamples, so n_boot bounds the
  smallest one (2/(n_boot + 1)) and with it how large a family Holm can resolve.

The statistics (docs/science.md §10) are a library the tables call: :mod:`.bootstrap` (two-level clustered
paired bootstrap: ``paired_bootstrap``, ``Interval`` with ``p``, ``se``, ``mde()``, ``parts``),
:mod:`.compare` (``compare`` one pair at one shot, ``family`` one experiment's comparisons: repeats
counted once, Holm), :mod:`.multiplicity` (``holm``), :mod:`.power` (``power_plan``,
``plan_lines``) and :mod:`.degenerate` (comparisons that cannot differ). The delta tables are
built by :func:`comparison_tables`, which ``icdrl power`` calls too.
* ``out_dir``: folder for the outputs; it always receives exactly :func:`report_files` (fixed
  names plus ``exp-<name>.*`` / ``exp-<name>-delta.*`` per experiment, independent of the
  results; a category without data holds a "not available" note).
* ``experiments``: :meth:`icdrl.grid.Experiment.as_dict` of every configured experiment (one
  table, delta plot and summary paragraph each, :mod:`.experiments`).
* ``answers``: the training split's answers table (``icdrl.answers``, :func:`icdrl.answers.write_answers`)
  the copy-rate diagnostics read (:mod:`.diagnostics`); None: those columns say "not available".
* ``config``: the validated workflow config, written beside the tables as ``config.yaml``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from icdrl.answers import load_answers
from icdrl.records import atomic_write_text

from .bootstrap import Interval, bootstrap_mean, paired_bootstrap, trend
from .compare import Comparison, compare, family, method_accuracy
from .degenerate import reward_equivalence
from .diagnostics import ablation_plot, ablations_table, diagnostics_plot, diagnostics_table
from .experiments import ExperimentSpec, experiment_table
from .inputs import EvalData, load_eval, load_metrics, load_rewards, load_scored
from .plots import (
    PLOT_NAMES,
    accuracy_plot,
    advantage_hist_plot,
    delta_plot,
    experiment_plot,
    reward_hist_plot,
    save_figure,
    training_curves_plot,
)
from .summary import build_summary
from .tables import (
    TABLE_NAMES,
    accuracy_table,
    advantage_values,
    group_stats,
    per_shot_table,
    rl_advantages_table,
    rl_groups_table,
    sources_table,
    training_table,
    vs_legacy_table,
    vs_v2_table,
    write_table,
)

__all__ = [
    "build_report",
    "report_files",
    "REPORT_FILES",
    "DEFAULT_REPORT_CFG",
    "Interval",
    "bootstrap_mean",
    "paired_bootstrap",
    "trend",
    "Comparison",
    "compare",
    "comparison_tables",
    "power_from_files",
    "family",
    "method_accuracy",
    "EvalData",
    "load_eval",
]

log = logging.getLogger(__name__)

DEFAULT_REPORT_CFG = {"n_boot": 10000, "seed": 0}
LEVEL = 0.95  # the tables' and captions' texts say 95%
TABLE_EXTS = ("csv", "md", "html")
PLOT_EXTS = ("png", "svg")
REPORT_FILES: tuple[str, ...] = (
    tuple(f"{t}.{e}" for t in TABLE_NAMES for e in TABLE_EXTS)
    + tuple(f"{p}.{e}" for p in PLOT_NAMES for e in PLOT_EXTS)
    + ("summary.md", "summary.html", "config.yaml")
)


def experiment_files(name: str) -> tuple[str, ...]:
    """The files of one experiment: its table and its delta plot."""
    return tuple(f"exp-{name}.{e}" for e in TABLE_EXTS) + tuple(
        f"exp-{name}-delta.{e}" for e in PLOT_EXTS
    )


def report_files(out_dir: str | os.PathLike = "", experiments: Sequence[str] = ()) -> list[str]:
    """The exact list of files :func:`build_report` writes into ``out_dir`` (same order), for
    experiments named ``experiments``."""
    names = list(REPORT_FILES) + [f for e in experiments for f in experiment_files(e)]
    return [os.path.join(str(out_dir), f) if str(out_dir) else f for f in names]


def _check_cfg(report_cfg: Mapping | None) -> dict:
    cfg = dict(DEFAULT_REPORT_CFG)
    extra = set(report_cfg or {}) - set(cfg)
    if extra:
        raise ValueError(f"report config: unknown keys {sorted(extra)}; allowed: {sorted(cfg)}")
    cfg.update(report_cfg or {})
    n_boot, seed = cfg["n_boot"], cfg["seed"]
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"report config: n_boot must be a positive int, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"report config: seed must be a non-negative int, got {seed!r}")
    return cfg


def comparison_tables(
    data: EvalData,
    n_boot: int,
    seed: int,
    level: float = LEVEL,
    experiments: Sequence[Mapping] = (),
) -> dict:
    """The delta tables, each one family of comparisons (``Table.comparisons``), in report order:
    every mode vs legacy, v3 vs v2, then one table per experiment (``exp-<name>``)."""
    out = {
        "vs_legacy": vs_legacy_table(data, n_boot, seed, level),
        "vs_v2": vs_v2_table(data, n_boot, seed, level),
    }
    for e in experiments:
        t = experiment_table(data, ExperimentSpec.from_dict(e), n_boot, seed, level)
        out[t.name] = t
    return out


def power_from_files(
    eval_paths,
    rewards_paths=None,
    *,
    experiments: Sequence[Mapping] = (),
    delta: float = 1.0,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    power: float = 0.8,
):
    """The power plan of a finished run (what the summary prints), from its evaluation records.

    The comparisons are those of :func:`comparison_tables` (rewards files, if given, let it
    recognise rank cells that cannot differ; ``experiments`` add their families). Returns a
    :class:`.power.PowerPlan`.
    """
    from .power import power_plan

    data = load_eval(eval_paths)
    data.reward_orders = reward_equivalence(load_rewards(rewards_paths))
    tables = comparison_tables(data, n_boot, seed, LEVEL, experiments)
    return power_plan(
        [c for t in tables.values() for c in t.comparisons], delta=delta, alpha=alpha, power=power
    )


def _config_text(config: Mapping | None) -> str:
    """The config the report was made from (validated, defaults filled in), as YAML."""
    import yaml

    if config is None:
        return "# the report was built without a config (icdrl.report.build_report(config=None))\n"
    return "# the validated workflow config of this report (defaults filled in)\n" + yaml.safe_dump(
        dict(config), sort_keys=True, default_flow_style=None, width=100
    )


def build_report(
    eval_paths: Sequence[str | os.PathLike],
    metrics_paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None,
    rewards_paths: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None,
    scored_path: str | os.PathLike | None,
    report_cfg: Mapping | None,
    out_dir: str | os.PathLike,
    experiments: Sequence[Mapping] = (),
    answers: str | os.PathLike | None = None,
    config: Mapping | None = None,
) -> None:
    """Write every table (CSV, Markdown, HTML), plot (PNG, SVG) and the summary into ``out_dir``.

    See the module docstring for the arguments; the written names are :func:`report_files`.
    """
    cfg = _check_cfg(report_cfg)
    n_boot, seed, level = cfg["n_boot"], cfg["seed"], LEVEL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = load_eval(eval_paths)
    metrics = load_metrics(metrics_paths)
    rewards = load_rewards(rewards_paths)
    scored = load_scored(scored_path)
    data.reward_orders = reward_equivalence(rewards)
    train_answers = load_answers(answers) if answers is not None else None
    log.info(
        "report: %d methods (%d ablations), shots %s, %d metrics files, %d rewards files",
        len(data.main()),
        len(data.ablations()),
        data.shots,
        len(metrics),
        len(rewards),
    )

    adv = {(lab, ur): advantage_values(g, ur) for lab, g in rewards.items() for ur in (True, False)}
    tables = {
        "accuracy": accuracy_table(data, n_boot, seed, level),
        "vs_legacy": vs_legacy_table(data, n_boot, seed, level),
        "vs_v2": vs_v2_table(data, n_boot, seed, level),
        "per_shot": per_shot_table(data),
        "rl_groups": rl_groups_table(rewards),
        "rl_advantages": rl_advantages_table(adv),
        "candidates_by_source": sources_table(scored),
        "training_summary": training_table(metrics),
        "diagnostics": diagnostics_table(data, train_answers, n_boot, seed, level),
        "ablations": ablations_table(data, n_boot, seed, level),
    }
    assert tuple(tables) == TABLE_NAMES
    for t in tables.values():
        write_table(t, out)

    stats = {lab: group_stats(g) for lab, g in rewards.items()}
    figures = {
        "accuracy_vs_shot": accuracy_plot(tables["accuracy"].data),
        "delta_vs_legacy": delta_plot(tables["vs_legacy"].data),
        "reward_hist": reward_hist_plot(rewards, stats),
        "advantage_hist": advantage_hist_plot(adv),
        "training_curves": training_curves_plot(metrics),
        "copy_rates": diagnostics_plot(tables["diagnostics"].data),
        "ablation_delta": ablation_plot(tables["ablations"].data),
    }
    assert tuple(figures) == PLOT_NAMES
    for name, fig in figures.items():
        save_figure(fig, out, name)

    specs = [ExperimentSpec.from_dict(e) for e in experiments]
    exp_tables = [experiment_table(data, e, n_boot, seed, level) for e in specs]
    for t in exp_tables:
        write_table(t, out)
        save_figure(experiment_plot(t.data, t.title), out, f"{t.name}-delta")

    summary = build_summary(data, tables, n_boot, seed, level, exp_tables)
    atomic_write_text(out / "summary.md", summary.markdown())
    atomic_write_text(out / "summary.html", summary.html())
    atomic_write_text(out / "config.yaml", _config_text(config))
    log.info("report written to %s (%d files)", out, len(report_files("", [e.name for e in specs])))
