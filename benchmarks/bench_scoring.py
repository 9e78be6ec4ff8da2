"""Answer-scoring throughput of HFBackend on the tiny Qwen2.5-VL (CPU), and the image cache's speed-up.

Prompts hold 4 demonstrations + a query, all easy-VQA examples (64×64 PNGs, 16 image tokens
each), drawn from a small pool so that demonstrations recur across prompts as they do in beam
search. For each batch size (1, 8, 32) and each image-cache mode the benchmark builds a fresh
backend (cold cache: first-time preprocessing and vision encoding are included) and times
``answer_logprobs`` over all prompts; the best of ``--repeats`` runs is reported, as wall-clock
prompts/s and as prompts per CPU-second of this process (steadier on a shared machine; with one
thread the two agree on an idle one).

Cache modes: ``none`` (the processor is called with text and images for every prompt),
``pixels`` (each distinct image preprocessed once), ``features`` (each distinct image
preprocessed and vision-encoded once; the default). Image decoding is cached in-process in
all three (``icdrl.data.load_image``), so the speed-up isolates preprocessing + encoding.

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument(
        "--pool", type=int, default=24, help="distinct demonstrations the prompts draw from"
    )
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--modes", nargs="+", default=["none", "pixels", "features"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)

    import torch

    from icdrl.data import load_dataset, load_image
    from icdrl.lvlm import load_backend
    from icdrl.lvlm.tiny import save_tiny_qwen

    torch.set_num_threads(args.threads)
    train = load_dataset({"name": "easyvqa"}, "train")
    rng = random.Random(0)
    pool = rng.sample(train, args.pool)
    queries = rng.sample(train, max(1, args.n_prompts // 8))
    prompts, answers = [], []
    for i in range(args.n_prompts):
        q = queries[i % len(queries)]
        prompts.append((rng.sample(pool, args.shots), q))
        answers.append(q.answer)
    distinct = {e.image for d, q in prompts for e in (*d, q)}
    for p in distinct:  # decode once up front so every mode starts from decoded images
        load_image(p)

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_qwen(f"{tmp}/qwen")
        n_params = None
        rate: dict[tuple[int, str], float] = {}
        cpu_rate: dict[tuple[int, str], float] = {}
        check: dict[str, list[float]] = {}
        for bs in args.batch_sizes:
            for mode in args.modes:
                best = best_cpu = float("inf")
                for _ in range(args.repeats):
                    b = load_backend({"kind": "hf", "batch_size": bs, "image_cache": mode}, path)
                    n_params = sum(p.numel() for p in b.model.parameters())
                    t0, c0 = time.perf_counter(), time.process_time()
                    scores = b.answer_logprobs(prompts, answers)
                    best = min(best, time.perf_counter() - t0)
                    best_cpu = min(best_cpu, time.process_time() - c0)
                rate[(bs, mode)] = len(prompts) / best
                cpu_rate[(bs, mode)] = len(prompts) / best_cpu
                check.setdefault(mode, [s.sum_logprob for s in scores])

    ref = check[args.modes[0]]
    agree = max(abs(a - b) for m in args.modes for a, b in zip(check[m], ref))
    print(
        f"tiny Qwen2.5-VL ({n_params / 1e6:.2f} M parameters), CPU, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(
        f"{len(prompts)} prompts x ({args.shots} demonstrations + query), {len(distinct)} distinct images, "
        f"best of {args.repeats}; cold cache per run"
    )
    print(f"max |log-prob difference| across cache modes: {agree:.2e}")
    for label, r in (("wall-clock prompts/s", rate), ("prompts per CPU-second", cpu_rate)):
        print(f"\n{label}")
        header = "batch | " + " | ".join(f"{m:>9}" for m in args.modes)
        if "none" in args.modes:
            header += " | " + " | ".join(f"{m} vs none" for m in args.modes if m != "none")
        print(header)
        for bs in args.batch_sizes:
            row = f"{bs:5d} | " + " | ".join(f"{r[(bs, m)]:9.1f}" for m in args.modes)
            if "none" in args.modes:
                row += " | " + " | ".join(
                    f"{r[(bs, m)] / r[(bs, 'none')]:{len(m) + 7}.2f}x"
                    for m in args.modes
                    if m != "none"
                )
            print(row)


if __name__ == "__main__":
    main()
