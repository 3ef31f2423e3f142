"""Capacity defaults: the open-files limit is raised at start and reported, a limit too low
for the configured connections is warned about, and the upstream pool does not queue long
agent streams behind a small per-origin cap."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from functools import partial

import pytest
import trio

from trioproxy import Settings
from trioproxy.limits import FDS_PER_STREAM, RESERVED_FDS, streams_allowed
from trioproxy.testing import FakeUpstream, anthropic_sse

from .conftest import RawClient, proxy_settings, start_proxy

BIN = os.path.dirname(sys.executable)
# Starts a command with the open-files soft limit (and optionally the hard limit) lowered,
# the way a login shell or a service manager may start trioproxy.
LAUNCH = ("import os, resource, sys; soft, hard = int(sys.argv[1]), int(sys.argv[2]); "
          "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard if hard else "
          "resource.getrlimit(resource.RLIMIT_NOFILE)[1])); os.execv(sys.argv[3], sys.argv[3:])")
MESSAGES = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class Server:
    """A server process in its own process group; stderr collected; the whole group stopped."""

    def __init__(self) -> None:
        self.stderr = b""
        self.proc: trio.Process | None = None

    async def start(self, nursery: trio.Nursery, cmd: list[str], env: dict[str, str],
                    soft: int, hard: int = 0) -> None:
        argv = [sys.executable, "-c", LAUNCH, str(soft), str(hard), *cmd]
        self.proc = await nursery.start(partial(
            trio.run_process, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            check=False, start_new_session=True))
        nursery.start_soon(self._collect)
        with trio.fail_after(30):
            while b"trioproxy ready" not in self.stderr:
                assert self.proc.returncode is None, self.stderr.decode(errors="replace")
                await trio.sleep(0.05)

    async def _collect(self) -> None:
        async for chunk in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr += chunk

    def text(self) -> str:
        return self.stderr.decode(errors="replace")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


def server_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {**os.environ, "TRIOPROXY_ANTHROPIC_BASE_URL": fake.url,
            "TRIOPROXY_OPENAI_BASE_URL": fake.url, "TRIOPROXY_ACCOUNTING": "false",
            "TRIOPROXY_LOG_LEVEL": "INFO", **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_limit(text: str) -> tuple[int, int]:
    """(open files limit, streams it allows) from the start-up line."""
    m = re.search(r"open files limit (\d+).*?about (\d+) concurrent streams", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("command", ["serve", "hypercorn"])
async def test_start_raises_the_open_files_limit_and_says_how_many_streams_it_allows(
    nursery: trio.Nursery, command: str
) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    if command == "serve":
        cmd = [os.path.join(BIN, "trioproxy"), "serve", "--port", str(free_port())]
    else:
        cmd = [os.path.join(BIN, "hypercorn"), "trioproxy:app", "--worker-class", "trio",
               "--bind", "127.0.0.1:0"]
    server = Server()
    try:
        await server.start(nursery, cmd, server_env(fake), soft=256)
        limit, streams = logged_limit(server.text())
        assert limit == HARD  # raised from 256 to the hard limit
        assert streams == (HARD - RESERVED_FDS) // FDS_PER_STREAM
        assert "raised from 256" in server.text()
    finally:
        await server.stop()


async def test_a_limit_too_low_for_max_connections_is_warned_about_at_start(
    nursery: trio.Nursery
) -> None:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    server = Server()
    try:
        await server.start(
            nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", str(free_port())],
            server_env(fake, TRIOPROXY_MAX_CONNECTIONS="5000"), soft=1024, hard=1024)
        text = server.text()
    finally:
        await server.stop()
    warning = next(line for line in text.splitlines() if "too low" in line)
    assert "WARNING" in warning and "max_connections = 5000" in warning
    assert "LimitNOFILE" in warning and str(5000 * FDS_PER_STREAM + RESERVED_FDS) in warning


def test_max_connections_auto_is_what_the_open_files_limit_allows(monkeypatch) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (20_000, 20_000))
    assert Settings().max_connections == streams_allowed(20_000) == 9950
    assert Settings.from_env({"TRIOPROXY_MAX_CONNECTIONS": "auto"}).max_connections == 9950
    assert Settings.from_env({"TRIOPROXY_MAX_CONNECTIONS": "300"}).max_connections == 300


async def test_the_201st_concurrent_long_stream_is_not_queued_behind_the_pool(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    """201 agent turns held open at once to one provider all start, with default settings."""
    n = 201
    for _ in range(n):  # the first event, then a long silence (a tool call, a long think)
        upstream.enqueue(anthropic_sse(["a"], gaps=[0, 600]))
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    clients: list[RawClient] = []
    statuses: list[int] = []

    async def one() -> None:
        client = await RawClient.connect(proxy.port)
        clients.append(client)
        await client.send_request("POST", "/v1/messages", [("x-api-key", "sk-ant-x")], MESSAGES)
        statuses.append((await client.read_head()).status)

    try:
        with trio.fail_after(25):  # before the 30 s pool timeout could answer 504
            async with trio.open_nursery() as starts:
                for _ in range(n):
                    starts.start_soon(one)
        assert statuses == [200] * n
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.aclose()
            await proxy.stop()


def test_serve_listens_with_a_backlog_for_bursts_of_reconnecting_agents() -> None:
    from trioproxy.commands.cli import build_config

    assert build_config(Settings(port=0)).backlog == 2048  # Hypercorn's own default is 100
    assert build_config(Settings(port=0, backlog=512)).backlog == 512
