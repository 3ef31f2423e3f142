"""The Responses WebSocket relay's frame pumps: the trio side of an accepted socket.

One nursery: client->upstream, upstream->client and a ping on the upstream leg. Frames pass
unchanged (text stays text, binary stays binary). When one side closes, the other is closed
with its code. A ``response.create`` puts a response in flight (:mod:`.ws_responses`), its
frame read (decoded) only after it has been forwarded; a close mid-response records it
incomplete. Each response is finalised exactly once through ``Runtime.finalise``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket as tws

from ..asgi import Receive, Send
from ..extensions import ExtensionFailed, MutableHeaders
from ..log import request_id_var
from ..payload import encode_payload
from ..protocol.lifecycle import End
from ..protocol.websocket import (
    Message,
    classify,
    close_code_for_client,
    close_code_for_upstream,
    decode,
    extension_error_event,
    size_of,
)
from .ws_responses import DECODED, CreateContext, InflightResponse, ResponseBook

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger("trioproxy.websocket")

CLOSE_TIMEOUT = 5.0  # seconds for the closing handshake with the upstream
DRAIN_POLL = 0.05  # seconds between checks, while draining, that no response is in flight


# -- the payload hook stage ---------------------------------------------------------------------


async def _payload_stage(runtime: Runtime, ctx: CreateContext, frame_text: str) -> str:
    """The one place each ``response.create`` frame meets the payload hooks.

    Unchanged frames are forwarded as the original text; a frame a hook changed is
    re-encoded once. Sockets opened with the bypass header never reach this. Raises
    ``ExtensionFailed`` when a hook fails and extensions are fail-closed."""
    manager = runtime.extensions
    if manager is None or not manager.has_payload_hooks:
        return frame_text
    payload = ctx.payload if ctx.payload is not None else decode(frame_text)
    if payload is None:
        return frame_text
    ctx.payload = payload
    headers = MutableHeaders(ctx.handshake_headers)  # read-only here: a frame has no headers
    result = await manager.run_payload(ctx.exchange.hook_context(payload), payload, headers)
    if not result.changed_by:
        return frame_text
    ctx.payload = result.payload
    ctx.exchange.payload_changed_by = result.changed_by
    log.info("response.create changed by %s", ",".join(result.changed_by))
    return encode_payload(result.payload).decode("utf-8")


class FramePumps:
    """The frames of one accepted socket, and the finalisation of its responses."""

    def __init__(self, runtime: Runtime, book: ResponseBook, receive: Receive, send: Send,
                 max_size: int, ping_interval: float | None) -> None:
        self.runtime, self.book, self.receive, self.send = runtime, book, receive, send
        self.max_size = max_size  # both legs; Hypercorn has its own too
        self.ping_interval = ping_interval
        self.client_open = True  # False once the client left or was sent a close

    async def run(self, upstream: tws.WebSocketConnection) -> None:
        """Relays frames both ways (and pings the upstream) until one side closes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream_to_client, upstream, nursery.cancel_scope)
            if self.ping_interval:
                nursery.start_soon(self._keepalive, upstream, self.ping_interval)
            nursery.start_soon(self._close_on_drain, upstream, nursery.cancel_scope)
            await self._client_to_upstream(upstream, nursery.cancel_scope)

    async def _client_to_upstream(self, upstream: tws.WebSocketConnection,
                                  done: trio.CancelScope) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                await self._client_left(upstream, message.get("code"))
                done.cancel()
                return
            if message["type"] != "websocket.receive":
                continue
            text = message.get("text")
            data: Message = text if text is not None else (message.get("bytes") or b"")
            size = size_of(data)
            if size > self.max_size:
                await self._client_too_big(upstream, size)
                done.cancel()
                return
            try:
                await self._forward_client_frame(upstream, data, size)
            except tws.ConnectionClosed:
                return  # the upstream pump relays the upstream's close to the client
            # An idle socket waits here for minutes between turns: hold no create frame
            # (40 KB to several MB, the agent's whole context) while it does.
            del message, text, data

    async def _forward_client_frame(self, upstream: tws.WebSocketConnection, data: Message,
                                    size: int) -> None:
        kind, obj = classify(data) if isinstance(data, str) else (None, None)
        if kind != "response.create" or not isinstance(data, str):
            self.book.on_client_frame(size)
            await upstream.send_message(data)
            return
        response = self.book.start(size)
        ctx = CreateContext(response.ex, self.book.session_id, self.book.headers, obj)
        if not self.book.bypass:
            try:
                data = await _payload_stage(self.runtime, ctx, data)
            except ExtensionFailed as exc:
                await self._reject_create(response, ctx, data, exc)
                return
            if response.ended:  # the socket was cut while the hooks ran: its record is final
                await self.finalise(response)
                return
        self.book.forwarded(response)  # from here on the response may come
        try:
            await upstream.send_message(data)
            self.book.written(response, trio.current_time())
        finally:  # decoded after forwarding: the frame is not delayed by it
            payload = ctx.payload if ctx.payload is not None else decode(data)
            self.book.note_create(response, payload)
        if response.ended:  # the terminal event came first: the upstream pump left it to us
            await self.finalise(response)

    async def _upstream_to_client(self, upstream: tws.WebSocketConnection,
                                  done: trio.CancelScope) -> None:
        while True:
            try:
                message = await upstream.get_message()
            except tws.ConnectionClosed:
                if self.client_open:  # else the client pump is closing the upstream already
                    await self._upstream_closed(upstream.closed)
                    done.cancel()
                return
            await self._relay_upstream_frame(message, trio.current_time())
            del message  # an idle socket keeps nothing of its last frame while it waits

    async def _relay_upstream_frame(self, message: Message, now: float) -> None:
        """One upstream frame: to the client, then into the book (which may end a response:
        finalised here, so that nothing of it outlives this call)."""
        kind, obj = classify(message) if isinstance(message, str) else (None, None)
        handed = None
        if self.client_open:
            key = "text" if isinstance(message, str) else "bytes"
            handed = trio.current_time()
            await self.send({"type": "websocket.send", key: message})
        if kind in DECODED and obj is None and isinstance(message, str):
            obj = decode(message)  # after forwarding: the frame is not delayed by it
        ended = self.book.on_upstream_frame(message, now, kind, obj, handed)
        if ended is not None and ended.noted:
            await self.finalise(ended)

    async def _keepalive(self, upstream: tws.WebSocketConnection, interval: float) -> None:
        """Pings the upstream every ``interval`` seconds (trio-websocket never does)."""
        while True:
            await trio.sleep(interval)
            sent = trio.current_time()
            with trio.move_on_after(interval) as late:
                try:
                    await upstream.ping()
                except tws.ConnectionClosed:
                    return
            if late.cancelled_caught:
                log.warning("upstream websocket did not answer a ping within %gs", interval)
            else:
                log.debug("upstream pong after %.1f ms", (trio.current_time() - sent) * 1000)

    # -- closing ------------------------------------------------------------------------------

    async def _close_on_drain(self, upstream: tws.WebSocketConnection,
                              done: trio.CancelScope) -> None:
        """Once the process refuses new requests (its drain's grace period is over): close
        with 1012 (service restart) as soon as no response is in flight, so the client
        reconnects elsewhere; a response still in flight at ``DrainState.ws_close_at`` is cut."""
        state = self.runtime.drain_state
        await state.refusing.wait()  # no wake-ups at all while serving
        while self.book.inflight and trio.current_time() < state.ws_close_at:
            await trio.sleep(DRAIN_POLL)
        if self.book.inflight:
            log.warning("websocket: %d response(s) still in flight at the graceful timeout: "
                        "closing with 1012", len(self.book.inflight))
            self.book.cut(End.ABORTED, "the proxy shut down (graceful timeout) before the "
                            "response ended")
        await self.close_client(1012, "service restart")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(1001)
        await self.finalise_all()
        done.cancel()

    async def _client_left(self, upstream: tws.WebSocketConnection, code: int | None) -> None:
        self.client_open = False
        out = close_code_for_upstream(code)
        log.info("client closed the websocket (%s): closing the upstream with %d", code, out)
        self.book.cut(End.CLIENT_DISCONNECT, f"client closed the websocket ({code})")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(out)
        await self.finalise_all()

    async def _client_too_big(self, upstream: tws.WebSocketConnection, size: int) -> None:
        log.warning("client message of %d bytes exceeds ws_max_message_size=%d: closing with 1009",
                    size, self.max_size)
        self.book.cut(End.REJECTED, f"client message of {size} bytes is too big")
        await self.close_client(1009, "message too big")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(1000)
        await self.finalise_all()

    async def _upstream_closed(self, reason: tws.CloseReason | None) -> None:
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None else None
        if code == 1009:
            log.warning("upstream websocket closed with 1009 (message too big): %s", text)
        out = close_code_for_client(code)
        log.info("upstream closed the websocket (%d%s): closing the client with %d",
                 code, f" {text}" if text else "", out)
        self.book.cut(End.UPSTREAM_ERROR, f"upstream closed the websocket ({code})")
        await self.close_client(out, text)
        await self.finalise_all()

    async def close_client(self, code: int, reason: str | None = None) -> None:
        if self.client_open:
            self.client_open = False  # Hypercorn raises on websocket.send after our close
            message: dict[str, Any] = {"type": "websocket.close", "code": code}
            await self.send({**message, "reason": reason} if reason else message)

    async def _reject_create(
        self, response: InflightResponse, ctx: CreateContext, data: str, exc: ExtensionFailed
    ) -> None:
        """Fail-closed: the frame is not forwarded; the client gets an ``error`` event."""
        payload = ctx.payload if ctx.payload is not None else decode(data)
        self.book.reject(response, payload, str(exc))
        if self.client_open:
            await self.send({"type": "websocket.send", "text": extension_error_event(exc)})
        await self.finalise(response)

    async def finalise_all(self) -> None:
        for response in list(self.book.inflight):
            await self.finalise(response)

    async def finalise(self, response: InflightResponse) -> None:
        """Finalises one response (``Runtime.finalise`` is shielded and runs once per exchange)."""
        self.book.discharge(response)
        token = request_id_var.set(response.ex.log_label())
        try:
            await self.runtime.finalise(response.ex)
        finally:
            request_id_var.reset(token)
