"""The report's two-level paired bootstrap: vectorised resample weights versus a per-resample
Python loop, and the whole ``build_report`` on synthetic inputs of the reference implementation's scale.

Setting: N test queries (default 800, the reference implementation's largest N), 2 seeds, n_boot = 1000 resamples
(the report's default is 10000: ``--n-boot 10000``); ``--comparisons`` paired comparisons
(default 200, about what a 4-mode × 2-use_rank × 2-weights grid needs over 4 shots). Both paths
use the same query and seed draws (``index_matrix``, the seed multiplicities) and the same
seed-level scaling κ, and must give identical intervals.

    OMP_NUM_THREADS=1 python benchmarks/bench_report.py [--queries 800] [--comparisons 200] [--full]

``--full`` also times ``build_report`` end to end (tables, plots, summary) on the synthetic
inputs of ``tests/report_synth.py`` with the given number of queries. The last line printed is
``speedup <ratio>`` (loop seconds / vectorised seconds for the bootstrap).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from icdrl.report.bootstrap import (
    _seed_level,
    _seed_weights,
    _weights,
    index_matrix,
    paired_bootstrap,
)


def loop_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """The naive way: one resample at a time (same draws and seed scaling as the vectorised path)."""
    d = a - b
    s, n = d.shape
    per_query = d.mean(axis=0)
    idx = index_matrix(n, n_boot, seed)
    seeds = _seed_weights(s, n_boot, seed, 0)
    centred = _seed_level(d, np.arange(n), n).centred
    means = np.empty(n_boot)
    for i in range(n_boot):
        means[i] = (
            sum(per_query[j] for j in idx[i]) / n
            + sum(seeds[i, t] * centred[t] for t in range(s)) / s
        )
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=800)
    ap.add_argument("--comparisons", type=int, default=200)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pairs = [
        (
            rng.choice([0.0, 0.3, 0.6, 1.0], size=(2, args.queries)),
            rng.choice([0.0, 0.3, 0.6, 1.0], size=(2, args.queries)),
        )
        for _ in range(args.comparisons)
    ]

    _weights.cache_clear()
    t = time.perf_counter()
    fast = [paired_bootstrap(a, b, n_boot=args.n_boot, seed=0) for a, b in pairs]
    t_fast = time.perf_counter() - t

    n_loop = max(1, min(5, args.comparisons))
    t = time.perf_counter()
    slow = [loop_bootstrap(a, b, args.n_boot, 0) for a, b in pairs[:n_loop]]
    t_slow = (time.perf_counter() - t) / n_loop * args.comparisons
    for iv, (lo, hi) in zip(fast, slow):
        assert abs(iv.low - lo) < 1e-9 and abs(iv.high - hi) < 1e-9, (iv, lo, hi)

    print(f"queries {args.queries}, seeds 2, n_boot {args.n_boot}, comparisons {args.comparisons}")
    print(
        f"vectorised: {t_fast:.3f} s total, {1e3 * t_fast / args.comparisons:.2f} ms per comparison"
    )
    print(f"loop (timed on {n_loop}, scaled): {t_slow:.1f} s total")

    if args.full:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import report_synth

        from icdrl.report import build_report

        with tempfile.TemporaryDirectory() as tmp:
            inp = report_synth.make_inputs(tmp, n_queries=args.queries)
            t = time.perf_counter()
            build_report(
                inp["eval_paths"],
                inp["metrics_paths"],
                inp["rewards_paths"],
                inp["scored_path"],
                {"n_boot": args.n_boot, "seed": 0},
                Path(tmp) / "out",
            )
            print(
                f"build_report ({len(inp['cells'])} v3 cells, 2 seeds, {args.queries} queries): "
                f"{time.perf_counter() - t:.1f} s"
            )
    print(f"speedup {t_slow / t_fast:.0f}")


if __name__ == "__main__":
    main()
