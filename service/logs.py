"""Logging set-up: text for people, one JSON object per line for machines.

What a client sends reaches log lines (a path, a file name in an error): in text
lines control characters are escaped (``\\n``, ``\\x1b``), so nobody can forge a
line or drive the reader's terminal; JSON escapes them itself."""

from __future__ import annotations

import json
import logging
import re
import time

__all__ = ["configure_logging", "printable"]

# C0 and C1 controls, line and paragraph separators, and the marks that reorder text (bidi).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def printable(text: str) -> str:
    """``text`` with its control characters (line breaks, terminal escapes) escaped."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei) -> str:
        """The traceback, each of its lines indented: a line break inside an exception's
        message (which may quote a client) cannot start a line of its own."""
        return "\n".join("    " + printable(line) for line in super().formatException(ei).splitlines())

    def formatMessage(self, record: logging.LogRecord) -> str:  # the line, before a traceback
        line = printable(super().formatMessage(record))
        extras = _extras(record)
        if extras:
            line += " " + " ".join(printable(f"{k}={v}") for k, v in extras.items())
        return line


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send chanseg's and uvicorn's logs to stderr in ``fmt`` (text or json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("chanseg", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # chanseg.access has the richer line
