"""A streamed response body: an upstream reader and a client writer over a bounded channel.

Both run in the request's nursery, beside the disconnect watcher (``http.py``):

- The **reader** task owns the upstream response. It reads, hands what it read to the usage
  parser and the latency tracker at arrival (so TTFT, ITL and the usage so far describe the
  provider, not how fast the client reads), removes the injected usage chunk, and puts the
  bytes into the channel without a checkpoint. Once the channel holds ``limit`` bytes it reads
  no more until the writer has made room: backpressure then reaches the upstream through TCP.
  What arrived together with the end of the body travels with the end, as one item.
- The **client writer** (the request's own task) takes everything waiting at each wake-up and
  gives it to one ``send()``: it coalesces what is already there and never waits in order to
  batch. The last bytes come back to the caller, to be sent once the watcher has stopped.

Bytes count against the bound until the ``send()`` that carries them returns, so a stream
never holds more than ``limit`` plus one read. ``SendWatch`` tells the watcher since when the
current upstream read and the current ``send()`` have waited: it ends a read that waited
``read_timeout`` and cuts off a client that read nothing for the write-stall timeout (Hypercorn
shields its socket writes: a cancel scope around ``send()`` would not fire).
"""

from __future__ import annotations

import logging
import math

import trio

from ..asgi import Message, Send
from ..errors import UpstreamError, UpstreamTimeout
from ..exchange import Exchange
from ..protocol.usage_wire import SSE_EVENT_ENDS, UsageChunkStripper
from ..upstream import UpstreamResponse

log = logging.getLogger("trioproxy.relay")

KEEPALIVE_COMMENT = b": keepalive\n\n"


class SendWatch:
    """What the disconnect watcher needs to see of the body being relayed: since when the
    current upstream read and the current ``send()`` to the client have waited. The watcher
    enforces both timeouts, so the relay moves no deadline per chunk: a read or a send that
    starts stores its time and, only when its timeout would fall due before the watcher next
    wakes, brings that wake-up forward (``nap``). An idle stream's watcher thus sleeps until
    a timeout could really be due, not every few seconds: at thousands of silent agent turns
    those wake-ups were most of a worker's idle CPU."""

    __slots__ = ("nap", "read_timeout", "reading_since", "reads", "since", "stall", "upstream")

    def __init__(self, read_timeout: float = math.inf, stall: float = math.inf) -> None:
        self.read_timeout, self.stall = read_timeout, stall
        self.since: float | None = None  # trio time the current send() started
        self.reading_since: float | None = None  # trio time the current upstream read started
        self.reads: trio.CancelScope | None = None  # cancelled by the watcher: a read timed out
        self.upstream: UpstreamResponse | None = None  # closed early for a stalled client
        self.nap: trio.CancelScope | None = None  # the watcher's current wait

    def send_started(self, now: float) -> None:
        self.since = now
        self._due(now + self.stall)

    def read_started(self, now: float) -> None:
        self.reading_since = now
        self._due(now + self.read_timeout)

    def _due(self, when: float) -> None:
        nap = self.nap
        if nap is not None and when < nap.deadline:
            nap.deadline = when

    def next_check(self) -> float:
        """When the watcher must look again: the earliest moment a timeout could be due
        (``inf`` while neither a read nor a send waits)."""
        wake = math.inf
        if self.since is not None:
            wake = self.since + self.stall
        if self.reading_since is not None:
            wake = min(wake, self.reading_since + self.read_timeout)
        return wake


Item = tuple[bytes, float, bool]  # (bytes, when they were read, whether the body ended there)


class BodyChannel:
    """A ``trio`` memory channel from reader to writer, bounded in bytes: the reader reads
    upstream only while fewer than ``limit`` bytes are held, so at most ``limit`` plus one
    read are; the writer gives them back once sent."""

    __slots__ = ("_room", "held", "limit", "receiver", "sender")

    def __init__(self, limit: int) -> None:
        self.sender, self.receiver = trio.open_memory_channel[Item](math.inf)
        self.limit = limit
        self.held = 0  # bytes put and not yet sent to the client
        self._room: trio.Event | None = None  # set when the writer frees room

    async def wait_room(self) -> None:
        """Returns once fewer than ``limit`` bytes are held (at once while there is room)."""
        while self.held >= self.limit:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def put(self, data: bytes, read_at: float, end: bool = False) -> None:
        """Queue ``data`` (no checkpoint; the reader waited for room before reading it)."""
        self.held += len(data)
        self.sender.send_nowait((data, read_at, end))

    def sent(self, size: int) -> None:
        """``size`` bytes reached the client's ``send()``: their room is free again."""
        self.held -= size
        room = self._room
        if room is not None and self.held < self.limit:
            self._room = None
            room.set()


