"""Realistic synthetic inputs for the report tests (eval, metrics, rewards, scored files).

Accuracies follow a logistic model with a shared per-query difficulty (so methods are
correlated over queries, as in real paired evaluations), a per-method-and-shot effect shaped
like the reference implementation's findings (hard_plus_soft below legacy at 1–2 shots), small per-seed offsets,
and VQA-style partial credit (0, 0.3, 0.6, 0.9, 1.0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from icdrl.records import METRIC_COLUMNS, csv_end_line, write_jsonl

MODES = ("legacy", "hard_plus_soft", "hard_plus_soft_v2", "hybrid")
SOURCES = (
    "beam",
    "beam",
    "beam",
    "beam",
    "beam",
    "random",
    "random",
    "random",
    "random",
    "similar",
    "similar",
    "similar",
)


def _config(modes, use_rank, weights) -> dict:
    """The smallest config icdrl.grid expands: a modes experiment and a weights experiment."""
    exps = {
        "modes": {
            "title": "Reward modes vs legacy",
            "reward_modes": list(modes),
            "contrast": "reward_modes",
            "reference": modes[0],
        }
    }
    if len(weights) > 1:
        exps["weights"] = {
            "title": "Weights",
            "reward_modes": [m for m in modes if m != "legacy"],
            "weights": [list(w) for w in weights],
            "contrast": "weights",
            "reference": list(weights[0]),
        }
    if len(use_rank) > 1:
        exps["use_rank"] = {"reward_modes": list(modes), "contrast": "use_rank", "reference": True}
    return {
        "grid": {"use_rank": list(use_rank), "weights": [list(weights[0])], "experiments": exps},
        "rewards": {},
        "train": {"v3": {}},
    }


def experiments(
    modes=MODES, use_rank=(True, False), weights=((1.0, 1.0), (2.0, 1.0))
) -> list[dict]:
    """The experiments of such a grid, as the report rule receives them."""
    from icdrl.grid import experiments as expand

    return [e.as_dict() for e in expand(_config(modes, use_rank, weights))]


def cells(modes=MODES, use_rank=(True, False), weights=((1.0, 1.0), (2.0, 1.0))) -> list[dict]:
    """The merged cells (:meth:`icdrl.grid.Cell.as_dict`, plus ``cell`` = the slug)."""
    from icdrl.grid import cells as merged

    return [c.as_dict() | {"cell": c.slug} for c in merged(_config(modes, use_rank, weights))]


def reward_specs(modes=MODES, weights=((1.0, 1.0), (2.0, 1.0))) -> list[dict]:
    """The distinct reward settings of those cells: ``{"mode", "knobs", "slug"}``."""
    from icdrl.grid import cells as merged
    from icdrl.grid import reward_specs as distinct

    specs = distinct(merged(_config(modes, (True, False), weights)))
    return [{"mode": r.mode, "knobs": r.as_dict(), "slug": r.slug} for r in specs]


def _effect(c: dict | None, method: str, k: int) -> float:
    """Logit effect of a method at shot k (seed-like pattern)."""
    base = {
        "zero_shot": -0.7,
        "random": 0.05 - 0.08 * (k - 1),
        "similarity": 0.2 - 0.03 * (k - 1),
        "v2": 0.25 - 0.03 * (k - 1),
        "rices": 0.6 + 0.05 * (k - 1),
        "copy": 0.3,
    }
    if method != "v3":
        return base[method]
    eff = 0.32 - 0.07 * (k - 1)
    mode_eff = {
        "legacy": (0, 0, 0, 0),
        "hard_plus_soft": (-0.35, -0.12, 0.05, 0.03),
        "hard_plus_soft_v2": (-0.1, 0.0, 0.06, 0.05),
        "hybrid": (-0.05, -0.02, 0.0, 0.02),
    }[c["mode"]]
    eff += mode_eff[min(k, 4) - 1]
    if c["knobs"].get("hard_weight") == 2.0:
        eff += 0.08
    if not c["use_rank"]:
        eff += 0.04
    return eff


def _acc(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-logits))
    right = rng.random(logits.shape) < p
    partial = rng.choice([0.0, 0.0, 0.0, 0.3, 0.6, 0.9], size=logits.shape)
    return np.where(right, 1.0, partial)


#: the training answers of the synthetic ICDs (ids 0..N_TRAIN-1) and the closed vocabulary
VOCAB = ("red", "blue", "green", "circle", "yes", "no")
N_TRAIN = 60


def train_answer(i: int) -> str:
    return VOCAB[(i * 7) % len(VOCAB)]


def _demos_and_prediction(rng: np.random.Generator, method: str, k: int) -> tuple[list[int], str]:
    """ICD ids and a prediction that copies the last / some demonstration, says another word, or is
    in the verbose form, with method-dependent rates (for the diagnostics)."""
    if method == "zero_shot":
        return [], ("the answer is red" if rng.random() < 0.7 else "blue")
    ids = [int(i) for i in rng.choice(N_TRAIN, size=k, replace=False)]
    u = rng.random()
    last = {"rices": 0.6, "copy": 0.6}.get(method, 0.3)
    if u < last:
        return ids, train_answer(ids[-1])
    if u < last + 0.2:
        return ids, train_answer(ids[int(rng.integers(0, k))])
    if u < last + 0.3:
        return ids, "the answer is " + VOCAB[int(rng.integers(0, len(VOCAB)))]
    return ids, VOCAB[int(rng.integers(0, len(VOCAB)))]


def write_answers(root: Path) -> str:
    """The answers table of the synthetic training split (``icdrl.answers``)."""
    import json

    from icdrl.metrics import normalize_answer

    doc = {
        "schema": "icdrl.answers",
        "version": 1,
        "split": "train",
        "dataset": "synth",
        "vocabulary": sorted(normalize_answer(a) for a in VOCAB),
        "answers": [[i, train_answer(i)] for i in range(N_TRAIN)],
    }
    p = root / "answers-train.json"
    p.write_text(json.dumps(doc))
    return str(p)


def write_eval(
    root: Path,
    cell_list: list[dict],
    n_queries: int = 200,
    seeds=(0, 1),
    shots=(1, 2, 3, 4),
    rng_seed: int = 0,
    baselines=("zero_shot", "random", "similarity", "v2"),
    ablate_v2: bool = False,
    per_image: int = 2,
) -> list[str]:
    """One eval file per (method[, cell], seed), like the workflow writes them; ``ablate_v2``: also
    the shuffled (k >= 2) and no-images ablations of v2, with the same ICDs.

    ``per_image`` consecutive queries share an image (``image_id``; 0: no image ids recorded).
    """
    rng = np.random.default_rng(rng_seed)
    demo_rng = np.random.default_rng(
        rng_seed + 1000
    )  # a stream of its own: accuracies do not depend on it
    qids = np.arange(1000, 1000 + n_queries) * 7
    difficulty = rng.normal(0.3, 1.3, size=n_queries)
    paths = []
    runs = [(m, None, None) for m in baselines if m != "v2"]
    runs += [("v2", None, s) for s in seeds if "v2" in baselines]
    runs += [("v3", c, s) for c in cell_list for s in seeds]
    for method, c, seed in runs:
        recs = []
        seed_off = 0.0 if seed is None else rng.normal(0, 0.05)
        for k in shots:
            acc = _acc(rng, difficulty + _effect(c, method, k) + seed_off)
            for q, a in zip(qids, acc):
                ids, pred = _demos_and_prediction(demo_rng, method, k)
                rec = {
                    "method": method,
                    "cell": c["cell"] if c else None,
                    "seed": seed,
                    "k": k,
                    "query_id": int(q),
                    "icd_ids": ids,
                    "prediction_raw": pred,
                    "prediction": pred,
                    "acc": float(a),
                }
                if per_image:
                    rec["image_id"] = f"img{(int(q) // 7) // per_image}"
                if c:
                    rec["spec"] = {
                        key: c[key] for key in ("slug", "mode", "knobs", "use_rank", "train")
                    }
                recs.append(rec)
        name = method if c is None else c["cell"]
        p = root / "eval" / f"{name}{'' if seed is None else f'-seed{seed}'}.jsonl"
        write_jsonl(p, "icdrl.eval", recs)
        paths.append(str(p))
        if ablate_v2 and method == "v2":
            paths += write_ablations(root, recs, rng)
    return paths


def write_ablations(root: Path, base: list[dict], rng: np.random.Generator) -> list[str]:
    """The two ablations of one method's records: shuffled (k >= 2: about 10 points worse) and
    no_images (about 30 points worse), with the base records' ICDs."""
    paths = []
    for ablation, drop in (("shuffled", 0.1), ("no_images", 0.3)):
        recs = []
        for r in base:
            if ablation == "shuffled" and r["k"] < 2:
                continue
            ids = r["icd_ids"][::-1] if ablation == "shuffled" else r["icd_ids"]
            acc = 0.0 if rng.random() < drop else r["acc"]
            recs.append(
                r
                | {
                    "method": ablation,
                    "icd_ids": ids,
                    "acc": acc,
                    "spec": {
                        "ablation": ablation,
                        "of": {"method": r["method"], "cell": r["cell"], "spec": r.get("spec")},
                        "shuffle_seed": 0 if ablation == "shuffled" else None,
                    },
                }
            )
        p = root / "eval" / f"{base[0]['method']}-seed{base[0]['seed']}.{ablation}.jsonl"
        write_jsonl(p, "icdrl.eval", recs)
        paths.append(str(p))
    return paths


