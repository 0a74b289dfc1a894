"""service.multipart: multipart bodies read with python-multipart, Starlette's rules kept."""

from __future__ import annotations

import asyncio
import codecs

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from service import multipart
from service.multipart import MAX_FIELD_BYTES, MultipartError, TooManyFiles, read_parts

B = "xyzzy"
CT = f"multipart/form-data; boundary={B}"
pytestmark = pytest.mark.anyio


def body(*parts: tuple, boundary: str = B) -> bytes:
    """(headers, data) parts into one multipart body."""
    out = b""
    for headers, data in parts:
        out += (
            f"--{boundary}\r\n".encode()
            + b"".join(h.encode() + b"\r\n" for h in headers)
            + b"\r\n"
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


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


def _by_the_parser(data: bytes, max_files: int = 4, max_fields: int = 4, boundary: str = B):
    """What python-multipart's parser alone reads from ``data`` (the parts, or the error)."""
    reader = multipart._Reader("file", max_files, max_fields, "utf-8")
    try:
        multipart._parse(data, boundary.encode(), reader)
    except MultipartError as exc:
        return type(exc), str(exc)
    return reader.parts


async def _as_read(data: bytes, max_files: int = 4, max_fields: int = 4, boundary: str = B):
    try:
        return await read(
            data,
            max_files=max_files,
            max_fields=max_fields,
            content_type=f"multipart/form-data; boundary={boundary}",
        )
    except MultipartError as exc:
        return type(exc), str(exc)


async def test_a_plain_body_is_cut_without_the_parser_into_the_same_parts():
    payload = bytes(range(256)) * 40 + f"\r\n--{B}".encode()[:-1]  # almost a delimiter
    data = body(
        file_part("file", "a.png", payload),
        (['Content-Disposition:   form-data; name="note"', "X-Other: 1"], b"text"),
        (['content-disposition: form-data; name="file"; filename="b.png"', "Content-Type: image/png"], b""),
    )
    assert None not in list(multipart._plain_parts(data, B.encode()))
    assert (
        await _as_read(data) == _by_the_parser(data) == [("file", "a.png", payload), ("file", "b.png", b"")]
    )


_PLAIN_HEADERS = [
    'Content-Disposition: form-data; name="file"; filename="a.png"',
    'Content-Disposition: form-data; name="file"',
    'content-disposition:form-data; name="f"; filename="x"',
    "Content-Disposition: form-data",
    "Content-Type: image/png",
    "Trailing:  spaces  ",
]
_ODD_HEADERS = ["X-Long: " + "v" * 4200, "Bad Header: 1", "NoColon", "Lone: \r", "Lf: a\nb"]
_HEADERS = st.sampled_from(_PLAIN_HEADERS * 8 + _ODD_HEADERS)  # mostly plain ones
_DATA = st.sampled_from(  # {} is the boundary
    [b"", b"1", b"\r\n\r\n", b"x" * 100] * 3 + [b"\r\n--{}", b"--{}--", b"\r\n--{}-", b"\r\n--{}\r\n"]
)


def test_what_clients_send_is_cut_plainly():
    """httpx's and the benchmark client's bodies (as requests' and curl's: a delimiter, the
    part's header lines, its bytes) take the plain path."""
    import httpx

    from benchmarks.client import multipart as bench_multipart

    image = bytes(range(256)) * 100
    request = httpx.Request("POST", "http://x/predict", files=[("file", ("a.png", image, "image/png"))] * 2)
    sent = request.read()
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    assert [sent[s:e] for _, s, e in multipart._plain_parts(sent, boundary)] == [image, image]  # no None
    bench = bench_multipart(image)
    boundary = bench.content_type.split("boundary=")[1].encode()
    assert [bench.body[s:e] for _, s, e in multipart._plain_parts(bench.body, boundary)] == [image]


@settings(max_examples=600, deadline=None)
@given(
    parts=st.lists(
        st.tuples(
            st.one_of(st.lists(_HEADERS, min_size=1, max_size=3), st.lists(_HEADERS, max_size=10)),
            st.lists(_DATA, max_size=3),
        ),
        max_size=5,
    ),
    cuts=st.one_of(
        st.just([]),
        st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=4), st.integers(0, 3)), max_size=3),
    ),
    tail=st.sampled_from([b"", b"\r\n", b"epilogue", b"\r\n\r\n"]),
    limits=st.sampled_from([(4, 4), (1, 1), (0, 1), (1, 0)]),
    boundary=st.sampled_from([B, "-", "a-b", "x" * 256, "y" * 257]),  # python-multipart takes 256 at most
)
def test_whatever_the_body_both_ways_read_the_same(parts, cuts, tail, limits, boundary):
    """A differential check: every body, plain or not, reads as python-multipart's parser
    alone reads it: the same parts, or the same error."""
    pieces_of = [(headers, b"".join(pieces).replace(b"{}", boundary.encode())) for headers, pieces in parts]
    data = body(*pieces_of, boundary=boundary)
    data = data[: len(data) - 2] + tail if tail else data
    for at, insert, drop in cuts:  # damage it here and there
        at %= len(data) + 1
        data = data[:at] + insert + data[at + drop :]
    read_here = asyncio.run(_as_read(data, *limits, boundary=boundary))
    assert read_here == _by_the_parser(data, *limits, boundary=boundary)


