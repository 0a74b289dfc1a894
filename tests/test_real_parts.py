"""tests/real_parts.py: a missing real part is a skip locally and a failure under CI."""

from __future__ import annotations

import pytest

from tests.real_parts import MARK, missing, need_tool


def test_missing_tool_skips_locally_with_how_to_install(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as raised:
        need_tool("chanseg-no-such-tool", "apt-get install nothing")
    assert MARK in str(raised.value) and "apt-get install nothing" in str(raised.value)


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_tool_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception) as raised:
        missing("a Docker engine", "apt-get install docker.io")
    assert "a Docker engine" in str(raised.value) and "CI" in str(raised.value)


def test_present_tool_is_found(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert need_tool("python3", "-").endswith("python3")
