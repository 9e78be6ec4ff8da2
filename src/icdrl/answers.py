"""The training split's answers, written once for the report's diagnostics (docs/science.md §8, §10).

Evaluation records name their ICDs by id; whether a prediction copies a demonstration's answer
needs the answer each demonstration showed. This small table (``icdrl.answers`` v1, one JSON
document) holds the ``answer`` of every training example, the one the prompt shows (docs/science.md §3),
and the dataset's **answer form** where it has one: easy-VQA answers with one word of a closed
vocabulary (colours, shapes, yes, no), so a prediction outside it is in the wrong form (the
embedded LVLM's verbose "the answer is …" is the typical one). Open-vocabulary datasets
(OK-VQA, VQAv2) have none. Together with the evaluation records it makes every diagnostic
re-derivable without running the LVLM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from icdrl.data import Example
from icdrl.metrics import normalize_answer
from icdrl.records import atomic_write_text

__all__ = ["SCHEMA", "VERSION", "AnswersTable", "answers_table", "write_answers", "load_answers"]

SCHEMA = "icdrl.answers"
VERSION = 1
#: datasets whose answers come from a closed vocabulary (the answer form is one of its words)
CLOSED_VOCABULARY = ("easyvqa",)


@dataclass(frozen=True)
class AnswersTable:
    """Training answers by id, and the closed answer vocabulary (normalised) or None."""

    answers: Mapping[int, str]
    vocabulary: frozenset[str] | None = None
    path: str = "<memory>"

    def answer(self, train_id: int, where: str = "") -> str:
        try:
            return self.answers[train_id]
        except KeyError:
            raise KeyError(
                f"{where or self.path}: ICD {train_id} is not in the answers table {self.path}"
            ) from None

    def wrong_form(self, prediction: str) -> bool | None:
        """True when the prediction is not a word of the closed vocabulary; None without one."""
        if self.vocabulary is None:
            return None
        return normalize_answer(prediction) not in self.vocabulary


def answers_table(train: Sequence[Example], dataset_name: str) -> AnswersTable:
    """The table of ``train`` (vocabulary: its normalised answers, for a closed-vocabulary dataset)."""
    answers = {ex.id: ex.answer for ex in train}
    if len(answers) != len(train):
        raise ValueError("answers table: training example ids are not unique")
    vocab = None
    if dataset_name in CLOSED_VOCABULARY:
        vocab = frozenset(normalize_answer(a) for ex in train for a in ex.answers)
    return AnswersTable(answers, vocab)


def write_answers(dataset_cfg: dict, out_path: str | os.PathLike) -> AnswersTable:
    """Write the training split's answers table (``icdrl.answers``) for ``dataset_cfg``."""
    from icdrl.data import load_dataset

    name = dataset_cfg.get("name", "")
    table = answers_table(load_dataset(dataset_cfg, "train"), name)
    doc = {
        "schema": SCHEMA,
        "version": VERSION,
        "split": "train",
        "dataset": dataset_cfg.get("label") or name,
        "vocabulary": sorted(table.vocabulary) if table.vocabulary is not None else None,
        "answers": [[i, a] for i, a in table.answers.items()],
    }
    atomic_write_text(out_path, json.dumps(doc, separators=(",", ":")) + "\n")
    return table


def load_answers(path: str | os.PathLike) -> AnswersTable:
    """Read a table written by :func:`write_answers`; errors are one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: answers table not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("version") != VERSION:
        raise ValueError(f"{path}: not an {SCHEMA} v{VERSION} file")
    rows, vocab = doc.get("answers"), doc.get("vocabulary")
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], str)
        for r in rows
    ):
        raise ValueError(f"{path}: field 'answers' must be a list of [id, answer] pairs")
    if vocab is not None and not (
        isinstance(vocab, list) and all(isinstance(v, str) for v in vocab)
    ):
        raise ValueError(f"{path}: field 'vocabulary' must be a list of strings or null")
    answers = dict((int(i), a) for i, a in rows)
    if len(answers) != len(rows):
        raise ValueError(f"{path}: an id appears twice in 'answers'")
    return AnswersTable(answers, frozenset(vocab) if vocab is not None else None, str(path))
