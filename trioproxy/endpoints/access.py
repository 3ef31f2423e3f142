"""Who may read the proxy's own data (the usage page's data, ``/metrics``).

Two rules guard what a browser could be tricked into reading for another site:

- **Host**: a page of another site whose name re-resolves to 127.0.0.1 (DNS rebinding) reaches
  the proxy from a loopback peer, but its requests name that site in ``Host``. Wherever access
  rests on who the peer is (no token asked for), the ``Host`` must be one of this proxy's own
  names: a loopback address (``127.0.0.0/8``, ``[::1]``), ``localhost`` (and ``*.localhost``,
  which browsers resolve themselves), the address the client connected to, the ``host``
  setting, or a name in ``allowed_hosts`` (``*``: any).
- **Origin**: a request that carries a foreign ``Origin`` (another site's script, or
  ``null``) is refused, token or not; a browser on the page itself sends its own origin, and
  scrapers and command-line clients send none.

Health and readiness are not data: they stay open to everyone.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from ..config.settings import Settings
from ..protocol.headers import Headers

__all__ = ["admin_presented", "host_allowed", "origin_allowed", "refusal"]


def _header(headers: Headers, name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _split_host(host: str) -> str:
    """The name or address of a ``Host`` value, lower case, without port, brackets or the
    trailing dot of a fully qualified name."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def allowed_names(settings: Settings) -> frozenset[str]:
    names = {n.strip().lower().rstrip(".") for n in settings.allowed_hosts.split(",")}
    names.add(_split_host(settings.host))
    return frozenset(n for n in names if n)


def host_allowed(host: str | None, server: Sequence[Any] | None, settings: Settings) -> bool:
    """``host`` (the request's ``Host`` value) names this proxy; ``server`` is the ASGI
    scope's ``server`` (the address the client connected to)."""
    allowed = allowed_names(settings)
    if "*" in allowed:
        return True
    name = _split_host(host or "")
    if not name:
        return False
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    address = _ip(name)
    if address is None:
        return False
    if address.is_loopback:
        return True
    own = _ip(str(server[0])) if server else None
    return own is not None and own == address


def origin_allowed(headers: Headers) -> bool:
    """No ``Origin``, or the same host and port as ``Host`` (the page's own scripts)."""
    origin = _header(headers, b"origin")
    if origin is None:
        return True
    host = _header(headers, b"host")
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
        return False  # "null" (a sandboxed or file page), or nonsense
    default = "443" if parts.scheme == "https" else "80"
    return _with_port(parts.netloc, default) == _with_port(host, default)


def _with_port(netloc: str, default: str) -> str:
    netloc = netloc.strip().lower()
    tail = netloc.rpartition("]")[2] if netloc.startswith("[") else netloc
    return netloc if ":" in tail else f"{netloc}:{default}"


def admin_presented(headers: Headers, token: str | None, *, bearer: bool = False) -> bool:
    """The request carries the admin token: ``x-trioproxy-admin-token``, or with ``bearer``
    also ``Authorization: Bearer`` (what Prometheus sends)."""
    if not token:
        return False
    want = token.encode()
    for key, value in headers:
        if key == b"x-trioproxy-admin-token" and hmac.compare_digest(value, want):
            return True
        if bearer and key == b"authorization":
            scheme, _, given = value.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), want):
                return True
    return False


def refusal(headers: Headers, scope: dict[str, Any], settings: Settings, *,
            check_host: bool) -> str | None:
    """Why this request may not read the proxy's data (None: it may, as far as the Host and
    Origin rules go)."""
    if not origin_allowed(headers):
        return "foreign origin: this data is only for the proxy's own page"
    if check_host and not host_allowed(_header(headers, b"host"), scope.get("server"), settings):
        return ("host not allowed: name this proxy by a loopback address or localhost, or add "
                "the name to the allowed_hosts setting")
    return None
