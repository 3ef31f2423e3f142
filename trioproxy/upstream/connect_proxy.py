"""Outbound HTTP proxies: ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` and CONNECT tunnels.

The proxy table comes from ``urllib.request.getproxies_environment()`` (lower-case names win
over upper-case ones; ``ALL_PROXY`` is not used) and bypass decisions from
``urllib.request.proxy_bypass_environment()``, so the rules are the standard library's. Every
proxied upstream, http or https, is reached through ``CONNECT host:port``; TLS to an https
upstream then runs inside the tunnel, verified against the upstream's name.

Only ``http://`` proxy URLs are supported (TLS to the proxy itself is not). Credentials in the
URL are sent as ``Proxy-Authorization: Basic`` and never appear in ``str()``, ``repr()``,
error messages or logs.
"""

from __future__ import annotations

import base64
import logging
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import trio

from ..config.settings import ConfigError, UpstreamURL
from ..errors import UpstreamConnectError, UpstreamTimeout

log = logging.getLogger("trioproxy.upstream")

MAX_RESPONSE_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """An ``http://[user:pass@]host[:port]`` proxy. ``str()`` never shows the credentials."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)  # Proxy-Authorization value

    @classmethod
    def parse(cls, url: str, *, name: str = "proxy URL") -> ProxyURL:
        """Parse a proxy URL; a URL without a scheme is taken as ``http://``."""
        raw = url.strip()
        if "://" not in raw:
            raw = "http://" + raw
        shown = _redact(raw)
        try:
            parts = urlsplit(raw)
        except ValueError:
            raise ConfigError(f"{name} is not a valid URL: {shown!r}") from None
        if parts.scheme == "https":
            raise ConfigError(
                f"{name}: an https:// proxy (TLS to the proxy) is not supported, got {shown!r};"
                " use http://proxy:port (https upstreams are still encrypted end to end)"
            )
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"{name} must be an http://host:port URL, got {shown!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{name} must not have a path, query or fragment, got {shown!r}")
        try:
            port = parts.port or 80
        except ValueError:
            raise ConfigError(f"{name} has an invalid port: {shown!r}") from None
        authorization = None
        if parts.username is not None:
            userpass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = b"Basic " + base64.b64encode(userpass.encode("utf-8"))
        return cls(parts.hostname, port, authorization)

    @property
    def authority(self) -> str:
        return _authority(self.host, self.port)

    def __str__(self) -> str:
        return f"http://{self.authority}"


def _redact(url: str) -> str:
    """``url`` with any userinfo replaced by ``***`` (for messages)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def environment_proxies() -> dict[str, str]:
    """The standard library's reading of ``*_proxy`` variables (``{"https": ..., "no": ...}``)."""
    return dict(urllib.request.getproxies_environment())


def check_proxies(proxies: Mapping[str, str]) -> None:
    """Raise ConfigError now for a proxy URL that ``proxy_for`` would reject later."""
    for scheme in ("http", "https"):
        if proxies.get(scheme):
            ProxyURL.parse(proxies[scheme], name=f"{scheme.upper()}_PROXY")


def proxy_for(base: UpstreamURL, proxies: Mapping[str, str]) -> ProxyURL | None:
    """The proxy for ``base`` (by its scheme), or None: no proxy set, or ``NO_PROXY`` matches."""
    url = proxies.get(base.scheme)
    if not url:
        return None
    if urllib.request.proxy_bypass_environment(base.host, proxies) or (
        ":" not in base.host
        and urllib.request.proxy_bypass_environment(f"{base.host}:{base.port}", proxies)
    ):
        return None
    return ProxyURL.parse(url, name=f"{base.scheme.upper()}_PROXY")


async def open_tunnel(proxy: ProxyURL, host: str, port: int, timeout: float) -> trio.abc.Stream:
    """TCP to ``proxy``, ``CONNECT host:port``; the returned stream is the tunnel.

    The TCP connect and the CONNECT exchange share ``timeout``. Raises UpstreamTimeout('connect')
    or UpstreamConnectError (unreachable proxy, a non-2xx answer, a broken reply); the socket is
    closed on every failure, cancellation included.
    """
    target = _authority(host, port)
    stream: trio.SocketStream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(proxy.host, proxy.port)
            leftover = await _connect_exchange(stream, proxy, target)
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        if isinstance(exc, trio.TooSlowError):
            raise UpstreamTimeout("connect", timeout) from None
        if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
            raise UpstreamConnectError(
                f"cannot reach proxy {proxy} for {target}: {exc!r}"
            ) from exc
        raise
    log.debug("tunnel to %s through proxy %s", target, proxy)
    return PrefixedStream(stream, leftover) if leftover else stream


async def _connect_exchange(stream: trio.abc.Stream, proxy: ProxyURL, target: str) -> bytes:
    """Send CONNECT, read the answer; return bytes that arrived after it (normally none)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    headers = [(b"host", target.encode("ascii"))]
    if proxy.authorization is not None:
        headers.append((b"proxy-authorization", proxy.authorization))
    request = h11.Request(method=b"CONNECT", target=target.encode("ascii"), headers=headers)
    await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise UpstreamConnectError(
                f"proxy {proxy} gave no valid answer to CONNECT {target}: {exc}"
            ) from exc
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RESPONSE_HEAD))
        elif type(event) is h11.Response:
            break
        # InformationalResponse (1xx): keep reading
    if not 200 <= event.status_code < 300:
        reason = event.reason.decode("latin-1")
        raise UpstreamConnectError(
            f"proxy {proxy} refused CONNECT {target}: {event.status_code} {reason}".rstrip()
        )
    data, _closed = conn.trailing_data
    return bytes(data)


class PrefixedStream(trio.abc.Stream):
    """A stream that first returns bytes already read from ``transport_stream``."""

    def __init__(self, transport_stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = transport_stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        n = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:n], self._prefix[n:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()

    @property
    def socket(self) -> Any:  # the raw socket underneath, where there is one (test fakes)
        return getattr(self.transport_stream, "socket", None)
