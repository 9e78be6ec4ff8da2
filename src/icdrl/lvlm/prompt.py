"""The prompt format of docs/science.md §3 and answer post-processing.

One user turn holds, per demonstration (ICD) in selection order,
``<image> Question: {q} Short answer: {a}``, then ``<image> Question: {q} Short answer:`` for
the query. The answer is the assistant turn, for scoring and generation alike. The optional
system prompt never states a number of examples. A demonstration whose ``image`` is empty is
shown without an image, as its text alone (the ``no_images`` ablation, ``icdrl.ablations``); the
query always has its image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from icdrl.data import Example

#: Where a generated answer stops: a newline, or the start of another demonstration.
_STOP = re.compile(r"\n|question\s*:|short answer\s*:", re.IGNORECASE)


def demo_text(ex: Example) -> str:
    return f" Question: {ex.question} Short answer: {ex.answer}\n"


def query_text(ex: Example) -> str:
    return f" Question: {ex.question} Short answer:"


def build_messages(
    demos: Sequence[Example],
    query: Example,
    answer: str | None = None,
    system_prompt: str | None = None,
) -> list[dict]:
    """Chat messages for ``demos`` + ``query``; with ``answer`` the assistant turn is appended."""
    content: list[dict] = []
    for ex in demos:
        if ex.image:
            content.append({"type": "image"})
        content.append({"type": "text", "text": demo_text(ex)})
    if not query.image:
        raise ValueError(f"query {query.id} has no image")
    content.append({"type": "image"})
    content.append({"type": "text", "text": query_text(query)})
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def postprocess(raw: str) -> str:
    """Strip, cut at a newline or the next "Question"/"Short answer", lower-case (docs/science.md §3)."""
    m = _STOP.search(raw)
    cut = raw[: m.start()] if m else raw
    return cut.strip().strip(".").strip().lower()