def _to_csv(df: pd.DataFrame, path: Path) -> None:
    """A metrics CSV as icdrl.train.write_metrics writes it: data rows, then the end line."""
    df.to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write(csv_end_line(len(df)) + "\n")


def write_metrics(
    root: Path, cell_list: list[dict], seeds=(0, 1), rng_seed: int = 1
) -> dict[str, str]:
    """Training-metrics CSVs: v2 per seed (phase v2), v3 per cell × seed (phases rce, grpo)."""
    rng = np.random.default_rng(rng_seed)
    out = {}
    cols = list(METRIC_COLUMNS)
    for s in seeds:
        rows = [
            {
                "phase": "v2",
                "epoch": e,
                "loss": 3.0 * math.exp(-e / 4) + 0.4 + rng.normal(0, 0.02),
                "val_reward": 0.4 + 0.2 * (1 - math.exp(-e / 3)),
            }
            for e in range(10)
        ]
        p = root / "metrics" / "v2" / f"seed{s}" / "metrics.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        _to_csv(pd.DataFrame(rows, columns=cols), p)
        out[f"v2 seed{s}"] = str(p)  # labels as icdrl.layout.Layout.labelled_metrics writes them
    for c in cell_list:
        for s in seeds:
            rows = [
                {
                    "phase": "rce",
                    "epoch": e,
                    "loss": 2.0 - 0.2 * e + rng.normal(0, 0.02),
                    "groups_kept": 100,
                    "groups_skipped": 20,
                    "val_reward": 0.5 + 0.02 * e,
                }
                for e in range(3)
            ]
            kept = 60 if c["mode"] != "legacy" else 120
            for e in range(8):
                rows.append(
                    {
                        "phase": "grpo",
                        "epoch": e,
                        "loss": -0.02 * e + 0.01 * rng.normal(),
                        "ppo_loss": -0.025 * e,
                        "kl": 0.002 * e**1.3,
                        "ratio_mean": 1.0 + rng.normal(0, 0.01),
                        "ratio_max": 1.2 + 0.05 * e,
                        "clip_frac": 0.05 + 0.01 * e,
                        "adv_std": 0.9 if c["use_rank"] else 0.7,
                        "groups_kept": kept,
                        "groups_skipped": 120 - kept + 20,
                        "val_reward": 0.56 + 0.01 * e,
                    }
                )
            p = root / "metrics" / c["cell"] / f"seed{s}" / "metrics.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            _to_csv(pd.DataFrame(rows, columns=cols), p)
            out[f"v3 {c['cell']} seed{s}"] = str(p)
    return out


