"""The HTTP relay: one nursery per request running the upstream reader, the client writer and
the disconnect watcher, joined by a bounded memory channel.

- The first upstream byte is written to the client at once; whatever is already queued when
  the writer wakes is coalesced into one ``send()`` (never waiting in order to batch).
- A full channel blocks the reader, so a slow client slows the upstream read (backpressure).
- ``http.disconnect`` cancels the nursery: the upstream read stops and its connection is closed.
- An upstream failure mid-stream ends the response without its terminating chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import headers as hdr
from .config import Settings, UpstreamURL
from .errors import (
    ClientRequestError,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    error_body,
)
from .exchange import Exchange
from .extensions import ExtensionFailed, ExtensionManager, MutableHeaders
from .payload import hook_context, note_deferred_request
from .providers import make_parser
from .upstream import UpstreamPool, UpstreamResponse
from .usage_wire import (
    SSE_EVENT_ENDS,
    TRAILER_ANNOUNCE,
    UsageChunkStripper,
    as_headers,
    usage_values,
)

log = logging.getLogger("trioproxy.relay")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KEEPALIVE_COMMENT = b": keepalive\n\n"
BUFFER_LIMIT = 16 * 1024 * 1024  # non-streaming bodies above this stream without usage headers


async def read_body(receive: Receive, ex: Exchange, limit: int) -> bytes | None:
    """The whole request body, or None if the client left first. Raises 413 over ``limit``."""
    declared = hdr.get(ex.request_headers, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ClientRequestError(f"request body exceeds the {limit} byte limit", 413, "request_too_large")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise ClientRequestError(f"request body exceeds the {limit} byte limit", 413, "request_too_large")
            parts.append(chunk)
        if not message.get("more_body", False):
            ex.bytes_in = size
            return b"".join(parts)


def proxy_headers(ex: Exchange) -> list[tuple[bytes, bytes]]:
    """Headers the proxy adds to every response it sends."""
    return [(b"x-trioproxy-request-id", ex.request_id.encode())]


async def send_error(send: Send, ex: Exchange, exc: ProxyError) -> None:
    """A complete JSON error response in the caller's provider format."""
    ex.end_reason = ex.end_reason or exc.kind
    await send_json(send, ex, exc.status, error_body(ex.provider, exc.status, exc.message, exc.code))