async def test_a_body_of_many_parts_is_refused_at_the_first_one_too_many(monkeypatch):
    """The rules apply part by part, as the body is cut: 2.5 million nameless parts (or
    fields past the limit) are refused at the first, not after all of them are cut
    (an attacker's 32 MiB body cost seconds and ~300 MiB when they were cut first)."""
    cut = []  # the header blocks read
    disposition = multipart._disposition
    monkeypatch.setattr(multipart, "_disposition", lambda block: cut.append(block) or disposition(block))
    nameless = b"--b\r\n" + b"a:\r\n\r\n\r\n--b\r\n" * (32 << 20 >> 4) + b"a:\r\n\r\n\r\n--b--"
    with pytest.raises(MultipartError, match='"name" must be provided'):
        await read(nameless, content_type="multipart/form-data; boundary=b")
    assert len(cut) == 1
    cut.clear()
    fields = body(*[(['Content-Disposition: form-data; name="n"'], b"1")] * 10_000)
    with pytest.raises(MultipartError, match="Maximum number of fields is 4"):
        await read(fields)
    assert len(cut) == 5


async def test_a_long_header_block_is_left_to_the_parser_unsplit(monkeypatch):
    """A part's header block longer than python-multipart takes (8 lines of 4 KiB) is not
    copied and split into lines here: 32 MiB of 2-byte lines took ~480 MiB that way."""
    blocks = []
    disposition = multipart._disposition
    monkeypatch.setattr(
        multipart, "_disposition", lambda block: blocks.append(len(block)) or disposition(block)
    )
    data = b"--b\r\n" + b"ab\r\n" * (8 << 20) + b"\r\nx\r\n--b--"
    assert await _as_read(data, boundary="b") == _by_the_parser(data, boundary="b")
    assert blocks == []


@pytest.mark.parametrize("kind", [bytearray, memoryview])
async def test_a_body_in_one_chunk_of_any_bytes_like_type_reads_as_bytes(kind):
    data = body(file_part("file", "a.png", b"IMG"))

    async def one_chunk():
        yield kind(data)

    assert await read_parts(CT, one_chunk(), "file", 4, 4) == [("file", "a.png", b"IMG")]


def test_the_headers_clients_send_are_read_without_the_parameter_parser(monkeypatch):
    """httpx's, curl's, requests' and browsers' Content-Type and Content-Disposition take the
    regular expressions (the parser is never called) and read as the parser reads them."""
    import httpx
    from python_multipart.multipart import parse_options_header

    def refuse(value):
        raise AssertionError(f"parsed with python-multipart: {value!r}")

    monkeypatch.setattr(multipart, "parse_options_header", refuse)
    request = httpx.Request("POST", "http://x/predict", files=[("file", ("a b.png", b"x", "image/png"))])
    dispositions = [
        b'form-data; name="file"; filename="a b.png"',
        b'form-data; name="file"; filename="img.png"',
        b'form-data; name="file"',  # a text field
        b'FORM-DATA;name="f";FILENAME="x"',
        b'form-data; name=""; filename=""',
    ]
    for value in dispositions:
        assert multipart.options(value) == parse_options_header(value)[1]
    for content_type in [
        request.headers["content-type"],
        "multipart/form-data; boundary=------------------------a1b2c3d4e5f6",  # curl
        "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",  # browsers
        "Multipart/Form-Data;boundary='()+_,-./:=?",
    ]:
        expected = parse_options_header(content_type)[1][b"boundary"]
        assert multipart.boundary_and_charset(content_type) == (expected, "utf-8")


