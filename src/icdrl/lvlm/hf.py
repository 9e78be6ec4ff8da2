"""The transformers LVLM backend (docs/science.md §3): ``AutoModelForImageTextToText`` + ``AutoProcessor``.

One backend answers the two questions of docs/science.md §3 for any image-text-to-text checkpoint folder
whose processor has a chat template and an image placeholder token (Qwen2.5-VL, LLaVA, ...):

* :meth:`HFBackend.answer_logprobs` — summed log-probabilities of the answer tokens and their
  count. The answer span is located in the *chat-formatted token ids*: the conversation with
  the answer as the assistant turn is tokenised next to the conversation ending in the
  generation prompt, and the answer is the tokens between the two (docs/defects.md defect 1 is a
  plain-text length; this never looks at one). The answer ends before the end-of-turn tokens.
* :meth:`HFBackend.generate` — greedy decoding of ``max_new_tokens`` new tokens from the
  generation prompt, decoded without special tokens and post-processed (docs/science.md §3);
  :meth:`HFBackend.generate_ids` gives the new token ids.

This module is the backend; the prefix key/value cache is :mod:`icdrl.lvlm.prefix_cache` (no
model needed), the transformers internals the fast paths patch are :mod:`icdrl.lvlm.hf_patches`.

Speed. Prompts are sorted by length and run ``batch_size`` at a time (generation on cached
prefixes packs more rows when their remainders are short, see below). Every distinct image path
is preprocessed once per backend instance (``image_cache``):

* ``"features"`` (default where the model accepts ``mm_encoder_outputs``): the processor runs
  once per image *and* the vision encoder runs once per image; batches carry the cached
  features, so a demonstration that recurs in many candidate sequences costs its vision
  encoding once.
* ``"pixels"``: the processor runs once per image; the vision encoder runs on every batch.
* ``"none"``: the reference path, plain transformers usage as the reference implementation's code did it: the chat
  template is rendered by ``apply_chat_template`` and the processor called normally for every
  prompt (text and images), the answer span is taken from the tokenizer's character offsets,
  and the whole sequence runs through the whole model. None of the savings below apply to it;
  tests check that it gives the same ids, spans and numbers as the cached paths.

In the cached paths the chat text is split at the processor's image placeholder, each text
piece is tokenised on its own (and cached), and the placeholder is replaced by the ids the
processor produced for that image; the placeholder is a special token, so this equals
tokenising the expanded text in one go (checked once per backend, and by the tests).

More savings on the cached paths, each checked against the slow way before it is trusted:

* the chat template is rendered once per prompt shape (number of demonstrations, answer turn or
  not) with sentinels for the text items, which are then put back (compared with
  ``apply_chat_template`` on the first renders of every shape);
* for 3-D rope models (Qwen2-VL family) the position ids are composed from per-image blocks the
  model itself computed, instead of transformers' per-row loop (compared with
  ``get_rope_index`` on the first batch);
* ``prefix_cache_size`` keeps the keys and values of prompt prefixes (the chat header alone, or with
  the first j demonstrations, keyed by token ids *and* image paths). A later prompt that starts
  with a cached prefix runs only its remaining tokens (any prompt after the first at least skips
  the chat header). Beam search gets this for free: with
  ``insert="first"`` every step-2 prompt ``(c, b)`` starts with the step-1 prompt ``(c)``'s
  prefix, with ``insert="last"`` every ``(b, c)`` with ``(b)``'s;
* scoring feeds no answer token that predicts nothing scored (the last one), and runs the last
  decoder layer's attention queries, attention output projection and MLP only at the
  answer-predicting columns (exact: nothing after that layer reads the other columns, whose
  keys and values still come from every column; compared with the reference path by the
  tests);
* a new image goes through the image processor alone once an image of the same layout (tensor
  shapes, patch grid) went through the whole processor, whose placeholder expansion for that
  layout is then reused (the first image of each layout checks the image processor's tensors
  against the processor's);
* a new 8-bit RGB image that needs no resizing is turned into the Qwen2-VL image processor's
  tensors by a lookup table of that processor's own rescale and normalisation of each value,
  and one reshape (:class:`~icdrl.lvlm.pixels.LookupPixels`; compared exactly with the image
  processor once per image size, on an image holding every value of every channel);
* the vision patch embedding's ``Conv3d``, whose kernel equals its stride, runs as the matrix
  product it amounts to (same products, summed in another order);
* the Qwen2.5-VL vision encoder's attention (sdpa or eager) runs once per layer and segment
  length, all images (or windows) of that length in one batch, instead of once per image or
  window as transformers loops (same features; compared with that loop by the tests), and
  its grid-only inputs (rope positions, window order) are computed once per list of grids;
* generation decodes greedily on the same prefix cache (:meth:`HFBackend._generate_cached`):
  the longest prompts of a call run first and store the prefixes of the shorter ones nested in
  them (a 4-shot selection holds the 1-3-shot ones), a prompt whose prefix another prompt of
  the call stores waits for it, the first step runs each row's ids after its cached prefix
  (the last decoder layer at the last column only), and later steps feed one token per row
  against a key/value cache with room to grow in place, a row leaving the batch at its end
  token. Those later steps of several batches (up to twice ``_ROWS_PER_BATCH`` times
  ``batch_size`` rows, of one wave and the next) run together, their caches right-aligned: a
  step costs about the same for a few batches as for one. It equals plain ``model.generate``
  token for token except at near-ties (:func:`near_tie_tolerance`): checked on the first batch without and the first with cached
  prefixes, a real difference switching it off for the backend.

The once-per-backend checks sit together in the class (``_check_*``); :meth:`HFBackend.fast_paths`
says which savings are on.

Cached features and prefixes belong to the weights they were computed with: call
:meth:`clear_cache` after changing the model's weights.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from icdrl.data import load_image
from icdrl.lvlm import hf_patches as patches
from icdrl.lvlm import qwen as _qwen  # noqa: F401  (registers the torchvision-free Qwen processor)
from icdrl.lvlm.base import AnswerScore, Generation, Prompt
from icdrl.lvlm.pixels import LookupPixels
from icdrl.lvlm.prefix_cache import PrefixCache, PrefixKV, next_wave
from icdrl.lvlm.prompt import build_messages, postprocess

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_MODES = ("features", "pixels", "none")
PADDING_SIDES = ("left", "right")
#: Processor outputs that belong to the text, not to an image.
TEXT_KEYS = frozenset(
    {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "offset_mapping"}
)

# the attention implementations and their state live in icdrl.lvlm.hf_patches; these names stay
# importable from here (tests and older callers read them)
_SCORED_COLUMNS, _SEGMENTS = patches.SCORED_COLUMNS, patches.SEGMENTS
_scored, _segments = patches.SCORED_STATE, patches.SEGMENT_STATE
_scored_columns_attention, _segments_attention = (
    patches.scored_columns_attention,
    patches.segments_attention,
)


class BackendError(ValueError):
    """A prompt or answer the backend cannot encode faithfully (one-line message)."""


@dataclass(frozen=True)
class Encoded:
    """A chat-formatted prompt as token ids.

    With an answer, ``input_ids`` is the whole conversation (answer turn and its end-of-turn
    tokens included) and ``input_ids[answer_start:answer_end]`` are the answer's tokens.
    Without one, ``input_ids`` ends with the generation prompt and
    ``answer_start == answer_end == len(input_ids)``.
    """

    input_ids: tuple[int, ...]
    images: tuple[str, ...]
    answer_start: int
    answer_end: int


@dataclass
class _ImageEntry:
    ids: tuple[int, ...]  # the placeholder's expansion for this image
    tensors: dict  # per-image processor outputs; pixel tensors dropped once features exist
    features: torch.Tensor | None = None  # vision encoder output (features mode)
    text: str = ""  # the placeholder's expansion as text
    rel_pos: np.ndarray | None = None  # 3-D rope positions of ``ids`` from 0 (mrope models)
    types: np.ndarray | None = None  # the processor's mm_token_type_ids of ``ids`` (zeros if none)
    advance: int = 0  # how far the text position moves past this image (mrope models)


@dataclass
class _Item:
    ids: list[int]
    images: tuple[str, ...]
    start: int  # first answer token (scoring) / len(ids) (generation)
    end: int
    vision: list[dict]  # reference path only: the processor's image tensors for this item
    segments: tuple = ()  # cached paths: (number of text ids | image entry) in order, then the tail length


@dataclass
class _Decoding:
    """Rows of cached greedy decoding after their first step (:meth:`HFBackend._first_step`)."""

    cache: object  # roomy key/value cache (hf_patches.roomy_cache), one row per row here
    mask: torch.Tensor  # [rows, columns]: the cache's attention mask
    nxt: torch.Tensor  # [rows]: the position of each row's next token
    tok: torch.Tensor  # [rows]: each row's first new token (not yet fed)
    mrope: bool  # positions are 3-D (the same one on each axis for text)
    slots: list[int]  # where each row's answer goes

    @classmethod
    def of_block(cls, states: Sequence[_Decoding], block: patches.KVBlock) -> _Decoding:
        """One state holding the rows of ``states``, whose caches are the rows of ``block`` in
        order (each right after its first step): the block's cache, the masks left-padded to
        its width (the columns left of a batch's own are zeros)."""
        mask = torch.cat(
            [torch.nn.functional.pad(d.mask, (block.width - d.mask.shape[1], 0)) for d in states]
        )
        if mask.shape[0] != block.used:
            raise BackendError(f"decoding {mask.shape[0]} rows on a block of {block.used}")
        return cls(
            cache=block.cache(),
            mask=mask,
            nxt=torch.cat([d.nxt for d in states]),
            tok=torch.cat([d.tok for d in states]),
            mrope=states[0].mrope,
            slots=[i for d in states for i in d.slots],
        )


@dataclass
class _Held:
    """Batches after their first step, to be decoded together: their states and the
    :class:`~icdrl.lvlm.hf_patches.KVBlock` their keys and values were written into."""

    block: patches.KVBlock | None = None
    states: list[_Decoding] = field(default_factory=list)


def _cache_columns(items: Sequence[_Item], cut: Sequence[int]) -> int:
    """The columns of a cached forward's key/value cache (:meth:`HFBackend._collate`): the rows'
    prefixes of ``cut`` ids left-padded to the longest, then their remaining ids right-padded."""
    return max(cut) + max(len(it.ids) - c for it, c in zip(items, cut))


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"model.device: {device!r} requested but no CUDA device is available")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise BackendError(f"model.device: {device!r} is not one of cpu, cuda, cuda:N, auto")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise BackendError(f"model.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


#: model types whose stock processor needs torchvision (its video processor); icdrl serves them
#: with :class:`icdrl.lvlm.qwen.Qwen2_5_VLImageProcessor` (images and text only).
_QWEN_VL_TYPES = frozenset({"qwen2_5_vl", "qwen2_vl"})


def load_processor(path: str | Path):
    """The processor of a local checkpoint folder, without torchvision.

    Hub checkpoints of Qwen2.5-VL name ``processor_class: Qwen2_5_VLProcessor`` in their
    preprocessor/tokenizer configs, which makes ``AutoProcessor`` build the stock processor
    (and its torchvision video processor) whatever is registered; those folders are loaded
    with the images-only subclass directly. Everything else goes through ``AutoProcessor``.
    """
    import json

    from transformers import AutoProcessor

    from icdrl.lvlm.qwen import Qwen2_5_VLImageProcessor

    cfg_path = Path(path) / "config.json"
    model_type = json.loads(cfg_path.read_text()).get("model_type") if cfg_path.is_file() else None
    if model_type in _QWEN_VL_TYPES:
        return Qwen2_5_VLImageProcessor.from_pretrained(str(path), local_files_only=True)
    return AutoProcessor.from_pretrained(str(path), local_files_only=True)


def _layout_key(tensors: dict) -> tuple:
    """What an image's placeholder expansion can depend on: its tensors' shapes, and the values
    of its integer tensors (Qwen2-VL's ``image_grid_thw``, LLaVA-NeXT's ``image_sizes``)."""
    return tuple(
        (k, tuple(v.shape), None if v.is_floating_point() else tuple(v.flatten().tolist()))
        for k, v in sorted(tensors.items())
    )


def _same_tensors(a: dict, b: dict) -> bool:
    """Same keys, shapes and values (to 1e-6) in two per-image tensor dicts."""
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), atol=1e-6)
        for k in a
    )


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and list(long[: len(short)]) == list(short)


