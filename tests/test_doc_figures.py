"""The figures that the READMEs and the docs quote in their tables are the figures of the files they cite.

Data-driven: every Markdown table of :data:`DOCUMENTS` whose text, or the
paragraph just above it, cites a results file (``bench/results/NAME`` or
``results/NAME``, ``NAME.{json,md}`` for several) is checked: each decimal
number in its body (a figure such as ``27.26``, ``-0.53`` or ``0.485 ms``)
must be a number of the cited files, to the digits the table shows, in the
file's unit or a power of ten away (ms against seconds, GFLOP against FLOP,
% against a fraction). Integers are not checked (they are mostly sizes, step
counts and labels), nor are tables that cite no file.

Figures a table derives from other figures (a difference, a ratio) are not in
any file: :data:`DERIVED_COLUMNS` names such columns, and :data:`NOT_IN_FILE`
the few figures known to be missing from the file a table cites (to be
recorded there, then removed here). A new table, or a changed figure, that
does not match its file fails.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Where figures are quoted: the READMEs and the documentation site's pages.
DOCUMENTS = ("README.md", "bench/README.md", "docs/**/*.md")

#: Columns (by header) whose figures a table computes from its other figures, so no file holds them.
DERIVED_COLUMNS: Dict[str, str] = {
    "gap to peak": "peak dB minus early-stopped dB, both in the table",
    "reference / variant": "the ratio of the table's times",
    "ms / step / image": "ms / step divided by K, both in the table",
}
#: (document, first cell of the row, figure): figures known to be absent from the file the table cites.
NOT_IN_FILE: Dict[Tuple[str, str, str], str] = {
    ("bench/README.md", "*baseline: the noisy input*", "20.28"): "the noisy input's PSNR is not in the results file",
    ("bench/README.md", "*baseline: the noisy input*", "0.4871"): "the noisy input's SSIM is not in the results file",
    ("bench/README.md", "*baseline: bicubic upsampling of the LR image*", "30.01"):
        "bicubic's PSNR is not in the results file",
    ("bench/README.md", "*baseline: bicubic upsampling of the LR image*", "0.8580"):
        "bicubic's SSIM is not in the results file",
}

_CITE = re.compile(r"(?:bench/)?results/(?:[\w\-]+(?:\.[\w\-]+)*\.\{[\w,.]+\}|[\w.\-]*\w)")
_LIST_ITEM = re.compile(r"\s*(?:[-*+]|\d+\.)\s")
#: A sibling file named by its ending after a full citation: "`results/noise-level-128-cpu.md`, `-256-cpu.md`".
_SIBLING = re.compile(r"`(-[\w.\-]+\.\w+)`")
_FIGURE = re.compile(r"(?<![\w.])[-+\u2212]?\d+\.\d+(?![\w.]*\d)")
_FILE_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
#: Units a table may show a file's number in: the same, or a power of ten away.
_SCALES = (1.0, 1e-9, 1e-6, 1e-3, 1e-2, 1e2, 1e3, 1e6, 1e9)


@dataclass
class Table:
    document: str
    line: int  # 1-based, the header row
    header: List[str]
    rows: List[List[str]]
    cited: List[str]  # paths relative to the repository root


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _cited_paths(text: str) -> List[str]:
    """``results/x.json`` -> ``bench/results/x.json``; ``results/x.{json,md}`` -> both files;
    ``results/a-128-cpu.md``, ``-256-cpu.md`` -> ``a-128-cpu.md`` and the existing ``a-256-cpu.md``."""
    paths = []
    for cite in _CITE.findall(text):
        cite = cite if cite.startswith("bench/") else f"bench/{cite}"
        brace = re.match(r"(.*)\.\{([\w,.]+)\}$", cite)
        paths += [f"{brace.group(1)}.{ext}" for ext in brace.group(2).split(",")] if brace else [cite]
    for ending in _SIBLING.findall(text):
        for full in list(paths):
            parts = full.split("-")
            siblings = ["-".join(parts[:n]) + ending for n in range(len(parts) - 1, 0, -1)]
            paths += [name for name in siblings if (ROOT / name).is_file()][:1]
    return sorted(set(paths))


def tables(document: str, text: str) -> List[Table]:
    """The Markdown tables of ``text``, each with the results files it, or the paragraph above it, cites."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            j += 1
        # The paragraph above: back over blank lines, then up to the previous blank line or heading, or
        # the start of the list item the table sits in.
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        while k >= 0 and lines[k].strip() and not lines[k].startswith("#"):
            if _LIST_ITEM.match(lines[k]):
                k -= 1
                break
            k -= 1
        if j - i >= 3:  # header, separator, at least one row
            found.append(Table(document, i + 1, _cells(lines[i]), [_cells(line) for line in lines[i + 2 : j]],
                               _cited_paths("\n".join(lines[k + 1 : j]))))
        i = j
    return found