def synth_groups(n_anchors: int = 120, rng_seed: int = 2):
    """Per anchor: hard (0/1), soft (VQA acc), info (InfoScore) per candidate, some info missing."""
    rng = np.random.default_rng(rng_seed)
    groups = []
    for a in range(n_anchors):
        p = rng.beta(0.6, 0.8)
        n = len(SOURCES)
        hard = (rng.random(n) < p).astype(float)
        soft = np.where(hard == 1, 1.0, rng.choice([0.0, 0.0, 0.3, 0.6, 0.9], size=n))
        info = rng.normal(0.01, 0.03, size=n) + 0.02 * hard
        info = [None if rng.random() < 0.01 else float(v) for v in info]
        groups.append({"anchor_id": 10 * a + 1, "hard": hard, "soft": soft, "info": info})
    return groups


def reward_values(spec: dict, hard, soft, info) -> np.ndarray:
    """The library's rewards of one group (missing inputs count as 0)."""
    from icdrl.rewards import group_rewards

    return group_rewards(spec["mode"], hard=hard, soft=soft, info=info, **spec["knobs"])


def write_scored_and_rewards(
    root: Path, specs: list[dict], n_anchors: int = 120
) -> tuple[str, dict[str, str]]:
    groups = synth_groups(n_anchors)
    scored = []
    for g in groups:
        cands = []
        for j, src in enumerate(SOURCES):
            cands.append(
                {
                    "source": src,
                    "icd_ids": [j, j + 1],
                    "icd_pos": [j, j + 1],
                    "info_score": g["info"][j],
                    "step_gains": [0.0, 0.0],
                    "prediction_raw": "x",
                    "prediction": "x",
                    "vqa_acc_score": float(g["soft"][j]),
                    "vqa_correct": int(g["hard"][j]),
                }
            )
        scored.append(
            {
                "anchor_id": g["anchor_id"],
                "pool": list(range(16)),
                "zero_shot_logprob": -1.0,
                "zero_shot_prob": 0.37,
                "candidates": cands,
            }
        )
    scored_path = root / "scored.jsonl"
    write_jsonl(scored_path, "icdrl.scored", scored)
    rewards = {}
    for spec in specs:
        recs = []
        for g in groups:
            r = reward_values(spec, g["hard"], g["soft"], g["info"])
            missing = (
                sum(v is None for v in g["info"])
                if spec["mode"] in ("legacy", "hybrid", "adaptive")
                else 0
            )
            recs.append(
                {
                    "anchor_id": g["anchor_id"],
                    "rewards": r.tolist(),
                    "hard": g["hard"].tolist(),
                    "soft": g["soft"].tolist(),
                    "info": [0.0 if v is None else v for v in g["info"]],
                    "missing": missing,
                }
            )
        p = root / "rewards" / f"{spec['slug']}.jsonl"
        write_jsonl(p, "icdrl.rewards", recs)
        rewards[spec["slug"]] = str(p)
    return str(scored_path), rewards


def make_inputs(
    root,
    n_queries: int = 200,
    seeds=(0, 1),
    modes=MODES,
    use_rank=(True, False),
    weights=((1.0, 1.0), (2.0, 1.0)),
    n_anchors: int = 120,
) -> dict:
    """Write a full set of report inputs under ``root``; return build_report's arguments."""
    root = Path(root)
    cl = cells(modes, use_rank, weights)
    eval_paths = write_eval(
        root,
        cl,
        n_queries=n_queries,
        seeds=seeds,
        baselines=("zero_shot", "random", "similarity", "rices", "copy", "v2"),
        ablate_v2=True,
    )
    metrics = write_metrics(root, cl, seeds=seeds)
    scored, rewards = write_scored_and_rewards(
        root, reward_specs(modes, weights), n_anchors=n_anchors
    )
    return {
        "eval_paths": eval_paths,
        "metrics_paths": metrics,
        "rewards_paths": rewards,
        "scored_path": scored,
        "cells": cl,
        "experiments": experiments(modes, use_rank, weights),
        "answers": write_answers(root),
    }
