"""The documentation is checked like code: the generated pages are current, the README
is a landing page, the site builds strictly (broken links and anchors fail), every
bash and python example in the README and on the site runs against a real server,
and the site renders in a real browser."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List, NamedTuple

import pytest
from PIL import Image

from model.data import synthetic_sample
from service.docs_pages import pages
from testbed.processes import ROOT, ServiceProcess, child_env

DOCS = ROOT / "docs"
README_MAX_LINES = 250
NOT_RUN = "# not run:"  # a block's first line when it is not meant to run here, and why
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\s*$")


class Example(NamedTuple):
    file: str
    line: int
    lang: str
    code: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.lang})"


def examples(path: Path) -> Iterator[Example]:
    """The fenced ```bash and ```python blocks of a Markdown file, dedented to their fence."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match.group("lang"):
            i += 1 if not match else _skip_fence(lines, i)
            continue
        indent, start, body = len(match.group("indent")), i + 1, []
        i += 1
        while not lines[i].strip().startswith("```"):
            body.append(lines[i][indent:])
            i += 1
        i += 1
        if match.group("lang") in ("bash", "python"):
            yield Example(str(path.relative_to(ROOT)), start, match.group("lang"), "\n".join(body) + "\n")


def _skip_fence(lines: List[str], i: int) -> int:
    """Lines from an opening fence without a language to just past its closing fence."""
    j = i + 1
    while j < len(lines) and not lines[j].strip().startswith("```"):
        j += 1
    return j + 1 - i


def all_examples() -> List[Example]:
    return [e for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))] for e in examples(path)]


def test_generated_pages_are_current():
    """docs/configuration.md and docs/metrics.md are what the code defines today."""
    for name, text in pages().items():
        assert (DOCS / name).read_text() == text, f"docs/{name} is stale: run python -m service.docs_pages"


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_every_example_runs_or_says_why_not():
    """A block meant not to run says why on its first line; the others are bash or python."""
    found = all_examples()
    assert len(found) > 10
    for example in found:
        first = example.code.splitlines()[0] if example.code.strip() else ""
        if first.startswith("#") and "not run" in first.lower():
            assert first.startswith(NOT_RUN) and len(first) > len(NOT_RUN) + 5, (
                f"{example}: say why, {first!r}"
            )


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs), offline: a broken link, a broken
    anchor or a page outside the nav fails it. Under a second: in the quick tier."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    fetched = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)=\"(?:https?:)?//")
    for html in site.rglob("*.html"):  # offline: nothing a page loads comes from elsewhere
        assert not fetched.search(html.read_text()), (
            f"{html.relative_to(site)} loads something from elsewhere"
        )
    # The README is not on the site: its links into docs/ are checked against the built pages.
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(docs/([\w-]+)\.md(?:#([\w-]+))?\)", readme)
    assert len(links) > 10
    for page, anchor in links:
        html = (site / ("" if page == "index" else page) / "index.html").read_text()
        assert not anchor or f'id="{anchor}"' in html, (
            f"README links to docs/{page}.md#{anchor}: no such anchor"
        )


@pytest.fixture(scope="module")
def example_server(tmp_path_factory):
    """A real `python -m service` on the bundled model, with gRPC, and a folder holding
    the images the examples name (a.png, b.jpg)."""
    work = tmp_path_factory.mktemp("examples")
    Image.fromarray(synthetic_sample(2, 0, size=(480, 640)).image).save(work / "a.png")
    Image.fromarray(synthetic_sample(2, 1, size=(512, 512)).image).save(work / "b.jpg", quality=90)
    server = ServiceProcess(
        {"CHANSEG_MAX_BATCH_SIZE": "2", "CHANSEG_LOG_LEVEL": "warning"}, log=work / "server.log", grpc=True
    )
    try:
        server.wait_ready(180)
        yield server, work
    finally:
        server.stop()


def _localised(code: str, server: ServiceProcess) -> str:
    """The example pointed at the test's server (the docs say 8000 for HTTP, 8001 for gRPC)."""
    code = code.replace("http://127.0.0.1:8000", server.url)
    code = code.replace("127.0.0.1:8000", server.url.removeprefix("http://"))
    return code.replace("127.0.0.1:8001", server.grpc_url)


# curl answers an HTTP error with exit status 0: in the examples it fails instead.
BASH_PRELUDE = 'curl() { command curl --fail-with-body --silent --show-error "$@"; }\n'


@pytest.mark.slow
def test_examples_run_against_a_real_server(example_server, capsys):
    """Every bash and python block of the README and the site, but those marked
    `# not run: <why>`, runs against a real server on the bundled model (its URL and
    gRPC port substituted) in a folder with the images the examples name."""
    server, work = example_server
    env = child_env(None, {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    ran, skipped = [], []
    for example in all_examples():
        if example.code.startswith(NOT_RUN):
            skipped.append(example)
            continue
        code = _localised(example.code, server)
        command = (
            ["bash", "-e", "-o", "pipefail", "-c", BASH_PRELUDE + code]
            if example.lang == "bash"
            else [sys.executable, "-c", code]
        )
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, (
            f"{example} failed:\n{code}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
        ran.append(example)
    with capsys.disabled():
        print(f"\ndocs examples: {len(ran)} ran, {len(skipped)} marked not run:")
        for example in skipped:
            print(f"  {example}: {example.code.splitlines()[0].removeprefix(NOT_RUN).strip()}")
    assert len(ran) >= 8


@contextlib.contextmanager
def _served(folder: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
@pytest.mark.real_part("chromium")
def test_site_renders_in_a_browser(browser, tmp_path):
    """The built site's landing page in headless chromium: its navigation lists every
    section; kept as docs/site.png when CHANSEG_SITE_SCREENSHOT names a file
    (`make site-screenshot`)."""
    from selenium.webdriver.common.by import By

    site = tmp_path / "site"
    mkdocs = Path(sys.executable).parent / "mkdocs"
    subprocess.run([str(mkdocs), "build", "--site-dir", str(site)], cwd=ROOT, check=True, capture_output=True)
    with _served(site) as url:
        browser.get(url + "/")
        nav = browser.find_element(By.CSS_SELECTOR, "nav.md-nav--primary").text
        for section in ("Getting started", "HTTP API", "Open Inference Protocol", "Configuration", "Deploy"):
            assert section in nav, nav
        shot = tmp_path / "site.png"
        assert browser.save_screenshot(str(shot))
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and len(image.getcolors(1 << 20) or []) > 20  # rendered, not blank
        if os.environ.get("CHANSEG_SITE_SCREENSHOT"):
            image.convert("RGB").quantize(256).save(os.environ["CHANSEG_SITE_SCREENSHOT"], optimize=True)