def file_numbers(path: Path) -> List[float]:
    """Every number written in a results file (JSON, Markdown or text; gzipped or not)."""
    text = gzip.open(path, "rt", encoding="utf-8").read() if path.suffix == ".gz" else path.read_text("utf-8")
    if path.name.endswith((".json", ".json.gz")):
        text = json.dumps(json.loads(text))  # one spelling of every number
    return [float(m) for m in _FILE_NUMBER.findall(text.replace(",", ""))]


def matches(figure: str, numbers: Iterable[float]) -> bool:
    """Whether ``figure`` (as printed: ``-0.53``, ``\u22120.53``, ``+0.10``) is one of ``numbers`` to its digits."""
    value = float(figure.replace("\u2212", "-").replace("+", ""))
    half = 0.5 * 10.0 ** -len(figure.split(".")[1]) * (1 + 1e-9)
    return any(abs(x * scale - value) <= half for x in numbers for scale in _SCALES)


def unmatched(table: Table, numbers: Sequence[float], not_in_file: Set[Tuple[str, str, str]] = frozenset()
              ) -> List[str]:
    """The figures of ``table`` that are not numbers of its files, as ``'row: figure'``."""
    derived = {i for i, name in enumerate(table.header) if name.strip("* ").lower() in DERIVED_COLUMNS}
    missing = []
    for row in table.rows:
        label = row[0] if row else ""
        for col, cell in enumerate(row):
            if col in derived:
                continue
            for figure in _FIGURE.findall(cell):
                if (table.document, label, figure) in not_in_file or matches(figure, numbers):
                    continue
                missing.append(f"{label}: {figure}")
    return missing


def _documents() -> List[Tuple[str, str]]:
    paths = sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern) if p.is_file()})
    return [(str(p.relative_to(ROOT)), p.read_text("utf-8")) for p in paths]


def _citing_tables() -> List[Table]:
    return [t for name, text in _documents() for t in tables(name, text) if t.cited]


# ---------------------------------------------------------------- the checker itself


SAMPLE = """\
Measured on 2 cores (`results/sample.{json,md}`):

| variant | time | gap |
| --- | ---: | ---: |
| fast | 0.485 ms | |
| slow | 40.8 ms | +1.20 |
| other | 12.5 ms | -0.53 |
"""


def test_the_checker_finds_citations_and_wrong_figures(tmp_path):
    (table,) = tables("doc.md", SAMPLE)
    assert table.cited == ["bench/results/sample.json", "bench/results/sample.md"]
    assert table.header == ["variant", "time", "gap"] and len(table.rows) == 3
    numbers = [0.000485, 0.0408, 1.2, -0.53]  # seconds in the file, ms in the table
    assert unmatched(table, numbers) == ["other: 12.5"]
    assert unmatched(table, numbers + [0.0125]) == []
    assert unmatched(table, [0.000485, 0.0408, 0.0125, 1.2, 0.53]) == ["other: -0.53"]  # the sign counts
    assert unmatched(table, [0.000486, 0.0408, 0.0125, 1.2, -0.53]) == ["fast: 0.485"]  # to the digits shown
    assert unmatched(table, numbers, {("doc.md", "other", "12.5")}) == []
    assert _cited_paths("(`results/cpu-lanczos-2026-11-26.json`, `-nonexistent.md`)") == [
        "bench/results/cpu-lanczos-2026-11-26.json"]  # a sibling is taken only if it exists
    (tmp_path / "r.json").write_text(json.dumps({"a": [1.5e-3, {"b": "x"}], "c": 27.26}))
    assert file_numbers(tmp_path / "r.json") == [0.0015, 27.26]
    with gzip.open(tmp_path / "r.json.gz", "wt") as f:
        f.write('{"t": 3.25}')
    assert file_numbers(tmp_path / "r.json.gz") == [3.25]


def test_tables_without_a_citation_and_derived_columns_are_left_alone():
    assert tables("doc.md", "| a | b |\n| --- | --- |\n| x | 1.5 |\n")[0].cited == []
    table = tables("doc.md", "From `results/r.json`:\n\n| image | gap to peak |\n|---|---|\n| F16 | +0.10 |\n")[0]
    assert unmatched(table, []) == []


# ---------------------------------------------------------------- the documents


def test_the_documents_cite_results_in_tables():
    """The check must see some tables, or a change in the documents' format would make it blind."""
    assert len(_citing_tables()) >= 5


@pytest.mark.parametrize("table", _citing_tables(), ids=lambda t: f"{t.document}:{t.line}")
def test_table_figures_are_in_the_cited_files(table):
    missing_files = [p for p in table.cited if not (ROOT / p).is_file()]
    assert not missing_files, f"{table.document}:{table.line} cites files that do not exist: {missing_files}"
    numbers = [x for p in table.cited for x in file_numbers(ROOT / p)]
    missing = unmatched(table, numbers, set(NOT_IN_FILE))
    assert not missing, (f"{table.document}:{table.line}: figures not found in {', '.join(table.cited)}: {missing} "
                         "(a derived column goes in DERIVED_COLUMNS; a figure the file lacks in NOT_IN_FILE)")
