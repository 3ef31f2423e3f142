"""The proxy's own endpoints: ``/metrics``, health and readiness under ``/_trioproxy/``, the
usage page, and the 503 a draining process gives new requests.

None of these is forwarded upstream or recorded as usage: the app finalises them with
``Runtime.finish(ex, recorded=False)`` (an access line only; none for health and readiness
probes unless ``log_probes`` is on).

- ``GET /_trioproxy/healthz``: liveness, 200 while the process serves at all;
- ``GET /_trioproxy/readyz``: readiness, 503 while the process drains, or while the usage store
  is unreachable and the spill file cannot be written (its body says which, and the store's
  state);
- ``GET /metrics``: Prometheus text format (see :mod:`trioproxy.metrics`), for clients whose
  ``Host`` names this proxy, or that send the admin token (``metrics_require_token``);
- ``GET /health``: the readiness answer at the path benchmark clients probe before they start
  (vLLM's convention: AIPerf, vLLM ``bench serve``...). No provider API has this path.
"""

from __future__ import annotations

from typing import Any

from .access import admin_presented, refusal
from .dashboard import answer_dashboard
from .errors import ClientRequestError, ProxyError
from .exchange import Exchange
from .protocol.lifecycle import End
from .relay.responses import (
    PREFIX,
    RETRY_AFTER,
    Message,
    Receive,
    Send,
    answer,
    error_messages,
    json_answer,
    send_all,
)
from .runtime import Runtime

METRICS_PATH = b"/metrics"
HEALTH_PATH = b"/health"  # what benchmark clients probe (vLLM's convention)


PROBES = (PREFIX + b"healthz", PREFIX + b"readyz", HEALTH_PATH)


def is_probe(path: bytes) -> bool:
    """A health or readiness probe: a load balancer's, every few hundred ms per instance, so
    it writes no access line unless ``log_probes`` is on (and, like every own path, counts in
    no request metric)."""
    return path.split(b"?", 1)[0] in PROBES


def is_operational(path: bytes) -> bool:
    """The path is the proxy's own (never an upstream's)."""
    return (path in (METRICS_PATH, HEALTH_PATH) or path.startswith(PREFIX)
            or path == PREFIX.rstrip(b"/"))


def readiness(runtime: Runtime) -> tuple[int, dict[str, Any]]:
    """Whether this instance should get traffic: 503 while draining, while the usage writer
    thread keeps crashing, or while the usage store is down *and* the spill file cannot take
    the records (accounting would be lost); a store that is merely down is reported, not a
    reason (the records wait in memory, then on disk)."""
    stats = runtime.writer.statistics() if runtime.writer is not None else None
    store = None if stats is None else store_state(stats)
    extra: dict[str, Any] = {"store_available": True} if store is None else \
        {"store_available": store["available"], "store": store}
    if runtime.unready:
        return 503, {"status": "draining", **extra}
    if stats is not None and not stats.writer_running:
        return 503, {"status": "usage_writer_failed", **extra}
    if store is not None and not store["available"] and not store["spill_ok"]:
        return 503, {"status": "ledger_unavailable", **extra}
    return 200, {"status": "ready", **extra}


def store_state(stats: Any) -> dict[str, Any]:
    """The usage store's state for the readiness body (a ``WriterStatistics``)."""
    return {"available": stats.store_available, "outage_seconds": round(stats.outage_seconds, 1),
            "pending": stats.pending, "spilled": stats.spilled, "spill_ok": stats.spill_ok}


async def answer_operational(
    runtime: Runtime, ex: Exchange, scope: dict[str, Any], receive: Receive, send: Send
) -> None:
    """Answer a request for one of the proxy's own paths."""
    path = ex.path.split("?", 1)[0].encode("latin-1")
    ex.provider = "trioproxy"
    if path == METRICS_PATH and runtime.metrics is not None:
        if ex.method not in ("GET", "HEAD"):
            await send_all(send, ex, _not_allowed(ex))
            return
        refused = metrics_refusal(runtime, ex, scope)
        if refused is not None:
            await send_all(send, ex, refused)
            return
        runtime.metrics.refresh(**runtime.scrape_figures())
        body, content_type = runtime.metrics.render()
        await send_all(send, ex, answer(ex, 200, body, content_type.encode()))
        return
    if path in PROBES and ex.method in ("GET", "HEAD"):
        status, obj = (200, {"status": "alive"}) if path.endswith(b"healthz") \
            else readiness(runtime)
        if status != 200:
            ex.fail(End.REJECTED, f"not ready: {obj['status']}")
        await send_all(send, ex, json_answer(ex, status, obj))
        return
    if runtime.settings.dashboard and path.startswith(PREFIX.rstrip(b"/")) and \
            await answer_dashboard(runtime, ex, path, scope, receive, send):
        return
    exc = ClientRequestError(f"trioproxy has no page at {ex.path}", 404, "unknown_path")
    await send_all(send, ex, error_messages(ex, exc))


def metrics_refusal(runtime: Runtime, ex: Exchange, scope: dict[str, Any]) -> list | None:
    """401/403 for a scrape that may not read /metrics (see :mod:`trioproxy.access`): with
    ``metrics_require_token``, the admin token is needed (any Host); without, the Host must
    name this proxy."""
    settings = runtime.settings
    need_token = settings.metrics_require_token
    why = refusal(ex.request_headers, scope, settings, check_host=not need_token)
    status = 403
    if why is None and need_token and not admin_presented(
            ex.request_headers, settings.admin_token, bearer=True):
        why, status = "admin token required", 401
    if why is None:
        return None
    ex.fail(End.REJECTED, f"metrics: {why}")
    return json_answer(ex, status, {"error": why})


def _not_allowed(ex: Exchange) -> list[Message]:
    ex.fail(End.REJECTED, f"{ex.method} not allowed here")
    return answer(ex, 405, b"method not allowed\n", b"text/plain", [(b"allow", b"GET, HEAD")])


class Draining(ProxyError):
    status = 503
    kind = "rejected"
    code = "proxy_draining"


async def refuse_draining(runtime: Runtime, ex: Exchange, scope: dict[str, Any],
                          send: Send) -> None:
    """The 503 a draining process answers new requests with: in the provider's error shape,
    with ``retry-after``, and ``Connection: close`` on HTTP/1 (so the client's next request
    opens a connection, which a load balancer sends elsewhere). The body is not read."""
    runtime.refused += 1
    if scope.get("http_version", "1.1").startswith("1"):
        ex.close_connection = True
    messages = error_messages(ex, Draining(
        "trioproxy is shutting down and takes no new requests; retry (another instance)"))
    messages[0]["headers"].append((b"retry-after", RETRY_AFTER))
    await send_all(send, ex, messages)
