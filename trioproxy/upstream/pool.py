"""A keep-alive connection pool per upstream origin: HTTP/1.1 over trio streams (heads by
``http11``, bodies by ``body``), TLS via SSLStream.

Timeouts are separate and phase-named (connect, write, read, pool). The read timeout bounds
each read, never the whole exchange.

A request is never sent twice once the upstream may have received it (a resent POST is billed
twice). An idle connection is checked before reuse: if it is readable, the upstream has closed
it (or sent bytes nobody asked for) and another one is taken. The one retry left is for a
reused connection whose write fails, so that the whole request never left this host: it is
sent once more on a fresh connection. A connection cut after the request was written, before
any response byte, is an UpstreamProtocolError (502), never a resend.

``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` are read once, when the pool is created; a
proxied upstream is reached through a CONNECT tunnel (see ``connect_proxy``).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from ..config.settings import Settings, UpstreamURL
from ..errors import (
    StaleConnection,
    UpstreamConnectError,
    UpstreamPoolClosed,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..protocol.headers import Headers
from .connect_proxy import ProxyURL, check_proxies, environment_proxies, open_tunnel, proxy_for
from .connection import (
    Connection,
    Origin,
    UpstreamResponse,
    build_request,
    default_ssl_context,
    read_some,
)
from .http11 import HeadError, ResponseHead, parse_response_head
from .idle import close_nowait, stream_is_readable

log = logging.getLogger("trioproxy.upstream")

NOT_RESENT = "; the request was not resent (the upstream may have received it)"
SMALL_BODY = 64 * 1024  # bodies up to this size are sent in one write with the head


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What goes upstream: the provider's base URL, the target and the outbound head and body."""

    base: UpstreamURL
    target: bytes
    headers: Headers
    body: bytes


