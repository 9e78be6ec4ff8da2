"""The results layout (docs/science.md §9): every output path pattern of the workflow, from one config.

Paths: every output path carries exactly the settings its content depends on. Numbers appear in
one canonical spelling (:func:`icdrl.grid.fmt_float`); sections too long for a path appear as the
short hash of their canonical JSON (:func:`icdrl.grid.short_hash`) — only of that section, so
unrelated edits do not invalidate results. :class:`Layout` builds every path pattern from a
config; the grid it spans (cells, seeds, experiments) comes from :mod:`icdrl.grid`. config/README.md
draws the tree.

This module is imported by the Snakefile at parse time: keep it free of torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from icdrl.grid import (
    Cell,
    Experiment,
    RewardSpec,
    canonical,
    canonical_shots,
    cells,
    content,
    effective_v3,
    experiments,
    fmt_float,
    label_order,
    reward_specs,
    seeds,
    short_hash,
)

#: the ``{method}`` segment of a baseline's eval file: random carries its seed (random-r0)
BASELINE_RE = "zero_shot|similarity|random-r[0-9]+"
#: RICES over the whole training split (``icdrl.retrieval``), one job with the copy baseline
RICES = ("rices_image", "rices_text", "rices")
#: methods ``evaluation.ablate`` may name (``icdrl.ablations``); null = v2, plus per_shot with validation queries
ABLATABLE = ("random", "similarity", *RICES, "v2", "per_shot")
#: ``{v2}`` / ``{v3}`` path segments: the short hash of the training settings
V2_TAG_RE = "v2-[0-9a-f]{8}"
V3_TAG_RE = "v3-[0-9a-f]{8}"
#: query roles with pools; ``test`` and ``val`` are evaluated
ROLES = ("anchors", "test", "val")
EVAL_ROLES = ("test", "val")


def parse_baseline(segment: str) -> tuple[str, int | None]:
    """``(method, seed)`` of a baseline eval file name segment (``random-r3`` -> random, 3)."""
    if not re.fullmatch(BASELINE_RE, segment):
        raise ValueError(f"not a baseline method segment: {segment!r} (expected {BASELINE_RE})")
    if segment.startswith("random-r"):
        return "random", int(segment[len("random-r") :])
    return segment, None


def dataset_tag(ds: Mapping[str, Any]) -> str:
    """``results/<tag>``: the dataset's label (default: its name) plus any seeded subset, e.g.
    ``easyvqa-train1000-eval300`` (``s<seed>`` is added for a non-zero subset seed). The files a
    label stands for are the user's to keep fixed: change the label when the data changes."""
    tag = ds.get("label") or ds["name"]
    for split in ("train", "eval"):
        sec = ds.get(split) or {}
        if sec.get("subset") is not None:
            tag += f"-{split}{sec['subset']}"
            if sec.get("subset_seed", 0):
                tag += f"s{sec['subset_seed']}"
    return tag


def _join(*parts: str) -> str:
    return str(PurePosixPath(*parts))


@dataclass(frozen=True)
class TrainedCell:
    """Where one cell trains: its ``{v3}`` tag (training settings), parent ``{v2}`` tag and settings."""

    cell: Cell
    v3_tag: str
    v2_tag: str
    v3_config: dict[str, Any]  # effective train.v3 (runtime keys included), canonical: sorted keys


