"""Stage 6 — rewards of scored candidate sequences (docs/science.md §6).

h = ``vqa_correct`` (0/1), s = ``vqa_acc_score`` in [0, 1], I = ``info_score`` (InfoScore gain).

Every reward mode is declared once, in :data:`REGISTRY`, by :func:`register`: its formula, the
knobs it reads (:data:`KNOBS`: name, short key in result paths, default) and the inputs it reads.

| mode                  | reward                                                              |
|-----------------------|---------------------------------------------------------------------|
| ``legacy``            | alpha·I + beta·h                                                    |
| ``hard_plus_soft``    | hard_weight·h + soft_weight·s                                       |
| ``hard_plus_soft_v2`` | soft_weight·s + 2·hard_weight·h (defaults: s + 2h)                  |
| ``hybrid``            | a·min(1, max(0, I·info_scale)) + (1−a)·(h + 0.5·s), a = hybrid_alpha |
| ``adaptive``          | hybrid with a per-group a_g = 1 − 4·p_g·(1 − p_g), p_g = mean(h)     |

:func:`group_rewards` gives the rewards of one group for every mode; :func:`reward` gives them
per candidate for the modes that do not need the group (it refuses ``adaptive``).
Missing inputs (``None`` or NaN) count as 0; :func:`write_rewards` counts and logs them.
Rewards are raw: nothing here normalises them (the advantage does that once, docs/defects.md defect 3).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from icdrl.records import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

INPUTS: tuple[str, ...] = ("hard", "soft", "info")


@dataclass(frozen=True)
class Knob:
    """A reward knob: its name, its short key in reward slugs (result paths) and its default."""

    name: str
    key: str
    default: float
    doc: str


#: every reward knob, in slug order
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("hard_weight", "hw", 1.0, "weight w_h of correctness h"),
        Knob("soft_weight", "sw", 1.0, "weight w_s of the soft VQA accuracy s"),
        Knob("alpha", "a", 1.0, "legacy: weight of InfoScore I"),
        Knob("beta", "b", 0.0, "legacy: weight of correctness h"),
        Knob("hybrid_alpha", "ha", 0.5, "hybrid: share a of the clipped InfoScore part, in [0, 1]"),
        Knob(
            "info_scale",
            "is",
            10.0,
            "hybrid/adaptive: I is scaled by this before clipping to [0, 1]",
        ),
    )
}


@dataclass(frozen=True)
class RewardMode:
    """One reward mode: its formula over a group's arrays, and what it reads."""

    name: str
    formula: Callable[..., np.ndarray]  # formula(h, s, i, **knobs) on one group's float64 arrays
    knobs: tuple[str, ...]  # the knobs it reads (names in KNOBS)
    inputs: tuple[str, ...]  # which of h, s, I it reads
    per_group: bool  # True when a candidate's reward depends on the other candidates of its group
    doc: str


#: every reward mode by name, in declaration order (the report lists them in this order)
REGISTRY: dict[str, RewardMode] = {}


