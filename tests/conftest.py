"""Shared fixtures: one tiny model, built and exported once per test run; a headless browser."""

from __future__ import annotations

import os

import pytest
import torch

import model
from model import ChannelAttentionUNet, ModelConfig
from tests.real_parts import missing, need_tool

TINY = ModelConfig(widths=(4, 8, 16), input_size=(64, 64), name="tiny")


def _randomize_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def make_net(config: ModelConfig = TINY, seed: int = 0) -> ChannelAttentionUNet:
    torch.manual_seed(seed)
    net = ChannelAttentionUNet(config)
    _randomize_batchnorm(net, seed)
    return net.eval()


@pytest.fixture(scope="session")
def tiny_net() -> ChannelAttentionUNet:
    return make_net()


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_net) -> str:
    path = tmp_path_factory.mktemp("artifacts") / "tiny.pt"
    model.export_torchscript(tiny_net, path, version="7")
    return str(path)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> str:
    """The tiny network compiled for this CPU in fp32 (torch.export + AOTInductor: ~30 s, once)."""
    from model.compiled import compile_package

    path = tmp_path_factory.mktemp("package") / "tiny.pt2"
    compile_package(make_net(), path, TINY, "cpu", "fp32", version="7", max_batch=16)
    return str(path)


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_artifact) -> model.Segmenter:
    return model.load(tiny_artifact, device="cpu")


@pytest.fixture
def browser():
    """Debian's chromium, headless, driven by selenium through Debian's chromedriver
    (nothing downloads a browser): the page's test and the site's."""
    install = "apt-get install chromium chromium-driver; pip install selenium (dev extra)"
    chromium = need_tool("chromium", install)
    chromedriver = need_tool("chromedriver", install)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium", install)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never fetch a driver or browser
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_REAL_PARTS: dict = {}  # nodeid -> {"part", "outcome", "seconds"} of tests marked real_part


def pytest_runtest_logreport(report):
    marker = report.keywords.get("real_part")
    if marker is None:
        return
    entry = _REAL_PARTS.setdefault(report.nodeid, {"outcome": "not run", "seconds": 0.0})
    entry["seconds"] += report.duration  # setup (a Docker build, a server start) and call
    if entry["outcome"] == "not run":
        entry["outcome"] = "passed"
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] != "failed":
        entry["outcome"] = "skipped"


def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("real_part")
        if marker is not None:
            _REAL_PARTS[item.nodeid] = {"outcome": "not run", "seconds": 0.0, "part": marker.args[0]}


def pytest_terminal_summary(terminalreporter):
    """At the end of every run: each check against a real part, how it ended and how
    long it took, and the ones that could not run here, and why."""
    from tests.real_parts import MARK

    ran = {k: v for k, v in _REAL_PARTS.items() if v["outcome"] != "not run"}
    if ran:
        terminalreporter.section("checks against real parts")
        for nodeid, entry in ran.items():
            terminalreporter.write_line(
                f"{entry['outcome']:8s} {entry['seconds']:6.1f} s  {entry.get('part', '?'):22s} {nodeid}"
            )
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MARK in str(r.longrepr)]
    if not skipped:
        return
    terminalreporter.section("real-part checks skipped (CI=true makes these failures)")
    for report in skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")
