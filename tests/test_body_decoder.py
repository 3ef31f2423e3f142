"""The hand-written response body decoder against h11, the parser it replaces on the hot path.

Every valid body, cut into reads at arbitrary places, must come out byte for byte as h11 gives
it, with the same trailers; framing h11 refuses must be refused; bytes after the body must make
the connection unfit for reuse.
"""

from __future__ import annotations

import itertools

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.upstream.body import BodyDecoder, BodyError

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def h11_body(head: bytes, raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """What h11 makes of ``raw`` after ``head``: (body, trailers); raises RemoteProtocolError
    when it refuses the bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head + raw)
    body = b""
    while True:
        event = conn.next_event()
        if type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            return body, list(event.headers)
        elif event is h11.NEED_DATA:
            raise AssertionError("h11 wants more bytes: not a refusal")


def decode(raw: bytes, cuts: list[int], length: int | str = "chunked") -> tuple[BodyDecoder, bytes]:
    """Feed ``raw`` split at ``cuts``: the decoder, and the body bytes it handed out."""
    dec = BodyDecoder(length=length)  # type: ignore[arg-type]
    out = b""
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        dec.feed(raw[a:b])
        out += dec.take()
    if dec.error is not None:
        raise dec.error
    return dec, out


chunk_data = st.binary(min_size=1, max_size=300)
extension = st.sampled_from([b"", b";a=1", b"; name=\"v\"", b";x"])
trailer = st.tuples(st.sampled_from([b"X-Usage", b"server-timing", b"x-a"]),
                    st.sampled_from([b"1", b"a b", b"", b"tok;q=0.5"]))


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    chunks = draw(st.lists(chunk_data, max_size=8))
    upper = draw(st.booleans())
    raw = b""
    for data in chunks:
        size = b"%x" % len(data)
        raw += (size.upper() if upper else size) + draw(extension) + b"\r\n" + data + b"\r\n"
    trailers = draw(st.lists(trailer, max_size=3))
    raw += b"0" + draw(extension) + b"\r\n"
    raw += b"".join(k + b": " + v + b"\r\n" for k, v in trailers) + b"\r\n"
    return raw, b"".join(chunks), trailers


@settings(max_examples=300, deadline=None)
@given(chunked(), st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_any_chunked_body_in_any_reads_decodes_as_h11_does(
    case: tuple[bytes, bytes, list[tuple[bytes, bytes]]], cuts: list[int],
) -> None:
    raw, body, _ = case
    dec, out = decode(raw, cuts)
    expected_body, expected_trailers = h11_body(HEAD_CHUNKED, raw)
    assert dec.done and not dec.extra
    assert out == expected_body == body
    assert dec.trailers == expected_trailers


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=500), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_a_content_length_body_in_any_reads_is_whole_and_nothing_more(
    body: bytes, cuts: list[int],
) -> None:
    dec, out = decode(body, cuts, length=len(body))
    assert dec.done and out == body and not dec.extra


def test_partial_chunks_are_handed_out_as_they_arrive() -> None:
    """A large chunk is not held until its end: each read's bytes come out at once."""
    dec = BodyDecoder(length="chunked")
    dec.feed(b"10000\r\n" + b"a" * 1000)
    assert dec.take() == b"a" * 1000 and not dec.done
    dec.feed(b"b" * 64536)
    assert dec.take() == b"b" * 64536 and not dec.done
    dec.feed(b"\r\n0\r\n\r\n")
    assert dec.take() == b"" and dec.done


@pytest.mark.parametrize("raw", [
    b"1x\r\nab\r\n0\r\n\r\n",  # not hex
    b"+1\r\na\r\n0\r\n\r\n",  # int() would take it
    b" 1\r\na\r\n0\r\n\r\n",
    b"0x1\r\na\r\n0\r\n\r\n",
    b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    b"\r\n",  # empty size line
    b"1" * 21 + b"\r\n",  # 21 hex digits
    b"2\r\nabc\r\n0\r\n\r\n",  # data longer than its size: no CRLF after two bytes
    b"1\r\na\n0\r\n\r\n",  # bare LF after the data
    b"0\r\nno colon here\r\n\r\n",  # a trailer that is not a field
    b"0\r\nbad name: v\r\n\r\n",
    b"0\r\nx: a\x00b\r\n\r\n",  # NUL in a trailer value
    b"5;a\nb\r\nhello\r\n0\r\n\r\n",  # a bare LF inside a chunk extension
    b"0\r\nx: y\r\r\n\r\n",  # a CR left in a trailer value
    b"0\r\nx: a\r\n folded\r\r\n\r\n",  # ... or in a folded trailer line
    b"0\r\ncontent-length: abc\r\n\r\n",  # framing fields in trailers are checked too
    b"0\r\ntransfer-encoding: gzip\r\n\r\n",
])
def test_broken_framing_is_refused_like_h11_refuses_it(raw: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        h11_body(HEAD_CHUNKED, raw)
    with pytest.raises(BodyError):
        decode(raw, [])


def test_bytes_after_the_body_make_the_connection_unfit_for_reuse() -> None:
    dec, out = decode(b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n", [3, 9])
    assert dec.done and dec.extra and out == b"a"
    dec, out = decode(b"abcdEXTRA", [2], length=4)
    assert dec.done and dec.extra and out == b"abcd"


def test_a_size_line_or_trailers_past_the_limit_are_refused() -> None:
    dec = BodyDecoder(length="chunked", max_line=64)
    dec.feed(b"1" + b";ext" * 40)  # no line end yet, already past the limit
    assert isinstance(dec.error, BodyError)
    dec = BodyDecoder(length="chunked", max_line=64)
    dec.feed(b"0\r\n")
    for i in range(10):
        dec.feed(b"x-%d: %s\r\n" % (i, b"v" * 10))
    assert isinstance(dec.error, BodyError) and not dec.done


def test_bytes_framed_before_a_break_are_handed_out_and_nothing_after() -> None:
    dec = BodyDecoder(length="chunked")
    dec.feed(b"5\r\nhelloXX3\r\nabc\r\n")
    assert dec.take() == b"hello" and isinstance(dec.error, BodyError)
    dec.feed(b"0\r\n\r\n")
    assert dec.take() == b"" and not dec.done


def test_a_size_line_dripped_byte_by_byte_is_decoded() -> None:
    """Each byte its own read (a hostile or broken upstream): the same body, the line searched
    as it grows rather than from its start on every read."""
    raw = b"5;" + b"x" * 5000 + b"\r\nhello\r\n0\r\nx-a: 1\r\n\r\n"
    dec = BodyDecoder(length="chunked")
    out = b""
    for i in range(len(raw)):
        dec.feed(raw[i:i + 1])
        out += dec.take()
    assert dec.done and out == b"hello" and dec.trailers == [(b"x-a", b"1")]


def test_a_folded_trailer_is_joined_as_h11_joins_it() -> None:
    raw = b"1\r\na\r\n0\r\nx-a: one\r\n two\n\tthree\r\nx-b: 2\r\n\r\n"
    dec, out = decode(raw, [])
    assert out == b"a" and dec.trailers == h11_body(HEAD_CHUNKED, raw)[1]
    assert dec.trailers == [(b"x-a", b"one two three"), (b"x-b", b"2")]
