"""benchmarks/gpu_check.py at toy size on the CPU: the script runs end to end, in bfloat16 every
fast path stays on, and scores and answers agree with the reference path within bf16 tolerance
(the same script measures Qwen2.5-VL-3B-Instruct's size on a GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_toy_size_on_cpu_keeps_every_fast_path_on():
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--tiny",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--prompts",
            "4",
            "--queries",
            "2",
            "--check",
            "3",
            "--pool",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "random init" in text and "bf16, sdpa" in text
    assert "every fast path stayed on" in text and "OFF" not in text
    assert "answer_logprobs: 4 prompts" in text and "generate: 8 prompts" in text
    assert "0 mismatches" in text and "within bf16 tolerance" in text
    counters = next(line for line in text.splitlines() if line.startswith("fast path counters"))
    assert not counters.startswith(
        "fast path counters: 0 prompts"
    )  # prompts ran on cached prefixes


def test_gpu_check_config_is_qwen25_vl_3b():
    """The written configuration builds the 3B architecture (counted on the meta device)."""
    import importlib.util

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.model_config(tiny=False)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 3.7e9 < n < 3.8e9  # Qwen2.5-VL-3B-Instruct: 3.75 B parameters (tied embeddings)
    text = cfg.get_text_config()
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_key_value_heads,
        text.vocab_size,
    ) == (2048, 36, 2, 151936)
    assert (
        text.rope_parameters["mrope_section"] == [16, 24, 24]
        and text.rope_parameters["rope_theta"] == 1e6
    )
    assert cfg.vision_config.depth == 32 and cfg.vision_config.fullatt_block_indexes == [
        7,
        15,
        23,
        31,
    ]
    assert cfg.image_token_id == 151655
    proc = mod.build_processor(448)
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert len(proc.tokenizer) == text.vocab_size
