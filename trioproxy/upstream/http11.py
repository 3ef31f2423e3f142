"""HTTP/1.1 message heads on upstream connections: the request head written, the response head
parsed. No I/O.

Why not h11 here: per request h11 spent ~18 µs building, validating and serialising the request
and ~21 µs parsing the response head; these take ~3 µs each (``bench/results/FLOOR_ANALYSIS.md``).
The rules are h11's, so behaviour does not change (``tests/test_http11.py`` checks both against
h11 on the same inputs):
- request: the method is a token, the target has no whitespace or control bytes, every field
  name is a token and every value a field-value (no CR, LF, NUL, no leading or trailing
  whitespace);
- response: ``HTTP/d.d``, a three-digit status, any reason; lines end in LF or CRLF; fields
  are ``token: value`` (obsolete line folding is unfolded), names lower-cased; keep-alive from
  HTTP/1.1 on unless ``Connection: close``;
  Content-Length values must agree and be digits; a Transfer-Encoding must be ``chunked``, once;
  the head may not grow past ``max_size`` bytes. Bodies are ``body.BodyDecoder``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # h11: visible ASCII only
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ((?:[ \t]|[^\x00\s])*))?")
_FIELD = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
_HEAD_END = re.compile(rb"\n\r?\n")
MAX_HEAD = 256 * 1024  # as h11's max_incomplete_event_size on upstream connections
MAX_LENGTH_DIGITS = 20


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


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    http_version: bytes  # b"1.1", b"1.0", ...
    headers: Headers  # names lower-cased, in order
    length: int | None  # Content-Length, when there is one and no Transfer-Encoding
    chunked: bool
    close: bool  # the connection cannot be kept after this response


def parse_response_head(data: bytes | bytearray, max_size: int = MAX_HEAD
                        ) -> tuple[ResponseHead, int] | None:
    """The first response head in ``data`` and where it ends, or None while it is incomplete.
    Raises HeadError."""
    end = _HEAD_END.search(data)
    if end is None:
        if len(data) > max_size:
            raise HeadError(f"response head over {max_size} bytes")
        return None
    if end.start() > max_size:
        raise HeadError(f"response head over {max_size} bytes")
    lines = bytes(data[:end.start()]).split(b"\n")
    line = lines[0].removesuffix(b"\r")
    m = _STATUS_LINE.fullmatch(line)
    if m is None:
        raise HeadError("invalid status line")
    head = ResponseHead(int(m[2]), m[3] or b"", m[1], parse_fields(lines[1:]), None, False,
                        False)
    _framing(head)
    return head, end.end()


def parse_fields(lines: list[bytes]) -> Headers:
    """Header (or trailer) field lines, LF or CRLF stripped or not: (lower-cased name, value)."""
    folded: list[bytes] = []
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if line[:1] in (b" ", b"\t"):  # obsolete line folding: part of the previous line
            if not folded:
                raise HeadError("continuation line before any field")
            folded[-1] += b" " + line.lstrip(b" \t")
        else:
            folded.append(line)
    fields: Headers = []
    for line in folded:
        m = _FIELD.fullmatch(line)
        if m is None:
            raise HeadError("invalid header field")
        fields.append((m[1].lower(), m[2]))
    return fields


def _framing(head: ResponseHead) -> None:
    """Content-Length, Transfer-Encoding and keep-alive, as h11 reads them (and, like h11,
    one Content-Length field with its single value, Transfer-Encoding lower-cased)."""
    length: bytes | None = None
    close = head.http_version < b"1.1"
    fields: Headers = []
    for name, value in head.headers:
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
            if head.chunked:
                raise HeadError("multiple Transfer-Encoding headers")
            value = value.lower()
            if value != b"chunked":
                raise HeadError("only Transfer-Encoding: chunked is supported")
            head.chunked = True
        elif name == b"connection" and b"close" in [
                t.strip().lower() for t in value.split(b",")]:
            close = True
        fields.append((name, value))
    head.headers = fields
    head.close = close
    head.length = None if head.chunked or length is None else int(length)
