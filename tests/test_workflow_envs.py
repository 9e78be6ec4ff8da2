"""conda environment files: they parse, rules use them, and they cover pyproject's dependencies.

(`--use-conda` itself cannot run on this machine: no conda and no channels.)
"""

from __future__ import annotations

import re

import pytest
import tomllib
import yaml
from workflow_util import ROOT

ENV_FILES = sorted((ROOT / "workflow" / "envs").glob("*.yaml")) + [ROOT / "environment.yml"]
#: conda-forge names of PyPI distributions
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
#: needed by the Snakemake process only, not inside a job's environment
SNAKEMAKE_ONLY = {"snakemake", "snakemake-executor-plugin-slurm"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(spec: str) -> str:
    """Package name of a conda or pip requirement (``pytorch>=2.4`` -> ``pytorch``)."""
    return _norm(re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0])


def _packages(env: dict) -> set[str]:
    out = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            out |= {_name(p) for p in dep.get("pip", []) if not p.startswith("-")}
        else:
            name = _name(dep)
            out.add(_norm(CONDA_TO_PYPI.get(name, name)))
    return out


def _pyproject_deps() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(d) for d in meta["dependencies"]}


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_env_file_parses(path):
    env = yaml.safe_load(path.read_text())
    assert isinstance(env, dict) and env["channels"] and env["dependencies"]
    assert "conda-forge" in env["channels"]
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and _name(d) == "python"]
    assert pythons == ["python=3.11"]
    pip = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip) <= 1 and all(set(d) == {"pip"} for d in pip)
    assert "torchvision" not in _packages(env)


def test_job_env_covers_the_library_dependencies():
    job = _packages(yaml.safe_load((ROOT / "workflow" / "envs" / "icdrl.yaml").read_text()))
    missing = (_pyproject_deps() - SNAKEMAKE_ONLY) - job
    assert not missing, f"workflow/envs/icdrl.yaml lacks {sorted(missing)}"


def test_environment_yml_covers_pyproject_and_installs_the_package():
    raw = yaml.safe_load((ROOT / "environment.yml").read_text())
    env = _packages(raw)
    missing = _pyproject_deps() - env
    assert not missing, f"environment.yml lacks {sorted(missing)}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # the test extra includes the workflow extra (icdrl[workflow]); environment.yml holds both
    assert "icdrl[workflow]" in extras["test"]
    assert {_name(d) for d in extras["test"] + extras["workflow"] if _name(d) != "icdrl"} <= env
    pip = next(d["pip"] for d in raw["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip


def test_every_script_rule_names_the_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\n\s*rule ", text)[1:]:
            if "script:" in rule:
                assert "conda:\n" in rule and '"../envs/icdrl.yaml"' in rule, (
                    f"{smk.name}: {rule.splitlines()[0]}"
                )
    assert (ROOT / "workflow" / "envs" / "icdrl.yaml").is_file()


def _readme_block_after(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _readme_block_after("Run the tests")
    assert test_cmd == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{test_cmd}\n" in ci
    assert 'pip install --quiet "torch==2.13.0"' in ci and "torchvision" not in ci
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111  # executable


def test_readme_quick_start_runs_the_default():
    cmd = _readme_block_after("Run the embedded default end to end")
    assert "pip install torch==2.13.0" in cmd and "pip install -e '.[test]'" in cmd
    assert cmd.endswith("snakemake --cores 2")


@pytest.mark.parametrize("pytest_status, ci_status", [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_ci_exit_status(tmp_path, pytest_status, ci_status):
    """.ci/run passes iff pytest ran tests and they passed (a fake `python` stands in)."""
    import os
    import subprocess

    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\nif [ "$2" = "pytest" ]; then exit {pytest_status}; fi\nexit 0\n'
    )
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == ci_status, proc.stderr
