"""Checks of the data against the config, run before the first expensive job.

:func:`check_data` is what the Snakefile's ``onstart`` runs (through
:func:`icdrl.config.check_inputs`; never in a dry run). It loads both splits once and fails with
one line naming the config key (sizes) or the image path and question id (images):

* **sizes** (:func:`check_sizes`): ``dataset.<split>.subset`` against the split it subsets;
  ``pools.n_anchors`` against the train split; ``pools.n_test`` (and ``pools.n_val``, where the
  config has it: validation queries are drawn from the eval split too, disjoint from the test
  queries) against the eval split; ``pools.size`` against the train examples eligible for each
  query once the query itself and its exact duplicates are excluded (the same exclusions as
  :func:`icdrl.pools.build_pools`); and, for the embedded LVLM, ``embedded_lvlm.check``'s sizes
  against easy-VQA. Nothing is capped silently: a size the data cannot hold is an error.
* **images** (:func:`check_images`): every distinct image file the run will read — both
  splits, and for the embedded LVLM the easy-VQA splits it trains and is checked on — gets a
  cheap structural check: the file starts with a PNG or JPEG signature and ends with that
  format's end marker (PNG ``IEND`` chunk, JPEG end-of-image ``FF D9``), which a file cut short
  lacks. Any file the cheap check cannot vouch for (another format, bytes after the end marker)
  falls back to a full decode with PIL. A file whose bytes are damaged in the middle passes the
  cheap check; it fails at the first job that decodes it, where :func:`icdrl.data.load_image`
  names the path.

Imported at Snakefile start-up: keep it free of torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdrl.data import DatasetError, Example, load_dataset, seeded_subset

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every PNG
JPEG_SIGNATURE = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"


class SizeError(ValueError):
    """A configured size the data cannot hold; the message is one line naming the key."""


# ----------------------------------------------------------------------------- images


def quick_image_check(path: str | Path) -> bool | None:
    """True if the file is a PNG/JPEG with its end marker, False if it is one without (cut
    short or holding trailing bytes), None for other formats. Reads 8 + 8 bytes."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        size = fh.seek(0, 2)
        fh.seek(max(0, size - 8))
        tail = fh.read(8)
    if head.startswith(PNG_SIGNATURE):
        return size > 16 and tail == PNG_END
    if head.startswith(JPEG_SIGNATURE):
        return size > 4 and tail.endswith(JPEG_END)
    return None


