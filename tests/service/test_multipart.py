"""service.multipart: multipart bodies read with python-multipart, Starlette's rules kept."""

from __future__ import annotations

import pytest

from service.multipart import MAX_FIELD_BYTES, MultipartError, TooManyFiles, read_parts

B = "xyzzy"
CT = f"multipart/form-data; boundary={B}"
pytestmark = pytest.mark.anyio


def body(*parts: tuple) -> bytes:
    """(headers, data) parts into one multipart body."""
    out = b""
    for headers, data in parts:
        out += (
            f"--{B}\r\n".encode() + b"".join(h.encode() + b"\r\n" for h in headers) + b"\r\n" + data + b"\r\n"
        )
    return out + f"--{B}--\r\n".encode()


def file_part(name: str, filename: str, data: bytes) -> tuple:
    return ([f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'], data)


async def chunks_of(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def read(
    data: bytes, size: int = 1 << 16, content_type: str = CT, max_files: int = 4, max_fields: int = 4
):
    return await read_parts(content_type, chunks_of(data, size), "file", max_files, max_fields)


@pytest.mark.parametrize("size", [1, 7, 1 << 16])
async def test_the_wanted_parts_in_order_however_the_body_arrives(size):
    payload = bytes(range(256)) * 40 + f"\r\n--{B}".encode()[:-1]  # almost a boundary, inside the data
    data = body(
        file_part("file", "a.png", payload),
        (['Content-Disposition: form-data; name="note"'], b"text"),
        file_part("other", "x.bin", b"not wanted"),
        file_part("file", "b.png", b"second"),
    )
    assert await read(data, size) == [("file", "a.png", payload), ("file", "b.png", b"second")]


async def test_a_text_field_of_the_wanted_name_has_no_filename():
    data = body((['Content-Disposition: form-data; name="file"'], b"hello"))
    assert await read(data) == [("file", None, b"hello")]


async def test_names_decode_as_utf8_or_latin1():
    data = body(file_part("file", "caf\u00e9.png", b"1"))
    utf8 = data.replace("caf\u00e9".encode("latin-1"), "caf\u00e9".encode())
    assert (await read(utf8))[0][1] == "caf\u00e9.png"
    latin1 = body(
        ([b'Content-Disposition: form-data; name="file"; filename="caf\xe9.png"'.decode("latin-1")], b"1")
    )
    assert (await read(latin1.replace("caf\u00e9".encode(), b"caf\xe9")))[0][1] == "caf\u00e9.png"


async def test_limits():
    with pytest.raises(TooManyFiles, match="Maximum number of files is 2"):
        await read(body(*[file_part("file", "a", b"1")] * 3), max_files=2)
    with pytest.raises(MultipartError, match="Maximum number of fields is 1"):
        await read(body(*[(['Content-Disposition: form-data; name="n"'], b"1")] * 2), max_fields=1)
    with pytest.raises(MultipartError, match="maximum size"):
        await read(body((['Content-Disposition: form-data; name="n"'], b"x" * (MAX_FIELD_BYTES + 1))))


@pytest.mark.parametrize(
    "data,content_type,message",
    [
        (body((["Content-Disposition: form-data"], b"1")), CT, '"name" must be provided'),
        (body(file_part("file", "a", b"1")), "multipart/form-data", "Missing boundary"),
        (b"--xyzzy\r\nnot a header line at all\r\n\r\n", CT, "Invalid multipart data"),
        (b"garbage without any boundary", CT, "Invalid multipart data"),
    ],
    ids=["no name", "no boundary", "bad header", "no boundary in the body"],
)
async def test_malformed_bodies(data, content_type, message):
    with pytest.raises(MultipartError, match=message):
        await read(data, content_type=content_type)


@pytest.mark.parametrize("charset", ["base64", "zlib", "idna", "no-such-charset"])
async def test_a_charset_that_is_no_text_encoding_reads_names_as_latin1(charset):
    data = body(file_part("file", "caf\u00e9.png", b"1")).replace("caf\u00e9".encode(), b"caf\xe9")
    assert await read(data, content_type=f"{CT}; charset={charset}") == [("file", "caf\u00e9.png", b"1")]
