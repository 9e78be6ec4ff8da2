"""Qwen2.5-VL processor that works without torchvision, registered with ``AutoProcessor``.

The stock ``Qwen2_5_VLProcessor`` needs a video processor, and the video processor needs
torchvision, which these machines must not install (its only torch-2.13 wheel is a CUDA build
that breaks importing Qwen2.5-VL). ICD selection uses images only, so this subclass drops the
video processor and pairs the tokenizer with the PIL image processor. ``register()`` makes
``AutoProcessor.from_pretrained`` return it for Qwen2.5-VL folders that name no processor
class or name this one (those written by ``save_pretrained`` here); without the registration
``AutoProcessor`` silently returns only the tokenizer. Hub checkpoints (the real 3B one) name
``processor_class: Qwen2_5_VLProcessor``, which ``AutoProcessor`` honours over any
registration and then fails for want of torchvision: load those with
``icdrl.lvlm.hf.load_processor(path)`` (used by the backend), i.e.
``Qwen2_5_VLImageProcessor.from_pretrained(path)``.
"""

from __future__ import annotations

from transformers import AutoProcessor
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VIDEO_TOKEN = "<|video_pad|>"

#: Special tokens a Qwen2.5-VL tokenizer must carry for the chat template and image slots.
QWEN_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)

#: Qwen2-VL's chat template, reduced to what icdrl uses (text and images; no videos, no tools).
#: Real checkpoints ship their own template, which the backend uses as is.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{% if default_system %}<|im_start|>system\n{{ default_system }}<|im_end|>\n{% endif %}"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with images and text only (no video processor, no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = getattr(
            tokenizer, "image_token_id", None
        ) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(
            tokenizer, "video_token_id", None
        ) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(
            self, image_processor, tokenizer, chat_template=chat_template, **kwargs
        )


def register() -> None:
    """Make ``AutoProcessor`` build :class:`Qwen2_5_VLImageProcessor` for Qwen2.5-VL folders."""
    AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageProcessor, exist_ok=True)


register()


# ---------------------------------------------------------------------------------------------
# Offline builders for small Qwen2.5-VL checkpoints (tests and the embedded LVLM)
# ---------------------------------------------------------------------------------------------


def build_word_tokenizer(words, *, chat_template: str = QWEN_CHAT_TEMPLATE):
    """A word-level tokenizer (built with ``tokenizers``) that carries Qwen's special tokens.

    Text is split at newlines, punctuation and whitespace; unknown words map to ``[UNK]``.
    ``words`` are added after the special tokens in the given order (duplicates dropped).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [*QWEN_SPECIAL_TOKENS, "[UNK]", "\n", "system", "user", "assistant"]
    vocab: dict[str, int] = {}
    for w in [*base, *words]:
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
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    hf.chat_template = chat_template
    return hf


def build_image_processor(
    *, patch_size: int = 8, merge_size: int = 2, image_size: int = 64, **kwargs
):
    """PIL image processor giving ``(image_size/patch_size/merge_size)**2`` tokens per square image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        min_pixels=pixels,
        max_pixels=pixels,
        **kwargs,
    )


def tiny_qwen_config(
    tokenizer,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    patch_size: int = 8,
    merge_size: int = 2,
    dropout: float = 0.0,
):
    """A ``Qwen2_5_VLConfig`` of the real architecture at toy size.

    Constraints of the architecture: ``mrope_section`` sums to head_dim/2, the vision tower's
    ``out_hidden_size`` equals the text hidden size, ``fullatt_block_indexes`` fit the depth.
    """
    head_dim = hidden_size // heads
    half = head_dim // 2
    t = half // 4
    mrope = [half - 2 * ((half - t) // 2), (half - t) // 2, (half - t) // 2]
    assert sum(mrope) == half, mrope
    ids = {t_: tokenizer.convert_tokens_to_ids(t_) for t_ in QWEN_SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            tie_word_embeddings=True,
            attention_dropout=dropout,
            bos_token_id=None,
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=vision_heads,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
            window_size=patch_size * merge_size * 2,
            in_channels=3,
        ),
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=True,
    )