async def send_json(send: Send, ex: Exchange, status: int, body: bytes) -> None:
    """A complete JSON response made by the proxy itself."""
    ex.status = status
    ex.response_started = True
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *proxy_headers(ex),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class HttpRelay:
    """Relays one routed HTTP request. ``ex.route`` must be set by the caller."""

    def __init__(
        self, settings: Settings, pool: UpstreamPool, extensions: ExtensionManager | None = None
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._extensions = extensions

    def upstream_for(self, ex: Exchange) -> UpstreamURL:
        assert ex.route is not None
        if ex.route.provider == "anthropic":
            return self._settings.anthropic_upstream
        return self._settings.openai_upstream

    async def relay(
        self, ex: Exchange, base: UpstreamURL, target: bytes, headers: list[tuple[bytes, bytes]],
        body: bytes, receive: Receive, send: Send,
    ) -> None:
        """Send the prepared request upstream and stream the response back to the client."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, ex, nursery.cancel_scope)
            try:
                resp = await self._pool.send_request(base, ex.method.encode(), target, headers, body)
            except ProxyError as exc:  # connect / timeout / protocol, or a header h11 refuses
                ex.fail(exc.kind, exc.message)
                log.warning("%s before response: %s", exc.kind, exc.message)
                await send_error(send, ex, exc)
                nursery.cancel_scope.cancel()
                return
            try:
                plan = self._on_response_head(resp, ex)
            except BaseException:
                await resp.aclose()  # nothing else owns it yet
                raise
            send_ch, recv_ch = trio.open_memory_channel[bytes](self._settings.channel_size)
            nursery.start_soon(self._read_upstream, resp, send_ch, ex, plan)
            if plan.buffer:
                await self._write_buffered(resp, recv_ch, send, ex, plan)
            else:
                await self._write_streaming(resp, recv_ch, send, ex, plan)
            nursery.cancel_scope.cancel()  # stop the watcher

    async def _watch_disconnect(
        self, receive: Receive, ex: Exchange, scope: trio.CancelScope
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if ex.end_reason is None:
                    ex.fail("client_disconnect", "client disconnected")
                    log.info("client disconnected; cancelling upstream")
                scope.cancel()
                return

    def _on_response_head(self, resp: UpstreamResponse, ex: Exchange) -> ResponsePlan:
        """Everything decided once the response head is in, before any body byte moves."""
        ex.status = resp.status
        ex.headers_at = trio.current_time()
        ex.upstream_request_id = hdr.upstream_request_id(resp.headers)
        ctype = hdr.get(resp.headers, b"content-type") or b""
        ex.streamed = ctype.startswith(b"text/event-stream")
        encoding = hdr.get(resp.headers, b"content-encoding")
        accounted = ex.route is not None and ex.route.accounted
        if accounted:
            ex.parser = make_parser(
                ex.api(), streaming=ex.streamed,
                content_encoding=encoding.decode("latin-1") if encoding else None,
            )
        plan = ResponsePlan()
        if ex.bypass or not accounted or not 200 <= resp.status < 300:
            pass
        elif ex.streamed:
            plan.trailers = bool(ex.extra.get("trailers_ok"))
            if ex.extra.get("strip_usage_chunk") and encoding in (None, b"identity"):
                plan.stripper = UsageChunkStripper()
        else:
            length = hdr.get(resp.headers, b"content-length")
            plan.buffer = length is None or (length.isdigit() and int(length) <= BUFFER_LIMIT)
        plan.keepalive = self._keepalive_interval(resp, ex)
        return plan

    async def _start_message(self, resp: UpstreamResponse, ex: Exchange) -> dict[str, Any]:
        headers = hdr.client_response_headers(resp.headers)
        ext = self._extensions
        if ext is not None and ext.has_response_start_hooks and not ex.bypass:
            mutable = MutableHeaders(headers)
            await ext.run_response_start(hook_context(ex), resp.status, mutable)
            headers = mutable.raw()
        headers.extend(proxy_headers(ex))
        return {"type": "http.response.start", "status": resp.status, "headers": headers}

    async def _start_or_reject(
        self, resp: UpstreamResponse, send: Send, ex: Exchange
    ) -> dict[str, Any] | None:
        """The start message, or None after answering 500 when a fail-closed hook failed."""
        try:
            return await self._start_message(resp, ex)
        except ExtensionFailed as exc:
            ex.fail("extension_error", str(exc))
            await send_error(send, ex, ProxyError(f"response rejected: {exc}"))
            return None

    async def _read_upstream(
        self, resp: UpstreamResponse, send_ch: trio.MemorySendChannel[bytes], ex: Exchange,
        plan: ResponsePlan,
    ) -> None:
        """Reads the upstream body into the channel; owns (and releases) the response."""
        read_timeout = self._settings.read_timeout
        async with resp, send_ch:
            try:
                # One cancel scope per stream whose deadline moves on with every chunk, rather
                # than a new scope per read: this loop is the hot path.
                with trio.CancelScope(deadline=trio.current_time() + read_timeout) as timeout:
                    await self._pump(resp, send_ch, ex, plan, timeout)
                if timeout.cancelled_caught:
                    raise UpstreamTimeout("read", read_timeout)
            except UpstreamError as exc:
                ex.fail(exc.kind, exc.message)
                log.warning("upstream %s mid-stream: %s; cutting the client stream",
                            exc.kind, exc.message)

    async def _pump(
        self, resp: UpstreamResponse, send_ch: trio.MemorySendChannel[bytes], ex: Exchange,
        plan: ResponsePlan, timeout: trio.CancelScope,
    ) -> None:
        keepalive, stripper, parser = plan.keepalive, plan.stripper, ex.parser
        read_timeout = self._settings.read_timeout
        tail = b"\n\n"

        async def put(data: bytes) -> None:
            try:
                send_ch.send_nowait(data)
            except trio.WouldBlock:  # backpressure: a slow client is not an upstream timeout
                timeout.deadline = math.inf
                await send_ch.send(data)
                timeout.deadline = trio.current_time() + read_timeout

        while True:
            if keepalive is None:
                chunk = await resp.receive_chunk(math.inf)
            else:
                with trio.move_on_after(keepalive) as idle:
                    chunk = await resp.receive_chunk(math.inf)
                if idle.cancelled_caught:
                    if tail.endswith(SSE_EVENT_ENDS):
                        await put(KEEPALIVE_COMMENT)
                    continue
            if chunk is None:
                if stripper is not None and (rest := stripper.flush()):
                    await put(rest)
                ex.upstream_complete = True
                return
            now = trio.current_time()
            timeout.deadline = now + read_timeout
            ex.observe_chunk(len(chunk), now)
            if parser is not None:
                parser.feed(chunk)
            if stripper is not None:
                chunk = stripper.feed(chunk)
                if not chunk:
                    continue
            if keepalive is not None:
                tail = (tail + chunk[-4:])[-4:]
            await put(chunk)

    def _keepalive_interval(self, resp: UpstreamResponse, ex: Exchange) -> float | None:
        interval = self._settings.sse_keepalive
        if interval is None or ex.bypass or not ex.streamed:
            return None
        if hdr.get(resp.headers, b"content-encoding") not in (None, b"identity"):
            return None  # a comment cannot be spliced into a compressed stream
        return interval

    def _usage(self, ex: Exchange) -> dict[str, str]:
        """x-usage-* values for this exchange (parses and prices once, off the chunk path)."""
        usage = ex.usage()
        if getattr(usage, "model", None) is None:
            note_deferred_request(ex)  # x-request-model falls back to the requested model
        return usage_values(ex.api(), usage, ex.cost_usd(), ex.model_requested)

    async def _write_buffered(
        self, resp: UpstreamResponse, recv_ch: trio.MemoryReceiveChannel[bytes], send: Send,
        ex: Exchange, plan: ResponsePlan,
    ) -> None:
        """Non-streaming accounted response: read it whole, then answer with usage headers.

        A body that grows past ``BUFFER_LIMIT`` (chunked, so its size was unknown) is streamed
        on without usage headers instead of being held whole."""
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await recv_ch.receive()
            except trio.EndOfChannel:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > BUFFER_LIMIT:
                log.info("response body over %d bytes: streamed without usage headers", size)
                await self._write_streaming(resp, recv_ch, send, ex, plan, b"".join(parts))
                return
        await recv_ch.aclose()
        if not ex.upstream_complete:
            # Nothing sent yet, so the failure can still be a clean provider-shaped 502/504.
            error: ProxyError = (
                UpstreamTimeout("read", self._settings.read_timeout)
                if ex.end_reason == "timeout"
                else UpstreamProtocolError(ex.error or "upstream response incomplete")
            )
            if ex.end_reason != "client_disconnect":
                await send_error(send, ex, error)
            return
        start = await self._start_or_reject(resp, send, ex)
        if start is None:
            return
        start["headers"].extend(as_headers(self._usage(ex)))
        ex.end_reason = ex.end_reason or "complete"
        await send(start)
        ex.response_started = True
        await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})

    async def _write_streaming(
        self, resp: UpstreamResponse, recv_ch: trio.MemoryReceiveChannel[bytes], send: Send,
        ex: Exchange, plan: ResponsePlan, prefix: bytes = b"",
    ) -> None:
        """Sends each chunk as it arrives, coalescing what is already queued into one send.
        ``prefix``: body bytes already taken from the channel (a buffered body that overflowed)."""
        start = await self._start_or_reject(resp, send, ex)
        if start is None:
            return
        if plan.stripper is not None or plan.keepalive is not None:
            # The relayed length can differ from the upstream's (stripped chunk, comments).
            start["headers"] = [(k, v) for k, v in start["headers"] if k != b"content-length"]
        if plan.trailers:
            start["trailers"] = True
            start["headers"].append((b"trailer", TRAILER_ANNOUNCE))
        await send(start)
        ex.response_started = True
        if prefix:
            await send({"type": "http.response.body", "body": prefix, "more_body": True})
        async with recv_ch:
            while True:
                try:
                    parts = [await recv_ch.receive()]
                except trio.EndOfChannel:
                    break
                ended = False
                while True:
                    try:
                        parts.append(recv_ch.receive_nowait())
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        ended = True
                        break
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                if ended and ex.upstream_complete:
                    await self._finish_stream(send, ex, plan, data)
                    return
                await send({"type": "http.response.body", "body": data, "more_body": True})
        if ex.upstream_complete or (plan.trailers and ex.end_reason != "client_disconnect"):
            await self._finish_stream(send, ex, plan, b"")
        # Otherwise the upstream failed: return without the final message. Hypercorn then
        # closes the connection without the terminating chunk, so the client sees truncation.

    async def _finish_stream(self, send: Send, ex: Exchange, plan: ResponsePlan, data: bytes) -> None:
        # Mark before sending: the server reports http.disconnect as soon as the response is
        # complete, and that must not read as a client abort.
        ex.end_reason = ex.end_reason or "complete"
        await send({"type": "http.response.body", "body": data, "more_body": False})
        if plan.trailers:
            values = self._usage(ex)
            complete = ex.upstream_complete and getattr(ex.usage(), "complete", True)
            values["x-usage-complete"] = "true" if complete else "false"
            await send({"type": "http.response.trailers", "headers": as_headers(values),
                        "more_trailers": False})



@dataclass(slots=True)
class ResponsePlan:
    """How one response is relayed, decided from its head."""

    buffer: bool = False  # read whole, answer with x-usage-* headers
    trailers: bool = False  # HTTP/2 + TE: trailers: usage as trailers
    stripper: UsageChunkStripper | None = None  # remove the injected usage chunk
    keepalive: float | None = None
