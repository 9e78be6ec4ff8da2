"""How long Snakemake takes to plan the workflow (parse + validate + build the DAG).

Target (issue 6): a dry run of the reference implementation's setting (config/okvqa_qwen2.5vl3b.yaml: 3 seeds,
8 shards, every experiment: 141 jobs) builds its DAG in under 10 s on the 2-core dev machine,
without the OK-VQA data or the Qwen weights (a dry run only plans).

    python benchmarks/bench_workflow_dag.py [--repeat 3] [--configfile config/okvqa_qwen2.5vl3b.yaml]

Prints one line per repeat and ``median <seconds>`` last (wall time of the whole
``snakemake -n`` process, interpreter start included).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run_seconds(configfile: Path, workdir: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "-n",
        "--quiet",
        "all",
        "--configfile",
        str(configfile),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dry run failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configfile", type=Path, default=ROOT / "config" / "okvqa_qwen2.5vl3b.yaml")
    args = ap.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.repeat):
            times.append(dry_run_seconds(args.configfile.resolve(), Path(d)))
            print(f"run {i + 1}: {times[-1]:.2f} s")
    print(f"median {statistics.median(times):.2f}")


if __name__ == "__main__":
    main()
