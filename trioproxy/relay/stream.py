"""A streamed response body, relayed in the request's own task.

Each upstream read is handed to the client's ``send()`` at once. While that ``send()`` waits
for a slow client nothing is read, so backpressure reaches the upstream through TCP, and what
arrived meanwhile is taken in one read (and, when the body decoder already holds several
chunks, in one ``send()``): coalescing without waiting in order to batch, and without a second
task or a channel per event. ``SendWatch`` tells the disconnect watcher when the current upstream read
and the current ``send()`` started: the watcher ends a read that waited ``read_timeout`` and
cuts off a client that read nothing for the write-stall timeout (Hypercorn shields its socket
writes: a cancel scope around ``send()`` would not fire).
"""

from __future__ import annotations

import math

import trio

from ..errors import UpstreamTimeout
from ..exchange import Exchange
from ..protocol.usage_wire import SSE_EVENT_ENDS, UsageChunkStripper
from ..upstream import UpstreamResponse
from .responses import Send

KEEPALIVE_COMMENT = b": keepalive\n\n"


class SendWatch:
    """What the disconnect watcher needs to see of the body being relayed: since when the
    current upstream read and the current ``send()`` to the client have waited. The watcher
    enforces both timeouts, so the relay moves no deadline per chunk (two float stores instead
    of two cancel-scope deadline changes)."""

    __slots__ = ("reading_since", "reads", "since", "upstream")

    def __init__(self) -> None:
        self.since: float | None = None  # trio time the current send() started
        self.reading_since: float | None = None  # trio time the current upstream read started
        self.reads: trio.CancelScope | None = None  # cancelled by the watcher: a read timed out
        self.upstream: UpstreamResponse | None = None  # closed early for a stalled client

    def next_check(self, now: float, read_timeout: float, stall: float) -> float:
        """When the watcher must look again: the earliest moment a timeout could be due, and
        at least every quarter of the shorter timeout (a read or send may start meanwhile)."""
        wake = now + min(read_timeout, stall) / 4
        if self.since is not None:  # a read that falls due meanwhile is the relay's to end
            return min(wake, self.since + stall)
        if self.reading_since is not None:
            wake = min(wake, self.reading_since + read_timeout)
        return wake


async def stream_body(
    resp: UpstreamResponse, ex: Exchange, send: Send, watch: SendWatch, read_timeout: float,
    keepalive: float | None, stripper: UsageChunkStripper | None,
) -> bytes:
    """Relays the body until it ends; returns the bytes for the last message (what arrived
    together with the end). Raises UpstreamTimeout('read') or UpstreamError on a cut.

    ``read_timeout`` bounds each wait for upstream bytes; the watcher enforces it through
    ``watch.reads`` (a wait for the client's ``send()`` is never an upstream timeout)."""
    parser, tracker = ex.parser, ex.tracker
    tail = b"\n\n"
    read_started: float | None = None
    with trio.CancelScope() as reads:
        watch.reads = reads
        while True:
            if read_started is None:  # a keep-alive comment does not restart the wait
                read_started = watch.reading_since = trio.current_time()
            if keepalive is None:
                chunk = await resp.receive_chunk(math.inf)
            else:
                with trio.move_on_after(keepalive) as idle:
                    chunk = await resp.receive_chunk(math.inf)
                if idle.cancelled_caught:
                    if tail.endswith(SSE_EVENT_ENDS):
                        await _send(send, watch, KEEPALIVE_COMMENT)
                        if trio.current_time() - read_started >= read_timeout:
                            break  # due while the comment was sent (the watcher let it be)
                    continue
            if reads.cancel_called:  # timed out by the watcher as these bytes came in:
                break  # a timeout, before anything of them is counted or sent
            now = trio.current_time()
            read_started = watch.reading_since = None
            if chunk is not None:
                while (more := resp.receive_buffered()) is not None:
                    chunk += more
            if chunk is None or resp.complete:
                ex.body_ended(now)
            if not chunk:
                return stripper.flush() if stripper is not None else b""
            ex.observe_chunk(len(chunk), now)
            if parser is not None:
                parser.feed(chunk, now)
            if stripper is not None:
                chunk = stripper.feed(chunk) + (stripper.flush() if resp.complete else b"")
            if tracker is not None:
                tracker.on_relay(now, trio.current_time())
            if resp.complete:
                return chunk  # goes out with the last message: one send() fewer
            if chunk:
                if keepalive is not None:
                    tail = (tail + chunk[-4:])[-4:]
                await _send(send, watch, chunk)
    watch.reading_since = None
    raise UpstreamTimeout("read", read_timeout)


async def _send(send: Send, watch: SendWatch, data: bytes) -> None:
    watch.since = trio.current_time()
    await send({"type": "http.response.body", "body": data, "more_body": True})
    watch.since = None
