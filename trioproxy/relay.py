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
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import headers as hdr
from .config import Settings, UpstreamURL
from .errors import ClientRequestError, ProxyError, UpstreamError, error_body
from .exchange import Exchange
from .extensions import ExtensionManager, MutableHeaders
from .payload import hook_context
from .upstream import UpstreamPool, UpstreamResponse

log = logging.getLogger("trioproxy.relay")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

KEEPALIVE_COMMENT = b": keepalive\n\n"
_SSE_BOUNDARIES = (b"\n\n", b"\r\r", b"\r\n\r\n")


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
    body = error_body(ex.provider, exc.status, exc.message, code=exc.code)
    ex.status = exc.status
    ex.response_started = True
    ex.end_reason = ex.end_reason or exc.kind
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *proxy_headers(ex),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
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
            except UpstreamError as exc:
                ex.fail(exc.kind, exc.message)
                log.warning("upstream %s before response: %s", exc.kind, exc.message)
                await send_error(send, ex, exc)
                nursery.cancel_scope.cancel()
                return
            send_ch, recv_ch = trio.open_memory_channel[bytes](self._settings.channel_size)
            nursery.start_soon(self._read_upstream, resp, send_ch, ex)
            await self._write_client(resp, recv_ch, send, ex)
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

    async def _start_message(self, resp: UpstreamResponse, ex: Exchange) -> dict[str, Any]:
        ex.status = resp.status
        ex.headers_at = trio.current_time()
        ex.upstream_request_id = hdr.upstream_request_id(resp.headers)
        ctype = hdr.get(resp.headers, b"content-type") or b""
        ex.streamed = ctype.startswith(b"text/event-stream")
        headers = hdr.client_response_headers(resp.headers)
        ext = self._extensions
        if ext is not None and ext.has_response_start_hooks and not ex.bypass:
            mutable = MutableHeaders(headers)
            await ext.run_response_start(hook_context(ex, None), resp.status, mutable)
            headers = mutable.raw()
        headers.extend(proxy_headers(ex))
        return {"type": "http.response.start", "status": resp.status, "headers": headers}

    async def _read_upstream(
        self, resp: UpstreamResponse, send_ch: trio.MemorySendChannel[bytes], ex: Exchange
    ) -> None:
        """Reads the upstream body into the channel; owns (and releases) the response."""
        keepalive = self._keepalive_interval(resp, ex)
        read_timeout = self._settings.read_timeout
        parser = ex.parser
        async with resp, send_ch:
            try:
                deadline = trio.current_time() + read_timeout
                tail = b"\n\n"
                while True:
                    if keepalive is None:
                        chunk = await resp.receive_chunk(deadline)
                    else:
                        with trio.move_on_after(keepalive) as idle:
                            chunk = await resp.receive_chunk(deadline)
                        if idle.cancelled_caught:
                            if tail.endswith(_SSE_BOUNDARIES):
                                await send_ch.send(KEEPALIVE_COMMENT)
                            continue
                    if chunk is None:
                        ex.upstream_complete = True
                        return
                    now = trio.current_time()
                    deadline = now + read_timeout
                    ex.observe_chunk(len(chunk), now)
                    if parser is not None:
                        parser.feed(chunk)
                    if keepalive is not None:
                        tail = (tail + chunk)[-4:]
                    await send_ch.send(chunk)
            except UpstreamError as exc:
                ex.fail(exc.kind, exc.message)
                log.warning("upstream %s mid-stream: %s; cutting the client stream", exc.kind, exc.message)

    def _keepalive_interval(self, resp: UpstreamResponse, ex: Exchange) -> float | None:
        interval = self._settings.sse_keepalive
        if interval is None or ex.bypass or not ex.streamed:
            return None
        if hdr.get(resp.headers, b"content-encoding") not in (None, b"identity"):
            return None  # a comment cannot be spliced into a compressed stream
        return interval

    async def _write_client(
        self,
        resp: UpstreamResponse,
        recv_ch: trio.MemoryReceiveChannel[bytes],
        send: Send,
        ex: Exchange,
    ) -> None:
        """Sends each chunk as it arrives, coalescing what is already queued into one send."""
        start = await self._start_message(resp, ex)
        await send(start)
        ex.response_started = True
        ended = False
        async with recv_ch:
            while not ended:
                try:
                    parts = [await recv_ch.receive()]
                except trio.EndOfChannel:
                    break
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
                    # Mark before sending: the server reports http.disconnect as soon as the
                    # response is complete, and that must not read as a client abort.
                    ex.end_reason = ex.end_reason or "complete"
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                    return
                await send({"type": "http.response.body", "body": data, "more_body": True})
        if ex.upstream_complete:
            ex.end_reason = ex.end_reason or "complete"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # Otherwise the upstream failed: return without the final message. Hypercorn then
        # closes the connection without the terminating chunk, so the client sees truncation.
