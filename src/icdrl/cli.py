"""``icdrl <subcommand>``: a thin command line over the library.

* ``icdrl validate CONFIG``: check a workflow config (one line naming the key if invalid).
* ``icdrl grid CONFIG``: the merged grid cells, reward files and result folders it plans.
* ``icdrl icl-check MODEL_DIR ...``: the embedded LVLM's in-context check (see its ``--help``).
* ``icdrl power RESULTS_DIR --delta 1 [--config CONFIG]``: from a finished run's evaluation records, the minimum
  detectable effects and the test queries (and seeds) that would resolve ``delta`` points, as
  the report's summary gives them (its experiments' comparisons with ``--config``): size a GPU run
  before paying for it.

The reference implementation's environment variables (``REWARD_MODE`` ...) apply to ``validate`` and ``grid`` as
they do to the workflow.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _load(path: str) -> dict | None:
    """The validated config at ``path`` (env overrides applied), or None after printing why not."""
    from icdrl.config import load_config

    try:
        return load_config(path, environ=os.environ)
    except ValueError as e:  # ConfigError, or a bad env-var value
        print(f"icdrl: {e}", file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    from icdrl.grid import cells, seeds

    cfg = _load(args.config)
    if cfg is None:
        return 1
    print(f"{args.config}: valid ({len(cells(cfg))} grid cells x {len(seeds(cfg))} seeds)")
    return 0


def _grid(args: argparse.Namespace) -> int:
    from icdrl.grid import experiment_cells
    from icdrl.layout import Layout
    from icdrl.report.experiments import fmt_level

    cfg = _load(args.config)
    if cfg is None:
        return 1
    layout = Layout(cfg)
    exps = {e.name: e for e in layout.experiments()}
    for name, block in experiment_cells(cfg).items():
        e = exps.get(name)
        what = f" ({e.contrast} vs {fmt_level(e.contrast, e.reference)})" if e else ""
        print(f"{name}{what}: {', '.join(c.slug for c in block)}")
    merged = layout.cells()
    print(f"merged: {len(merged)} cells x seeds {layout.seeds()}")
    for tc in layout.trained_cells():
        print(f"  {tc.cell.slug}  ({tc.v3_tag}, from {tc.v2_tag})")
    print("reward files:")
    for p in layout.all_rewards():
        print(f"  {p}")
    print(f"candidates: {layout.candidates}")
    if layout.per_shot:
        print(f"per_shot:   {layout.per_shot} (chosen on {layout.n_val} validation queries)")
    print(f"report:     {layout.report_dir}/")
    return 0


def _power(args: argparse.Namespace) -> int:
    from icdrl.report import power_from_files
    from icdrl.report.discover import find_eval_groups, find_rewards
    from icdrl.report.power import plan_lines

    if not args.delta > 0:
        print(f"icdrl: --delta must be > 0, got {args.delta}", file=sys.stderr)
        return 2
    try:
        groups = find_eval_groups(args.results_dir)
    except FileNotFoundError as e:
        print(f"icdrl: {e}", file=sys.stderr)
        return 1
    if not groups:
        print(
            f"icdrl: {args.results_dir}: no evaluation records (icdrl.eval files) found",
            file=sys.stderr,
        )
        return 1
    experiments = []
    if args.config:
        from icdrl.grid import experiments as configured

        cfg = _load(args.config)
        if cfg is None:
            return 1
        experiments = [e.as_dict() for e in configured(cfg)]
    for key, paths in groups.items():
        rewards = find_rewards(paths, args.results_dir)
        try:
            plan = power_from_files(
                paths,
                rewards,
                experiments=experiments,
                delta=args.delta,
                n_boot=args.n_boot,
                seed=args.seed,
                alpha=args.alpha,
                power=args.power,
            )
        except ValueError as e:
            print(f"icdrl: {key}: {e}", file=sys.stderr)
            return 1
        print(f"{key}: {len(paths)} evaluation files, {len(rewards)} rewards files")
        for line in plan_lines(plan):
            print(f"  {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "icl-check":
        from icdrl.lvlm.embedded import main_icl_check

        return main_icl_check(argv[1:])
    parser = argparse.ArgumentParser(prog="icdrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("validate", "check a workflow config"),
        ("grid", "print the grid cells and result folders of a config"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="a workflow config YAML, e.g. config/config.yaml")
    sub.add_parser(
        "icl-check", help="the embedded LVLM's in-context check (icdrl icl-check --help)"
    )
    p = sub.add_parser(
        "power", help="test queries and seeds that would resolve DELTA points, from a finished run"
    )
    p.add_argument(
        "results_dir", help="a results folder (e.g. results/) holding evaluation records"
    )
    p.add_argument(
        "--delta", type=float, default=1.0, help="effect to resolve, in accuracy points (default 1)"
    )
    p.add_argument(
        "--n-boot", type=int, default=2000, help="bootstrap resamples per comparison (default 2000)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided test level (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="power (default 0.8)")
    p.add_argument(
        "--config", help="the run's config: adds its experiments' comparisons to the plan"
    )
    args = parser.parse_args(argv)
    return {"validate": _validate, "grid": _grid, "power": _power}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
