"""Incremental Server-Sent Events framer: bytes in, events out, no I/O.

Follows the WHATWG event-stream rules: LF, CRLF and CR line endings (a CRLF split across two
chunks is one line end), ``:`` comments, fields without a colon, one optional space after the
colon, a leading BOM, ``id`` that persists across events, events without ``data`` not dispatched.
Data stays bytes (multi-byte UTF-8 may be split anywhere); only the ``event`` and ``id`` field
values are decoded. Buffering is linear: each byte is searched once and the consumed prefix is
deleted once per :meth:`SSEFramer.feed` call.

Every event also says where its block lies in the stream (``start``/``end`` byte offsets, from
just past the previous blank line to just past its own), so a caller that forwards the raw bytes
can cut one event out exactly (see ``usage_wire.UsageChunkStripper``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MAX_EVENT_SIZE", "SSEEvent", "SSEFramer", "SSEOverflow"]

MAX_EVENT_SIZE = 64 * 1024 * 1024  # pending line + pending data, per event
_EOL = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"
_CR, _LF, _COLON = 0x0D, 0x0A, 0x3A


class SSEOverflow(ValueError):
    """One event (its pending line plus its data so far) grew past the framer's limit."""


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event. ``event`` None means the default type ("message")."""

    event: str | None = None
    data: bytes = b""  # the data lines joined by b"\n"
    id: str | None = None  # the last event id seen so far in the stream (it persists)
    # The event's block in the stream: [start, end) runs from just past the previous blank line
    # (its comments and fields included) to just past its own blank line. When that blank line
    # ends in a CR at the end of the bytes fed so far, an LF that comes next belongs to it too.
    start: int = field(default=0, compare=False, repr=False)
    end: int = field(default=0, compare=False, repr=False)

    def text(self) -> str:
        """The data as text (invalid UTF-8 replaced)."""
        return self.data.decode("utf-8", "replace")


class SSEFramer:
    """Feed bytes, get whole events.

    An event (its pending line plus its data so far) larger than ``max_event_size`` makes
    ``feed`` raise :class:`SSEOverflow` (``on_overflow="raise"``, nothing else is raised), or
    is skipped (``"skip"``): it is not dispatched, the framer keeps at most ``max_event_size``
    bytes of it and goes on with the next event.
    """

    __slots__ = (
        "_any_cr",
        "_base",
        "_bom",
        "_buf",
        "_cr",
        "_data",
        "_data_size",
        "_event",
        "_last_id",
        "_mark",
        "_max",
        "_pending",
        "_scan",
        "_skip",
        "_skipping",
    )

    def __init__(
        self, *, max_event_size: int = MAX_EVENT_SIZE,
        on_overflow: Literal["raise", "skip"] = "raise",
    ) -> None:
        self._max = max_event_size
        self._skip = on_overflow == "skip"
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()  # the current partial line only (between feed calls)
        self._scan = 0  # _buf[:_scan] is known to hold no line end
        self._any_cr = False  # a CR was seen: line ends need the slower CR/LF search
        self._cr = False  # the last line ended in CR: an LF first in the next chunk belongs to it
        self._bom = True  # a leading BOM may still have to be stripped
        self._event: str | None = None
        self._data: list[bytes] = []
        self._data_size = 0
        self._last_id: str | None = None
        self._pending = False  # a field line was seen since the last blank line
        self._base = 0  # stream offset of _buf[0]
        self._mark = 0  # stream offset just past the last blank line: the pending block's start
        self._skipping = False  # the pending event outgrew the limit: it will not be dispatched

    @property
    def block_start(self) -> int:
        """Stream offset where the pending block starts: every byte before it belongs to
        complete events (or comments and blank lines between them)."""
        return self._mark

    @property
    def skipping(self) -> bool:
        """True while the pending event is being skipped for its size (``on_overflow="skip"``)."""
        return self._skipping

    @property
    def at_boundary(self) -> bool:
        """True when the bytes so far end exactly between events (or nothing was fed).

        Then a comment block such as ``b": keepalive\\n\\n"`` can be spliced into the stream
        without changing any event: no partial line is buffered and no field line is pending.
        """
        return not self._pending and not self._buf

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume ``data`` and return the events it completed (possibly none)."""
        events: list[SSEEvent] = []
        if not data:
            return events
        buf = self._buf
        base = self._base
        if buf:
            buf += data
            text: bytes | bytearray = buf
        else:
            text = data  # no partial line: scan the chunk itself, keep only its tail
        if not self._any_cr and b"\r" in data:
            self._any_cr = True
        pos = 0
        if self._bom:
            if len(text) < 3 and _BOM.startswith(text):
                if text is data:
                    buf += data
                return events  # could still be a BOM: wait for more
            self._bom = False
            if text.startswith(_BOM):
                pos = self._mark = 3
        if self._cr:
            self._cr = False
            if text[pos] == _LF:  # the second half of a CRLF split across chunks
                pos += 1
                if self._mark == base:  # it ends the blank line the CR began
                    self._mark += 1
        pos = self._lines(text, pos, max(self._scan, pos), events)
        if text is buf:
            del buf[:pos]
        elif pos < len(data):
            buf += memoryview(data)[pos:]
        self._base = base + pos
        self._scan = len(buf)
        if len(buf) + self._data_size > self._max:
            self._overflow()
        return events

    def skip_whole_blocks(self, data: bytes) -> bool:
        """Account for ``data`` without framing it, when that is safe: the framer is between
        events (nothing buffered or pending, no split CRLF, no BOM decision left) and ``data``
        ends with a blank line. Returns False, having done nothing, otherwise.

        For callers that need only where events end, not the events: offsets and
        :attr:`block_start` move past ``data``; its events are not dispatched and its ``id``
        fields are not seen. (After a line end, an LF always ends an empty line.)
        """
        if (self._buf or self._pending or self._cr or self._bom or self._skipping
                or not data.endswith(b"\n\n")):
            return False
        self._base += len(data)
        self._mark = self._base
        return True

    def _overflow(self) -> None:
        if not self._skip:
            raise SSEOverflow(f"SSE event larger than {self._max} bytes")
        self.skip_event()

    def skip_event(self) -> None:
        """Skip the pending event: it will not be dispatched, and at most one byte of it is
        kept (the framer still finds its end, so :attr:`block_start` moves on as usual)."""
        self._skipping = True
        self._data = []
        self._data_size = 0
        buf = self._buf
        if len(buf) > 1:  # keep one byte: the partial line stays a non-empty, unknown field
            self._base += len(buf) - 1
            del buf[:-1]
            self._scan = 1

    def close(self, *, flush: bool = False) -> list[SSEEvent]:
        """End of stream. Per the spec an unterminated event is discarded (returns []).

        With ``flush=True`` a final unterminated line is taken as a line and the pending event
        is dispatched: useful to read what a cut stream carried. The framer is reset either way.
        """
        events: list[SSEEvent] = []
        if flush:
            if self._buf:
                self._line(bytes(self._buf))
            self._dispatch(events, self._base + len(self._buf))
        self._reset()
        return events

    def _lines(
        self, buf: bytes | bytearray, pos: int, scan: int, events: list[SSEEvent]
    ) -> int:
        """Process every complete line in ``buf[pos:]``; returns the start of the partial one."""
        size = len(buf)
        search = _EOL.search if self._any_cr else None  # LF-only streams: plain find
        while True:
            if search is None:
                end = buf.find(b"\n", scan)
            else:
                m = search(buf, scan)
                end = -1 if m is None else m.start()
            if end < 0:
                return pos
            blank = end == pos
            if blank:
                pass  # dispatched below, once the end of its line end is known
            elif buf.startswith(b"data: ", pos, end):  # the common cases: one copy, no split
                value = bytes(buf[pos + 6 : end])
                self._data.append(value)
                self._data_size += len(value) + 1
                self._pending = True
            elif buf.startswith(b"event: ", pos, end):
                self._event = buf[pos + 7 : end].decode("utf-8", "replace") or None
                self._pending = True
            else:
                self._line(bytes(buf[pos:end]))
            pos = end + 1
            if search is not None and buf[end] == _CR:
                if pos == size:
                    self._cr = True
                elif buf[pos] == _LF:
                    pos += 1
            if blank:
                self._dispatch(events, self._base + pos)
            scan = pos

    def _line(self, line: bytes) -> None:
        """Interpret one non-empty line (without its line end)."""
        if line[0] == _COLON:
            return  # comment
        self._pending = True
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif name == b"event":
            self._event = value.decode("utf-8", "replace") or None
        elif name == b"id" and b"\0" not in value:
            self._last_id = value.decode("utf-8", "replace")
        # "retry" and unknown fields are ignored

    def _dispatch(self, events: list[SSEEvent], end: int) -> None:
        """A blank line ending at stream offset ``end``: emit the pending event if it has data
        (and was not skipped), then reset the event buffers."""
        if self._data:
            if not self._skipping:
                events.append(SSEEvent(
                    self._event, b"\n".join(self._data), self._last_id, self._mark, end))
            self._data = []
            self._data_size = 0
        self._event = None
        self._pending = False
        self._skipping = False
        self._mark = end
