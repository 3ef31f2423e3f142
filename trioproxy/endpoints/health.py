"""This instance's health: liveness, readiness, and the 503 a draining process gives new
requests.

- ``GET /_trioproxy/healthz``: liveness, 200 while the process serves at all;
- ``GET /_trioproxy/readyz``: readiness, 503 while the process drains, or while the usage store
  is unreachable and the spill file cannot be written (its body says which, and the store's
  state);
- ``GET /health``: the readiness answer at the path benchmark clients probe before they start
  (vLLM's convention: AIPerf, vLLM ``bench serve``...). No provider API has this path.
"""

from __future__ import annotations

from typing import Any

from ..asgi import RETRY_AFTER, Scope, Send, error_messages, json_answer, send_all
from ..errors import ProxyError
from ..exchange import Exchange
from ..protocol.lifecycle import End
from ..protocol.routing import HEALTH_PATH, OWN_PREFIX
from ..runtime import Runtime

PROBES = (OWN_PREFIX + b"healthz", OWN_PREFIX + b"readyz", HEALTH_PATH)


def is_probe(path: bytes) -> bool:
    """A health or readiness probe: a load balancer's, every few hundred ms per instance, so
    it writes no access line unless ``log_probes`` is on (and, like every own path, counts in
    no request metric)."""
    return path.split(b"?", 1)[0] in PROBES


async def answer_probe(runtime: Runtime, ex: Exchange, path: bytes, send: Send) -> None:
    """``healthz`` (200 while the process serves at all) or readiness (:func:`readiness`)."""
    status, obj = (200, {"status": "alive"}) if path.endswith(b"healthz") \
        else readiness(runtime)
    if status != 200:
        ex.fail(End.REJECTED, f"not ready: {obj['status']}")
    await send_all(send, ex, json_answer(ex, status, obj))


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


class Draining(ProxyError):
    status = 503
    kind = "rejected"
    code = "proxy_draining"


async def refuse_draining(runtime: Runtime, ex: Exchange, scope: Scope,
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
