"""Alternative load-generator clients, used only by ``latency.py --calibrate`` to measure
which client is cheapest: trio + the bench's raw parser, trio + h11, and httpx on trio.
The scenarios themselves use the epoll client in loadgen.py."""

from __future__ import annotations

import time

import h11
import trio

from loadgen import EMIT_RE, HOST, RawParser, StreamResult


class H11Parser:
    """The same interface on h11 (used to compare the cost of the two clients)."""

    def __init__(self, conn: h11.Connection) -> None:
        self.h = conn
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False
        self.keep_alive = True

    def feed(self, data: bytes) -> list[bytes]:
        h = self.h
        h.receive_data(data)
        out = []
        while True:
            event = h.next_event()
            et = type(event)
            if et is h11.Data:
                out.append(event.data)
            elif et is h11.Response:
                self.status = event.status_code
                self.headers = list(event.headers)
            elif et is h11.EndOfMessage:
                self.done = True
                self.keep_alive = h.their_state is h11.DONE and h.our_state is h11.DONE
                return out
            elif event is h11.NEED_DATA or et is h11.ConnectionClosed:
                return out
            elif event is h11.PAUSED:
                return out

    def eof(self) -> bool:
        self.h.receive_data(b"")
        try:
            while True:
                event = self.h.next_event()
                if type(event) is h11.EndOfMessage:
                    self.done = True
                if event is h11.NEED_DATA or event is h11.PAUSED or type(event) is h11.ConnectionClosed:
                    break
        except h11.RemoteProtocolError:
            pass
        return self.done


