"""The Snakemake workflow without running jobs: DAGs, lint, bad input, env overrides, profile."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from workflow_util import ALL_RULES, CONFIG, ROOT, dry_run, job_counts, snakemake


def test_default_dry_run_lists_every_stage(tmp_path):
    counts = dry_run(workdir=tmp_path)  # no --configfile: the embedded default
    assert set(counts) == ALL_RULES
    assert (
        counts["train_lvlm"] == 1 and counts["embed"] == 2 and counts["pools"] == 3
    )  # anchors, test, val
    assert counts["candidates_shard"] == counts["score_shard"] == 2
    assert counts["train_v3"] == counts["evaluate_v3"] == 12  # merged experiment cells x 1 seed
    assert counts["train_v2"] == 2  # the v2 method, and the selection-order parent of one v3 cell
    assert counts["rewards"] == 7 and counts["evaluate_baseline"] == 3 and counts["report"] == 1
    assert counts["select_per_shot"] == 1
    # RICES x 3 and copy in one job; both ablations of v2 and of per_shot, one job each
    assert (
        counts["evaluate_rices"] == 1
        and counts["evaluate_ablation"] == 2
        and counts["answers"] == 1
    )
    assert not (tmp_path / "results").exists()  # a dry run plans only


def test_seed_config_dry_run_without_data_or_weights(tmp_path):
    """The reference implementation's setting (OK-VQA, Qwen2.5-VL-3B, 3 seeds, 8 shards) plans on a machine with
    neither the data nor the weights; the DAG time is measured in benchmarks/."""
    t0 = time.perf_counter()
    proc = snakemake(
        "-n", "--configfile", str(CONFIG / "okvqa_qwen2.5vl3b.yaml"), workdir=tmp_path, check=True
    )
    elapsed = time.perf_counter() - t0
    counts = job_counts(proc.stdout + proc.stderr)
    assert "train_lvlm" not in counts and "icl_check" not in counts
    assert counts["candidates_shard"] == counts["score_shard"] == 8
    assert counts["concat_candidates"] == counts["concat_scored"] == 1
    assert (
        counts["evaluate_v2"] == 3 and counts["train_v2"] == 2 * 3
    )  # + the selection-order parent
    # exp 1-3, plans 2, 4, 5, adaptive and label order merged: 15 cells x 3 seeds
    assert counts["train_v3"] == counts["evaluate_v3"] == 15 * 3
    assert (
        counts["rewards"] == 11
        and counts["evaluate_baseline"] == 3
        and counts["select_per_shot"] == 3
    )
    assert (
        counts["evaluate_rices"] == 1 and counts["evaluate_ablation"] == 2
    )  # ablations: the first seed only
    # the DAG holds every plan's jobs (their v3 folders and reward files)
    out = proc.stdout
    for plan in (
        "hard_plus_soft_v2-hw1-sw1/zscore",  # plan 4's reference and label order's
        "rewards/legacy-a0-b1.jsonl",  # plan 5
        "rewards/hybrid-ha0.25-is10.jsonl",
        "rewards/hybrid-ha0.75-is10.jsonl",  # hybrid_alpha
        "rewards/adaptive-is10.jsonl",
        "per_shot-",
        "val-n200-k1.2.3.4-mnt10-official.jsonl",
    ):
        assert plan in out, plan
    assert (
        len(set(re.findall(r"(v3-[0-9a-f]{8})/hard_plus_soft_v2-hw1-sw1/zscore", out))) == 4
    )  # +mpr, +gate, +order
    print(f"reference-setting dry run: {elapsed:.1f} s")


def test_lint_is_clean():
    proc = snakemake("--lint", workdir=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def _write(tmp_path, name, cfg) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _load(name):
    return yaml.safe_load((CONFIG / name).read_text())


def test_invalid_config_fails_before_any_job(tmp_path):
    cfg = _load("test.yaml")
    cfg["candidates"]["beam_widht"] = 3
    proc = snakemake(
        "--cores", "1", "--configfile", _write(tmp_path, "bad.yaml", cfg), workdir=tmp_path
    )
    assert proc.returncode != 0
    out = (proc.stdout + proc.stderr).strip().splitlines()
    errors = [line for line in out if line.startswith("icdrl:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, out
    assert errors[0].startswith(
        "icdrl: config key candidates.beam_widht: unknown key (allowed here: beam_width,"
    )
    assert not (tmp_path / "results").exists()


def test_missing_dataset_fails_with_one_line_before_any_job(tmp_path):
    cfg = _load("okvqa_qwen2.5vl3b.yaml")
    for split in ("train", "eval"):
        for key in ("questions", "annotations", "images"):
            cfg["dataset"][split][key] = str(tmp_path / "missing" / split / key)
    cfg["model"]["path"] = str(tmp_path / "no-model")
    cfg["embeddings"]["clip_path"] = str(tmp_path / "no-clip")
    path = _write(tmp_path, "okvqa.yaml", cfg)
    # a dry run plans without the data ...
    assert dry_run("--configfile", path, workdir=tmp_path)["candidates_shard"] == 8
    # ... a real run stops at start, with one line naming the key and the path
    proc = snakemake("--cores", "1", "--configfile", path, workdir=tmp_path)
    assert proc.returncode != 0
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("icdrl:")
    ]
    assert errors == [
        f"icdrl: dataset.train.questions: file not found: {tmp_path / 'missing/train/questions'} "
        f"(set in {path})"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_missing_model_folder_fails_with_one_line(tmp_path):
    cfg = _load("test.yaml")
    cfg["model"] = {"name": "qwen", "kind": "hf", "path": str(tmp_path / "Qwen2.5-VL-3B-Instruct")}
    cfg.pop("embedded_lvlm")
    proc = snakemake(
        "--cores", "1", "--configfile", _write(tmp_path, "hf.yaml", cfg), workdir=tmp_path
    )
    assert proc.returncode != 0
    errors = [
        line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("icdrl:")
    ]
    assert errors == [
        f"icdrl: config key model.path: model folder {tmp_path / 'Qwen2.5-VL-3B-Instruct'} not found "
        f"(set in {tmp_path / 'hf.yaml'})"
    ]
    assert not (tmp_path / "results").exists()


def test_env_override_restricts_the_grid(tmp_path):
    env = {"REWARD_MODE": "hybrid"}
    proc = snakemake(
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        str(CONFIG / "test.yaml"),
        workdir=tmp_path,
        env=env,
        check=True,
    )
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["train_v3"] == 2 and counts["rewards"] == 1  # hybrid x (rank, z-score)

    # a restricted run writes its own report: the full one is never scheduled, so never overwritten
    def report_dir(env):
        out = snakemake(
            "-n", "--configfile", str(CONFIG / "test.yaml"), workdir=tmp_path, env=env, check=True
        ).stdout
        return re.search(r"report/([0-9a-f]{8})/accuracy.csv", out).group(1)

    assert report_dir(env) != report_dir({})
    assert "icdrl: env overrides applied to the grid: reward_mode=hybrid" in proc.stderr


def test_slurm_profile_plans(tmp_path):
    """The SLURM profile parses and plans the reference implementation's setting (no cluster needed for a dry run)."""
    proc = snakemake(
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "-n",
        "--quiet",
        "rules",
        "--configfile",
        str(CONFIG / "okvqa_qwen2.5vl3b.yaml"),
        workdir=tmp_path,
        check=True,
    )
    assert job_counts(proc.stdout + proc.stderr)["train_v3"] == 45


