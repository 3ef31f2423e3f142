"""Shared fixtures: the real proxy under Hypercorn on 127.0.0.1:0 against the fake upstream."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from trioproxy import Settings, TrioProxy
from trioproxy.exchange import Exchange
from trioproxy.testing import FakeUpstream, header_values

from .process_guard import pytest_sessionfinish, pytest_sessionstart  # noqa: F401 - hooks

ON_CI = bool(os.environ.get("CI"))


@dataclass
class ProxyServer:
    app: TrioProxy
    url: str
    port: int
    exchanges: list[Exchange] = field(default_factory=list)
    _stop: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)

    async def wait_exchanges(self, n: int = 1) -> list[Exchange]:
        """Wait until ``n`` exchanges have been finalised (that happens after the response)."""
        with trio.fail_after(30):
            while len(self.exchanges) < n:
                await trio.sleep(0.005)
        return self.exchanges

    async def stop(self) -> None:
        self._stop.set()
        with trio.move_on_after(10):
            await self._stopped.wait()


async def start_proxy(
    nursery: trio.Nursery, settings: Settings, **app_kwargs: object
) -> ProxyServer:
    """Start the proxy app under Hypercorn (trio) on a free loopback port."""
    app = TrioProxy(settings, configure_logging=False, **app_kwargs)  # type: ignore[arg-type]
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    config.websocket_max_message_size = 64 * 1024 * 1024
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)
        finally:
            stopped.set()

    binds = await nursery.start(run)
    url = binds[0]
    server = ProxyServer(app, url, int(url.rsplit(":", 1)[1]), _stop=stop, _stopped=stopped)

    async def capture(ex: Exchange) -> None:
        server.exchanges.append(ex)

    assert app.runtime is not None
    app.runtime.finalisers.append(capture)
    return server


def proxy_settings(upstream: FakeUpstream, **overrides: object) -> Settings:
    """Anthropic behind a path prefix (exercises base-URL prefixes), OpenAI at the root."""
    values: dict[str, object] = {
        "anthropic_base_url": upstream.url + "/anthropic-upstream",
        "openai_base_url": upstream.url,
        "accounting": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests talk to loopback fakes directly, whatever proxy the machine has configured."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await nursery.start(fake.serve)
    yield fake
    assert fake.errors == []  # the fake's own handlers never failed


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> AsyncIterator[ProxyServer]:
    server = await start_proxy(nursery, proxy_settings(upstream))
    yield server
    await server.stop()


# -- a raw HTTP/1.1 client: sees framing exactly (truncation, trailers, header duplicates) ------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[tuple[float, bytes]]  # (trio time received, data)
    complete: bool  # EndOfMessage seen
    error: str | None = None

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        return header_values(self.headers, name)


class RawClient:
    """One keep-alive HTTP/1.1 connection driven by h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def send_request(
        self, method: str, target: str | bytes, headers: list[tuple[str, str]], body: bytes = b""
    ) -> None:
        hs = list(headers)
        if not any(k.lower() == "host" for k, _ in hs):
            hs.insert(0, ("host", "proxy.test"))
        if body or method in ("POST", "PUT", "PATCH"):
            hs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _next(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def read_head(self) -> RawResponse:
        while True:
            event = await self._next()
            if isinstance(event, h11.Response):
                return RawResponse(event.status_code, list(event.headers), [], False)

    async def read_body(self, resp: RawResponse, *, max_chunks: int | None = None) -> RawResponse:
        try:
            while max_chunks is None or len(resp.chunks) < max_chunks:
                event = await self._next()
                if isinstance(event, h11.Data):
                    resp.chunks.append((trio.current_time(), bytes(event.data)))
                elif isinstance(event, h11.EndOfMessage):
                    resp.complete = True
                    if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                        self.conn.start_next_cycle()
                    return resp
                else:
                    resp.error = repr(event)
                    return resp
        except h11.RemoteProtocolError as exc:
            resp.error = str(exc)
        return resp

    async def request(
        self, method: str, target: str | bytes, headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> RawResponse:
        await self.send_request(method, target, headers or [], body)
        resp = await self.read_head()
        return await self.read_body(resp)


@pytest.fixture
async def raw_client(proxy: ProxyServer) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(proxy.port)
    yield client
    await client.aclose()
