"""The embedded LVLM: a tiny Qwen2.5-VL that the workflow trains on easy-VQA, then serves.

No real LVLM can be downloaded on the workflow's machines, so its default experiment runs on a
small model of the real architecture (``Qwen2_5_VLForConditionalGeneration``, about 1.2 M
parameters, patch 8 on 64x64 images giving 16 image tokens, a word-level tokenizer with Qwen's
special tokens and chat template), trained here and then served by the same backend as
Qwen2.5-VL-3B (``icdrl.lvlm.load_backend``).

The training recipe (:mod:`icdrl.lvlm.embedded_recipe`) makes the model behave like a chat LVLM
on VQA: competent at the task, but answering in a verbose form unless its demonstrations show
the short form for the same kind of question. :func:`icl_check` measures both.

Entry points: :func:`train_embedded` (workflow rule ``train_lvlm``), :func:`icl_check` (rule
``icl_check``), :func:`main_icl_check` (``icdrl icl-check``). Presets: :data:`DEFAULT` (the
values of :class:`EmbeddedConfig`) and :data:`TEST_PRESET` (trains in well under a minute).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from icdrl.data import Example
from icdrl.lvlm import embedded_recipe as recipe

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


#: keys that once existed, and why they are gone (a config still naming one is refused, saying so)
REMOVED_KEYS: dict[str, str] = {
    "max_minutes": "removed: the embedded LVLM always trains its embedded_lvlm.steps steps (a wall-time cap "
    "made the model, under the same path, depend on the machine's speed); delete the key",
}


def _from_dict(cls, d: dict | None, where: str):
    """``cls(**d)`` rejecting unknown keys with a one-line error naming ``where``."""
    d = dict(d or {})
    if cls is EmbeddedConfig:
        for k in sorted(set(d) & set(REMOVED_KEYS)):
            raise ValueError(f"config key {where}.{k}: {REMOVED_KEYS[k]}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(
            f"config section {where}: unknown key(s) {unknown}; allowed: {sorted(names)}"
        )
    return cls(**d)


@dataclass
class CheckConfig:
    """Settings of :func:`icl_check` (config ``embedded_lvlm.check``)."""

    n_test: int = 500  # seeded easy-VQA test questions
    n_anchors: int = 100  # seeded training anchors for the InfoScore spread
    pool_size: int = 64  # random pool per anchor
    spread_threshold: float = 0.1  # best single-step InfoScore minus pool median
    seed: int = 0
    batch_size: int = 32
    train_subset: int | None = None  # demonstrations, anchors, pools: a seeded train subset (tests)

    def __post_init__(self):
        if self.train_subset is not None and int(self.train_subset) < 1:
            raise ValueError("config key embedded_lvlm.check.train_subset: must be >= 1 or null")
        for name in ("n_test", "n_anchors", "pool_size", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config key embedded_lvlm.check.{name}: must be >= 1")
        if not 0.0 <= float(self.spread_threshold) <= 1.0:
            raise ValueError("config key embedded_lvlm.check.spread_threshold: must lie in [0, 1]")


@dataclass
class EmbeddedConfig:
    """Knobs of the embedded LVLM (config section ``embedded_lvlm``); defaults = the default recipe."""

    # model (Qwen2.5-VL architecture at toy size)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 384
    vision_hidden: int = 64
    vision_depth: int = 4
    vision_heads: int = 4
    patch_size: int = 8
    merge_size: int = 2
    image_size: int = 64
    # training
    steps: int = 1200  # always trained in full: nothing here depends on how fast the machine is
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_share: float = 0.1  # cosine decay to lr * min_lr_share
    lr_warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_share: float = 0.1  # first share of steps: zero-shot colour, shape, non-negated yes/no
    vision_pretrain_steps: int = 400  # stage 1: the vision tower learns colour and shape (0 = skip)
    vision_pretrain_batch: int = 64  # images per stage-1 step
    freeze_vision: bool = True  # stage 2 keeps the stage-1 vision tower (its features are cached)
    kind_weights: dict = field(default_factory=lambda: {"colour": 1.0, "shape": 1.0, "yesno": 1.5})
    max_demos: int = 4
    similar_share: float = 0.5
    cue_exact: float = 0.9  # short-form cue of a same-template demonstration
    cue_kind: float = 0.2  # short-form cue of a same-answer-kind demonstration
    first_token_weight: float = 5.0  # loss weight of the query's first answer token (its form)
    balance_yesno: bool = False  # yes/no demonstrations carry yes and no equally often
    balance_yesno_queries: bool = False  # queries keep the split's yes/no distribution (text prior)
    answer_match_share: float = 0.5  # share of same-question similar demos sharing the answer
    train_limit: int | None = None  # use only the first N training questions (tests)
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    check: CheckConfig = field(default_factory=CheckConfig)

    def __post_init__(self):
        if isinstance(self.check, dict):
            self.check = _from_dict(CheckConfig, self.check, "embedded_lvlm.check")
        unknown = sorted(set(self.kind_weights) - set(recipe.KINDS))
        if unknown:
            raise ValueError(
                f"config key embedded_lvlm.kind_weights: unknown kind(s) {unknown}; kinds: {list(recipe.KINDS)}"
            )
        for name in (
            "cue_exact",
            "cue_kind",
            "similar_share",
            "warmup_share",
            "min_lr_share",
            "answer_match_share",
        ):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"config key embedded_lvlm.{name}: {v} must lie in [0, 1]")
        if float(self.first_token_weight) <= 0:
            raise ValueError("config key embedded_lvlm.first_token_weight: must be > 0")
        if int(self.vision_pretrain_steps) < 0:
            raise ValueError("config key embedded_lvlm.vision_pretrain_steps: must be >= 0")
        for name in (
            "steps",
            "batch_size",
            "threads",
            "layers",
            "vision_depth",
            "log_every",
            "vision_pretrain_batch",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config key embedded_lvlm.{name}: must be >= 1")
        if self.image_size % (self.patch_size * self.merge_size):
            raise ValueError(
                f"config key embedded_lvlm.image_size: {self.image_size} is not a multiple of "
                f"patch_size * merge_size = {self.patch_size * self.merge_size}"
            )

    @classmethod
    def from_dict(cls, d: dict | None) -> EmbeddedConfig:
        return _from_dict(cls, d, "embedded_lvlm")

    def to_dict(self) -> dict:
        return asdict(self)


#: The default recipe (what ``config/config.yaml`` trains).
DEFAULT: dict = EmbeddedConfig().to_dict()

#: A tiny configuration for tests and ``config/test.yaml``: trains in well under a minute on
#: 2 cores. It is too small and too short to reach the default's figures.
TEST_PRESET: dict = {
    "hidden_size": 32,
    "layers": 2,
    "heads": 2,
    "kv_heads": 1,
    "intermediate_size": 64,
    "vision_hidden": 16,
    "vision_depth": 1,
    "vision_heads": 2,
    "steps": 40,
    "batch_size": 8,
    "vision_pretrain_steps": 20,
    "vision_pretrain_batch": 16,
    "threads": 1,
    "max_demos": 2,
    "lr_warmup_steps": 5,
    "lr": 3e-3,
    "log_every": 10,
    "check": {"n_test": 24, "n_anchors": 6, "pool_size": 8, "batch_size": 16, "train_subset": 2000},
}

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_split(split: str) -> list[Example]:
    """easy-VQA ``train`` or ``eval`` (= its test split) through :func:`icdrl.data.load_dataset`."""
    from icdrl.data import load_dataset

    return list(load_dataset({"name": "easyvqa"}, split))


class ImageCache:
    """PIL images by path, loaded once (:func:`icdrl.data.load_image`), and their preprocessed tensors.

    :meth:`pixels` preprocesses every image once (stage 1 draws each training image about seven
    times, then the feature cache once more) and concatenates the stored rows: the same tensors
    as ``image_processor(images=[...])`` on those images (checked on the first chunk of each
    cache, and by ``tests/test_embedded.py``). :meth:`grids` keeps each image's
    ``image_grid_thw`` row after :meth:`drop_pixels` frees the pixels.
    """

    #: images per preprocessing call
    chunk = 128

    def __init__(self):
        self._images: dict = {}
        self._pixels: dict = {}  # path -> pixel_values rows [patches, channels * patch volume]
        self._grids: dict = {}  # path -> image_grid_thw row [3]

    def __call__(self, path: str):
        from icdrl.data import load_image

        im = self._images.get(path)
        if im is None:
            im = self._images[path] = load_image(path)
        return im

    def _preprocess(self, image_processor, paths: Sequence[str]) -> None:
        """Preprocess the images of ``paths`` that have no stored pixels, ``chunk`` per call."""
        import torch

        todo = list(dict.fromkeys(p for p in paths if p not in self._pixels))
        for i in range(0, len(todo), self.chunk):
            part = todo[i : i + self.chunk]
            out = image_processor(images=[self(p) for p in part], return_tensors="pt")
            grid = out["image_grid_thw"]
            rows = out["pixel_values"].split(grid.prod(-1).tolist())
            if not self._pixels and len(part) > 1:  # batching must not change an image's tensors
                alone = image_processor(images=[self(part[-1])], return_tensors="pt")
                if not (
                    torch.equal(alone["pixel_values"], rows[-1])
                    and torch.equal(alone["image_grid_thw"][0], grid[-1])
                ):
                    raise RuntimeError(
                        "batched image preprocessing differs from one image at a time"
                    )
            self._pixels.update(zip(part, rows))
            self._grids.update(zip(part, grid))

    def pixels(self, image_processor, paths: Sequence[str]) -> dict:
        """``pixel_values`` and ``image_grid_thw`` of ``image_processor`` for the images of ``paths``."""
        import torch

        self._preprocess(image_processor, paths)
        return {
            "pixel_values": torch.cat([self._pixels[p] for p in paths]),
            "image_grid_thw": torch.stack([self._grids[p] for p in paths]),
        }

    def grids(self, image_processor, paths: Sequence[str]):
        """``image_grid_thw`` [len(paths), 3] of the images of ``paths``."""
        import torch

        missing = [p for p in paths if p not in self._grids]
        if missing:
            self._preprocess(image_processor, missing)
        return torch.stack([self._grids[p] for p in paths])

    def drop_pixels(self) -> None:
        """Free the stored pixels (the grids stay)."""
        self._pixels.clear()


def vocabulary(examples: Sequence[Example]) -> list[str]:
    """The tokenizer's words: the prompt's own words, then every question and answer word, sorted."""
    import re

    prompt_words = [
        "Question",
        "Short",
        "answer",
        ":",
        "?",
        ".",
        ",",
        *recipe.VERBOSE_PREFIX.split(),
    ]
    words: set[str] = set()
    for ex in examples:
        for text in (ex.question, *ex.answers):
            words.update(re.findall(r"\w+|[^\w\s]", text))
    return [*prompt_words, *sorted(words - set(prompt_words))]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_processor(cfg: EmbeddedConfig, words: Sequence[str]):
    """Word-level tokenizer + PIL image processor (normalised around a white background)."""
    from icdrl.lvlm import qwen

    tok = qwen.build_word_tokenizer(words)
    image_proc = qwen.build_image_processor(
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
        image_size=cfg.image_size,
        image_mean=[1.0, 1.0, 1.0],  # white -> 0, so the background is silent
        image_std=[0.5, 0.5, 0.5],
    )
    return qwen.Qwen2_5_VLImageProcessor(
        image_processor=image_proc, tokenizer=tok, chat_template=qwen.QWEN_CHAT_TEMPLATE
    )


def build_model(cfg: EmbeddedConfig, tokenizer):
    """A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` (seed it before calling)."""
    from transformers.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from icdrl.lvlm import qwen

    config = qwen.tiny_qwen_config(
        tokenizer,
        hidden_size=cfg.hidden_size,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size,
        vision_hidden=cfg.vision_hidden,
        vision_depth=cfg.vision_depth,
        vision_heads=cfg.vision_heads,
        patch_size=cfg.patch_size,
        merge_size=cfg.merge_size,
    )
    # One attention window per image (Qwen's window is 4 merged tokens wide, 112 px at patch 14;
    # here 4 x 2 x 8 = 64 px): the vision tower then attends over whole images in every block.
    config.vision_config.window_size = cfg.image_size
    return Qwen2_5_VLForConditionalGeneration(config)


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Encoding and loss (the chat template and tokenisation of the backend)
# ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    inputs: dict  # processor output: input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
    positions: object  # LongTensor [M, 2]: (row, position) of each supervised token
    targets: object  # LongTensor [M]: the token at that position
    soft_rows: object  # LongTensor [Q]: index into positions of each query's first answer token
    soft_short: object  # LongTensor [Q]: the short form's first token
    soft_p: object  # FloatTensor [Q]: P(short) under the recipe
    is_query: object  # BoolTensor [M]: supervised token belongs to the query's answer


def encode_items(
    processor, items: Sequence[recipe.TrainItem], images: ImageCache, features: dict | None = None
) -> Batch:
    """Processor inputs and supervision for training items.

    The images' tensors come from ``images`` (each image preprocessed once), the text from
    :mod:`icdrl.lvlm.embedded_inputs`: together exactly ``processor(text=..., images=...,
    padding=True)`` plus the ``position_ids`` the model would compute from them.
    ``features`` (image path -> the vision tower's merged tokens, for a frozen tower): passed as
    ``mm_encoder_outputs`` in place of the pixels, exactly as the backend's feature cache does.

    Supervised tokens: every demonstration's answer (the words between ``Short answer:`` and the
    newline) and the assistant turn (answer, ``<|im_end|>``, newline). The query's first answer
    token gets a soft target: ``P(short)`` on the short answer's token, the rest on the verbose
    prefix's first token.
    """
    import torch

    from icdrl.lvlm.embedded_inputs import PromptRenderer, rope_positions, tokenize_prompts

    render = PromptRenderer(processor)
    texts = [render(it.demos, it.query, it.target) for it in items]
    paths = [ex.image for it in items for ex in (*it.demos, it.query)]
    if features is None:
        pixels = images.pixels(processor.image_processor, paths)
    else:
        pixels = {"image_grid_thw": images.grids(processor.image_processor, paths)}
    enc = {**tokenize_prompts(processor, texts, pixels["image_grid_thw"]), **pixels}
    tok = processor.tokenizer
    tid = tok.convert_tokens_to_ids
    short_, answer_, colon, nl = tid("Short"), tid("answer"), tid(":"), tid("\n")
    im_start, im_end, assistant = tid("<|im_start|>"), tid("<|im_end|>"), tid("assistant")
    verbose_first = tid(recipe.VERBOSE_PREFIX.split()[0])
    positions, targets, is_query, soft_rows, soft_short, soft_p = [], [], [], [], [], []
    for row, it in enumerate(items):
        ids = enc["input_ids"][row].tolist()
        n = int(enc["attention_mask"][row].sum())  # right padding
        # demonstration answers
        for j in range(2, n):
            if ids[j - 2] == short_ and ids[j - 1] == answer_ and ids[j] == colon:
                k = j + 1
                while k < n and ids[k] not in (nl, im_end):
                    positions.append((row, k))
                    targets.append(ids[k])
                    is_query.append(False)
                    k += 1
        # the assistant turn
        start = (
            max(
                j
                for j in range(2, n)
                if ids[j - 2] == im_start and ids[j - 1] == assistant and ids[j] == nl
            )
            + 1
        )
        soft_rows.append(len(positions))
        soft_short.append(tok(it.query.answer, add_special_tokens=False)["input_ids"][0])
        soft_p.append(it.p_short)
        for k in range(start, n):
            positions.append((row, k))
            targets.append(ids[k])
            is_query.append(True)
            if ids[k] == im_end:
                if k + 1 < n:
                    positions.append((row, k + 1))
                    targets.append(ids[k + 1])
                    is_query.append(True)
                break
        if verbose_first == soft_short[-1]:
            raise ValueError(
                f"answer {it.query.answer!r} starts with the verbose prefix's first word"
            )
    inputs = dict(enc)
    inputs["position_ids"] = rope_positions(
        enc["mm_token_type_ids"],
        enc["attention_mask"],
        enc["image_grid_thw"],
        processor.image_processor.merge_size,
    )
    if features is not None:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = [features[p] for p in paths]
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    return Batch(
        inputs=inputs,
        positions=torch.tensor(positions, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        soft_rows=torch.tensor(soft_rows, dtype=torch.long),
        soft_short=torch.tensor(soft_short, dtype=torch.long),
        soft_p=torch.tensor(soft_p, dtype=torch.float32),
        is_query=torch.tensor(is_query, dtype=torch.bool),
    )


def supervised_logprobs(model, batch: Batch):
    """Log-softmax rows [M, V] at the supervised positions (token t is predicted at t - 1)."""
    import torch

    logits = model(
        **batch.inputs, use_cache=False
    ).logits  # no key/value cache: one pass, same numbers
    rows, pos = batch.positions[:, 0], batch.positions[:, 1]
    return torch.log_softmax(logits[rows, pos - 1].float(), dim=-1)


def batch_loss(model, batch: Batch, verbose_first: int, first_token_weight: float = 1.0) -> tuple:
    """Weighted mean cross-entropy over supervised tokens.

    Each query's first answer token has a soft target (``P(short)`` on the short answer,
    the rest on the verbose prefix) and weight ``first_token_weight``; every other token weight 1.

    Returns ``(loss, stats)``; stats: ``demo_acc`` (argmax accuracy on demonstration answers),
    ``first_loss`` (soft cross-entropy at the query's first answer token).
    """
    import torch

    logp = supervised_logprobs(model, batch)
    nll = -logp.gather(1, batch.targets[:, None])[:, 0]
    first = logp[batch.soft_rows]
    soft = -(
        batch.soft_p * first.gather(1, batch.soft_short[:, None])[:, 0]
        + (1.0 - batch.soft_p) * first[:, verbose_first]
    )
    nll = nll.clone()
    nll[batch.soft_rows] = soft
    w = torch.ones_like(nll)
    w[batch.soft_rows] = float(first_token_weight)
    loss = (w * nll).sum() / w.sum()
    with torch.no_grad():
        demo = ~batch.is_query
        demo_acc = (
            (logp[demo].argmax(-1) == batch.targets[demo]).float().mean().item()
            if demo.any()
            else float("nan")
        )
    return loss, {"demo_acc": demo_acc, "first_loss": soft.mean().item()}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: EmbeddedConfig) -> float:
    """Linear warm-up for ``lr_warmup_steps``, then cosine decay to ``lr * min_lr_share``."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    t = (step - cfg.lr_warmup_steps) / max(cfg.steps - cfg.lr_warmup_steps, 1)
    lo = cfg.lr * cfg.min_lr_share
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * min(t, 1.0)))


def sample_batch(
    cfg: EmbeddedConfig, rng: random.Random, index: recipe.RecipeIndex, *, warmup: bool
) -> list[recipe.TrainItem]:
    """One main-training step's prompts: ``batch_size`` draws of the recipe under ``cfg``, all
    with the same number of demonstrations (drawn first, 0..``max_demos``)."""
    n_demos = rng.randint(0, cfg.max_demos)
    return [
        recipe.sample_item(
            rng,
            index,
            kind_weights=cfg.kind_weights,
            max_demos=cfg.max_demos,
            similar_share=cfg.similar_share,
            cue_exact=cfg.cue_exact,
            cue_kind=cfg.cue_kind,
            balance_yesno=cfg.balance_yesno,
            balance_yesno_queries=cfg.balance_yesno_queries,
            answer_match_share=cfg.answer_match_share,
            warmup=warmup,
            n_demos=n_demos,
        )
        for _ in range(cfg.batch_size)
    ]


def image_labels(train: Sequence[Example]) -> dict[str, tuple[int, int]]:
    """Per training image: (colour index, shape index) from its colour and shape questions' answers.

    -1 where the image has no question of that kind. Only training answers are used.
    """
    labels: dict[str, list[int]] = {}
    for ex in train:
        lab = labels.setdefault(ex.image, [-1, -1])
        kind = recipe.answer_kind(ex.answer)
        if kind == "colour":
            lab[0] = recipe.COLOURS.index(ex.answer.strip().lower())
        elif kind == "shape":
            lab[1] = recipe.SHAPES.index(ex.answer.strip().lower())
    return {k: (v[0], v[1]) for k, v in labels.items() if v != [-1, -1]}


def pretrain_vision(
    model,
    processor,
    train: Sequence[Example],
    c: EmbeddedConfig,
    rng: random.Random,
    images: ImageCache,
) -> list[dict]:
    """Stage 1: align the vision tower's output with the words for what the image shows.

    A real LVLM starts from a pretrained vision encoder whose output a projector maps into the
    language model's word-embedding space (LLaVA's alignment stage). Trained jointly from
    scratch, this tiny model's language model learns to ignore the random vision tokens before
    they say anything (the vision gradient vanishes within a few steps; accuracy stays at
    chance). So first the vision tower (merger included) is trained so that the mean of an
    image's merged tokens points, by cosine, at the language model's own embedding of the
    image's colour word and of its shape word (temperature 0.1, cross-entropy over the 8 colour
    and the 3 shape words). Labels are the answers of the training split's colour and shape
    questions about each image; the word embeddings (tied input/output) train too. A "red"
    in a question and a red shape in an image then start out as the same direction, which is
    what the yes/no questions have to compare. Returns one metrics row per logged step.
    """
    import torch

    from icdrl.lvlm.vision_segments import batched_segments

    labels = image_labels(train)
    paths = sorted(labels)
    if not paths or c.vision_pretrain_steps <= 0:
        return []
    vis = model.model.visual
    embed = model.get_input_embeddings()
    tok = processor.tokenizer
    col_ids = torch.tensor(tok.convert_tokens_to_ids(list(recipe.COLOURS)))
    shp_ids = torch.tensor(tok.convert_tokens_to_ids(list(recipe.SHAPES)))
    params = [*vis.parameters(), embed.weight]
    opt = torch.optim.AdamW(params, lr=c.lr)
    rows = []
    for step in range(c.vision_pretrain_steps):
        batch = [paths[rng.randrange(len(paths))] for _ in range(c.vision_pretrain_batch)]
        enc = images.pixels(processor.image_processor, batch)
        with batched_segments(model):
            pooled = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
        pooled = torch.nn.functional.normalize(
            pooled.view(len(batch), -1, pooled.shape[-1]).mean(1), dim=-1
        )
        words = torch.nn.functional.normalize(embed.weight, dim=-1)
        col_logits = pooled @ words[col_ids].T / 0.1
        shp_logits = pooled @ words[shp_ids].T / 0.1
        col = torch.tensor([labels[p][0] for p in batch])
        shp = torch.tensor([labels[p][1] for p in batch])
        loss = torch.nn.functional.cross_entropy(
            col_logits, col, ignore_index=-1
        ) + torch.nn.functional.cross_entropy(shp_logits, shp, ignore_index=-1)
        for g in opt.param_groups:
            g["lr"] = c.lr * min(1.0, (step + 1) / max(c.lr_warmup_steps, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        if step % c.log_every == 0 or step == c.vision_pretrain_steps - 1:
            with torch.no_grad():
                ok_c = (col_logits.argmax(-1) == col)[col >= 0].float().mean().item()
                ok_s = (shp_logits.argmax(-1) == shp)[shp >= 0].float().mean().item()
            log.info(
                "vision pretrain step %d/%d loss %.4f colour acc %.2f shape acc %.2f",
                step,
                c.vision_pretrain_steps,
                loss.item(),
                ok_c,
                ok_s,
            )
            rows.append(
                {"step": step, "loss": float(loss.item()), "colour_acc": ok_c, "shape_acc": ok_s}
            )
    return rows


def vision_features(
    model, processor, paths: Sequence[str], images: ImageCache, batch_size: int = 128
) -> dict:
    """Image path -> the vision tower's merged tokens [n_tokens, hidden] (no gradient)."""
    import torch

    from icdrl.lvlm.vision_segments import batched_segments

    out: dict = {}
    with torch.no_grad(), batched_segments(model):
        for i in range(0, len(paths), batch_size):
            chunk = list(paths[i : i + batch_size])
            enc = images.pixels(processor.image_processor, chunk)
            feats = model.model.get_image_features(
                enc["pixel_values"], enc["image_grid_thw"]
            ).pooler_output
            out.update(zip(chunk, (f.detach() for f in feats)))
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out`` (an existing ``out`` is removed first)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train_embedded(cfg: dict, out_dir: str, *, callback=None) -> None:
    """Train the embedded LVLM with config section ``cfg``; write an HF checkpoint folder ``out_dir``.

    Every batch holds prompts with the same number of demonstrations (uniform in
    0..``max_demos``; 0 in the warm-up), so no compute goes to padding. ``callback(step, model,
    processor)``, if given, runs every ``log_every`` steps (diagnostics; it must not train).
    The folder (model, processor, ``embedded_config.json``, ``train_metrics.csv``,
    ``train_summary.json``) is built in a temporary sibling folder and renamed at the end, so a
    failed run leaves no partial checkpoint.
    """
    import torch
    from tqdm.auto import tqdm

    c = EmbeddedConfig.from_dict(cfg)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(c.threads))
    seed_everything(c.seed)
    t_start, cpu_start = time.time(), time.process_time()

    train = load_split("train")
    if c.train_limit:
        train = train[: int(c.train_limit)]
    index = recipe.RecipeIndex(train)
    processor = build_processor(c, vocabulary(train))
    model = build_model(c, processor.tokenizer)
    model.train()
    log.info(
        "embedded LVLM: %.3f M parameters (vision %.3f M), %d training questions, %d steps x batch %d",
        n_parameters(model) / 1e6,
        n_parameters(model.model.visual) / 1e6,
        len(train),
        c.steps,
        c.batch_size,
    )
    rng = random.Random(c.seed)
    images = ImageCache()
    vision_rows = pretrain_vision(model, processor, train, c, rng, images)
    features = None
    if c.freeze_vision:
        model.model.visual.requires_grad_(False)
        model.model.visual.eval()
        features = vision_features(model, processor, sorted({ex.image for ex in train}), images)
        images.drop_pixels()  # stage 2 reads the features
        log.info("vision tower frozen; features of %d training images cached", len(features))
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay
    )
    verbose_first = processor.tokenizer.convert_tokens_to_ids(recipe.VERBOSE_PREFIX.split()[0])
    n_warm = int(round(c.warmup_share * c.steps))
    rows = []
    bar = tqdm(range(c.steps), desc="train embedded LVLM", mininterval=5.0, file=sys.stderr)
    for step in bar:
        items = sample_batch(c, rng, index, warmup=step < n_warm)
        batch = encode_items(processor, items, images, features)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, c)
        loss, stats = batch_loss(model, batch, verbose_first, c.first_token_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], c.grad_clip
        )
        opt.step()
        loss_v = float(loss.item())
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"embedded LVLM training: non-finite loss at step {step}")
        elapsed = (
            time.time() - t_start
        )  # reported only: it decides nothing (every machine trains every step)
        rows.append(
            {
                "step": step,
                "loss": loss_v,
                "first_loss": stats["first_loss"],
                "demo_acc": stats["demo_acc"],
                "grad_norm": float(gnorm),
                "lr": lr_at(step, c),
                "elapsed_s": round(elapsed, 2),
            }
        )
        bar.set_postfix(loss=f"{loss_v:.3f}", demo_acc=f"{stats['demo_acc']:.2f}", refresh=False)
        if step % c.log_every == 0 or step == c.steps - 1:
            log.info(
                "step %d/%d loss %.4f first %.4f demo_acc %.3f lr %.2e %.0fs",
                step,
                c.steps,
                loss_v,
                stats["first_loss"],
                stats["demo_acc"],
                lr_at(step, c),
                elapsed,
            )
            if callback is not None:
                model.eval()
                callback(step, model, processor)
                model.train()
    bar.close()
    model.eval()

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "embedded_config.json").write_text(json.dumps(c.to_dict(), indent=1) + "\n")
        with open(tmp / "train_metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        summary = {
            "parameters": n_parameters(model),
            "vision_parameters": n_parameters(model.model.visual),
            "steps_done": len(rows),
            "steps": c.steps,
            "wall_s": round(time.time() - t_start, 1),
            "cpu_s": round(
                time.process_time() - cpu_start, 1
            ),  # all threads; wall > cpu/threads = contention
            "threads": int(c.threads),
            "vision_pretrain": vision_rows[-1] if vision_rows else None,
            "final_loss_mean_last_25": float(np.mean([r["loss"] for r in rows[-25:]])),
        }
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("embedded LVLM written to %s (%.0f s)", out, time.time() - t_start)


# ---------------------------------------------------------------------------------------------
# The in-context check
# ---------------------------------------------------------------------------------------------

#: Accuracy figures of the check (keys of ``icl_check.json``), in reporting order.
SETTINGS = ("zero_shot", "random_1", "random_4", "similar_1", "similar_4")
#: The issue's targets, evaluated in ``icl_check.json["targets"]`` (never relaxed here).
TARGETS = {
    "similar_4_min": 0.85,  # 4-shot similarity accuracy
    "zero_shot_gap_min": 0.30,  # similar_4 - zero_shot
    "random_1_gap_min": 0.10,  # similar_1 - random_1
    "infoscore_spread_share_min": 0.5,
}


def embed_examples(
    model_dir: str, examples: Sequence[Example], *, batch_size: int = 64
) -> np.ndarray:
    """docs/science.md §2 embeddings from the LVLM itself, float32 [N, d], L2-normalised rows.

    The L2-normalised mean of the image embedding (mean of the vision tower's merged tokens)
    and the question embedding (mean of the question's input-token embeddings), both
    L2-normalised first: exactly the pipeline's ``lvlm`` encoder
    (:func:`icdrl.embeddings.encode_lvlm` + :func:`icdrl.embeddings.combine`), so that the
    check's similarity retrieval is the workflow's.
    """
    from icdrl.embeddings import combine, encode_lvlm

    img, txt = encode_lvlm(examples, str(model_dir), batch_size=batch_size)
    return combine(img, txt)


def similar_demos(query_emb: np.ndarray, train_emb: np.ndarray, k: int) -> list[np.ndarray]:
    """Per query, the rows of the ``k`` most cosine-similar train examples, most similar *last*.

    docs/science.md §8: the most similar demonstration sits nearest the query.
    """
    from icdrl.pools import top_k

    out = []
    for q in query_emb:
        sims = (train_emb @ q).astype(np.float64)
        out.append(top_k(sims, k)[::-1].copy())
    return out


def _accuracy(preds: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    from icdrl.metrics import vqa_accuracy

    return np.array(
        [vqa_accuracy(p, ex.answers) for p, ex in zip(preds, examples)], dtype=np.float64
    )


def _text_prior(train: Sequence[Example]) -> dict[str, str]:
    """The most frequent training answer of every question text (the answer without the image)."""
    from collections import Counter, defaultdict

    by_q: dict[str, Counter] = defaultdict(Counter)
    for ex in train:
        by_q[ex.question][ex.answer] += 1
    return {q: c.most_common(1)[0][0] for q, c in by_q.items()}


def _model_cfg(batch_size: int) -> dict:
    return {
        "name": "embedded",
        "kind": "embedded",
        "device": "cpu",
        "dtype": "float32",
        "batch_size": int(batch_size),
        "max_new_tokens": 10,
    }


def infoscore_spread(
    backend, anchors: Sequence[Example], pools: Sequence[Sequence[Example]]
) -> dict:
    """Single-step InfoScore of every pool item (docs/science.md §4 with S = ∅) and its spread per anchor.

    ``InfoScore(c) = P(a | c, q) - P(a | q)``; spread = best item's InfoScore minus the pool's
    median. Returns per-anchor arrays ``spread``, ``best``, ``median``, ``p0`` and the gains
    grouped by the item's match level (``exact`` / ``kind`` / ``none`` template match).
    """
    from icdrl.lvlm.base import answer_prob

    prompts, answers = [], []
    for a, pool in zip(anchors, pools):
        prompts.append(((), a))
        answers.append(a.answer)
        for c in pool:
            prompts.append(((c,), a))
            answers.append(a.answer)
    probs = answer_prob(backend, prompts, answers)
    spread, best, median, p0 = [], [], [], []
    by_level: dict[str, list[float]] = {"exact": [], "kind": [], "none": []}
    i = 0
    for a, pool in zip(anchors, pools):
        base = probs[i]
        gains = probs[i + 1 : i + 1 + len(pool)] - base
        i += 1 + len(pool)
        p0.append(base)
        best.append(float(gains.max()))
        median.append(float(np.median(gains)))
        spread.append(best[-1] - median[-1])
        for c, g in zip(pool, gains):
            by_level[recipe.match_level(c, a)].append(float(g))
    return {
        "spread": np.array(spread),
        "best": np.array(best),
        "median": np.array(median),
        "p0": np.array(p0),
        "by_level": by_level,
    }


class _PhaseClock:
    """Wall and process-CPU seconds of consecutive named phases (the check's log and JSON)."""

    def __init__(self):
        self.phases: dict[str, dict[str, float]] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> str:
        """End phase ``name`` now; returns "wall W s, cpu C s" for the log."""
        t, c = time.perf_counter(), time.process_time()
        self.phases[name] = {"wall": round(t - self._t, 1), "cpu": round(c - self._c, 1)}
        self._t, self._c = t, c
        return f"wall {self.phases[name]['wall']:.1f} s, cpu {self.phases[name]['cpu']:.1f} s"


def icl_check(model_dir: str, cfg: dict, out_json: str, *, threads: int | None = None) -> dict:
    """Competence and demonstration sensitivity of the embedded LVLM; writes ``out_json``.

    Through the shared backend (``icdrl.lvlm.load_backend``): accuracy on ``check.n_test``
    seeded easy-VQA test questions zero-shot, with 1 and 4 random training demonstrations and
    with 1 and 4 similarity-retrieved ones (cosine of :func:`embed_examples`, most similar
    nearest the query); and, for ``check.n_anchors`` seeded training anchors with random pools
    of ``check.pool_size``, the share of anchors whose best single-step InfoScore exceeds the
    pool median by ``check.spread_threshold``. Keys: :data:`SETTINGS`,
    ``infoscore_spread_share``, plus ``detail`` (per answer kind, answer form, InfoScore by match
    level), ``targets`` (the issue's targets and whether each is met) and ``settings``.
    """
    import torch

    from icdrl.data import seeded_subset
    from icdrl.lvlm import load_backend
    from icdrl.pools import build_pools
    from icdrl.records import atomic_path

    c = EmbeddedConfig.from_dict(cfg)
    ck = c.check
    # the job's threads where a workflow runs it beside other jobs (more would oversubscribe the cores)
    torch.set_num_threads(int(c.threads if threads is None else threads))
    t0 = time.time()
    clock = _PhaseClock()
    backend = load_backend(_model_cfg(ck.batch_size), str(model_dir))
    train, test = load_split("train"), load_split("eval")
    if ck.train_subset is not None:
        train = seeded_subset(train, int(ck.train_subset), ck.seed)
    queries = seeded_subset(test, ck.n_test, ck.seed)
    log.info(
        "icl_check: embedding %d train and %d test examples (loaded in %s)",
        len(train),
        len(queries),
        clock.lap("load"),
    )
    train_emb = embed_examples(model_dir, train)
    query_emb = embed_examples(model_dir, queries)
    log.info("icl_check: embedded (%s)", clock.lap("embed"))

    demos: dict[str, list[tuple[Example, ...]]] = {"zero_shot": [() for _ in queries]}
    for k in (1, 4):
        rng = np.random.default_rng([ck.seed, 17, k])
        demos[f"random_{k}"] = [
            tuple(train[i] for i in rng.choice(len(train), size=k, replace=False)) for _ in queries
        ]
        demos[f"similar_{k}"] = [
            tuple(train[i] for i in rows) for rows in similar_demos(query_emb, train_emb, k)
        ]

    kinds = np.array([recipe.answer_kind(q.answer) for q in queries])
    prior = _text_prior(train)
    against = np.array(
        [
            recipe.answer_kind(q.answer) == "yesno" and prior.get(q.question, q.answer) != q.answer
            for q in queries
        ]
    )
    result: dict = {}
    detail: dict = {
        "by_kind": {},
        "short_form_share": {},
        "yesno_against_text_prior": {},
        "n_by_kind": {k: int((kinds == k).sum()) for k in recipe.KINDS},
        "n_yesno_against_text_prior": int(against.sum()),
        "examples": {},
    }
    for name in SETTINGS:
        gens = backend.generate([(d, q) for d, q in zip(demos[name], queries)])
        acc = _accuracy([g.answer for g in gens], queries)
        result[name] = float(acc.mean())
        detail["by_kind"][name] = {
            k: float(acc[kinds == k].mean()) if (kinds == k).any() else None for k in recipe.KINDS
        }
        detail["short_form_share"][name] = float(
            np.mean([not g.answer.startswith(recipe.VERBOSE_PREFIX) for g in gens])
        )
        detail["yesno_against_text_prior"][name] = (
            float(acc[against].mean()) if against.any() else None
        )
        detail["examples"][name] = [
            {"question": q.question, "answer": q.answer, "prediction": g.raw}
            for q, g in list(zip(queries, gens))[:5]
        ]
        log.info(
            "icl_check %-10s accuracy %.3f %s (%s)",
            name,
            result[name],
            detail["by_kind"][name],
            clock.lap(name),
        )

    anchors = seeded_subset(train, ck.n_anchors, ck.seed + 1)
    by_id = {ex.id: ex for ex in train}
    pool_recs = build_pools(
        anchors, train, sampler="random", size=ck.pool_size, seed=ck.seed, role="anchors"
    )
    pools = [[by_id[i] for i in rec.pool] for rec in pool_recs]
    spread = infoscore_spread(backend, anchors, pools)
    result["infoscore_spread_share"] = float(np.mean(spread["spread"] >= ck.spread_threshold))
    log.info(
        "icl_check infoscore spread share %.3f over %d anchors x %d (%s)",
        result["infoscore_spread_share"],
        len(anchors),
        ck.pool_size,
        clock.lap("infoscore_spread"),
    )
    detail["infoscore"] = {
        "spread_mean": float(spread["spread"].mean()),
        "spread_median": float(np.median(spread["spread"])),
        "best_gain_mean": float(spread["best"].mean()),
        "median_gain_mean": float(spread["median"].mean()),
        "zero_shot_prob_mean": float(spread["p0"].mean()),
        "gain_mean_by_match_level": {
            k: (float(np.mean(v)) if v else None) for k, v in spread["by_level"].items()
        },
        "n_by_match_level": {k: len(v) for k, v in spread["by_level"].items()},
        "spread_by_anchor": [
            float(v) for v in spread["spread"]
        ],  # anchor order; for intervals of the share
    }
    targets = {
        "similar_4": [
            result["similar_4"],
            TARGETS["similar_4_min"],
            result["similar_4"] >= TARGETS["similar_4_min"],
        ],
        "similar_4_minus_zero_shot": [
            result["similar_4"] - result["zero_shot"],
            TARGETS["zero_shot_gap_min"],
            result["similar_4"] - result["zero_shot"] >= TARGETS["zero_shot_gap_min"],
        ],
        "similar_1_minus_random_1": [
            result["similar_1"] - result["random_1"],
            TARGETS["random_1_gap_min"],
            result["similar_1"] - result["random_1"] >= TARGETS["random_1_gap_min"],
        ],
        "infoscore_spread_share": [
            result["infoscore_spread_share"],
            TARGETS["infoscore_spread_share_min"],
            result["infoscore_spread_share"] >= TARGETS["infoscore_spread_share_min"],
        ],
    }
    out = {
        **result,
        "targets": {
            k: {"value": v, "target": t, "met": bool(m)} for k, (v, t, m) in targets.items()
        },
        "all_targets_met": all(m for _, _, m in targets.values()),
        "detail": detail,
        "settings": {
            "model_dir": str(model_dir),
            "check": asdict(ck),
            "n_train": len(train),
            "n_test_split": len(test),
            "wall_s": round(time.time() - t0, 1),
            "phase_s": clock.phases,
        },
    }
    for key in (*SETTINGS, "infoscore_spread_share"):
        if not (0.0 <= out[key] <= 1.0) or not math.isfinite(out[key]):
            raise ValueError(f"icl_check: {key} = {out[key]} is not in [0, 1]")
    out_path = Path(out_json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(out, indent=1) + "\n")
    log.info("icl_check written to %s (%.0f s)", out_path, time.time() - t0)
    return out


def format_check(res: dict) -> str:
    """A short human-readable table of an ``icl_check`` result."""
    lines = [f"{'setting':<24}{'accuracy':>9}"]
    for k in SETTINGS:
        lines.append(f"{k:<24}{res[k]:>9.3f}")
    lines.append(f"{'infoscore_spread_share':<24}{res['infoscore_spread_share']:>9.3f}")
    for name, t in res.get("targets", {}).items():
        lines.append(
            f"target {name}: {t['value']:.3f} (>= {t['target']}) {'met' if t['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


def main_icl_check(argv: Sequence[str] | None = None) -> int:
    """``icdrl icl-check MODEL_DIR [--config YAML] [--preset default|test] [--out JSON]``."""
    parser = argparse.ArgumentParser(
        prog="icdrl icl-check",
        description="Accuracy of the embedded LVLM zero-shot and with random / similar demonstrations, "
        "and the spread of InfoScore over anchors' pools; writes icl_check.json.",
    )
    parser.add_argument("model_dir", help="the trained embedded LVLM's checkpoint folder")
    parser.add_argument(
        "--config", help="a workflow config YAML; its embedded_lvlm section is used"
    )
    parser.add_argument(
        "--preset",
        choices=("default", "test"),
        default=None,
        help="use a built-in embedded_lvlm preset instead of --config",
    )
    parser.add_argument(
        "--out", help="output JSON (default: icl_check.json beside the model folder)"
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.config and args.preset:
        parser.error("give --config or --preset, not both")
    cfg: dict = {}
    if args.config:
        import yaml

        with open(args.config) as fh:
            doc = yaml.safe_load(fh) or {}
        if not isinstance(doc, dict):
            parser.error(f"{args.config}: not a YAML mapping")
        cfg = doc.get("embedded_lvlm") or {}
    elif args.preset == "test":
        cfg = TEST_PRESET
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        parser.error(f"{model_dir}: not a checkpoint folder (no config.json)")
    out = args.out or str(model_dir.parent / "icl_check.json")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    res = icl_check(str(model_dir), cfg, out)
    print(format_check(res))
    print(f"written: {out}")
    return 0