class UpstreamPool:
    """Owns every upstream connection. Close with ``aclose()`` (the app's lifespan does)."""

    def __init__(
        self, settings: Settings, ssl_context: ssl.SSLContext | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        """``proxies``: ``{"https": url, "http": url, "no": "host,.domain"}`` as returned by
        ``urllib.request.getproxies_environment()``, which is the default. Raises ConfigError
        for a proxy URL that cannot be used (e.g. ``https://``)."""
        self._settings = settings
        self._ssl_context = ssl_context
        self._proxies = environment_proxies() if proxies is None else dict(proxies)
        check_proxies(self._proxies)
        self._routes: dict[Origin, ProxyURL | None] = {}
        self._idle: dict[Origin, list[Connection]] = {}
        self._limits: dict[Origin, trio.Semaphore] = {}
        self.opened = 0  # statistics, handy in tests and logs
        self.reused = 0
        self.retried = 0
        self.discarded = 0  # idle connections the upstream had closed, found before reuse
        self._waits: dict[Origin, int] = {}  # requests that found every connection busy
        self._closed = False

    def statistics(self) -> dict[str, int]:
        idle = sum(len(v) for v in self._idle.values())
        return {"opened": self.opened, "reused": self.reused, "retried": self.retried,
                "discarded": self.discarded, "idle": idle}

    def origin_statistics(self) -> dict[str, dict[str, int]]:
        """Per origin (``scheme://host:port``): connections ``in_use`` and ``idle``, requests
        ``waiting`` now for a free one and ``waits`` (how many ever had to wait)."""
        out = {}
        for origin, sem in self._limits.items():
            scheme, host, port = origin
            out[f"{scheme}://{host}:{port}"] = {
                "in_use": self._settings.max_connections - sem.value,
                "idle": len(self._idle.get(origin, ())),
                "waiting": sem.statistics().tasks_waiting,
                "waits": self._waits.get(origin, 0),
            }
        return out

    async def aclose(self) -> None:
        """Close idle connections; from now on ``send_request`` raises UpstreamPoolClosed and
        connections given back by responses still being read are closed, not kept."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context for upstream connections (shared with the WebSocket leg)."""
        if self._ssl_context is None:
            self._ssl_context = default_ssl_context()
        return self._ssl_context

    def proxy_for(self, base: UpstreamURL) -> ProxyURL | None:
        """The proxy that ``base`` is reached through, or None for a direct connection."""
        origin = (base.scheme, base.host, base.port)
        if origin not in self._routes:
            proxy = self._routes[origin] = proxy_for(base, self._proxies)  # module helper
            if proxy is not None:
                log.info("upstream %s is reached through proxy %s", base, proxy)
        return self._routes[origin]

    async def open_stream(self, base: UpstreamURL) -> trio.abc.Stream:
        """TCP (through the proxy's CONNECT tunnel if one applies), then TLS for https.

        All of it within ``connect_timeout``. Raises UpstreamTimeout('connect') or
        UpstreamConnectError. Used by the pool and usable by the WebSocket leg.
        """
        timeout = self._settings.connect_timeout
        proxy = self.proxy_for(base)
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(timeout):
                if proxy is None:
                    stream = await trio.open_tcp_stream(base.host, base.port)
                else:
                    stream = await open_tunnel(proxy, base.host, base.port, timeout)
                if base.scheme == "https":
                    stream = trio.SSLStream(
                        stream, self.ssl_context, server_hostname=base.host, https_compatible=True
                    )
                    await stream.do_handshake()
        except BaseException as exc:
            if stream is not None:
                await trio.aclose_forcefully(stream)
            if isinstance(exc, trio.TooSlowError):
                raise UpstreamTimeout("connect", timeout) from None
            if isinstance(exc, OSError | trio.BrokenResourceError | ssl.SSLError):
                cause = exc.__cause__ if str(exc) == "" and exc.__cause__ else exc
                via = "" if proxy is None else f" through proxy {proxy}"
                raise UpstreamConnectError(f"cannot connect to {base}{via}: {cause}") from exc
            raise
        return stream

    async def _connect(self, base: UpstreamURL) -> Connection:
        stream = await self.open_stream(base)
        self.opened += 1
        return Connection(stream, (base.scheme, base.host, base.port))

    def _take_idle(self, origin: Origin) -> Connection | None:
        """The most recently used live idle connection; expired and dead ones are closed."""
        conns = self._idle.get(origin)
        now = trio.current_time()
        while conns:
            conn = conns.pop()
            if now - conn.idle_since >= self._settings.keepalive_expiry:
                close_nowait(conn.stream)
            elif stream_is_readable(conn.stream):
                log.debug("idle connection %d was closed by the upstream", conn.conn_id)
                self.discarded += 1
                close_nowait(conn.stream)
            else:
                return conn
        return None

    def _put_idle(self, conn: Connection) -> None:
        conn.idle_since = trio.current_time()
        self._idle.setdefault(conn.origin, []).append(conn)

    def _limit(self, origin: Origin) -> trio.Semaphore:
        sem = self._limits.get(origin)
        if sem is None:
            sem = self._limits[origin] = trio.Semaphore(self._settings.max_connections)
        return sem

    async def send_request(
        self, base: UpstreamURL, method: bytes, target: bytes, headers: Headers, body: bytes
    ) -> UpstreamResponse:
        """Send one request and return the response once its headers have arrived.

        The caller owns the response and must ``aclose()`` it (or use ``async with``): the
        connection then goes back to the pool if the body was read to the end and both sides
        allow keep-alive; otherwise it is closed, shielded, whatever the exit reason.
        """
        request = build_request(method, target, headers)  # the head, validated
        origin = (base.scheme, base.host, base.port)
        limit = self._limit(origin)
        self._check_open()
        try:
            limit.acquire_nowait()  # the common case: a free slot, no wait and no timer
        except trio.WouldBlock:
            await self._wait_for_slot(base, origin, limit)
        try:
            self._check_open()  # it may have closed while we waited for a slot
            response = await self._exchange(base, origin, request, body, method)
        except BaseException:
            limit.release()
            raise
        response._release = lambda conn: self._release(conn, limit)
        return response

    async def _wait_for_slot(self, base: UpstreamURL, origin: Origin,
                             limit: trio.Semaphore) -> None:
        """Every connection to ``origin`` is busy: wait at most ``pool_timeout`` for one."""
        self._waits[origin] = self._waits.get(origin, 0) + 1
        try:
            with trio.fail_after(self._settings.pool_timeout):
                await limit.acquire()
        except trio.TooSlowError:
            raise UpstreamTimeout(
                "pool", self._settings.pool_timeout,
                f": all {self._settings.max_connections} connections to {base} are busy "
                "(raise TRIOPROXY_MAX_CONNECTIONS)",
            ) from None

    def _check_open(self) -> None:
        if self._closed:
            raise UpstreamPoolClosed("the upstream connection pool is closed (shutting down)")

    async def _release(self, conn: Connection, limit: trio.Semaphore) -> None:
        try:
            if conn.keep and not self._closed:
                self._put_idle(conn)
            else:
                await conn.aclose()
        finally:
            limit.release()

    async def _exchange(
        self, base: UpstreamURL, origin: Origin, request: bytes, body: bytes, method: bytes
    ) -> UpstreamResponse:
        conn = self._take_idle(origin)
        if conn is not None:
            self.reused += 1
            try:
                return await self._send_and_read_head(conn, request, body, method)
            except StaleConnection as exc:  # the request cannot have reached the upstream
                log.info("keep-alive connection %d broke before the request was written (%s); "
                         "retrying once on a fresh connection", conn.conn_id, exc)
                self.retried += 1
            except BaseException:
                await conn.aclose()
                raise
            await conn.aclose()
        conn = await self._connect(base)
        try:
            return await self._send_and_read_head(conn, request, body, method)
        except BaseException:
            await conn.aclose()
            raise

    async def _send_and_read_head(
        self, conn: Connection, head: bytes, body: bytes, method: bytes
    ) -> UpstreamResponse:
        reused = conn.requests > 0
        conn.requests += 1
        write_timeout, read_timeout = self._settings.write_timeout, self._settings.read_timeout
        sent_at: float | None = None
        # One timer for both phases: moving its deadline costs less than a second cancel scope.
        with trio.move_on_after(write_timeout) as timer:
            try:  # a small body goes in the head's write; a large one is not copied
                await conn.stream.send_all(head + body if len(body) <= SMALL_BODY else head)
                if len(body) > SMALL_BODY:
                    await conn.stream.send_all(body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if reused:
                    raise StaleConnection(f"write failed: {exc!r}") from exc
                raise UpstreamProtocolError(
                    f"upstream closed while sending request: {exc!r}") from exc
            sent_at = trio.current_time()
            timer.deadline = sent_at + read_timeout  # the head's whole wait, from the write
            response = await self._read_head(conn, read_timeout, method)
            response.sent_at = sent_at
            return response
        if sent_at is None:
            raise UpstreamTimeout("write", write_timeout)
        raise UpstreamTimeout("read", read_timeout)

    async def _read_head(self, conn: Connection, timeout: float,
                         method: bytes) -> UpstreamResponse:
        """Read up to the response head (1xx heads skipped), within the caller's timer. Once
        the request is written nothing is retried: a connection cut before the response may
        still have delivered it."""
        buf, searched = bytearray(), 0
        while True:
            try:
                data = await read_some(conn, math.inf, timeout)
            except UpstreamProtocolError as exc:
                raise UpstreamProtocolError(
                    f"{exc.message} before responding{NOT_RESENT}") from exc
            if not data:
                raise UpstreamProtocolError(
                    f"upstream closed the connection before responding{NOT_RESENT}")
            buf += data
            while (parsed := _parse_head(buf, searched)) is not None:
                head, end = parsed
                if head.status >= 200:
                    return UpstreamResponse(conn, head, bytes(buf[end:]), timeout, method)
                del buf[:end]  # 1xx: informational, nothing to relay
                searched = 0
            searched = len(buf)


def _parse_head(buf: bytearray, searched: int) -> tuple[ResponseHead, int] | None:
    try:
        parsed = parse_response_head(buf, searched=searched)
    except HeadError as exc:
        raise UpstreamProtocolError(f"invalid upstream response: {exc}{NOT_RESENT}") from exc
    if parsed is not None and parsed[0].status == 101:
        raise UpstreamProtocolError(f"unexpected upstream response 101{NOT_RESENT}")
    if parsed is not None and parsed[0].conflicting_length:
        log.warning("upstream response has both Transfer-Encoding: chunked and Content-Length: "
                    "read as chunked, Content-Length removed, connection not reused")
    return parsed
