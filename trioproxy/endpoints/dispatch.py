"""The proxy's own paths (:func:`~trioproxy.protocol.routing.is_own_path`), each sent to its
endpoint. None of these is forwarded upstream or recorded as usage: the app finalises them with
``Runtime.finalise(ex, recorded=False)`` (an access line only; none for health and readiness
probes unless ``log_probes`` is on)."""

from __future__ import annotations

from ..asgi import Receive, Scope, Send, error_messages, send_all
from ..errors import ClientRequestError
from ..exchange import Exchange
from ..protocol.routing import METRICS_PATH, OWN_PREFIX
from ..runtime import Runtime
from .dashboard import answer_dashboard
from .health import PROBES, answer_probe
from .metrics import answer_metrics


async def answer_own(runtime: Runtime, ex: Exchange, scope: Scope, receive: Receive,
                     send: Send) -> None:
    """Answer a request for one of the proxy's own paths (404 in the OpenAI shape if none)."""
    path = ex.path.split("?", 1)[0].encode("latin-1")
    ex.provider = "trioproxy"
    if path == METRICS_PATH and runtime.metrics is not None:
        await answer_metrics(runtime, ex, scope, send)
    elif path in PROBES and ex.method in ("GET", "HEAD"):
        await answer_probe(runtime, ex, path, send)
    elif not (runtime.settings.dashboard and path.startswith(OWN_PREFIX.rstrip(b"/")) and
              await answer_dashboard(runtime, ex, path, scope, receive, send)):
        exc = ClientRequestError(f"trioproxy has no page at {ex.path}", 404, "unknown_path")
        await send_all(send, ex, error_messages(ex, exc))
