"""GPU check: the backend's fast paths at Qwen2.5-VL-3B-Instruct's size, in bfloat16 with sdpa.

A randomly initialised model with Qwen2.5-VL-3B-Instruct's exact configuration (written below;
no weights are read or downloaded) and a word-level tokenizer whose special tokens sit at the
real checkpoint's ids, the real image processor settings (patch 14, merge 2, CLIP mean/std).
Prompts of the reference implementation's shape: 4 demonstrations + query, 448x448 images (256 image tokens each),
OK-VQA-like questions; the demonstrations are drawn from a pool, so prompts share some.

It runs, in this order (each once to warm up on other prompts, then timed):

* ``answer_logprobs`` on ``--prompts`` prompts (one answer each) — the scoring path;
* ``generate`` on ``--queries`` queries x shots 1-4 with nested demonstrations (evaluation) —
  the prefix cache and cached greedy decoding;
* both again on ``--check`` prompts through the reference path (``image_cache: none``, plain
  transformers) on the same model: scores within bf16 rounding, answers token for token except
  near-ties (``icdrl.lvlm.hf.near_tie_tolerance``).

It prints prompts/s, prompt tokens/s and generated tokens/s, peak GPU memory, model FLOP
utilisation (the FLOPs the forward passes executed — every linear layer's and attention's, counted
from their shapes — per second, over the device's dense bf16 peak: ``--peak-tflops`` or the table
below), and which fast paths stayed on; it exits 1 if one did not or a check failed.

    python benchmarks/gpu_check.py [--batch-size 16] [--prompts 64] [--queries 16] [--peak-tflops T]
    python benchmarks/gpu_check.py --tiny --device cpu     # the same run at toy size (a test runs it)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: Qwen/Qwen2.5-VL-3B-Instruct config.json, as published (the architecture; weights are random here)
QWEN25_VL_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
#: Qwen2.5-VL's special tokens and their ids in the real tokenizer
SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
#: the real preprocessor_config.json's normalisation (CLIP)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, first match wins
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("A6000", 155.0),
]
WORDS = (
    "what is the man holding in his hand which sport are they playing how many animals are there "
    "where was this picture taken what kind of food is on the plate is it raining who makes this "
    "vehicle what color is the bus question short answer : ? . , tennis pizza two beach red yes no "
    "frisbee kitchen dog cat umbrella toyota"
).split()
QUESTIONS = [
    "what is the man holding in his hand ?",
    "which sport are they playing ?",
    "how many animals are there ?",
    "where was this picture taken ?",
    "what kind of food is on the plate ?",
    "is it raining ?",
    "who makes this vehicle ?",
    "what color is the bus ?",
]
ANSWERS = ["frisbee", "tennis", "two", "beach", "pizza", "no", "toyota", "red"]


def model_config(tiny: bool):
    from transformers import Qwen2_5_VLConfig

    cfg = dict(QWEN25_VL_3B_CONFIG)
    if tiny:  # same architecture, toy sizes (mrope_section sums to head_dim / 2 = 8)
        cfg.update(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )
        cfg["vision_config"] = {
            **cfg["vision_config"],
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        }
    return Qwen2_5_VLConfig(**cfg)


def build_processor(image_size: int):
    """Word-level tokenizer over the real vocabulary size (specials at their real ids) + Qwen2.5-VL's
    image processor settings, served by icdrl's torchvision-free processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from icdrl.lvlm import qwen

    vocab_size = QWEN25_VL_3B_CONFIG["vocab_size"]
    taken = set(SPECIAL_IDS.values())
    vocab = dict(SPECIAL_IDS)
    free = (i for i in range(vocab_size) if i not in taken)
    for w in ["[UNK]", "\n", "system", "user", "assistant", *dict.fromkeys(WORDS)]:
        vocab[w] = next(free)
    for i in free:
        vocab[f"<w{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t]+"), "removed"),
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(qwen.QWEN_SPECIAL_TOKENS[1:]),
    )
    hf.chat_template = qwen.QWEN_CHAT_TEMPLATE
    ip = qwen.build_image_processor(
        patch_size=14, merge_size=2, image_size=image_size, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return qwen.Qwen2_5_VLImageProcessor(
        image_processor=ip, tokenizer=hf, chat_template=qwen.QWEN_CHAT_TEMPLATE
    )


def make_examples(folder: Path, n: int, size: int, seed: int):
    """``n`` examples with random-noise ``size`` x ``size`` images (seeded)."""
    from PIL import Image

    from icdrl.data import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = folder / f"{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        j = int(rng.integers(len(QUESTIONS)))
        out.append(Example(i, str(p), QUESTIONS[j], (ANSWERS[j],), ANSWERS[j], image_id=str(i)))
    return out


class FlopCounter:
    """FLOPs of every linear layer (2 x rows x in x out), convolution and sdpa call
    (4 x batch x heads x queries x keys x head_dim) executed while it is installed."""

    def __init__(self, model):
        self.flops = 0.0
        self.handles = []
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                self.handles.append(m.register_forward_hook(self._linear))
            elif isinstance(m, torch.nn.Conv3d):
                self.handles.append(m.register_forward_hook(self._conv))
        self._sdpa = torch.nn.functional.scaled_dot_product_attention

        def counted(q, k, v, *args, **kwargs):
            self.flops += 4.0 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
            return self._sdpa(q, k, v, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counted

    def _linear(self, m, args, out):
        self.flops += 2.0 * (args[0].numel() // m.in_features) * m.in_features * m.out_features

    def _conv(self, m, args, out):
        self.flops += 2.0 * out.numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))

    def close(self):
        for h in self.handles:
            h.remove()
        torch.nn.functional.scaled_dot_product_attention = self._sdpa


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--tiny", action="store_true", help="toy sizes of the same architecture (CPU smoke run)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--prompts", type=int, default=64, help="scoring prompts (4 demonstrations + query)"
    )
    ap.add_argument("--queries", type=int, default=16, help="evaluation queries (shots 1-4 each)")
    ap.add_argument(
        "--check", type=int, default=8, help="prompts also run through the reference path"
    )
    ap.add_argument(
        "--pool", type=int, default=24, help="distinct demonstrations the prompts draw from"
    )
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()

    from transformers import Qwen2_5_VLForConditionalGeneration

    from icdrl.lvlm.hf import HFBackend, compare_greedy

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing measured")
        return 2
    size = 56 if args.tiny else 448
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((p for k, p in PEAK_TFLOPS if k in name), None)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            model_config(args.tiny), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval()
    sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"device: {name}; model: {'toy-size ' if args.tiny else ''}Qwen2.5-VL-3B-Instruct architecture, "
        f"random init, {n_params / 1e9:.2f} B parameters, bf16, sdpa; built in {time.perf_counter() - t0:.1f} s"
    )
    proc = build_processor(size)
    fast = HFBackend(model, proc, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    ref = HFBackend(
        model,
        proc,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        image_cache="none",
    )

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        demos = make_examples(Path(tmp), args.pool, size, 1)
        queries = make_examples(Path(tmp), args.prompts + args.queries + args.check + 8, size, 2)
        q = iter(queries)
        scoring = [(rng.sample(demos, 4), next(q)) for _ in range(args.prompts)]
        evaluation = []
        for _ in range(args.queries):
            order, query = rng.sample(demos, 4), next(q)
            evaluation += [(order[:k], query) for k in (1, 2, 3, 4)]
        check = [(rng.sample(demos, 4), next(q)) for _ in range(args.check)]
        warm = [(rng.sample(demos, 4), next(q)) for _ in range(8)]
        # warm-up (kernels, allocator, the backend's once-per-backend checks) on other prompts
        fast.answer_logprobs(warm[:4], [e.answer for _, e in warm[:4]])
        fast.generate_ids(warm[4:], args.max_new_tokens)
        rows = []
        for label, run, prompts in (
            (
                "answer_logprobs",
                lambda p: fast.answer_logprobs(p, [e.answer for _, e in p]),
                scoring,
            ),
            ("generate", lambda p: fast.generate_ids(p, args.max_new_tokens), evaluation),
        ):
            counter = FlopCounter(model)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            out = run(prompts)
            sync(device)
            dt = time.perf_counter() - t
            counter.close()
            tokens = sum(
                len(it.ids) for it in fast._items(prompts, [None] * len(prompts))
            )  # after: no encoding timed
            new = sum(len(x) for x in out) if label == "generate" else 0
            mem = (
                torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else float("nan")
            )
            mfu = counter.flops / dt / (peak * 1e12) if peak else float("nan")
            rows.append((label, len(prompts), dt))
            print(
                f"{label}: {len(prompts)} prompts in {dt:.2f} s: {len(prompts) / dt:.1f} prompts/s, "
                f"{tokens / dt:,.0f} prompt tokens/s"
                + (f", {new / dt:,.0f} generated tokens/s" if new else "")
                + f"; {counter.flops / 1e12:.3g} TFLOP executed, {counter.flops / dt / 1e12:.3g} TFLOP/s"
                + (
                    f", MFU {100 * mfu:.1f}% of {peak:.0f} TFLOP/s"
                    if peak
                    else ", MFU: device peak unknown (--peak-tflops)"
                )
                + f"; peak GPU memory {mem:.1f} GiB"
            )
        stats = fast.stats
        print(
            f"fast path counters: {stats['prefix_hits']} prompts on a cached prefix, {stats['vision_encoded']} images "
            f"vision-encoded once, {stats['decode_steps']} decoding steps, "
            f"{stats['generate_near_ties']} near-ties in the generation checks"
        )

        ok = True
        got = [s.mean_logprob for s in fast.answer_logprobs(check, [e.answer for _, e in check])]
        want = [s.mean_logprob for s in ref.answer_logprobs(check, [e.answer for _, e in check])]
        dev = max(abs(a - b) for a, b in zip(got, want))
        ok &= dev <= 0.06
        print(
            f"scores vs reference path ({len(check)} prompts): max |mean log-prob difference| {dev:.4f} "
            f"({'within' if dev <= 0.06 else 'BEYOND'} bf16 tolerance 0.06)"
        )
        toks = fast.generate_ids(check, args.max_new_tokens)
        plain, tied = ref._plain_tokens(
            ref._items(check, [None] * len(check)), args.max_new_tokens, gaps=True
        )
        mismatches, ties = compare_greedy(toks, plain, tied)
        ok &= not mismatches
        print(
            f"answers vs reference path ({len(check)} prompts): {len(check) - len(mismatches) - len(ties)} identical "
            f"token for token, {len(ties)} near-ties, {len(mismatches)} mismatches"
        )
    paths = fast.fast_paths()
    off = [k for k, on in paths.items() if not on]
    print("fast paths: " + ", ".join(f"{k} {'on' if on else 'OFF'}" for k, on in paths.items()))
    print("every fast path stayed on" if not off else f"fast paths switched off: {', '.join(off)}")
    ok &= not off
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