def decode_problem(path: str | Path) -> str | None:
    """None if PIL decodes the whole image, else the decoder's complaint (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


@dataclass(frozen=True)
class ImageReport:
    """What :func:`check_images` did: distinct files, and how many needed a full decode."""

    n_images: int
    n_decoded: int


def check_images(examples: Sequence[Example], key: str) -> ImageReport:
    """Check every distinct image of ``examples`` (see the module docstring); raise
    :class:`icdrl.data.DatasetError` naming ``key``, the path and the question id(s) of the first
    image that is missing or cannot be decoded."""
    users: dict[str, list[int]] = {}
    for ex in examples:
        users.setdefault(ex.image, []).append(ex.id)
    decoded = 0
    for path, qids in users.items():
        try:
            ok = quick_image_check(path)
        except OSError as e:
            raise DatasetError(
                f"{key}: image {path} (question id {_ids(qids)}): cannot be read ({e.strerror})"
            ) from None
        if ok:
            continue
        decoded += 1
        problem = decode_problem(path)
        if problem is not None:
            raise DatasetError(
                f"{key}: image {path} (question id {_ids(qids)}): cannot be decoded ({problem})"
            )
    return ImageReport(len(users), decoded)


def _ids(qids: list[int]) -> str:
    return (
        str(qids[0])
        if len(qids) == 1
        else f"{qids[0]}, and {len(qids) - 1} more questions on this image"
    )


# ----------------------------------------------------------------------------- sizes


def _subset_note(dataset_cfg: Mapping[str, Any], split: str) -> str:
    n = (dataset_cfg.get(split) or {}).get("subset")
    return f" (dataset.{split}.subset: {n})" if n is not None else ""


def check_subset(dataset_cfg: Mapping[str, Any], split: str, n_split: int) -> None:
    """``dataset.<split>.subset`` must not exceed the split (its path would claim more examples)."""
    n = (dataset_cfg.get(split) or {}).get("subset")
    if n is not None and n > n_split:
        raise SizeError(
            f"config key dataset.{split}.subset: {n} exceeds the {n_split} examples of the {split} split"
        )


def check_count(key: str, n: int, available: int, what: str) -> None:
    if n > available:
        raise SizeError(f"config key {key}: {n} exceeds the {available} {what}")


def check_pool_size(
    key: str,
    size: int,
    queries: Sequence[Example],
    train: Sequence[Example],
    role: str,
    what: str = "train examples",
) -> None:
    """Every query must have ``size`` eligible train examples once it and its exact duplicates
    (same image and question, :func:`icdrl.pools.duplicate_key`) are excluded."""
    from icdrl.pools import duplicate_key

    dups = Counter(duplicate_key(ex) for ex in train)
    train_ids = {ex.id for ex in train}
    worst: tuple[int, Example | None, int] = (len(train) + 1, None, 0)
    for q in queries:
        n_dup = dups.get(duplicate_key(q), 0)
        itself = (
            role == "anchors" and q.id in train_ids and n_dup == 0
        )  # (a duplicate of itself otherwise)
        eligible = len(train) - n_dup - int(itself)
        if eligible < worst[0]:
            worst = (eligible, q, n_dup)
    eligible, q, n_dup = worst
    if q is not None and size > eligible:
        excl = (
            "the query itself and its exact duplicates"
            if role == "anchors"
            else "its exact duplicates"
        )
        raise SizeError(
            f"config key {key}: {size} exceeds the {eligible} eligible {what} of {role} query "
            f"{q.id} ({len(train)} minus {excl}, {len(train) - eligible})"
        )


def check_sizes(
    config: Mapping[str, Any], train: Sequence[Example], evals: Sequence[Example]
) -> None:
    """Every configured size against the data (module docstring); one line naming the key."""
    pools = config["pools"]
    seed = int(pools.get("seed", 0))
    check_count(
        "pools.n_anchors",
        int(pools["n_anchors"]),
        len(train),
        f"examples of the train split{_subset_note(config['dataset'], 'train')}",
    )
    check_count(
        "pools.n_test",
        int(pools["n_test"]),
        len(evals),
        f"examples of the eval split{_subset_note(config['dataset'], 'eval')}",
    )
    n_val = int(pools.get("n_val", 0) or 0)
    if n_val:
        n_test = int(pools["n_test"])
        if n_test + n_val > len(evals):
            raise SizeError(
                f"config key pools.n_val: {n_val} validation queries and pools.n_test: {n_test} test "
                f"queries (disjoint) exceed the {len(evals)} examples of the eval split"
                f"{_subset_note(config['dataset'], 'eval')}"
            )
    from icdrl.pools import role_queries

    size = int(pools["size"])
    n_test = int(pools["n_test"])
    check_pool_size(
        "pools.size",
        size,
        role_queries(train, "anchors", int(pools["n_anchors"]), seed),
        train,
        "anchors",
    )
    check_pool_size("pools.size", size, role_queries(evals, "test", n_test, seed), train, "test")
    if n_val:
        check_pool_size(
            "pools.size", size, role_queries(evals, "val", n_val, seed, n_test), train, "validation"
        )


def check_embedded_sizes(
    lvlm_cfg: Mapping[str, Any], train: Sequence[Example], test: Sequence[Example]
) -> None:
    """``embedded_lvlm.check`` (the in-context check) against easy-VQA, as
    :func:`icdrl.lvlm.embedded.icl_check` draws from it."""
    ck = dict(lvlm_cfg.get("check") or {})
    seed = int(ck.get("seed", 0))
    sub = ck.get("train_subset")
    if sub is not None:
        check_count(
            "embedded_lvlm.check.train_subset", int(sub), len(train), "easy-VQA train questions"
        )
        train = seeded_subset(train, int(sub), seed)
    check_count(
        "embedded_lvlm.check.n_test",
        int(ck.get("n_test", 500)),
        len(test),
        "easy-VQA test questions",
    )
    n_anchors = int(ck.get("n_anchors", 100))
    check_count(
        "embedded_lvlm.check.n_anchors",
        n_anchors,
        len(train),
        "easy-VQA train questions it draws from",
    )
    check_pool_size(
        "embedded_lvlm.check.pool_size",
        int(ck.get("pool_size", 64)),
        seeded_subset(train, n_anchors, seed + 1),
        train,
        "anchors",
        "easy-VQA train questions",
    )
    limit = lvlm_cfg.get("train_limit")
    if limit is not None:
        check_count("embedded_lvlm.train_limit", int(limit), len(train), "easy-VQA train questions")


# ----------------------------------------------------------------------------- all of it


def _load_full(dataset_cfg: Mapping[str, Any], split: str) -> tuple[list[Example], list[Example]]:
    """(the split without its subset, the split as the run uses it)."""
    full_cfg = {k: v for k, v in dataset_cfg.items()}
    sec = dict(full_cfg.get(split) or {})
    sec.pop("subset", None)
    sec.pop("subset_seed", None)
    full_cfg[split] = sec
    full = load_dataset(full_cfg, split)
    sub = (dataset_cfg.get(split) or {}).get("subset")
    return full, seeded_subset(full, sub, (dataset_cfg.get(split) or {}).get("subset_seed", 0))


def check_data(config: Mapping[str, Any]) -> dict[str, ImageReport]:
    """Load the data once; check every size and image (module docstring). Returns what the image
    checks covered, by config key; raises one line on the first problem."""
    ds = config["dataset"]
    full, used = {}, {}
    for split in ("train", "eval"):
        full[split], used[split] = _load_full(ds, split)
        check_subset(ds, split, len(full[split]))
    check_sizes(config, used["train"], used["eval"])
    reports = {}
    for split, examples in used.items():
        key = "dataset.root" if ds["name"] == "easyvqa" else f"dataset.{split}.images"
        reports[f"dataset.{split}"] = check_images(examples, key)
    if config["model"]["kind"] == "embedded":
        # the embedded LVLM trains on (and is checked on) the package's easy-VQA, whatever the
        # dataset section says (icdrl.lvlm.embedded.load_split)
        if ds["name"] == "easyvqa" and not ds.get("root"):
            e_train, e_test = full["train"], full["eval"]
        else:
            e_train, e_test = (load_dataset({"name": "easyvqa"}, s) for s in ("train", "eval"))
        check_embedded_sizes(config.get("embedded_lvlm") or {}, e_train, e_test)
        seen = {ex.image for examples in used.values() for ex in examples}
        rest = [ex for ex in list(e_train) + list(e_test) if ex.image not in seen]
        reports["embedded_lvlm"] = check_images(
            rest, "embedded_lvlm (easy-VQA, the embedded LVLM's data)"
        )
    for key, r in reports.items():
        log.info("%s: %d image files checked (%d fully decoded)", key, r.n_images, r.n_decoded)
    return reports
