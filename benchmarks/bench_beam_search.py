"""InfoScore beam search on the embedded LVLM: the project's path versus the reference implementation's naive one.

Setting: easy-VQA training anchors (seeded), a random pool of K = 32 per anchor, beam width
B = 5, depth D = 2 (1 + 32 + 5·31 = 188 answer scores per anchor). Both paths run
``icdrl.beam.beam_search`` on the same model and the same anchors and differ only in the backend:

* naive (as the reference implementation did): ``HFBackend(batch_size=1, image_cache="none")``: one
  prompt per forward pass, the processor re-run on every prompt's images;
* project: ``HFBackend(batch_size=--batch-size, image_cache="features")`` with its defaults:
  every expansion of a step in one batched call, each distinct image preprocessed (by the image
  processor alone once its layout is known) and vision-encoded once per run (the vision tower's
  per-image attention batched), chat-template skeletons, composed 3-D rope positions, the
  prefix key/value cache (the chat header; step 2 runs only the tokens after the step-1 prefix;
  ``prefix_max_demos = D - 1`` as the candidates stage sets it), and the last decoder layer's
  attention queries, o_proj and MLP run only at the answer-predicting columns.

The two paths run side by side, anchor by anchor (the order alternating), so that both see the
same machine conditions; the times are summed over the anchors.

The beams (pool positions, in order) must be identical, rank by rank their info scores agreeing
to ``TIE_TOL``; two candidates whose scores agree that closely may swap places (float32 forwards
batched and one at a time sum in different orders, about 1e-7 apart), which is reported.

    python benchmarks/bench_beam_search.py [--model auto|untrained|PATH] [--anchors 20] [--threads 2]

``--model``: the embedded LVLM the workflow trained (``auto``, the default: the newest
``results/lvlm/embedded-*/model``, built by ``snakemake`` or by its ``train_lvlm`` rule), a
checkpoint folder, or ``untrained``: a randomly initialised model of the same architecture and
size (``EmbeddedConfig()`` defaults), built in memory, which ``auto`` falls back to when no
trained one exists. Its forward passes cost the same, but its beams differ, and so does the
work (it measured a few per cent slower on the project path). The first line printed names the
model. The last line is ``speedup <ratio>`` (naive seconds per anchor / project seconds per
anchor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from icdrl.beam import AnchorScorer, beam_search
from icdrl.data import load_dataset, seeded_subset
from icdrl.lvlm.hf import HFBackend
from icdrl.pools import build_pools

#: info scores this close are ties at float32 precision
TIE_TOL = 1e-6
RESULTS = Path(__file__).resolve().parents[1] / "results"


def trained_embedded() -> str | None:
    """The newest embedded LVLM the workflow trained in this checkout's ``results/``, if any."""
    found = sorted(
        RESULTS.glob("lvlm/embedded-*/model/config.json"), key=lambda p: p.stat().st_mtime
    )
    return str(found[-1].parent) if found else None


def embedded_model(path: str | None):
    """(model, processor, label): the trained checkpoint at ``path``, else an untrained one of the same size."""
    if path:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import icdrl.lvlm.qwen  # noqa: F401  (registers the torchvision-free processor)

        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
        return model.eval(), proc, f"trained embedded LVLM at {path}"
    from icdrl.lvlm import embedded

    cfg = embedded.EmbeddedConfig()
    proc = embedded.build_processor(
        cfg, embedded.vocabulary(load_dataset({"name": "easyvqa"}, "train"))
    )
    torch.manual_seed(0)
    model = embedded.build_model(cfg, proc.tokenizer).eval()
    return (
        model,
        proc,
        f"UNTRAINED embedded-architecture LVLM ({embedded.n_parameters(model) / 1e6:.2f} M parameters)",
    )


def search_one(backend: HFBackend, anchor, pool, *, beam_width: int, depth: int):
    """One anchor's beams, its wall and process-CPU seconds and the prompts it scored."""
    t0, c0 = time.perf_counter(), time.process_time()
    scorer = AnchorScorer(backend, anchor, pool)
    beams = beam_search(scorer, beam_width=beam_width, depth=depth, insert="first")
    return beams, time.perf_counter() - t0, time.process_time() - c0, scorer.n_prompts


class Tally:
    """Beams and summed times of one path over the anchors."""

    def __init__(self, backend: HFBackend):
        self.backend, self.beams, self.wall, self.cpu, self.prompts = backend, [], 0.0, 0.0, 0

    def add(self, beams, wall: float, cpu: float, prompts: int) -> None:
        self.beams.append(beams)
        self.wall += wall
        self.cpu += cpu
        self.prompts += prompts