#: a greedy step whose two best logits (of the reference) are at most
#: ``max(absolute, relative * |best logit|)`` apart is a near-tie: float rounding may pick either
#: token, so a path that does the same sums in another order may pick the other. float32:
#: 1e-5, or 1e-6 of the logit (about 8 float32 rounding steps); bfloat16 / float16: their own
#: rounding step at the logit's size (2^-7 / 2^-10 of it), at least that of a logit of 8 (bf16
#: scores of the cached paths agree with the reference within 0.06 in mean log-prob).
NEAR_TIE = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (0.0625, 2.0**-7),
    torch.float16: (0.0078125, 2.0**-10),
}


def near_tie_tolerance(dtype: torch.dtype, best: float) -> float:
    """How close the two best logits of a step may be for it to count as a near-tie."""
    absolute, relative = NEAR_TIE.get(dtype, NEAR_TIE[torch.float32])
    return max(absolute, relative * abs(best))


#: rows of a batch the generation check runs through plain ``model.generate`` as well
_CHECK_ROWS = 8
#: cached greedy decoding packs rows with short remainders up to this many times ``batch_size``
_ROWS_PER_BATCH = 4


def _until_end(row: Sequence[int], eos: frozenset[int]) -> tuple[int, ...]:
    """``row`` up to and including its first end token (all of it if none)."""
    for k, t in enumerate(row):
        if t in eos:
            return tuple(row[: k + 1])
    return tuple(row)


def compare_greedy(
    fast: Sequence[Sequence[int]], ref: Sequence[Sequence[int]], tied: Sequence[Sequence[bool]]
) -> tuple[list[int], list[int]]:
    """Rows whose greedy answers differ: ``(mismatches, near_ties)``.

    ``fast[r]``/``ref[r]``: row r's new token ids by two paths (each up to its end token);
    ``tied[r][t]``: whether the reference's two best logits at step t are a near-tie
    (:func:`near_tie_tolerance`). A row whose first differing step is tied is a near-tie (either
    token is the argmax within float rounding; the steps after it cannot be compared), any other
    difference a mismatch.
    """
    mismatches, ties = [], []
    for r, (a, b) in enumerate(zip(fast, ref)):
        if tuple(a) == tuple(b):
            continue
        t = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        (ties if t < len(tied[r]) and tied[r][t] else mismatches).append(r)
    return mismatches, ties