def register(
    name: str,
    *,
    knobs: Iterable[str],
    inputs: Iterable[str],
    per_group: bool = False,
    doc: str = "",
) -> Callable:
    """Declare a reward mode: decorate its formula ``f(h, s, i, **knobs) -> array``.

    Adding a mode is one registration here plus its name in the config schema's
    ``$defs/reward_mode`` (a test checks both lists agree).
    """
    knobs, inputs = tuple(knobs), tuple(inputs)
    unknown = [k for k in knobs if k not in KNOBS] + [i for i in inputs if i not in INPUTS]
    if unknown:
        raise ValueError(f"reward mode {name!r}: unknown knobs or inputs {unknown}")

    def deco(formula: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in REGISTRY:
            raise ValueError(f"reward mode {name!r} is registered twice")
        REGISTRY[name] = RewardMode(
            name, formula, knobs, inputs, per_group, doc or (formula.__doc__ or "")
        )
        return formula

    return deco


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.minimum(1.0, np.maximum(0.0, x))


@register("legacy", knobs=("alpha", "beta"), inputs=("hard", "info"))
def _legacy(h, s, i, *, alpha, beta):
    """alpha·I + beta·h (the reference implementation's InfoScore at alpha=1, beta=0; plan 5 is 0, 1)."""
    return alpha * i + beta * h


@register("hard_plus_soft", knobs=("hard_weight", "soft_weight"), inputs=("hard", "soft"))
def _hard_plus_soft(h, s, i, *, hard_weight, soft_weight):
    """hard_weight·h + soft_weight·s."""
    return hard_weight * h + soft_weight * s


@register("hard_plus_soft_v2", knobs=("hard_weight", "soft_weight"), inputs=("hard", "soft"))
def _hard_plus_soft_v2(h, s, i, *, hard_weight, soft_weight):
    """soft_weight·s + 2·hard_weight·h (defaults: positives in [2, 3], negatives in [0, 1])."""
    return soft_weight * s + 2.0 * hard_weight * h


@register("hybrid", knobs=("hybrid_alpha", "info_scale"), inputs=("hard", "soft", "info"))
def _hybrid(h, s, i, *, hybrid_alpha, info_scale):
    """a·min(1, max(0, I·info_scale)) + (1−a)·(h + 0.5·s), a = hybrid_alpha."""
    return hybrid_alpha * _clip01(i * info_scale) + (1.0 - hybrid_alpha) * (h + 0.5 * s)


def adaptive_alpha(h: np.ndarray) -> float:
    """a_g = 1 − 4·p_g·(1 − p_g), p_g = the group's share of h = 1 (1 for an empty group)."""
    p = float(np.mean(h)) if np.size(h) else 0.0
    return 1.0 - 4.0 * p * (1.0 - p)


@register("adaptive", knobs=("info_scale",), inputs=("hard", "soft", "info"), per_group=True)
def _adaptive(h, s, i, *, info_scale):
    """hybrid with a per-group a_g = adaptive_alpha(h): correctness where it separates the group."""
    return _hybrid(h, s, i, hybrid_alpha=adaptive_alpha(h), info_scale=info_scale)


MODES: tuple[str, ...] = tuple(REGISTRY)


def check_mode(mode: str) -> RewardMode:
    """The registered mode ``mode``, else ``ValueError`` listing the valid ones."""
    if mode not in REGISTRY:
        raise ValueError(f"unknown reward mode {mode!r}; valid modes: {', '.join(REGISTRY)}")
    return REGISTRY[mode]


def knobs_used(mode: str) -> frozenset[str]:
    """Names among :data:`KNOBS` that change the reward of ``mode`` (others are ignored)."""
    return frozenset(check_mode(mode).knobs)


def inputs_used(mode: str) -> tuple[str, ...]:
    """Which of ``hard``, ``soft``, ``info`` the reward of ``mode`` reads."""
    return check_mode(mode).inputs


def check_knobs(mode: str, knobs: Mapping[str, Any]) -> dict[str, float]:
    """The knobs ``mode`` reads, from ``knobs`` or their defaults, checked (finite; hybrid_alpha in
    [0, 1]). Unknown knob names raise; known knobs the mode ignores are dropped."""
    m = check_mode(mode)
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown reward knob(s) {unknown}; known: {', '.join(KNOBS)}")
    out = {}
    for name in m.knobs:
        v = knobs.get(name)
        v = KNOBS[name].default if v is None else v
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float, np.floating, np.integer))
            or not math.isfinite(v)
        ):
            raise ValueError(f"reward mode {mode}: knob {name} needs a finite number, got {v!r}")
        v = float(v)
        if name == "hybrid_alpha" and not 0.0 <= v <= 1.0:
            raise ValueError(f"reward mode {mode}: knob hybrid_alpha must be in [0, 1], got {v}")
        out[name] = v
    return out


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


def _inputs(raw: Mapping[str, Any], shape: tuple[int, ...] | None) -> tuple[np.ndarray, ...]:
    return tuple(_as_array(k, raw[k], shape) for k in INPUTS)


def _common_shape(raw: Mapping[str, Any]) -> tuple[int, ...]:
    shapes = {np.shape(v) for v in raw.values() if v is not None}
    if len(shapes) > 1:
        raise ValueError(f"reward inputs hard/soft/info differ in shape: {sorted(shapes)}")
    return shapes.pop() if shapes else ()


