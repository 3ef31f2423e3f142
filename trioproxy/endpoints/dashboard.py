"""The usage page at ``/_trioproxy/``: plain HTML, CSS and a little JavaScript from package data,
fed by ``GET /_trioproxy/api/usage?days=N`` (JSON).

Who may read it: with ``admin_token`` set, a client that sends it (``x-trioproxy-admin-token``,
as for ``GET /v1/usage/{id}``) or that logged in with it through the page's form (an HttpOnly
cookie holding an HMAC of the token, never the token); without one, loopback clients only. The
page itself holds no data and is served to anyone who may reach the proxy.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import trio

from ..accounting.locations import open_store
from ..accounting.store import Store
from ..asgi import (
    Receive,
    Send,
    answer,
    json_answer,
    send_all,
)
from ..config.settings import Settings
from ..exchange import Exchange
from ..protocol.lifecycle import End
from ..protocol.routing import OWN_PREFIX
from ..runtime import Runtime
from .access import admin_presented, refusal

COOKIE = "trioproxy_admin"
DAY = 86400.0
RECENT = 25  # last requests shown
MIN_DAYS, MAX_DAYS = 1 / 24, 366.0  # the page's window: an hour to a year
CLOSE_WAIT = 2.0  # seconds shutdown gives the page's store connection to let go
STATEMENTS = 4  # the whole page may take this many store_timeouts (each statement takes one)
KEEP_SLOW, KEEP_MAX, KEEP_WINDOWS = 1.0, 60.0, 8  # a page that took >= 1 s is kept (see below)
_STATIC = {
    b"": ("dashboard.html", b"text/html; charset=utf-8"),
    b"dashboard.js": ("dashboard.js", b"text/javascript; charset=utf-8"),
    b"dashboard.css": ("dashboard.css", b"text/css; charset=utf-8"),
    # the charts: uPlot (MIT, vendored from the npm registry with its licence) and their code
    b"dashboard_charts.js": ("dashboard_charts.js", b"text/javascript; charset=utf-8"),
    b"uPlot.iife.min.js": ("uPlot.iife.min.js", b"text/javascript; charset=utf-8"),
    b"uPlot.min.css": ("uPlot.min.css", b"text/css; charset=utf-8"),
    b"uPlot.LICENSE.txt": ("uPlot.LICENSE.txt", b"text/plain; charset=utf-8"),
}
_PAGE_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class UsageReader:
    """The page's own store connection: opened on first use in a worker thread, one call at a
    time, closed by :meth:`aclose` (the app's lifespan). Every query is bounded by the store's
    own timeout (``store_timeout``); :meth:`aclose` interrupts a running one and never waits
    for it. A page that took the database long (a year of a big ledger) is kept for a while,
    and browsers refreshing meanwhile share it (its ``generated_at`` says how old it is)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: Store | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._lock = trio.Lock()  # one computation at a time: the others wait for its result
        self._kept: dict[float, tuple[float, dict[str, Any]]] = {}  # days -> (until, page)
        self._closed = False

    async def summary(self, days: float) -> dict[str, Any]:
        """Spend and tokens by model and by day, latency by model, the last requests."""
        async with self._lock:
            kept = self._kept.get(days)
            if kept is not None and trio.current_time() < kept[0]:
                return kept[1]
            started = trio.current_time()
            now = time.time()
            with trio.fail_after(self._settings.store_timeout * STATEMENTS):
                page = await trio.to_thread.run_sync(
                    self._summary, now - days * DAY, now, limiter=self._limiter,
                    abandon_on_cancel=True)
            took = trio.current_time() - started
            if took >= KEEP_SLOW:  # keep it three times as long as it took, a minute at most
                if len(self._kept) >= KEEP_WINDOWS:
                    self._kept.pop(next(iter(self._kept)))
                self._kept[days] = (trio.current_time() + min(3 * took, KEEP_MAX), page)
            return page

    def _summary(self, since: float, now: float) -> dict[str, Any]:
        try:
            if self._closed:
                raise RuntimeError("the usage page's reader is closed")
            store = self._store = self._store or open_store(
                self._settings.database_url, data_home=self._settings.data_home,
                timeout=self._settings.store_timeout, bound_reads=True)
            return usage_summary(store, since, now)
        except Exception:
            self._close()
            raise

    def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001, S110 - closing a broken connection
                pass

    async def aclose(self) -> None:
        """Interrupt a running query, then close; bounded (a thread that does not let go is
        left behind: the process is stopping)."""
        self._closed = True
        store = self._store
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
            if store is not None:  # SQLite: at once; PostgreSQL: a cancel request
                await trio.to_thread.run_sync(store.interrupt, abandon_on_cancel=True)
            await trio.to_thread.run_sync(self._close, limiter=self._limiter,
                                          abandon_on_cancel=True)


def usage_summary(store: Store, since: float, now: float) -> dict[str, Any]:
    """The page's data from ``store`` over ``[since, now)``: every figure is aggregated by the
    database (nothing here grows with the number of rows)."""
    from .dashboard_charts import chart_data

    return {
        "object": "trioproxy.usage_page", "since": since, "generated_at": now,
        "by_model": [_totals(g) for g in store.aggregate("model", since)],
        "by_day": [_totals(g) for g in store.aggregate("day", since)],
        "latency": store.latency_summary(since, None),
        "recent": [{
            "started_at": r.started_at, "model": r.model or r.model_requested, "api": r.api,
            "status": r.status, "end_reason": r.end_reason, "streamed": r.streamed,
            "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
            "cost_usd": r.cost_usd, "duration_ms": r.duration_ms,
        } for r in store.recent(RECENT, since)],
        "charts": chart_data(store, since, now),
    }


def _totals(group: dict[str, Any]) -> dict[str, Any]:
    keys = ("group", "requests", "input_tokens", "output_tokens", "cache_read_tokens",
            "cost_usd", "outcomes")
    return {k: group[k] for k in keys}


# -- access ----------------------------------------------------------------------------------


def cookie_value(secret: bytes, token: str) -> str:
    return hmac.new(secret, b"usage-page:" + token.encode(), hashlib.sha256).hexdigest()


def may_read(runtime: Runtime, ex: Exchange, scope: dict[str, Any]) -> bool:
    token = runtime.settings.admin_token
    if not token:
        return _loopback(scope)
    if admin_presented(ex.request_headers, token):
        return True
    want = cookie_value(runtime.secret, token)
    return any(hmac.compare_digest(v, want) for v in _cookies(ex.request_headers, COOKIE))


def _loopback(scope: dict[str, Any]) -> bool:
    client = scope.get("client")
    try:
        return client is not None and ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def _refused(runtime: Runtime, ex: Exchange, scope: dict[str, Any]) -> list | None:
    """The answer for a client that may not read the page's data, else None. Without an
    admin token the peer's address is all there is: then the Host must name this proxy too
    (see :mod:`trioproxy.endpoints.access`)."""
    token = runtime.settings.admin_token
    why = refusal(ex.request_headers, scope, runtime.settings, check_host=not token)
    status = 403
    if why is None and not may_read(runtime, ex, scope):
        why, status = ("admin token required", 401) if token else ("loopback only", 403)
    if why is None:
        return None
    ex.fail(End.REJECTED, f"usage page: {why}")
    return json_answer(ex, status, {"error": why})


def _days(scope: dict[str, Any]) -> float | None:
    """``?days=N`` (default 7): a number of days from an hour to 366; None when it is not."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    try:
        days = float(query.get("days", ["7"])[0])
    except ValueError:
        return None
    return days if MIN_DAYS <= days <= MAX_DAYS else None  # NaN compares False


def _cookies(headers: list[tuple[bytes, bytes]], name: str) -> list[str]:
    found = []
    for key, value in headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                k, _, v = part.strip().partition("=")
                if k == name:
                    found.append(v)
    return found


# -- routes ----------------------------------------------------------------------------------


async def answer_dashboard(
    runtime: Runtime, ex: Exchange, path: bytes, scope: dict[str, Any], receive: Receive,
    send: Send,
) -> bool:
    """Answer a page request; False when ``path`` is not one of the page's."""
    rest = path[len(OWN_PREFIX):] if path.startswith(OWN_PREFIX) else b""
    if rest == b"login" and ex.method == "POST":
        await send_all(send, ex, await _login(runtime, ex, scope, receive))
        return True
    if ex.method not in ("GET", "HEAD"):
        return False
    if path == OWN_PREFIX.rstrip(b"/"):
        await send_all(send, ex, answer(ex, 308, b"", b"text/plain", [(b"location", OWN_PREFIX)]))
        return True
    if rest in _STATIC:
        name, content_type = _STATIC[rest]
        body = resources.files("trioproxy.endpoints.static").joinpath(name).read_bytes()
        await send_all(send, ex, answer(ex, 200, body, content_type, _PAGE_HEADERS))
        return True
    if rest == b"api/usage":
        await send_all(send, ex, await _usage_json(runtime, ex, scope))
        return True
    return False


async def _usage_json(runtime: Runtime, ex: Exchange, scope: dict[str, Any]) -> list:
    refused = _refused(runtime, ex, scope)
    if refused is not None:
        return refused
    if runtime.reader is None:
        ex.fail(End.REJECTED, "usage page: accounting is off")
        return json_answer(ex, 404, {"error": "accounting is off: nothing is recorded"})
    days = _days(scope)
    if days is None:
        ex.fail(End.REJECTED, "usage page: bad days")
        return json_answer(ex, 400, {"error": f"days must be a number from {MIN_DAYS:.4g} "
                                              f"(an hour) to {MAX_DAYS:g}"})
    try:
        data = await runtime.reader.summary(days)
    except Exception as exc:  # noqa: BLE001 - the store is down, or slow: say so, stay up
        ex.fail(End.REJECTED, f"usage store unavailable: {type(exc).__name__}")
        return json_answer(ex, 503, {"error": f"usage store unavailable: {type(exc).__name__}"})
    data["days"] = days
    return json_answer(ex, 200, data)


async def _login(runtime: Runtime, ex: Exchange, scope: dict[str, Any], receive: Receive) -> list:
    """The page's form posts the admin token here; a good one gets the cookie."""
    body = b""
    with trio.move_on_after(10):
        while len(body) <= 4096:
            message = await receive()
            body += message.get("body", b"")
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
    ex.close_connection = len(body) > 4096
    given = parse_qs(body.decode("latin-1")[:4096]).get("token", [""])[0]
    token = runtime.settings.admin_token
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        ex.fail(End.REJECTED, "usage page: wrong admin token")
        return answer(ex, 303, b"", b"text/plain", [(b"location", OWN_PREFIX + b"?login=failed")])
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    cookie = (f"{COOKIE}={cookie_value(runtime.secret, token)}; Path=/_trioproxy/; HttpOnly; "
              f"SameSite=Strict; Max-Age=2592000{secure}")
    return answer(ex, 303, b"", b"text/plain",
                  [(b"location", OWN_PREFIX), (b"set-cookie", cookie.encode())])
