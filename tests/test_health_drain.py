"""Health, readiness and the drain: in process, and on spawned `trioproxy serve` / `hypercorn`
processes sent a real SIGTERM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from functools import partial

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.testing import FakeUpstream, anthropic_sse, openai_chat_sse

from .conftest import RawClient, proxy_settings, start_proxy

BIN = os.path.dirname(sys.executable)
CHAT = json.dumps({"model": "gpt-4o-mini", "stream": True,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
MESSAGES = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
AUTH = [("authorization", "Bearer sk-test"), ("content-type", "application/json")]


async def get_json(url: str) -> tuple[int, dict]:
    async with httpx.AsyncClient() as client:
        resp = await client.get(url)
    return resp.status_code, resp.json()


async def test_liveness_and_readiness_answer_while_serving(nursery, upstream) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    with trio.fail_after(10):
        assert await get_json(proxy.url + "/_trioproxy/healthz") == (200, {"status": "alive"})
        status, body = await get_json(proxy.url + "/_trioproxy/readyz")
    assert (status, body["status"]) == (200, "ready")
    await proxy.stop()


def assert_refused(resp, provider: str) -> None:
    """A draining answer: 503 in the provider's error shape, closing, with retry-after."""
    assert resp.status == 503
    assert resp.header("connection") == "close"
    assert int(resp.header("retry-after")) > 0
    body = json.loads(resp.body)
    if provider == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "api_error"
    else:
        assert body["error"]["code"] == "proxy_draining" and body["error"]["type"]
    assert "shutting down" in (body["error"]["message"])


async def refused_request(port: int, path: str, body: bytes, headers=AUTH):
    client = await RawClient.connect(port)
    try:
        return await client.request("POST", path, headers, body)
    finally:
        await client.aclose()


async def open_stream(port: int, path: str, body: bytes, headers=AUTH):
    client = await RawClient.connect(port)
    await client.send_request("POST", path, headers, body)
    resp = await client.read_head()
    await client.read_body(resp, max_chunks=1)
    return client, resp


