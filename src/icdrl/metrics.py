"""VQA accuracy (docs/science.md §5): the official evaluator's, or always-normalised.

Normalisation (:func:`normalize_answer`) follows the official VQA evaluation script
(GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): newlines/tabs to spaces
and strip; punctuation (``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``) is deleted where it touches
a space or the text holds a digit-comma-digit, else replaced by a space; periods are deleted
unless followed by a digit ("1.5" keeps its period); lower-case; number words
``none``/``zero``..``ten`` become digits; articles ``a an the`` are dropped; contractions missing
their apostrophe get it back ("dont" -> "don't").

Accuracy: the mean over the leave-one-out subsets of the references of ``min(#matches / 3, 1)``
(10 answers -> the official figure), where ``metric`` (``scoring.metric``) decides what is
compared:

* ``official`` (default): exactly the official evaluator, quirk included. Prediction and
  references are stripped of surrounding whitespace; only where the references differ from one
  another are both sides normalised. Where every reference string is the same, neither side is
  normalised and the strings must be equal as they are: "a dog" against ten "dog" scores 0,
  "Dog" against ten "dog" scores 0.
* ``normalised``: prediction and references are always normalised (the reference implementation's
  behaviour; it scores at least as high as ``official`` on every question with 2+ references).

With a single reference answer (easy-VQA) both metrics give 1 or 0 by exact match after
normalisation (docs/science.md §5). The official script, written for ten answers, has no such case: its
leave-one-out would leave no reference and score every prediction 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
#: A period not followed by a digit. (The official pattern starts with a malformed look-behind,
#: ``(?!<=\d)``, that never excludes anything, so a period after a digit is removed too: "5." -> "5".)
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

#: Contractions the official table restores (written with their apostrophes).
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's "
    "how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've "
    "o'clock oughtn't shan't should've shouldn't somebody'll somebody's someone'd someone'll "
    "someone's something'd something'll that's there'd there're there's they'd they'll they're "
    "they've 'twas wasn't we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
    "you'll you're you've "
    "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've "
    "someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've "
    "y'all'll y'all'd've 'ow's'at"
).split()


def _contraction_table() -> dict[str, str]:
    """Spelling without an apostrophe -> contraction, as the official evaluator's table.

    A single-apostrophe form is keyed by its spelling without the apostrophe ("dont"); a form
    with several is keyed by each spelling that lacks exactly one of them ("couldnt've",
    "couldn'tve"). The official table also maps "somebody'd" to "somebodyd" (kept).
    """
    table: dict[str, str] = {}
    for c in _CONTRACTED:
        marks = [i for i, ch in enumerate(c) if ch == "'"]
        if len(marks) == 1:
            table[c.replace("'", "")] = c
        else:
            for i in marks:
                table[c[:i] + c[i + 1 :]] = c
    table["somebody'd"] = "somebodyd"
    return table


_CONTRACTIONS = _contraction_table()


def _punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_DIGITS.search(text) is not None
    for p in _PUNCT:
        if strip_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (32) as the count: at most 32 periods go
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official VQA evaluator's answer normalisation (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer: expected str, got {type(text).__name__}")
    t = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(t))


#: ``scoring.metric`` values (docs/science.md §5)
METRICS = ("official", "normalised")


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], metric: str = "official") -> float:
    """VQA accuracy of ``prediction`` against the annotators' ``answers`` (in [0, 1]).

    ``metric``: ``official`` (the evaluator exactly: no normalisation where all references are
    the same string) or ``normalised`` (always normalise both sides); see the module docstring.
    """
    if isinstance(answers, str):
        raise TypeError("vqa_accuracy: answers must be a list of strings, not one string")
    if len(answers) == 0:
        raise ValueError("vqa_accuracy: no reference answers")
    if metric not in METRICS:
        raise ValueError(f"vqa_accuracy: metric must be one of {METRICS}, got {metric!r}")
    if not isinstance(prediction, str):
        raise TypeError(f"vqa_accuracy: prediction must be a str, got {type(prediction).__name__}")
    pred = _strip(prediction)
    refs = [_strip(a) for a in answers]
    if len(refs) == 1 or metric == "normalised" or len(set(refs)) > 1:
        pred = normalize_answer(pred)
        refs = [normalize_answer(a) for a in refs]
    if len(refs) == 1:
        return 1.0 if pred == refs[0] else 0.0
    hits = [r == pred for r in refs]
    total = sum(hits)
    # leave answer i out: matches among the others = total - hits[i]
    return sum(min(1.0, (total - h) / 3.0) for h in hits) / len(refs)


def vqa_correct(acc: float, threshold: float = 1.0) -> int:
    """1 if ``acc >= threshold`` (default 1.0: full credit), else 0 (docs/science.md §5)."""
    if not (isinstance(acc, (int, float)) and math.isfinite(acc)):
        raise ValueError(f"vqa_correct: accuracy must be a finite number, got {acc!r}")
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"vqa_correct: threshold must lie in [0, 1], got {threshold!r}")
    return int(acc >= threshold - 1e-9)
