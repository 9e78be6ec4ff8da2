"""Stage 2: one vector per example (docs/science.md §2), cached per dataset split in an ``.npz`` file.

The file holds ``ids`` (int64 [N]), ``img`` and ``txt`` (float32 [N, d], each row
L2-normalised: image-only and question-only embeddings, used by the ``image_sim`` and
``text_sim`` samplers) and ``emb`` = L2-normalise(mean(img, txt)), the vector of the
``random``/``mix`` samplers, similarity retrieval and the selector.

Encoders (config ``embeddings.encoder``):

* ``clip``: a CLIP model from a local folder (``embeddings.clip_path``) through transformers:
  image features of the PIL image processor's pixels and text features of the question. Only
  the PIL image processor is used (the fast one needs torchvision).
* ``lvlm``: the LVLM itself (the embedded one by default): the mean of its vision tower's merged
  output tokens per image, and the mean of the question's input-token embeddings.

Images shared by several questions (VQA) are encoded once.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from icdrl.data import Example, load_image
from icdrl.records import atomic_path, corrupt_file_error

log = logging.getLogger(__name__)

ENCODERS = ("lvlm", "clip")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero (never NaN)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def combine(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """docs/science.md §2: L2-normalised mean of the L2-normalised image and question embeddings."""
    return l2_normalize((l2_normalize(img) + l2_normalize(txt)) / 2.0)


@dataclass
class EmbeddingTable:
    """An embeddings file in memory, indexed by example id.

    The one table of the package: pools, retrieval and evaluation read ``emb``/``img``/``txt``
    as numpy; the selector's training gathers rows of :attr:`tensor`.
    """

    ids: np.ndarray
    emb: np.ndarray
    img: np.ndarray | None = None
    txt: np.ndarray | None = None
    path: str = "<memory>"
    _rows: dict[int, int] = field(default_factory=dict, repr=False)
    _tensor: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self._rows = {int(i): r for r, i in enumerate(self.ids)}
        if len(self._rows) != len(self.ids):
            raise ValueError(f"{self.path}: duplicate ids in the embeddings file")
        for name in ("emb", "img", "txt"):
            a = getattr(self, name)
            if a is None:
                continue
            if a.ndim != 2 or a.shape[0] != len(self.ids):
                raise ValueError(
                    f"{self.path}: {name} has shape {a.shape}, expected [{len(self.ids)}, d]"
                )
            if not np.isfinite(a).all():
                raise ValueError(f"{self.path}: {name} holds non-finite values")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingTable:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: embeddings file not found")
        try:
            z = np.load(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise corrupt_file_error(path, e) from None
        with z:
            for need in ("ids", "emb"):
                if need not in z:
                    raise ValueError(f"{path}: embeddings file lacks the array {need!r}")
            try:
                return cls(
                    ids=z["ids"],
                    emb=z["emb"].astype(np.float32),
                    img=z["img"].astype(np.float32) if "img" in z else None,
                    txt=z["txt"].astype(np.float32) if "txt" in z else None,
                    path=str(path),
                )
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise corrupt_file_error(path, e) from None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, ex_id: int) -> bool:
        return int(ex_id) in self._rows

    def row(self, ex_id: int, what: str = "") -> int:
        """Row index of example ``ex_id``; ``what`` (e.g. "anchor") names it in the error."""
        try:
            return self._rows[int(ex_id)]
        except KeyError:
            raise KeyError(
                f"{self.path}: {what + ' ' if what else ''}id {ex_id} has no embedding"
            ) from None

    def rows(self, ids: Sequence[int], what: str = "") -> np.ndarray:
        return np.array([self.row(i, what) for i in ids], dtype=np.int64)

    @property
    def row_of(self) -> Mapping[int, int]:
        """The read-only mapping example id → row."""
        return MappingProxyType(self._rows)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    @property
    def tensor(self):
        """``emb`` as a float32 torch tensor (made once, sharing memory with ``emb`` where it can):
        the selector's training gathers its batches from it."""
        if self._tensor is None:
            import torch

            self._tensor = torch.from_numpy(np.ascontiguousarray(self.emb, dtype=np.float32))
        return self._tensor

    def _array(self, kind: str) -> np.ndarray:
        a = getattr(self, kind, None) if kind in ("emb", "img", "txt") else None
        if a is None:
            raise ValueError(f"{self.path}: no {kind!r} embeddings (kinds: emb, img, txt)")
        return a

    def vectors(self, ids: Sequence[int], kind: str = "emb") -> np.ndarray:
        """[len(ids), d] vectors of ``kind`` (emb / img / txt) in the order of ``ids``."""
        return self._array(kind)[self.rows(ids)]

    def vector(self, ex_id: int, kind: str = "emb") -> np.ndarray:
        return self._array(kind)[self.row(ex_id)]


def save_embeddings(
    path: str | os.PathLike, ids: Sequence[int], img: np.ndarray, txt: np.ndarray
) -> EmbeddingTable:
    """Write ``ids, img, txt, emb`` atomically (rows normalised here); returns the table."""
    img, txt = l2_normalize(img), l2_normalize(txt)
    table = EmbeddingTable(
        ids=np.asarray(ids, dtype=np.int64), emb=combine(img, txt), img=img, txt=txt, path=str(path)
    )
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=table.ids, emb=table.emb, img=table.img, txt=table.txt)
    return table


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


