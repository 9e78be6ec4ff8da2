"""LVLM backends (docs/science.md §3): ``load_backend(model_cfg, model_path)`` and the config checks.

Importing this package is cheap; transformers is imported when a backend is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

from icdrl.lvlm.base import AnswerScore, Generation, LVLMBackend, Prompt, answer_prob

__all__ = [
    "AnswerScore",
    "Generation",
    "LVLMBackend",
    "MODEL_DEFAULTS",
    "Prompt",
    "answer_prob",
    "check_model_cfg",
    "check_system_prompt",
    "load_backend",
]

#: The ``model`` config section's keys and defaults (docs/ARCHITECTURE.md).
MODEL_DEFAULTS: dict = {
    "name": "embedded",
    "kind": "embedded",  # embedded | hf: both are HF checkpoint folders served by HFBackend
    "path": None,
    "device": "cpu",  # cpu | cuda | cuda:N | auto
    "dtype": "float32",  # float32 | bfloat16 | float16
    "batch_size": 32,
    "max_new_tokens": 10,
    "system_prompt": None,
    "padding_side": "left",  # left | right (scoring; generation always pads left)
    "image_cache": "features",  # features | pixels | none
    "image_cache_size": 1024,  # distinct images kept per backend (LRU); 0 = unbounded
    "prefix_cache_size": 128,  # prompt prefixes (chat header, + demonstrations) whose keys/values are reused (LRU; 0 = off)
    "attn_implementation": None,  # e.g. sdpa / eager; null = transformers' default
}
KINDS = ("embedded", "hf")

_NUMBER = r"\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|single|a pair of"
_FIXED_COUNT = re.compile(
    rf"\b(?:{_NUMBER})(?:[\s-]+[\w-]+){{0,3}}?[\s-]+(?:examples?|demonstrations?|demos?|shots?|icds?|"
    rf"samples?|exemplars?)\b|\b\d+[\s-]*shot\b|\b(?:one|two|three|four|five)-shot\b",
    re.IGNORECASE,
)


class ModelConfigError(ValueError):
    """A bad ``model`` config entry; the message names the key."""


def check_system_prompt(system_prompt: str | None) -> None:
    """Reject a system prompt that states a number of examples (docs/science.md §3; e.g. "four examples")."""
    if system_prompt is None:
        return
    if not isinstance(system_prompt, str):
        raise ModelConfigError(
            f"model.system_prompt: must be a string or null, got {type(system_prompt).__name__}"
        )
    m = _FIXED_COUNT.search(system_prompt)
    if m:
        raise ModelConfigError(
            f"model.system_prompt: must not state a fixed number of examples (found {m.group(0)!r}); "
            "the number of demonstrations varies"
        )


def check_model_cfg(model_cfg: dict) -> dict:
    """Validate the ``model`` section; return it merged over :data:`MODEL_DEFAULTS`."""
    unknown = sorted(set(model_cfg) - set(MODEL_DEFAULTS))
    if unknown:
        raise ModelConfigError(
            f"model.{unknown[0]}: unknown key (known: {', '.join(MODEL_DEFAULTS)})"
        )
    cfg = {**MODEL_DEFAULTS, **model_cfg}
    if cfg["kind"] not in KINDS:
        raise ModelConfigError(f"model.kind: {cfg['kind']!r} is not one of {', '.join(KINDS)}")
    if cfg["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ModelConfigError(
            f"model.dtype: {cfg['dtype']!r} is not one of float32, bfloat16, float16"
        )
    if not isinstance(cfg["device"], str) or not re.fullmatch(
        r"cpu|cuda(:\d+)?|auto", cfg["device"]
    ):
        raise ModelConfigError(
            f"model.device: {cfg['device']!r} is not one of cpu, cuda, cuda:N, auto"
        )
    for key, low in (
        ("batch_size", 1),
        ("max_new_tokens", 1),
        ("image_cache_size", 0),
        ("prefix_cache_size", 0),
    ):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            kind = "a positive" if low else "a non-negative"
            raise ModelConfigError(f"model.{key}: must be {kind} integer, got {v!r}")
    if cfg["padding_side"] not in ("left", "right"):
        raise ModelConfigError(
            f"model.padding_side: {cfg['padding_side']!r} is not one of left, right"
        )
    if cfg["image_cache"] not in ("features", "pixels", "none"):
        raise ModelConfigError(
            f"model.image_cache: {cfg['image_cache']!r} is not one of features, pixels, none"
        )
    check_system_prompt(cfg["system_prompt"])
    return cfg


def load_backend(model_cfg: dict, model_path: str | None = None) -> LVLMBackend:
    """An :class:`~icdrl.lvlm.hf.HFBackend` on the checkpoint folder ``model_path``.

    ``model_path`` defaults to ``model_cfg["path"]``. Both kinds (``embedded``, the project's
    own tiny Qwen2.5-VL, and ``hf``, e.g. Qwen2.5-VL-3B-Instruct) are local transformers
    checkpoint folders; nothing is fetched from a hub.
    """
    cfg = check_model_cfg(model_cfg)
    path = model_path if model_path is not None else cfg["path"]
    if path is None:
        raise ModelConfigError("model.path: not set; a local checkpoint folder is required")
    p = Path(path)
    if not p.is_dir():
        raise ModelConfigError(f"model.path: model folder not found: {p}")
    if not (p / "config.json").is_file():
        raise ModelConfigError(
            f"model.path: {p} has no config.json (not a transformers checkpoint folder)"
        )
    from icdrl.lvlm.hf import HFBackend

    return HFBackend.from_pretrained(
        p,
        device=cfg["device"],
        dtype=cfg["dtype"],
        attn_implementation=cfg["attn_implementation"],
        batch_size=cfg["batch_size"],
        max_new_tokens=cfg["max_new_tokens"],
        system_prompt=cfg["system_prompt"],
        padding_side=cfg["padding_side"],
        image_cache=cfg["image_cache"],
        image_cache_size=cfg["image_cache_size"],
        prefix_cache_size=cfg["prefix_cache_size"],
    )