async def test_drain_refuses_new_requests_and_lets_streams_finish(
    nursery, upstream: FakeUpstream, caplog
) -> None:
    caplog.set_level(logging.WARNING, "trioproxy")
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    upstream.enqueue(openai_chat_sse(["a", "b", "c"], gaps=[0, 0, 1.0]))
    with trio.fail_after(20):
        client, stream = await open_stream(proxy.port, "/v1/chat/completions", CHAT)
        remaining: list[float] = []

        async def drain() -> None:
            remaining.append(await proxy.app.runtime.drain(30.0))

        nursery.start_soon(drain)
        await trio.sleep(0.01)
        status, body = await get_json(proxy.url + "/_trioproxy/readyz")
        assert (status, body["status"]) == (503, "draining")
        assert_refused(await refused_request(proxy.port, "/v1/messages", MESSAGES), "anthropic")
        assert_refused(await refused_request(proxy.port, "/v1/chat/completions", CHAT), "openai")
        await client.read_body(stream)
        await client.aclose()
        while not remaining:
            await trio.sleep(0.01)
    assert stream.complete and stream.body.rstrip().endswith(b"data: [DONE]")
    assert remaining[0] > 0  # it ended when the stream did, well before the timeout
    lines = [r.getMessage() for r in caplog.records if "drain" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("draining:") and "1 in flight" in lines[0]
    assert "1 of 1 in flight finished, 2 new requests refused, 0 still running" in lines[1]
    assert len(upstream.requests) == 1  # the refused requests never went upstream
    await proxy.stop()


# -- spawned servers ------------------------------------------------------------------------


class Spawned:
    """A server process whose stderr is collected while it runs."""

    def __init__(self) -> None:
        self.stderr = b""
        self.url = ""
        self.proc: trio.Process | None = None

    async def start(self, nursery: trio.Nursery, cmd: list[str], env: dict[str, str],
                    listeners: int = 1) -> None:
        """Start ``cmd`` in a process group of its own (``stop()`` ends the whole group)."""
        self.proc = await nursery.start(partial(
            trio.run_process, cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            check=False, start_new_session=True))
        nursery.start_soon(self._collect)
        with trio.fail_after(30):
            while len(re.findall(rb"Running on (http://[\d.]+:\d+)", self.stderr)) < listeners:
                assert self.proc.returncode is None, self.stderr.decode(errors="replace")
                await trio.sleep(0.05)
        self.url = re.search(rb"Running on (http://[\d.]+:\d+)", self.stderr).group(1).decode()
        # every worker has finished lifespan start-up once it prints its ready line
        with trio.fail_after(30):
            while self.stderr.count(b"trioproxy ready") < listeners:
                await trio.sleep(0.05)

    async def _collect(self) -> None:
        async for chunk in self.proc.stderr:
            self.stderr += chunk

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def stop(self) -> None:
        """Kill the whole process group: a server's workers too, even if its master is gone
        (killing only the master of a plain Hypercorn left a worker listening)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with trio.move_on_after(10):
            await self.proc.wait()


def server_env(fake: FakeUpstream, **extra: str) -> dict[str, str]:
    return {**os.environ, "TRIOPROXY_ANTHROPIC_BASE_URL": fake.url,
            "TRIOPROXY_OPENAI_BASE_URL": fake.url, "TRIOPROXY_ACCOUNTING": "false", **extra}


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_trioproxy_serve(nursery, upstream: FakeUpstream, workers) -> None:
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", "0",
                                 "--workers", str(workers), "--drain-notice", "0.2",
                                 "--drain-grace", "0"],
                       server_env(upstream), listeners=workers)
    try:
        for _ in range(2):
            upstream.enqueue(anthropic_sse(["a", "b", "c"], gaps=[0, 0, 0, 0, 2.0]))
        with trio.fail_after(30):
            streams = [await open_stream(server.port, "/v1/messages", MESSAGES,
                                         [("x-api-key", "sk-ant-test")]) for _ in range(2)]
            server.proc.send_signal(signal.SIGTERM)
            while (await get_json(server.url + "/_trioproxy/readyz"))[0] != 503:
                await trio.sleep(0.02)
            # every worker says it is draining (one readyz 503 shows only the one that answered)
            while len(re.findall(rb"draining: ", server.stderr)) < workers:
                await trio.sleep(0.02)
            assert_refused(await refused_request(server.port, "/v1/messages", MESSAGES),
                           "anthropic")
            assert_refused(await refused_request(server.port, "/v1/chat/completions", CHAT),
                           "openai")
            for client, resp in streams:
                await client.read_body(resp)
                await client.aclose()
                assert resp.complete and b"message_stop" in resp.body
            assert await server.proc.wait() == 0
        log = server.stderr.decode(errors="replace")
        started = re.findall(r"draining: .*; (\d+) in flight", log)
        ended = re.findall(r"drain ended after [\d.]+s: (\d+) of (\d+) in flight finished, "
                           r"(\d+) new requests refused, (\d+) still running", log)
        assert len(started) == len(ended) == workers, log  # one pair per worker process
        assert sum(int(e[0]) for e in ended) == 2 and sum(int(e[3]) for e in ended) == 0
        assert sum(int(e[2]) for e in ended) == 2
        assert len(upstream.requests) == 2
    finally:
        await server.stop()


async def test_sigterm_to_the_whole_process_group_still_drains(nursery, upstream) -> None:
    """systemd (and `timeout`, and Ctrl-C in a shell) signal the parent and every worker at
    once: that is one signal, not a second one that would cut the drain short."""
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", "0",
                                 "--workers", "2", "--drain-notice", "3", "--drain-grace", "0"],
                       server_env(upstream), listeners=2)
    try:
        with trio.fail_after(30):
            os.killpg(server.proc.pid, signal.SIGTERM)
            while len(re.findall(rb"draining: ", server.stderr)) < 2:
                await trio.sleep(0.02)
            # within the drain notice the server still answers: readiness 503, requests 503
            assert (await get_json(server.url + "/_trioproxy/readyz"))[0] == 503
            assert_refused(await refused_request(server.port, "/v1/messages", MESSAGES),
                           "anthropic")
            assert await server.proc.wait() == 0
        assert b"refused" in server.stderr
    finally:
        await server.stop()


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_serve_with_two_workers_counts_every_worker_once(nursery, upstream) -> None:
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "trioproxy"), "serve", "--port", "0",
                                 "--workers", "2", "--drain-notice", "0", "--drain-grace", "0"],
                       server_env(upstream), listeners=2)
    try:
        with trio.fail_after(30):
            for _ in range(8):  # a fresh connection each: the workers share the accepts
                async with httpx.AsyncClient() as client:
                    resp = await client.post(server.url + "/v1/chat/completions",
                                             headers=dict(AUTH), content=CHAT)
                    assert resp.status_code == 200
            texts = []
            for _ in range(6):
                async with httpx.AsyncClient() as client:
                    texts.append((await client.get(server.url + "/metrics")).text)
        for text in texts:  # whichever worker answers, the totals are the same
            assert metric(text, "trioproxy_requests_total", api="openai.chat") == 8
            assert metric(text, "gen_ai_client_operation_duration_seconds_count") == 8
        server.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await server.proc.wait() == 0
    finally:
        await server.stop()


async def test_plain_hypercorn_serves_metrics_and_health(nursery, upstream) -> None:
    server = Spawned()
    await server.start(nursery, [os.path.join(BIN, "hypercorn"), "trioproxy:app",
                                 "--worker-class", "trio", "--bind", "127.0.0.1:0"],
                       server_env(upstream))
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient() as client:
                resp = await client.post(server.url + "/v1/chat/completions",
                                         headers=dict(AUTH), content=CHAT)
                assert resp.status_code == 200
                text = (await client.get(server.url + "/metrics")).text
                ready = await client.get(server.url + "/_trioproxy/readyz")
        assert metric(text, "trioproxy_requests_total", api="openai.chat") == 1
        assert ready.status_code == 200
        assert len(upstream.requests) == 1
    finally:
        await server.stop()
