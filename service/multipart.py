"""``multipart/form-data`` bodies read straight into bytes: python-multipart's parser,
without Starlette's form layer.

Starlette's ``request.form()`` gives each file a ``SpooledTemporaryFile`` and an
``UploadFile``, writes the data into it as it arrives and reads it back; measured
at c16 on 256x256 PNGs it was a quarter of the event loop's time per ``/predict``
request (``docs/performance.md``, "Host work per image"). Here the same parser
(python-multipart, which Starlette uses) feeds the parts' bytes into lists joined
once per part, keeping only what the caller wants: the ``file`` parts.

The rules are Starlette's: a part is a file when its ``Content-Disposition`` has a
``filename``; every part needs a ``name``; at most ``max_files`` files and
``max_fields`` other fields, each field at most 1 MiB; names decode as the body's
charset or Latin-1.

The body is read whole first (its memory is reserved by then: twice its size,
:mod:`service.middleware`). A body as clients write it (each delimiter followed by a
line break, each part's header lines ``Name: value``, nothing before the first
delimiter or after the last) is cut into its parts by :func:`_plain_parts`, which finds
the delimiters with ``bytes.find``; python-multipart's parser walks the body in Python
and calls back per piece: reading a 110 KB image's body took the event loop ~0.05 ms
that way, ~0.035 this way (``docs/performance.md``, "Host work per image"). Any other body goes to that parser,
which reads or refuses it as before; the same rules apply to the parts either way, part
by part as each is cut (a body of a million parts is refused at the first one too many,
before the rest is looked at). Only header blocks within that parser's limits are read
here, and boundaries within its 256 bytes.
"""

from __future__ import annotations

import codecs
import re
from typing import AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_HEADER_SIZE,
    MAX_BOUNDARY_LENGTH,
    TOKEN_CHARS,
    MultipartParser,
    parse_options_header,
)

__all__ = ["MultipartError", "TooManyFiles", "FilePart", "read_parts"]

MAX_FIELD_BYTES = 1 << 20  # a part that is not a file (Starlette's max_part_size)
# The charsets a part's name and filename are read in (as codecs.lookup names them); any other
# is read as Latin-1, which never fails.
_TEXT_CHARSETS = frozenset(("utf-8", "ascii", "iso8859-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be"))


class MultipartError(ValueError):
    """The body is not multipart data we can read; the message says why."""


class TooManyFiles(MultipartError):
    """More file parts than allowed."""


FilePart = Tuple[str, Optional[str], bytes]  # (name, filename or None for a text field, data)


class _Reader:
    def __init__(self, wanted: str, max_files: int, max_fields: int, charset: str) -> None:
        self.wanted, self.max_files, self.max_fields, self.charset = wanted, max_files, max_fields, charset
        self.parts: List[FilePart] = []
        self.files = self.fields = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._data: List[bytes] = []
        self._size = 0
        self._name = ""
        self._filename: Optional[str] = None
        self._keep = False

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeError:
            return raw.decode("latin-1")

    def on_part_begin(self) -> None:
        self._disposition, self._data, self._size = b"", [], 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self.on_disposition(self._header_value)
        self._header_name = self._header_value = b""

    def on_disposition(self, value: bytes) -> None:
        self._disposition = value

    def on_headers_finished(self) -> None:
        params = options(self._disposition)
        if b"name" not in params:
            raise MultipartError('The Content-Disposition header field "name" must be provided.')
        self._name = self._decode(params[b"name"])
        if b"filename" in params:
            self.files += 1
            if self.files > self.max_files:
                raise TooManyFiles(f"Too many files. Maximum number of files is {self.max_files}.")
            self._filename = self._decode(params[b"filename"])
        else:
            self.fields += 1
            if self.fields > self.max_fields:
                raise MultipartError(f"Too many fields. Maximum number of fields is {self.max_fields}.")
            self._filename = None
        self._keep = self._name == self.wanted

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._filename is None and self._size > MAX_FIELD_BYTES:
            raise MultipartError(f"Part exceeded maximum size of {MAX_FIELD_BYTES // 1024}KB.")
        if self._keep:
            self._data.append(data[start:end])

    def on_part_end(self) -> None:
        if self._keep:
            self.parts.append((self._name, self._filename, b"".join(self._data)))
        self._data = []


# What clients write, read without python-multipart's parameter parser (``parse_options_header``,
# ~4% of the event loop's CPU per /predict at c16, docs/performance.md): a boundary of RFC 2046's
# characters but space, unquoted; a disposition of a quoted name and an optional quoted filename
# without a quote, backslash or semicolon in them. Each reads as that parser reads it (its
# parameter names in any case; tests/service/test_multipart.py compares the two); anything else
# goes to it.
_PLAIN_CONTENT_TYPE = re.compile(
    r"multipart/form-data;[ \t]*boundary=([0-9A-Za-z'()+_,./:=?-]+)", re.I | re.ASCII
)  # ASCII: Unicode's case folding would take U+0131 for i, and U+212A for K
_PLAIN_DISPOSITION = re.compile(rb'form-data;[ \t]*name="([^"\\;]*)"(?:;[ \t]*filename="([^"\\;]*)")?', re.I)


