"""The docs are self-contained: every citation in the code resolves to a section of ``docs/``.

The code cites the science as "docs/science.md §N" and the reference implementation's defects
as "docs/defects.md defect N" (or "defects N, M and K"). Each cited section must exist, and
nothing may point to files outside the repository (the specification and anchors documents
the project started from are not shipped with it).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = ("src", "workflow", "tests", "benchmarks", "config", "docs", "README.md", "Snakefile")
SUFFIXES = {".py", ".smk", ".yaml", ".yml", ".md", ""}


def _files():
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for f in sorted(path.rglob("*")):
            if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts:
                yield f


def _sections(doc: Path, pattern: str) -> set[int]:
    return {int(m) for m in re.findall(pattern, doc.read_text(), flags=re.MULTILINE)}


SCIENCE = _sections(DOCS / "science.md", r"^## §(\d+) ")
DEFECTS = _sections(DOCS / "defects.md", r"^## Defect (\d+):")


def test_docs_have_the_sections_the_code_cites():
    assert SCIENCE == set(range(1, 11))
    assert DEFECTS == set(range(1, 12))


def test_every_science_citation_resolves():
    cited: dict[int, list[str]] = {}
    for f in _files():
        for m in re.finditer(r"docs/science\.md (§\d+(?:, §\d+)*)", f.read_text()):
            for n in re.findall(r"§(\d+)", m.group(1)):
                cited.setdefault(int(n), []).append(str(f.relative_to(ROOT)))
    assert cited, "no citation of docs/science.md found: the pattern is stale"
    missing = {n: where[:3] for n, where in cited.items() if n not in SCIENCE}
    assert not missing, f"citations of sections docs/science.md lacks: {missing}"


def test_every_defect_citation_resolves():
    cited: set[int] = set()
    for f in _files():
        for m in re.finditer(r"docs/defects\.md defects? ([0-9, –and-]+)", f.read_text()):
            text = m.group(1)
            for a, b in re.findall(r"(\d+)[–-](\d+)", text):
                cited.update(range(int(a), int(b) + 1))
            cited.update(int(n) for n in re.findall(r"\d+", text))
    assert cited, "no citation of docs/defects.md found: the pattern is stale"
    assert cited <= DEFECTS, f"defects cited but not in docs/defects.md: {sorted(cited - DEFECTS)}"


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|SPEC\.md|ANCHORS|\bSPEC §")
    hits = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in _files()
        if f != Path(__file__)
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, f"references to documents outside the repository: {hits[:10]}"