def _unique_images(examples: Sequence[Example]) -> tuple[list[str], np.ndarray]:
    """Distinct image paths in first-seen order and, per example, the index of its image."""
    index: dict[str, int] = {}
    which = np.array([index.setdefault(ex.image, len(index)) for ex in examples], dtype=np.int64)
    return list(index), which


def _batches(n: int, size: int):
    size = max(int(size), 1)
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _torch_dtype(name: str | None):
    import torch

    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        None: torch.float32,
    }[name]


def encode_clip(
    examples: Sequence[Example], clip_path: str, *, batch_size: int = 64, device: str = "cpu"
):
    """(img, txt) CLIP features of every example's image and question, float32 [N, d] each."""
    import torch
    from transformers import AutoTokenizer, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if not clip_path or not Path(clip_path).is_dir():
        raise FileNotFoundError(f"embeddings.clip_path: {clip_path!r} is not a local CLIP folder")
    model = CLIPModel.from_pretrained(clip_path).to(device).eval()
    image_proc = CLIPImageProcessorPil.from_pretrained(clip_path)
    tok = AutoTokenizer.from_pretrained(clip_path)
    max_len = int(model.config.text_config.max_position_embeddings)
    paths, which = _unique_images(examples)
    img_feats, txt_feats = [], []
    with torch.inference_mode():
        for sl in _batches(len(paths), batch_size):
            px = image_proc(images=[load_image(p) for p in paths[sl]], return_tensors="pt")[
                "pixel_values"
            ]
            out = model.get_image_features(pixel_values=px.to(device))
            img_feats.append(out.pooler_output.float().cpu().numpy())
        questions = [ex.question for ex in examples]
        for sl in _batches(len(questions), batch_size):
            enc = tok(
                questions[sl],
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            out = model.get_text_features(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
            )
            txt_feats.append(out.pooler_output.float().cpu().numpy())
    return np.concatenate(img_feats)[which], np.concatenate(txt_feats)


def encode_lvlm(
    examples: Sequence[Example],
    model_path: str,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str | None = "float32",
):
    """(img, txt) from a Qwen2.5-VL checkpoint: mean merged vision tokens, mean question-token embeddings."""
    import torch
    from transformers import AutoModelForImageTextToText

    from icdrl.lvlm.hf import load_processor  # torchvision-free, hub-layout folders included
    from icdrl.lvlm.vision_segments import batched_segments  # same features, fewer attention calls

    if not model_path or not Path(model_path).is_dir():
        raise FileNotFoundError(f"model path {model_path!r} is not a checkpoint folder")
    proc = load_processor(model_path)
    model = (
        AutoModelForImageTextToText.from_pretrained(model_path, dtype=_torch_dtype(dtype))
        .to(device)
        .eval()
    )
    paths, which = _unique_images(examples)
    img_feats, txt_feats = [], []
    embed = model.get_input_embeddings()
    with torch.inference_mode(), batched_segments(model):
        for sl in _batches(len(paths), batch_size):
            enc = proc.image_processor(
                images=[load_image(p) for p in paths[sl]], return_tensors="pt"
            )
            out = model.get_image_features(
                enc["pixel_values"].to(device), enc["image_grid_thw"].to(device)
            )
            img_feats += [t.float().mean(0).cpu().numpy() for t in out.pooler_output]
        questions = [ex.question for ex in examples]
        for sl in _batches(len(questions), batch_size):
            enc = proc.tokenizer(
                questions[sl], padding=True, add_special_tokens=False, return_tensors="pt"
            )
            ids, mask = (
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device).unsqueeze(-1).float(),
            )
            e = embed(ids).float()
            txt_feats.append(((e * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu().numpy())
    return np.stack(img_feats)[which], np.concatenate(txt_feats)


def compute_embeddings(
    examples: Sequence[Example],
    emb_cfg: dict,
    model_cfg: dict | None = None,
    model_path: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(img, txt) raw features of ``examples`` with the encoder named in ``emb_cfg``."""
    encoder = emb_cfg.get("encoder", "lvlm")
    batch_size = int(emb_cfg.get("batch_size", 64))
    model_cfg = model_cfg or {}
    device = model_cfg.get("device", "cpu")
    if encoder == "clip":
        return encode_clip(examples, emb_cfg.get("clip_path"), batch_size=batch_size, device=device)
    if encoder == "lvlm":
        return encode_lvlm(
            examples,
            model_path or model_cfg.get("path"),
            batch_size=batch_size,
            device=device,
            dtype=model_cfg.get("dtype", "float32"),
        )
    raise ValueError(f"embeddings.encoder must be one of {ENCODERS}, got {encoder!r}")


def embed_split(
    dataset_cfg: dict, split: str, emb_cfg: dict, model_cfg: dict, model_path, out_path
) -> None:
    """Embed every example of ``split`` and write the ``.npz`` (``ids, img, txt, emb``)."""
    from icdrl.data import load_dataset

    examples = load_dataset(dataset_cfg, split)
    if not examples:
        raise ValueError(f"dataset split {split!r} is empty")
    log.info(
        "embedding %d %s examples with encoder %s",
        len(examples),
        split,
        emb_cfg.get("encoder", "lvlm"),
    )
    img, txt = compute_embeddings(examples, emb_cfg, model_cfg, model_path)
    save_embeddings(out_path, [ex.id for ex in examples], img, txt)
