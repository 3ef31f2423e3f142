"""The upstream leg's own HTTP/1.1 head writer and parser against h11, which they replace.

Same inputs, same answers: a request h11 refuses to build is refused (naming the field only),
one it builds is the same bytes; a response head h11 accepts parses to the same status, reason,
version and fields, one it refuses is refused.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.upstream.http11 import HeadError, InvalidField, parse_response_head, request_head

NAMES = st.sampled_from([b"host", b"Content-Type", b"x-api-key", b"anthropic-beta", b"x_y",
                         b"bad name", b"", b"a:b", b"\xff", b"Accept"])
VALUE_BYTES = st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\x00", b"\x7f", b"\x80", b"v",
                               b"=", b";", b'"'])
VALUES = st.lists(VALUE_BYTES, max_size=6).map(b"".join)


def h11_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    return conn.send(h11.Request(method=method, target=target, headers=headers))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(NAMES, VALUES), max_size=5),
       st.sampled_from([b"/v1/messages?beta=true", b"/a b", b"/\x00", b"/\xe9", b"*"]),
       st.sampled_from([b"POST", b"GET", b"P OST", b""]))
def test_request_heads_are_built_or_refused_as_h11_does(headers, target, method) -> None:
    headers = [(b"host", b"api.example"), *headers]
    try:
        expected = h11_request(method, target, headers)
    except h11.LocalProtocolError:
        expected = None
    if expected is None:
        with pytest.raises(InvalidField):
            request_head(method, target, headers)
    elif any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in headers):
        pass  # the proxy sets framing itself; h11 normalises these (not used here)
    else:
        assert request_head(method, target, headers) == expected


def test_a_refused_field_is_named_by_its_name_only() -> None:
    with pytest.raises(InvalidField) as err:
        request_head(b"POST", b"/v1/messages", [(b"x-api-key", b"sk-secret\r\nx: y")])
    assert err.value.args == ("x-api-key",)


LINE_END = st.sampled_from([b"\r\n", b"\n"])
STATUS = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found", b"HTTP/1.0 200 OK",
                          b"HTTP/1.1 204", b"HTTP/1.1 200 ", b"HTTP/2.0 200 OK",
                          b"HTTP/1.1 20 OK", b"HTTP/1.1 200 O\x00K", b"HTTX/1.1 200 OK",
                          b" HTTP/1.1 200 OK"])
FIELD_LINES = st.sampled_from([
    b"content-type: application/json", b"Request-Id:req_1", b"x-a:  spaced  ", b"x-b:",
    b"content-length: 12", b"Content-Length: 12, 12", b"content-length: 1, 2",
    b"content-length: +3", b"transfer-encoding: chunked", b"Transfer-Encoding: gzip",
    b"connection: close", b" folded continuation", b"\tfolded tab", b"bad line",
    b"x c: d", b"x-d: \x01", b"x-e: a\x80b",
])


@settings(max_examples=500, deadline=None)
@given(STATUS, st.lists(FIELD_LINES, max_size=5), LINE_END)
def test_response_heads_parse_as_h11_parses_them(status, lines, eol) -> None:
    raw = eol.join([status, *lines]) + eol + eol + b"body"
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
        while type(event) is h11.InformationalResponse:
            event = conn.next_event()
    except h11.RemoteProtocolError:
        event = None
    if event is None:
        with pytest.raises(HeadError):
            parse_response_head(raw)
        return
    parsed = parse_response_head(raw)
    assert parsed is not None
    head, end = parsed
    assert raw[end:] == b"body"
    assert (head.status, head.reason, head.http_version) == (
        event.status_code, event.reason, event.http_version)
    expected = list(event.headers)
    if {b"transfer-encoding", b"content-length"} <= {k for k, _ in expected}:
        expected = [(k, v) for k, v in expected if k != b"content-length"]  # removed, RFC 9112
    assert head.headers == expected


def test_an_incomplete_head_waits_and_an_endless_one_is_refused() -> None:
    assert parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-type: a") is None
    with pytest.raises(HeadError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nx: " + b"a" * 300_000)


@pytest.mark.parametrize(("lines", "chunked", "length", "close"), [
    ([b"HTTP/1.1 200 OK", b"content-length: 5"], False, 5, False),
    ([b"HTTP/1.1 200 OK", b"transfer-encoding: chunked", b"content-length: 5"], True, None,
     True),  # both: read as chunked, the connection never reused
    ([b"HTTP/1.1 200 OK", b"Connection: keep-alive, Close"], False, None, True),
    ([b"HTTP/1.0 200 OK", b"content-length: 5"], False, 5, True),
    ([b"HTTP/1.1 200 OK"], False, None, False),
])
def test_framing_and_keep_alive_are_read_from_the_head(lines, chunked, length, close) -> None:
    parsed = parse_response_head(b"\r\n".join(lines) + b"\r\n\r\n")
    assert parsed is not None
    head = parsed[0]
    assert (head.chunked, head.length, head.close) == (chunked, length, close)


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 099 X\r\ncontent-length: 0\r\n\r\n",  # not a status: never skipped as 1xx
    b"HTTP/1.1 200 OK\r\nx:" + b" " * 100_000 + b"\x00\r\n\r\n",  # h11's regex backtracked
    b"HTTP/1.1 200 OK\r\nx: a" + b" \t" * 50_000 + b"\x00\r\n\r\n",
])
def test_hostile_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(HeadError):
        parse_response_head(raw)


def test_spaces_around_a_value_are_not_part_of_it() -> None:
    parsed = parse_response_head(b"HTTP/1.1 200 OK\r\nx:" + b" " * 100_000 + b"v  \t\r\n\r\n")
    assert parsed is not None and parsed[0].headers == [(b"x", b"v")]


@pytest.mark.parametrize("first", [b"\tHTTP/1.1 200 OK\r\n", b"\x00HTTP/1.1 200 OK\n",
                                   b"SSH-2.0-OpenSSH_9.6\r\n", b"x" * 9000])
def test_a_first_line_that_is_no_status_line_is_refused_before_the_head_ends(first) -> None:
    with pytest.raises(HeadError):
        parse_response_head(first + b"content-type: a\r\n")


def test_a_head_dripped_byte_by_byte_parses_the_same() -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-%d: %d\r\n" % (i, i) for i in range(500))
    raw += b"\r\nbody"
    buf, searched, parsed = bytearray(), 0, None
    for i in range(len(raw)):
        buf += raw[i:i + 1]
        parsed = parse_response_head(buf, searched=searched)
        if parsed is not None:
            break
        searched = len(buf)
    assert parsed is not None and parsed[0].headers == parse_response_head(raw)[0].headers
    assert parsed[1] == len(raw) - len(b"body")


# Folded and CR-laden heads: each line with its own ending (a bare CR before the LF stays in
# the line for h11, which removes one CR per physical line, then joins folded lines).
CR_LINES = st.sampled_from([
    b"content-type: application/json", b"x-a: v", b" folded", b"\tfolded tab", b" ", b"\t",
    b"x-b: a\rb", b" fold\rmid", b"x-c:", b"bad line",
])
CR_ENDS = st.sampled_from([b"\r\n", b"\n", b"\r\r\n", b"\r"])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(CR_LINES, CR_ENDS), max_size=6))
def test_folded_and_cr_laden_heads_parse_as_h11_parses_them(lines) -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(line + end for line, end in lines) + b"\r\nbody"
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        with pytest.raises(HeadError):
            parse_response_head(raw)
        return
    parsed = parse_response_head(raw)
    if event is h11.NEED_DATA:  # a last line ending in a bare CR: no blank line yet
        assert parsed is None
        return
    assert parsed is not None and type(event) is h11.Response
    assert parsed[0].headers == list(event.headers) and raw[parsed[1]:] == b"body"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nx: a\r\n folded\r\r\n\r\n",  # h11: 'illegal header line'
    b"HTTP/1.1 200 OK\nx: a\n\tfolded\r\r\n\n",
])
def test_a_folded_line_ending_in_a_bare_cr_is_refused(raw) -> None:
    with pytest.raises(HeadError):
        parse_response_head(raw)


def test_a_long_folded_field_is_joined_as_h11_joins_it() -> None:
    raw = b"HTTP/1.1 200 OK\r\nx: a\r\n" + b" b\r\n\tc\n" * 20_000 + b"\r\n"
    parsed = parse_response_head(raw)
    assert parsed is not None
    assert parsed[0].headers == [(b"x", b"a" + b" b c" * 20_000)]


def test_chunked_with_a_content_length_is_read_as_chunked_without_it_and_not_reused() -> None:
    parsed = parse_response_head(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\nx: y\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
    assert parsed is not None
    head = parsed[0]
    assert head.chunked and head.length is None and head.close
    assert head.headers == [(b"x", b"y"), (b"transfer-encoding", b"chunked")]
