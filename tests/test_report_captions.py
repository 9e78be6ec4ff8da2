"""The Snakemake report captions (workflow/report/*.rst) exist and render as Snakemake renders them.

The final rule marks each table's HTML, each plot's PNG and the summary for the report with
the caption ``workflow/report/<stem>.rst``; ``workflow.rst`` describes the workflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from icdrl.report import REPORT_FILES

REPORT_DIR = Path(__file__).resolve().parents[1] / "workflow" / "report"
STEMS = sorted({f.rsplit(".", 1)[0] for f in REPORT_FILES})  # config.yaml's caption: config.rst
# every experiment's table and delta plot share one caption per kind (workflow/rules/common.smk)
CAPTIONS = ["workflow.rst", "experiment.rst", "experiment_delta.rst", "icl_check.rst"] + [
    f"{s}.rst" for s in STEMS
]


def test_every_output_has_a_caption():
    assert len(STEMS) == 19
    missing = [c for c in CAPTIONS if not (REPORT_DIR / c).is_file()]
    assert not missing, f"captions missing: {missing}"


@pytest.mark.parametrize("name", CAPTIONS)
def test_caption_renders_without_docutils_warnings(name):
    jinja2 = pytest.importorskip("jinja2")
    from docutils.core import publish_parts

    text = (REPORT_DIR / name).read_text()
    # Snakemake renders a caption as a Jinja template first, then as reStructuredText
    rendered = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(text).render()
    parts = publish_parts(
        rendered,
        writer="html",
        settings_overrides={"report_level": 2, "halt_level": 2, "warning_stream": False},
    )
    assert len(parts["body"]) > 150
