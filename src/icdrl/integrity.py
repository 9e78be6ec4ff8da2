"""Integrity checks of evaluation prompts (docs/science.md §8), run before the LVLM answers them.

Every k-shot record holds exactly k distinct ICDs (zero-shot: none), no ICD has the query's
image and question (an exact duplicate: the answer would be in the prompt), and with
``pools.exclude_same_image`` no ICD shows the query's image at all (OK-VQA and VQAv2 ask
several questions about one COCO image). A violation fails the job with one line naming the
method, the query and k.
"""

from __future__ import annotations

from collections.abc import Sequence

from icdrl.data import Example
from icdrl.pools import duplicate_key, image_key

__all__ = ["IntegrityError", "check_icds"]


class IntegrityError(ValueError):
    """An evaluation prompt breaks an integrity rule; the message names method, query and k."""


def check_icds(
    method: str,
    query: Example,
    k: int,
    icds: Sequence[Example],
    *,
    exclude_same_image: bool = False,
) -> None:
    """Raise :class:`IntegrityError` if the ICDs of ``method``'s ``k``-shot prompt for ``query``
    break a rule (module docstring). ``method`` is the reader's name (e.g. ``v3 <cell slug>``)."""
    where = f"integrity: method {method}, query {query.id}, k={k}"
    want = 0 if method == "zero_shot" else k
    ids = [d.id for d in icds]
    if len(ids) != want:
        raise IntegrityError(f"{where}: {len(ids)} ICDs, expected exactly {want}")
    seen: set[int] = set()
    for i in ids:
        if i in seen:
            raise IntegrityError(
                f"{where}: ICD {i} appears more than once ({len(set(ids))} distinct of {len(ids)})"
            )
        seen.add(i)
    dup, img = duplicate_key(query), image_key(query)
    for d in icds:
        if duplicate_key(d) == dup:
            raise IntegrityError(
                f"{where}: ICD {d.id} has the query's image and question (image {img!r})"
            )
        if exclude_same_image and image_key(d) == img:
            raise IntegrityError(
                f"{where}: ICD {d.id} shows the query's image {img!r} (pools.exclude_same_image is true)"
            )
