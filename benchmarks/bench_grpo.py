"""GRPO epoch time on CPU: batched groups versus one query per optimiser step.

Data: synthetic groups (icdrl.synthetic.synthetic_groups), 800 groups × 15 candidates × pool 64 ×
depth 2, 512-d embeddings, the v3 defaults otherwise. Both runs start from the same weights and
run one GRPO epoch (π_old snapshot included). Equal losses: the GRPO loss of every group at one
set of weights (θ = the per-query run's result, π_old = π_ref = the start) is computed once in
batches and once group by group; the two means must agree.

    OMP_NUM_THREADS=1 python benchmarks/bench_grpo.py [--groups 800] [--batch 16] [--repeats 3]

The last line printed is ``speedup <ratio>`` (per-query time / batched time).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from icdrl import rl
from icdrl.groups import make_batch, pack_groups
from icdrl.selector import PointerSelector
from icdrl.synthetic import synthetic_groups
from icdrl.train import V3Config, train_v3


def grpo_epoch(
    model: PointerSelector, syn, batch: int
) -> tuple[float, float, PointerSelector, float]:
    """One GRPO epoch from ``model``; returns (wall s, process CPU s, trained model, epoch loss)."""
    cfg = V3Config(rce_epochs=0, grpo_epochs=1, batch_queries=batch, val_fraction=0.0)
    m = copy.deepcopy(model)
    t0, c0 = time.perf_counter(), time.process_time()
    out, rows, _ = train_v3(m, syn.groups, syn.table, cfg, use_rank=False, seed=0)
    return time.perf_counter() - t0, time.process_time() - c0, out, rows[-1]["loss"]


def loss_over_groups(theta: PointerSelector, start: PointerSelector, syn, batch: int) -> float:
    """Group-weighted mean GRPO loss over every group, computed ``batch`` groups at a time."""
    packed = pack_groups(syn.groups, syn.table)
    total, kept = 0.0, 0
    theta.eval()
    start.eval()
    with torch.no_grad():
        for i in range(0, len(packed), batch):
            b = make_batch(
                packed, torch.arange(i, min(i + batch, len(packed))), syn.table, torch.device("cpu")
            )
            lp = theta.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask)
            lp0 = start.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask)
            loss, d = rl.grpo_loss(lp, lp0, lp0, b.rewards, use_rank=False, mask=b.cand_mask)
            total += float(loss) * d["groups_kept"]
            kept += d["groups_kept"]
    return total / max(kept, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=800)
    ap.add_argument("--cands", type=int, default=15)
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=V3Config().batch_queries)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    syn = synthetic_groups(
        n_groups=args.groups,
        n_cands=args.cands,
        pool_size=args.pool,
        depth=args.depth,
        dim=args.dim,
        seed=0,
    )
    torch.manual_seed(0)
    model = PointerSelector(args.dim)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{args.groups} groups x {args.cands} candidates x pool {args.pool} x depth {args.depth}, d={args.dim}"
    )

    # interleave the two modes and keep each one's best time, so that load from other
    # processes on the machine hits both alike
    wall = {args.batch: [], 1: []}
    cpu = {args.batch: [], 1: []}
    result = {}
    for _ in range(args.repeats):
        for b in (args.batch, 1):
            w, c, m, loss = grpo_epoch(model, syn, b)
            wall[b].append(w)
            cpu[b].append(c)
            result[b] = (m, loss)
    for b, label in (
        (args.batch, f"batched (batch_queries={args.batch})"),
        (1, "one query per step"),
    ):
        print(
            f"{label:34s} wall {min(wall[b]):7.3f} s/epoch (CPU {min(cpu[b]):7.3f} s), "
            f"epoch loss {result[b][1]:.6f}"
        )
    m_one = result[1][0]

    l_b = loss_over_groups(m_one, model, syn, args.batch)
    l_1 = loss_over_groups(m_one, model, syn, 1)
    diff = abs(l_b - l_1)
    print(
        f"GRPO loss at identical weights: batched {l_b:.8f}, per query {l_1:.8f}, |diff| {diff:.2e}"
    )
    if diff > 1e-5 * max(1.0, abs(l_1)):
        raise SystemExit(f"batched and per-query losses differ by {diff:.3e}")
    print(f"CPU-time ratio {min(cpu[1]) / min(cpu[args.batch]):.2f}")
    print(f"speedup {min(wall[1]) / min(wall[args.batch]):.2f}")


if __name__ == "__main__":
    main()
