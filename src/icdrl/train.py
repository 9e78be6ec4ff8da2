"""Stage 7 — training the pointer selector (docs/science.md §7).

* **v2** (supervised): teacher-forced cross-entropy on each anchor's top InfoScore beams,
  candidates = the anchor's whole pool, labels = pool positions.
* **v3**: start from v2, RCE warm-up (τ falls linearly 2.0 → 0.5 over the RCE steps), then GRPO
  (π_ref = policy at GRPO start; π_old re-snapshotted at every GRPO epoch; all GRPO log-probs
  with dropout off, so ratios are exactly 1 at identical weights).

Groups (one per anchor) are batched: ``batch_queries`` anchors per optimiser step, padded to a
common pool size / candidate count / depth with masks. Every stage clips the gradient norm
(1.0) and uses AdamW. Metrics go to a CSV (one row per epoch); checkpoints are written
atomically. Same seed → identical checkpoint and CSV (on CPU).

Default epochs (v2 10, RCE 5, GRPO 10) follow the reference implementation's RCE/GRPO
settings; at the workflow's default size (800 anchors, ~15 candidates, pool 64, 512-d
embeddings) v2 took 11 s and v3 22 s of CPU time on one core (measured on a shared 2-core
machine).

``batch_queries`` (v3: 16, v2: 32). The reference implementation took one query per step
(lr 1e-5, 800 steps per epoch). Per step the weight gradients, clipping and the AdamW update
cost the same whatever the batch, so batching 16 groups makes a GRPO epoch ~6× cheaper
(benchmarks/bench_grpo.py) while still giving 50 updates per epoch; with lr 1e-4 the product
lr × steps per epoch (5e-3) stays near the reference implementation's (8e-3). Larger batches
gain little more speed (~15% at 32) and halve the updates.

This module holds the configs, the loops and the stage entry points; the groups, their
loaders and the padded batches are :mod:`icdrl.groups`, the embeddings table
:class:`icdrl.embeddings.EmbeddingTable`, synthetic groups :mod:`icdrl.synthetic`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from icdrl import rl
from icdrl.embeddings import EmbeddingTable
from icdrl.groups import (
    Batch,
    Group,
    Packed,
    in_label_order,
    load_candidate_groups,
    load_groups,
    make_batch,
    pack_groups,
    sft_group,
    split_val,
)
from icdrl.records import METRIC_COLUMNS, atomic_path, csv_end_line
from icdrl.selector import LABEL_ORDERS, PointerSelector

log = logging.getLogger(__name__)

StepCallback = Callable[[str, int, int, dict], None]


# ============================================================================ configs


def _coerce(cls_name: str, f: dataclasses.Field, value: Any) -> Any:
    """Type-check one config value against the field's declared type (one-line errors)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = f"{cls_name}.{f.name}"
    if value is None and "None" in t:
        return None
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if t.startswith("float"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if t.startswith("str"):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value  # pragma: no cover


class _Config:
    """Shared ``from_dict`` (rejects unknown keys) and range checks of the training configs."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        known = {f.name: f for f in fields(cls)}
        for k in d:
            if k not in known:
                raise ValueError(
                    f"unknown {cls.__name__} key {k!r}; known keys: {', '.join(known)}"
                )
        return cls(**{k: _coerce(cls.__name__, known[k], v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_common(self) -> None:
        n = type(self).__name__
        if self.batch_queries < 1:
            raise ValueError(f"{n}.batch_queries must be ≥ 1, got {self.batch_queries}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"{n}.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.selection not in ("last", "best"):
            raise ValueError(f"{n}.selection must be 'last' or 'best', got {self.selection!r}")
        if self.selection == "best" and self.val_fraction == 0.0:
            raise ValueError(f"{n}.selection 'best' needs val_fraction > 0")
        if self.grad_clip <= 0:
            raise ValueError(f"{n}.grad_clip must be > 0, got {self.grad_clip}")
        if self.label_order not in LABEL_ORDERS:
            raise ValueError(
                f"{n}.label_order must be one of {LABEL_ORDERS}, got {self.label_order!r}"
            )
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"{n}.device must be 'cpu' or 'cuda[:i]', got {self.device!r}")


@dataclass(frozen=True)
class V2Config(_Config):
    """Supervised (v2) selector training. One line per knob; defaults in brackets."""

    hidden_size: int = 256  # H, width of the selector [256]
    num_layers: int = 1  # cross-attention layers (query attends over its pool) [1]
    num_heads: int = 1  # attention heads per layer [1]
    dropout: float = 0.1  # on attention weights and projections (v2/RCE training only) [0.1]
    temperature: float = 0.1  # cosine-similarity logit temperature [0.1]
    label_smoothing: float = 0.1  # CE smoothing over still-available items (reference: 0.1) [0.1]
    lr: float = 5e-4  # AdamW learning rate [5e-4]
    weight_decay: float = 0.01  # AdamW weight decay [0.01]
    epochs: int = 10  # passes over the training anchors [10]
    batch_queries: int = 32  # anchors per optimiser step (each with its top beams) [32]
    top_beams: int = 5  # InfoScore beams per anchor used as targets (best first) [5 = every beam]
    grad_clip: float = 1.0  # gradient-norm clip [1.0]
    val_fraction: float = 0.1  # held-out anchors; val_reward: InfoScore of greedy seq. [0.1]
    val_seed: int = 0  # seed of the anchor train/val split (shared by v2 and v3) [0]
    selection: str = "last"  # checkpoint kept: "last" epoch or "best" val_reward [last]
    label_order: str = "prompt"  # label order "prompt" or "selection", docs/science.md §7 [prompt]
    save_epochs: bool = False  # also write every epoch's checkpoint beside the output [false]
    device: str = "cpu"  # torch device, "cpu" or "cuda[:i]" [cpu]

    def __post_init__(self) -> None:
        self._check_common()
        for k in ("hidden_size", "num_layers", "num_heads", "top_beams"):
            if getattr(self, k) < 1:
                raise ValueError(f"V2Config.{k} must be ≥ 1, got {getattr(self, k)}")
        if self.epochs < 0:
            raise ValueError(f"V2Config.epochs must be ≥ 0, got {self.epochs}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"V2Config.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"V2Config.label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        if self.temperature <= 0 or self.lr < 0 or self.weight_decay < 0:
            raise ValueError("V2Config.temperature must be > 0 and lr, weight_decay ≥ 0")


@dataclass(frozen=True)
class V3Config(_Config):
    """RL (v3 = v2 + RCE + GRPO) selector training. One line per knob; defaults in brackets."""

    rce_epochs: int = 5  # RCE warm-up passes (reference: 5) [5]
    grpo_epochs: int = 10  # GRPO passes; π_old re-snapshotted at each (reference: 10) [10]
    batch_queries: int = 16  # groups (anchors) per optimiser step, padded with masks [16]
    rce_lr: float = 1e-4  # AdamW learning rate of the RCE stage [1e-4]
    grpo_lr: float = 1e-4  # AdamW learning rate of the GRPO stage [1e-4]
    weight_decay: float = 0.01  # AdamW weight decay (both stages) [0.01]
    rce_tau_start: float = 2.0  # RCE softmax temperature at the first RCE step [2.0]
    rce_tau_end: float = 0.5  # RCE temperature at the last RCE step (linear in steps) [0.5]
    clip_eps: float = 0.2  # PPO ratio clip ε [0.2]
    kl_beta: float = 0.1  # weight β of the k3 KL to π_ref (policy at GRPO start) [0.1]
    min_std: float = 0.1  # floor of the group std in z-score advantages [0.1]
    adv_clip: float = 5.0  # advantages clipped to ±adv_clip [5.0]
    min_positive_ratio: float = 0.0  # GRPO needs h=1 share ≥ this (reference: 0.2) [0.0 = off]
    gate_rce: bool = False  # apply min_positive_ratio to RCE as well [false]
    dropout: float | None = None  # during RCE (GRPO always without); null = keep v2's [null]
    grad_clip: float = 1.0  # gradient-norm clip [1.0]
    val_fraction: float = 0.1  # held-out anchors; val_reward: mean reward of greedy seq. [0.1]
    val_seed: int = 0  # seed of the anchor train/val split (same as v2's → same split) [0]
    selection: str = "last"  # "last" epoch, or "best" GRPO epoch by validation proxy [last]
    label_order: str = "prompt"  # as V2Config.label_order; its v2 trained with the same [prompt]
    save_epochs: bool = False  # also write every epoch's checkpoint beside the output [false]
    device: str = "cpu"  # torch device, "cpu" or "cuda[:i]" [cpu]

    def __post_init__(self) -> None:
        self._check_common()
        if self.rce_epochs < 0 or self.grpo_epochs < 0:
            raise ValueError("V3Config.rce_epochs and grpo_epochs must be ≥ 0")
        if self.rce_tau_start <= 0 or self.rce_tau_end <= 0:
            raise ValueError("V3Config.rce_tau_start and rce_tau_end must be > 0")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"V3Config.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.min_std <= 0 or self.adv_clip <= 0:
            raise ValueError("V3Config.min_std and adv_clip must be > 0")
        if self.kl_beta < 0 or self.rce_lr < 0 or self.grpo_lr < 0 or self.weight_decay < 0:
            raise ValueError("V3Config.kl_beta, rce_lr, grpo_lr and weight_decay must be ≥ 0")
        if not 0.0 <= self.min_positive_ratio <= 1.0:
            raise ValueError(
                f"V3Config.min_positive_ratio must be in [0, 1], got {self.min_positive_ratio}"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"V3Config.dropout must be in [0, 1) or null, got {self.dropout}")


# ============================================================================ device and batches


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _batches(n: int, size: int, gen: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + size] for i in range(0, n, size)]


# ============================================================================ validation proxy


@torch.no_grad()
def val_proxy(
    model: PointerSelector,
    packed: Packed | None,
    table: EmbeddingTable,
    device: torch.device,
    batch: int = 256,
) -> tuple[float | None, float]:
    """Mean reward of the greedy sequence where it is one of the group's scored candidates.

    Greedy depth = the group's longest candidate; a candidate matches when it equals the greedy
    sequence (same order). Returns (mean over matched groups or None if none, share matched).
    """
    if packed is None or len(packed) == 0:
        return None, 0.0
    was = model.training
    model.eval()
    total, matched = 0.0, 0
    try:
        for start in range(0, len(packed), batch):
            idx = torch.arange(start, min(start + batch, len(packed)))
            b = make_batch(packed, idx, table, device)
            lens = (b.seqs >= 0).sum(-1)  # [B, N]
            depth = torch.where(b.cand_mask, lens, torch.zeros_like(lens)).amax(-1)  # [B]
            greedy = model.greedy(
                model.scores(b.query, b.pool, b.pool_mask), b.seqs.shape[-1], allow_short=True
            )
            steps = torch.arange(b.seqs.shape[-1], device=device)
            # steps beyond the group's depth do not count; a match must have the group's depth
            eq = ((b.seqs == greedy[:, None, :]) | (steps >= depth[:, None, None])).all(-1)
            hit = eq & b.cand_mask & (lens == depth[:, None])
            n_hit = hit.sum(-1)
            r = torch.where(
                hit,
                b.rewards.to(torch.float64),
                torch.zeros((), dtype=torch.float64, device=device),
            )
            ok = n_hit > 0
            total += float((r.sum(-1)[ok] / n_hit[ok]).sum())
            matched += int(ok.sum())
    finally:
        model.train(was)
    if matched == 0:
        return None, 0.0
    return total / matched, matched / len(packed)


# ============================================================================ metrics & checkpoints


def _row(phase: str, epoch: int, **vals: Any) -> dict[str, Any]:
    row = {c: None for c in METRIC_COLUMNS}
    row.update(phase=phase, epoch=epoch, **vals)
    return row


def write_metrics(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Atomic CSV with :data:`icdrl.records.METRIC_COLUMNS`; empty cells where a metric does not
    apply; the last line is :func:`icdrl.records.csv_end_line` (the row count)."""
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(METRIC_COLUMNS)
            for r in rows:
                w.writerow(
                    [
                        ""
                        if r.get(c) is None
                        else (repr(float(r[c])) if isinstance(r[c], float) else r[c])
                        for c in METRIC_COLUMNS
                    ]
                )
            fh.write(
                csv_end_line(len(rows)) + "\n"
            )  # last: a CSV cut short is refused by its readers


def _epoch_path(out_ckpt: str | os.PathLike, phase: str, epoch: int) -> str:
    base = str(out_ckpt)
    base = base[:-3] if base.endswith(".pt") else base
    return f"{base}.{phase}_epoch{epoch:03d}.pt"


class _Keeper:
    """Keeps the selected epoch's weights: the last one, or the best by validation proxy."""

    def __init__(self, selection: str):
        self.selection = selection
        self.best: float | None = None
        self.state: dict | None = None
        self.tag: tuple[str, int] | None = None

    def offer(self, model: PointerSelector, phase: str, epoch: int, val: float | None) -> None:
        """Consider this epoch. "best": the highest proxy wins, ties to the earlier epoch; until
        some epoch has a proxy, the latest epoch stands in."""
        if self.selection == "last":
            take = True
        elif val is not None:
            take = self.best is None or val > self.best
        else:
            take = self.best is None
        if take:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.tag = (phase, epoch)
            if self.selection == "best" and val is not None:
                self.best = val


def _check_finite_params(model: PointerSelector, where: str) -> None:
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise FloatingPointError(f"{where}: parameter {name} became non-finite")


def _step(
    model: PointerSelector, opt: torch.optim.Optimizer, loss: Tensor, grad_clip: float
) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


# ============================================================================ v2


def sft_loss(model: PointerSelector, b: Batch, label_smoothing: float) -> Tensor:
    """Teacher-forced CE per step (:meth:`PointerSelector.step_log_probs`), averaged over every
    real step of every target sequence.

    Label smoothing spreads ``label_smoothing`` uniformly over the items still available.
    """
    tf = model.step_log_probs(model.scores(b.query, b.pool, b.pool_mask), b.seqs)
    ce = -tf.picked
    if label_smoothing > 0:
        avail = tf.avail
        smooth = torch.where(avail, tf.logp_all, torch.zeros_like(tf.logp_all)).sum(-1) / avail.sum(
            -1
        ).clamp_min(1)
        ce = (1.0 - label_smoothing) * ce - label_smoothing * smooth
    ce = torch.where(tf.valid, ce, torch.zeros_like(ce))
    return ce.sum() / tf.valid.sum().clamp_min(1)


def train_v2(
    groups: Sequence[Group],
    table: EmbeddingTable,
    cfg: V2Config,
    seed: int,
    *,
    on_step: StepCallback | None = None,
    out_ckpt: str | None = None,
) -> tuple[PointerSelector, list[dict], dict]:
    """Supervised v2 training; returns (selected model, metric rows, checkpoint meta)."""
    device = _device(cfg.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_g, val_g = split_val(groups, cfg.val_fraction, cfg.val_seed)
    targets = [t for t in (sft_group(g, cfg.top_beams) for g in train_g) if t is not None]
    if len(targets) < len(train_g):
        log.warning(
            "v2: %d of %d training anchors have no beam candidates and are skipped",
            len(train_g) - len(targets),
            len(train_g),
        )
    if not targets:
        raise ValueError("v2: no training anchor has a beam candidate")
    packed = pack_groups(targets, table)
    PointerSelector.check_sequences(packed.seqs, packed.pool_mask)
    val_packed = pack_groups(val_g, table) if val_g else None
    model = PointerSelector(
        table.dim, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dropout, cfg.temperature
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    keeper = _Keeper(cfg.selection)
    rows: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses = []
        for step, idx in enumerate(_batches(len(packed), cfg.batch_queries, gen)):
            b = make_batch(packed, idx, table, device)
            loss = sft_loss(model, b, cfg.label_smoothing)
            _step(model, opt, loss, cfg.grad_clip)
            losses.append(float(loss.detach()))
            if on_step:
                on_step("v2", epoch, step, {"loss": losses[-1]})
        _check_finite_params(model, f"v2 epoch {epoch}")
        val, cov = val_proxy(model, val_packed, table, device)
        rows.append(
            _row(
                "v2",
                epoch,
                loss=float(np.mean(losses)),
                groups_kept=len(packed),
                groups_skipped=len(train_g) - len(packed),
                val_reward=val,
            )
        )
        log.info(
            "v2 epoch %d: loss %.4f, val proxy %s (coverage %.2f)",
            epoch,
            rows[-1]["loss"],
            val,
            cov,
        )
        keeper.offer(model, "v2", epoch, val)
        if cfg.save_epochs and out_ckpt:
            model.save(
                _epoch_path(out_ckpt, "v2", epoch),
                {"phase": "v2", "epoch": epoch, "seed": seed, "train": cfg.to_dict()},
            )
    if keeper.state is not None:
        if keeper.tag and cfg.selection == "best" and keeper.best is None:
            log.warning("v2: no epoch had a validation proxy; keeping the last epoch")
        model.load_state_dict(keeper.state)
    meta = {
        "phase": "v2",
        "seed": int(seed),
        "train": cfg.to_dict(),
        "selected_epoch": keeper.tag[1] if keeper.tag else 0,
        "selection": cfg.selection,
    }
    return model.eval(), rows, meta


# ============================================================================ v3


def _tau(step: int, total: int, start: float, end: float) -> float:
    """RCE temperature falling linearly from ``start`` (step 0) to ``end`` (last step)."""
    if total <= 1:
        return start
    return start + (end - start) * step / (total - 1)


class _Agg:
    """Epoch aggregation of per-step GRPO/RCE diagnostics (group- or candidate-weighted)."""

    def __init__(self) -> None:
        self.g = 0
        self.c = 0
        self.sums: dict[str, float] = {
            "loss": 0.0,
            "ppo_loss": 0.0,
            "kl": 0.0,
            "ratio": 0.0,
            "clip": 0.0,
            "a1": 0.0,
            "a2": 0.0,
        }
        self.ratio_max: float | None = None
        self.kept = 0
        self.skipped = 0

    def add(self, d: dict) -> None:
        kept = d["groups_kept"]
        self.kept += kept
        self.skipped += d["groups_skipped"]
        self.g += kept
        for k in ("loss", "ppo_loss", "kl"):
            if k in d:
                self.sums[k] += d[k] * kept
        n = d.get("n_candidates", 0)
        if n:
            self.c += n
            self.sums["ratio"] += d["ratio_mean"] * n
            self.sums["clip"] += d["clip_frac"] * n
            self.sums["a1"] += d["adv_mean"] * n
            self.sums["a2"] += (d["adv_std"] ** 2 + d["adv_mean"] ** 2) * n
            self.ratio_max = (
                d["ratio_max"] if self.ratio_max is None else max(self.ratio_max, d["ratio_max"])
            )

    def mean(self, k: str) -> float | None:
        return self.sums[k] / self.g if self.g else None

    def row(self, phase: str, epoch: int, val: float | None) -> dict:
        if phase == "rce":
            return _row(
                phase,
                epoch,
                loss=self.mean("loss"),
                groups_kept=self.kept,
                groups_skipped=self.skipped,
                val_reward=val,
            )
        c = self.c
        a1 = self.sums["a1"] / c if c else None
        adv_std = math.sqrt(max(self.sums["a2"] / c - a1 * a1, 0.0)) if c else None
        return _row(
            phase,
            epoch,
            loss=self.mean("loss"),
            ppo_loss=self.mean("ppo_loss"),
            kl=self.mean("kl"),
            ratio_mean=self.sums["ratio"] / c if c else None,
            ratio_max=self.ratio_max,
            clip_frac=self.sums["clip"] / c if c else None,
            adv_std=adv_std,
            groups_kept=self.kept,
            groups_skipped=self.skipped,
            val_reward=val,
        )


def _grpo_logps(model: PointerSelector, old: PointerSelector, b: Batch) -> tuple[Tensor, Tensor]:
    """(logp_θ, logp_old), both with dropout off: identical weights → identical values."""
    model.eval()
    with torch.no_grad():
        lp_old = old.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask, check=False)
    lp = model.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask, check=False)
    return lp, lp_old


def train_v3(
    model: PointerSelector,
    groups: Sequence[Group],
    table: EmbeddingTable,
    cfg: V3Config,
    use_rank: bool,
    seed: int,
    *,
    on_step: StepCallback | None = None,
    out_ckpt: str | None = None,
) -> tuple[PointerSelector, list[dict], dict]:
    """RCE warm-up then GRPO from ``model`` (a trained v2); returns (selected model, rows, meta)."""
    device = _device(cfg.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if model.config["d_in"] != table.dim:
        raise ValueError(
            f"selector expects {model.config['d_in']}-d embeddings, "
            f"{table.path or 'table'} has {table.dim}"
        )
    if any(g.hard is None for g in groups) and cfg.min_positive_ratio > 0:
        raise ValueError("min_positive_ratio > 0 needs scored groups (vqa_correct)")
    model = model.to(device)
    if cfg.dropout is not None:
        model.set_dropout(cfg.dropout)
    train_g, val_g = split_val(groups, cfg.val_fraction, cfg.val_seed)
    if not train_g:
        raise ValueError("v3: no training groups")
    packed = pack_groups(train_g, table)
    PointerSelector.check_sequences(packed.seqs, packed.pool_mask)
    val_packed = pack_groups(val_g, table) if val_g else None
    rows: list[dict] = []
    keeper = _Keeper(cfg.selection)
    mpr_rce = cfg.min_positive_ratio if cfg.gate_rce else 0.0

    def after_epoch(phase: str, epoch: int, agg: _Agg, eligible: bool) -> None:
        _check_finite_params(model, f"{phase} epoch {epoch}")
        val, cov = val_proxy(model, val_packed, table, device)
        rows.append(agg.row(phase, epoch, val))
        log.info(
            "%s epoch %d: %s (val coverage %.2f)",
            phase,
            epoch,
            {k: v for k, v in rows[-1].items() if v is not None},
            cov,
        )
        if eligible:
            keeper.offer(model, phase, epoch, val)
        if cfg.save_epochs and out_ckpt:
            model.save(
                _epoch_path(out_ckpt, phase, epoch),
                {
                    "phase": phase,
                    "epoch": epoch,
                    "seed": seed,
                    "use_rank": use_rank,
                    "train": cfg.to_dict(),
                },
            )

    # ---- RCE warm-up (dropout on, as in supervised training)
    if cfg.rce_epochs:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.rce_lr, weight_decay=cfg.weight_decay)
        n_steps = cfg.rce_epochs * math.ceil(len(packed) / cfg.batch_queries)
        gstep = 0
        for epoch in range(1, cfg.rce_epochs + 1):
            model.train()
            agg = _Agg()
            for step, idx in enumerate(_batches(len(packed), cfg.batch_queries, gen)):
                b = make_batch(packed, idx, table, device)
                tau = _tau(gstep, n_steps, cfg.rce_tau_start, cfg.rce_tau_end)
                gstep += 1
                lp = model.sequence_logprob(b.query, b.pool, b.seqs, b.pool_mask, check=False)
                loss, d = rl.rce_loss(
                    lp,
                    b.rewards,
                    tau=tau,
                    use_rank=use_rank,
                    mask=b.cand_mask,
                    hard=b.hard,
                    min_positive_ratio=mpr_rce,
                )
                if d["groups_kept"]:
                    _step(model, opt, loss, cfg.grad_clip)
                agg.add(d)
                if on_step:
                    on_step("rce", epoch, step, d)
            after_epoch("rce", epoch, agg, eligible=cfg.grpo_epochs == 0)

    # ---- GRPO (dropout off everywhere: ratio exactly 1 at identical weights).
    # π_ref is the policy at GRPO start, which is also π_old during the first GRPO epoch: the
    # log-probs π_old gives each group in that epoch are kept as its π_ref log-probs, so π_ref
    # costs no forward pass of its own.
    if cfg.grpo_epochs:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.grpo_lr, weight_decay=cfg.weight_decay)
        ref_lp = torch.zeros(packed.cand_mask.shape, dtype=torch.float32, device=device)
        for epoch in range(1, cfg.grpo_epochs + 1):
            old = copy.deepcopy(model).eval()
            for p in old.parameters():
                p.requires_grad_(False)
            agg = _Agg()
            for step, idx in enumerate(_batches(len(packed), cfg.batch_queries, gen)):
                b = make_batch(packed, idx, table, device)
                lp, lp_old = _grpo_logps(model, old, b)
                n = lp_old.shape[1]
                if epoch == 1:
                    ref_lp[idx.to(device), :n] = lp_old.to(ref_lp.dtype)
                    lp_ref = lp_old
                else:
                    lp_ref = ref_lp[idx.to(device), :n].to(lp_old.dtype)
                loss, d = rl.grpo_loss(
                    lp,
                    lp_old,
                    lp_ref,
                    b.rewards,
                    use_rank=use_rank,
                    mask=b.cand_mask,
                    hard=b.hard,
                    min_positive_ratio=cfg.min_positive_ratio,
                    clip_eps=cfg.clip_eps,
                    kl_beta=cfg.kl_beta,
                    min_std=cfg.min_std,
                    adv_clip=cfg.adv_clip,
                )
                if d["groups_kept"]:
                    _step(model, opt, loss, cfg.grad_clip)
                agg.add(d)
                if on_step:
                    on_step("grpo", epoch, step, d)
            after_epoch("grpo", epoch, agg, eligible=True)

    if keeper.state is not None:
        if cfg.selection == "best" and keeper.best is None:
            log.warning("v3: no epoch had a validation proxy; keeping the last epoch")
        model.load_state_dict(keeper.state)
    meta = {
        "phase": "v3",
        "seed": int(seed),
        "use_rank": bool(use_rank),
        "train": cfg.to_dict(),
        "selected_phase": keeper.tag[0] if keeper.tag else "v2",
        "selected_epoch": keeper.tag[1] if keeper.tag else 0,
        "selection": cfg.selection,
    }
    return model.eval(), rows, meta