def group_rewards(mode: str, *, hard: Any, soft: Any, info: Any, **knobs: float) -> np.ndarray:
    """Rewards (float64, 1-D) of the N candidates of one group, for every mode (docs/science.md §6).

    ``hard``, ``soft``, ``info``: length-N sequences (or ``None``: all missing); ``None``/NaN
    count as 0. ``knobs``: any of :data:`KNOBS` (defaults where left out; ones the mode ignores
    are accepted and ignored). A group of zero candidates gives an empty array.
    """
    m = check_mode(mode)
    kv = check_knobs(mode, knobs)
    raw = {"hard": hard, "soft": soft, "info": info}
    shape = _common_shape(raw)
    if len(shape) != 1:
        raise ValueError(f"group_rewards: inputs must be 1-D (one group), got shape {shape}")
    h, s, i = _inputs(raw, shape)
    return np.asarray(m.formula(h, s, i, **kv), dtype=np.float64).reshape(shape)


def reward(mode: str, *, hard: Any, soft: Any, info: Any, **knobs: float) -> Any:
    """Per-candidate reward of ``mode`` for scalars, numpy arrays/lists or torch tensors.

    All array inputs must have one shape; the result has that shape and the inputs' kind (a
    torch tensor if any input is one, else a numpy array if any is an array, else a float).
    ``None`` or NaN count as 0 (a whole input may be ``None``). Infinite inputs raise. A mode
    whose rewards need the whole group (``adaptive``) raises: use :func:`group_rewards`.
    """
    m = check_mode(mode)
    if m.per_group:
        raise ValueError(
            f"reward mode {mode!r} needs the whole group (its weight depends on the group's "
            "share of correct candidates): use icdrl.rewards.group_rewards"
        )
    kv = check_knobs(mode, knobs)
    raw = {"hard": hard, "soft": soft, "info": info}
    kind = _kind(raw.values())
    torch_ref = None
    if kind == "torch":
        import torch

        torch_ref = next(v for v in raw.values() if isinstance(v, torch.Tensor))
        raw = {
            k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            for k, v in raw.items()
        }
    shape = None if kind == "float" else _common_shape(raw)
    h, s, i = _inputs(raw, shape)
    out = np.asarray(m.formula(h, s, i, **kv), dtype=np.float64)
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


#: the scored-candidate field behind each input
_FIELD = {"hard": "vqa_correct", "soft": "vqa_acc_score", "info": "info_score"}


def write_rewards(
    scored_path: str | os.PathLike,
    mode: str,
    *,
    knobs: Mapping[str, float] | None = None,
    out_path: str | os.PathLike,
) -> None:
    """Read an ``icdrl.scored`` file and write the ``icdrl.rewards`` file of one mode/knob setting.

    Per anchor: ``rewards`` (one per candidate, same order), ``hard``, ``soft``, ``info`` (the
    values used, missing ones as 0) and ``missing`` (how many inputs the mode reads were missing).
    The total missing count is logged as a warning.
    """
    m = check_mode(mode)
    kv = check_knobs(mode, knobs or {})
    out: list[dict] = []
    total_missing = 0
    n_cand = 0
    for rec in read_jsonl(scored_path, "icdrl.scored"):
        if "anchor_id" not in rec or "candidates" not in rec:
            raise ValueError(f"{scored_path}: record lacks 'anchor_id' or 'candidates'")
        cands = rec["candidates"]
        vals: dict[str, list[float]] = {k: [] for k in INPUTS}
        missing = 0
        for c in cands:
            for key, fname in _FIELD.items():
                v = c.get(fname)
                v = float(v) if isinstance(v, bool) else v
                if is_missing(v):
                    missing += key in m.inputs
                    v = 0.0
                elif not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(
                        f"{scored_path}: anchor {rec['anchor_id']}: {fname}={v!r} is not a finite number"
                    )
                vals[key].append(float(v))
        r = group_rewards(
            mode, **{k: np.asarray(v, dtype=np.float64) for k, v in vals.items()}, **kv
        )
        total_missing += missing
        n_cand += len(cands)
        out.append(
            {
                "anchor_id": rec["anchor_id"],
                "rewards": [float(x) for x in r],
                **vals,
                "missing": missing,
            }
        )
    write_jsonl(out_path, "icdrl.rewards", out)
    msg = (
        f"{scored_path}: mode {mode}: {len(out)} anchors, {n_cand} candidates, "
        f"{total_missing} missing inputs counted as 0"
    )
    if total_missing:
        log.warning(msg)
    else:
        log.info(msg)