class HFBackend:
    """An :class:`~icdrl.lvlm.base.LVLMBackend` on a transformers image-text-to-text model."""

    def __init__(
        self,
        model,
        processor,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 10,
        system_prompt: str | None = None,
        padding_side: str = "left",
        image_cache: str = "features",
        image_cache_size: int = 1024,
        prefix_cache_size: int = 128,
    ):
        if batch_size < 1:
            raise BackendError(f"model.batch_size: must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise BackendError(f"model.max_new_tokens: must be >= 1, got {max_new_tokens}")
        if padding_side not in PADDING_SIDES:
            raise BackendError(f"model.padding_side: {padding_side!r} is not one of left, right")
        if image_cache not in CACHE_MODES:
            raise BackendError(
                f"model.image_cache: {image_cache!r} is not one of {', '.join(CACHE_MODES)}"
            )
        if image_cache_size < 0:
            raise BackendError(
                f"model.image_cache_size: must be >= 0 (0: unbounded), got {image_cache_size}"
            )
        if prefix_cache_size < 0:
            raise BackendError(
                f"model.prefix_cache_size: must be >= 0 (0: off), got {prefix_cache_size}"
            )
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt or None
        self.padding_side = padding_side
        if image_cache == "features" and not self._supports_features():
            log.warning(
                "%s does not accept mm_encoder_outputs; caching pixels only", type(model).__name__
            )
            image_cache = "pixels"
        self.image_cache = image_cache
        self.image_cache_size = int(image_cache_size)
        #: prompt prefixes whose keys/values are kept (LRU; 0 = off; mrope models, cached paths)
        self.prefix_cache_size = int(prefix_cache_size)
        self.prefixes = PrefixCache(self.prefix_cache_size)
        self.image_token = getattr(processor, "image_token", None)
        if not self.image_token:
            raise BackendError(
                f"{type(processor).__name__} has no image placeholder token (processor.image_token)"
            )
        if getattr(processor, "chat_template", None) is None:
            raise BackendError(
                f"{type(processor).__name__} has no chat template (chat_template.jinja / .json)"
            )
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = (
                self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
            )
        self._lead = self._special_prefix()
        self._cache: OrderedDict[str, _ImageEntry] = OrderedDict()
        self._needs_mm_types = bool(getattr(processor, "return_mm_token_type_ids", False))
        # 3-D rope (Qwen2-VL family): positions are composed per prompt from cached per-image
        # blocks instead of the model's per-row loop; checked against the model on the first batch
        self._rope_index = getattr(getattr(model, "model", None), "get_rope_index", None)
        self._mrope = bool(
            self._needs_mm_types and self._rope_index is not None and image_cache != "none"
        )
        self._positions_checked = False
        self._batch_preprocess = True  # several new images per processor call (checked once)
        self._batch_checked = False
        #: image layout (:func:`_layout_key`) -> the placeholder's expansion (ids, text) there
        self._expansions: dict[tuple, tuple[tuple[int, ...], str]] = {}
        self._image_only = (
            True  # the image processor alone where the expansion is known (checked per layout)
        )
        self._image_processor = getattr(processor, "image_processor", None)
        # cached paths: the image processor's numbers by lookup table (Qwen2-VL family, images
        # that need no resizing; checked against the image processor once per image size)
        self._lookup = (
            LookupPixels.from_processor(self._image_processor) if image_cache != "none" else None
        )
        self._lookup_sizes: set[tuple[int, int]] = set()
        self._layouts: dict[
            tuple, tuple
        ] = {}  # (image ids, grid) -> (types, rel. positions, advance)
        import inspect

        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._n_layers = int(model.config.get_text_config().num_hidden_layers)
        # cached paths: parts of the last layer run at the scored columns only (answer_logprobs)
        self._last = self._last_layer_parts() if image_cache != "none" else None
        # cached paths: the vision encoder's per-image (and per-window) attention in a few batched calls
        self._vision = self._vision_modules() if image_cache != "none" else []
        # cached greedy decoding: the decoder's attention reads shared key/value heads in place
        self._shared_kv = patches.shared_kv_modules(model) if image_cache != "none" else []
        # cached paths: the gated MLPs and the rope write into their own intermediates (checked
        # bit for bit against transformers' forward on a random input when selected)
        self._mlps = patches.gated_mlps(model) if image_cache != "none" else []
        self._ropes = patches.rope_functions(model) if image_cache != "none" else []
        # cached paths: the vision patch embedding's Conv3d as the matrix product it amounts to
        self._embeds = patches.patch_embeddings(model) if image_cache != "none" else []
        self._geometry: dict[
            tuple, dict
        ] = {}  # patch grids of a batch -> _vision_geometry's tensors
        self._segments_checked = False
        self._use_skeletons = image_cache != "none"
        self._skeletons: dict[tuple[int, bool], list[str] | None] = {}
        self._skeleton_checks: dict[tuple[int, bool], int] = {}
        self._tok = functools.lru_cache(maxsize=200_000)(self._tokenize_uncached)
        # cached paths: greedy decoding on the prefix cache (checked against model.generate once
        # without and once with cached prefixes)
        self._fast_generate = image_cache != "none"
        self._generation_checked: set[str] = set()
        #: counters: processor calls on a single image, cache hits, images through the vision
        #: encoder, forward passes over prompts, rows run on a cached prefix, decoding steps of
        #: cached greedy decoding, near-ties its checks met (not mismatches)
        self.stats = {
            "image_preprocess": 0,
            "image_hits": 0,
            "vision_encoded": 0,
            "forward_batches": 0,
            "prefix_hits": 0,
            "decode_steps": 0,
            "generate_near_ties": 0,
        }

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        **kwargs,
    ) -> HFBackend:
        """Load model and processor from a local checkpoint folder (never the hub)."""
        from transformers import AutoModelForImageTextToText

        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        processor = load_processor(path)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=torch_dtype, local_files_only=True, **extra
        )
        backend = cls(model.to(dev), processor, **kwargs)
        log.info(
            "loaded %s from %s on %s (%s), batch %d, image cache %s",
            type(model).__name__,
            path,
            dev,
            dtype,
            backend.batch_size,
            backend.image_cache,
        )
        return backend

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _last_layer_parts(self) -> patches.LastLayer | None:
        """The last decoder layer's parts run at the read columns only (:func:`~icdrl.lvlm.hf_patches.last_layer_parts`)."""
        return patches.last_layer_parts(self.model)

    def _last_layer_at(self, pos: torch.Tensor):
        """Within the block, :meth:`_last_layer_parts` run only at columns ``pos`` [rows, m]."""
        return patches.last_layer_at(self._last, pos)

    @contextmanager
    def _in_place(self):
        """Within the block, the gated MLPs and the rope run in place
        (:func:`~icdrl.lvlm.hf_patches.mlps_in_place`,
        :func:`~icdrl.lvlm.hf_patches.rope_in_halves`): the same numbers with fewer copies."""
        with patches.mlps_in_place(self._mlps), patches.rope_in_halves(self._ropes):
            yield

    def _vision_modules(self) -> list[torch.nn.Module]:
        return patches.vision_modules(self.model)

    @contextmanager
    def _vision_in_segments(self):
        """Within the block, the vision tower's attention runs in batched segments and its
        patch embedding as a matrix product."""
        with (
            patches.vision_in_segments(self._vision),
            patches.patch_embedding_as_matmul(self._embeds),
        ):
            yield

    def _vision_geometry(self, grid: torch.Tensor) -> dict:
        return patches.vision_geometry(self._vision, grid, self._geometry)

    def _supports_features(self) -> bool:
        import inspect

        return hasattr(self.model, "get_image_features") and (
            "mm_encoder_outputs" in inspect.signature(self.model.forward).parameters
        )

    def _special_prefix(self) -> tuple[int, ...]:
        """Ids the tokenizer puts before any text (a BOS), which the processor adds by default."""
        with_sp = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        for i in range(len(with_sp) - len(without) + 1):
            if list(with_sp[i : i + len(without)]) == list(without):
                return tuple(with_sp[:i])
        return ()

    def clear_cache(self) -> None:
        """Forget cached image encodings and prefix keys/values (needed after the model's weights change)."""
        self._cache.clear()
        self.prefixes.clear()

    # ------------------------------------------------------------------ chat text

    def messages(self, prompt: Prompt, answer: str | None = None) -> list[dict]:
        demos, query = prompt
        return build_messages(demos, query, answer=answer, system_prompt=self.system_prompt)

    def render(self, prompt: Prompt, answer: str | None = None) -> str:
        """The chat-formatted text: with ``answer`` the full conversation, else up to the generation prompt.

        The chat template is rendered once per *shape* (number of demonstrations, with or without
        the answer turn) with a sentinel in place of every text item; a prompt's text is that
        skeleton with its own text items put back. The first renders of every shape are also
        done by ``apply_chat_template`` and compared; a template that alters its text items
        (so that the two differ) switches the skeletons off for this backend.
        """
        messages = self.messages(prompt, answer)
        if not self._use_skeletons:
            return self._render_template(messages, answer is None)
        texts = [
            part["text"] for m in messages for part in m["content"] if part.get("type") == "text"
        ]
        key = (
            tuple(bool(ex.image) for ex in prompt[0]),
            answer is None,
        )  # which demonstrations show an image
        pieces = self._skeletons.get(key)
        if pieces is None:
            pieces = self._skeleton(messages, answer is None, len(texts))
            self._skeletons[key] = pieces
        if pieces is None:
            return self._render_template(messages, answer is None)
        out = [pieces[0]]
        for t, piece in zip(texts, pieces[1:]):
            out += (t, piece)
        return self._check_skeleton(key, messages, answer is None, "".join(out))

    def _render_template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _skeleton(
        self, messages: list[dict], generation_prompt: bool, n_texts: int
    ) -> list[str] | None:
        """The template rendered with sentinels for the text items, split at them (None: unusable)."""
        marks = [f"\ue000{i}\ue001" for i in range(n_texts)]
        it = iter(marks)
        sentinel = [
            {
                **m,
                "content": [
                    {**part, "text": next(it)} if part.get("type") == "text" else part
                    for part in m["content"]
                ],
            }
            for m in messages
        ]
        text = self._render_template(sentinel, generation_prompt)
        pieces = []
        for mark in marks:
            if text.count(mark) != 1:
                return None
            head, text = text.split(mark)
            pieces.append(head)
        pieces.append(text)
        return pieces

    def _texts(self, prompt: Prompt, answer: str | None) -> tuple[str, str, str]:
        """(generation prompt P, P + answer, full conversation F) as rendered text."""
        p = self.render(prompt)
        if answer is None:
            return p, p, p
        if not answer.strip():
            raise BackendError("answer_logprobs: empty answer string")
        f = self.render(prompt, answer)
        if not f.startswith(p):
            raise BackendError(
                "chat template: the conversation with the answer does not extend the generation prompt"
            )
        rest = f[len(p) :]
        k = rest.find(answer)
        if k < 0 or rest[:k].strip():
            raise BackendError(
                f"chat template: answer {answer!r} is not the start of the assistant turn"
            )
        return p, f[: len(p) + k + len(answer)], f

    def _split(self, text: str, n_images: int) -> list[str]:
        pieces = text.split(self.image_token)
        if len(pieces) != n_images + 1:
            raise BackendError(
                f"chat template: {len(pieces) - 1} image placeholders {self.image_token!r} for {n_images} images"
            )
        return pieces

    def _tokenize_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ images

    def _preprocess(self, path: str) -> _ImageEntry:
        """One image through the processor, as the placeholder text ``image_token`` would be."""
        out = self.processor(
            text=[self.image_token],
            images=[load_image(path)],
            return_tensors="pt",
            add_special_tokens=False,
            return_text_replacement_offsets=True,
            return_mm_token_type_ids=False,  # types come per image layout (_finish_entry)
        )
        self.stats["image_preprocess"] += 1
        return self._entry(
            out,
            0,
            {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)},
        )

    def _preprocess_many(self, paths: Sequence[str]) -> list[_ImageEntry]:
        """Images through the processor in one call, split per image (else one call each).

        A processor output is split per image when its first dimension is the number of images
        or, with ``image_grid_thw``, the total number of patches. The first batched call is
        compared with one-image calls; a difference switches batching off for this backend.
        """
        if len(paths) < 2 or not self._batch_preprocess:
            return [self._preprocess(p) for p in paths]
        out = self.processor(
            text=[self.image_token] * len(paths),
            images=[load_image(p) for p in paths],
            return_tensors="pt",
            add_special_tokens=False,
            return_text_replacement_offsets=True,
            return_mm_token_type_ids=False,
            padding=True,
        )
        n = len(paths)
        per_image = self._split_per_image(out, n)
        if per_image is not None and not self._check_batch_preprocess(paths[0], out, per_image[0]):
            per_image = None
        if per_image is None:
            self._batch_preprocess = False
            return [self._preprocess(p) for p in paths]
        self.stats["image_preprocess"] += n
        return [self._entry(out, i, per_image[i]) for i in range(n)]

    def _preprocess_images(self, paths: Sequence[str]) -> list[_ImageEntry]:
        """Cache entries for ``paths``: the image processor alone where the placeholder's expansion
        for the image's layout is known, the whole processor (:meth:`_preprocess_many`) where not.

        The expansion (the ids and text the processor puts in place of the placeholder) depends
        on an image only through its tensors' layout (:func:`_layout_key`: shapes, and values
        of integer tensors such as the patch grid). It is learnt from the whole-processor call
        on the first image of each layout, whose tensors must equal the image processor's own;
        a difference switches the image processor alone off for this backend.
        """
        if not self._image_only or self._image_processor is None:
            return self._preprocess_many(paths)
        out = self._image_tensors([load_image(p) for p in paths])
        per_image = self._split_per_image(out, len(paths))
        if per_image is None:
            self._image_only = False
            return self._preprocess_many(paths)
        keys = [_layout_key(t) for t in per_image]
        new = [i for i, k in enumerate(keys) if k not in self._expansions]
        whole = dict(zip(new, self._preprocess_many([paths[i] for i in new]))) if new else {}
        for i, e in whole.items():
            if not self._check_image_processor(e, per_image[i]):
                rest = [i for i in range(len(paths)) if i not in whole]
                whole.update(zip(rest, self._preprocess_many([paths[i] for i in rest])))
                return [whole[i] for i in range(len(paths))]
            self._expansions[keys[i]] = (e.ids, e.text)
        self.stats["image_preprocess"] += len(paths) - len(new)
        entries = []
        for i, (key, tensors) in enumerate(zip(keys, per_image)):
            if i not in whole:
                ids, text = self._expansions[key]
                whole[i] = self._finish_entry(_ImageEntry(ids=ids, tensors=tensors, text=text))
            entries.append(whole[i])
        return entries

    def _image_tensors(self, images: list) -> dict:
        """The image processor's tensors for ``images``: by lookup table (:class:`LookupPixels`)
        where it applies and matched the image processor at the images' sizes, else by it."""
        if self._lookup is not None:
            out = self._lookup(images)
            if out is not None and self._check_lookup(images):
                return out
        return self._image_processor(images=images, return_tensors="pt")

    @staticmethod
    def _split_per_image(out, n: int) -> list[dict] | None:
        """The processor's image tensors for ``n`` images, one dict per image (None: not splittable)."""
        grid = out.get("image_grid_thw")
        sizes = grid.prod(-1).tolist() if isinstance(grid, torch.Tensor) else None
        per_image: list[dict] = [{} for _ in range(n)]
        for k, v in out.items():
            if k in TEXT_KEYS or not isinstance(v, torch.Tensor):
                continue
            if (
                sizes is not None
                and k != "image_grid_thw"
                and v.shape[0] == sum(sizes)
                and sum(sizes) != n
            ):
                chunks = torch.split(v, sizes)
            elif v.shape[0] == n:
                chunks = torch.split(v, 1)
            else:
                return None
            for d, c in zip(per_image, chunks):
                d[k] = c
        return per_image

    @staticmethod
    def _row_ids(out, i: int) -> tuple[int, ...]:
        """Row ``i`` of the processor's input ids without its padding."""
        row = out["input_ids"][i]
        if "attention_mask" in out:
            row = row[out["attention_mask"][i].bool()]
        return tuple(int(t) for t in row)

    def _entry(self, out, i: int, tensors: dict) -> _ImageEntry:
        """The cache entry of image ``i`` of a processor call on ``image_token`` texts."""
        (rep,) = out["text_replacement_offsets"][i]
        return self._finish_entry(
            _ImageEntry(ids=self._row_ids(out, i), tensors=tensors, text=rep["replacement"])
        )

    def _finish_entry(self, entry: _ImageEntry) -> _ImageEntry:
        """Token types and relative 3-D rope positions of an image's ids (shared by equal grids)."""
        grid = entry.tensors.get("image_grid_thw")
        key = (
            entry.ids,
            tuple(grid.flatten().tolist()) if isinstance(grid, torch.Tensor) else None,
        )
        known = self._layouts.get(key)
        if known is None:
            types = torch.zeros(len(entry.ids), dtype=torch.long)
            rel_pos, advance = None, 0
            if self._needs_mm_types:
                types = torch.tensor(
                    self.processor.create_mm_token_type_ids([list(entry.ids)])[0], dtype=torch.long
                )
                if self._mrope:
                    rel_pos, advance = self._image_positions(entry, types)
            known = self._layouts[key] = (
                types.numpy(),
                rel_pos.numpy() if rel_pos is not None else None,
                advance,
            )
        entry.types, entry.rel_pos, entry.advance = known
        return entry

    def _image_positions(self, entry: _ImageEntry, types: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The model's own 3-D rope positions of an image's ids (token ``types``) followed by one text id."""
        ids = torch.tensor([[*entry.ids, self.pad_id]], dtype=torch.long)
        text = torch.zeros(1, dtype=torch.long)
        pos, _ = self._rope_index(
            input_ids=ids,
            mm_token_type_ids=torch.cat([types, text])[None],
            image_grid_thw=entry.tensors["image_grid_thw"],
        )
        pos = pos[:, 0]
        return pos[:, :-1].clone(), int(pos[0, -1])

    def _entries(self, paths: Sequence[str]) -> dict[str, _ImageEntry]:
        """Cache entries for ``paths`` (preprocessed, and vision-encoded in features mode)."""
        found: dict[str, _ImageEntry] = {}
        new: list[str] = []
        for p in dict.fromkeys(paths):
            e = self._cache.get(p)
            if e is None:
                new.append(p)
            else:
                self.stats["image_hits"] += 1
                self._cache.move_to_end(p)
            found[p] = e
        for i in range(0, len(new), 64):
            chunk = new[i : i + 64]
            for p, e in zip(chunk, self._preprocess_images(chunk)):
                found[p] = self._cache[p] = e
        if self.image_cache == "features" and new:
            step = max(64, self.batch_size)
            for i in range(0, len(new), step):
                self._encode_vision([found[p] for p in new[i : i + step]])
        while self.image_cache_size and len(self._cache) > max(self.image_cache_size, len(found)):
            self._cache.popitem(last=False)
        return found

    @torch.inference_mode()
    def _encode_vision(self, entries: list[_ImageEntry]) -> None:
        import inspect

        fn = self.model.get_image_features
        params = inspect.signature(fn).parameters
        keys = [k for k in entries[0].tensors if k in params]
        kwargs = {k: torch.cat([e.tensors[k] for e in entries]).to(self.device) for k in keys}
        for k, v in kwargs.items():
            if v.is_floating_point():
                kwargs[k] = v.to(self.dtype)
        with self._vision_in_segments(), self._in_place():
            if "image_grid_thw" in kwargs:
                kwargs.update(self._vision_geometry(kwargs["image_grid_thw"]))
            feats = fn(**kwargs, return_dict=True).pooler_output
        feats = list(feats)
        if len(feats) != len(entries):
            raise BackendError(
                f"vision encoder returned {len(feats)} feature blocks for {len(entries)} images"
            )
        for e, f in zip(entries, feats):
            e.features = f.detach()
            e.tensors = {k: v for k, v in e.tensors.items() if not k.startswith("pixel_values")}
        self.stats["vision_encoded"] += len(entries)

    # ------------------------------------------------------------------ encoding

    def encode(self, prompt: Prompt, answer: str | None = None) -> Encoded:
        """Chat-formatted token ids of ``prompt`` (+ ``answer``) and the answer's token span."""
        if self.image_cache == "none":
            item = self._item_reference(prompt, answer, full=True)
        else:
            item = self._item_cached(prompt, answer, full=True)
        return Encoded(tuple(item.ids), item.images, item.start, item.end)

    def _images(self, prompt: Prompt) -> tuple[str, ...]:
        """The prompt's image paths in order; a demonstration with an empty ``image`` shows none."""
        demos, query = prompt
        return tuple(str(ex.image) for ex in (*demos, query) if ex.image)

    def _item_cached(self, prompt: Prompt, answer: str | None, *, full: bool = False) -> _Item:
        images = self._images(prompt)
        entries = self._entries(images)
        p, pa, f = self._texts(prompt, answer)
        p_pieces = self._split(p, len(images))
        ids: list[int] = (
            list(self._lead) if not p.startswith(self.tokenizer.bos_token or "\0") else []
        )
        segments: list = []
        head = 0
        for piece, path in zip(p_pieces[:-1], images):
            ids += self._tok(piece)
            segments += (len(ids) - head, entries[path])
            ids += entries[path].ids
            head = len(ids)
        last_p = self._tok(p_pieces[-1])
        self._check_segments(p, images, ids + list(last_p))
        if answer is None:
            ids += last_p
            return _Item(ids, images, len(ids), len(ids), [], (*segments, len(ids) - head))
        last_pa = self._tok(self._split(pa, len(images))[-1])
        last_f = self._tok(self._split(f, len(images))[-1])
        if not _is_prefix(last_p, last_pa) or not _is_prefix(last_pa, last_f):
            raise BackendError(
                f"answer {answer!r}: its tokens merge with the surrounding chat tokens"
            )
        start = len(ids) + len(last_p)
        end = len(ids) + len(last_pa)
        if end <= start:
            raise BackendError(f"answer {answer!r} has no tokens of its own")
        ids += last_f if full else last_pa
        return _Item(ids, images, start, end, [], (*segments, len(ids) - head))

    def _item_reference(self, prompt: Prompt, answer: str | None, *, full: bool = False) -> _Item:
        """The processor called normally; the answer span from the tokenizer's character offsets."""
        images = self._images(prompt)
        p, pa, f = self._texts(prompt, answer)
        text = f if (full and answer is not None) else pa
        out = self.processor(
            text=[text],
            images=[load_image(x) for x in images],
            return_tensors="pt",
            return_offsets_mapping=answer is not None,
            return_text_replacement_offsets=answer is not None,
        )
        ids = [int(t) for t in out["input_ids"][0]]
        vision = [
            {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
        ]
        if answer is None:
            return _Item(ids, images, len(ids), len(ids), vision)
        # Every image precedes the answer, so in the expanded text (the one the offsets refer to)
        # the generation prompt ends at len(p) + growth and the answer at len(pa) + growth.
        growth = sum(
            (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
            for r in out["text_replacement_offsets"][0]
        )
        p_end, a_end = len(p) + growth, len(pa) + growth
        offsets = [tuple(x) for x in out["offset_mapping"][0].tolist()]
        start = end = None
        for i, (a, b) in enumerate(offsets):
            if a < p_end < b or a < a_end < b:
                raise BackendError(f"answer {answer!r}: a token straddles the answer's boundary")
            if a >= p_end and b > a and a < a_end:
                start = i if start is None else start
                end = i + 1
        if start is None:
            raise BackendError(f"answer {answer!r} has no tokens of its own")
        return _Item(ids, images, start, end, vision)

    def _items(self, prompts: Sequence[Prompt], answers: Sequence[str | None]) -> list[_Item]:
        if self.image_cache == "none":
            return [self._item_reference(pr, a) for pr, a in zip(prompts, answers)]
        # admit the request's images up front so that new ones are vision-encoded in large batches
        paths = list(dict.fromkeys(p for pr in prompts for p in self._images(pr)))
        if not self.image_cache_size or len(paths) <= self.image_cache_size:
            self._entries(paths)
        return [self._item_cached(pr, a) for pr, a in zip(prompts, answers)]

    # ------------------------------------------------------------------ batching

    def _collate(
        self,
        items: list[_Item],
        left: bool,
        positions: bool = False,
        prefixes: Sequence[PrefixKV | None] | None = None,
        room: int | None = None,
        block: patches.KVBlock | None = None,
    ) -> tuple[dict, list[int]]:
        """Padded model inputs for ``items`` and each row's offset (``positions``: with 3-D rope ids).

        ``prefixes`` (cached paths): per item a cached :class:`~icdrl.lvlm.prefix_cache.PrefixKV` of its first ids or None.
        The rows then hold only the ids after their prefix (right-padded), and ``inputs["cache"]``
        holds the prefixes' keys and values, left-padded to a common length; the attention mask
        covers both. Offsets are into the rows' *full* token index: ``column = offset + index``.
        ``room`` (decoding): ``inputs["cache"]`` is a :func:`~icdrl.lvlm.hf_patches.roomy_cache`
        with room for the rows and ``room`` more columns; with ``block``, the block's next rows
        (:meth:`~icdrl.lvlm.hf_patches.KVBlock.take`, the block's own room).
        """
        cut = [pk.length if pk else 0 for pk in prefixes] if prefixes else [0] * len(items)
        n_img = [pk.n_images if pk else 0 for pk in prefixes] if prefixes else [0] * len(items)
        has_prefix = any(cut)
        left = left and not has_prefix
        width = max(len(it.ids) - c for it, c in zip(items, cut))
        ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        composed = all(
            it.segments for it in items
        )  # cached path: each image's types and positions known
        types = np.zeros((len(items), width), dtype=np.int64)
        pos = np.zeros((3, len(items), width), dtype=np.int64)
        offsets = []
        for r, (it, c) in enumerate(zip(items, cut)):
            n = len(it.ids) - c
            o = width - n if left else 0
            ids[r, o : o + n] = it.ids[c:]
            mask[r, o : o + n] = 1
            offsets.append(o - c)
            if composed:
                self._layout_into(it, c, types[r, o : o + n], pos[:, r, o : o + n])
        inputs: dict = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
        }
        if self._needs_mm_types:
            if composed:
                inputs["mm_token_type_ids"] = torch.from_numpy(types)
            else:
                inputs["mm_token_type_ids"] = torch.tensor(
                    self.processor.create_mm_token_type_ids(inputs["input_ids"]), dtype=torch.long
                )
        if self.image_cache == "none":
            parts = [v for it in items for v in it.vision]
        else:
            kept = [p for it, k in zip(items, n_img) for p in it.images[k:]]
            parts = [self._cache[p].tensors for p in kept]
            if self.image_cache == "features":
                from transformers.modeling_outputs import BaseModelOutputWithPooling

                feats = [self._cache[p].features for p in kept]
                inputs["mm_encoder_outputs"] = {
                    "image": BaseModelOutputWithPooling(pooler_output=feats)
                }
        for k in parts[0] if parts else []:
            v = torch.cat([part[k] for part in parts])
            inputs[k] = v
        if (
            positions and self._mrope and composed
        ):  # scoring only: generate() relies on the model's rope deltas
            if has_prefix or self._check_positions(inputs, torch.from_numpy(pos)):
                inputs["position_ids"] = torch.from_numpy(pos)
        cache = None
        if block is not None:
            cache = block.take(_cache_columns(items, cut))
        elif room is not None:
            cache = patches.roomy_cache(self._n_layers, (width if has_prefix else 0) + room)
        if has_prefix:
            inputs["cache"], prefix_mask = self._stack_prefixes(prefixes, cache)
            inputs["attention_mask"] = torch.cat([prefix_mask, inputs["attention_mask"]], dim=1)
            offsets = [o + prefix_mask.shape[1] for o in offsets]
        elif cache is not None:
            inputs["cache"] = cache
        dev, dt = self.device, self.dtype
        for k, v in list(inputs.items()):
            if isinstance(v, torch.Tensor):
                inputs[k] = v.to(dev, dt) if v.is_floating_point() else v.to(dev)
        return inputs, offsets

    @staticmethod
    def _layout_into(item: _Item, cut: int, types: np.ndarray, pos: np.ndarray) -> None:
        """Write a cached-path item's token types and 3-D rope positions from id ``cut`` on.

        Types: 0 for text, each image's own; positions: text runs count up, each image adds its
        cached block (``pos`` only matters for mrope models).
        """
        at, cursor = 0, 0  # index into the item's ids, text position reached
        for seg in item.segments:
            n = seg if isinstance(seg, int) else len(seg.ids)
            lo, hi = max(at, cut), at + n
            if hi > lo:
                a, b = lo - cut, hi - cut
                if isinstance(seg, int):
                    pos[:, a:b] = np.arange(cursor + lo - at, cursor + hi - at)
                else:
                    types[a:b] = seg.types[lo - at :]
                    if seg.rel_pos is not None:
                        pos[:, a:b] = seg.rel_pos[:, lo - at :] + cursor
            at = hi
            cursor += n if isinstance(seg, int) else seg.advance

    def _order(self, items: list[_Item]) -> list[int]:
        """Indices sorted by length, longest first (less padding per batch)."""
        return sorted(range(len(items)), key=lambda i: -len(items[i].ids))

    # ------------------------------------------------------------------ once-per-backend checks
    #
    # Every saving of the cached paths is compared with the slow way the first time(s) it is used;
    # a difference switches that saving off for this backend (a warning says which), except where
    # it cannot be done the slow way without changing the numbers (then it raises).

    def fast_paths(self) -> dict[str, bool]:
        """Which fast paths are on (True) or off (False: never applicable here, or switched off by
        its check); the cached paths' state at a glance (benchmarks print it)."""
        cached = self.image_cache != "none"
        return {
            "vision_features_cached": self.image_cache == "features",
            "chat_template_skeletons": cached and self._use_skeletons,
            "batched_image_preprocessing": cached and self._batch_preprocess,
            "image_processor_alone": cached
            and self._image_only
            and self._image_processor is not None,
            "image_lookup_table": cached and self._lookup is not None,
            "composed_3d_positions": self._mrope,
            "prefix_cache": bool(self.prefix_cache_size and self._mrope),
            "last_layer_at_read_columns": self._last is not None and self._last.attn is not None,
            "vision_attention_in_segments": bool(self._vision),
            "vision_patch_embedding_as_matmul": bool(self._embeds),
            "cached_greedy_decoding": self._fast_generate_on,
            "decoding_shared_kv_heads": self._fast_generate_on and bool(self._shared_kv),
            "mlps_in_place": bool(self._mlps),
            "rope_in_halves": bool(self._ropes),
        }

    def _check_skeleton(
        self, key: tuple[int, bool], messages: list[dict], generation_prompt: bool, text: str
    ) -> str:
        """The first 3 renders of each shape: a skeleton render must equal ``apply_chat_template``'s."""
        checks = self._skeleton_checks.get(key, 0)
        if checks >= 3:
            return text
        self._skeleton_checks[key] = checks + 1
        real = self._render_template(messages, generation_prompt)
        if real != text:
            log.warning(
                "chat template alters its text items; rendering every prompt with apply_chat_template"
            )
            self._use_skeletons = False
        return real

    def _check_batch_preprocess(self, path: str, out, tensors: dict) -> bool:
        """Once: image 0 of a batched processor call must equal the processor on that image alone."""
        if self._batch_checked:
            return True
        self._batch_checked = True
        one = self._preprocess(path)
        self.stats["image_preprocess"] -= 1
        first = self._entry(out, 0, tensors)
        if not (
            one.ids == first.ids
            and one.text == first.text
            and _same_tensors(one.tensors, first.tensors)
        ):
            log.warning(
                "batched image preprocessing differs from one image at a time; preprocessing one by one"
            )
            self._batch_preprocess = False
        return self._batch_preprocess

    def _check_image_processor(self, entry: _ImageEntry, tensors: dict) -> bool:
        """Per image layout: the image processor alone must give the processor's tensors."""
        if not _same_tensors(entry.tensors, tensors):
            log.warning(
                "the image processor alone differs from the processor; preprocessing with the processor"
            )
            self._image_only = False
        return self._image_only

    def _check_lookup(self, images: list) -> bool:
        """Per image size: the lookup table must give the image processor's tensors, on an image
        holding every value of every channel (:meth:`LookupPixels.probe`) and on the first image."""
        for im in images:
            if im.size in self._lookup_sizes:
                continue
            pair = [LookupPixels.probe(*im.size), im]
            want = self._image_processor(images=pair, return_tensors="pt")
            got = self._lookup(pair) or {}
            keys = {k for k, v in want.items() if isinstance(v, torch.Tensor)}
            if set(got) != keys or not all(torch.equal(got[k], want[k]) for k in keys):
                log.warning(
                    "the lookup-table image preprocessing differs from the image processor; "
                    "preprocessing with the image processor"
                )
                self._lookup = None
                return False
            self._lookup_sizes.add(im.size)
        return True

    def _check_segments(self, text: str, images: tuple[str, ...], ids: list[int]) -> None:
        """Once per backend: piecewise tokenisation must equal tokenising the expanded text."""
        if self._segments_checked:
            return
        pieces = self._split(text, len(images))
        expanded = pieces[0]
        for piece, path in zip(pieces[1:], images):
            expanded += self._cache[path].text + piece
        whole = self.tokenizer(
            expanded, add_special_tokens=not text.startswith(self.tokenizer.bos_token or "\0")
        )
        if list(whole["input_ids"]) != list(ids):
            raise BackendError(
                "tokenizer: tokenising the chat text piecewise around image placeholders differs from "
                "tokenising it whole; use model.image_cache: none"
            )
        self._segments_checked = True

    def _check_positions(self, inputs: dict, pos: torch.Tensor) -> bool:
        """Once per backend: composed positions must equal the model's own; else stop composing."""
        if self._positions_checked:
            return self._mrope
        grid = inputs.get("image_grid_thw")
        if grid is None:
            return False
        types = torch.tensor(
            self.processor.create_mm_token_type_ids(inputs["input_ids"]), dtype=torch.long
        )
        if not torch.equal(types, inputs["mm_token_type_ids"]):
            raise BackendError(
                "composed mm_token_type_ids differ from the processor's (please report this)"
            )
        ref, _ = self._rope_index(
            input_ids=inputs["input_ids"],
            mm_token_type_ids=types,
            image_grid_thw=grid,
            attention_mask=inputs["attention_mask"],
        )
        real = inputs["attention_mask"].bool()
        self._positions_checked = True
        if not torch.equal(ref[:, real], pos[:, real]):
            log.warning(
                "composed 3-D rope positions differ from the model's; letting the model compute them"
            )
            self._mrope = False
        return self._mrope

    def _check_generation(
        self, batch: list[_Item], fast: list[tuple[int, ...]], n_new: int, kind: str
    ) -> list[tuple[int, ...]]:
        """Once per kind of batch (``"full"``; ``"prefix"``: rows on cached prefixes): the cached
        greedy decoding's answers must equal plain ``model.generate``'s on the batch's first
        ``_CHECK_ROWS`` rows (its longest: the batch is sorted), token
        for token, except at near-ties (:func:`compare_greedy`), which are counted in
        ``stats["generate_near_ties"]``. A real difference switches cached decoding off for this
        backend; the batch's answers are then plain ``generate``'s."""
        self._generation_checked.add(kind)
        n = min(len(batch), _CHECK_ROWS)
        ref, tied = self._plain_tokens(batch[:n], n_new, gaps=True)
        mismatches, ties = compare_greedy(fast[:n], ref, tied)
        self.stats["generate_near_ties"] += len(ties)
        if mismatches:
            r = mismatches[0]
            log.warning(
                "cached greedy decoding differs from model.generate (%d of %d rows checked, e.g. %s vs %s); "
                "generating with model.generate",
                len(mismatches),
                n,
                list(fast[r]),
                list(ref[r]),
            )
            self._fast_generate = False
            return list(ref) + self._plain_tokens(batch[n:], n_new)[0] if n < len(batch) else ref
        return fast

    # ------------------------------------------------------------------ prefix key/value cache

    @property
    def _prefix_on(self) -> bool:
        return bool(self.prefix_cache_size and self._mrope and self._positions_checked)

    @property
    def prefix_max_demos(self) -> int | None:
        """Keep only prefixes of at most this many demonstrations (None: all); see
        :attr:`~icdrl.lvlm.prefix_cache.PrefixCache.max_demos` (beam search sets its depth - 1)."""
        return self.prefixes.max_demos

    @prefix_max_demos.setter
    def prefix_max_demos(self, value: int | None) -> None:
        self.prefixes.max_demos = value

    @property
    def _prefix_kv(self):
        """The stored prefixes (key -> :class:`~icdrl.lvlm.prefix_cache.PrefixKV`), oldest first."""
        return self.prefixes.entries

    @staticmethod
    def _boundaries(item: _Item) -> list[tuple[int, int]]:
        """(ids before image j+1, j) for every j >= 0: where the chat header (j = 0) or the
        prefix of the first j demonstrations ends."""
        out, at, j = [], 0, 0
        for seg in item.segments[:-1]:
            if isinstance(seg, int):
                at += seg
                if at:
                    out.append((at, j))
            else:
                at += len(seg.ids)
                j += 1
        return out

    def _lookup_prefix(self, item: _Item) -> PrefixKV | None:
        """The longest cached prefix of ``item`` (chat header, then demonstrations), or None."""
        pk = self.prefixes.lookup(item.ids, item.images, self._boundaries(item))
        if pk is not None:
            self.stats["prefix_hits"] += 1
        return pk

    def _store_prefixes(
        self, items: list[_Item], offsets: list[int], cache, done: Sequence[int]
    ) -> None:
        """Keep the keys/values of each item's prefixes (chat header, demonstrations) longer than
        ``done[r]``, copied out of the forward's ``cache`` (which is not kept alive)."""
        layers = [(lay.keys, lay.values) for lay in cache.layers]
        rows = [
            (it.ids, it.images, self._boundaries(it), o, d)
            for it, o, d in zip(items, offsets, done)
        ]
        self.prefixes.store(rows, layers)

    def _stack_prefixes(self, prefixes: Sequence[PrefixKV | None], cache=None):
        """The rows' prefixes left-padded to one length, as a DynamicCache, and its attention
        mask. With ``cache`` (an empty :func:`~icdrl.lvlm.hf_patches.roomy_cache` or
        :meth:`~icdrl.lvlm.hf_patches.KVBlock.take`): written straight into its buffers."""
        from transformers import DynamicCache

        if cache is None:
            data, mask = self.prefixes.stack(prefixes)
            return DynamicCache(ddp_cache_data=data), mask

        def into(width: int, like: list) -> list:
            n = len(prefixes)
            return [layer.reserve(n, k, v, width) for layer, (k, v) in zip(cache.layers, like)]

        _, mask = self.prefixes.stack(prefixes, into=into)
        return cache, mask

    # ------------------------------------------------------------------ the two questions

    @torch.inference_mode()
    def answer_logprobs(
        self, prompts: Sequence[Prompt], answers: Sequence[str]
    ) -> list[AnswerScore]:
        """Sum of the answer tokens' log-probabilities and their count, per (prompt, answer).

        With the prefix cache on, a prompt whose first demonstrations were scored before (in any
        earlier call: beam search's next step puts one more demonstration around the previous
        step's prompts) runs only its remaining tokens, attending to the cached keys and values.
        """
        if len(prompts) != len(answers):
            raise BackendError(
                f"answer_logprobs: {len(prompts)} prompts but {len(answers)} answers"
            )
        results: list[AnswerScore | None] = [None] * len(prompts)
        items = self._items(prompts, answers)
        prefixes = (
            [self._lookup_prefix(it) for it in items] if self._prefix_on else [None] * len(items)
        )
        # batches never mix rows with and without a cached prefix; each kind runs longest (rest) first
        full = [i for i in self._order(items) if not prefixes[i]]
        rest = sorted(
            (i for i in range(len(items)) if prefixes[i]),
            key=lambda i: -(len(items[i].ids) - prefixes[i].length),
        )
        left = self.padding_side == "left"
        chunks = [
            rows[c : c + self.batch_size]
            for rows in (full, rest)
            for c in range(0, len(rows), self.batch_size)
        ]
        for idx in chunks:
            batch = [items[i] for i in idx]
            pks = [prefixes[i] for i in idx]
            if self.image_cache != "none":
                self._entries([p for it in batch for p in it.images])  # re-admit anything evicted
            feed = (
                batch
                if self.image_cache == "none"
                else [self._without_last_token(it) for it in batch]
            )
            inputs, offs = self._collate(
                feed, left, positions=True, prefixes=pks if pks[0] else None
            )
            store = self._prefix_on  # after collate: the first batch checks the composed positions
            # row r's answer tokens it.ids[start + j] are predicted at input column offs[r] + start - 1 + j
            # (minus the prefix columns); shorter answers repeat their last token, masked out by ``valid``
            n = [it.end - it.start for it in batch]
            m = max(n)
            shift = (
                inputs["attention_mask"].shape[1] - inputs["input_ids"].shape[1]
            )  # prefix columns
            steps = [[min(j, k - 1) for j in range(m)] for k in n]
            pos = torch.tensor(
                [
                    [o + it.start - 1 - shift + j for j in js]
                    for o, it, js in zip(offs, batch, steps)
                ]
            )
            tgt = torch.tensor([[it.ids[it.start + j] for j in js] for it, js in zip(batch, steps)])
            valid = torch.arange(m)[None, :] < torch.tensor(n)[:, None]
            use_cache = store or "cache" in inputs
            pos = pos.to(self.device)
            with self._last_layer_at(pos), self._in_place():
                if self._keeps_logits:  # project only the positions that predict answer tokens
                    out = self.model(**inputs, logits_to_keep=pos, use_cache=use_cache)
                    logits = out.logits
                else:
                    out = self.model(**inputs, use_cache=use_cache)
                    logits = out.logits.gather(
                        1, pos[..., None].expand(-1, -1, out.logits.shape[-1])
                    )
            self.stats["forward_batches"] += 1
            if store:
                self._store_prefixes(feed, offs, out.cache, [pk.length if pk else 0 for pk in pks])
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = logp.gather(-1, tgt.to(logp.device)[..., None]).squeeze(-1).cpu()
            sums = torch.where(valid, tok_lp, torch.zeros_like(tok_lp)).sum(-1).tolist()
            for r, i in enumerate(idx):
                s = sums[r]
                if not math.isfinite(s):
                    raise BackendError(
                        f"answer_logprobs: non-finite log-prob for answer {answers[i]!r}"
                    )
                results[i] = AnswerScore(sum_logprob=s, n_tokens=n[r])
        return results  # type: ignore[return-value]

    @staticmethod
    def _without_last_token(item: _Item) -> _Item:
        """``item`` without its last answer token (and anything after it): no scored position reads it."""
        cut = len(item.ids) - (item.end - 1)
        segments = (
            (*item.segments[:-1], item.segments[-1] - cut) if item.segments else item.segments
        )
        return replace(item, ids=item.ids[: item.end - 1], segments=segments)

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """Greedy answers, decoded without special tokens, post-processed (docs/science.md §3)."""
        toks = self.generate_ids(prompts, max_new_tokens)
        texts = (
            self.tokenizer.batch_decode([list(t) for t in toks], skip_special_tokens=True)
            if toks
            else []
        )
        return [Generation(raw=raw, answer=postprocess(raw)) for raw in texts]

    @torch.inference_mode()
    def generate_ids(
        self, prompts: Sequence[Prompt], max_new_tokens: int | None = None
    ) -> list[tuple[int, ...]]:
        """Each prompt's greedy new token ids, up to and including its first end token, at most
        ``max_new_tokens`` (default: the backend's).

        Cached paths: :meth:`_generate_cached` (prefix cache, batched greedy decoding with a
        key/value cache, each row stopping at its own end). The reference path and a backend
        whose cached decoding failed its check: plain ``model.generate``, ``batch_size`` prompts
        at a time, longest first.
        """
        n_new = int(max_new_tokens or self.max_new_tokens)
        if n_new < 1:
            raise BackendError(f"generate: max_new_tokens must be >= 1, got {n_new}")
        items = self._items(prompts, [None] * len(prompts))
        if self._fast_generate_on:
            return self._generate_cached(items, n_new)
        return self._generate_plain(items, n_new)

    @property
    def _fast_generate_on(self) -> bool:
        """Cached greedy decoding applies: cached paths, and positions the backend composes itself
        (3-D rope) or a model without 3-D rope (1-D positions from the attention mask)."""
        return (
            self.image_cache != "none"
            and self._fast_generate
            and (self._mrope or self._rope_index is None)
        )

    def _eos_ids(self, n_new: int) -> frozenset[int]:
        eos = self._generation_config(n_new).eos_token_id
        return frozenset([eos] if isinstance(eos, int) else list(eos or []))

    def _generate_plain(self, items: list[_Item], n_new: int) -> list[tuple[int, ...]]:
        results: list[tuple[int, ...] | None] = [None] * len(items)
        order = self._order(items)
        for c in range(0, len(order), self.batch_size):
            idx = order[c : c + self.batch_size]
            for i, t in zip(idx, self._plain_tokens([items[i] for i in idx], n_new)[0]):
                results[i] = t
        return results  # type: ignore[return-value]

    def _plain_tokens(self, batch: list[_Item], n_new: int, gaps: bool = False):
        """One batch through plain ``model.generate`` (left padding, the purely greedy config):
        (each row's new ids up to its first end token, and with ``gaps`` per row and step whether
        its two best logits are a near-tie (:func:`near_tie_tolerance`), else None)."""
        if self.image_cache != "none":
            self._entries([p for it in batch for p in it.images])
        inputs, _ = self._collate(batch, left=True)
        cfg = self._generation_config(n_new)
        cfg.return_dict_in_generate, cfg.output_logits = True, gaps
        out = self.model.generate(**inputs, generation_config=cfg)
        self.stats["forward_batches"] += 1
        eos = self._eos_ids(n_new)
        new = out.sequences[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        toks = [_until_end(row, eos) for row in new]
        if not gaps:
            return toks, None
        top = (
            torch.stack([lg.float() for lg in out.logits], 1).topk(2, dim=-1).values.cpu().tolist()
        )  # [rows, steps, 2]
        tied = [
            [a - b <= near_tie_tolerance(self.dtype, a) for a, b in row[: len(t)]]
            for row, t in zip(top, toks)
        ]
        return toks, tied

    def _generate_cached(self, items: list[_Item], n_new: int) -> list[tuple[int, ...]]:
        """Greedy decoding on the prefix cache, in waves (:func:`~icdrl.lvlm.prefix_cache.next_wave`).

        The longest prompts run first (most demonstrations, then most ids), so that one prompt
        stores the prefixes of the shorter ones nested in it; a prompt whose prefix another
        prompt of this call stores waits for it. Each wave's first steps run in batches of
        ``batch_size``, longest remainder (the ids after the row's cached prefix) first, rows with
        and without cached prefixes mixed. The later steps of several batches, of this wave and
        the next ones, run together (:meth:`_decode_together`): a decoding step costs about the
        same for one batch as for a few, and a later wave needs only the earlier waves' first
        steps (which store the prefixes). The first batch of each kind (without, with cached
        prefixes) is decoded alone and compared with plain ``model.generate``
        (:meth:`_check_generation`).
        """
        results: list[tuple[int, ...] | None] = [None] * len(items)
        pending = sorted(
            range(len(items)), key=lambda i: (-len(items[i].images), -len(items[i].ids), i)
        )
        waves = bool(self.prefix_cache_size and self._mrope)
        longest = max((len(it.ids) for it in items), default=0)
        held = _Held()
        try:
            while pending:
                if waves:
                    keys = [
                        self.prefixes.shareable(
                            items[i].ids, items[i].images, self._boundaries(items[i])
                        )
                        for i in pending
                    ]
                    ready, wait = next_wave(keys, self.prefixes.__contains__)
                    shared = Counter(k for ks in keys for k in ks)
                    self.prefixes.protected = frozenset(k for k, n in shared.items() if n > 1)
                    now, pending = [pending[i] for i in ready], [pending[i] for i in wait]
                else:
                    now, pending = pending, []
                self._run_wave(items, now, n_new, results, longest, held, later=len(pending))
            self._decode_together(held, n_new, results)
        finally:
            self.prefixes.protected = frozenset()
            self.prefixes.evict()
        return results  # type: ignore[return-value]

    def _run_wave(
        self,
        items: list[_Item],
        now: list[int],
        n_new: int,
        results: list,
        longest: int,
        held: _Held,
        later: int = 0,
    ) -> None:
        """The rows ``now`` in batches, longest remainder first: answers into ``results``, or
        batches after their first step into ``held``, decoded together (:meth:`_decode_together`)
        before a batch that would not fit and at the end of the call.

        Held batches write their keys and values into one
        :class:`~icdrl.lvlm.hf_patches.KVBlock` of at most twice ``_ROWS_PER_BATCH`` times
        ``batch_size`` rows (twice what one batch may hold; fewer when fewer rows are left in the
        call, ``later`` of them in later waves) and of the columns of the call's ``longest``
        prompt, or of the first batch reaching more: decoding them together copies nothing, and
        the keys and values alive at once stay within that block.

        A batch holds up to ``batch_size`` rows, or more rows whose remainders (the ids after
        their cached prefix) are short: as many as fit in ``batch_size`` times ``longest`` new
        ids (what a batch of whole prompts may hold), at most ``_ROWS_PER_BATCH`` times
        ``batch_size``.
        """

        def rest(i: int) -> int:
            pk = (
                self.prefixes.lookup(items[i].ids, items[i].images, self._boundaries(items[i]))
                if self._prefix_on
                else None
            )
            return len(items[i].ids) - (pk.length if pk else 0)

        rests = {i: rest(i) for i in now}
        now.sort(key=lambda i: (-rests[i], i))
        cap = _ROWS_PER_BATCH * self.batch_size
        budget = self.batch_size * longest
        at = 0
        while at < len(now):
            rows = max(self.batch_size, min(cap, budget // max(1, rests[now[at]])))
            idx = now[at : at + rows]
            at += len(idx)
            batch = [items[i] for i in idx]
            # looked up again: an earlier batch of this wave may have stored a longer one
            prefixes = [self._lookup_prefix(it) if self._prefix_on else None for it in batch]
            kind = "prefix" if any(prefixes) else "full"
            if not self._fast_generate_on:  # switched off by a check
                got = self._generate_plain(batch, n_new)
            elif kind not in self._generation_checked:
                state = self._first_step(batch, n_new, prefixes)
                if isinstance(state, list):  # positions not composed: plain generate answered
                    got = state
                else:
                    got = self._check_generation(batch, self._decode(state, n_new), n_new, kind)
            else:
                columns = _cache_columns(batch, [p.length if p else 0 for p in prefixes])
                if held.block is not None and held.block.fits(len(idx), 0):
                    held.block.widen(columns)  # rarely: a batch wider than the call's longest
                else:
                    self._decode_together(held, n_new, results)
                    held.block = patches.KVBlock(
                        self._n_layers,
                        rows=min(2 * cap, len(now) - at + len(idx) + later),
                        width=max(columns, longest),
                        room=n_new,
                    )
                state = self._first_step(batch, n_new, prefixes, held.block)
                if isinstance(state, list):
                    got = state
                else:
                    state.slots = idx
                    held.states.append(state)
                    continue
            for i, t in zip(idx, got):
                results[i] = t

    def _decode_together(self, held: _Held, n_new: int, results: list) -> None:
        """Decode the batches ``held`` (after their first step, in its block) as one, answers
        into ``results`` at their ``slots``; empties ``held``."""
        states, block = held.states, held.block
        held.states, held.block = [], None
        if not states:
            return
        state = _Decoding.of_block(states, block)
        for i, t in zip(state.slots, self._decode(state, n_new)):
            results[i] = t

    def _first_step(
        self,
        batch: list[_Item],
        n_new: int,
        pks: Sequence[PrefixKV | None],
        block: patches.KVBlock | None = None,
    ) -> _Decoding | list[tuple[int, ...]]:
        """The first step of cached greedy decoding on ``batch`` (see :meth:`_generate_cached`),
        the rows' cached prefixes ``pks`` (None where a row has none).

        Runs each row's ids after its cached prefix (right-padded, the prefixes' keys and values
        left-padded in front), the last decoder layer only at each row's last column, and stores
        the rows' new prefixes. Returns the rows' decoding state after it: each row's first new
        token, its next position (3-D rope: one past the prompt's last position, as
        transformers' rope deltas give; else the count of the row's ids), the key/value cache
        (in ``block``'s next rows if given) and its attention mask. A 3-D rope model whose
        positions the backend does not compose (its check failed) gets plain ``generate``'s
        answers instead.
        """
        if self.image_cache != "none":
            self._entries([p for it in batch for p in it.images])  # re-admit anything evicted
        has_prefix = any(pks)
        inputs, offs = self._collate(
            batch,
            left=True,
            positions=True,
            prefixes=pks if has_prefix else None,
            room=n_new,
            block=block,
        )
        dev = self.device
        mask = inputs["attention_mask"]
        shift = mask.shape[1] - inputs["input_ids"].shape[1]  # prefix columns
        last = torch.tensor(
            [[o + len(it.ids) - 1 - shift] for o, it in zip(offs, batch)], device=dev
        )
        if "position_ids" in inputs:  # composed 3-D positions
            mrope = True
            nxt = inputs["position_ids"][0].gather(1, last)[:, 0] + 1
        elif self._rope_index is None:
            mrope = False
            full = mask.long().cumsum(-1) - 1
            inputs["position_ids"] = full.masked_fill(mask == 0, 0)[:, shift:]
            nxt = mask.sum(-1)
        else:  # 3-D rope whose positions the backend does not compose (its check failed)
            self._fast_generate = False
            if block is not None:
                block.close(keep=False)
            return self._plain_tokens(batch, n_new)[0]
        try:
            with (
                patches.shared_kv_heads(self._shared_kv),
                self._last_layer_at(last),
                self._in_place(),
            ):
                if self._keeps_logits:
                    out = self.model(**inputs, logits_to_keep=last, use_cache=True)
                    logits = out.logits[:, -1]
                else:
                    out = self.model(**inputs, use_cache=True)
                    logits = out.logits.gather(
                        1, last[..., None].expand(-1, -1, out.logits.shape[-1])
                    )[:, -1]
        except BaseException:
            if block is not None:
                block.close(keep=False)
            raise
        if block is not None:
            block.close()
        self.stats["forward_batches"] += 1
        if self._prefix_on:
            self._store_prefixes(batch, offs, out.cache, [pk.length if pk else 0 for pk in pks])
        return _Decoding(
            cache=out.cache,
            mask=mask,
            nxt=nxt,
            tok=logits.float().argmax(-1),
            mrope=mrope,
            slots=list(range(len(batch))),
        )

    def _decode(self, state: _Decoding, n_new: int) -> list[tuple[int, ...]]:
        """Greedy decoding from ``state`` (after the first step) to each row's end: each step
        feeds every unfinished row its last token at its next position, attending to the
        key/value cache; a row that produced an end token leaves the batch. Each row's new ids,
        up to and including its first end token, at most ``n_new``."""
        dev = self.device
        cache, mask, nxt, tok = state.cache, state.mask, state.nxt, state.tok
        eos = self._eos_ids(n_new)
        toks: list[list[int]] = [[] for _ in state.slots]
        alive = list(range(len(toks)))
        with patches.shared_kv_heads(self._shared_kv), self._in_place():
            for step in range(n_new):
                got = tok.tolist()
                for r, t in zip(alive, got):
                    toks[r].append(t)
                keep = [k for k, t in enumerate(got) if t not in eos]
                if step == n_new - 1 or not keep:
                    break
                if len(keep) < len(alive):  # finished rows leave the batch
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    mask, nxt, tok = mask[sel], nxt[sel], tok[sel]
                    alive = [alive[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                pos = (nxt + step)[:, None]
                out = self.model(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    cache=cache,
                    use_cache=True,
                    position_ids=pos[None].expand(3, -1, -1) if state.mrope else pos,
                )
                self.stats["decode_steps"] += 1
                tok = out.logits[:, -1].float().argmax(-1)
        return [tuple(t) for t in toks]

    def _generation_config(self, max_new_tokens: int):
        """The checkpoint's generation config made purely greedy.

        Sampling settings and logit processors the checkpoint ships (Qwen2.5-VL-Instruct sets
        ``repetition_penalty`` 1.05, which would penalise repeating a demonstration's answer)
        are switched off, so that the greedy answer is the argmax of the distribution that
        :meth:`answer_logprobs` measures.
        """
        import copy

        cfg = copy.deepcopy(self.model.generation_config)
        cfg.repetition_penalty = 1.0
        cfg.no_repeat_ngram_size = 0
        cfg.bad_words_ids = None
        cfg.suppress_tokens = None
        cfg.begin_suppress_tokens = None
        cfg.min_new_tokens = None
        cfg.min_length = 0
        cfg.max_new_tokens = max_new_tokens
        cfg.max_length = None
        cfg.do_sample = False
        cfg.num_beams = 1
        cfg.temperature = None
        cfg.top_p = None
        cfg.top_k = None
        if cfg.pad_token_id is None:
            cfg.pad_token_id = self.pad_id
        if cfg.eos_token_id is None:
            cfg.eos_token_id = self.tokenizer.eos_token_id
        return cfg
