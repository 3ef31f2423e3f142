"""A streamed response body, relayed in the request's own task.

Each upstream read is handed to the client's ``send()`` at once. While that ``send()`` waits
for a slow client nothing is read, so backpressure reaches the upstream through TCP, and what
arrived meanwhile is taken in one read (and, when h11 already holds several chunks, in one
``send()``): coalescing without waiting in order to batch, and without a second task or a
channel per event. ``SendWatch`` tells the disconnect watcher when a ``send()`` started, so
a client that reads nothing for the write-stall timeout can be cut off (Hypercorn shields its
socket writes: a cancel scope around ``send()`` would not fire).
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
    """What the disconnect watcher needs to see of the body being relayed."""

    __slots__ = ("since", "upstream")

    def __init__(self) -> None:
        self.since: float | None = None  # trio time the current send() started
        self.upstream: UpstreamResponse | None = None  # closed early for a stalled client


async def stream_body(
    resp: UpstreamResponse, ex: Exchange, send: Send, watch: SendWatch, read_timeout: float,
    keepalive: float | None, stripper: UsageChunkStripper | None,
) -> bytes:
    """Relays the body until it ends; returns the bytes for the last message (what arrived
    together with the end). Raises UpstreamTimeout('read') or UpstreamError on a cut."""
    parser, tracker = ex.parser, ex.tracker
    tail = b"\n\n"
    # One cancel scope per stream whose deadline moves on with every chunk, lifted while the
    # client is being written to (a slow client is not an upstream timeout).
    with trio.CancelScope(deadline=trio.current_time() + read_timeout) as timeout:
        while True:
            if keepalive is None:
                chunk = await resp.receive_chunk(math.inf)
            else:
                with trio.move_on_after(keepalive) as idle:
                    chunk = await resp.receive_chunk(math.inf)
                if idle.cancelled_caught:
                    if tail.endswith(SSE_EVENT_ENDS):
                        await _send(send, watch, timeout, read_timeout, KEEPALIVE_COMMENT)
                    continue
            now = trio.current_time()
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
                await _send(send, watch, timeout, read_timeout, chunk)
    raise UpstreamTimeout("read", read_timeout)


async def _send(send: Send, watch: SendWatch, timeout: trio.CancelScope, read_timeout: float,
                data: bytes) -> None:
    timeout.deadline = math.inf
    watch.since = trio.current_time()
    await send({"type": "http.response.body", "body": data, "more_body": True})
    watch.since = None
    timeout.deadline = trio.current_time() + read_timeout
