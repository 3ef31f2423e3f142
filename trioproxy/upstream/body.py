"""Response bodies off an upstream connection: chunked, Content-Length or until close. No I/O.

``http11`` parses the response head; the body is decoded here, because this is the relay's
per-chunk hot path, where h11 spent several Python calls and a state-machine step on every chunk
(5.2 µs against 1.4 µs here, ``bench/results/FLOOR_ANALYSIS.md``). A decoder takes whatever
bytes one read returned and hands out every body byte they complete at once, partial chunks
included: nothing waits for a chunk's end.

The rules are h11's (``tests/test_body_decoder.py`` checks against h11 on the same inputs):
chunk sizes are 1-20 hex digits (extensions after ``;`` ignored, whitespace only at the end of
the line), every chunk's data ends in CRLF, trailer lines end in LF or CRLF and are parsed as
header fields (``http11.parse_fields``); a chunk-size line or the trailer section may not grow
past ``max_line`` bytes. Bytes after the end of the body (an upstream that sent more than it
framed) make the connection unfit for reuse (``extra``). A body read until the connection
closes (``length="close"``) ends at ``eof()``.
"""

from __future__ import annotations

import re
from typing import Literal

from ..protocol.headers import Headers
from .http11 import MAX_HEAD, HeadError, checked_fields, parse_fields

_HEX = re.compile(rb"[0-9A-Fa-f]{1,20}")
MAX_LINE = MAX_HEAD  # a chunk-size line or trailer section, bounded like a head

_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class BodyError(ValueError):
    """The body's framing is broken: the message says how (never quoting body bytes)."""


class BodyDecoder:
    """Feed the bytes read, take the body bytes they complete. ``done`` once the body ended;
    then ``trailers`` holds a chunked body's trailer fields (names lower-cased) and ``extra``
    says whether bytes followed the body. ``error`` once the framing broke: the bytes decoded
    before the break can still be taken (as h11 would have given them), nothing after."""

    __slots__ = ("_buf", "_chunked", "_left", "_lines", "_max", "_out", "_pending", "_scan",
                 "_state", "done", "error", "extra", "trailers")

    def __init__(self, *, length: int | Literal["chunked", "close"],
                 max_line: int = MAX_LINE) -> None:
        """``length``: the Content-Length, ``"chunked"``, or ``"close"`` (until EOF)."""
        self._buf = bytearray()  # an incomplete size line, CRLF or trailer line
        self._scan = 0  # _buf[:_scan] holds no line end: a dripped line is searched once
        self._out: list[bytes] = []
        self._max = max_line
        self._lines: list[bytes] = []  # trailer lines so far
        self._pending = 0  # bytes of the trailer section so far
        self.trailers: Headers = []
        self.extra = False
        self.error: BodyError | None = None
        self._chunked = length == "chunked"
        if self._chunked:
            self._state, self._left = _SIZE, 0
        elif length == "close":
            self._state, self._left = _DATA, -1  # never runs out
        else:
            self._state, self._left = (_DATA, length) if length else (_DONE, 0)
        self.done = self._state == _DONE

    @property
    def until_close(self) -> bool:
        """The body ends when the connection closes (no framing): never reusable."""
        return self._left < 0 and not self._chunked

    def feed(self, data: bytes) -> None:
        """Decode ``data`` (the next bytes of the connection); a broken framing sets ``error``
        (and every later call does nothing)."""
        if self.error is not None:
            return
        buf = self._buf
        if buf:  # the rest of a line: append (amortised), search only the new bytes
            buf += data
            data = buf  # type: ignore[assignment]
        try:
            pos = self._run(data)
        except BodyError as exc:
            self.error = exc
            return
        if pos < len(data):
            if self._state == _DONE:
                self.extra = True
            elif data is buf:
                del buf[:pos]
            else:
                self._buf = bytearray(data[pos:])
            self._scan = max(0, len(self._buf) - 1)  # a CR may wait for its LF
        elif data is buf:  # the line it held is complete
            buf.clear()

    def eof(self) -> None:
        """The connection closed: the end of a body read until close, else an error."""
        if self._left < 0:
            self._state, self.done = _DONE, True
        elif not self.done and self.error is None:
            self.error = BodyError(
                "peer closed connection without sending complete message body")

    def take(self) -> bytes:
        """The body bytes decoded so far and not taken yet (b"" if none)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def _run(self, data: bytes) -> int:
        """Decode from the start of ``data``; returns where the undecoded rest begins."""
        pos, size, scan = 0, len(data), self._scan  # scan: where a dripped line's search resumes
        self._scan = 0  # used once: feed() sets it again for a line still incomplete
        while pos < size:
            state = self._state
            if state == _DATA:
                left = self._left
                n = size - pos if left < 0 else min(left, size - pos)
                self._out.append(data if n == size and type(data) is bytes
                                 else bytes(data[pos:pos + n]))
                pos += n
                if left > 0:
                    self._left = left = left - n
                    if not left:
                        self._state = _CRLF if self._chunked else _DONE
                        self.done = not self._chunked
            elif state == _CRLF:
                if size - pos < 2:
                    return pos
                if data[pos:pos + 2] != b"\r\n":
                    raise BodyError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _SIZE:
                end = data.find(b"\r\n", scan if scan > pos else pos)  # noqa: FURB136 - per chunk
                scan = 0
                if end < 0:
                    self._check(size - pos)
                    return pos
                self._size_line(bytes(data[pos:end]))
                pos = end + 2
            elif state == _TRAILER:
                end = data.find(b"\n", scan if scan > pos else pos)  # noqa: FURB136 - per chunk
                scan = 0
                if end < 0:
                    self._check(self._pending + size - pos)
                    return pos
                self._trailer_line(bytes(data[pos:end]), end + 1 - pos)
                pos = end + 1
            else:
                return pos
        return pos

    def _size_line(self, line: bytes) -> None:
        token = line.rstrip(b" \t").partition(b";")[0]
        if _HEX.fullmatch(token) is None or b"\n" in line:  # no bare LF, even in an extension
            raise BodyError("invalid chunk size line")
        self._left = int(token, 16)
        self._state = _DATA if self._left else _TRAILER

    def _trailer_line(self, line: bytes, size: int) -> None:
        """One trailer line with its LF (a CR before it is the field parser's to remove)."""
        if line not in (b"", b"\r"):
            self._pending += size
            self._check(self._pending)
            self._lines.append(line)
            return
        try:  # validated like header fields, framing fields included (as h11 does)
            self.trailers = checked_fields(parse_fields(self._lines))[0]
        except HeadError as exc:
            raise BodyError(f"invalid trailer: {exc}") from None
        self._state, self.done = _DONE, True

    def _check(self, pending: int) -> None:
        if pending > self._max:
            raise BodyError(f"chunk size line or trailers over {self._max} bytes")
