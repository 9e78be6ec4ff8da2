"""Examples and datasets (docs/science.md §2).

Two sources, selected by the ``dataset`` config section (docs/ARCHITECTURE.md):

* ``{name: easyvqa}`` — the ``easy-vqa`` PyPI package (train 38,575 / test 9,673 questions on
  64×64 PNGs, one answer each); split ``eval`` is its test split. Nothing is downloaded.
* ``{name: vqa, label: okvqa, train: {...}, eval: {...}}`` — the official VQA format used by
  OK-VQA and VQAv2: a questions JSON, an annotations JSON (10 answers per question) and a COCO
  image folder holding ``<image_prefix><12-digit image id>.jpg``.

Either split section may add ``subset: N`` and ``subset_seed: S`` for a seeded subset.
Loading never decodes an image (``Example.image`` is a path; see :func:`load_image`), and any
missing file, folder, image or field fails at load time with one line naming the config key and
the path; nothing half-loads.

**Empty text.** A question whose text is empty or whitespace-only, or whose every annotator
answer is, is refused with one line naming the question id and the file (there is nothing to ask
or no target answer). A question where only *some* annotator answers are empty is refused too,
by default: the official VQA evaluator (GT-Vision-Lab ``vqaEval.py``) strips each reference and
keeps an empty one as a reference like any other, so a prediction that normalises to nothing
(``"the"``, ``"a a"``) matches it and earns credit (0.3 with one empty answer among ten) — credit
for saying nothing, which would reward degenerate answers in every stage here. A dataset that has
such answers can set ``dataset.<split>.empty_answers: drop``: the empty answers are then dropped
from ``Example.answers`` (accuracy is computed over the remaining ones, a documented difference
from the official evaluator on exactly those questions), and the number of answers and questions
dropped is logged at load time (WARNING, ``icdrl.data``). easy-VQA has one answer per question,
never empty (an empty one is refused).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def majority_answer(answers: Sequence[str]) -> str:
    """Most frequent answer; ties go to the one seen first."""
    if not answers:
        raise ValueError("an example needs at least one answer")
    counts = Counter(answers)
    best = max(counts.values())
    for a in answers:
        if counts[a] == best:
            return a
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Example:
    id: int
    image: str
    question: str
    answers: tuple[str, ...]
    answer: str
    image_id: str = ""
    qtype: str = ""


class DatasetError(ValueError):
    """A missing or malformed dataset input; the message is one line naming the key and the path."""


SPLITS = ("train", "eval")
DATASET_NAMES = ("easyvqa", "vqa")
EMPTY_ANSWERS = ("error", "drop")  # dataset.<split>.empty_answers (module docstring)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def load_image(path: str):
    """The image at ``path`` as an RGB ``PIL.Image`` (LRU-cached in process, 512 images; do not
    modify it). Backends keep their own cache of preprocessed images on top of this."""
    from PIL import Image

    p = str(path)
    if not os.path.isfile(p):
        raise DatasetError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"image {p}: cannot be decoded ({first})") from None


# --------------------------------------------------------------------------------------------
# subsets
# --------------------------------------------------------------------------------------------


def seeded_subset(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """``n`` examples drawn without replacement with ``seed``, kept in their original order.

    Subsets with the same seed are nested: the subset of size n is contained in that of any
    larger size. ``n`` of None or ``>= len(examples)`` keeps everything.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 0:
        raise DatasetError(f"subset: size must be >= 0, got {n}")
    perm = np.random.default_rng(seed).permutation(len(examples))
    keep = np.sort(perm[:n])
    return [examples[i] for i in keep]


# --------------------------------------------------------------------------------------------
# easy-VQA
# --------------------------------------------------------------------------------------------

EASYVQA_COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EASYVQA_SHAPES = ("circle", "rectangle", "triangle")
_SHAPE_WORD = re.compile(r"\b(?:circle|rectangle|triangle)\b")


