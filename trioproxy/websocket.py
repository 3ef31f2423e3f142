"""The OpenAI Responses WebSocket relay, accounted per response.

Codex (``supports_websockets = true``) opens ``GET /v1/responses`` with ``Upgrade: websocket``,
sends one ``response.create`` text frame per turn and receives one JSON event per frame.

- **Handshake.** The upstream (the configured OpenAI base, ``https`` as ``wss``) is connected
  first; only then is the client accepted, with the upstream's end-to-end handshake headers and
  ``x-trioproxy-request-id``. An upstream refusal reaches the client as the same HTTP status,
  headers and body (``websocket.http.response``), so Codex sees a real 401/429 and can fall back
  to HTTP; a connect failure is a 502 and a timeout a 504, in OpenAI's error shape.
- **Relay.** One nursery: client->upstream, upstream->client and a ping on the upstream leg.
  Frames pass unchanged (text stays text, binary stays binary). When one side closes, the other
  is closed with its code; codes that may not be sent become 1000 towards the upstream
  (Hypercorn reports every client close as 1006, hypercorn#127) and 1011 towards the client
  when the upstream vanished without a close frame.
- **Accounting.** Each ``response.create`` opens one usage record (an ``Exchange`` with id
  ``<socket id>.<n>`` and status 200), closed by ``response.completed`` / ``failed`` /
  ``incomplete`` or an ``error`` event; a close mid-response records it incomplete. Only
  ``response.create`` frames and the events carrying ids or usage are JSON-decoded (found by a
  prefix match on the text), and only after the frame has been forwarded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket as tws

from . import headers as hdr
from .config import UpstreamURL
from .errors import error_body
from .exchange import Exchange, adopt_request_id
from .extensions import ExtensionFailed, MutableHeaders
from .log import request_id_var
from .payload import encode_payload, hook_context, is_bypass
from .providers import make_parser
from .relay import Receive, Scope, Send
from .routing import Route, resolve

if TYPE_CHECKING:
    from .app import Runtime

log = logging.getLogger("trioproxy.websocket")

RESPONSES_PATH = b"/v1/responses"
ROUTE = Route("openai", "openai.responses", RESPONSES_PATH)
CLOSE_TIMEOUT = 5.0  # seconds for the closing handshake with the upstream
CANCELLED_CLOSE_TIMEOUT = 1.0  # the same, shielded, when the relay is cancelled (shutdown)
RECEIVE_BUFFER = 65536  # trio-websocket reads 4 KiB at a time by default
RECORD_STATUS = 200  # a record is one response: the status an HTTP client would have seen
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})
DECODED = TERMINAL | {"response.created", "error"}  # upstream events worth a json.loads
_TYPE_HEAD = re.compile(r'\s*\{\s*"type"\s*:\s*"([^"\\]{1,128})"')
_JSON = [(b"content-type", b"application/json")]
Headers = list[tuple[bytes, bytes]]
Message = str | bytes


# -- pure helpers -------------------------------------------------------------------------------


def classify(text: str) -> tuple[str | None, dict[str, Any] | None]:
    """(type, decoded object if decoding was needed to find the type). A frame starting
    ``{"type": "..."`` (OpenAI's and Codex's serialisation) is classified without decoding."""
    match = _TYPE_HEAD.match(text)
    if match:
        return match.group(1), None
    obj = decode(text)
    kind = obj.get("type") if obj is not None else None
    return (kind if isinstance(kind, str) else None), obj


def decode(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def size_of(message: Message) -> int:
    """Bytes on the wire (``str.isascii`` is O(1) in CPython: no copy for ASCII JSON)."""
    if isinstance(message, str):
        return len(message) if message.isascii() else len(message.encode("utf-8", "surrogatepass"))
    return len(message)


def sendable_close_code(code: int | None, fallback: int) -> int:
    """``code`` if an endpoint may send it (RFC 6455 7.4: not 1004-1006, 1015), else ``fallback``."""
    if code is not None and (code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014
                             or 3000 <= code <= 4999):
        return code
    return fallback


def upstream_handshake_headers(headers: Headers, bypass_names: tuple[bytes, ...]) -> Headers:
    """Every end-to-end client header (``authorization``, ``openai-beta``, ``session-id``,
    ``x-codex-*``, ...); not hop-by-hop ones, ``host``, ``sec-websocket-*`` (trio-websocket
    writes its own) or ``x-trioproxy-*``."""
    out = hdr.upstream_request_headers(headers, b"", None, drop=bypass_names)
    return [(k, v) for k, v in out if k != b"host" and not k.startswith(b"sec-websocket-")]


def client_handshake_headers(upstream_headers: Headers, request_id: str) -> Headers:
    """Every end-to-end upstream handshake header (``x-codex-*``, ``x-request-id``,
    ``openai-*``, ``*ratelimit*``, ...) plus ``x-trioproxy-request-id``."""
    out = [(k, v) for k, v in hdr.client_response_headers(upstream_headers)
           if k != b"content-length" and not k.startswith(b"sec-websocket-")]
    out.append((b"x-trioproxy-request-id", request_id.encode()))
    return out


# -- the payload hook stage ---------------------------------------------------------------------


@dataclass(eq=False)
class CreateContext:
    """One ``response.create`` frame on its way upstream."""

    exchange: Exchange
    session_id: str
    handshake_headers: Headers
    payload: dict[str, Any] | None = None  # set once decoded (saves the ledger a decode)


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
    result = await manager.run_payload(hook_context(ctx.exchange, payload), payload, headers)
    if not result.changed_by:
        return frame_text
    ctx.payload = result.payload
    ctx.exchange.extra["payload_changed_by"] = result.changed_by
    log.info("response.create changed by %s", ",".join(result.changed_by))
    return encode_payload(result.payload).decode("utf-8")


# -- accounting ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Record:
    ex: Exchange
    noted: bool = False  # the create frame has been read into the record
    ended: bool = False  # a terminal or error event, or a cut, ended the response
    warmup: bool = False  # generate: false


@dataclass(eq=False)
class ResponseLedger:
    """The usage records of one socket. Bookkeeping only: no I/O, never raises on bad input."""

    socket_id: str
    session_id: str
    path: str
    headers: Headers
    bypass: bool
    upstream_request_id: str | None = None
    count: int = 0
    current: Record | None = None
    unfinished: list[Record] = field(default_factory=list)

    def exchange(self, request_id: str) -> Exchange:
        ex = Exchange(request_id=request_id, method="GET", path=self.path, provider="openai",
                      route=ROUTE, transport="websocket", request_headers=self.headers,
                      bypass=self.bypass, upstream_request_id=self.upstream_request_id)
        ex.extra.update(session_id=self.session_id, socket_id=self.socket_id)
        return ex

    def start(self, size: int) -> tuple[Record, Record | None]:
        """A ``response.create`` arrived: open its record; also return the one it supersedes."""
        previous = self.cut("superseded", "a new response.create arrived before this one ended")
        self.count += 1
        ex = self.exchange(f"{self.socket_id}.{self.count}")
        ex.status, ex.streamed, ex.bytes_in = RECORD_STATUS, True, size
        ex.parser = _new_parser()
        ex.extra["response_index"] = self.count
        self.current = Record(ex)
        self.unfinished.append(self.current)
        return self.current, previous

    def note_create(self, rec: Record, payload: dict[str, Any] | None) -> None:
        rec.noted = True
        ex = rec.ex
        if payload is None:
            return
        model, previous = payload.get("model"), payload.get("previous_response_id")
        ex.model_requested = model if isinstance(model, str) else None
        if isinstance(previous, str):
            ex.extra["previous_response_id"] = previous
        if payload.get("generate") is False:
            rec.warmup, ex.extra["generate"] = True, False

    def on_client_frame(self, size: int) -> None:
        if self.current is not None:
            self.current.ex.bytes_in += size

    def on_upstream_frame(self, size: int, now: float, kind: str | None) -> Record | None:
        """Counts an upstream frame against the open record, before it is forwarded."""
        rec = self.current
        if rec is None:
            return None
        rec.ex.observe_chunk(size, now)
        rec.ex.response_started = True
        if kind in TERMINAL or kind == "error":
            rec.ended, self.current = True, None
        return rec

    def feed(self, rec: Record | None, kind: str, obj: dict[str, Any] | None) -> None:
        """Reads a decoded event into its record, after the frame was forwarded."""
        if obj is None or rec is None:
            if obj is not None and kind == "error":
                log.warning("upstream error event outside a response: %s", _error_text(obj))
            return
        ex = rec.ex
        if ex.parser is not None:
            ex.parser.feed_event(obj)
        response = obj.get("response")
        response = response if isinstance(response, dict) else {}
        if isinstance(response.get("id"), str):
            ex.extra["response_id"] = response["id"]
        if kind in TERMINAL:
            ex.upstream_complete = True
            ex.end_reason = ex.end_reason or "complete"
            if kind == "response.failed":
                ex.error = _error_text(response)
        elif kind == "error":
            ex.fail("upstream_error", _error_text(obj))

    def cut(self, reason: str, error: str) -> Record | None:
        """Ends the open response without a terminal event (a warm-up counts as complete)."""
        rec, self.current = self.current, None
        if rec is None:
            return None
        rec.ended = True
        if rec.warmup:
            rec.ex.end_reason = rec.ex.end_reason or "complete"
        else:  # no terminal event: the usage record's stop reason becomes "incomplete"
            rec.ex.fail(reason, error)
        return rec


def _error_text(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err.get("code") or err)
    return str(err or obj.get("message") or "error")


def _new_parser() -> Any:
    """The streaming usage parser of one Responses record."""
    return make_parser("openai.responses", streaming=True)


# -- the relay ----------------------------------------------------------------------------------


async def relay_websocket(runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI ``websocket`` scope: relays ``/v1/responses`` and ``/openai/v1/responses``."""
    if (await receive())["type"] != "websocket.connect":
        return
    sock = ResponsesSocket(runtime, scope, receive, send)
    route = resolve("GET", sock.raw_path, scope["headers"])
    token = request_id_var.set(sock.ledger.socket_id)
    try:
        if route is not None and route.provider == "openai" and (
            route.path.rstrip(b"/") == RESPONSES_PATH
        ):
            await sock.run(route.path, scope.get("query_string", b""))
        else:
            await sock.refuse_path()
    finally:
        request_id_var.reset(token)


class ResponsesSocket:
    """One client socket and its upstream socket."""

    def __init__(self, runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
        settings = runtime.settings
        headers: Headers = scope["headers"]
        socket_id = adopt_request_id(hdr.get(headers, settings.request_id_header.encode()))
        session = hdr.get(headers, b"session-id") or hdr.get(headers, b"session_id")
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        self.runtime, self.scope, self.receive, self.send = runtime, scope, receive, send
        self.ledger = ResponseLedger(
            socket_id, session.decode("latin-1") if session else socket_id,
            self.raw_path.decode("latin-1"), headers,
            is_bypass(headers, settings.bypass_header_names),
        )
        self.max_size = settings.ws_max_message_size  # both legs; Hypercorn has its own too
        self.ping_interval = settings.ws_ping_interval
        self.client_open = True  # False once the client left or was sent a close

    # -- handshake ----------------------------------------------------------------------------

    async def run(self, route_path: bytes, query: bytes) -> None:
        base = self.runtime.settings.openai_upstream
        resource = base.prefix + route_path + (b"?" + query if query else b"")
        deadline = trio.current_time() + self.runtime.settings.connect_timeout
        stream = await self._open_stream(base, deadline)
        if stream is None:
            return
        rejected: list[tws.ConnectionRejected] = []
        try:
            try:
                async with trio.open_nursery() as nursery:  # owns trio-websocket's reader task
                    await self._session(nursery, stream, base, resource, deadline)
                    nursery.cancel_scope.cancel()
            except* tws.ConnectionRejected as group:  # raised by the reader task
                rejected.extend(group.exceptions)  # type: ignore[arg-type]
        finally:
            # Ours to close: trio-websocket leaves the socket open when the upstream closes first.
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.ledger.cut("aborted", "the relay stopped before the response ended")
            for rec in list(self.ledger.unfinished):
                await self._finish(rec)
        if rejected:
            await self._refused(rejected[0])

    async def _open_stream(self, base: UpstreamURL, deadline: float) -> trio.abc.Stream | None:
        """TCP (and TLS) to the upstream, or None once the client has had its 502 / 504."""
        try:
            with trio.fail_at(deadline):
                tcp = await trio.open_tcp_stream(base.host, base.port)
                if base.scheme != "https":
                    return tcp
                ctx = self.runtime.pool.ssl_context  # trust store and ALPN http/1.1, shared
                tls = trio.SSLStream(tcp, ctx, server_hostname=base.host, https_compatible=True)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tcp)
                    raise
                return tls
        except trio.TooSlowError:
            await self._timed_out()
        except (OSError, trio.BrokenResourceError) as exc:
            await self._failed(502, "connect_error", "upstream_connect_error",
                               f"cannot connect to the upstream websocket: {exc!r}")
        return None

    async def _session(self, nursery: trio.Nursery, stream: trio.abc.Stream,
                       base: UpstreamURL, resource: bytes, deadline: float) -> None:
        """The upgrade, the client's accept, the relay, the closing handshake."""
        upstream: tws.WebSocketConnection | None = None
        with trio.move_on_at(deadline):
            upstream = await tws.wrap_client_stream(
                nursery, stream, base.host_header.decode(), resource.decode("latin-1"),
                subprotocols=self.scope.get("subprotocols") or None,
                extra_headers=upstream_handshake_headers(
                    self.ledger.headers, self.runtime.settings.bypass_header_names),
                max_message_size=self.max_size, receive_buffer_size=RECEIVE_BUFFER,
            )
        if upstream is None:
            await self._timed_out()
            return
        await self._accept(upstream)
        try:
            await self._relay(upstream)
        finally:  # a no-op unless cancelled: say goodbye to the upstream, briefly
            with trio.move_on_after(CANCELLED_CLOSE_TIMEOUT, shield=True):
                await upstream.aclose()

    async def _accept(self, upstream: tws.WebSocketConnection) -> None:
        upstream_headers = list(upstream.handshake_headers)
        self.ledger.upstream_request_id = hdr.upstream_request_id(upstream_headers)
        headers = client_handshake_headers(upstream_headers, self.ledger.socket_id)
        message: dict[str, Any] = {"type": "websocket.accept", "headers": headers}
        if upstream.subprotocol and upstream.subprotocol in (self.scope.get("subprotocols") or ()):
            message["subprotocol"] = upstream.subprotocol
        await self.send(message)
        log.info("websocket open: %s session=%s upstream_request_id=%s", self.ledger.path,
                 self.ledger.session_id, self.ledger.upstream_request_id)

    async def refuse_path(self) -> None:
        msg = (f"trioproxy relays WebSockets only on /v1/responses and /openai/v1/responses, "
               f"not {self.ledger.path}")
        await self._failed(404, "rejected", "unknown_path", msg, route=None)

    async def _refused(self, exc: tws.ConnectionRejected) -> None:
        status = exc.status_code
        log.info("upstream refused the websocket upgrade with %d", status)
        if status < 300:  # an answer that neither upgrades nor refuses
            await self._failed(502, "upstream_error", "upstream_error",
                               f"upstream answered the websocket upgrade with {status}")
            return
        ex = self.ledger.exchange(self.ledger.socket_id)
        ex.upstream_request_id = hdr.upstream_request_id(exc.headers)
        ex.end_reason = "complete"  # the upstream's own answer, delivered as it was
        await self._http_response(ex, status, list(exc.headers), exc.body or b"")

    async def _timed_out(self) -> None:
        timeout = self.runtime.settings.connect_timeout
        await self._failed(504, "timeout", "upstream_timeout",
                           f"upstream websocket connect/upgrade timeout after {timeout:g}s")

    async def _failed(self, status: int, kind: str, code: str, msg: str,
                      route: Route | None = ROUTE) -> None:
        log.warning("websocket refused with %d (%s): %s", status, kind, msg)
        ex = self.ledger.exchange(self.ledger.socket_id)
        ex.route = route
        ex.fail(kind, msg)
        await self._http_response(ex, status, _JSON, error_body("openai", status, msg, code))

    async def _http_response(self, ex: Exchange, status: int, headers: Headers, body: bytes) -> None:
        """Answers the upgrade with HTTP (``websocket.http.response``), else closes with 1008."""
        ex.status, ex.response_started, ex.bytes_out = status, True, len(body)
        try:
            if "websocket.http.response" not in (self.scope.get("extensions") or {}):
                await self.send({"type": "websocket.close", "code": 1008})
                return
            out = client_handshake_headers(headers, ex.request_id)
            out.append((b"content-length", str(len(body)).encode()))
            await self.send({"type": "websocket.http.response.start", "status": status,
                             "headers": out})
            await self.send({"type": "websocket.http.response.body", "body": body})
        finally:
            await self._finish(Record(ex))

    # -- relay --------------------------------------------------------------------------------

    async def _relay(self, upstream: tws.WebSocketConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._upstream_to_client, upstream, nursery.cancel_scope)
            if self.ping_interval:
                nursery.start_soon(self._keepalive, upstream, self.ping_interval)
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

    async def _forward_client_frame(self, upstream: tws.WebSocketConnection, data: Message,
                                    size: int) -> None:
        kind, obj = classify(data) if isinstance(data, str) else (None, None)
        if kind != "response.create" or not isinstance(data, str):
            self.ledger.on_client_frame(size)
            await upstream.send_message(data)
            return
        rec, superseded = self.ledger.start(size)
        ctx = CreateContext(rec.ex, self.ledger.session_id, self.ledger.headers, obj)
        if not self.ledger.bypass:
            try:
                data = await _payload_stage(self.runtime, ctx, data)
            except ExtensionFailed as exc:
                await self._reject_create(rec, ctx, data, exc)
                if superseded is not None:
                    await self._finish(superseded)
                return
        try:
            await upstream.send_message(data)
        finally:  # decoded after forwarding: the frame is not delayed by it
            self.ledger.note_create(rec, ctx.payload if ctx.payload is not None else decode(data))
        if superseded is not None:
            await self._finish(superseded)
        if rec.ended:  # the terminal event came first: the upstream pump left it to us
            await self._finish(rec)

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
            kind, obj = classify(message) if isinstance(message, str) else (None, None)
            rec = self.ledger.on_upstream_frame(size_of(message), trio.current_time(), kind)
            if self.client_open:
                key = "text" if isinstance(message, str) else "bytes"
                await self.send({"type": "websocket.send", key: message})
            if kind in DECODED and isinstance(message, str):
                self.ledger.feed(rec, kind, obj if obj is not None else decode(message))
                if rec is not None and rec.ended and rec.noted:
                    await self._finish(rec)

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

    async def _client_left(self, upstream: tws.WebSocketConnection, code: int | None) -> None:
        self.client_open = False
        out = sendable_close_code(code, 1000)
        log.info("client closed the websocket (%s): closing the upstream with %d", code, out)
        self.ledger.cut("client_disconnect", f"client closed the websocket ({code})")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(out)
        await self._finish_all()

    async def _client_too_big(self, upstream: tws.WebSocketConnection, size: int) -> None:
        log.warning("client message of %d bytes exceeds ws_max_message_size=%d: closing with 1009",
                    size, self.max_size)
        self.ledger.cut("rejected", f"client message of {size} bytes is too big")
        await self._close_client(1009, "message too big")
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(1000)
        await self._finish_all()

    async def _upstream_closed(self, reason: tws.CloseReason | None) -> None:
        code = reason.code if reason is not None else 1006
        text = reason.reason if reason is not None else None
        if code == 1009:
            log.warning("upstream websocket closed with 1009 (message too big): %s", text)
        out = sendable_close_code(code, 1011 if code in (1006, 1015) else 1000)
        log.info("upstream closed the websocket (%d%s): closing the client with %d",
                 code, f" {text}" if text else "", out)
        self.ledger.cut("upstream_error", f"upstream closed the websocket ({code})")
        await self._close_client(out, text)
        await self._finish_all()

    async def _close_client(self, code: int, reason: str | None = None) -> None:
        if self.client_open:
            self.client_open = False  # Hypercorn raises on websocket.send after our close
            message: dict[str, Any] = {"type": "websocket.close", "code": code}
            await self.send({**message, "reason": reason} if reason else message)

    async def _reject_create(
        self, rec: Record, ctx: CreateContext, data: str, exc: ExtensionFailed
    ) -> None:
        """Fail-closed: the frame is not forwarded; the client gets an ``error`` event."""
        self.ledger.note_create(rec, ctx.payload if ctx.payload is not None else decode(data))
        if self.ledger.current is rec:
            self.ledger.current = None
        rec.ended = True
        rec.ex.status = 500
        rec.ex.fail("extension_error", str(exc))
        event = {"type": "error", "status": 500,
                 "error": {"type": "server_error", "code": "extension_error",
                           "message": f"request rejected: {exc}"}}
        if self.client_open:
            await self.send({"type": "websocket.send", "text": json.dumps(event)})
        await self._finish(rec)

    async def _finish_all(self) -> None:
        for rec in list(self.ledger.unfinished):
            await self._finish(rec)

    async def _finish(self, rec: Record) -> None:
        """Finalises one record (``Runtime.finish`` is shielded and runs once per exchange)."""
        if rec in self.ledger.unfinished:
            self.ledger.unfinished.remove(rec)
        token = request_id_var.set(rec.ex.request_id)
        try:
            await self.runtime.finish(rec.ex)
        finally:
            request_id_var.reset(token)
