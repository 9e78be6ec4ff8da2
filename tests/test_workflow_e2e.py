"""End to end: config/test.yaml run once (interrupted, then resumed), then checked for
stale-only reruns, report outputs, logs, and SLURM submission through fake SLURM commands.

One module-scoped run serves every test here (it takes minutes: marked slow).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from workflow_util import CONFIG, FAKE_SLURM, ROOT, SNAKEFILE, dry_run, job_counts, snakemake

from icdrl.config import load_config
from icdrl.layout import Layout

pytestmark = pytest.mark.slow


@dataclass
class Run:
    dir: Path
    config: Path
    layout: Layout
    killed_shards: dict[str, float]  # candidate shards finished before the kill -> mtime
    embeddings_done: int  # embedding files finished before the kill
    plan_after_kill: dict[str, int]
    resume_seconds: float
    resume_output: str  # what the resumed run printed


def _wait_for(pred, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(
                f"snakemake ended (rc {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}"
            )
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    d = tmp_path_factory.mktemp("e2e")
    cfg_path = d / "test.yaml"
    cfg_path.write_text((CONFIG / "test.yaml").read_text())
    layout = Layout(load_config(cfg_path))
    shards = [d / p for p in layout.shards(layout.candidates_shard)]

    # 1) a run killed (SIGKILL to its whole process group) once Snakemake has seen the first
    #    candidate shard finish (a shard killed between its atomic write and Snakemake's
    #    bookkeeping is re-run: it is flagged incomplete, and profiles/default re-runs those)
    log = d / "killed.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(SNAKEFILE),
                "-d",
                str(d),
                "--cores",
                "1",
                "--configfile",
                str(cfg_path),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for(
        lambda: re.search(r"Finished jobid: \d+ \(Rule: candidates_shard\)", log.read_text()),
        proc,
        timeout=900,
        log=log,
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {str(p): p.stat().st_mtime for p in shards if p.exists()}
    embeddings_done = sum((d / layout.emb.format(split=s)).exists() for s in ("train", "eval"))

    # 2) after the crash: unlock, and the plan no longer holds the finished shard
    snakemake("--unlock", "--configfile", str(cfg_path), workdir=d, check=True)
    plan = dry_run("--configfile", str(cfg_path), workdir=d)

    # 3) resume to the end
    t0 = time.perf_counter()
    done = snakemake(
        "--cores", "2", "--configfile", str(cfg_path), workdir=d, check=True, timeout=1200
    )
    return Run(
        d,
        cfg_path,
        layout,
        finished,
        embeddings_done,
        plan,
        time.perf_counter() - t0,
        done.stdout + done.stderr,
    )


def test_interrupted_run_resumes_without_redoing_finished_shards(run):
    assert run.killed_shards, "no shard had finished before the kill"
    assert run.plan_after_kill.get("candidates_shard", 0) == 2 - len(run.killed_shards)
    assert "train_lvlm" not in run.plan_after_kill
    assert (
        run.plan_after_kill.get("embed", 0) == 2 - run.embeddings_done
    )  # a finished split is not redone
    for path, mtime in run.killed_shards.items():
        assert Path(path).stat().st_mtime == mtime  # not rewritten by the resumed run


def test_complete_run_leaves_nothing_to_do(run):
    proc = snakemake("-n", "--configfile", str(run.config), workdir=run.dir, check=True)
    assert job_counts(proc.stdout + proc.stderr) == {}
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert "the report is in" not in proc.stdout + proc.stderr  # a dry run points at nothing


def test_a_finished_run_says_where_its_report_is(run):
    assert (
        f"icdrl: the report is in {run.layout.report_dir}/ (start with summary.md)"
        in run.resume_output
    )
    assert (run.dir / run.layout.report_dir / "summary.md").is_file()


def _variant(run: Run, name: str, edit) -> str:
    cfg = yaml.safe_load(run.config.read_text())
    edit(cfg)
    path = run.dir / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_changing_one_weight_reruns_only_the_affected_cells(run):
    # test.yaml: modes legacy and hard_plus_soft, weights [[1, 1]]; legacy ignores weights
    path = _variant(run, "weight.yaml", lambda c: c["grid"].__setitem__("weights", [[1, 0.5]]))
    counts = dry_run("--configfile", path, workdir=run.dir)
    # (per_shot chooses among other cells now: its ablations rerun too)
    assert counts == {
        "rewards": 1,
        "train_v3": 2,
        "evaluate_v3": 2,
        "select_per_shot": 1,
        "evaluate_ablation": 1,
        "report": 1,
        "all": 1,
    }


def test_adding_a_seed_schedules_only_that_seed(run):
    path = _variant(run, "seeds.yaml", lambda c: c["grid"].__setitem__("seeds", [0, 1]))
    counts = dry_run("--configfile", path, workdir=run.dir)
    # v2 and the 4 v3 cells for seed 1, their evaluations, per_shot of seed 1, and the report
    # (the ablations run at the first seed only)
    assert counts == {
        "train_v2": 1,
        "evaluate_v2": 1,
        "train_v3": 4,
        "evaluate_v3": 4,
        "select_per_shot": 1,
        "report": 1,
        "all": 1,
    }


def test_an_experiment_over_a_training_knob_reruns_only_training_evaluation_and_report(run):
    from icdrl.report import report_files

    def add(c):
        c["grid"]["experiments"]["kl"] = {
            "title": "KL weight 0.1 vs 0",
            "reward_modes": ["hard_plus_soft"],
            "use_rank": [False],
            "train": {"kl_beta": [0.1, 0]},
        }

    path = _variant(run, "kl.yaml", add)
    # kl_beta 0.1 is the default: that level is the existing hard_plus_soft z-score cell
    counts = dry_run("--configfile", path, workdir=run.dir)
    assert counts == {
        "train_v3": 1,
        "evaluate_v3": 1,
        "select_per_shot": 1,
        "evaluate_ablation": 1,
        "report": 1,
        "all": 1,
    }
    snakemake("--cores", "2", "--configfile", path, workdir=run.dir, check=True, timeout=900)
    layout = Layout(load_config(path))
    assert layout.report_dir != run.layout.report_dir  # the first report is kept as it was
    names = [e.name for e in layout.experiments()]
    for f in report_files(run.dir / layout.report_dir, names):
        assert Path(f).is_file() and Path(f).stat().st_size > 0, f
    import pandas as pd

    t = pd.read_csv(run.dir / layout.report_dir / "exp-kl.csv")
    assert set(t["level"].astype(str)) == {"0"} and set(t["reference"].astype(str)) == {"0.1"}
    assert t["delta"].notna().all() and sorted(t["k"]) == [1, 2, 3, 4]
    assert (run.dir / layout.report_dir / "exp-kl-delta.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "Experiment kl: KL weight 0.1 vs 0"
        in (run.dir / layout.report_dir / "summary.md").read_text()
    )


def test_report_outputs_and_html_report(run):
    from icdrl.report import report_files

    for f in report_files(
        run.dir / run.layout.report_dir, [e.name for e in run.layout.experiments()]
    ):
        assert Path(f).is_file() and Path(f).stat().st_size > 0, f
    html = run.dir / "report.html"
    snakemake("--report", str(html), "--configfile", str(run.config), workdir=run.dir, check=True)
    assert html.stat().st_size > 10_000
    text = html.read_text(errors="replace")
    # entries are labelled by what they show; the config and the LVLM's check are in it too
    for shown in (
        "config.yaml",
        "icl_check.json",
        "exp-modes.html",
        "embedded LVLM in-context check",
    ):
        assert shown in text, shown


def test_every_job_logged_beside_its_output(run):
    L = run.layout
    # one log per job: the RICES job's beside its copy file, an ablation job's beside the ablated file
    ablations = {
        o: f"{b[: -len('.jsonl')]}.ablations"
        for b in L.ablation_bases()
        for o in L.ablation_outputs(b).values()
    }
    rices = {o: L.eval_rices["copy"] for o in L.eval_rices.values()}
    assert ablations and len(rices) == 4
    for out in [
        L.lvlm_model,
        L.icl_check,
        L.candidates,
        L.scored,
        L.answers,
        *L.all_rewards(),
        *L.all_eval(),
        *L.all_v3(L.v3_ckpt),
        *L.all_v2(L.v2_ckpt),
    ]:
        log = run.dir / f"{ablations.get(out, rices.get(out, out))}.log"
        assert log.is_file(), log
        assert "done in" in log.read_text()
    bench = run.dir / f"{L.candidates_shard.format(shard=0)}.benchmark.tsv"
    assert bench.read_text().startswith("s\t")


def test_slurm_profile_submits_gpu_cpu_and_local_jobs(run, tmp_path):
    """Fake sbatch/squeue/sacct/srun on PATH: GPU rules get one GPU on the gpu partition with the
    profile's time and memory, CPU rules none, the report runs on the submit host."""
    L = run.layout
    # three jobs to run: a CPU job (icl_check), a GPU job (zero-shot eval), the report. (A
    # missing intermediate file whose downstream outputs are up to date is not re-made unless
    # asked for, so the eval file is named as a target.)
    zero_shot = L.eval_baseline.format(method="zero_shot")
    (run.dir / L.icl_check).unlink()
    (run.dir / zero_shot).unlink()
    report_before = (run.dir / L.report_dir / "accuracy.csv").stat().st_mtime
    state = tmp_path / "slurm"
    env = {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    proc = snakemake(
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "--configfile",
        str(run.config),
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-keep-successful-logs",
        zero_shot,
        "all",
        workdir=run.dir,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    sbatch = {c["comment"].split("_wildcards")[0]: c for c in calls if c["tool"] == "sbatch"}
    assert set(sbatch) == {"rule_icl_check", "rule_evaluate_baseline"}
    gpu, cpu = sbatch["rule_evaluate_baseline"], sbatch["rule_icl_check"]
    assert (gpu["partition"], gpu["gpus"], gpu["time"], gpu["mem"]) == ("gpu", "1", "240", "32000")
    assert (cpu["partition"], cpu["gpus"], cpu["gres"], cpu["time"], cpu["mem"]) == (
        "cpu",
        None,
        None,
        "60",
        "8000",
    )
    sruns = [c for c in calls if c["tool"] == "srun"]
    assert any("--gpus=1" in c["options"] for c in sruns if c["jobid"] == str(gpu["jobid"]))
    assert not any("--gpus=1" in c["options"] for c in sruns if c["jobid"] == str(cpu["jobid"]))
    # the report ran locally (no sbatch for it) and was rewritten
    assert (run.dir / L.report_dir / "accuracy.csv").stat().st_mtime > report_before
    assert (run.dir / L.icl_check).is_file()


def test_report_shows_rices_copy_diagnostics_and_ablations(run):
    """The baselines and diagnostics of issue 14 in the test config's report, and the diagnostics
    re-derived from the evaluation records and the answers table alone equal the report's."""
    import pandas as pd

    from icdrl.answers import load_answers
    from icdrl.records import EvalRecord, read_records
    from icdrl.report.diagnostics import diagnostics_table
    from icdrl.report.inputs import load_eval

    L, out = run.layout, run.dir / run.layout.report_dir
    acc = pd.read_csv(out / "accuracy.csv")
    kinds = set(acc["method_kind"])
    assert {"rices_image", "rices_text", "rices", "copy", "v2", "per_shot", "v3"} <= kinds
    assert not kinds & {"shuffled", "no_images"} and acc["acc_mean"].notna().all()
    assert "similarity (within pool)" in set(acc["method"])
    for m, path in L.eval_rices.items():
        recs = read_records(run.dir / path, EvalRecord)
        assert {r.method for r in recs} == {m} and all(len(set(r.icd_ids)) == r.k for r in recs)
    abl = pd.read_csv(out / "ablations.csv")
    assert set(abl["method_key"]) == {"v2", "per_shot"} and set(abl["ablation"]) == {
        "shuffled",
        "no_images",
    }
    got = abl[abl["delta"].notna()]
    assert len(got) == 2 * (
        3 + 4
    )  # shuffled at k = 2..4, no_images at k = 1..4, for v2 and per_shot
    diag = pd.read_csv(out / "diagnostics.csv")
    assert diag[diag["method_kind"] == "v2"]["copies_any"].notna().all()
    assert (
        diag[diag["method_kind"] == "copy"]["copies_any"].eq(100).all()
    )  # copy copies by construction
    ran = diag[diag["n_queries"] > 0]
    assert len(diag) - len(ran) == 2  # the shuffled ablations of v2 and per_shot have no k=1
    assert ran["wrong_form"].notna().all()  # easy-VQA's closed vocabulary
    again = diagnostics_table(
        load_eval([str(run.dir / p) for p in L.all_eval()]),
        load_answers(run.dir / L.answers),
        200,
        0,
    ).data
    cols = ["copies_any", "copies_last", "wrong_form", "acc_copy", "acc_no_copy"]
    assert (
        again[cols].round(4).fillna(-1).to_numpy().tolist()
        == diag[cols].round(4).fillna(-1).to_numpy().tolist()
    )
    summary = (out / "summary.md").read_text()
    assert "Trained selectors vs RICES and the copy baseline" in summary and "Ablations:" in summary
