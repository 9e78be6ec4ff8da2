"""Jobs import this checkout's src/ whatever other icdrl is installed (issue 15).

A decoy ``icdrl`` package sits on PYTHONPATH (where an editable install of another checkout or
a site-packages copy would be found before the checkout's src/, which the Snakefile's process
appends to the jobs' sys.path only at the end). A tiny real job runs, locally and through the
SLURM profile (fake sbatch/srun, which re-parse the Snakefile in the job step); its log must
name the checkout's src/ and show no sign of the decoy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from workflow_util import CONFIG, FAKE_SLURM, ROOT, snakemake

from icdrl.config import load_config
from icdrl.layout import Layout
from icdrl.records import read_jsonl, write_jsonl

MARK = "DECOY-ICDRL-IMPORTED"


def _decoy_env(tmp_path: Path) -> dict[str, str]:
    decoy = tmp_path / "decoy-site-packages"
    (decoy / "icdrl").mkdir(parents=True)
    (decoy / "icdrl" / "__init__.py").write_text(f"import sys\nprint({MARK!r}, file=sys.stderr)\n")
    src = (ROOT / "src").resolve()
    inherited = [
        p
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if p and Path(p).resolve() != src
    ]  # the checkout's src only through the Snakefile
    return {"PYTHONPATH": os.pathsep.join(inherited + [str(decoy)])}


@pytest.mark.parametrize("where", ["local", "slurm"])
def test_jobs_import_the_checkouts_src_while_another_icdrl_is_installed(tmp_path, where):
    cfg_path = tmp_path / "test.yaml"
    cfg_path.write_text((CONFIG / "test.yaml").read_text())
    L = Layout(load_config(cfg_path))
    env = _decoy_env(tmp_path)
    work = tmp_path / "work"
    if where == "local":
        # concat_candidates (a localrule) over two ready shards
        for p in L.shards(L.candidates_shard):
            write_jsonl(work / p, "icdrl.candidates", [])
        target, rule, extra = L.candidates, "concat_candidates", ["--cores", "1"]
    else:
        # pools (a CPU job submitted with sbatch) over ready embeddings
        for split in ("train", "eval"):
            (work / L.emb.format(split=split)).parent.mkdir(parents=True, exist_ok=True)
            np.savez(
                work / L.emb.format(split=split), ids=np.arange(3), emb=np.eye(3, dtype=np.float32)
            )
        target, rule = L.pools_test, "pools"
        env["PATH"] = f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}"
        env["FAKE_SLURM_DIR"] = str(tmp_path / "slurm")
        extra = [
            "--profile",
            str(ROOT / "profiles" / "slurm"),
            "--slurm-init-seconds-before-status-checks",
            "1",
        ]
    proc = snakemake(
        target,
        "--configfile",
        str(cfg_path),
        "--allowed-rules",
        rule,
        *extra,
        workdir=work,
        env=env,
        timeout=600,
    )
    log = (work / f"{target}.log").read_text() if (work / f"{target}.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log
    assert f"icdrl from {(ROOT / 'src' / 'icdrl').resolve()}" in log, log
    assert MARK not in log and MARK not in proc.stderr
    assert (
        read_jsonl(work / target, "icdrl.pools" if where == "slurm" else "icdrl.candidates")
        is not None
    )
    if where == "slurm":
        assert (tmp_path / "slurm" / "calls.jsonl").read_text().count('"tool": "sbatch"') == 1
