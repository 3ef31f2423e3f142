"""The streamed body's shape: an upstream reader and a client writer over a channel bounded in
bytes (``stream_buffer``). What a user notices: a slow client does not distort the provider's
latency figures, a client that stops reading costs bounded memory, and whichever side fails
first leaves one record and no task behind."""

from __future__ import annotations

import socket
import tracemalloc

import h11
import pytest
import trio

from trioproxy.extensions import Extension
from trioproxy.testing import FakeUpstream, Pause, Reply, anthropic_sse

from .client_requests import ANTHROPIC, MESSAGES_STREAM, body_bytes
from .conftest import RawClient, proxy_settings, start_proxy

KiB = 1024


async def _read_slowly(client: RawClient, size: int, every: float) -> tuple[bytes, bool]:
    """Reads at most ``size`` bytes every ``every`` seconds until the response ends."""
    body, conn = bytearray(), client.conn
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # the proxy cut the stream
            return bytes(body), False
        if event is h11.NEED_DATA:
            await trio.sleep(every)
            conn.receive_data(await client.stream.receive_some(size))
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body), True
        elif isinstance(event, h11.ConnectionClosed):
            return bytes(body), False


async def _small_window_client(port: int) -> RawClient:
    """A client whose receive buffer is small, so the kernel holds little for it."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)
    await sock.connect(("127.0.0.1", port))
    return RawClient(trio.SocketStream(sock))


@pytest.mark.parametrize("stream_buffer", [256 * KiB, 2048 * KiB])
async def test_a_slow_client_does_not_slow_the_providers_latency_figures(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
    stream_buffer: int,
) -> None:
    """The upstream sends 1 MiB in 8 KiB events every 5 ms; the client reads one event's worth
    every 200 ms. The record's arrival figures follow the upstream's pacing for the part that
    fits the bound (with a 2 MiB bound: all of it), and the client still gets every byte."""
    text = "x" * (8 * KiB)
    reply = anthropic_sse([text] * 128, gaps=[0.3, 0, 0, 0] + [0.005] * 130)
    upstream.enqueue(reply)
    proxy = await start_proxy(nursery, proxy_settings(upstream, stream_buffer=stream_buffer))
    client = await _small_window_client(proxy.port)
    try:
        with trio.fail_after(600):
            await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            head = await client.read_head()
            started = trio.current_time()
            body, complete = await _read_slowly(client, 8 * KiB, 0.2)
            client_took = trio.current_time() - started
            (ex,) = await proxy.wait_exchanges(1)
    finally:
        await client.aclose()
    assert head.status == 200 and complete and body == body_bytes(reply)  # every byte, in order
    latency = ex.latency()
    assert latency is not None and latency.content_events == 128
    assert client_took > 20  # the client really was slow: ~8 KiB per 200 ms
    assert 300 <= latency.ttft_ms < 310  # the first content event's arrival, not the client's
    fits = stream_buffer // (8 * KiB + 200)  # events that fit the bound (SSE framing included)
    assert ex.tracker is not None
    gaps = list(ex.tracker._gaps)  # each content event's arrival gap, as the tracker saw it
    assert len(gaps) == 127 and fits >= 30
    assert all(0.0049 < gap < 0.0051 for gap in gaps[:fits - 1])  # the upstream's 5 ms
    if fits >= 128:
        assert latency.duration_ms < 1500  # the upstream's end, not the client's (> 20 s)
    await proxy.stop()


def _relay_memory(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated by the proxy's own code (the relay, the upstream leg), not by Hypercorn
    or h11 framing the send in flight, nor by this test's fake upstream."""
    kept = snapshot.filter_traces([
        tracemalloc.Filter(True, "*/trioproxy/*", all_frames=True),
        tracemalloc.Filter(False, "*/hypercorn/*", all_frames=True),
        tracemalloc.Filter(False, "*/h11/*", all_frames=True),
        tracemalloc.Filter(False, "*/trioproxy/testing*", all_frames=True),
    ])
    return sum(stat.size for stat in kept.statistics("filename"))


