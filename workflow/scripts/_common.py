"""Plumbing shared by the workflow scripts (each script is thin: read ``snakemake``, call icdrl).

A script reads ``snakemake.input``, ``output``, ``wildcards``, ``threads`` and ``params`` only,
never ``snakemake.config``: its rule declares the config sections it reads as params (see
``section`` in workflow/rules/common.smk), and it calls the library with keyword arguments.

:func:`run` sends everything the library prints — ``logging`` records, ``tqdm`` bars, plain
``print`` output, even output of C extensions — to the rule's ``log:`` file, caps torch's
threads at the rule's ``threads:``, and on failure prints one line to the console (the error
and where the log is) and exits with status 1; the full traceback is in the log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The checkout's library first, whatever else is installed (an editable install of another
# checkout, a site-packages copy, a .pth entry): Snakemake's script preamble appends the parent's
# sys.path, which already holds <checkout>/src, but *after* site-packages, so a guard "if not in
# sys.path" would skip the insert. Put it at position 0 unconditionally (works under --use-conda
# and in SLURM jobs alike: nothing depends on the job's environment) and refuse an icdrl that
# was imported from elsewhere before this line ran.
_SRC = Path(__file__).resolve().parents[2] / "src"
while str(_SRC) in sys.path:
    sys.path.remove(str(_SRC))
sys.path.insert(0, str(_SRC))


def icdrl_origin() -> Path:
    """The folder the imported ``icdrl`` package comes from; raises if it is not this checkout's."""
    import icdrl

    origin = Path(icdrl.__file__).resolve().parent
    if origin != _SRC.resolve() / "icdrl":
        raise ImportError(
            f"icdrl was imported from {origin}, not from this checkout's {_SRC / 'icdrl'}"
        )
    return origin


def _redirect_output(log_path: str) -> Any:
    """Point file descriptors 1 and 2 at ``log_path``; return a stream on the old stderr."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    return console


def setup(threads: int) -> None:
    """Logging to stderr (= the log file) at INFO, calm tqdm, ``threads`` torch threads."""
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)
    n = str(max(1, int(threads)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    # tqdm reads TQDM_* environment variables as defaults: one line every 30 s in a log file
    os.environ.setdefault("TQDM_MININTERVAL", "30")
    os.environ.setdefault("TQDM_NCOLS", "100")
    if "torch" in sys.modules:  # already imported: apply the cap directly
        sys.modules["torch"].set_num_threads(int(n))


def model_path(snakemake: Any) -> str | None:
    """The LVLM folder: the embedded model the workflow trained, or ``model.path`` (kind hf)."""
    model_inputs = list(getattr(snakemake.input, "model", []) or [])
    if model_inputs:
        return str(model_inputs[0])
    return snakemake.params.model.get("path")


def run(snakemake: Any, main: Callable[[Any], None]) -> None:
    """Run ``main(snakemake)`` with output routed to ``snakemake.log[0]`` (see module doc)."""
    log_path = str(snakemake.log[0])
    console = _redirect_output(log_path)
    setup(snakemake.threads)
    log = logging.getLogger(f"icdrl.workflow.{snakemake.rule}")
    wc = dict(snakemake.wildcards.items())
    log.info(
        "rule %s%s: start (threads %d)", snakemake.rule, f" {wc}" if wc else "", snakemake.threads
    )
    t0 = time.perf_counter()
    try:
        log.info("icdrl from %s", icdrl_origin())
        main(snakemake)
    except BaseException as e:
        traceback.print_exc()
        sys.stderr.flush()
        first = (str(e).strip().splitlines() or [""])[0]
        console.write(f"icdrl {snakemake.rule}: {type(e).__name__}: {first} (log: {log_path})\n")
        console.flush()
        raise SystemExit(1) from None
    log.info("rule %s: done in %.1f s", snakemake.rule, time.perf_counter() - t0)
