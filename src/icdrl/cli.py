"""``icdrl <subcommand>``: a thin command line over the library.

* ``icdrl validate CONFIG``: check a workflow config (one line naming the key if invalid).
* ``icdrl grid CONFIG``: the merged grid cells, reward files and result folders it plans.
* ``icdrl icl-check MODEL_DIR ...``: the embedded LVLM's in-context check (see its ``--help``).

The seed's environment variables (``REWARD_MODE`` ...) apply to ``validate`` and ``grid`` as
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
    from icdrl.grid import Layout, experiment_cells
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "icl-check":
        from icdrl.lvlm.embedded import main_icl_check

        return main_icl_check(argv[1:])
    parser = argparse.ArgumentParser(prog="icdrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("validate", "check a workflow config"),
                           ("grid", "print the grid cells and result folders of a config")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="a workflow config YAML, e.g. config/config.yaml")
    sub.add_parser("icl-check", help="the embedded LVLM's in-context check (icdrl icl-check --help)")
    args = parser.parse_args(argv)
    return {"validate": _validate, "grid": _grid}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
