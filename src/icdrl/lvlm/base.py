"""The LVLM backend interface (docs/science.md §3): two questions asked of a vision-language model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from icdrl.data import Example

#: (demonstrations in selection order, query)
Prompt = tuple[Sequence[Example], Example]


@dataclass(frozen=True)
class AnswerScore:
    """Sum of the answer tokens' log-probabilities and their count."""

    sum_logprob: float
    n_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / max(self.n_tokens, 1)

    @property
    def prob(self) -> float:
        """P(a | ctx) = exp(mean answer-token log-prob) (docs/science.md §3)."""
        return float(np.exp(self.mean_logprob))


@dataclass(frozen=True)
class Generation:
    raw: str
    answer: str  # post-processed (icdrl.lvlm.prompt.postprocess)


class LVLMBackend(Protocol):
    def answer_logprobs(
        self, prompts: Sequence[Prompt], answers: Sequence[str]
    ) -> list[AnswerScore]: ...

    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int | None = None
    ) -> list[Generation]: ...


def answer_prob(
    backend: LVLMBackend, prompts: Sequence[Prompt], answers: Sequence[str]
) -> np.ndarray:
    """exp(mean answer-token log-prob) per prompt, as float64."""
    return np.array([s.prob for s in backend.answer_logprobs(prompts, answers)], dtype=np.float64)