def easyvqa_qtype(question: str) -> str:
    """Question-template tag of an easy-VQA question: colour, shape, yes-no-colour, yes-no-shape.

    "what color ..."/"what is the color ..." ask for a colour; other "what ..." questions ask for
    a shape; the rest are yes/no questions about a shape word (circle/rectangle/triangle) or,
    failing that, about a colour.
    """
    q = question.strip().lower()
    if q.startswith("what"):
        return "colour" if "color" in q else "shape"
    return "yes-no-shape" if _SHAPE_WORD.search(q) else "yes-no-colour"


def easyvqa_root() -> Path:
    """The data folder shipped inside the ``easy-vqa`` package."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - declared dependency
        raise DatasetError(
            "dataset.name: easyvqa needs the easy-vqa package (pip install easy-vqa)"
        ) from e
    return Path(easy_vqa.__file__).parent / "data"


def _read_json(path: Path, key: str):
    if not path.is_file():
        raise DatasetError(f"{key}: file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{key}: {path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_easyvqa(
    split: str, root: str | Path | None = None, *, key: str = "dataset"
) -> list[Example]:
    """easy-VQA questions of ``split`` (``train`` or ``test``); ids are indices in the split.

    ``Example.image_id`` is ``"<split>/<image number>"`` (train and test images are different
    files with overlapping numbers), ``qtype`` is :func:`easyvqa_qtype`.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"{key}: easy-VQA split must be train or test, got {split!r}")
    base = Path(root) if root is not None else easyvqa_root()
    folder = base / split
    if not folder.is_dir():
        raise DatasetError(f"{key}.root: easy-VQA folder not found: {folder}")
    qpath = folder / "questions.json"
    rows = _read_json(qpath, f"{key}.root")
    if not isinstance(rows, list):
        raise DatasetError(f"{key}.root: {qpath}: expected a list of [question, answer, image_id]")
    images = folder / "images"
    if not images.is_dir():
        raise DatasetError(f"{key}.root: easy-VQA image folder not found: {images}")
    present = set(os.listdir(images))
    out: list[Example] = []
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise DatasetError(
                f"{key}.root: {qpath}: entry {i} is not [question, answer, image_id]"
            )
        q, a, img = row
        if not isinstance(q, str) or not q.strip():
            raise DatasetError(
                f"{key}.root: {qpath}: entry {i} (question id {i}) has no question text"
            )
        if not isinstance(a, str) or not a.strip():
            raise DatasetError(f"{key}.root: {qpath}: entry {i} (question id {i}) has no answer")
        if not isinstance(img, int):
            raise DatasetError(f"{key}.root: {qpath}: entry {i} has a non-integer image id {img!r}")
        name = f"{img}.png"
        if name not in present:
            raise DatasetError(f"{key}.root: image not found: {images / name} (entry {i})")
        out.append(
            Example(
                id=i,
                image=str(images / name),
                question=q,
                answers=(a,),
                answer=a,
                image_id=f"{split}/{img}",
                qtype=easyvqa_qtype(q),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# official VQA format (OK-VQA, VQAv2)
# --------------------------------------------------------------------------------------------


def _field(obj, name: str, typ, where: str):
    if not isinstance(obj, dict) or name not in obj:
        raise DatasetError(f"{where} lacks field {name!r}")
    v = obj[name]
    if not isinstance(v, typ) or isinstance(v, bool):
        raise DatasetError(f"{where}: field {name!r} has type {type(v).__name__}")
    return v


def load_vqa(
    questions: str | Path,
    annotations: str | Path,
    images: str | Path,
    split_name: str = "train",
    image_prefix: str | None = None,
    *,
    key: str | None = None,
    empty_answers: str = "error",
) -> list[Example]:
    """Examples from an official VQA questions JSON + annotations JSON + COCO image folder.

    Ids are the ``question_id`` values; order is the questions file's order. The image of a
    question is ``images/<image_prefix><image_id:012d>.jpg``; ``image_prefix`` defaults to
    ``COCO_<data_subtype>_`` from the questions file (e.g. ``COCO_val2014_``), else
    ``COCO_train2014_`` for the train split and ``COCO_val2014_`` for eval. ``answers`` are the
    annotators' ``answer`` strings (10 for OK-VQA/VQAv2), ``answer`` their majority,
    ``image_id`` the COCO image id, ``qtype`` the annotation's ``question_type`` if present.
    Empty questions and answers: see the module docstring (``empty_answers``: error or drop).
    """
    key = key or f"dataset.{split_name}"
    if empty_answers not in EMPTY_ANSWERS:
        raise DatasetError(
            f"{key}.empty_answers: must be one of {', '.join(EMPTY_ANSWERS)}, got {empty_answers!r}"
        )
    qpath, apath, ipath = Path(questions), Path(annotations), Path(images)
    qdoc = _read_json(qpath, f"{key}.questions")
    adoc = _read_json(apath, f"{key}.annotations")
    if not ipath.is_dir():
        raise DatasetError(f"{key}.images: image folder not found: {ipath}")
    qs = _field(qdoc, "questions", list, f"{key}.questions: {qpath}")
    anns = _field(adoc, "annotations", list, f"{key}.annotations: {apath}")
    if image_prefix is None:
        sub = qdoc.get("data_subtype")
        if isinstance(sub, str) and sub:
            image_prefix = f"COCO_{sub}_"
        else:
            image_prefix = "COCO_train2014_" if split_name == "train" else "COCO_val2014_"

    by_qid: dict[int, dict] = {}
    for j, ann in enumerate(anns):
        where = f"{key}.annotations: {apath}: annotation {j}"
        qid = _field(ann, "question_id", int, where)
        if qid in by_qid:
            raise DatasetError(f"{where}: duplicate question_id {qid}")
        by_qid[qid] = ann

    out: list[Example] = []
    seen: set[int] = set()
    present: dict[str, set[str]] = {}
    partly_empty: list[
        tuple[int, int]
    ] = []  # (question_id, empty answers) of questions with some empty
    for i, q in enumerate(qs):
        where = f"{key}.questions: {qpath}: question {i}"
        qid = _field(q, "question_id", int, where)
        img = _field(q, "image_id", int, where)
        text = _field(q, "question", str, where)
        if qid in seen:
            raise DatasetError(f"{where}: duplicate question_id {qid}")
        if not text.strip():
            raise DatasetError(
                f"{key}.questions: {qpath}: question_id {qid}: the question text is empty"
            )
        seen.add(qid)
        if qid not in by_qid:
            raise DatasetError(f"{key}.annotations: {apath}: no annotation for question_id {qid}")
        ann = by_qid[qid]
        awhere = f"{key}.annotations: {apath}: question_id {qid}"
        a_img = _field(ann, "image_id", int, awhere)
        if a_img != img:
            raise DatasetError(
                f"{awhere}: image_id {a_img} differs from the questions file's {img}"
            )
        raw = _field(ann, "answers", list, awhere)
        answers = tuple(
            _field(a, "answer", str, f"{awhere}: answer {k}") for k, a in enumerate(raw)
        )
        if not answers:
            raise DatasetError(f"{awhere}: field 'answers' is empty")
        n_empty = sum(1 for a in answers if not a.strip())
        if n_empty == len(answers):
            raise DatasetError(f"{awhere}: every annotator answer is empty ({n_empty})")
        if n_empty:
            partly_empty.append((qid, n_empty))
            answers = tuple(
                a for a in answers if a.strip()
            )  # kept only where empty_answers is drop
        name = f"{image_prefix}{img:012d}.jpg"
        folder = str(ipath)
        if folder not in present:
            present[folder] = set(os.listdir(ipath))
        if name not in present[folder]:
            raise DatasetError(f"{key}.images: image not found: {ipath / name} (question_id {qid})")
        out.append(
            Example(
                id=qid,
                image=str(ipath / name),
                question=text,
                answers=answers,
                answer=majority_answer(answers),
                image_id=str(img),
                qtype=str(ann.get("question_type", "") or ""),
            )
        )
    if partly_empty:
        n_ans = sum(n for _, n in partly_empty)
        if empty_answers == "error":
            raise DatasetError(
                f"{key}.annotations: {apath}: question_id {partly_empty[0][0]}: an annotator answer is empty "
                f"({_n(len(partly_empty), 'question')} of this file {'has' if len(partly_empty) == 1 else 'have'} "
                f"{_n(n_ans, 'empty answer')}; the official evaluator "
                f"would let an answer that normalises to nothing match them: set {key}.empty_answers: drop to "
                f"drop them)"
            )
        log.warning(
            "%s.annotations: %s: dropped %d empty annotator answers of %d questions (e.g. question_id %d; "
            "%s.empty_answers: drop)",
            key,
            apath,
            n_ans,
            len(partly_empty),
            partly_empty[0][0],
            key,
        )
    return out


def _n(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------------------------
# config entry points
# --------------------------------------------------------------------------------------------

_VQA_SPLIT_KEYS = {
    "questions",
    "annotations",
    "images",
    "image_prefix",
    "subset",
    "subset_seed",
    "empty_answers",
}
_EASY_SPLIT_KEYS = {"subset", "subset_seed"}


def _split_section(
    dataset_cfg: dict, split: str, allowed: set[str], required: tuple[str, ...]
) -> dict:
    sec = dataset_cfg.get(split) or {}
    if not isinstance(sec, dict):
        raise DatasetError(f"dataset.{split}: must be a mapping, got {type(sec).__name__}")
    unknown = sorted(set(sec) - allowed)
    if unknown:
        raise DatasetError(
            f"dataset.{split}.{unknown[0]}: unknown key (known: {', '.join(sorted(allowed))})"
        )
    for k in required:
        if sec.get(k) in (None, ""):
            raise DatasetError(f"dataset.{split}.{k}: missing (path required)")
    n = sec.get("subset")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise DatasetError(
            f"dataset.{split}.subset: must be a non-negative integer or null, got {n!r}"
        )
    s = sec.get("subset_seed", 0)
    if not isinstance(s, int) or isinstance(s, bool):
        raise DatasetError(f"dataset.{split}.subset_seed: must be an integer, got {s!r}")
    return sec


def load_dataset(dataset_cfg: dict, split: str) -> list[Example]:
    """The examples of ``split`` (``train`` or ``eval``) described by the ``dataset`` section."""
    if split not in SPLITS:
        raise DatasetError(f"dataset: split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not isinstance(dataset_cfg, dict):
        raise DatasetError("dataset: config section must be a mapping")
    name = dataset_cfg.get("name")
    if name == "easyvqa":
        unknown = sorted(set(dataset_cfg) - {"name", "label", "root", "train", "eval"})
        if unknown:
            raise DatasetError(f"dataset.{unknown[0]}: unknown key for easyvqa")
        sec = _split_section(dataset_cfg, split, _EASY_SPLIT_KEYS, ())
        examples = load_easyvqa(
            "train" if split == "train" else "test", dataset_cfg.get("root"), key="dataset"
        )
    elif name == "vqa":
        unknown = sorted(set(dataset_cfg) - {"name", "label", "train", "eval"})
        if unknown:
            raise DatasetError(f"dataset.{unknown[0]}: unknown key for vqa")
        sec = _split_section(
            dataset_cfg, split, _VQA_SPLIT_KEYS, ("questions", "annotations", "images")
        )
        examples = load_vqa(
            sec["questions"],
            sec["annotations"],
            sec["images"],
            split,
            sec.get("image_prefix"),
            key=f"dataset.{split}",
            empty_answers=sec.get("empty_answers", "error"),
        )
    else:
        raise DatasetError(f"dataset.name: {name!r} is not one of {', '.join(DATASET_NAMES)}")
    if not examples:
        raise DatasetError(f"dataset.{split}: no examples")
    return seeded_subset(examples, sec.get("subset"), sec.get("subset_seed", 0))


def check_dataset(dataset_cfg: dict) -> None:
    """Load both splits, failing with one line naming the config key and path of any problem."""
    for split in SPLITS:
        load_dataset(dataset_cfg, split)
