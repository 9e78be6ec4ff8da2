"""Stage 3 — rewards of scored candidate sequences (SPEC §6).

h = ``vqa_correct`` (0/1), s = ``vqa_acc_score`` in [0, 1], I = ``info_score`` (InfoScore gain).

| mode                | reward                                                         |
|---------------------|----------------------------------------------------------------|
| ``legacy``          | alpha·I + beta·h                                               |
| ``hard_plus_soft``  | hard_weight·h + soft_weight·s                                  |
| ``hard_plus_soft_v2`` | soft_weight·s + 2·hard_weight·h (defaults: s + 2h)           |
| ``hybrid``          | a·min(1, max(0, I·info_scale)) + (1−a)·(h + 0.5·s), a = clip(hard_weight, 0, 1) |

Missing inputs (``None`` or NaN) count as 0; :func:`write_rewards` counts and logs them.
Rewards are raw: nothing here normalises them (the advantage does that once, ANCHORS defect 3).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from icdrl.records import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("legacy", "hard_plus_soft", "hard_plus_soft_v2", "hybrid")
KNOBS: tuple[str, ...] = ("hard_weight", "soft_weight", "alpha", "beta", "info_scale")

_KNOBS_USED: dict[str, frozenset[str]] = {
    "legacy": frozenset({"alpha", "beta"}),
    "hard_plus_soft": frozenset({"hard_weight", "soft_weight"}),
    "hard_plus_soft_v2": frozenset({"hard_weight", "soft_weight"}),
    "hybrid": frozenset({"hard_weight", "info_scale"}),
}
# inputs (h, s, I) each mode reads; a missing one of these is counted by write_rewards
_INPUTS_USED: dict[str, tuple[str, ...]] = {
    "legacy": ("hard", "info"),
    "hard_plus_soft": ("hard", "soft"),
    "hard_plus_soft_v2": ("hard", "soft"),
    "hybrid": ("hard", "soft", "info"),
}


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a reward mode, else raise ``ValueError`` listing the valid ones."""
    if mode not in MODES:
        raise ValueError(f"unknown reward mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def knobs_used(mode: str) -> frozenset[str]:
    """Names among :data:`KNOBS` that change the reward of ``mode`` (others are ignored)."""
    return _KNOBS_USED[check_mode(mode)]


def inputs_used(mode: str) -> tuple[str, ...]:
    """Which of ``hard``, ``soft``, ``info`` the reward of ``mode`` reads."""
    return _INPUTS_USED[check_mode(mode)]


# ---------------------------------------------------------------------------- array plumbing


def _kind(values: Iterable[Any]) -> str:
    """'torch', 'numpy' or 'float' — the kind of result :func:`reward` returns."""
    kind = "float"
    for v in values:
        if v is None:
            continue
        if type(v).__module__.startswith("torch"):
            return "torch"
        if isinstance(v, (np.ndarray, list, tuple)):
            kind = "numpy"
    return kind


def _as_array(name: str, v: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """float64 array of ``v`` with None/NaN replaced by 0; ``None`` means all missing."""
    if v is None:
        return np.zeros(shape if shape is not None else (), dtype=np.float64)
    if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.dtype == object):
        v = np.array(v, dtype=object)
        v = np.where(np.equal(v, None), np.nan, v)
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"reward input {name!r} is not numeric") from None
    if shape is not None and arr.shape != shape:
        raise ValueError(f"reward input {name!r} has shape {arr.shape}, expected {shape}")
    if np.isinf(arr).any():
        raise ValueError(f"reward input {name!r} holds an infinite value")
    return np.nan_to_num(arr, nan=0.0)


def _formula(mode: str, h, s, i, hard_weight, soft_weight, alpha, beta, info_scale):
    """The SPEC §6 formula on numbers or arrays (missing already replaced by 0)."""
    if mode == "legacy":
        return alpha * i + beta * h
    if mode == "hard_plus_soft":
        return hard_weight * h + soft_weight * s
    if mode == "hard_plus_soft_v2":
        return soft_weight * s + 2.0 * hard_weight * h
    if mode == "hybrid":
        a = min(1.0, max(0.0, float(hard_weight)))
        info_part = np.minimum(1.0, np.maximum(0.0, i * info_scale))
        return a * info_part + (1.0 - a) * (h + 0.5 * s)
    raise AssertionError("unreachable")  # pragma: no cover