class Conn:
    """One keep-alive HTTP/1.1 connection. ``impl``: "raw" (default) or "h11"."""

    def __init__(self, port: int, impl: str = "raw") -> None:
        self.port = port
        self.impl = impl
        self.stream: trio.SocketStream | None = None
        self.h11: h11.Connection | None = None
        self.reusable = False

    async def aclose(self) -> None:
        if self.stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        self.stream = None
        self.h11 = None
        self.reusable = False

    async def _ensure(self) -> trio.SocketStream:
        if self.stream is not None and self.reusable:
            if self.h11 is not None and self.h11.our_state is h11.DONE:
                self.h11.start_next_cycle()
            self.reusable = False
            return self.stream
        await self.aclose()
        self.stream = await trio.open_tcp_stream(HOST, self.port)
        if self.impl == "h11":
            self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        return self.stream

    def _encode(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        if self.h11 is not None:
            h = self.h11
            data = h.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += h.send(h11.Data(data=body))
            return data + h.send(h11.EndOfMessage())
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        return head.encode("latin-1") + b"\r\n" + body

    async def request(
        self, method: str, target: str, body: bytes = b"", *,
        headers: list[tuple[str, str]] | None = None, idle_timeout: float | None = None,
        total_timeout: float | None = None, keep_body: bool = False, timeline: bool = False,
        stamps: bool = False, label: str = "",
    ) -> StreamResult:
        """Send one request and read the whole response, recording what the client saw.

        ``idle_timeout``: abort (close the connection) after this long without a byte, like an
        SDK's stream idle timeout.  ``total_timeout``: a safety cap on the whole request.
        ``stamps``: per-event delay from the ``emit_ns`` stamps.
        """
        r = StreamResult(label=label)
        parts: list[bytes] = []
        if timeline:
            r.timeline = [(0.0, 0)]
        hdrs = self._headers(body, headers)
        try:
            stream = await self._ensure()
        except OSError as exc:
            r.reason = f"connect failed: {exc}"
            return r
        parser: RawParser | H11Parser = H11Parser(self.h11) if self.h11 is not None else RawParser()
        data = self._encode(method, target, hdrs, body)
        last = await self._exchange(stream, data, parser, r, parts, idle_timeout=idle_timeout,
                                    total_timeout=total_timeout, keep_body=keep_body,
                                    timeline=timeline, stamps=stamps)
        r.status = parser.status
        r.headers = parser.headers
        if parser.done:
            r.outcome = "complete"
            r.t_end = (last - r.t_send_ns) / 1e9
            self.reusable = parser.keep_alive
        if not self.reusable:
            await self.aclose()
        r.events = len(r.delays)
        if keep_body:
            r.body = b"".join(parts)
        return r

    def _headers(self, body: bytes, extra: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
        hdrs = [("host", f"{HOST}:{self.port}"), ("content-type", "application/json"),
                ("content-length", str(len(body))), ("accept", "text/event-stream"),
                ("x-api-key", "sk-ant-bench"), ("anthropic-version", "2023-06-01")]
        if extra:
            hdrs += extra
        return hdrs

    async def _exchange(
        self, stream: trio.SocketStream, data: bytes, parser: RawParser | H11Parser,
        r: StreamResult, parts: list[bytes], *, idle_timeout: float | None,
        total_timeout: float | None, keep_body: bool, timeline: bool, stamps: bool,
    ) -> int:
        """Send ``data`` and read until the body ends, the server closes, a timeout fires or the
        connection fails, filling ``r`` and ``parts``. Returns when the last byte came (ns)."""
        r.t_send_ns = t0 = last = time.time_ns()
        carry = b""
        delays = r.delays
        finditer = EMIT_RE.finditer
        with trio.move_on_after(total_timeout if total_timeout else float("inf")) as total_cs:
            try:
                await stream.send_all(data)
                while not parser.done:
                    if idle_timeout is not None:
                        with trio.move_on_after(idle_timeout) as idle_cs:
                            chunk = await stream.receive_some(65536)
                        if idle_cs.cancelled_caught:
                            _abort(r, f"client idle timeout ({idle_timeout:g} s without a byte)", last)
                            break
                    else:
                        chunk = await stream.receive_some(65536)
                    now = time.time_ns()
                    if not chunk:
                        _closed(r, parser, now)
                        break
                    gap = (now - last) / 1e9
                    if gap > r.max_gap:
                        r.max_gap = gap
                    last = now
                    if r.ttfb is None:
                        r.ttfb = (now - t0) / 1e9
                    for payload in parser.feed(chunk):
                        if r.first_event is None:
                            r.first_event = (now - t0) / 1e9
                        r.nbytes += len(payload)
                        if timeline:
                            r.timeline.append(((now - t0) / 1e9, r.nbytes))
                        if keep_body:
                            parts.append(payload)
                        if stamps:
                            buf = carry + payload if carry else payload
                            cut = buf.rfind(b"\n\n")
                            if cut < 0:
                                carry = buf
                                continue
                            carry = buf[cut + 2:]
                            for m in finditer(buf, 0, cut):
                                emit = int(m.group(1))
                                delays.append((now - emit) / 1e9)
                                if r.emit_first_ns is None:
                                    r.emit_first_ns = emit
                                r.emit_last_ns = emit
            except (h11.RemoteProtocolError, ValueError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError) as exc:
                _failed(r, parser, exc)
        if total_cs.cancelled_caught:
            _abort(r, f"bench safety cap ({total_timeout:g} s total)", last)
        return last


def _abort(r: StreamResult, reason: str, last: int) -> None:
    """The client gave up (idle timeout or safety cap); ``last``: when the last byte came."""
    now = time.time_ns()
    r.outcome = "aborted"
    r.reason = reason
    r.t_end = (now - r.t_send_ns) / 1e9
    r.max_gap = max(r.max_gap, (now - last) / 1e9)


def _failed(r: StreamResult, parser: RawParser | H11Parser, exc: Exception) -> None:
    r.outcome = "truncated" if parser.status is not None else "error"
    r.reason = f"{type(exc).__name__}: {exc}"
    r.t_end = (time.time_ns() - r.t_send_ns) / 1e9


def _closed(r: StreamResult, parser: RawParser | H11Parser, now: int) -> None:
    """The server closed the connection: fine if that ends the body, else truncated."""
    if not parser.eof():
        r.outcome = "truncated" if parser.status is not None else "error"
        r.reason = "server closed the connection before the end of the body"
        r.t_end = (now - r.t_send_ns) / 1e9


async def trio_loop(port: int, concurrency: int, duration: float, body: bytes, impl: str,
                    stagger: float = 0.0) -> tuple[list[StreamResult], float]:
    """Closed loop of ``concurrency`` users for ``duration`` seconds on trio (raw or h11)."""
    results: list[StreamResult] = []
    t_start = trio.current_time()
    stop_at = t_start + stagger + duration

    async def user(i: int) -> None:
        await trio.sleep(stagger * i / max(1, concurrency))
        conn = Conn(port, impl)
        try:
            for _ in range(100_000):
                if trio.current_time() >= stop_at:
                    break
                results.append(await conn.request("POST", "/v1/messages", body, stamps=True,
                                                  total_timeout=60.0))
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(user, i)
    return results, trio.current_time() - t_start


async def httpx_loop(
    port: int, concurrency: int, duration: float, body: bytes, stagger: float = 0.0,
) -> tuple[int, int, float]:
    """The same closed loop with httpx (for the load-generator cost comparison only).
    Returns (requests, stamped events seen, wall seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=concurrency + 10)
    counts = [0, 0]
    delays: list[float] = []
    t_start = trio.current_time()
    stop_at = t_start + stagger + duration
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", limits=limits,
                                 timeout=httpx.Timeout(60.0)) as client:
        async def user(i: int) -> None:
            await trio.sleep(stagger * i / max(1, concurrency))
            for _ in range(100_000):
                if trio.current_time() >= stop_at:
                    break
                carry = b""
                async with client.stream("POST", "/v1/messages", content=body,
                                         headers={"content-type": "application/json"}) as resp:
                    async for part in resp.aiter_raw():
                        now = time.time_ns()
                        buf = carry + part
                        cut = buf.rfind(b"\n\n")
                        if cut < 0:
                            carry = buf
                            continue
                        carry = buf[cut + 2:]
                        for m in EMIT_RE.finditer(buf, 0, cut):
                            delays.append((now - int(m.group(1))) / 1e9)
                            counts[1] += 1
                counts[0] += 1

        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(user, i)
    return counts[0], counts[1], trio.current_time() - t_start
