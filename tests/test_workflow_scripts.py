"""workflow/scripts/_common.py: library output goes to the rule's log; failures give one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from workflow_util import ROOT

SCRIPT = textwrap.dedent(
    """
    import logging, sys, types
    sys.path.insert(0, {scripts!r})
    from _common import model_path, run

    class Named(list):
        pass

    inp = Named([]); inp.model = []
    sm = types.SimpleNamespace(log=[{log!r}], threads=1, rule="demo", wildcards={{"shard": "0"}},
                               input=inp, params=types.SimpleNamespace(model={{"path": "/models/x"}}))

    def main(sm):
        from tqdm import tqdm
        logging.getLogger("icdrl.demo").info("library log line")
        print("plain print")
        for _ in tqdm(range(3), desc="progress"):
            pass
        import os
        os.write(2, b"raw fd write\\n")
        print("model", model_path(sm))
        if {fail!r}:
            raise FileNotFoundError("dataset.train.questions: file not found: /x/q.json\\nsecond line")

    run(sm, main)
    """
)


def _run(tmp_path, fail: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "sub" / "job.log"
    code = SCRIPT.format(scripts=str(ROOT / "workflow" / "scripts"), log=str(log), fail=fail)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc, log.read_text()


def test_output_goes_to_the_log(tmp_path):
    proc, log = _run(tmp_path, fail=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # nothing on the console
    for text in (
        "rule demo {'shard': '0'}: start",
        "INFO icdrl.demo: library log line",
        "plain print",
        "progress",
        "raw fd write",
        "model /models/x",
        "rule demo: done in",
    ):
        assert text in log, text


def test_failure_prints_one_line_and_exits_1(tmp_path):
    proc, log = _run(tmp_path, fail=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"icdrl demo: FileNotFoundError: dataset.train.questions: file not found: /x/q.json "
        f"(log: {tmp_path / 'sub' / 'job.log'})"
    ]
    assert "Traceback" in log and "second line" in log