def reward(
    mode: str,
    *,
    hard: Any,
    soft: Any,
    info: Any,
    hard_weight: float = 1.0,
    soft_weight: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.0,
    info_scale: float = 10.0,
) -> Any:
    """Reward of ``mode`` (SPEC §6) for scalars, numpy arrays/lists or torch tensors.

    All array inputs must have one shape; the result has that shape and the inputs' kind
    (a torch tensor if any input is one, else a numpy array if any is an array, else a float).
    ``None`` or NaN count as 0 (a whole input may be ``None``). Infinite inputs raise.
    """
    check_mode(mode)
    for k, v in (("hard_weight", hard_weight), ("soft_weight", soft_weight), ("alpha", alpha),
                 ("beta", beta), ("info_scale", info_scale)):
        if not math.isfinite(float(v)):
            raise ValueError(f"reward knob {k}={v!r} is not a finite number")
    raw = {"hard": hard, "soft": soft, "info": info}
    kind = _kind(raw.values())
    torch_ref = None
    if kind == "torch":
        import torch

        torch_ref = next(v for v in raw.values() if isinstance(v, torch.Tensor))
        raw = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in raw.items()}
    shape: tuple[int, ...] | None = None
    if kind != "float":
        shapes = {np.shape(v) for v in raw.values() if v is not None}
        if len(shapes) > 1:
            raise ValueError(f"reward inputs hard/soft/info differ in shape: {sorted(shapes)}")
        shape = shapes.pop()
    h, s, i = (_as_array(k, raw[k], shape) for k in ("hard", "soft", "info"))
    out = np.asarray(_formula(mode, h, s, i, hard_weight, soft_weight, alpha, beta, info_scale),
                     dtype=np.float64)
    if kind == "float":
        return float(out)
    if kind == "numpy":
        return out
    import torch

    dtype = torch_ref.dtype if torch_ref.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(out, dtype=dtype, device=torch_ref.device)


def is_missing(v: Any) -> bool:
    """True for None or NaN (a missing scored value)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def write_rewards(
    scored_path: str | os.PathLike,
    mode: str,
    *,
    hard_weight: float,
    soft_weight: float,
    alpha: float,
    beta: float,
    info_scale: float,
    out_path: str | os.PathLike,
) -> None:
    """Read an ``icdrl.scored`` file and write the ``icdrl.rewards`` file of one mode/knob setting.

    Per anchor: ``rewards`` (one per candidate, same order), ``hard``, ``soft``, ``info`` (the
    values used, missing ones as 0) and ``missing`` (how many inputs the mode reads were missing).
    The total missing count is logged as a warning.
    """
    check_mode(mode)
    used = inputs_used(mode)
    field = {"hard": "vqa_correct", "soft": "vqa_acc_score", "info": "info_score"}
    out: list[dict] = []
    total_missing = 0
    n_cand = 0
    for rec in read_jsonl(scored_path, "icdrl.scored"):
        if "anchor_id" not in rec or "candidates" not in rec:
            raise ValueError(f"{scored_path}: record lacks 'anchor_id' or 'candidates'")
        cands = rec["candidates"]
        vals: dict[str, list[float]] = {"hard": [], "soft": [], "info": []}
        missing = 0
        for c in cands:
            for key, fname in field.items():
                v = c.get(fname)
                v = float(v) if isinstance(v, bool) else v
                if is_missing(v):
                    missing += key in used
                    v = 0.0
                elif not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(
                        f"{scored_path}: anchor {rec['anchor_id']}: {fname}={v!r} is not a finite number"
                    )
                vals[key].append(float(v))
        r = reward(mode, hard=np.asarray(vals["hard"]), soft=np.asarray(vals["soft"]),
                   info=np.asarray(vals["info"]), hard_weight=hard_weight, soft_weight=soft_weight,
                   alpha=alpha, beta=beta, info_scale=info_scale)
        total_missing += missing
        n_cand += len(cands)
        out.append({"anchor_id": rec["anchor_id"], "rewards": [float(x) for x in r],
                    **vals, "missing": missing})
    write_jsonl(out_path, "icdrl.rewards", out)
    msg = (f"{scored_path}: mode {mode}: {len(out)} anchors, {n_cand} candidates, "
           f"{total_missing} missing inputs counted as 0")
    if total_missing:
        log.warning(msg)
    else:
        log.info(msg)
