"""The load generator: a raw HTTP/1.1 client on a bare epoll loop (keep-alive, one connection
per simulated user, hand-rolled response parser).

Why not trio + h11 or httpx: measured on this machine (``python bench/latency.py --calibrate``,
64-event streams, c=50/200, CPU of the client per event received; full run): httpx 186-364 µs,
trio + h11 64-91 µs, trio + this parser 51-74 µs (trio's per-wake-up cost dominates), this
epoll client 43-52 µs. The upstream and the load generator share one core, so the
cheapest client keeps the direct path far from saturation; the direct path at the same load
is reported as the proof.

Timing is wall-clock nanoseconds (``time.time_ns``), comparable with the upstream's ``emit_ns``
stamps (same machine, same clock). Everything is single-threaded and synchronous: a scenario
builds requests, then calls ``Engine.run`` with a stop condition and a hard deadline.
"""

from __future__ import annotations

import errno
import heapq
import http.client
import json
import re
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

HOST = "127.0.0.1"
EMIT_RE = re.compile(rb'"emit_ns":(\d+)')
KEEPALIVE_COMMENT = b": keepalive\n\n"


@dataclass
class StreamResult:
    """One request as the client saw it. Times are seconds relative to the request send."""

    label: str = ""
    status: int | None = None
    outcome: str = "error"  # complete | aborted | truncated | error
    reason: str = ""
    t_send_ns: int = 0
    ttfb: float | None = None  # first response byte (the status line)
    first_event: float | None = None  # first body byte
    t_end: float | None = None
    nbytes: int = 0
    max_gap: float = 0.0  # longest time without any byte, from the request being sent
    delays: list[float] = field(default_factory=list)  # per stamped event, seconds
    emits: list[int] | None = None  # emit_ns of each stamped event (Req.emits)
    events: int = 0
    emit_first_ns: int | None = None
    emit_last_ns: int | None = None
    body: bytes | None = None
    timeline: list[tuple[float, int]] | None = None  # (t, cumulative body bytes)
    headers: list[tuple[bytes, bytes]] | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()
                if k not in ("delays", "emits", "body", "headers")}


