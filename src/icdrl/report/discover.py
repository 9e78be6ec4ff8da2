"""Finding a finished run's evaluation and rewards files under a results folder (``icdrl power``).

Files are recognised by their JSON Lines header (``icdrl.eval``, ``icdrl.rewards``), not by
name. Evaluation files on the test queries are grouped by run: the path before its first
``anchors-n*`` or ``test-*`` component (dataset, model, encoder, pools) and the evaluation tag
(``test-...``: test queries, shots, generation length, metric), so that one group holds one set
of test queries. Evaluation files on the validation queries (``val-*``) are left out: nothing
is reported on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["schema_of", "find_eval_groups", "find_rewards"]


def schema_of(path: str | os.PathLike) -> str | None:
    """The ``schema`` named by a JSON Lines file's header line, or None."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = json.loads(fh.readline() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return head.get("schema") if isinstance(head, dict) else None


def _group_key(rel: Path) -> str:
    parts = rel.parts
    cut = next(
        (i for i, p in enumerate(parts) if p.startswith(("anchors-n", "test-"))), len(parts) - 1
    )
    tag = (
        rel.stem
        if rel.stem.startswith("test-")
        else (rel.parent.name if rel.parent.name.startswith("test-") else "test")
    )
    return str(Path(*parts[:cut], tag)) if cut else tag


def find_eval_groups(results_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Group key -> sorted ``icdrl.eval`` files under ``results_dir`` (partial files skipped)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such results folder")
    groups: dict[str, list[str]] = {}
    for p in sorted(root.rglob("*.jsonl")):
        if p.stem.startswith("val-"):
            continue
        if schema_of(p) == "icdrl.eval":
            groups.setdefault(_group_key(p.relative_to(root)), []).append(str(p))
    return groups


def find_rewards(eval_paths, results_dir: str | os.PathLike) -> dict[str, str]:
    """Rewards files (label = file stem) in the ``rewards/`` folders above the given evaluation files."""
    root = Path(results_dir).resolve()
    found: dict[str, str] = {}
    for e in eval_paths:
        d = Path(e).resolve().parent
        while d == root or root in d.parents:
            rdir = d / "rewards"
            if rdir.is_dir():
                for p in sorted(rdir.glob("*.jsonl")):
                    if schema_of(p) == "icdrl.rewards":
                        found.setdefault(p.stem, str(p))
                break
            if d == root:
                break
            d = d.parent
    return found
