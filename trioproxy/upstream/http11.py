"""HTTP/1.1 message heads on upstream connections: the request head written, the response head
parsed. No I/O.

Why not h11 here: per request h11 spent ~18 µs building, validating and serialising the request
and ~21 µs parsing the response head; these take ~3 and ~7 µs
(``bench/results/FLOOR_ANALYSIS.md``). The rules are h11's, so behaviour does not change
(``tests/test_http11.py`` checks both against h11 on the same inputs), with three refusals h11
lacks: a status under 100 (h11 refuses it too, as a 1xx out of range), a first line that is no
status line as soon as it is in, and field lines parsed without h11's backtracking regex:
- request: the method is a token, the target has no whitespace or control bytes, every field
  name is a token and every value a field-value (no CR, LF, NUL, no leading or trailing
  whitespace);
- response: ``HTTP/d.d``, a status from 100, any reason; lines end in LF or CRLF; fields
  are ``token: value`` (obsolete line folding is unfolded), names lower-cased; keep-alive from
  HTTP/1.1 on unless ``Connection: close``;
  Content-Length values must agree and be digits; a Transfer-Encoding must be ``chunked``, once;
  the head may not grow past ``max_size`` bytes. Bodies are ``body.BodyDecoder``'s.

A response with both ``Transfer-Encoding: chunked`` and ``Content-Length`` is read as chunked
(as h11 reads it) with its ``Content-Length`` removed, as RFC 9112 section 6.3 requires of an
intermediary that forwards it; such framing is how responses get split, so its connection is
never reused (``ResponseHead.close``, ``conflicting_length``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..protocol.headers import Headers

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11: visible ASCII only
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?")
_HEAD_END = re.compile(rb"\n\r?\n")
MAX_HEAD = 256 * 1024  # as h11's max_incomplete_event_size on upstream connections
MAX_LENGTH_DIGITS = 20
_FOLD = (b" ", b"\t")
MAX_STATUS_LINE = 8192  # a status line still without its end past this is not HTTP/1.1


class InvalidField(ValueError):
    """A request field HTTP/1.1 does not allow: ``args[0]`` is its name only (the value may be
    a credential); no args: the request line (method or target)."""


class HeadError(ValueError):
    """A response head that is not valid HTTP/1.1 (the message never quotes a value)."""


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """The request line and fields, validated as h11 validates them. Raises InvalidField."""
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        raise InvalidField
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    hosts = 0
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None or _VALUE.fullmatch(value) is None:
            raise InvalidField(name.decode("latin-1"))
        if len(name) == 4 and name.lower() == b"host":
            hosts += 1
        parts += (name, b": ", value, b"\r\n")
    if hosts != 1:
        raise InvalidField("host")
    parts.append(b"\r\n")
    return b"".join(parts)


@dataclass(slots=True, frozen=True)
class ResponseHead:
    status: int
    reason: bytes
    http_version: bytes  # b"1.1", b"1.0", ...
    headers: Headers  # names lower-cased, in order
    length: int | None  # Content-Length, when there is one and no Transfer-Encoding
    chunked: bool
    close: bool  # the connection cannot be kept after this response
    conflicting_length: bool = False  # a Content-Length beside chunked, removed


def parse_response_head(data: bytes | bytearray, max_size: int = MAX_HEAD, searched: int = 0
                        ) -> tuple[ResponseHead, int] | None:
    """The first response head in ``data`` and where it ends, or None while it is incomplete.
    ``searched``: how many bytes of ``data`` an earlier call already looked through (the search
    resumes there: a head dripped in byte by byte costs linear time). A status line that is not
    HTTP's is refused as soon as it is in. Raises HeadError."""
    end = _HEAD_END.search(data, max(0, searched - 2))
    if end is None:
        if searched < MAX_STATUS_LINE:
            _check_status_line(data)
        if len(data) > max_size:
            raise HeadError(f"response head over {max_size} bytes")
        return None
    if end.start() > max_size:
        raise HeadError(f"response head over {max_size} bytes")
    lines = bytes(data[:end.start()]).split(b"\n")
    m = _status_line(lines[0])
    fields, length, chunked, close = checked_fields(parse_fields(lines[1:]))
    conflict = chunked and length is not None
    if conflict:  # RFC 9112 6.3: chunked wins, the length goes, the connection is suspect
        fields = [(name, value) for name, value in fields if name != b"content-length"]
    head = ResponseHead(int(m[2]), m[3] or b"", m[1], fields, None if chunked else length,
                        chunked, close or conflict or m[1] < b"1.1",  # keep-alive from 1.1 on
                        conflict)
    return head, end.end()


