"""Ablations of an evaluated method (docs/science.md §8): the same ICDs, shown differently.

An ablation re-answers the test queries of another method's ``icdrl.eval`` file with the *same*
ICDs per (query, k), so that its accuracy is paired with the unablated method's query by query:

* ``shuffled``: the ICDs in another order: a permutation drawn uniformly from the k! − 1 that
  change the order, seeded by (``shuffle_seed``, query id, k). One ICD has no order, so k = 1 is
  not answered (nothing changes there).
* ``no_images``: every demonstration without its image (its question and answer text stay); the
  query keeps its image. The LVLM sees :func:`strip_image` views of the demonstrations, the
  records name the same ICD ids.

Records: method ``shuffled`` / ``no_images``; ``cell`` and ``seed`` of the ablated record;
``spec = {"ablation", "of": {"method", "cell", "spec"} of the ablated record, "shuffle_seed"}``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from icdrl.data import Example
from icdrl.records import EvalRecord, read_records

log = logging.getLogger(__name__)

__all__ = [
    "ABLATIONS",
    "ABLATABLE",
    "shuffled_order",
    "strip_image",
    "plan_ablation",
    "evaluate_ablation",
]

ABLATIONS = ("shuffled", "no_images")
#: methods whose records can be ablated (they show ICDs chosen by the LVLM-evaluated method)
ABLATABLE = ("random", "similarity", "rices_image", "rices_text", "rices", "v2", "v3", "per_shot")


def shuffled_order(ids: Sequence[int], seed: int, query_id: int) -> tuple[int, ...]:
    """``ids`` in an order drawn uniformly from the permutations that change it (len >= 2),
    seeded by (seed, query id, len)."""
    k = len(ids)
    if k < 2:
        raise ValueError(f"query {query_id}: {k} ICD(s) have no order to shuffle")
    if len(set(ids)) != k:
        raise ValueError(f"query {query_id}: ICDs {list(ids)} are not distinct")
    rng = np.random.default_rng([seed, query_id, k])
    while True:  # rejection: uniform over the k! - 1 non-identity permutations
        perm = rng.permutation(k)
        if np.any(perm != np.arange(k)):
            return tuple(int(ids[i]) for i in perm)


def strip_image(ex: Example) -> Example:
    """The demonstration shown without its image (``icdrl.lvlm.prompt.build_messages`` then
    renders its text only)."""
    return dataclasses.replace(ex, image="")


def plan_ablation(ablation: str, base: Sequence[EvalRecord], shuffle_seed: int):
    """The :class:`icdrl.evaluate.Job` list of one ablation of the records ``base`` (one method,
    one seed), in their order."""
    from icdrl.evaluate import Job

    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
    methods = {r.method for r in base}
    if len(methods) != 1 or not methods <= set(ABLATABLE):
        raise ValueError(
            f"an ablation needs the records of one of {ABLATABLE}, got {sorted(methods)}"
        )
    jobs = []
    for r in base:
        if ablation == "shuffled" and len(r.icd_ids) < 2:
            continue
        ids = (
            shuffled_order(r.icd_ids, shuffle_seed, r.query_id)
            if ablation == "shuffled"
            else r.icd_ids
        )
        pos = r.icd_pos
        if ablation == "shuffled" and pos:
            at = {i: p for i, p in zip(r.icd_ids, r.icd_pos)}
            pos = tuple(at[i] for i in ids)
        spec = {
            "ablation": ablation,
            "of": {"method": r.method, "cell": r.cell, "spec": r.spec},
            "shuffle_seed": int(shuffle_seed) if ablation == "shuffled" else None,
        }
        jobs.append(Job(r.query_id, r.k, tuple(pos), tuple(ids), r.cell, r.seed, spec))
    return jobs


def evaluate_ablation(
    dataset_cfg: dict,
    model_cfg: dict,
    model_path,
    base_path,
    ablation: str,
    eval_cfg: dict,
    out_path,
    *,
    backend=None,
    exclude_same_image: bool = False,
) -> dict[int, float]:
    """Answer ``ablation`` of the records in ``base_path`` and write them to ``out_path`` (``icdrl.eval``);
    returns the mean accuracy per k. The shuffle seed is ``evaluation.random_seed``."""
    from icdrl.beam import examples_by_id
    from icdrl.data import load_dataset
    from icdrl.evaluate import answer_jobs, check_jobs, method_label

    base = read_records(base_path, EvalRecord)
    if not base:
        raise ValueError(f"{base_path}: no records to ablate")
    seed = int(eval_cfg.get("random_seed", 0))
    jobs = plan_ablation(ablation, base, seed)
    if not jobs:
        raise ValueError(f"{base_path}: no record with two or more ICDs to shuffle")
    queries = examples_by_id(load_dataset(dataset_cfg, "eval"), "eval split")
    train = examples_by_id(load_dataset(dataset_cfg, "train"), "train split")
    label = f"{ablation} of {base[0].method}"
    check_jobs(label, jobs, queries, train, str(base_path), exclude_same_image=exclude_same_image)
    summary = answer_jobs(
        ablation,
        jobs,
        queries=queries,
        train=train,
        model_cfg=model_cfg,
        model_path=model_path,
        eval_cfg=eval_cfg,
        out_path=out_path,
        where=str(base_path),
        backend=backend,
        demo_view=strip_image if ablation == "no_images" else None,
        fp_inputs={"base": [r.to_dict() for r in base], "shuffle_seed": seed},
    )
    log.info(
        "%s accuracy by k: %s",
        method_label(label, None),
        ", ".join(f"k={k}: {100 * a:.2f}%" for k, a in summary.items()),
    )
    return summary
