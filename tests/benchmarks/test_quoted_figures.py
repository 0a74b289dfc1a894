"""The site's Performance page (docs/performance.md) quotes the last full benchmark run
(benchmarks/results/bench.json) as it is: every img/s (p99) cell of its serving tables,
the raw ceilings, the open-loop rows, where the CPU went at c16 and the targets table,
with each figure the harness marked unstable marked unstable where it is quoted. The
README's headline table is held to the same run, with its date and ceiling."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.harness import find_row, host_ms, readme_cell, readme_cpu, readme_rate, readme_tables, table

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "performance.md").read_text()
PAGE_LINES = PAGE.splitlines()
README = (ROOT / "README.md").read_text()
REPORT = json.loads((ROOT / "benchmarks" / "results" / "bench.json").read_text())
QUOTED_LINES = readme_tables(REPORT).splitlines()  # what bench.md's "As the README quotes it" gives
HEADER = re.compile(r"^\| (\w+): img/s \(p99 ms\) \|(( c\d+ \|)+)$")


def _tables(lines):
    """(image set, concurrency levels, [(first cell, [cells])]) for each serving table."""
    for i, line in enumerate(lines):
        match = HEADER.match(line)
        if not match:
            continue
        levels = [int(c.strip()[1:]) for c in match.group(2).strip(" |").split("|")]
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = [c.strip() for c in row.strip("|").split("|")]
            rows.append((cells[0], cells[1:]))
        yield match.group(1), levels, rows


def _check_table(images, levels, rows):
    assert {label.split()[0] for label, _ in rows} == set(REPORT["servers"]), images
    for label, cells in rows:
        assert len(cells) == len(levels), label
        for level, cell in zip(levels, cells):
            row = find_row(REPORT["rows"], label.split()[0], images, level)
            assert row is not None, f"{images} {label} c{level}: not in the run"
            expected = readme_cell(row)
            assert cell == expected, f"{images} {label} c{level}: quoted {cell}, run {expected}"
        # as the harness quotes it, but for the words after the name
        assert f"| {label.split()[0]} | {' | '.join(cells)} |" in QUOTED_LINES


def test_every_serving_table_cell_is_the_runs_figure():
    tables = list(_tables(PAGE_LINES))
    assert {images for images, _, _ in tables} == set(REPORT["ceiling"])  # every image set is quoted
    for images, levels, rows in tables:
        _check_table(images, levels, rows)
        ceiling = REPORT["ceiling"][images]["images_per_s"]
        assert f"{images} raw ceiling {ceiling:.1f} img/s" in PAGE


def test_the_readmes_headline_table_is_the_runs():
    tables = list(_tables(README.splitlines()))
    assert [images for images, _, _ in tables] == ["png256"]
    for images, levels, rows in tables:
        _check_table(images, levels, rows)
    assert f"raw ceiling {REPORT['ceiling']['png256']['images_per_s']:.1f} img/s" in README
    assert f"`python -m benchmarks run` ({REPORT['date'][:10]}," in README


def test_open_loop_rows_and_targets_are_the_runs():
    open_loop = " ".join(next(p for p in PAGE.split("\n\n") if "Open loop (Poisson)" in p).split())
    rates = [r for r in REPORT["rows"] if r["mode"] == "rate"]
    assert rates
    for row in rates:
        assert readme_rate(row) in open_loop
    targets = table(REPORT).split("| target (png256) |", 1)[1].splitlines()[2:]
    assert targets
    for line in targets:
        assert line in PAGE_LINES, line


def test_where_the_cpu_went_is_the_runs():
    """The paragraph on why no server reaches 0.90 of the ceiling quotes the run's CPU split."""
    quoted = readme_cpu(REPORT, "png256")
    assert quoted is not None, "the run has no CPU split for chanseg at c16"
    paragraphs = [" ".join(p.split()) for p in PAGE.split("\n\n")]
    assert any(quoted in p for p in paragraphs), quoted


def test_host_work_figures_are_the_runs():
    """The host-work section quotes the two back-to-back runs (before and after) as they are."""
    section = PAGE.split("## Host work per image", 1)[1].split("\n## ", 1)[0]
    runs = {
        name: json.loads((ROOT / "benchmarks" / "results" / f"host-{name}.json").read_text())
        for name in ("before", "after")
    }
    for images in runs["after"]["ceiling"]:
        cells = []
        for load in (16, 1):
            rows = [find_row(run["rows"], "chanseg", images, load) for run in runs.values()]
            before, after = (host_ms(row["server_cpu"]) for row in rows)
            cells.append(f"{before:.2f} / {after:.2f}")
        ratio = host_ms(rows_at_16(runs["after"], images)) / host_ms(rows_at_16(runs["before"], images))
        assert f"| {images} | {cells[0]} ({ratio:.2f}) | {cells[1]} |" in section, images


def rows_at_16(run: dict, images: str) -> dict:
    return find_row(run["rows"], "chanseg", images, 16)["server_cpu"]