# ============================================================================ file entry points


def train_v2_files(
    candidates_path: str,
    train_emb_path: str,
    v2_cfg: Mapping[str, Any] | None,
    seed: int,
    out_ckpt: str,
    out_metrics: str,
    *,
    insert: str = "first",
) -> None:
    """Workflow stage: v2 from an ``icdrl.candidates`` file; writes the checkpoint and metrics CSV.

    ``insert`` is the candidates' insertion side, which fixes the beams' selection order.
    """
    cfg = V2Config.from_dict(v2_cfg)
    groups = in_label_order(load_candidate_groups(candidates_path), cfg.label_order, insert)
    table = EmbeddingTable.load(train_emb_path)
    model, rows, meta = train_v2(groups, table, cfg, int(seed), out_ckpt=out_ckpt)
    model.save(out_ckpt, {**meta, "label_order": cfg.label_order, "insert": insert})
    write_metrics(rows, out_metrics)


def train_v3_files(
    v2_ckpt: str,
    scored_path: str,
    rewards_path: str,
    train_emb_path: str,
    *,
    v3_cfg: Mapping[str, Any] | None,
    use_rank: bool,
    seed: int,
    out_ckpt: str,
    out_metrics: str,
    insert: str = "first",
    cell: Mapping[str, Any] | None = None,
) -> None:
    """Workflow stage: v3 (RCE + GRPO) from a v2 checkpoint, scored candidates and one rewards file.

    ``cell`` (:meth:`icdrl.grid.Cell.as_dict`) is stored in the checkpoint. The v2 checkpoint
    must have been trained with this cell's label order and insertion side.
    """
    cfg = V3Config.from_dict(v3_cfg)
    if not isinstance(use_rank, bool):
        raise ValueError(f"use_rank must be true or false, got {use_rank!r}")
    model = PointerSelector.load(v2_ckpt)
    parent = (
        model.checkpoint_config.get("label_order", "prompt"),
        model.checkpoint_config.get("insert", insert),
    )
    if parent != (cfg.label_order, insert):
        raise ValueError(
            f"{v2_ckpt}: trained with label_order={parent[0]}, insert={parent[1]}; this v3 cell "
            f"needs label_order={cfg.label_order}, insert={insert}"
        )
    groups = in_label_order(load_groups(scored_path, rewards_path), cfg.label_order, insert)
    table = EmbeddingTable.load(train_emb_path)
    model, rows, meta = train_v3(model, groups, table, cfg, use_rank, int(seed), out_ckpt=out_ckpt)
    model.save(
        out_ckpt,
        {
            **meta,
            "label_order": cfg.label_order,
            "insert": insert,
            "cell": dict(cell) if cell is not None else None,
        },
    )
    write_metrics(rows, out_metrics)