class RawParser:
    """A minimal incremental HTTP/1.1 response parser (status line, headers, chunked or
    Content-Length or until-close body, trailers). ``feed(data)`` returns the body payloads
    decoded from ``data``. About 5x cheaper than h11 per chunk, which keeps the load generator
    far from being the bottleneck."""

    __slots__ = ("buf", "state", "remaining", "status", "headers", "done", "keep_alive")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = 0  # 0 head, 1 chunk size, 2 chunk data, 3 chunk CRLF, 4 trailers, 5 length, 6 eof
        self.remaining = 0
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False
        self.keep_alive = True

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self.buf
        if self.state == 2 and not buf and len(data) <= self.remaining and data:
            # fast path: a piece of chunk data
            self.remaining -= len(data)
            if self.remaining == 0:
                self.state = 3
            return [data]
        buf += data
        while not self.done:
            st = self.state
            if st == 2:
                if not buf:
                    break
                take = min(self.remaining, len(buf))
                out.append(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = 3
            elif st == 1:
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(bytes(buf[:i]).split(b";", 1)[0], 16)
                del buf[:i + 2]
                if size == 0:
                    self.state = 4
                else:
                    self.remaining = size
                    self.state = 2
            elif st == 3:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("bad chunk terminator")
                del buf[:2]
                self.state = 1
            elif st == 0:
                if not self._head(buf):
                    break
            elif st == 4:
                if not self._trailer_line(buf):
                    break
            else:  # 5 Content-Length body, 6 until the connection closes
                if not buf:
                    break
                self._body_to_end(buf, out)
        return out

    # Once per response, outside the per-chunk path of ``feed``: the head, the end of a
    # Content-Length or until-close body, the trailers. Each returns False when it needs more.

    def _head(self, buf: bytearray) -> bool:
        """The status line and headers (a 1xx head is skipped); they decide the body framing."""
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return False
        lines = bytes(buf[:i]).split(b"\r\n")
        del buf[:i + 4]
        status = int(lines[0].split(b" ", 2)[1])
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers.append((k.strip().lower(), v.strip()))
        if 100 <= status < 200:
            return True
        self.status = status
        self.headers = headers
        hd = dict(headers)
        if hd.get(b"connection", b"").lower() == b"close":
            self.keep_alive = False
        if b"chunked" in hd.get(b"transfer-encoding", b"").lower():
            self.state = 1
        elif b"content-length" in hd:
            self.remaining = int(hd[b"content-length"])
            self.state = 5
            if self.remaining == 0:
                self.done = True
        elif status in (204, 304):
            self.done = True
        else:
            self.state = 6
            self.keep_alive = False
        return True

    def _body_to_end(self, buf: bytearray, out: list[bytes]) -> None:
        """A non-empty ``buf`` of a Content-Length body (state 5) or of one that runs until the
        connection closes (state 6) into ``out``."""
        if self.state == 6:
            out.append(bytes(buf))
            del buf[:]
            return
        take = min(self.remaining, len(buf))
        out.append(bytes(buf[:take]))
        del buf[:take]
        self.remaining -= take
        if self.remaining == 0:
            self.done = True

    def _trailer_line(self, buf: bytearray) -> bool:
        """One trailer line; the empty one ends the response."""
        i = buf.find(b"\r\n")
        if i < 0:
            return False
        empty = i == 0
        del buf[:i + 2]
        if empty:
            self.done = True
        return True

    def eof(self) -> bool:
        """The connection closed: True if that ends the body cleanly."""
        if self.state == 6:
            self.done = True
        return self.done


@dataclass
class Req:
    """A request for ``ClientConn.request``; ``on_done(result)`` is called exactly once."""

    method: str
    target: str
    body: bytes = b""
    on_done: Callable[[StreamResult], None] | None = None
    idle_timeout: float | None = None  # abort after this long without a byte (an SDK's timer)
    total_timeout: float | None = 120.0  # bench safety cap
    keep_body: bool = False
    timeline: bool = False
    stamps: bool = False
    emits: bool = False  # also keep each event's emit_ns (to select a steady-state window)
    on_first: Callable[[StreamResult], None] | None = None  # called at the first body byte
    label: str = ""
    headers: list[tuple[str, str]] | None = None


class Engine:
    """The epoll loop: timers, sockets, and a gate on how many new connections may be
    opening at once (connect until first response byte), so a burst of 2,000 streams does
    not overflow a server's listen backlog."""

    def __init__(self, max_opening: int = 64) -> None:
        self.ep = select.epoll()
        self.conns: dict[int, ClientConn] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = count()
        self.max_opening = max_opening
        self.opening = 0
        self.open_queue: deque[ClientConn] = deque()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(time.monotonic() + delay, fn)

    def run(self, until: Callable[[], bool], deadline: float,
            tick: Callable[[], None] | None = None, tick_every: float = 5.0) -> bool:
        """Run until ``until()`` is true or ``deadline`` (monotonic) passes. Returns until()."""
        timers = self.timers
        mono = time.monotonic
        next_tick = mono() + tick_every
        while not until():
            now = mono()
            if now >= deadline:
                return until()
            if tick is not None and now >= next_tick:
                next_tick = now + tick_every
                tick()
            timeout = min(deadline - now, 0.25, (timers[0][0] - now) if timers else 0.25)
            for fd, ev in self.ep.poll(max(0.0, timeout)):
                conn = self.conns.get(fd)
                if conn is not None:
                    conn.on_event(ev)
            now = mono()
            while timers and timers[0][0] <= now:
                _, _, fn = heapq.heappop(timers)
                fn()
        return True

    def _gate(self, conn: ClientConn) -> None:
        if self.opening < self.max_opening:
            self.opening += 1
            conn.gated = True
            conn.connect()
        else:
            self.open_queue.append(conn)

    def _ungate(self, conn: ClientConn) -> None:
        if conn.gated:
            conn.gated = False
            self.opening -= 1
            while self.open_queue and self.opening < self.max_opening:
                nxt = self.open_queue.popleft()
                if nxt.req is not None:
                    self.opening += 1
                    nxt.gated = True
                    nxt.connect()


class ClientConn:
    """One keep-alive HTTP/1.1 client connection driven by the engine."""

    def __init__(self, engine: Engine, port: int) -> None:
        self.engine = engine
        self.port = port
        self.sock: socket.socket | None = None
        self.fd = -1
        self.connected = False
        self.reusable = False
        self.gated = False
        self.req: Req | None = None
        self.r: StreamResult | None = None
        self.parser: RawParser | None = None
        self.out = b""
        self.parts: list[bytes] = []
        self.carry = b""
        self.last_ns = 0
        self.gen = 0  # invalidates timers of earlier requests

    # -- public ---------------------------------------------------------------------------

    def request(self, req: Req) -> None:
        assert self.req is None, "one request at a time per connection"
        self.gen += 1
        self.req = req
        r = self.r = StreamResult(label=req.label)
        if req.timeline:
            r.timeline = [(0.0, 0)]
        if req.emits:
            r.emits = []
        self.parser = RawParser()
        self.parts = []
        self.carry = b""
        hdrs = [("host", f"{HOST}:{self.port}"), ("content-type", "application/json"),
                ("content-length", str(len(req.body))), ("accept", "text/event-stream"),
                ("x-api-key", "sk-ant-bench"), ("anthropic-version", "2023-06-01")]
        if req.headers:
            hdrs += req.headers
        head = f"{req.method} {req.target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
        self.out = head.encode("latin-1") + b"\r\n" + req.body
        if self.sock is not None and self.reusable:
            self.reusable = False
            self._start_send()
        else:
            self.close()
            self.engine._gate(self)

    def close(self) -> None:
        if self.sock is not None:
            self.engine.conns.pop(self.fd, None)
            try:
                self.engine.ep.unregister(self.fd)
            except (OSError, ValueError):
                pass
            self.sock.close()
        self.sock = None
        self.fd = -1
        self.connected = False
        self.reusable = False

    # -- internals ------------------------------------------------------------------------

    def connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.engine.conns[self.fd] = self
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(f"connect failed: {errno.errorcode.get(err, err)}")
            return
        self.engine.ep.register(self.fd, select.EPOLLOUT)
        self.connected = False

    def _start_send(self) -> None:
        r = self.r
        now = time.time_ns()
        r.t_send_ns = self.last_ns = now
        req = self.req
        gen = self.gen
        mono = time.monotonic()
        if req.idle_timeout is not None:
            self.engine.call_at(mono + req.idle_timeout, lambda: self._idle_check(gen))
        if req.total_timeout is not None:
            self.engine.call_at(mono + req.total_timeout, lambda: self._total_check(gen))
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(f"send failed: {exc}")
            return
        self.out = self.out[sent:]
        self.engine.ep.modify(self.fd, select.EPOLLIN | (select.EPOLLOUT if self.out else 0))

    def on_event(self, ev: int) -> None:
        if not self.connected:
            if ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(f"connect failed: {errno.errorcode.get(err, err)}")
                    return
                self.connected = True
                self._start_send()
            return
        if ev & select.EPOLLOUT and self.out:
            self._flush()
            if self.sock is None:
                return
        if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
            self._readable()

    def _readable(self) -> None:
        """One ``recv``. The per-chunk path (timing, parsing, stamps) stays inline on purpose."""
        try:
            chunk = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            chunk = b""
            err = str(exc)
        else:
            err = ""
        r = self.r
        now = time.time_ns()
        if r is None or self.req is None:  # unsolicited bytes or close on an idle connection
            self.close()
            return
        if not chunk:
            self._closed(err, now)
            return
        t0 = r.t_send_ns
        gap = (now - self.last_ns) / 1e9
        if gap > r.max_gap:
            r.max_gap = gap
        self.last_ns = now
        if r.ttfb is None:
            r.ttfb = (now - t0) / 1e9
            self.engine._ungate(self)
        req = self.req
        try:
            payloads = self.parser.feed(chunk)
        except ValueError as exc:
            self._ended("truncated", f"bad response framing: {exc}", now)
            return
        for payload in payloads:
            if r.first_event is None:
                self._first_body_byte(now)
            r.nbytes += len(payload)
            if req.timeline:
                r.timeline.append(((now - t0) / 1e9, r.nbytes))
            if req.keep_body:
                self.parts.append(payload)
            if req.stamps:
                buf = self.carry + payload if self.carry else payload
                cut = buf.rfind(b"\n\n")
                if cut < 0:
                    self.carry = buf
                    continue
                self.carry = buf[cut + 2:]
                delays = r.delays
                emits = r.emits
                for m in EMIT_RE.finditer(buf, 0, cut):
                    emit = int(m.group(1))
                    delays.append((now - emit) / 1e9)
                    if emits is not None:
                        emits.append(emit)
                    if r.emit_first_ns is None:
                        r.emit_first_ns = emit
                    r.emit_last_ns = emit
        if self.parser.done:
            self._complete(reuse=self.parser.keep_alive)

    def _first_body_byte(self, now: int) -> None:
        r = self.r
        r.first_event = (now - r.t_send_ns) / 1e9
        if self.req.on_first is not None:
            self.req.on_first(r)

    def _closed(self, err: str, now: int) -> None:
        """The server closed the connection (or ``recv`` failed with ``err``) at ``now``: the
        end of an until-close body, else a truncated (or, before any head, failed) response."""
        parser = self.parser
        if parser.eof():
            self._complete(reuse=False)
            return
        self._ended("truncated" if parser.status is not None else "error",
                    err or "server closed the connection before the end of the body", now)

    def _ended(self, outcome: str, reason: str, now: int) -> None:
        """The response ended early at ``now``; the connection is not reused."""
        r = self.r
        r.outcome = outcome
        r.reason = reason
        r.t_end = (now - r.t_send_ns) / 1e9
        self._finish(reuse=False)

    def _complete(self, reuse: bool) -> None:
        r = self.r
        r.outcome = "complete"
        r.t_end = (self.last_ns - r.t_send_ns) / 1e9
        self._finish(reuse)

    def _abort(self, reason: str) -> None:
        r = self.r
        now = time.time_ns()
        r.outcome = "aborted"
        r.reason = reason
        r.t_end = (now - r.t_send_ns) / 1e9
        r.max_gap = max(r.max_gap, (now - self.last_ns) / 1e9)
        self._finish(reuse=False)

    def _idle_check(self, gen: int) -> None:
        if gen != self.gen or self.req is None:
            return
        idle = self.req.idle_timeout
        since = (time.time_ns() - self.last_ns) / 1e9
        if since >= idle - 1e-3:
            self._abort(f"client idle timeout ({idle:g} s without a byte)")
        else:
            self.engine.call_later(idle - since, lambda: self._idle_check(gen))

    def _total_check(self, gen: int) -> None:
        if gen == self.gen and self.req is not None:
            self._abort(f"bench safety cap ({self.req.total_timeout:g} s total)")

    def _fail(self, reason: str) -> None:
        r = self.r
        if r is not None:
            r.outcome = "error"
            r.reason = reason
        self._finish(reuse=False)

    def _finish(self, reuse: bool) -> None:
        r, req = self.r, self.req
        self.engine._ungate(self)
        self.gen += 1
        self.req = None
        self.r = None
        if r is None or req is None:
            self.close()
            return
        if self.parser is not None:
            r.status = self.parser.status
            r.headers = self.parser.headers
        r.events = len(r.delays)
        if req.keep_body:
            r.body = b"".join(self.parts)
        self.parts = []
        if reuse:
            self.reusable = True
        else:
            self.close()
        if req.on_done is not None:
            req.on_done(r)


# -- load shapes --------------------------------------------------------------------------------

def closed_loop(
    engine: Engine, port: int, concurrency: int, duration: float,
    make_req: Callable[[int, int], Req], *, stagger: float = 0.0,
    max_requests_per_user: int = 100_000, grace: float = 130.0,
    tick: Callable[[list[StreamResult]], None] | None = None, tick_every: float = 5.0,
) -> tuple[list[StreamResult], float]:
    """``concurrency`` users, each on its own keep-alive connection, sending back-to-back
    requests (``make_req(user, k)``) until ``duration`` has passed after its start (a request
    in flight then completes). Bounded by request count and by ``grace`` seconds after the
    end. Returns (results, wall seconds)."""
    results: list[StreamResult] = []
    t0 = time.monotonic()
    stop_at = t0 + stagger + duration
    done = [0]

    def user(i: int) -> None:
        conn = ClientConn(engine, port)
        k = [0]

        def next_request(r: StreamResult | None = None) -> None:
            if r is not None:
                results.append(r)
            if time.monotonic() >= stop_at or k[0] >= max_requests_per_user:
                conn.close()
                done[0] += 1
                return
            req = make_req(i, k[0])
            req.on_done = next_request
            k[0] += 1
            conn.request(req)

        next_request()

    for i in range(concurrency):
        engine.call_at(t0 + stagger * i / max(1, concurrency), lambda i=i: user(i))
    engine.run(lambda: done[0] == concurrency, stop_at + grace,
               tick=(lambda: tick(results)) if tick else None, tick_every=tick_every)
    return results, time.monotonic() - t0


def parallel(engine: Engine, ports: int | list[int], reqs: list[Req], *,
             starts: list[float] | None = None, deadline: float,
             tick: Callable[[list[StreamResult]], None] | None = None,
             tick_every: float = 5.0, conns: list[ClientConn] | None = None) -> list[StreamResult]:
    """One connection per request (``conns[i]`` if given, kept alive for the caller's next
    call; else a fresh one to ``ports[i]`` or to the one port), started at ``starts[i]``
    seconds from now (all at once by default); runs until all are done or the deadline.
    Results in request order."""
    results: list[StreamResult | None] = [None] * len(reqs)
    t0 = time.monotonic()
    done = [0]

    def launch(i: int) -> None:
        req = reqs[i]
        user_cb = req.on_done

        def finished(r: StreamResult) -> None:
            results[i] = r
            done[0] += 1
            if user_cb:
                user_cb(r)

        req.on_done = finished
        conn = conns[i] if conns is not None else ClientConn(
            engine, ports if isinstance(ports, int) else ports[i])
        conn.request(req)

    for i in range(len(reqs)):
        if starts is None:
            launch(i)
        else:
            engine.call_at(t0 + starts[i], lambda i=i: launch(i))
    engine.run(lambda: done[0] == len(reqs), deadline,
               tick=(lambda: tick([r for r in results if r is not None])) if tick else None,
               tick_every=tick_every)
    return [r if r is not None else StreamResult(outcome="error", reason="not finished by the deadline")
            for r in results]


def burst(engine: Engine, conns: list[ClientConn], make_req: Callable[[int], Req], *,
          deadline: float) -> tuple[list[StreamResult], float]:
    """Synchronised arrivals: one request on every connection in ``conns``, all released at the
    same instant -- a barrier in the load generator: every request is written from one callback
    of the loop, back to back, before any response byte is read. Kept-alive connections go out
    at once (one non-blocking ``send()`` each); new ones still pass the opening gate. Returns
    (results in connection order, release spread in seconds: last send minus first send)."""
    results: list[StreamResult | None] = [None] * len(conns)
    done = [0]

    def release() -> None:
        for i, conn in enumerate(conns):
            req = make_req(i)

            def finished(r: StreamResult, i: int = i) -> None:
                results[i] = r
                done[0] += 1

            req.on_done = finished
            conn.request(req)

    engine.call_at(time.monotonic(), release)
    engine.run(lambda: done[0] == len(conns), deadline)
    out = [r if r is not None else StreamResult(outcome="error", reason="not finished by the deadline")
           for r in results]
    sends = [r.t_send_ns for r in out if r.t_send_ns]
    return out, ((max(sends) - min(sends)) / 1e9 if sends else 0.0)


# -- bodies and control requests ------------------------------------------------------------------

def stream_body(**bench: Any) -> bytes:
    """A small Anthropic Messages request whose ``bench`` key shapes the upstream stream."""
    return json.dumps({
        "model": "claude-bench-1", "max_tokens": 1024, "stream": True,
        "messages": [{"role": "user", "content": "Say hello to the bench."}],
        "bench": bench,
    }).encode()


JSON_BODY = json.dumps({
    "model": "claude-bench-1", "max_tokens": 64, "stream": False,
    "messages": [{"role": "user", "content": "hi"}],
}).encode()


def control(port: int, method: str, target: str, timeout: float = 10.0) -> Any:
    """A blocking JSON request to the upstream's /bench/... endpoints."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, target, body=b"" if method == "POST" else None)
        return json.loads(conn.getresponse().read() or b"null")
    finally:
        conn.close()