async def test_a_client_that_stops_reading_holds_the_bound_one_read_and_one_unfinished_event(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """Measured with tracemalloc while the client reads nothing and the upstream has 16 MiB
    to send: the bound, one read, and the one unfinished event the usage parser holds; then
    the write-stall timeout cuts the stream, with one record."""
    bound, chunk = 128 * KiB, b"data: " + b"m" * (64 * KiB - 8) + b"\n\n"
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],
                           body=[chunk] * 256))
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, stream_buffer=bound, write_stall_timeout=30))
    client = await _small_window_client(proxy.port)
    tracemalloc.start(25)
    try:
        with trio.fail_after(600):
            baseline = _relay_memory(tracemalloc.take_snapshot())
            await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            await client.read_head()  # ...and then read nothing
            samples = []
            for _ in range(10):
                await trio.sleep(2)
                samples.append(_relay_memory(tracemalloc.take_snapshot()) - baseline)
            (ex,) = await proxy.wait_exchanges(1)
    finally:
        tracemalloc.stop()
        await client.aclose()  # a client that never reads pins Hypercorn's shielded send
    # The channel holds at most the bound plus one read (64 KiB); the usage parser's SSE framer
    # holds the one event it has not seen the end of (here up to 64 KiB, depending on how the
    # events split across reads); 32 KiB for the exchange and bookkeeping.
    assert 0 < max(samples) <= bound + 64 * KiB + len(chunk) + 32 * KiB
    assert ex.bytes_out < 4 * 1024 * KiB  # the upstream was held back, not read into memory
    assert ex.end_reason == "client_stalled" and len(proxy.exchanges) == 1
    await proxy.stop()


class _RelayTasks(trio.abc.Instrument):
    """Counts the live tasks the relay starts (the upstream reader, the client watcher)."""

    def __init__(self) -> None:
        self.live: set[trio.lowlevel.Task] = set()
        self.seen = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.rsplit(".", 1)[-1] in ("read_body", "_watch_client"):
            self.live.add(task)
            self.seen += 1

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.live.discard(task)


class _FailingStart(Extension):
    name = "failing-start"

    async def on_response_start(self, ctx, status, headers):
        raise RuntimeError("refused")


async def _cut_by_upstream(client: RawClient) -> None:
    resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.status == 200 and not resp.complete


async def _client_gone(client: RawClient) -> None:
    await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    resp = await client.read_head()
    await client.read_body(resp, max_chunks=1)
    await client.aclose()


async def _extension_refuses(client: RawClient) -> None:
    resp = await client.request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
    assert resp.status == 500


@pytest.mark.parametrize(("case", "reply", "end_reason"), [
    (_cut_by_upstream, anthropic_sse(["a", "b", "c"], abort_after=4), "upstream_error"),
    (_client_gone, anthropic_sse(["a", "b", "c"], gaps=[0, 0, 0, 0, 30]), "client_disconnect"),
    (_extension_refuses, anthropic_sse(["a", "b"]), "extension_error"),
])
async def test_whichever_side_fails_first_leaves_one_record_and_no_task(
    nursery: trio.Nursery, upstream: FakeUpstream, case, reply: Reply, end_reason: str,
) -> None:
    tasks = _RelayTasks()
    trio.lowlevel.add_instrument(tasks)
    try:
        extensions = [_FailingStart()] if case is _extension_refuses else []
        proxy = await start_proxy(nursery, proxy_settings(upstream, extensions_fail_closed=True),
                                  extensions=extensions)
        upstream.enqueue(reply)
        client = await RawClient.connect(proxy.port)
        with trio.fail_after(30):
            await case(client)
            (ex,) = await proxy.wait_exchanges(1)
            while tasks.live:  # the reader and the watcher end with their exchange
                await trio.sleep(0.01)
        assert ex.end_reason == end_reason and len(proxy.exchanges) == 1
        assert tasks.seen >= 1 and not tasks.live
        assert upstream.connections[0].close_reason is not None  # nothing left holding it
    finally:
        trio.lowlevel.remove_instrument(tasks)
    await client.aclose()
    await proxy.stop()


