"""One access line per request; JSON logs are one object per line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from typing import Iterator

import pytest

from service.logs import JsonFormatter, TextFormatter
from tests.service.conftest import make_settings, random_image, serve
from tests.service.test_app import files

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def _access_log(formatter: logging.Formatter) -> Iterator[io.StringIO]:
    """The access log's lines, as ``formatter`` writes them, into the stream yielded."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    access = logging.getLogger("chanseg.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


async def test_access_line_as_json(tiny_artifact):
    with _access_log(JsonFormatter()) as stream:
        async with serve(make_settings(tiny_artifact)) as client:
            r = await client.post(
                "/predict", files=files(random_image(1), random_image(2)), headers={"x-request-id": "r-42"}
            )
            await client.get("/metrics")  # scrapes are not logged
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert r.status_code == 200 and len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "r-42" and line["status"] == 200 and line["images"] == 2
    assert line["endpoint"] == "predict" and line["message"] == "POST /predict 200"
    assert line["total_ms"] >= line["inference_ms"] > 0 and line["queue_ms"] >= 0
    assert line["level"] == "info" and line["time"].endswith("Z")


def test_a_traceback_cannot_start_a_line_of_its_own():
    try:
        raise ValueError("bad file name\n2026-12-05 ERROR chanseg.app: forged")
    except ValueError:
        record = logging.makeLogRecord(
            {"msg": "failed", "levelname": "ERROR", "name": "x", "exc_info": sys.exc_info()}
        )
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("ERROR x: failed") and all(line.startswith("    ") for line in lines[1:])
    assert "forged" in lines[-1]
    reordered = logging.makeLogRecord({"msg": "a\u202eb", "levelname": "INFO", "name": "x"})
    assert TextFormatter().format(reordered).endswith("a\\u202eb")  # a bidi mark cannot reorder the line


def test_text_formatter_appends_fields():
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x", "request_id": "abc"})
    assert TextFormatter().format(record).endswith("hello request_id=abc")


async def test_a_path_cannot_forge_a_line_or_drive_a_terminal(tiny_artifact):
    """Issue 31: the access log wrote an unmatched route's percent-decoded path as it came."""
    with _access_log(TextFormatter()) as stream:
        async with serve(make_settings(tiny_artifact)) as client:
            r = await client.get("/x%0A2026-12-05 ERROR chanseg.app: forged%1B[2J" + "y" * 5000)
    text = stream.getvalue()
    assert r.status_code == 404
    assert text.count("\n") == 1 and "\x1b" not in text, text  # one line, no escape sequence
    assert "/x\\n2026-12-05 ERROR chanseg.app: forged\\x1b[2J" in text and len(text) < 600
