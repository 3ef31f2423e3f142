"""``GET /metrics``: the Prometheus text format (see :mod:`trioproxy.metrics`), for clients whose
``Host`` names this proxy, or that send the admin token (``metrics_require_token``)."""

from __future__ import annotations

from ..asgi import Message, Scope, Send, answer, json_answer, send_all
from ..exchange import Exchange
from ..protocol.lifecycle import End
from ..runtime import Runtime
from .access import admin_presented, refusal


async def answer_metrics(runtime: Runtime, ex: Exchange, scope: Scope, send: Send) -> None:
    """The scrape, or 405 / 401 / 403 (see :func:`metrics_refusal`)."""
    assert runtime.metrics is not None
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


def metrics_refusal(runtime: Runtime, ex: Exchange, scope: Scope) -> list | None:
    """401/403 for a scrape that may not read /metrics (see :mod:`trioproxy.endpoints.access`): with
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