async def read_body(resp: UpstreamResponse, ex: Exchange, channel: BodyChannel,
                    watch: SendWatch, stripper: UsageChunkStripper | None,
                    read_timeout: float) -> None:
    """The upstream reader task: owns ``resp`` (released when it returns or is cancelled)
    and closes the channel on the way out. Puts the end of the body as an item with
    ``end=True``; a cut or a read timeout closes the channel without it, the failure told to
    the exchange."""
    async with resp:
        with channel.sender:
            try:
                await _read(resp, ex, channel, watch, stripper, read_timeout)
            except UpstreamError as exc:
                ex.fail(exc.kind, exc.message)
                log.warning("upstream %s mid-stream: %s; cutting the client stream",
                            exc.kind, exc.message)
            finally:
                watch.reading_since = None


async def _read(resp: UpstreamResponse, ex: Exchange, channel: BodyChannel,
                watch: SendWatch, stripper: UsageChunkStripper | None,
                read_timeout: float) -> None:
    parser = ex.parser
    with trio.CancelScope() as reads:
        watch.reads = reads
        while True:
            if channel.held >= channel.limit:  # backpressure: read no more until there is room
                await channel.wait_room()
            watch.read_started(trio.current_time())
            chunk = await resp.receive_chunk(math.inf)
            if reads.cancel_called:  # timed out by the watcher as these bytes came in:
                break  # a timeout, before anything of them is counted or sent
            now = trio.current_time()
            watch.reading_since = None
            if chunk is not None:
                while (more := resp.receive_buffered()) is not None:
                    chunk += more
                ex.observe_chunk(len(chunk), now)
                if parser is not None:
                    parser.feed(chunk, now)
                if stripper is not None:
                    chunk = stripper.feed(chunk)
            if chunk is None or resp.complete:
                ex.body_ended(now)
                tail = (chunk or b"") + (stripper.flush() if stripper is not None else b"")
                channel.put(tail, now, end=True)
                return
            if chunk:
                channel.put(chunk, now)
    raise UpstreamTimeout("read", read_timeout)


async def write_body(ex: Exchange, channel: BodyChannel, send: Send, watch: SendWatch,
                     keepalive: float | None) -> bytes | None:
    """The client writer: sends everything waiting in one ``send()`` per wake-up. Returns the
    bytes that arrived with the end of the body (one read at most, for the last message), or
    None when the body was cut (the reader closed the channel without its end)."""
    receiver, tracker = channel.receiver, ex.tracker
    tail = b"\n\n"  # the last bytes sent: keep-alive comments only between events
    while True:
        try:
            taken = await _take(receiver, keepalive)
        except trio.EndOfChannel:
            return None
        if taken is None:  # the upstream was silent for ``keepalive`` seconds
            if tail.endswith(SSE_EVENT_ENDS):
                await watched_send(send, watch, more_body(KEEPALIVE_COMMENT))
            continue
        data, read_at, last = taken
        if tracker is not None:
            handed = trio.current_time()
            for at in read_at:
                tracker.on_relay(at, handed)
        if data:
            if keepalive is not None:
                tail = (tail + data[-4:])[-4:]
            # sent, watched, even when the end waits behind it: the last message goes out
            # after the watcher has stopped, so it must hold no more than the end's own read
            await watched_send(send, watch, more_body(data))
            size = len(data)
            del taken, data  # nothing of the sent bytes stays alive while the reader refills
            channel.sent(size)
        if last is not None:
            return last


async def _take(receiver: trio.MemoryReceiveChannel[Item],
                keepalive: float | None) -> tuple[bytes, list[float], bytes | None] | None:
    """Everything waiting (at least one item, up to the end): (the bytes before the end,
    joined; when each item was read; the end's own bytes, or None while the body goes on).
    None after ``keepalive`` seconds without any. Raises EndOfChannel once the reader closed
    the channel."""
    try:
        data, read_at, end = receiver.receive_nowait()
    except trio.WouldBlock:
        if keepalive is None:
            data, read_at, end = await receiver.receive()
        else:
            item: Item | None = None
            with trio.move_on_after(keepalive):
                item = await receiver.receive()
            if item is None:
                return None
            data, read_at, end = item
    if end:
        return b"", [read_at], data
    parts, times, last = [data], [read_at], None
    while True:
        try:
            data, read_at, end = receiver.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        times.append(read_at)
        if end:
            last = data
            break
        parts.append(data)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), times, last


async def watched_send(send: Send, watch: SendWatch, message: Message) -> None:
    """``send(message)`` with the watcher told when it started: the write-stall timeout cuts
    off a client that reads none of it."""
    watch.send_started(trio.current_time())
    await send(message)
    watch.since = None


def more_body(data: bytes) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": True}
