"""Outbound proxies: HTTPS_PROXY / HTTP_PROXY / NO_PROXY through an HTTP CONNECT tunnel.

A tiny CONNECT proxy runs in the test's nursery; the fake upstream sits behind it (plain and
TLS with a throwaway ``trustme`` CA). The pool is driven directly, and the whole app once.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trustme

from trioproxy import Settings
from trioproxy.config import ConfigError, UpstreamURL
from trioproxy.errors import UpstreamConnectError, UpstreamTimeout
from trioproxy.testing import FakeUpstream
from trioproxy.upstream import UpstreamPool
from trioproxy.upstream.connect_proxy import ProxyURL, open_tunnel, proxy_for

from .conftest import RawClient, start_proxy

MESSAGES = json.dumps(
    {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
).encode()
SECRET = "s3cr3t-pa$$"  # percent-encoded in URLs as s3cr3t-pa%24%24


@dataclass
class ConnectProxy:
    """A CONNECT-only forward proxy on loopback.

    ``mode``: "tunnel" (answer 200 and pipe), "407" (refuse), "silent" (never answer).
    ``require_auth``: a Proxy-Authorization value; anything else gets a 407.
    ``resolve``: host names the proxy resolves itself (the client never does).
    """

    mode: str = "tunnel"
    require_auth: bytes | None = None
    resolve: dict[str, str] = field(default_factory=dict)
    early_bytes: bytes = b""  # sent right after the 200 head, in the same write
    requests: list[h11.Request] = field(default_factory=list)
    connections: int = 0
    errors: list[BaseException] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth_url(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    async def serve(self, task_status: trio.TaskStatus[ConnectProxy] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._tunnel(client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        except Exception as exc:  # noqa: BLE001 - recorded, asserted empty by the tests
            self.errors.append(exc)
        finally:
            await trio.aclose_forcefully(client)

    async def _tunnel(self, client: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while type(event := conn.next_event()) is not h11.Request:
            if event is not h11.NEED_DATA:
                return
            conn.receive_data(await client.receive_some(65536))
        self.requests.append(event)
        if self.mode == "silent":
            await trio.sleep_forever()
        auth = dict(event.headers).get(b"proxy-authorization")
        if self.mode == "407" or (self.require_auth and auth != self.require_auth):
            await client.send_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n')
            return
        host, _, port = event.target.decode().rpartition(":")
        upstream = await trio.open_tcp_stream(self.resolve.get(host, host), int(port))
        try:
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n" + self.early_bytes)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(upstream)


async def _pipe(src: trio.abc.Stream, dst: trio.abc.Stream, scope: trio.CancelScope) -> None:
    try:
        while data := await src.receive_some(65536):
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    scope.cancel()  # either side done: the tunnel is done


@pytest.fixture
async def connect_proxy(nursery: trio.Nursery) -> AsyncIterator[ConnectProxy]:
    proxy = ConnectProxy()
    await nursery.start(proxy.serve)
    yield proxy
    assert proxy.errors == []


def _headers(base: UpstreamURL) -> list[tuple[bytes, bytes]]:
    return [(b"host", base.host_header), (b"content-type", b"application/json"),
            (b"content-length", str(len(MESSAGES)).encode())]


async def _post(pool: UpstreamPool, base: UpstreamURL) -> tuple[int, bytes]:
    """One POST /v1/messages through the pool; (status, whole body)."""
    response = await pool.send_request(base, b"POST", b"/v1/messages", _headers(base), MESSAGES)
    async with response:
        body = b""
        while (chunk := await response.receive_chunk()) is not None:
            body += chunk
    return response.status, body


async def _tls_upstream(nursery: trio.Nursery, ca: trustme.CA, name: str) -> FakeUpstream:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(server_ctx)
    fake = FakeUpstream(tls=server_ctx)
    await nursery.start(fake.serve)
    return fake


# -- through the tunnel -------------------------------------------------------------------------


async def test_https_upstream_goes_through_the_tunnel_verified_by_its_own_name(
    nursery: trio.Nursery, connect_proxy: ConnectProxy
) -> None:
    ca = trustme.CA()
    fake = await _tls_upstream(nursery, ca, "upstream.test")
    connect_proxy.resolve["upstream.test"] = "127.0.0.1"  # only the proxy can resolve it
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    base = UpstreamURL.parse(f"https://upstream.test:{fake.port}")
    pool = UpstreamPool(Settings(accounting=False), client_ctx,
                        proxies={"https": connect_proxy.url})
    with trio.fail_after(20):
        status, body = await _post(pool, base)
        await pool.aclose()
    assert status == 200 and json.loads(body)["type"] == "message"
    (connect,) = connect_proxy.requests
    target = f"upstream.test:{fake.port}".encode()
    assert connect.method == b"CONNECT" and connect.target == target
    assert (b"host", target) in list(connect.headers)
    assert fake.requests[0].path == "/v1/messages"
    assert fake.requests[0].header("host") == f"upstream.test:{fake.port}"


async def test_https_upstream_with_an_untrusted_certificate_fails_inside_the_tunnel(
    nursery: trio.Nursery, connect_proxy: ConnectProxy
) -> None:
    fake = await _tls_upstream(nursery, trustme.CA(), "upstream.test")
    connect_proxy.resolve["upstream.test"] = "127.0.0.1"
    other_ctx = ssl.create_default_context()
    trustme.CA().configure_trust(other_ctx)  # trusts some other CA only
    base = UpstreamURL.parse(f"https://upstream.test:{fake.port}")
    pool = UpstreamPool(Settings(accounting=False), other_ctx,
                        proxies={"https": connect_proxy.url})
    with trio.fail_after(20), pytest.raises(UpstreamConnectError) as info:
        await _post(pool, base)
    assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    assert f"through proxy {connect_proxy.url}" in info.value.message
    assert len(connect_proxy.requests) == 1  # the tunnel was up: the upstream's cert failed
    assert fake.requests == []


async def test_http_upstream_goes_through_the_tunnel_and_keeps_it_alive(
    connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    base = UpstreamURL.parse(upstream.url)
    pool = UpstreamPool(Settings(accounting=False), proxies={"http": connect_proxy.url})
    with trio.fail_after(20):
        first = await _post(pool, base)
        second = await _post(pool, base)
        await pool.aclose()
    assert first[0] == second[0] == 200
    (connect,) = connect_proxy.requests  # one tunnel, two requests through it
    assert connect.target == f"127.0.0.1:{upstream.port}".encode()
    assert pool.statistics()["opened"] == 1 and pool.reused == 1
    assert len(upstream.requests) == 2 and upstream.requests[0].target == b"/v1/messages"


async def test_no_proxy_bypasses_the_proxy(
    connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    proxies = {"http": connect_proxy.url, "https": connect_proxy.url, "no": "localhost,127.0.0.1"}
    pool = UpstreamPool(Settings(accounting=False), proxies=proxies)
    with trio.fail_after(20):
        status, _ = await _post(pool, UpstreamURL.parse(upstream.url))
        await pool.aclose()
    assert status == 200 and len(upstream.requests) == 1
    assert connect_proxy.connections == 0


async def test_https_proxy_is_not_used_for_an_http_upstream(
    connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    pool = UpstreamPool(Settings(accounting=False), proxies={"https": connect_proxy.url})
    with trio.fail_after(20):
        status, _ = await _post(pool, UpstreamURL.parse(upstream.url))
        await pool.aclose()
    assert status == 200 and connect_proxy.connections == 0


# -- failures -----------------------------------------------------------------------------------


async def test_proxy_refusal_407_is_a_connect_error_naming_the_status(
    connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    connect_proxy.mode = "407"
    pool = UpstreamPool(Settings(accounting=False), proxies={"http": connect_proxy.url})
    with trio.fail_after(20), pytest.raises(UpstreamConnectError) as info:
        await _post(pool, UpstreamURL.parse(upstream.url))
    assert "407 Proxy Authentication Required" in info.value.message
    assert info.value.status == 502
    assert upstream.requests == [] and pool.statistics()["opened"] == 0


async def test_proxy_refusal_reaches_the_client_as_a_502(
    nursery: trio.Nursery, connect_proxy: ConnectProxy, upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect_proxy.mode = "407"
    monkeypatch.setenv("HTTP_PROXY", connect_proxy.url)  # read when the app's pool is created
    settings = Settings(anthropic_base_url=upstream.url, openai_base_url=upstream.url,
                        accounting=False)
    server = await start_proxy(nursery, settings)
    client = await RawClient.connect(server.port)
    with trio.fail_after(20):
        resp = await client.request("POST", "/v1/messages", [
            ("x-api-key", "sk-ant-x"), ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json")], MESSAGES)
    await client.aclose()
    await server.stop()
    assert resp.status == 502 and b"407" in resp.body
    assert json.loads(resp.body)["type"] == "error"
    assert len(connect_proxy.requests) == 1 and upstream.requests == []


async def test_a_silent_proxy_is_a_connect_timeout(
    autojump_clock: trio.abc.Clock, connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    connect_proxy.mode = "silent"
    pool = UpstreamPool(Settings(accounting=False, connect_timeout=7.0),
                        proxies={"http": connect_proxy.url})
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(UpstreamTimeout) as info:
        await _post(pool, UpstreamURL.parse(upstream.url))
    assert info.value.phase == "connect"
    assert trio.current_time() - start == pytest.approx(7.0, abs=0.5)
    assert len(connect_proxy.requests) == 1


async def test_an_unreachable_proxy_is_a_connect_error(upstream: FakeUpstream) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    pool = UpstreamPool(Settings(accounting=False), proxies={"http": dead})
    with trio.fail_after(20), pytest.raises(UpstreamConnectError) as info:
        await _post(pool, UpstreamURL.parse(upstream.url))
    assert f"proxy {dead}" in info.value.message and upstream.requests == []


# -- credentials --------------------------------------------------------------------------------


async def test_basic_credentials_go_to_the_proxy_only_and_never_into_the_logs(
    nursery: trio.Nursery, connect_proxy: ConnectProxy, upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    expected = b"Basic " + base64.b64encode(f"us@er:{SECRET}".encode())
    connect_proxy.require_auth = expected
    good = connect_proxy.auth_url("us%40er", "s3cr3t-pa%24%24")
    bad = connect_proxy.auth_url("us%40er", "s3cr3t-pa%24%24-wrong")
    settings = Settings(anthropic_base_url=upstream.url, openai_base_url=upstream.url,
                        accounting=False)
    headers = [("x-api-key", "sk-ant-x"), ("anthropic-version", "2023-06-01"),
               ("content-type", "application/json")]
    statuses = []
    for proxy_url in (good, bad):
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        server = await start_proxy(nursery, settings)
        client = await RawClient.connect(server.port)
        with trio.fail_after(20):
            statuses.append(await client.request("POST", "/v1/messages", headers, MESSAGES))
        await client.aclose()
        await server.stop()
    assert [r.status for r in statuses] == [200, 502]
    assert b"407" in statuses[1].body and SECRET.encode() not in statuses[1].body
    assert [dict(r.headers).get(b"proxy-authorization") for r in connect_proxy.requests] == [
        expected, b"Basic " + base64.b64encode(f"us@er:{SECRET}-wrong".encode())]
    assert upstream.requests[0].header("proxy-authorization") is None  # not leaked upstream
    assert any("through proxy" in r.getMessage() for r in caplog.records)  # the log was on
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for secret in (SECRET, "s3cr3t-pa%24%24", expected.decode(), expected.decode()[6:]):
        assert secret not in logged


def test_proxy_url_never_shows_its_credentials() -> None:
    proxy = ProxyURL.parse(f"http://user:{SECRET}@proxy.corp:3128")
    assert proxy.host == "proxy.corp" and proxy.port == 3128
    assert SECRET not in str(proxy) and SECRET not in repr(proxy)
    assert str(proxy) == "http://proxy.corp:3128"
    with pytest.raises(ConfigError) as info:
        ProxyURL.parse(f"http://user:{SECRET}@proxy.corp:99999")
    assert SECRET not in str(info.value) and "***@proxy.corp" in str(info.value)


# -- parsing and selection ----------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host", "port"), [
    ("http://proxy.corp:3128", "proxy.corp", 3128),
    ("http://proxy.corp:3128/", "proxy.corp", 3128),
    ("proxy.corp:8080", "proxy.corp", 8080),  # no scheme: http, as curl and urllib take it
    ("http://proxy.corp", "proxy.corp", 80),
    ("http://[::1]:3128", "::1", 3128),
])
def test_proxy_url_parses(url: str, host: str, port: int) -> None:
    proxy = ProxyURL.parse(url)
    assert (proxy.host, proxy.port, proxy.authorization) == (host, port, None)


@pytest.mark.parametrize("url", [
    "https://proxy.corp:3128", "socks5://proxy.corp:1080", "http://proxy.corp:3128/path",
    "http://:3128",
])
def test_unsupported_proxy_urls_are_rejected(url: str) -> None:
    with pytest.raises(ConfigError):
        ProxyURL.parse(url)


def test_an_https_proxy_url_is_rejected_when_the_pool_is_created() -> None:
    with pytest.raises(ConfigError, match="https:// proxy .* not supported"):
        UpstreamPool(Settings(accounting=False), proxies={"https": "https://proxy.corp:3128"})


@pytest.mark.parametrize(("base", "no_proxy", "proxied"), [
    ("https://api.anthropic.com", None, True),
    ("https://api.anthropic.com", "*", False),
    ("https://api.anthropic.com", "anthropic.com", False),  # a domain covers its subdomains
    ("https://api.anthropic.com", ".anthropic.com", False),
    ("https://api.anthropic.com", "openai.com, localhost", True),
    ("https://api.anthropic.com", "API.Anthropic.com", False),
    ("https://api.anthropic.com:8443", "api.anthropic.com:8443", False),
    ("https://api.anthropic.com", "api.anthropic.com:8443", True),
    ("https://notanthropic.com", "anthropic.com", True),
    ("http://[::1]:8080", "::1", False),
])
def test_proxy_for_follows_no_proxy(base: str, no_proxy: str | None, proxied: bool) -> None:
    proxies = {"https": "http://proxy.corp:3128", "http": "http://proxy.corp:3128"}
    if no_proxy is not None:
        proxies["no"] = no_proxy
    got = proxy_for(UpstreamURL.parse(base), proxies)
    assert (got == ProxyURL("proxy.corp", 3128)) if proxied else got is None


def test_proxy_for_picks_the_proxy_by_upstream_scheme() -> None:
    proxies = {"https": "http://tls-proxy:1", "http": "http://plain-proxy:2"}
    assert proxy_for(UpstreamURL.parse("https://a.test"), proxies).host == "tls-proxy"
    assert proxy_for(UpstreamURL.parse("http://a.test"), proxies).host == "plain-proxy"
    assert proxy_for(UpstreamURL.parse("http://a.test"), {"https": "http://p:1"}) is None


# -- the tunnel itself --------------------------------------------------------------------------


async def test_bytes_sent_right_after_the_connect_answer_are_kept(
    connect_proxy: ConnectProxy, upstream: FakeUpstream
) -> None:
    connect_proxy.early_bytes = b"early "
    with trio.fail_after(20):
        tunnel = await open_tunnel(ProxyURL.parse(connect_proxy.url), "127.0.0.1",
                                   upstream.port, 10.0)
        first = await tunnel.receive_some(3)
        rest = await tunnel.receive_some()
        await tunnel.send_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += await tunnel.receive_some()
        await tunnel.aclose()
    assert first + rest == b"early "
    assert head.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests[0].path == "/v1/models"
