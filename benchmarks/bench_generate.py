"""Greedy generation on the embedded LVLM: the project's path against plain ``model.generate``.

Two workloads of the embedded default (``config/config.yaml``), each sent to the backend in the
chunks the workflow sends (``chunk_prompts`` = 4 x batch size):

* evaluation: ``--queries`` easy-VQA test queries (seeded, as ``pools.n_test``), random pools of
  K = 32, shots 1-4 with nested sequences (the k-shot demonstrations extend the (k-1)-shot ones,
  as a greedy selector's do; drawn by ``icdrl.evaluate.plan_method("random")``), chunks of whole
  queries (``icdrl.evaluate.chunks_by_query``); 4 x 200 = 800 prompts;
* scoring: the candidate sequences of ``--anchors`` training anchors (the workflow's
  ``candidates.jsonl``; 15 per anchor: 5 beams, 5 random, 5 similar), chunks of whole anchors
  (``icdrl.scoring.chunks_by_prompts``), identical sequences of an anchor generated once.

Paths, each with its own backend on the same weights, ``max_new_tokens`` 10:

* project: ``HFBackend(batch_size=--batch-size)`` with its defaults: the prefix key/value cache
  (chat header, demonstration prefixes; a prompt whose prefix another prompt of the chunk stores
  runs after it, on it), the first step over the ids after the cached prefix with the last
  decoder layer at the last column only, batched greedy decoding with a key/value cache, each
  row leaving the batch at its end token, the decoding steps of several batches run together,
  and the image cache of the scoring path (new images' pixels by lookup table, the vision patch
  embedding as a matrix product);
* previous: the same backend with cached greedy decoding switched off: the cached image
  features etc., then ``model.generate`` on the full prompts (this project before issue 17);
* plain batched: ``HFBackend(image_cache="none", batch_size=--batch-size)``: the processor on
  every prompt and ``model.generate``, as plain transformers usage does it (the reference path);
* plain one at a time: the same with batch size 1 (the reference implementation's way), on every ``--single-every``-th
  chunk only (its time per answer is reported).

The paths run side by side, chunk by chunk, the order alternating, so that all see the same
machine conditions (shared cores drift by tens of per cent within minutes). Answers are compared
token for token with the plain batched path; where they differ, the plain path's two best logits
at the first differing step decide: within ``icdrl.lvlm.hf.near_tie_tolerance`` (float32:
1e-5, or 1e-6 of the logit) it is a near-tie, counted; otherwise a mismatch, and the benchmark
fails.

    python benchmarks/bench_generate.py [--model auto|untrained|PATH] [--candidates auto|PATH]
        [--queries 200] [--anchors 100] [--batch-size 32] [--threads N]

``--model``: as ``bench_beam_search.py`` (default: the newest ``results/lvlm/embedded-*/model``
of this checkout, else an untrained model of the same size). ``--candidates``: the embedded
default's ``candidates.jsonl`` (default: the newest under ``results/``); without one the
scoring workload is skipped. The last line is ``speedup <ratio>``: plain batched seconds /
project seconds over both workloads.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_beam_search import RESULTS, embedded_model, trained_embedded

from icdrl.beam import examples_by_id, lookup
from icdrl.data import load_dataset, seeded_subset
from icdrl.evaluate import Job, chunks_by_query, plan_method
from icdrl.lvlm.hf import HFBackend, compare_greedy, near_tie_tolerance
from icdrl.pools import build_pools
from icdrl.records import CandidateRecord, read_records
from icdrl.scoring import chunks_by_prompts

MAX_NEW = 10


def newest_candidates() -> str | None:
    found = sorted(
        RESULTS.glob("*/*/lvlm/*/anchors-*/*/candidates.jsonl"), key=lambda p: p.stat().st_mtime
    )
    return str(found[-1]) if found else None


def eval_chunks(train, n_queries: int, chunk: int) -> list[list]:
    """The evaluation workload's generate calls: lists of prompts (demonstrations, query)."""
    queries = seeded_subset(load_dataset({"name": "easyvqa"}, "eval"), n_queries, 0)
    pools = build_pools(queries, train, sampler="random", size=32, seed=0, role="test")
    by_id = examples_by_id(train, "train")
    qs = {q.id: q for q in queries}
    pool_of = {r.query_id: r.pool for r in pools}
    jobs = [
        Job(q, k, tuple(pos), tuple(pool_of[q][p] for p in pos))
        for q, k, pos in plan_method("random", pools, [1, 2, 3, 4], seed=0)
    ]
    return [
        [(lookup(by_id, j.icd_ids, "pool"), qs[j.query_id]) for j in part]
        for part in chunks_by_query(jobs, chunk)
    ]


def scoring_chunks(train, path: str, n_anchors: int, chunk: int) -> list[list]:
    """The scoring workload's generate calls (``icdrl.scoring.score_records``' prompts)."""
    by_id = examples_by_id(train, "train")
    records = read_records(path, CandidateRecord)[:n_anchors]
    out = []
    for part in chunks_by_prompts(records, chunk):
        prompts = []
        for rec in part:
            anchor = by_id[rec.anchor_id]
            for ids in dict.fromkeys(c.icd_ids for c in rec.candidates):
                prompts.append((lookup(by_id, ids, "candidates"), anchor))
        out.append(prompts)
    return out


