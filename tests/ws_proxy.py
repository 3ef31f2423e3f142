"""The Responses WebSocket relay under test: Hypercorn (trio) + TrioProxy against
FakeResponsesWS, a trio-websocket client, and the frames a Codex-style client sends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket as tws
from hypercorn.config import Config
from hypercorn.trio import serve

from trioproxy import Settings, TrioProxy
from trioproxy.exchange import Exchange
from trioproxy.extensions import Extension
from trioproxy.testing.websocket import FakeResponsesWS, MiB

BIG = 64 * MiB
AUTH = [(b"authorization", b"Bearer sk-test-ws"),
        (b"openai-beta", b"responses_websockets=2026-02-06")]


@dataclass
class Proxy:
    app: TrioProxy
    port: int
    records: list[tuple[Exchange, Any]]  # (exchange, parsed usage), in finalisation order

    async def wait_records(self, n: int) -> list[tuple[Exchange, Any]]:
        while len(self.records) < n:
            await trio.sleep(0.005)
        return self.records


async def start_fake(nursery: trio.Nursery, **kwargs: Any) -> FakeResponsesWS:
    return await nursery.start(FakeResponsesWS(**kwargs).serve)


async def start_proxy(
    nursery: trio.Nursery, base_url: str, extensions: list[Extension] | None = None,
    **overrides: Any,
) -> Proxy:
    settings = Settings(openai_base_url=base_url, accounting=False, **overrides)
    app = TrioProxy(settings, configure_logging=False, extensions=extensions)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.websocket_max_message_size = BIG
    binds = await nursery.start(
        lambda task_status: serve(app, config, shutdown_trigger=trio.sleep_forever,
                                  task_status=task_status))
    proxy = Proxy(app, int(binds[0].rsplit(":", 1)[1]), [])

    async def capture(ex: Exchange) -> None:
        proxy.records.append((ex, ex.usage()))

    assert app.runtime is not None
    app.runtime.finalisers.append(capture)
    return proxy


async def start_pair(nursery: trio.Nursery, **fake_kwargs: Any) -> tuple[FakeResponsesWS, Proxy]:
    """A fake Responses WebSocket upstream and a proxy (accounting off) in front of it."""
    fake = await start_fake(nursery, **fake_kwargs)
    return fake, await start_proxy(nursery, fake.base_url)


@asynccontextmanager
async def connect(
    proxy: Proxy, path: str = "/v1/responses", headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[tws.WebSocketConnection]:
    """trio-websocket's client over a socket the test owns and closes (``open_websocket``
    leaves it open when the server closes first or refuses the upgrade)."""
    stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await tws.wrap_client_stream(
                nursery, stream, f"127.0.0.1:{proxy.port}", path,
                extra_headers=AUTH + (headers or []), max_message_size=BIG)
            try:
                yield ws
            finally:
                with trio.move_on_after(5, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def refusal(proxy: Proxy, path: str = "/v1/responses") -> tws.ConnectionRejected:
    """The proxy's HTTP answer to an upgrade it did not accept."""
    rejected: list[tws.ConnectionRejected] = []
    try:
        async with connect(proxy, path):
            raise AssertionError("the upgrade was accepted")
    except* tws.ConnectionRejected as group:
        rejected.extend(group.exceptions)  # type: ignore[arg-type]
    return rejected[0]


def create(**fields: Any) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-5-codex", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        **fields})


async def turn(ws: tws.WebSocketConnection, frame: str) -> list[dict[str, Any]]:
    """Sends one response.create; returns its events up to the terminal one."""
    await ws.send_message(frame)
    events = []
    while True:
        event = json.loads(await ws.get_message())
        events.append(event)
        if event["type"] in ("response.completed", "response.failed", "response.incomplete"):
            return events


def tokens(usage: Any) -> tuple[int, int] | None:
    return None if usage is None else (usage.input_tokens, usage.output_tokens)
