"""Helpers for the workflow tests: run Snakemake in a subprocess and read its job table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
CONFIG = ROOT / "config"
FAKE_SLURM = ROOT / "tests" / "fake_slurm"

#: every rule of the workflow (the embedded default schedules all of them)
ALL_RULES = {
    "train_lvlm",
    "icl_check",
    "embed",
    "pools",
    "candidates_shard",
    "concat_candidates",
    "score_shard",
    "concat_scored",
    "rewards",
    "train_v2",
    "train_v3",
    "evaluate_baseline",
    "evaluate_v2",
    "evaluate_v3",
    "select_per_shot",
    "report",
    "all",
    "evaluate_rices",
    "evaluate_ablation",
    "answers",
}


def snakemake(
    *args: str, workdir: Path, env: dict | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess:
    """``python -m snakemake -s <repo>/Snakefile -d <workdir> <args>``; output captured as text."""
    full_env = dict(os.environ)
    for var in (
        "REWARD_MODE",
        "HARD_WEIGHT",
        "SOFT_WEIGHT",
        "REWARD_ALPHA",
        "REWARD_BETA",
        "USE_RANK_ADVANTAGE",
    ):
        full_env.pop(var, None)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's "Job stats" table (empty when nothing is to be done)."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^job\s+count\s*$", line.strip()):
            for row in lines[i + 2 :]:
                m = re.match(r"^(\w+)\s+(\d+)\s*$", row.strip())
                if not m or m.group(1) == "total":
                    break
                counts[m.group(1)] = int(m.group(2))
            break
    return counts


def dry_run(*args: str, workdir: Path, env: dict | None = None) -> dict[str, int]:
    """Jobs per rule a dry run plans (raises with the output if the dry run fails)."""
    proc = snakemake("-n", "--quiet", "rules", *args, workdir=workdir, env=env, check=True)
    return job_counts(proc.stdout + proc.stderr)