_PARAM_TEXT = st.lists(
    st.sampled_from(list("aZ09 \t;\"\\=*:/-_.'()+,?é") + ["\\\\", '\\"', "C:\\", "\\\\srv\\", "a.png"]),
    max_size=6,
).map("".join)  # single characters, and what the parser unescapes or cuts (IE6's full paths)
_EQUALS = st.sampled_from(["=", "=", "=", " =", "= "])
_SEPARATOR = st.sampled_from(["; ", "; ", ";", ";\t", " ;", ";;"])


def _param(key: str, equals: str, quoted: bool, text: str) -> str:
    return f"{key}{equals}" + (f'"{text}"' if quoted else text)


@settings(max_examples=1000, deadline=None)
@given(
    head=st.sampled_from(["form-data", "FORM-data", "attachment", "form-data "]),
    name=st.tuples(st.sampled_from(["name", "NAME", "name*", "x"]), _EQUALS, st.booleans(), _PARAM_TEXT),
    filename=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(["filename", "Filename", "filename*", "name"]),
            _EQUALS,
            st.booleans(),
            _PARAM_TEXT,
        ),
    ),
    separators=st.tuples(_SEPARATOR, _SEPARATOR),
    tail=st.sampled_from(["", "", " ", ";", '; x="y"']),
)
@example("form-data", ("name", "=", True, "f"), ("filename", "=", True, "C:\\x\\a.png"), ("; ", "; "), "")
@example("form-data", ("name", "=", True, "a\\\\b"), ("filename", "=", True, "a\\\\b"), ("; ", "; "), "")
def test_whatever_the_disposition_both_ways_read_the_same(head, name, filename, separators, tail):
    """A differential check of ``options`` against python-multipart's ``parse_options_header``,
    on dispositions near the plain shape."""
    from python_multipart.multipart import parse_options_header

    value = head + separators[0] + _param(*name)
    if filename is not None:
        value += separators[1] + _param(*filename)
    raw = (value + tail).encode("latin-1")
    assert multipart.options(raw) == parse_options_header(raw)[1]


@settings(max_examples=1000, deadline=None)
@given(
    head=st.sampled_from(
        ["multipart/form-data", "Multipart/Form-Data", "multipart/mixed", "multipart/form-data ", "multıpart/form-data"]
    ),  # U+0131, dotless i: Unicode's case folding takes it for i, ASCII's does not
    boundary=st.tuples(st.sampled_from(["boundary", "BOUNDARY", "boundary*", "charset"]), _EQUALS, st.booleans(),
                       _PARAM_TEXT),
    separator=_SEPARATOR,
    tail=st.sampled_from(["", "", " ", ";", "; charset=latin-1", '; charset="utf-16"', "; charset=base64",
                          "; charset=nonesuch", "; boundary=second"]),
)  # fmt: skip
def test_whatever_the_content_type_both_ways_read_the_same(head, boundary, separator, tail):
    """A differential check of ``boundary_and_charset`` against python-multipart's
    ``parse_options_header`` and the charset rules read_parts had, on types near the plain shape."""
    from python_multipart.multipart import parse_options_header

    value = head + separator + _param(*boundary) + tail
    try:
        parsed = parse_options_header(value)[1]
    except UnicodeEncodeError:  # what is not Latin-1: the same error both ways
        with pytest.raises(UnicodeEncodeError):
            multipart.boundary_and_charset(value)
        return
    named = parsed.get(b"charset", b"utf-8").decode("latin-1")
    try:
        named = codecs.lookup(named).name
    except LookupError:
        named = "latin-1"
    expected = (parsed.get(b"boundary") or None, named if named in multipart._TEXT_CHARSETS else "latin-1")
    assert multipart.boundary_and_charset(value) == expected
