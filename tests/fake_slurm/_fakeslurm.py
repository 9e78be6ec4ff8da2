"""A fake SLURM for tests: sbatch/srun/sacct/squeue/sinfo/scontrol/scancel on PATH.

State lives in $FAKE_SLURM_DIR: ``calls.jsonl`` (one line per call: tool, argv, and for sbatch
the parsed partition/time/mem/gpus/comment), ``jobs/<id>`` (final state). ``sbatch`` runs the
job script (``--wrap``) at once, synchronously, with SLURM_JOB_ID (and SLURM_GPUS when GPUs
were asked for) set, writes its output to ``--output`` and records COMPLETED or FAILED;
``sacct``/``squeue`` report those states; ``srun`` runs its command after its options.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))


def _record(tool: str, argv: list[str], **extra) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.jsonl", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps({"tool": tool, "argv": argv, **extra}) + "\n")


def _next_id() -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "counter", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        n = int(fh.read().strip() or 1000) + 1
        fh.seek(0)
        fh.truncate()
        fh.write(str(n))
    return n


def _opts(tokens: list[str]) -> dict[str, str]:
    """sbatch options as {name: value}; handles --name=value, --name value, -p value."""
    short = {
        "-p": "partition",
        "-t": "time",
        "-A": "account",
        "-D": "chdir",
        "-C": "constraint",
        "-o": "output",
        "-J": "job-name",
        "-n": "ntasks",
    }
    flags = {"--parsable", "--requeue", "--no-requeue", "--export=ALL"}
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in flags:
            out[t.lstrip("-").split("=")[0]] = "true"
        elif t.startswith("--") and "=" in t:
            k, v = t[2:].split("=", 1)
            out[k] = v
        elif t.startswith("--") or t in short:
            k = short.get(t, t[2:])
            out[k] = tokens[i + 1] if i + 1 < len(tokens) else ""
            i += 1
        else:
            out.setdefault("_args", "")
            out["_args"] += t + " "
        i += 1
    return out


def sbatch(argv: list[str]) -> int:
    o = _opts(argv)
    jobid = _next_id()
    _record(
        "sbatch",
        argv,
        jobid=jobid,
        partition=o.get("partition"),
        time=o.get("time"),
        mem=o.get("mem"),
        gpus=o.get("gpus"),
        gres=o.get("gres"),
        comment=o.get("comment"),
        cpus=o.get("cpus-per-task"),
        job_name=o.get("job-name"),
    )
    script = o.get("wrap")
    if script is None:
        script = sys.stdin.read()
    env = dict(os.environ, SLURM_JOB_ID=str(jobid), SLURM_JOBID=str(jobid))
    if o.get("gpus"):
        env["SLURM_GPUS"] = o["gpus"]
    out_path = (o.get("output") or f"slurm-{jobid}.out").replace("%j", str(jobid))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as fh:
        rc = subprocess.call(
            ["bash", "-c", script],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=o.get("chdir") or None,
        )
    (STATE / "jobs").mkdir(parents=True, exist_ok=True)
    (STATE / "jobs" / str(jobid)).write_text(
        f"{o.get('job-name', '')}\n{'COMPLETED' if rc == 0 else 'FAILED'}\n"
    )
    print(jobid)
    return 0


def srun(argv: list[str]) -> int:
    # options come first; the command starts at the first token that is not an option
    i = 0
    with_value = {"-n", "-N", "-c", "-p", "-t"}
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in with_value else 1
    cmd = argv[i:]
    _record("srun", argv, options=argv[:i], jobid=os.environ.get("SLURM_JOB_ID"))
    if cmd[:2] == ["sh", "-s"]:
        return subprocess.call(["sh", "-s"], stdin=sys.stdin)
    return subprocess.call(cmd)


def _states() -> list[tuple[str, str, str]]:
    rows = []
    for p in sorted((STATE / "jobs").glob("*")) if (STATE / "jobs").exists() else []:
        name, state = p.read_text().splitlines()[:2]
        rows.append((p.name, name, state))
    return rows


def sacct(argv: list[str]) -> int:
    _record("sacct", argv)
    text = " ".join(argv)
    if "JobIdRaw,State" not in text:
        return 0  # account lookups etc.: nothing known
    name = argv[argv.index("--name") + 1] if "--name" in argv else None
    for jobid, jname, state in _states():
        if name is None or jname == name:
            print(f"{jobid}|{state}")
    return 0


def squeue(argv: list[str]) -> int:
    _record("squeue", argv)
    name = argv[argv.index("--name") + 1] if "--name" in argv else None
    for jobid, jname, state in _states():
        if name is None or jname == name:
            print(f"{jobid}|{state}")
    return 0


def sinfo(argv: list[str]) -> int:
    _record("sinfo", argv)
    print("PARTITION\ncpu*\ngpu")
    return 0


def other(tool: str, argv: list[str]) -> int:
    _record(tool, argv)
    return 1 if tool == "scontrol" else 0


def main() -> int:
    tool, argv = sys.argv[1], sys.argv[2:]  # the wrapper scripts pass their own name first
    return {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "sinfo": sinfo}.get(
        tool, lambda a: other(tool, a)
    )(argv)


if __name__ == "__main__":
    sys.exit(main())
