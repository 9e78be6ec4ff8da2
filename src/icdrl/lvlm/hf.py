"""The transformers LVLM backend (SPEC §3): ``AutoModelForImageTextToText`` + ``AutoProcessor``.

One backend answers the two questions of SPEC §3 for any image-text-to-text checkpoint folder
whose processor has a chat template and an image placeholder token (Qwen2.5-VL, LLaVA, ...):

* :meth:`HFBackend.answer_logprobs` — summed log-probabilities of the answer tokens and their
  count. The answer span is located in the *chat-formatted token ids*: the conversation with
  the answer as the assistant turn is tokenised next to the conversation ending in the
  generation prompt, and the answer is the tokens between the two (ANCHORS defect 1 is a
  plain-text length; this never looks at one). The answer ends before the end-of-turn tokens.
* :meth:`HFBackend.generate` — greedy decoding of ``max_new_tokens`` new tokens from the
  generation prompt, decoded without special tokens and post-processed (SPEC §3).

Speed. Prompts are sorted by length and run ``batch_size`` at a time. Every distinct image path
is preprocessed once per backend instance (``image_cache``):

* ``"features"`` (default where the model accepts ``mm_encoder_outputs``): the processor runs
  once per image *and* the vision encoder runs once per image; batches carry the cached
  features, so a demonstration that recurs in many candidate sequences costs its vision
  encoding once.
* ``"pixels"``: the processor runs once per image; the vision encoder runs on every batch.
* ``"none"``: the reference path. The processor is called normally for every prompt (text and
  images) and the answer span is taken from the tokenizer's character offsets. Tests check that
  it gives the same ids, spans and numbers as the cached paths.

In the cached paths the chat text is split at the processor's image placeholder, each text
piece is tokenised on its own (and cached), and the placeholder is replaced by the ids the
processor produced for that image; the placeholder is a special token, so this equals
tokenising the expanded text in one go (checked once per backend, and by the tests).

Cached features belong to the weights they were computed with: call :meth:`clear_cache`
after changing the model's weights.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from icdrl.data import load_image
from icdrl.lvlm import qwen as _qwen  # noqa: F401  (registers the torchvision-free Qwen processor)
from icdrl.lvlm.base import AnswerScore, Generation, Prompt
from icdrl.lvlm.prompt import build_messages, postprocess

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_MODES = ("features", "pixels", "none")
PADDING_SIDES = ("left", "right")
#: Processor outputs that belong to the text, not to an image.
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "offset_mapping"})


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


@dataclass
class _Item:
    ids: list[int]
    images: tuple[str, ...]
    start: int  # first answer token (scoring) / len(ids) (generation)
    end: int
    vision: list[dict]  # reference path only: the processor's image tensors for this item


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


def _is_prefix(short: Sequence[int], long: Sequence[int]) -> bool:
    return len(short) <= len(long) and list(long[: len(short)]) == list(short)


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
    ):
        if batch_size < 1:
            raise BackendError(f"model.batch_size: must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise BackendError(f"model.max_new_tokens: must be >= 1, got {max_new_tokens}")
        if padding_side not in PADDING_SIDES:
            raise BackendError(f"model.padding_side: {padding_side!r} is not one of left, right")
        if image_cache not in CACHE_MODES:
            raise BackendError(f"model.image_cache: {image_cache!r} is not one of {', '.join(CACHE_MODES)}")
        if image_cache_size < 0:
            raise BackendError(f"model.image_cache_size: must be >= 0 (0: unbounded), got {image_cache_size}")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt or None
        self.padding_side = padding_side
        if image_cache == "features" and not self._supports_features():
            log.warning("%s does not accept mm_encoder_outputs; caching pixels only", type(model).__name__)
            image_cache = "pixels"
        self.image_cache = image_cache
        self.image_cache_size = int(image_cache_size)
        self.image_token = getattr(processor, "image_token", None)
        if not self.image_token:
            raise BackendError(f"{type(processor).__name__} has no image placeholder token (processor.image_token)")
        if getattr(processor, "chat_template", None) is None:
            raise BackendError(f"{type(processor).__name__} has no chat template (chat_template.jinja / .json)")
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self._lead = self._special_prefix()
        self._cache: OrderedDict[str, _ImageEntry] = OrderedDict()
        self._needs_mm_types = bool(getattr(processor, "return_mm_token_type_ids", False))
        import inspect

        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._segments_checked = False
        self._tok = functools.lru_cache(maxsize=200_000)(self._tokenize_uncached)
        #: counters: processor calls on a single image, cache hits, images through the vision encoder
        self.stats = {"image_preprocess": 0, "image_hits": 0, "vision_encoded": 0, "forward_batches": 0}

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
    ) -> "HFBackend":
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
            type(model).__name__, path, dev, dtype, backend.batch_size, backend.image_cache,
        )
        return backend

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

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
        """Forget cached image encodings (needed after the model's weights change)."""
        self._cache.clear()

    # ------------------------------------------------------------------ chat text

    def messages(self, prompt: Prompt, answer: str | None = None) -> list[dict]:
        demos, query = prompt
        return build_messages(demos, query, answer=answer, system_prompt=self.system_prompt)

    def render(self, prompt: Prompt, answer: str | None = None) -> str:
        """The chat-formatted text: with ``answer`` the full conversation, else up to the generation prompt."""
        return self.processor.apply_chat_template(
            self.messages(prompt, answer), tokenize=False, add_generation_prompt=answer is None
        )

    def _texts(self, prompt: Prompt, answer: str | None) -> tuple[str, str, str]:
        """(generation prompt P, P + answer, full conversation F) as rendered text."""
        p = self.render(prompt)
        if answer is None:
            return p, p, p
        if not answer.strip():
            raise BackendError("answer_logprobs: empty answer string")
        f = self.render(prompt, answer)
        if not f.startswith(p):
            raise BackendError("chat template: the conversation with the answer does not extend the generation prompt")
        rest = f[len(p) :]
        k = rest.find(answer)
        if k < 0 or rest[:k].strip():
            raise BackendError(f"chat template: answer {answer!r} is not the start of the assistant turn")
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
        out = self.processor(
            text=[self.image_token],
            images=[load_image(path)],
            return_tensors="pt",
            add_special_tokens=False,
            return_text_replacement_offsets=True,
        )
        self.stats["image_preprocess"] += 1
        ids = tuple(int(t) for t in out["input_ids"][0])
        tensors = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
        (rep,) = out["text_replacement_offsets"][0]
        return _ImageEntry(ids=ids, tensors=tensors, text=rep["replacement"])

    def _entries(self, paths: Sequence[str]) -> dict[str, _ImageEntry]:
        """Cache entries for ``paths`` (preprocessed, and vision-encoded in features mode)."""
        found: dict[str, _ImageEntry] = {}
        new: list[str] = []
        for p in dict.fromkeys(paths):
            e = self._cache.get(p)
            if e is None:
                e = self._preprocess(p)
                new.append(p)
                self._cache[p] = e
            else:
                self.stats["image_hits"] += 1
                self._cache.move_to_end(p)
            found[p] = e
        if self.image_cache == "features" and new:
            step = max(8, self.batch_size)
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
        feats = fn(**kwargs, return_dict=True).pooler_output
        feats = list(feats)
        if len(feats) != len(entries):
            raise BackendError(f"vision encoder returned {len(feats)} feature blocks for {len(entries)} images")
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
        demos, query = prompt
        return tuple(str(ex.image) for ex in (*demos, query))

    def _item_cached(self, prompt: Prompt, answer: str | None, *, full: bool = False) -> _Item:
        images = self._images(prompt)
        entries = self._entries(images)
        p, pa, f = self._texts(prompt, answer)
        p_pieces = self._split(p, len(images))
        ids: list[int] = list(self._lead) if not p.startswith(self.tokenizer.bos_token or "\0") else []
        for piece, path in zip(p_pieces[:-1], images):
            ids += self._tok(piece)
            ids += entries[path].ids
        last_p = self._tok(p_pieces[-1])
        self._check_segments(p, images, ids + list(last_p))
        if answer is None:
            ids += last_p
            return _Item(ids, images, len(ids), len(ids), [])
        last_pa = self._tok(self._split(pa, len(images))[-1])
        last_f = self._tok(self._split(f, len(images))[-1])
        if not _is_prefix(last_p, last_pa) or not _is_prefix(last_pa, last_f):
            raise BackendError(f"answer {answer!r}: its tokens merge with the surrounding chat tokens")
        start = len(ids) + len(last_p)
        end = len(ids) + len(last_pa)
        if end <= start:
            raise BackendError(f"answer {answer!r} has no tokens of its own")
        ids += last_f if full else last_pa
        return _Item(ids, images, start, end, [])

    def _check_segments(self, text: str, images: tuple[str, ...], ids: list[int]) -> None:
        """Once per backend: piecewise tokenisation must equal tokenising the expanded text."""
        if self._segments_checked:
            return
        pieces = self._split(text, len(images))
        expanded = pieces[0]
        for piece, path in zip(pieces[1:], images):
            expanded += self._cache[path].text + piece
        whole = self.tokenizer(expanded, add_special_tokens=not text.startswith(self.tokenizer.bos_token or "\0"))
        if list(whole["input_ids"]) != list(ids):
            raise BackendError(
                "tokenizer: tokenising the chat text piecewise around image placeholders differs from "
                "tokenising it whole; use model.image_cache: none"
            )
        self._segments_checked = True

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
        vision = [{k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}]
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

    def _collate(self, items: list[_Item], left: bool) -> tuple[dict, list[int]]:
        """Padded model inputs for ``items`` and each row's left offset."""
        width = max(len(it.ids) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        offsets = []
        for r, it in enumerate(items):
            o = width - len(it.ids) if left else 0
            ids[r, o : o + len(it.ids)] = torch.tensor(it.ids, dtype=torch.long)
            mask[r, o : o + len(it.ids)] = 1
            offsets.append(o)
        inputs: dict = {"input_ids": ids, "attention_mask": mask}
        if self._needs_mm_types:
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(ids), dtype=torch.long)
        if self.image_cache == "none":
            parts = [v for it in items for v in it.vision]
        else:
            parts = [self._cache[p].tensors for it in items for p in it.images]
            if self.image_cache == "features":
                from transformers.modeling_outputs import BaseModelOutputWithPooling

                feats = [self._cache[p].features for it in items for p in it.images]
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
        for k in parts[0] if parts else []:
            v = torch.cat([part[k] for part in parts])
            inputs[k] = v
        dev, dt = self.device, self.dtype
        for k, v in list(inputs.items()):
            if isinstance(v, torch.Tensor):
                inputs[k] = v.to(dev, dt) if v.is_floating_point() else v.to(dev)
        return inputs, offsets

    def _order(self, items: list[_Item]) -> list[int]:
        """Indices sorted by length, longest first (less padding per batch)."""
        return sorted(range(len(items)), key=lambda i: -len(items[i].ids))

    # ------------------------------------------------------------------ the two questions

    @torch.inference_mode()
    def answer_logprobs(self, prompts: Sequence[Prompt], answers: Sequence[str]) -> list[AnswerScore]:
        """Sum of the answer tokens' log-probabilities and their count, per (prompt, answer)."""
        if len(prompts) != len(answers):
            raise BackendError(f"answer_logprobs: {len(prompts)} prompts but {len(answers)} answers")
        results: list[AnswerScore | None] = [None] * len(prompts)
        items = self._items(prompts, answers)
        order = self._order(items)
        left = self.padding_side == "left"
        for c in range(0, len(order), self.batch_size):
            idx = order[c : c + self.batch_size]
            batch = [items[i] for i in idx]
            if self.image_cache != "none":
                self._entries([p for it in batch for p in it.images])  # re-admit anything evicted
            inputs, offs = self._collate(batch, left)
            n = [it.end - it.start for it in batch]
            m = max(n)
            pos = torch.zeros((len(batch), m), dtype=torch.long)
            tgt = torch.zeros((len(batch), m), dtype=torch.long)
            valid = torch.zeros((len(batch), m), dtype=torch.bool)
            for r, it in enumerate(batch):
                for j in range(m):
                    jj = min(j, n[r] - 1)
                    pos[r, j] = offs[r] + it.start - 1 + jj
                    tgt[r, j] = it.ids[it.start + jj]
                    valid[r, j] = j < n[r]
            if self._keeps_logits:  # project only the positions that predict answer tokens
                logits = self.model(**inputs, logits_to_keep=pos.to(self.device), use_cache=False).logits
            else:
                full = self.model(**inputs, use_cache=False).logits
                logits = full.gather(1, pos.to(full.device)[..., None].expand(-1, -1, full.shape[-1]))
            self.stats["forward_batches"] += 1
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok_lp = logp.gather(-1, tgt.to(logp.device)[..., None]).squeeze(-1).cpu()
            tok_lp = torch.where(valid, tok_lp, torch.zeros_like(tok_lp))
            for r, i in enumerate(idx):
                s = float(tok_lp[r].sum())
                if not math.isfinite(s):
                    raise BackendError(f"answer_logprobs: non-finite log-prob for answer {answers[i]!r}")
                results[i] = AnswerScore(sum_logprob=s, n_tokens=n[r])
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[Generation]:
        """Greedy answers (left padding), decoded without special tokens, post-processed."""
        n_new = int(max_new_tokens or self.max_new_tokens)
        items = self._items(prompts, [None] * len(prompts))
        order = self._order(items)
        gen_cfg = self._generation_config(n_new)
        results: list[Generation | None] = [None] * len(prompts)
        for c in range(0, len(order), self.batch_size):
            idx = order[c : c + self.batch_size]
            batch = [items[i] for i in idx]
            if self.image_cache != "none":
                self._entries([p for it in batch for p in it.images])
            inputs, _ = self._collate(batch, left=True)
            out = self.model.generate(**inputs, generation_config=gen_cfg)
            self.stats["forward_batches"] += 1
            new = out[:, inputs["input_ids"].shape[1] :].cpu()
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, raw in zip(idx, texts):
                results[i] = Generation(raw=raw, answer=postprocess(raw))
        return results  # type: ignore[return-value]

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