def options(value: bytes) -> Dict[bytes, bytes]:
    """The parameters of a ``Content-Disposition`` value, as ``parse_options_header`` reads them."""
    plain = _PLAIN_DISPOSITION.fullmatch(value)
    if plain is None:
        return parse_options_header(value)[1]
    name, filename = plain.groups()
    return {b"name": name} if filename is None else {b"name": name, b"filename": filename}


def boundary_and_charset(content_type: str) -> Tuple[Optional[bytes], str]:
    """A multipart ``Content-Type``'s boundary (None without one) and the charset its parts'
    names are read in: the one it names if that is a text encoding, else Latin-1; UTF-8 by default."""
    plain = _PLAIN_CONTENT_TYPE.fullmatch(content_type)
    if plain is not None:
        return plain.group(1).encode("latin-1"), "utf-8"
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    if charset not in _TEXT_CHARSETS:  # base64, zlib, idna...: codecs, not what names are written in
        charset = "latin-1"
    return params.get(b"boundary") or None, charset


# A part's header block over this is more lines or longer lines than python-multipart takes.
_MAX_HEADER_BLOCK = DEFAULT_MAX_HEADER_COUNT * (DEFAULT_MAX_HEADER_SIZE + 2)


def _plain_parts(body: bytes, boundary: bytes) -> Iterator[Optional[Tuple[bytes, int, int]]]:
    """Each part in turn, while ``body`` is laid out plainly (module docstring): its
    ``Content-Disposition`` value (b"" without one) and where its data starts and ends in
    ``body``. A None means the body is not plain after all: python-multipart's parser
    decides then, from the start. Whatever this yields, that parser reads the same."""
    delimiter = b"\r\n--" + boundary
    if len(boundary) > MAX_BOUNDARY_LENGTH or not body.startswith(delimiter[2:] + b"\r\n"):
        yield None
        return
    at = len(delimiter)
    while True:
        headers_end = body.find(b"\r\n\r\n", at, at + _MAX_HEADER_BLOCK + 4)
        # Not found within the block a part's headers may take, or none at all: not plain.
        disposition = _disposition(body[at:headers_end]) if headers_end > at else None
        end = -1 if disposition is None else body.find(delimiter, headers_end + 4)
        if end < 0:
            yield None
            return
        after = end + len(delimiter)
        follows, rest = body[after : after + 2], len(body) - after - 2
        last = follows == b"--" and (rest == 0 or (rest == 2 and body.endswith(b"\r\n")))  # no epilogue
        if follows != b"\r\n" and not last:
            yield None
            return
        yield disposition, headers_end + 4, end
        if last:
            return
        at = after + 2


def _disposition(block: bytes) -> Optional[bytes]:
    """The ``Content-Disposition`` value of a part's header lines, as python-multipart
    reads it (the last one, leading spaces dropped); None if a line is not plainly ``Name: value``
    or the block is over that parser's limits."""
    lines = block.split(b"\r\n")
    if len(lines) > DEFAULT_MAX_HEADER_COUNT:
        return None
    found = b""
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, TOKEN_CHARS) or b"\r" in value:
            return None
        if len(line) > DEFAULT_MAX_HEADER_SIZE:  # python-multipart refuses it
            return None
        if name.lower() == b"content-disposition":
            found = value.lstrip(b" ")
    return found


def _read(body: bytes, boundary: bytes, new_reader: Callable[[], "_Reader"]) -> "_Reader":
    """A reader fed the parts of ``body``, cut plainly as far as the body goes plainly (its
    rules apply part by part: a body of many parts is refused at the first one too many), or
    by python-multipart's parser into a fresh reader once it does not."""
    reader = new_reader()
    for part in _plain_parts(body, boundary):
        if part is None:
            reader = new_reader()  # the parts kept so far go: the parser keeps its own
            _parse(body, boundary, reader)
            return reader
        disposition, start, end = part
        reader.on_part_begin()
        reader.on_disposition(disposition)
        reader.on_headers_finished()
        reader.on_part_data(body, start, end)
        reader.on_part_end()
    return reader


def _parse(body: bytes, boundary: bytes, reader: "_Reader") -> None:
    """Feed ``reader`` the parts of ``body`` as python-multipart's parser reads them."""
    callbacks = {
        name: getattr(reader, name)
        for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished",
        )
    }  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise MultipartError("Invalid multipart data.") from None


async def read_parts(
    content_type: str, chunks: AsyncIterator[bytes], wanted: str, max_files: int, max_fields: int
) -> List[FilePart]:
    """The parts named ``wanted``, in order, from a multipart body arriving as ``chunks``.

    Raises:
        TooManyFiles: more than ``max_files`` file parts.
        MultipartError: anything else that makes the body unreadable as multipart data.
    """
    boundary, charset = boundary_and_charset(content_type)
    if boundary is None:
        raise MultipartError("Missing boundary in multipart.")
    received = [chunk async for chunk in chunks]
    one = len(received) == 1 and type(received[0]) is bytes
    body = received[0] if one else b"".join(received)  # bytes, whatever the chunks were
    del received
    return _read(body, boundary, lambda: _Reader(wanted, max_files, max_fields, charset)).parts