async def test_a_read_timeout_while_the_client_is_slow_still_counts_from_the_last_byte(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """The reader keeps reading while the writer waits on the client, so an upstream silence
    is measured from the upstream's last byte, whatever the client does meanwhile."""
    chunk = b"data: " + b"s" * (64 * KiB) + b"\n\n"  # 512 KiB: more than the sockets hold,
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")],  # less than the bound
                           body=[chunk] * 8 + [Pause(900), b"data: late\n\n"]))
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, write_stall_timeout=1200, stream_buffer=1024 * KiB))
    client = await _small_window_client(proxy.port)
    try:
        with trio.fail_after(3000):
            await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            await client.read_head()
            body, complete = await _read_slowly(client, 4 * KiB, 1)  # a few KiB/s
            (ex,) = await proxy.wait_exchanges(1)
    finally:
        await client.aclose()  # a client that never reads pins Hypercorn's shielded send
    assert not complete and b"late" not in body
    assert ex.end_reason == "timeout" and "read timeout" in ex.error
    assert 600 <= ex.finalised_at - ex.last_chunk_at < 600.1  # read at once, though sent slowly
    assert body == (b"data: " + b"s" * (64 * KiB) + b"\n\n") * 8  # all it read, then the cut
    await proxy.stop()


async def test_a_client_that_stops_reading_just_before_the_end_is_still_cut_off(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """The whole body and its end wait in the channel; the client reads the first event, then
    nothing: what waited before the end still goes through watched sends, so the write-stall
    timeout cuts the stream (one record) instead of the last message waiting for ever."""
    chunk = b"data: " + b"e" * (64 * KiB) + b"\n\n"
    upstream.enqueue(Reply(headers=[("content-type", "text/event-stream")], body=[chunk] * 128))
    proxy = await start_proxy(nursery, proxy_settings(  # 8 MiB: more than the sockets hold
        upstream, stream_buffer=16 * 1024 * KiB, write_stall_timeout=1))
    client = await _small_window_client(proxy.port)
    try:
        with trio.fail_after(30):  # real time: megabytes of real I/O
            await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            await client.read_head()
            await trio.sleep(0.5)  # the reader queues the whole body and its end meanwhile
            got = 0
            while got < 128 * KiB:  # the first send completes; then the client reads nothing
                got += len(await client.stream.receive_some(64 * KiB))
            (ex,) = await proxy.wait_exchanges(1)
    finally:
        await client.aclose()
    assert ex.end_reason == "client_stalled" and len(proxy.exchanges) == 1
    await proxy.stop()


async def test_a_client_that_stops_reading_a_large_unframed_answer_is_cut_off(
    nursery: trio.Nursery, upstream: FakeUpstream,
) -> None:
    """A non-streamed answer without a length outgrows the buffer limit (16 MiB) and is
    streamed: its first 16 MiB go out in one send, which the write-stall timeout watches too."""
    part = b" " * (1024 * KiB)
    upstream.enqueue(Reply(headers=[("content-type", "application/json")],
                           body=[b"{"] + [part] * 20 + [b"}"]))
    proxy = await start_proxy(nursery, proxy_settings(upstream, write_stall_timeout=1))
    client = await _small_window_client(proxy.port)
    try:
        with trio.fail_after(30):  # real time: megabytes of real I/O
            await client.send_request("POST", "/v1/messages", ANTHROPIC, MESSAGES_STREAM)
            await client.read_head()  # ...and then read nothing
            (ex,) = await proxy.wait_exchanges(1)
    finally:
        await client.aclose()
    assert ex.end_reason == "client_stalled" and len(proxy.exchanges) == 1
    await proxy.stop()
