"""Response bodies off an upstream connection: chunked or Content-Length framing. No I/O.

h11 parses the response head; the body is decoded here, because this is the relay's per-chunk
hot path and h11 spends several Python calls and a state-machine step on every chunk (see
``bench/results/FLOOR_ANALYSIS.md``). A decoder takes whatever bytes one read returned and
hands out every body byte they complete at once, partial chunks included: nothing waits for a
chunk's end.

Strict where a mismatch would mean relaying or reusing the wrong bytes: chunk sizes are 1-16 hex
digits (extensions after ``;`` ignored), every chunk's data ends in CRLF, a chunk-size line or
the trailer section may not grow past ``max_line`` bytes, trailer fields are ``token: value``
lines. Bytes after the end of the body (an upstream that sent more than it framed) make the
connection unfit for reuse (``extra``).
"""

from __future__ import annotations

import re

Headers = list[tuple[bytes, bytes]]

_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
MAX_LINE = 256 * 1024  # as h11's max_incomplete_event_size on upstream connections

_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class BodyError(ValueError):
    """The body's framing is broken: the message says how (never quoting body bytes)."""


class BodyDecoder:
    """Feed the bytes read, take the body bytes they complete. ``done`` once the body ended;
    then ``trailers`` holds a chunked body's trailer fields (names lower-cased) and ``extra``
    says whether bytes followed the body. ``error`` once the framing broke: the bytes decoded
    before the break can still be taken (as h11 would have given them), nothing after."""

    __slots__ = ("_buf", "_chunked", "_left", "_max", "_out", "_state", "_trailer_size", "done",
                 "error", "extra", "trailers")

    def __init__(self, *, length: int | None, max_line: int = MAX_LINE) -> None:
        """``length``: the Content-Length, or None for a chunked body."""
        self._buf = b""  # an incomplete size line, CRLF or trailer line
        self._out: list[bytes] = []
        self._max = max_line
        self._trailer_size = 0
        self.trailers: Headers = []
        self.extra = False
        self.error: BodyError | None = None
        if length is None:
            self._state, self._left = _SIZE, 0
        else:
            self._state, self._left = (_DATA, length) if length else (_DONE, 0)
        self.done = self._state == _DONE
        self._chunked = length is None

    def feed(self, data: bytes) -> None:
        """Decode ``data`` (the next bytes of the connection); a broken framing sets ``error``
        (and every later call does nothing)."""
        if self.error is not None:
            return
        if self._buf:
            data, self._buf = self._buf + data, b""
        try:
            pos = self._run(data)
        except BodyError as exc:
            self.error = exc
            return
        if pos < len(data):
            if self._state == _DONE:
                self.extra = True
            else:
                self._buf = data[pos:]

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
        pos, size = 0, len(data)
        while pos < size:
            state = self._state
            if state == _DATA:
                n = min(self._left, size - pos)
                self._out.append(data if n == size else data[pos:pos + n])
                pos += n
                self._left -= n
                if not self._left:
                    self._state = _CRLF if self._chunked else _DONE
                    self.done = not self._chunked
            elif state == _CRLF:
                if size - pos < 2:
                    return pos
                if data[pos:pos + 2] != b"\r\n":
                    raise BodyError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            elif state == _DONE:
                return pos
            else:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._check_pending(size - pos)
                    return pos
                self._line(data[pos:end], state)
                pos = end + 2
        return pos

    def _line(self, line: bytes, state: int) -> None:
        if state == _SIZE:
            token = line.partition(b";")[0].rstrip(b" \t")
            if _HEX.fullmatch(token) is None:
                raise BodyError("invalid chunk size line")
            self._left = int(token, 16)
            self._state = _DATA if self._left else _TRAILER
            return
        if not line:
            self._state, self.done = _DONE, True
            return
        self._trailer_size += len(line) + 2
        self._check_pending(0)
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or _TOKEN.fullmatch(name) is None or _VALUE.fullmatch(value) is None:
            raise BodyError("invalid trailer field")
        self.trailers.append((name.lower(), value))

    def _check_pending(self, pending: int) -> None:
        if pending + self._trailer_size > self._max:
            raise BodyError(f"chunk size line or trailers over {self._max} bytes")