class Layout:
    """Every path pattern of the workflow for one config.

    Config-dependent segments are filled in; the remaining ``{wildcards}`` are the dimensions
    one config spans: ``split`` (train/eval), ``role``, ``shard``, ``reward``, ``adv``, ``v2``,
    ``v3``, ``seed``, ``method``. See config/README.md for the tree.
    """

    def __init__(self, config: Mapping[str, Any], results: str = "results"):
        ds, model, emb, pools = (config[k] for k in ("dataset", "model", "embeddings", "pools"))
        cand, scoring, train, ev = (
            config[k] for k in ("candidates", "scoring", "train", "evaluation")
        )
        self.config = config
        self.n_shards = int(cand["shards"])
        self.embedded = model["kind"] == "embedded"
        root = _join(results, dataset_tag(ds))
        self.root = root

        # the LVLM: the embedded model depends on its training knobs only
        self.lvlm_tag = (
            f"{model['name']}-{short_hash(content(config['embedded_lvlm'], 'embedded_lvlm'))}"
            if self.embedded
            else None
        )
        # (it is trained on easy-VQA whatever the dataset section says: not under the dataset)
        lvlm_dir = _join(results, "lvlm", self.lvlm_tag) if self.embedded else None
        self.lvlm_model = _join(lvlm_dir, "model") if self.embedded else None
        self.icl_check = _join(lvlm_dir, "icl_check.json") if self.embedded else None
        self.model_path = self.lvlm_model if self.embedded else str(model["path"])

        # model tag: name (+ embedded hash) + non-default output-changing settings
        mtag = self.lvlm_tag if self.embedded else model["name"]
        if model.get("dtype", "float32") != "float32":
            mtag += f"-{model['dtype']}"
        if model.get("system_prompt"):
            mtag += f"-sp{short_hash(model['system_prompt'], 6)}"
        self.model_tag = mtag

        # embeddings: the encoder (+ the model for the lvlm encoder)
        if emb["encoder"] == "lvlm":
            self.enc_tag = f"lvlm-{mtag}"
        else:
            self.enc_tag = emb.get("name") or f"clip-{PurePosixPath(str(emb['clip_path'])).name}"
        self.emb = _join(root, "emb", self.enc_tag, "{split}.npz")

        # pools: sampler, K, pool seed (+ no ICD of the query's image at all: -xi) (+ n per role)
        self.exclude_same_image = bool(pools.get("exclude_same_image", False))
        self.pool_tag = f"{pools['sampler']}-K{pools['size']}-s{pools['seed']}" + (
            "-xi" if self.exclude_same_image else ""
        )
        self.n_queries = {
            "anchors": int(pools["n_anchors"]),
            "test": int(pools["n_test"]),
            "val": int(pools.get("n_val", 0)),
        }
        self.n_anchors, self.n_test, self.n_val = (self.n_queries[r] for r in ROLES)
        self.pools = _join(root, "pools", self.enc_tag, self.pool_tag, "{role}-n{n}.jsonl")
        self.pools_anchors, self.pools_test, self.pools_val = (self.pools_of(r) for r in ROLES)

        # everything the LVLM answered lives under <model>/<encoder>/<pools>
        # (encoder "lvlm" is this model itself: no need to repeat its tag)
        run = _join(root, mtag, "lvlm" if emb["encoder"] == "lvlm" else self.enc_tag, self.pool_tag)
        self.run_dir = run
        self.cand_tag = (
            f"B{cand['beam_width']}-D{cand['depth']}-{cand['insert']}"
            f"-r{cand['n_random']}-m{cand['n_similar']}-s{cand['seed']}"
        )
        cand_dir = _join(run, f"anchors-n{self.n_anchors}", self.cand_tag)
        self.cand_dir = cand_dir
        self.candidates_shard = _join(
            cand_dir, "shards", f"candidates-{{shard}}-of-{self.n_shards}.jsonl"
        )
        self.candidates = _join(cand_dir, "candidates.jsonl")
        self.scored_tag = (
            f"scored-t{fmt_float(scoring['correct_threshold'])}-mnt{model['max_new_tokens']}"
            f"-{scoring['metric']}"
        )
        scored_dir = _join(cand_dir, self.scored_tag)
        self.scored_dir = scored_dir
        self.scored_shard = _join(
            scored_dir, "shards", f"scored-{{shard}}-of-{self.n_shards}.jsonl"
        )
        self.scored = _join(scored_dir, "scored.jsonl")
        self.rewards = _join(scored_dir, "rewards", "{reward}.jsonl")

        # evaluation file names: query role and count, shots, generation length, VQA metric
        shots = ".".join(str(k) for k in canonical_shots(ev["shots"]))
        self.eval_name = {
            r: f"{r}-n{self.n_queries[r]}-k{shots}-mnt{model['max_new_tokens']}-{scoring['metric']}.jsonl"
            for r in EVAL_ROLES
        }
        self.eval_baseline = _join(run, self.eval_name["test"][: -len(".jsonl")], "{method}.jsonl")
        self.baselines = ["zero_shot", f"random-r{ev['random_seed']}", "similarity"]
        # RICES over the whole training split and the copy baseline: one job, beside the baselines
        self.rices = [m for m in RICES if m in ev.get("rices", RICES)]
        self.eval_rices = {m: self.eval_baseline.format(method=m) for m in [*self.rices, "copy"]}
        # the training split's answers, read by the report's diagnostics (dataset only)
        self.answers = _join(root, "answers", "train.json")
        self.shuffle_tag = f"shuffled-r{ev['random_seed']}"

        # training: v2 on candidates ({v2} = hash of its settings); v3 on v2 + scored + rewards
        # ({v3} = hash of the parent v2's and its own settings, per cell)
        v2_base = content(train["v2"], "train.v2")
        self._v2: dict[str, dict[str, Any]] = {}
        self.v2_tag = self._add_v2(v2_base)
        self._cells: dict[tuple[str, str, str], TrainedCell] = {}
        for c in cells(config):
            v3 = {**train["v3"], **dict(c.train)}
            v2 = {**v2_base, "label_order": label_order(v2_base, v3)}
            v2_tag = self._add_v2(v2)
            v3_tag = f"v3-{short_hash({'v2': canonical(v2), 'v3': effective_v3(v3)})}"
            self._cells[(v3_tag, c.reward.slug, c.adv)] = TrainedCell(
                c, v3_tag, v2_tag, canonical(v3)
            )
        v2_dir = _join(cand_dir, "{v2}", "seed{seed}")
        self.v2_ckpt = _join(v2_dir, "selector.pt")
        self.v2_metrics = _join(v2_dir, "metrics.csv")
        self.eval_v2 = _join(v2_dir, self.eval_name["test"])
        v3_dir = _join(scored_dir, "{v3}", "{reward}", "{adv}", "seed{seed}")
        self.v3_ckpt = _join(v3_dir, "selector.pt")
        self.v3_metrics = _join(v3_dir, "metrics.csv")
        self.eval_v3 = _join(v3_dir, self.eval_name["test"])
        # the same job also answers the validation queries (pools.n_val > 0)
        self.val_v3 = _join(v3_dir, self.eval_name["val"]) if self.n_val else None
        # per_shot (docs/science.md §8): per k, the v3 cell best on the validation queries; keyed by the cells
        # it chooses among
        self.per_shot = None
        if self.n_val:
            among = short_hash(sorted(self._cells))
            self.per_shot = _join(
                scored_dir, f"per_shot-{among}", "seed{seed}", self.eval_name["test"]
            )

        # ablations (evaluation.ablate): beside each ablated method's eval file
        self.ablate = self._ablated_methods(ev.get("ablate"))

        # the report of this config's methods: one folder per set of evaluation files
        self.report_dir = _join(root, mtag, "report", short_hash(sorted(self.all_eval())))

    def _ablated_methods(self, ablate: Sequence[str] | None) -> list[str]:
        """``evaluation.ablate``, or its default: v2, plus per_shot where there are validation queries."""
        if ablate is None:
            return ["v2"] + (["per_shot"] if self.per_shot else [])
        for m in ablate:
            if m not in ABLATABLE:
                raise ValueError(
                    f"config key evaluation.ablate: {m!r} is not one of {', '.join(ABLATABLE)}"
                )
            if m == "per_shot" and not self.per_shot:
                raise ValueError(
                    "config key evaluation.ablate: per_shot needs validation queries (pools.n_val > 0)"
                )
            if m in RICES and m not in self.rices:
                raise ValueError(
                    f"config key evaluation.ablate: {m} is not evaluated (evaluation.rices)"
                )
        return list(dict.fromkeys(ablate))

    def ablation_bases(self) -> list[str]:
        """The eval files (test queries) of the ablated methods; seeded methods (v2, per_shot) at the
        first training seed only: an ablation is paired with that seed's records, and the seeds'
        cost would multiply the most expensive evaluation jobs."""
        out = []
        first = self.seeds()[0]
        for m in self.ablate:
            if m == "v2":
                out.append(self.eval_v2.format(v2=self.v2_tag, seed=first))
            elif m == "per_shot":
                out.append(self.per_shot.format(seed=first))
            elif m == "random":
                out.append(self.eval_baseline.format(method=self.baselines[1]))
            elif m in RICES:
                out.append(self.eval_rices[m])
            else:
                out.append(self.eval_baseline.format(method=m))
        return out

    def ablation_outputs(self, base: str) -> dict[str, str]:
        """``{ablation: eval file}`` of one ablated eval file: beside it, ``<name>.<ablation tag>.jsonl``."""
        stem = base[: -len(".jsonl")]
        return {
            "shuffled": f"{stem}.{self.shuffle_tag}.jsonl",
            "no_images": f"{stem}.no_images.jsonl",
        }

    def _add_v2(self, v2: Mapping[str, Any]) -> str:
        tag = f"v2-{short_hash(canonical(dict(v2)))}"
        self._v2[tag] = dict(v2)
        return tag

    # -------------------------------------------------------------- lookups for rules

    def pools_of(self, role: str) -> str:
        return self.pools.format(role=role, n=self.n_queries[role])

    def trained_cells(self) -> list[TrainedCell]:
        return list(self._cells.values())

    def trained_cell(self, v3: str, reward: str, adv: str) -> TrainedCell:
        """The cell behind a ``{v3}/{reward}/{adv}`` path (``KeyError`` naming it if none)."""
        try:
            return self._cells[(v3, reward, adv)]
        except KeyError:
            raise KeyError(f"no grid cell trains at {v3}/{reward}/{adv} in this config") from None

    def v2_config(self, v2: str) -> dict[str, Any]:
        """The ``train.v2`` settings behind a ``{v2}`` tag (runtime keys from the config), canonical
        (sorted keys), so that a reordered config file changes no rule's params."""
        if v2 not in self._v2:
            raise KeyError(f"no v2 selector {v2} in this config")
        return canonical({**self.config["train"]["v2"], **self._v2[v2]})

    def v3_path(self, pattern: str, tc: TrainedCell, seed: int, **extra: Any) -> str:
        return pattern.format(
            v3=tc.v3_tag, reward=tc.cell.reward.slug, adv=tc.cell.adv, seed=seed, **extra
        )

    # -------------------------------------------------------------- expansions for targets

    def cells(self) -> list[Cell]:
        return [tc.cell for tc in self._cells.values()]

    def seeds(self) -> list[int]:
        return seeds(self.config)

    def experiments(self) -> list[Experiment]:
        return experiments(self.config)

    def reward_specs(self) -> list[RewardSpec]:
        return reward_specs(self.cells())

    def all_rewards(self) -> list[str]:
        return [self.rewards.format(reward=r.slug) for r in self.reward_specs()]

    def all_v2(self, pattern: str, v2: str | None = None) -> list[str]:
        return [pattern.format(v2=v2 or self.v2_tag, seed=s) for s in self.seeds()]

    def all_v3(self, pattern: str, **extra: Any) -> list[str]:
        return [
            self.v3_path(pattern, tc, s, **extra)
            for tc in self._cells.values()
            for s in self.seeds()
        ]

    def v3_evals(self, role: str, seed: int | None = None) -> list[str]:
        """Evaluation files of every v3 cell on the ``role`` (test, val) queries (one seed, or all)."""
        pattern = self.eval_v3 if role == "test" else self.val_v3
        if pattern is None:
            return []
        ss = self.seeds() if seed is None else [seed]
        return [self.v3_path(pattern, tc, s) for tc in self._cells.values() for s in ss]

    def all_eval(self) -> list[str]:
        """Every evaluation file on the test queries the report reads (ablations included)."""
        out = (
            [self.eval_baseline.format(method=m) for m in self.baselines]
            + list(self.eval_rices.values())
            + self.all_v2(self.eval_v2)
            + self.v3_evals("test")
        )
        if self.per_shot:
            out += [self.per_shot.format(seed=s) for s in self.seeds()]
        return out + [p for b in self.ablation_bases() for p in self.ablation_outputs(b).values()]

    def labelled_metrics(self) -> dict[str, str]:
        """Training-metrics CSVs by label (``v2 seed0``, ``v3 <cell slug> seed0``)."""
        out = {f"v2 seed{s}": self.v2_metrics.format(v2=self.v2_tag, seed=s) for s in self.seeds()}
        for tc in self._cells.values():
            for s in self.seeds():
                out[f"v3 {tc.cell.slug} seed{s}"] = self.v3_path(self.v3_metrics, tc, s)
        return out

    def shards(self, pattern: str) -> list[str]:
        return [pattern.format(shard=i) for i in range(self.n_shards)]
