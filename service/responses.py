"""JSON responses written by orjson: what every JSON answer of the HTTP API uses.

Starlette's ``JSONResponse`` calls ``json.dumps``; orjson writes the same document
several times faster (a ``/predict`` answer of one 256x256 image: measured in
``docs/performance.md``, "Host work per image"). The output differs only in
spacing: no spaces after ``:`` and ``,``, as Starlette's compact separators, and
non-ASCII text as UTF-8, as Starlette's ``ensure_ascii=False``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSON

__all__ = ["JSONResponse"]


class JSONResponse(_StarletteJSON):
    """``JSONResponse`` rendered by orjson. Not-a-number floats become ``null`` (json.dumps
    would write ``NaN``, which is not JSON); keys that are not strings are written as strings,
    as json.dumps does; numpy values as numbers; a value orjson cannot write raises TypeError."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