@pytest.mark.parametrize(
    "rule",
    [
        "embed",
        "candidates_shard",
        "score_shard",
        "train_v2",
        "train_v3",
        "evaluate_baseline",
        "evaluate_rices",
        "evaluate_v2",
        "evaluate_v3",
        "evaluate_ablation",
    ],
)
def test_gpu_rules_declare_one_gpu_and_have_profile_resources(rule):
    smk = "\n".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    if f"rule {rule}:" not in smk:  # a variant (`use rule <base> as <rule> with:`): its own log and
        # benchmark, the base's threads and resources (which it must not override)
        base, body = re.search(
            rf"use rule (\w+) as {rule} with:(.*?)(?=\n\S|\Z)", smk, flags=re.S
        ).groups()
        assert (
            "log:" in body
            and "benchmark:" in body
            and "threads:" not in body
            and "resources:" not in body
        )
        rule_body = smk.split(f"rule {base}:")[1].split("\nrule ")[0]
    else:
        rule_body = body = smk.split(f"rule {rule}:")[1].split("\nrule ")[0]
    assert (
        "gpu=1" in rule_body and "log:" in body and "benchmark:" in body and "threads:" in rule_body
    )
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    res = profile["set-resources"][rule]
    assert res["slurm_partition"] == "gpu" and res["runtime"] > 0 and res["mem_mb"] > 0


def _mermaid_edges(text: str, names: dict[str, str] | None = None) -> set[tuple[str, str]]:
    edges = set()
    for a, b in re.findall(r"^\s*(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)", text, flags=re.M):
        edges.add(((names or {}).get(a, a), (names or {}).get(b, b)))
    return edges


def test_readme_dag_is_the_current_rule_graph(tmp_path):
    proc = snakemake("--rulegraph", "mermaid-js", workdir=tmp_path, check=True)
    names = dict(re.findall(r"^\s*(id\d+)\[(\w+)\]", proc.stdout, flags=re.M))
    current = _mermaid_edges(proc.stdout, names)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    assert _mermaid_edges(block) == current
