"""A lean fake LLM upstream for the bench: hand-rolled HTTP/1.1 on a bare epoll loop.

    python bench/upstream.py --port N

It must never be the bottleneck, so it has no framework at all: non-blocking sockets, one epoll
loop, a heap of timers, one ``send()`` per SSE event (chunked encoding), keep-alive. A trio
version of the same server cost ~55-95 µs of CPU per event on this machine, this one 23-43 µs
including the kernel's loopback work (``python bench/latency.py --calibrate`` reports it). It is deterministic: the same request
gives the same bytes, except the optional emit time stamps.

Endpoints
- ``POST /v1/messages`` (also ``/v1/chat/completions``, ``/v1/responses``: same Anthropic shape):
  if the JSON body has ``"stream": false`` a small Anthropic message JSON (Content-Length);
  otherwise an Anthropic-shaped SSE stream shaped by ``body["bench"]`` (query parameters of the
  same names override):
    events    number of ``content_block_delta`` events (default 64)
    interval  seconds before each delta (default 0.02)
    size      characters of text per delta (default 40)
    silences  [[k, seconds], ...]: pause this long after the k-th event sent (1 = after
              ``message_start``). The events are message_start, content_block_start, the deltas,
              content_block_stop, message_delta, message_stop.
    stamp     true (default): each event's JSON ends with ``"emit_ns": time.time_ns()``, taken
              right before the event is written to the socket
    hold      a group name: after message_start, wait for ``POST /bench/release?group=NAME``
              (at most ``hold_max`` seconds, default 120) before the rest of the stream
    id        a stream id; its outcome is recorded for ``GET /bench/stats``
  Events are scheduled on absolute times (start + offsets): a late wake-up does not shift the
  rest of the stream.
- ``GET /bench/stats``: counters, and the outcome of every stream that had an id ("complete",
  or "peer_gone" with when the peer closed and how many events had been sent).
- ``POST /bench/release?group=NAME``: releases held streams.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from itertools import count
from typing import Any
from urllib.parse import parse_qsl

MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"request-id: req_bench_%s\r\n"
    b"x-upstream: bench\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)

STATS: dict[str, Any] = {"requests": 0, "streams": 0, "complete": 0, "peer_gone": 0, "events": 0,
                         "connections": 0, "open_streams": 0}
OUTCOMES: dict[str, dict[str, Any]] = {}


# -- the stream content (pure) ----------------------------------------------------------------

def delta_text(seq: int, size: int) -> str:
    base = f"tok{seq:05d} "
    if size <= len(base):
        return base[:size]
    filler = "lorem ipsum dolor sit amet "
    return (base + filler * ((size - len(base)) // len(filler) + 1))[:size]


def build_events(sid: str, n: int, size: int) -> list[tuple[bytes, bytes]]:
    """(event name, JSON without its closing brace) for the whole stream."""
    msg = {
        "type": "message_start",
        "message": {
            "id": f"msg_bench_{sid}", "type": "message", "role": "assistant",
            "model": "claude-bench-1", "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1},
        },
    }
    ev = [(b"message_start", json.dumps(msg, separators=(",", ":")).encode()[:-1]),
          (b"content_block_start",
           b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}')]
    for i in range(n):
        text = json.dumps(delta_text(i, size)).encode()
        ev.append((b"content_block_delta",
                   b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%s}'
                   % text))
    ev.append((b"content_block_stop", b'{"type":"content_block_stop","index":0'))
    ev.append((b"message_delta",
               b'{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
               b'"usage":{"output_tokens":%d}' % (n + 1)))
    ev.append((b"message_stop", b'{"type":"message_stop"'))
    return ev


def frame(name: bytes, body: bytes, stamp: bool) -> bytes:
    if stamp:
        return b"event: %s\ndata: %s,\"emit_ns\":%d}\n\n" % (name, body, time.time_ns())
    return b"event: %s\ndata: %s}\n\n" % (name, body)


def stream_params(bench: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
    p = {
        "events": int(bench.get("events", 64)),
        "interval": float(bench.get("interval", 0.02)),
        "size": int(bench.get("size", 40)),
        "silences": {int(k): float(s) for k, s in bench.get("silences", [])},
        "stamp": bool(bench.get("stamp", True)),
        "hold": bench.get("hold"),
        "hold_max": float(bench.get("hold_max", 120.0)),
        "id": str(bench["id"]) if bench.get("id") is not None else None,
    }
    for k, v in query.items():
        if k in ("events", "size"):
            p[k] = int(v)
        elif k in ("interval", "hold_max"):
            p[k] = float(v)
        elif k == "stamp":
            p[k] = v.lower() in ("1", "true", "yes")
        elif k in ("hold", "id"):
            p[k] = v
    p["events"] = max(0, min(p["events"], 1_000_000))
    p["size"] = max(1, min(p["size"], 1_000_000))
    return p


def expected_body(bench: dict[str, Any]) -> bytes:
    """The decoded body of an unstamped stream with these parameters (for byte comparisons)."""
    p = stream_params({**bench, "stamp": False}, {})
    return b"".join(frame(n, b, False) for n, b in build_events(p["id"] or "x", p["events"], p["size"]))


def json_response(obj: Any, status: bytes = b"200 OK") -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"request-id: req_bench_json\r\n\r\n%s" % (status, len(body), body))


MESSAGE_JSON = json_response({
    "id": "msg_bench_json", "type": "message", "role": "assistant", "model": "claude-bench-1",
    "content": [{"type": "text", "text": "Hello from the bench upstream."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
              "output_tokens": 9},
})


# -- the event loop ---------------------------------------------------------------------------

class Server:
    def __init__(self, port: int) -> None:
        self.ep = select.epoll()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.timers: list[tuple[float, int, Stream, int]] = []
        self.seq = count()
        self.holds: dict[str, list[Stream]] = {}

    def at(self, when: float, stream: Stream) -> None:
        heapq.heappush(self.timers, (when, next(self.seq), stream, stream.gen))

    def run(self) -> None:
        timers = self.timers
        mono = time.monotonic
        while True:
            timeout = max(0.0, timers[0][0] - mono()) if timers else 1.0
            for fd, ev in self.ep.poll(min(timeout, 1.0)):
                if fd == self.lsock.fileno():
                    self.accept()
                    continue
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    conn.on_readable()
                if ev & select.EPOLLOUT and not conn.closed:
                    conn.on_writable()
            now = mono()
            while timers and timers[0][0] <= now:
                _, _, stream, gen = heapq.heappop(timers)
                if gen == stream.gen:
                    stream.step()

    def accept(self) -> None:
        for _ in range(256):
            try:
                sock, _addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                print(f"accept: {exc}", file=sys.stderr, flush=True)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock)
            self.conns[conn.fd] = conn
            self.ep.register(conn.fd, select.EPOLLIN)
            STATS["connections"] += 1


class Conn:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.busy: Stream | None = None  # the response in progress
        self.closed = False
        self.close_after = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.busy is not None:
            self.busy.gone()
        self.server.conns.pop(self.fd, None)
        try:
            self.server.ep.unregister(self.fd)
        except OSError:
            pass
        self.sock.close()

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.wbuf:
            self.wbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.wbuf += data[sent:]
            self.server.ep.modify(self.fd, select.EPOLLIN | select.EPOLLOUT)

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.wbuf[:sent]
        if not self.wbuf:
            self.server.ep.modify(self.fd, select.EPOLLIN)
            if self.close_after and self.busy is None:
                self.close()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.rbuf += data
        if len(self.rbuf) > MAX_HEAD + MAX_BODY:
            self.close()
            return
        self.next_request()

    def next_request(self) -> None:
        """Parse and dispatch as many complete requests as are buffered (one at a time)."""
        while self.busy is None and not self.closed:
            end = self.rbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.rbuf) > MAX_HEAD:
                    self.close()
                return
            head = bytes(self.rbuf[:end])
            lines = head.split(b"\r\n")
            try:
                method, target, _version = lines[0].split(b" ", 2)
            except ValueError:
                self.close()
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            if b"transfer-encoding" in headers:
                self.write(json_response({"error": "chunked request bodies unsupported"},
                                         b"411 Length Required"))
                self.close()
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            if len(self.rbuf) < end + 4 + length:
                return
            body = bytes(self.rbuf[end + 4:end + 4 + length])
            del self.rbuf[:end + 4 + length]
            STATS["requests"] += 1
            if headers.get(b"connection", b"").lower() == b"close":
                self.close_after = True
            self.dispatch(method, target, body)
            if self.close_after and self.busy is None and not self.wbuf:
                self.close()

    def dispatch(self, method: bytes, target: bytes, body: bytes) -> None:
        path, _, qs = target.partition(b"?")
        query = dict(parse_qsl(qs.decode("latin-1")))
        if path == b"/bench/stats":
            self.write(json_response({**STATS, "outcomes": OUTCOMES}))
        elif path == b"/bench/release":
            group = query.get("group", "")
            held = self.server.holds.pop(group, [])
            now = time.monotonic()
            for s in held:
                s.release(now)
            self.write(json_response({"released": group, "streams": len(held)}))
        elif method == b"POST" and path in (b"/v1/messages", b"/v1/chat/completions",
                                            b"/v1/responses"):
            try:
                req = json.loads(body) if body else {}
            except ValueError:
                req = {}
            if not isinstance(req, dict):
                req = {}
            if req.get("stream") is False or query.get("stream") == "false":
                self.write(MESSAGE_JSON)
            else:
                self.busy = Stream(self, stream_params(req.get("bench") or {}, query))
                self.busy.step()
        else:
            self.write(json_response({"type": "error", "error": {
                "type": "not_found_error", "message": "bench upstream: no such path"}},
                b"404 Not Found"))

    def response_done(self) -> None:
        self.busy = None
        if self.close_after:
            if not self.wbuf:
                self.close()
            return
        if self.rbuf:
            self.next_request()


class Stream:
    """One SSE response, advanced by timer callbacks."""

    def __init__(self, conn: Conn, p: dict[str, Any]) -> None:
        STATS["streams"] += 1
        STATS["open_streams"] += 1
        self.conn = conn
        self.p = p
        self.sid = p["id"] or str(STATS["streams"])
        self.events = build_events(self.sid, p["events"], p["size"])
        self.i = 0
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.at = self.t0
        self.done = False
        self.held = False
        self.gen = 0  # bumped to invalidate pending timers

    def step(self) -> None:
        if self.done:
            return
        if self.held:  # the hold_max timer fired first
            self.held = False
            held = self.conn.server.holds.get(str(self.p["hold"]), [])
            if self in held:
                held.remove(self)
            self.at = time.monotonic()
        conn = self.conn
        p = self.p
        n = p["events"]
        name, body = self.events[self.i]
        data = frame(name, body, p["stamp"])
        data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.i == 0:
            data = SSE_HEAD % self.sid.encode() + data
        self.i += 1
        STATS["events"] += 1
        if self.i == len(self.events):
            data += b"0\r\n\r\n"
        conn.write(data)
        if conn.closed:
            return  # gone() has run
        if self.i == len(self.events):
            self.finish("complete")
            conn.response_done()
            return
        if self.i == 1 and p["hold"] is not None:
            self.held = True
            self.conn.server.holds.setdefault(str(p["hold"]), []).append(self)
            self.conn.server.at(time.monotonic() + p["hold_max"], self)
            return
        pause = p["silences"].get(self.i)
        if pause:
            self.at += pause
        if 2 <= self.i < 2 + n:  # the next event is a delta
            self.at += p["interval"]
        self.conn.server.at(self.at, self)  # even when due: from the loop, not recursively

    def release(self, now: float) -> None:
        if self.held and not self.done:
            self.held = False
            self.gen += 1  # cancels the hold_max timer
            self.at = now
            self.conn.server.at(now, self)

    def finish(self, outcome: str) -> None:
        self.done = True
        STATS["open_streams"] -= 1
        STATS[outcome] += 1
        if self.p["id"] is not None:
            OUTCOMES[self.p["id"]] = {"outcome": outcome, "events_sent": self.i,
                                      "at": round(time.time() - self.wall0, 3)}

    def gone(self) -> None:
        if not self.done:
            self.finish("peer_gone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    server = Server(args.port)
    print(f"bench upstream on 127.0.0.1:{args.port} pid {os.getpid()}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