class Runner:
    """One path's backend, its answers (token ids per prompt, in workload order) and time."""

    def __init__(self, name: str, backend: HFBackend, every: int = 1):
        self.name, self.backend, self.every = name, backend, every
        self.ids: dict[tuple[int, int], tuple[int, ...]] = {}  # (chunk, row) -> ids
        self.wall = 0.0
        self.n = 0

    def run(self, c: int, prompts: list) -> None:
        if c % self.every:
            return
        t0 = time.perf_counter()
        got = self.backend.generate_ids(prompts, MAX_NEW)
        self.backend.tokenizer.batch_decode(
            [list(t) for t in got], skip_special_tokens=True
        )  # as generate does
        self.wall += time.perf_counter() - t0
        self.n += len(prompts)
        self.ids.update(((c, r), t) for r, t in enumerate(got))


def run_workload(label: str, chunks: list[list], paths: list[Runner]) -> None:
    for c, prompts in enumerate(chunks):
        for p in paths if c % 2 == 0 else paths[::-1]:
            p.run(c, prompts)
    print(f"{label}: {len(chunks)} generate calls, {sum(map(len, chunks))} prompts")


def compare(label: str, chunks: list[list], ref: Runner, other: Runner) -> tuple[int, int, int]:
    """(identical, near-ties, mismatches) of ``other`` against ``ref``, the near-ties judged on
    the plain path's own logits."""
    keys = [k for k in other.ids if k in ref.ids]
    diff = [k for k in keys if other.ids[k] != ref.ids[k]]
    ties = mism = 0
    if diff:
        b = ref.backend
        items = b._items([chunks[c][r] for c, r in diff], [None] * len(diff))
        toks, tied = b._plain_tokens(items, MAX_NEW, gaps=True)
        if toks != [ref.ids[k] for k in diff]:
            print(
                f"  ({label}: the plain path's answers changed when re-run alone; judging on the re-run)"
            )
        m, t = compare_greedy([other.ids[k] for k in diff], toks, tied)
        ties, mism = len(t), len(m)
        for i in m[:3]:
            print(
                f"  mismatch {diff[i]}: {other.name} {list(other.ids[diff[i]])} vs plain {list(toks[i])}"
            )
    return len(keys) - len(diff), ties, mism


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto")
    ap.add_argument("--candidates", default="auto")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--anchors", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--single-every", type=int, default=8, help="one-at-a-time path on every N-th chunk"
    )
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = {"auto": trained_embedded(), "untrained": None}.get(args.model, args.model)
    model, proc, label = embedded_model(path)
    print(
        f"model: {label}; torch threads: {torch.get_num_threads()}; batch size {args.batch_size}, "
        f"max_new_tokens {MAX_NEW}"
    )
    train = load_dataset({"name": "easyvqa"}, "train")
    chunk = 4 * args.batch_size
    workloads = [("evaluation", eval_chunks(train, args.queries, chunk))]
    cand = newest_candidates() if args.candidates == "auto" else args.candidates
    if cand:
        workloads.append(("scoring", scoring_chunks(train, cand, args.anchors, chunk)))
        print(f"scoring candidates: {cand} (first {args.anchors} anchors)")
    else:
        print(
            "no candidates.jsonl found (run the workflow's candidates stage, or pass --candidates); "
            "scoring workload skipped"
        )

    totals = {"project": 0.0, "previous": 0.0, "plain batched": 0.0}
    bad = 0
    for name, chunks in workloads:
        project = Runner("project", HFBackend(model, proc, batch_size=args.batch_size))
        previous = Runner("previous", HFBackend(model, proc, batch_size=args.batch_size))
        previous.backend._fast_generate = False
        plain = Runner(
            "plain batched", HFBackend(model, proc, batch_size=args.batch_size, image_cache="none")
        )
        single = Runner(
            "plain one at a time",
            HFBackend(model, proc, batch_size=1, image_cache="none"),
            args.single_every,
        )
        run_workload(name, chunks, [project, previous, plain, single])
        st = project.backend.stats
        print(
            f"  project: {project.wall:.2f} s ({1e3 * project.wall / project.n:.1f} ms/answer); "
            f"{st['forward_batches']} prompt forwards, {st['decode_steps']} decoding steps, "
            f"{st['prefix_hits']} prompts on a cached prefix, near-ties in its checks: {st['generate_near_ties']}"
        )
        for p in (previous, plain, single):
            print(
                f"  {p.name}: {p.wall:.2f} s ({1e3 * p.wall / p.n:.1f} ms/answer, {p.n} answers); "
                f"project {p.wall / p.n / (project.wall / project.n):.2f}x faster per answer"
            )
        for p in (project, previous, single):
            same, ties, mism = compare(name, chunks, plain, p)
            bad += mism
            print(
                f"  {p.name} vs plain batched: {same}/{same + ties + mism} answers identical token for token, "
                f"{ties} near-ties (top-2 logits within {near_tie_tolerance(plain.backend.dtype, 0.0):g}), {mism} mismatches"
            )
        off = [k for k, v in project.backend.fast_paths().items() if not v]
        print(
            f"  project fast paths all on: {not off}" + (f" (off: {', '.join(off)})" if off else "")
        )
        for k in totals:
            totals[k] += {"project": project, "previous": previous, "plain batched": plain}[k].wall
    print(
        f"total: project {totals['project']:.2f} s, previous {totals['previous']:.2f} s "
        f"({totals['previous'] / totals['project']:.2f}x), plain batched {totals['plain batched']:.2f} s"
    )
    if bad:
        raise SystemExit(f"{bad} answers differ from plain model.generate beyond near-ties")
    print(f"speedup {totals['plain batched'] / totals['project']:.2f}")


if __name__ == "__main__":
    main()
