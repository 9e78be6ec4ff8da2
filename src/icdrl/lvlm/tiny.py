"""Tiny, randomly initialised checkpoints of real image-text-to-text architectures, built offline.

For tests and benchmarks: each builder writes a folder that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load exactly as they would load a downloaded checkpoint
(config, safetensors weights, tokenizer built with the ``tokenizers`` library and carrying the
chat template's special tokens, image processor, chat template). No network, no torchvision.

* :func:`save_tiny_qwen` — Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``), served with
  :class:`icdrl.lvlm.qwen.Qwen2_5_VLImageProcessor`; 16 image tokens per 64×64 image.
* :func:`save_tiny_llava` — LLaVA (CLIP vision tower + Llama text model) with the PIL CLIP
  image processor and an interleaved-image chat template; 16 image tokens per image.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from icdrl.data import EASYVQA_COLORS, EASYVQA_SHAPES

#: Words every tiny tokenizer knows: the docs/science.md §3 prompt, easy-VQA's vocabulary, digits.
DEFAULT_WORDS: tuple[str, ...] = (
    *"question short answer : ? . , ' -".split(),
    *"what is the color of shape does image contain a an there not no in present yes".split(),
    *EASYVQA_COLORS,
    *EASYVQA_SHAPES,
    *"0 1 2 3 4 5 6 7 8 9 dog cat two fire hydrant".split(),
)


def _words(words: Iterable[str] | None) -> list[str]:
    out = list(DEFAULT_WORDS)
    for w in words or ():
        if w not in out:
            out.append(w)
    return out


def save_tiny_qwen(
    out_dir: str | Path, words: Iterable[str] | None = None, *, seed: int = 0, **config
) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint folder; ``config`` goes to ``tiny_qwen_config``."""
    import torch
    from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from icdrl.lvlm import qwen

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = qwen.build_word_tokenizer(_words(words))
    patch = config.get("patch_size", 8)
    merge = config.get("merge_size", 2)
    proc = qwen.Qwen2_5_VLImageProcessor(
        image_processor=qwen.build_image_processor(patch_size=patch, merge_size=merge),
        tokenizer=tok,
        chat_template=qwen.QWEN_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwen.tiny_qwen_config(tok, **config))
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


#: LLaVA-style chat template that keeps images where they occur in the content (the stock
#: llava-1.5 template moves every image to the front of the turn, which breaks ICL prompts).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}\n"
    "{% else %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def build_llava_tokenizer(words: Iterable[str]):
    """Word-level tokenizer with LLaVA's special tokens (``<s>``, ``</s>``, ``<pad>``, ``<image>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<image>", "[UNK]"]
    vocab: dict[str, int] = {}
    for w in [
        *specials,
        "\n",
        "user",
        "assistant",
        "system",
        "USER",
        "ASSISTANT",
        "SYSTEM",
        *words,
    ]:
        if w and w not in vocab:
            vocab[w] = len(vocab)
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
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    hf.chat_template = LLAVA_CHAT_TEMPLATE
    return hf


def save_tiny_llava(
    out_dir: str | Path,
    words: Iterable[str] | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
) -> Path:
    """Write a tiny random LLaVA checkpoint folder (CLIP vision + Llama text, PIL image processor)."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_llava_tokenizer(_words(words))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    proc = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<image>")}
    cfg = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            pad_token_id=ids["<pad>"],
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
        ),
        image_token_id=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


FAMILIES = {"qwen": save_tiny_qwen, "llava": save_tiny_llava}
_BUILT: dict[str, Path] = {}


def cached_checkpoint(family: str) -> Path:
    """A tiny checkpoint folder of ``family`` (qwen, llava), built once per process in a temp dir.

    For test fixtures shared across files: the default words and seed 0; removed at exit.
    """
    import atexit
    import shutil
    import tempfile

    if family not in FAMILIES:
        raise ValueError(f"tiny checkpoint family {family!r} is not one of {', '.join(FAMILIES)}")
    if family not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix=f"icdrl-tiny-{family}-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _BUILT[family] = FAMILIES[family](root / family)
    return _BUILT[family]


#: The chat template Qwen2.5-VL-Instruct checkpoints ship (default system prompt, optional
#: "Picture N:" labels, image and video slots), for tests of the hub folder layout.
QWEN_HUB_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def to_hub_layout_qwen(folder: str | Path) -> Path:
    """Rewrite a :func:`save_tiny_qwen` folder's processor files the way hub Qwen2.5-VL checkpoints
    ship them: ``preprocessor_config.json`` (``min_pixels``/``max_pixels``, ``image_processor_type``
    ``Qwen2VLImageProcessor``, ``processor_class`` ``Qwen2_5_VLProcessor``), the same
    ``processor_class`` in ``tokenizer_config.json``, and ``chat_template.json`` holding
    :data:`QWEN_HUB_CHAT_TEMPLATE`. ``AutoProcessor`` cannot load such a folder without
    torchvision; :func:`icdrl.lvlm.hf.load_processor` can.
    """
    import json

    d = Path(folder)
    proc = json.loads((d / "processor_config.json").read_text())
    ip = proc["image_processor"]
    pixels = ip["size"]["shortest_edge"]
    pre = {
        "min_pixels": pixels,
        "max_pixels": pixels,
        "patch_size": ip["patch_size"],
        "temporal_patch_size": ip["temporal_patch_size"],
        "merge_size": ip["merge_size"],
        "image_mean": ip["image_mean"],
        "image_std": ip["image_std"],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (d / "processor_config.json").unlink()
    (d / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["processor_class"] = "Qwen2_5_VLProcessor"
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_HUB_CHAT_TEMPLATE}))
    return d
