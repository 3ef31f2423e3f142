"""The HTTP relay, the trio driver of one exchange's lifecycle.

One nursery per request: the request's own task sends the request upstream and writes the
response to the client; a second task watches the client; for a streamed body a third, the
upstream reader, joins them.

- A streamed body (``stream.py``): the reader reads, parses and times what the upstream sends
  and puts it into a memory channel bounded by ``stream_buffer`` bytes; the request's task, the
  client writer, gives everything waiting to one ``send()`` (never waiting in order to batch).
  A slow client fills the channel, then the reader waits and backpressure reaches the upstream
  through TCP; one that reads nothing for ``write_stall_timeout`` is cut off by the watcher as
  ``client_stalled``, its upstream connection closed and its record written.
- A non-streaming accounted body is read whole (usage headers need the end), in the same task.
- ``http.disconnect`` cancels the nursery (reader and writer with it): the upstream read stops
  and its connection is closed.
- The response's last message is sent only after the watcher has stopped, so a disconnect
  reported while it is being sent can never cancel it half-way (that left Hypercorn's
  connection open for ever).
- An upstream failure mid-stream ends the response without its last message (a truncated body,
  which the client can detect) -- or, when the client asked for HTTP/2 trailers, with trailers
  saying ``x-usage-complete: false``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..asgi import (
    Message,
    Receive,
    Send,
    error_messages,
    proxy_headers,
)
from ..config.settings import Settings
from ..errors import (
    ExtensionRejected,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..exchange import Exchange
from ..extensions import ExtensionFailed, ExtensionManager, MutableHeaders
from ..protocol import headers as hdr
from ..protocol.lifecycle import End
from ..protocol.usage_wire import (
    TRAILER_ANNOUNCE,
    UsageChunkStripper,
    as_headers,
    server_timing_value,
    timing_values,
    usage_values,
)
from ..providers import make_parser
from ..upstream import UpstreamPool, UpstreamRequest, UpstreamResponse
from .stream import BodyChannel, SendWatch, more_body, read_body, watched_send, write_body

log = logging.getLogger("trioproxy.relay")

Item = tuple[bytes, float | None]  # a body chunk, and when it was read from upstream

BUFFER_LIMIT = 16 * 1024 * 1024  # non-streaming bodies above this stream without usage headers


@dataclass(slots=True)
class ResponsePlan:
    """How one response is relayed, decided from its head."""

    buffer: bool = False  # read whole, answer with x-usage-* headers
    trailers: bool = False  # HTTP/2 + TE: trailers: usage as trailers
    stripper: UsageChunkStripper | None = None  # remove the injected usage chunk
    keepalive: float | None = None
    last: list[Message] = field(default_factory=list)  # sent once the watcher has stopped


def is_event_stream(content_type: bytes | None) -> bool:
    """``text/event-stream``, in any case, with or without parameters."""
    return bool(content_type) and (
        content_type.split(b";", 1)[0].strip().lower() == b"text/event-stream")


class HttpRelay:
    """Relays one HTTP request that :mod:`trioproxy.intake` took in.

    ``finalise`` (``Runtime.finalise``, idempotent): the relay calls it early only for a stalled
    client, whose handler Hypercorn may hold long after the exchange is over."""

    def __init__(self, settings: Settings, pool: UpstreamPool,
                 extensions: ExtensionManager | None,
                 finalise: Callable[[Exchange], Awaitable[None]]) -> None:
        self._settings = settings
        self._pool = pool
        self._extensions = extensions
        self._finalise = finalise

    async def relay(
        self, ex: Exchange, request: UpstreamRequest, receive: Receive, send: Send
    ) -> None:
        """Send the request upstream and relay the response to the client."""
        last: list[Message] = []
        tracker = ex.track_latency()
        watch = SendWatch(self._settings.read_timeout, self._settings.write_stall_timeout)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, receive, ex, nursery.cancel_scope, watch)
            ex.life.sent_upstream()
            try:
                resp = await self._pool.send_request(
                    request.base, ex.method.encode(), request.target, request.headers, request.body)
            except ProxyError as exc:  # connect / timeout / protocol, or a header http11 refuses
                log.warning("%s before response: %s", exc.kind, exc.message)
                last = error_messages(ex, exc)
            else:
                if resp.sent_at is not None:
                    tracker.request_sent(resp.sent_at)
                watch.upstream = resp
                last = await self._respond(resp, ex, send, watch, nursery)
            nursery.cancel_scope.cancel()  # stop the watcher before the last message
        if ex.life.failure is End.CLIENT_DISCONNECT or not last:
            return
        for message in last:
            await send(message)
        ex.life.delivered()

    async def _respond(self, resp: UpstreamResponse, ex: Exchange, send: Send,
                       watch: SendWatch, nursery: trio.Nursery) -> list[Message]:
        """Relays everything but the last message(s), which it returns."""
        try:
            plan = self._on_response_head(resp, ex)
        except BaseException:
            await resp.aclose()  # nothing else owns it yet
            raise
        prefix: list[Item] | None = None
        if plan.buffer:
            prefix, ended = await self._read_buffered(resp, ex)
            if ended:
                await self._answer_buffered(resp, prefix, ex, plan)
                return plan.last
            log.info("response body over %d bytes: streamed without usage headers", BUFFER_LIMIT)
            ex.life.overflow()
        await self._stream(resp, ex, plan, send, watch, prefix, nursery)
        return plan.last

    async def _read_buffered(self, resp: UpstreamResponse, ex: Exchange) -> tuple[list[Item], bool]:
        """Reads a non-streaming body in this task: no reader task and no channel, as most
        answers are small. Returns (chunks, True) once the body ended or failed, the response
        released; (chunks so far, False) when it outgrew ``BUFFER_LIMIT``, the response still
        open for the caller to stream the rest."""
        items: list[Item] = []
        size, parser = 0, ex.parser
        try:
            while size <= BUFFER_LIMIT:
                chunk = await resp.receive_chunk()  # each read bounded by the read timeout
                now = trio.current_time()
                if chunk is None:
                    ex.body_ended(now)
                    break
                ex.observe_chunk(len(chunk), now)
                if parser is not None:
                    parser.feed(chunk, now)
                items.append((chunk, now))
                size += len(chunk)
            else:
                return items, False
        except UpstreamError as exc:
            ex.fail(exc.kind, exc.message)
            log.warning("upstream %s before the body ended: %s", exc.kind, exc.message)
        except BaseException:
            await resp.aclose()
            raise
        await resp.aclose()
        return items, True

    async def _watch_client(self, receive: Receive, ex: Exchange, scope: trio.CancelScope,
                            watch: SendWatch) -> None:
        """Cancels the exchange when the client disconnects; ends an upstream read of a
        streamed body that waited ``read_timeout`` (``watch.reads``); cuts the exchange off
        when a ``send()`` to the client has waited for ``write_stall_timeout`` (the client
        reads nothing): the upstream connection is closed and the exchange finalised at once,
        as Hypercorn may hold the handler until the kernel gives up on the client."""
        stall, read_timeout = self._settings.write_stall_timeout, self._settings.read_timeout
        while True:
            with trio.move_on_at(watch.next_check()) as watch.nap:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if ex.fail(End.CLIENT_DISCONNECT, "client disconnected"):
                        log.info("client disconnected; cancelling upstream")
                    scope.cancel()
                    return
                continue
            now, reading, since = trio.current_time(), watch.reading_since, watch.since
            # the same sums next_check() woke at: a difference could round below the timeout,
            # and the watcher would wake again at once, for ever (in virtual time too)
            if reading is not None and watch.reads is not None and now >= reading + read_timeout:
                watch.reading_since = None
                watch.reads.cancel()  # the reader raises UpstreamTimeout('read')
            if since is not None and now >= since + stall:
                ex.fail(End.CLIENT_STALLED, f"client read nothing for {stall:g}s")
                log.warning("client stopped reading for %gs; closing the upstream", stall)
                scope.cancel()
                if watch.upstream is not None:
                    await watch.upstream.aclose()
                await self._finalise(ex)
                return

    def _on_response_head(self, resp: UpstreamResponse, ex: Exchange) -> ResponsePlan:
        """Everything decided once the response head is in, before any body byte moves."""
        ex.status = resp.status
        ex.headers_at = trio.current_time()
        if ex.tracker is not None:
            ex.tracker.response_head(ex.headers_at)
        ex.upstream_request_id = hdr.upstream_request_id(resp.headers)
        ex.streamed = is_event_stream(hdr.get(resp.headers, b"content-type"))
        encoding = hdr.get(resp.headers, b"content-encoding")
        accounted = ex.route is not None and ex.route.accounted
        if accounted:
            ex.parser = make_parser(
                ex.api(), streaming=ex.streamed,
                content_encoding=encoding.decode("latin-1") if encoding else None,
                latency=ex.tracker,
            )
        plan = ResponsePlan()
        if ex.bypass or not accounted or not 200 <= resp.status < 300:
            pass
        elif ex.streamed:
            plan.trailers = ex.trailers_ok
            if ex.strip_usage_chunk and encoding in (None, b"identity"):
                plan.stripper = UsageChunkStripper()
        else:
            length = hdr.get(resp.headers, b"content-length")
            plan.buffer = length is None or (length.isdigit() and int(length) <= BUFFER_LIMIT)
        plan.keepalive = self._keepalive_interval(resp, ex)
        ex.life.head(buffer=plan.buffer, trailers=plan.trailers)
        return plan

    async def _start_message(self, resp: UpstreamResponse, ex: Exchange) -> dict[str, Any]:
        headers = hdr.client_response_headers(resp.headers)
        ext = self._extensions
        if ext is not None and ext.has_response_start_hooks and not ex.bypass:
            mutable = MutableHeaders(headers)
            await ext.run_response_start(ex.hook_context(), resp.status, mutable)
            headers = mutable.raw()
        headers.extend(proxy_headers(ex))
        return {"type": "http.response.start", "status": resp.status, "headers": headers}

    async def _start_or_reject(
        self, resp: UpstreamResponse, ex: Exchange, plan: ResponsePlan,
    ) -> dict[str, Any] | None:
        """The start message, or None with a 500 planned when a fail-closed hook failed."""
        try:
            return await self._start_message(resp, ex)
        except ExtensionFailed as exc:
            plan.last = error_messages(ex, ExtensionRejected("response", exc))
            return None

    def _keepalive_interval(self, resp: UpstreamResponse, ex: Exchange) -> float | None:
        interval = self._settings.sse_keepalive
        if interval is None or ex.bypass or not ex.streamed:
            return None
        if hdr.get(resp.headers, b"content-encoding") not in (None, b"identity"):
            return None  # a comment cannot be spliced into a compressed stream
        return interval

    def _usage(self, ex: Exchange) -> dict[str, str]:
        """x-usage-* values for this exchange (parses and prices once, off the chunk path)."""
        return usage_values(ex.api(), ex.usage(), ex.cost_usd(), ex.model_requested)

    async def _answer_buffered(self, resp: UpstreamResponse, items: list[Item], ex: Exchange,
                               plan: ResponsePlan) -> None:
        """Plans the answer to a body read whole: with usage headers (and ``Server-Timing``),
        or, since nothing was sent yet, a clean provider-shaped 502/504 if it failed."""
        if not ex.upstream_complete:
            error: ProxyError = (
                UpstreamTimeout("read", self._settings.read_timeout)
                if ex.life.failure is End.TIMEOUT
                else UpstreamProtocolError(ex.error or "upstream response incomplete")
            )
            plan.last = error_messages(ex, error)
            return
        start = await self._start_or_reject(resp, ex, plan)
        if start is not None:
            body = handed_over(items, ex) if items else b""
            start["headers"].extend(as_headers(self._usage(ex)))
            hdr.merge_server_timing(start["headers"], server_timing_value(ex.latency()))
            ex.life.answered(resp.status)
            plan.last = [start, {"type": "http.response.body", "body": body, "more_body": False}]

    async def _stream(self, resp: UpstreamResponse, ex: Exchange, plan: ResponsePlan,
                      send: Send, watch: SendWatch, prefix: list[Item] | None,
                      nursery: trio.Nursery) -> None:
        """Sends the head, then the body as it arrives: an upstream reader task (started in
        the request's ``nursery``, it owns the response from then on) and this task as the
        client writer, over a channel bounded by ``stream_buffer`` bytes (``stream.py``).
        The last message is planned, not sent. ``prefix``: chunks a buffered body read
        before it outgrew the buffer limit."""
        try:
            start = await self._start_or_reject(resp, ex, plan)
        except BaseException:
            await resp.aclose()
            raise
        if start is None:
            await resp.aclose()
            return
        if plan.stripper is not None or plan.keepalive is not None:
            # The relayed length can differ from the upstream's (stripped chunk, comments).
            start["headers"] = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        if plan.trailers:
            start["trailers"] = True
            start["headers"].append((b"trailer", TRAILER_ANNOUNCE))
        channel = BodyChannel(self._settings.stream_buffer)
        nursery.start_soon(read_body, resp, ex, channel, watch, plan.stripper,
                           self._settings.read_timeout)
        ex.life.answered(resp.status)
        await watched_send(send, watch, start)
        if prefix:
            await watched_send(send, watch, more_body(handed_over(prefix, ex)))
        tail = await write_body(ex, channel, send, watch, plan.keepalive)
        if ex.upstream_complete or (plan.trailers and ex.life.failure is not End.CLIENT_DISCONNECT):
            plan.last = self._last_messages(ex, plan, tail or b"")
        # Otherwise the upstream failed: no last message. Hypercorn then closes the connection
        # without the terminating chunk (HTTP/1.1) or resets the stream (HTTP/2).

    def _last_messages(self, ex: Exchange, plan: ResponsePlan, data: bytes) -> list[Message]:
        last: list[Message] = [{"type": "http.response.body", "body": data, "more_body": False}]
        if plan.trailers:
            values = self._usage(ex)
            complete = ex.upstream_complete and getattr(ex.usage(), "complete", True)
            values["x-usage-complete"] = "true" if complete else "false"
            values.update(timing_values(ex.latency()))
            last.append({"type": "http.response.trailers", "headers": as_headers(values),
                         "more_trailers": False})
        return last


def handed_over(items: list[Item], ex: Exchange) -> bytes:
    """The bytes of chunks being handed to the client's ``send()`` now, their relay delays
    told to the exchange's latency tracker (a few arithmetic steps per chunk)."""
    tracker = ex.tracker
    if tracker is not None:
        now = trio.current_time()
        for _, read_at in items:
            if read_at is not None:  # None: the proxy's own bytes (a keep-alive comment)
                tracker.on_relay(read_at, now)
    return items[0][0] if len(items) == 1 else b"".join(data for data, _ in items)