def parse_fields(lines: list[bytes]) -> Headers:
    """Header (or trailer) field lines, LF or CRLF stripped or not: (lower-cased name, value).
    Like h11, one CR is removed from the end of each physical line, before folded lines are
    joined: a continuation line ending in a bare CR leaves that CR in the value (refused)."""
    if any(line[:1] in _FOLD for line in lines):
        lines = _unfold(lines)  # each line's CR already removed
        cr = b""
    else:
        cr = b"\r"
    fields: Headers = []
    token, field_value = _TOKEN.fullmatch, _VALUE.fullmatch
    for raw in lines:
        # partition and strip, not one regex: "x:" + spaces + NUL made h11's backtrack for
        # seconds; here every byte is looked at a fixed number of times
        name, colon, value = raw.removesuffix(cr).partition(b":")
        value = value.strip(b" \t")
        if not colon or token(name) is None or field_value(value) is None:
            raise HeadError("invalid header field")
        fields.append((name.lower(), value))
    return fields


def _unfold(lines: list[bytes]) -> list[bytes]:
    """Obsolete line folding: a line starting with SP or HTAB continues the one before (joined
    by one SP). Each line loses one final CR first. Linear time: the pieces of a folded field
    are joined once, not appended to a growing bytes object."""
    folded: list[list[bytes]] = []
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if line[:1] in _FOLD:
            if not folded:
                raise HeadError("continuation line before any field")
            folded[-1] += (b" ", line.lstrip(b" \t"))
        else:
            folded.append([line])
    return [parts[0] if len(parts) == 1 else b"".join(parts) for parts in folded]


def _check_status_line(data: bytes | bytearray) -> None:
    """Refuse at once a first line that is in and is not a status line (or is far too long)."""
    first = data.find(b"\n", 0, MAX_STATUS_LINE)
    if first >= 0:
        _status_line(bytes(data[:first]))
    elif len(data) >= MAX_STATUS_LINE:
        raise HeadError("invalid status line")


def _status_line(line: bytes) -> re.Match[bytes]:
    """The status line's match (version, status from 100, reason). Raises HeadError."""
    m = _STATUS_LINE.fullmatch(line.removesuffix(b"\r"))
    if m is None or m[2] < b"100":
        raise HeadError("invalid status line")
    return m


def checked_fields(headers: Headers) -> tuple[Headers, int | None, bool, bool]:
    """(fields, Content-Length, chunked, Connection: close) of a head or trailer section; like
    h11, one Content-Length field with its single value and Transfer-Encoding lower-cased.
    Raises HeadError for conflicting or invalid framing fields."""
    length: bytes | None = None
    chunked = close = False
    fields: Headers = []
    for name, value in headers:
        if name == b"content-length":
            values = {v.strip() for v in value.split(b",")}
            if len(values) != 1 or (length is not None and values != {length}):
                raise HeadError("conflicting Content-Length headers")
            if length is not None:
                continue  # the same value again
            length = values.pop()
            if not length.isdigit() or not length.isascii() or len(length) > MAX_LENGTH_DIGITS:
                raise HeadError("bad Content-Length")
            value = length
        elif name == b"transfer-encoding":
            if chunked:
                raise HeadError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise HeadError("only Transfer-Encoding: chunked is supported")
            chunked = True
        elif name == b"connection" and b"close" in [
                t.strip().lower() for t in value.split(b",")]:
            close = True
        fields.append((name, value))
    return fields, None if length is None else int(length), chunked, close