def run_interleaved(paths: list[Tally], anchors, pools, **kw) -> None:
    """Each anchor on every path in turn, the order alternating from anchor to anchor.

    The machine's speed drifts (shared cores): timing the paths anchor by anchor, side by side,
    lets both see the same conditions, so their ratio is steadier than timing one whole path
    after the other.
    """
    for i, (anchor, pool) in enumerate(zip(anchors, pools)):
        for t in paths if i % 2 == 0 else paths[::-1]:
            t.add(*search_one(t.backend, anchor, pool, **kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="auto",
        help="auto (the workflow's trained embedded LVLM, else untrained), untrained, or a checkpoint folder",
    )
    ap.add_argument("--anchors", type=int, default=20)
    ap.add_argument("--pool", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="project path batch size (config model.batch_size)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for both paths (default: torch's, all cores)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = {"auto": trained_embedded(), "untrained": None}.get(args.model, args.model)
    model, proc, label = embedded_model(path)
    train = load_dataset({"name": "easyvqa"}, "train")
    anchors = seeded_subset(train, args.anchors, args.seed)
    pools = build_pools(anchors, train, sampler="random", size=args.pool, seed=args.seed)
    by_id = {ex.id: ex for ex in train}
    pool_examples = [[by_id[i] for i in r.pool] for r in pools]
    print(f"model: {label}; torch threads: {torch.get_num_threads()}")
    print(
        f"{len(anchors)} easy-VQA anchors, random pools of K={args.pool}, B={args.beam}, D={args.depth}"
    )

    kw = dict(beam_width=args.beam, depth=args.depth)
    naive = Tally(HFBackend(model, proc, batch_size=1, image_cache="none"))
    fast = Tally(HFBackend(model, proc, batch_size=args.batch_size, image_cache="features"))
    fast.backend.prefix_max_demos = (
        args.depth - 1
    )  # as the candidates stage sets it (icdrl.beam.generate_shard)
    run_interleaved([naive, fast], anchors, pool_examples, **kw)
    pairs = [(b, c) for x, y in zip(naive.beams, fast.beams) for b, c in zip(x, y)]

    same = sum([b.pos for b in x] == [b.pos for b in y] for x, y in zip(naive.beams, fast.beams))
    # rank by rank the info scores must agree; where the sequences differ, the two are tied within
    # float32 precision (batched and one-at-a-time forwards sum in different orders)
    dev = max(abs(b.info_score - c.info_score) for b, c in pairs)
    ties = [abs(b.info_score - c.info_score) for b, c in pairs if b.pos != c.pos]
    n = len(anchors)
    f_naive, f_fast = naive.backend.stats["forward_batches"], fast.backend.stats["forward_batches"]
    stats = fast.backend.stats
    print(
        f"naive:   {naive.prompts} prompts, {f_naive} forward passes ({f_naive / n:.1f}/anchor), "
        f"{naive.wall / n:.3f} s/anchor wall, {naive.cpu / n:.3f} s/anchor CPU"
    )
    print(
        f"project: {fast.prompts} prompts, {f_fast} forward passes ({f_fast / n:.1f}/anchor), "
        f"{fast.wall / n:.3f} s/anchor wall, {fast.cpu / n:.3f} s/anchor CPU "
        f"({stats['image_preprocess']} images preprocessed, {stats['vision_encoded']} vision-encoded, "
        f"{stats['prefix_hits']} prompts ran on a cached prefix: chat header, or header and demonstrations)"
    )
    print(f"forward passes ratio {f_naive / f_fast:.1f}; CPU-time ratio {naive.cpu / fast.cpu:.2f}")
    print(
        f"identical beams: {same}/{n} anchors; max |info_score difference| {dev:.2e}"
        + (
            f"; the other anchors swap {len(ties)} candidates tied within {max(ties):.1e}"
            if ties
            else ""
        )
    )
    spread = np.mean([b[0].info_score - b[-1].info_score for b in fast.beams])
    print(f"mean info_score gap best-vs-{args.beam}th beam: {spread:.4f}")
    if dev > TIE_TOL:
        raise SystemExit(
            f"beams differ between the naive and the project path (info scores by {dev:.2e} > {TIE_TOL})"
        )
    print(f"speedup {naive.wall / fast.wall:.2f}")


if __name__ == "__main__":
    main()
