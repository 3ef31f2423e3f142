"""The proxy spawned as users start it (``hypercorn trioproxy:app`` or ``trioproxy serve``) on
loopback, the client sockets it holds counted from the server process itself (/proc), the small
Messages request the HTTP semantics tests send, and raw reads of the answers."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h11
import trio

from trioproxy.testing import FakeUpstream

from .conftest import RawClient, RawResponse
from .test_server import HYPERCORN, _run_until_listening, _stop

TRIOPROXY = os.path.join(os.path.dirname(sys.executable), "trioproxy")
KEEP_ALIVE = 1  # seconds, for the spawned servers (Hypercorn's flag takes whole seconds)
PAST_KEEP_ALIVE = KEEP_ALIVE + 10  # how long an idle socket may outlive it, at most
ANTHROPIC = [("x-api-key", "sk-ant-test"), ("content-type", "application/json")]
MESSAGE = {"model": "claude-haiku-4-5", "max_tokens": 9, "messages": []}


# -- counting the server's client sockets from /proc --------------------------------------------


def _process_tree(root: int) -> set[int]:
    """``root`` and its descendants (Hypercorn serves from spawned worker processes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= found
        grew = bool(found)
    return tree


def open_client_sockets(server_pid: int, port: int) -> int:
    """TCP connections on ``port`` that the server's processes hold open (listener excluded)."""
    inodes: set[str] = set()
    for pid in _process_tree(server_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    with open(f"/proc/{server_pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] != "0A" and fields[9] in inodes:  # 0A: LISTEN
                count += 1
    return count


async def wait_open_sockets(pid: int, port: int, expected: int) -> int:
    """Poll until the server holds ``expected`` client sockets, for at most PAST_KEEP_ALIVE."""
    with trio.move_on_after(PAST_KEEP_ALIVE):
        while open_client_sockets(pid, port) != expected:
            await trio.sleep(0.1)
    return open_client_sockets(pid, port)


async def witness(port: int) -> trio.SocketStream:
    """A connection in the middle of a request: Hypercorn never times it out, so it must stay
    counted while the idle ones go (proof that the count sees the server's sockets)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n"
                          b"content-length: 10\r\n\r\n{\"a\"")
    return stream


class Closing:
    """Client sockets a test opened, all closed when it ends, whatever happened."""

    def __init__(self) -> None:
        self.streams: list[trio.SocketStream] = []

    def add(self, stream: trio.SocketStream) -> trio.SocketStream:
        self.streams.append(stream)
        return stream


@asynccontextmanager
async def closing() -> AsyncIterator[Closing]:
    held = Closing()
    try:
        yield held
    finally:
        with trio.CancelScope(shield=True):
            for stream in held.streams:
                await stream.aclose()


async def read_response(stream: trio.SocketStream) -> RawResponse:
    """The response on a connection whose request the test wrote by hand."""
    client = RawClient(stream)
    client.conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    with trio.fail_after(10):
        return await client.read_body(await client.read_head())


async def read_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (a reset after its response counts as closed)."""
    data = b""
    with trio.fail_after(PAST_KEEP_ALIVE):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


# -- spawned servers, as users start them --------------------------------------------------------


@dataclass
class Spawned:
    pid: int
    port: int


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    async for _ in stream:  # keep the server's log pipe from filling up and blocking it
        pass


@asynccontextmanager
async def spawned(kind: str, env: dict[str, str], *flags: str) -> AsyncIterator[Spawned]:
    """``hypercorn trioproxy:app --worker-class trio`` or ``trioproxy serve`` on 127.0.0.1:0."""
    if kind == "hypercorn":
        cmd = [HYPERCORN, "trioproxy:app", "--worker-class", "trio", "--bind", "127.0.0.1:0"]
    else:
        cmd = [TRIOPROXY, "serve", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--keep-alive", str(KEEP_ALIVE), "--graceful-timeout", "1", *flags]
    env = {**os.environ, "TRIOPROXY_ACCOUNTING": "false", **env}
    async with trio.open_nursery() as nursery:
        proc, url = await _run_until_listening(cmd, env, nursery)
        nursery.start_soon(_drain, proc.stderr)
        try:
            yield Spawned(proc.pid, int(url.rsplit(":", 1)[1]))
        finally:
            with trio.CancelScope(shield=True):
                await _stop(proc)


def upstream_env(upstream: FakeUpstream) -> dict[str, str]:
    return {"TRIOPROXY_ANTHROPIC_BASE_URL": upstream.url,
            "TRIOPROXY_OPENAI_BASE_URL": upstream.url}


async def post_message(client: RawClient, *, stream: bool, extra: list[tuple[str, str]] = ()):
    body = json.dumps({**MESSAGE, "stream": stream}).encode()
    return await client.request("POST", "/v1/messages", [*ANTHROPIC, *extra], body)
