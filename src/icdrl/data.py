"""Examples and datasets (SPEC §2). Loaders are added by issue 2."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


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
