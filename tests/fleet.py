"""Helpers for the fleet tests: several `trioproxy serve` instances behind a real HAProxy or
nginx (the configurations in ``contrib/``), one origin for all three fake APIs, traffic
clients that count what a user would notice."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import trio
import trio_websocket as tws

from trioproxy.testing import RecordedRequest, Reply, anthropic_sse, default_reply

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
KEY = "sk-ant-fleet-test"
MESSAGES = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
CHAT = json.dumps({"model": "gpt-4o-mini",
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
CREATE = json.dumps({"type": "response.create", "model": "gpt-5-codex", "input": [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_streams(gap: float, chunks: int = 8) -> Callable[[RecordedRequest], Reply]:
    """Streamed Messages requests get ``chunks`` deltas ``gap`` seconds apart; the rest the
    fake's default reply."""
    def reply(req: RecordedRequest) -> Reply:
        body = json.loads(req.body or b"{}")
        if req.path.endswith("/v1/messages") and body.get("stream"):
            return anthropic_sse([f"w{i} " for i in range(chunks)], gaps=gap)
        return default_reply(req)
    return reply


# -- processes ------------------------------------------------------------------------------


class Process:
    """A server process in its own process group; stderr collected while it runs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stderr = b""
        self.proc: trio.Process | None = None

    async def start(self, nursery: trio.Nursery, cmd: list[str], env: dict[str, str] | None = None,
                    stdout: int = subprocess.DEVNULL) -> None:
        self.stderr = b""
        self.proc = await nursery.start(partial(
            trio.run_process, cmd, env=env, stdout=stdout, stderr=subprocess.PIPE, check=False,
            start_new_session=True))
        nursery.start_soon(self._collect, self.proc)

    async def _collect(self, proc: trio.Process) -> None:
        async for chunk in proc.stderr:
            self.stderr += chunk

    async def wait_for(self, pattern: bytes, count: int = 1, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while len(re.findall(pattern, self.stderr)) < count:
                assert self.proc.returncode is None, f"{self.name} exited:\n{self.text}"
                await trio.sleep(0.05)

    @property
    def text(self) -> str:
        return self.stderr.decode(errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        if self.proc is not None:
            self.signal_group(signal.SIGKILL)
            with trio.move_on_after(10):
                await self.proc.wait()


@dataclass
class Instance(Process):
    """One `trioproxy serve` on a fixed port (a restart binds the same one)."""

    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 2
    logs: list[str] = field(default_factory=list)  # stderr of earlier runs

    def __post_init__(self) -> None:
        super().__init__(f"instance :{self.port}")

    async def launch(self, nursery: trio.Nursery) -> None:
        if self.stderr:
            self.logs.append(self.text)
        await self.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port",
                                   str(self.port), "--workers", str(self.workers)], self.env)
        await self.wait_for(rb"trioproxy ready", self.workers, timeout=30)

    def all_logs(self) -> str:
        return "".join(self.logs) + self.text


class HAProxy(Process):
    """contrib/haproxy.cfg with this test's ports, paths and check timings, master-worker."""

    def __init__(self, tmp: Path, front: int, ports: list[int], inter: str = "100ms") -> None:
        super().__init__("haproxy")
        self.socket = tmp / "haproxy.sock"
        self.state = tmp / "haproxy.state"
        self.config = tmp / "haproxy.cfg"
        text = (ROOT / "contrib" / "haproxy.cfg").read_text()
        swaps = [("bind 127.0.0.1:8080", f"bind 127.0.0.1:{front}"),
                 ("maxconn 20000 ", "maxconn 4000 "),  # this machine's fd limit is 20,000
                 ("stats socket /run/haproxy/trioproxy.sock", f"stats socket {self.socket}"),
                 ("server-state-file /var/lib/haproxy/trioproxy.state",
                  f"server-state-file {self.state}"),
                 ("check inter 2s fall 3 rise 2", f"check inter {inter} fall 2 rise 2")]
        swaps += [(f"127.0.0.1:{8081 + i}", f"127.0.0.1:{p}") for i, p in enumerate(ports)]
        for old, new in swaps:
            assert text.count(old) == 1, f"contrib/haproxy.cfg changed: {old!r}"
            text = text.replace(old, new)
        self.config.write_text(text)

    async def launch(self, nursery: trio.Nursery) -> None:
        await self.start(nursery, ["haproxy", "-W", "-db", "-f", str(self.config)])
        with trio.fail_after(20):
            while not self.socket.exists():
                assert self.proc.returncode is None, self.text
                await trio.sleep(0.05)

    async def command(self, line: str) -> str:
        stream = await trio.open_unix_socket(str(self.socket))
        async with stream:
            await stream.send_all(line.encode() + b"\n")
            out = b""
            async for data in stream:
                out += data
        return out.decode()

    async def states(self) -> dict[str, str]:
        """Server name -> UP / DOWN / ... as this HAProxy's current process sees it."""
        text = await self.command("show stat")
        head, *rows = [r.split(",") for r in text.strip().splitlines()]
        col = {name.lstrip("# "): i for i, name in enumerate(head)}
        return {r[col["svname"]]: r[col["status"]] for r in rows
                if r[col["pxname"]] == "trioproxy" and r[col["svname"]] != "BACKEND"}

    async def wait_state(self, server: str, want: str, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while True:
                with contextlib.suppress(OSError):
                    if (await self.states()).get(server, "").startswith(want):
                        return
                await trio.sleep(0.05)

    async def reload(self) -> None:
        """Save the servers' health states, then reload (SIGUSR2 to the master)."""
        self.state.write_text(await self.command("show servers state"))
        self.proc.send_signal(signal.SIGUSR2)


class Nginx(Process):
    """contrib/nginx.conf with this test's ports and paths."""

    def __init__(self, tmp: Path, front: int, ports: list[int]) -> None:
        super().__init__("nginx")
        self.prefix = tmp
        self.config = tmp / "nginx.conf"
        text = (ROOT / "contrib" / "nginx.conf").read_text()
        swaps = [("listen 127.0.0.1:8080", f"listen 127.0.0.1:{front}"),
                 ("/run/nginx-trioproxy.pid", str(tmp / "nginx.pid"))]
        servers = re.findall(r"[ \t]*server 127\.0\.0\.1:808[1-3] [^;]*;\n", text)
        assert len(servers) == 3, "contrib/nginx.conf changed"
        text = text.replace("".join(servers), "".join(
            servers[0].replace("8081", str(p)) for p in ports))
        for old, new in swaps:
            assert text.count(old) == 1, f"contrib/nginx.conf changed: {old!r}"
            text = text.replace(old, new)
        self.config.write_text(text)

    async def launch(self, nursery: trio.Nursery, front: int) -> None:
        await self.start(nursery, ["nginx", "-p", str(self.prefix), "-c", str(self.config),
                                   "-g", "daemon off;"])
        with trio.fail_after(20):
            while True:
                assert self.proc.returncode is None, self.text
                with contextlib.suppress(OSError):
                    await (await trio.open_tcp_stream("127.0.0.1", front)).aclose()
                    return
                await trio.sleep(0.05)


# -- clients --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw."""

    streams: int = 0  # complete streams (message_stop seen)
    buffered: int = 0  # 200 answers to buffered requests
    ws_responses: int = 0  # Responses WebSocket responses completed
    ws_closes: list[tuple[float, int | None]] = field(default_factory=list)  # (time, code)
    request_ids: list[str] = field(default_factory=list)  # x-trioproxy-request-id seen
    failures: list[str] = field(default_factory=list)


async def stream_client(url: str, tally: Tally, stop: trio.Event) -> None:
    """Streamed Messages requests, one after the other, until ``stop``."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            try:
                async with client.stream("POST", url + "/v1/messages", headers=headers,
                                         content=MESSAGES) as resp:
                    body = b"".join([c async for c in resp.aiter_bytes()])
            except httpx.HTTPError as exc:
                tally.failures.append(f"stream: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code != 200 or b"message_stop" not in body:
                tally.failures.append(f"stream: {resp.status_code} {body[-200:]!r}")
                continue
            tally.streams += 1
            tally.request_ids.append(resp.headers["x-trioproxy-request-id"])


async def buffered_client(url: str, tally: Tally, stop: trio.Event) -> None:
    headers = {"authorization": "Bearer sk-fleet-test"}
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            try:
                resp = await client.post(url + "/v1/chat/completions", headers=headers,
                                         content=CHAT)
            except httpx.HTTPError as exc:
                tally.failures.append(f"buffered: {type(exc).__name__}: {exc}")
                continue
            if resp.status_code != 200 or not resp.json().get("choices"):
                tally.failures.append(f"buffered: {resp.status_code} {resp.text[:200]}")
                continue
            tally.buffered += 1
            tally.request_ids.append(resp.headers["x-trioproxy-request-id"])
            await trio.sleep(0.1)


async def ws_client(port: int, tally: Tally, stop: trio.Event) -> None:
    """A Codex-like session: one socket, a response.create after another; when the proxy
    closes it (1012 while draining) it reconnects, as Codex does."""
    headers = [(b"authorization", b"Bearer sk-fleet-test"),
               (b"openai-beta", b"responses_websockets=2026-02-06")]
    while not stop.is_set():
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            tally.failures.append(f"websocket connect: {exc}")
            await trio.sleep(0.2)
            continue
        try:
            async with trio.open_nursery() as nursery:
                ws = await tws.wrap_client_stream(nursery, stream, f"127.0.0.1:{port}",
                                                  "/v1/responses", extra_headers=headers,
                                                  max_message_size=1 << 24)
                try:
                    await _ws_turns(ws, tally, stop)
                finally:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        except* tws.ConnectionClosed as group:
            for exc in group.exceptions:
                code = exc.reason.code if exc.reason else None  # type: ignore[attr-defined]
                tally.ws_closes.append((trio.current_time(), code))
                if code != 1012:
                    tally.failures.append(f"websocket closed: {exc}")
        except* (tws.HandshakeError, OSError, trio.BrokenResourceError) as group:
            tally.failures.extend(f"websocket: {exc!r}" for exc in group.exceptions)
            await trio.sleep(0.2)
        finally:
            await trio.aclose_forcefully(stream)


async def _ws_turns(ws: tws.WebSocketConnection, tally: Tally, stop: trio.Event) -> None:
    while not stop.is_set():
        await ws.send_message(CREATE)
        while (event := json.loads(await ws.get_message()))["type"] not in (
                "response.completed", "response.failed", "response.incomplete", "error"):
            pass
        if event["type"] != "response.completed":
            tally.failures.append(f"websocket: {event}")
        else:
            tally.ws_responses += 1
        await trio.sleep(0.2)
