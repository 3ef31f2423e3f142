"""Prometheus metrics: the OpenTelemetry GenAI histograms and the proxy's own figures.

One :class:`Metrics` per app (its own registry; nothing at module level). Exchanges are observed
once, at finalisation (:meth:`Metrics.observe`, a finaliser): nothing runs per chunk. Figures
that live elsewhere (streams in flight, upstream connections per origin, the usage writer's
queue) are read when ``/metrics`` is scraped (:meth:`Metrics.refresh`).

Labels carry bounded values only: provider, api, the model as answered (at most
:data:`MAX_MODELS` distinct names per process, given only to models answered with a 2xx, half
of them at most to names the price table does not know; the rest counted as ``other``), status
class and end reason; never a request id, key, session or path.

Under ``trioproxy serve --workers N`` prometheus_client runs in its multiprocess mode (serve
points ``PROMETHEUS_MULTIPROC_DIR`` at a private directory before the workers start): every
worker writes its values to files there, and a scrape answered by any worker sums them, each
worker counted once. Then each worker also publishes its read-at-scrape figures every
:data:`PUBLISH_INTERVAL` seconds (:meth:`Metrics.run_publisher`), so the others' are at most
that old.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping
from typing import Any

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)

from .accounting.prices import known_model
from .exchange import Exchange

__all__ = ["DURATION_BUCKETS", "MAX_MODELS", "TOKEN_BUCKETS", "Metrics", "multiprocess_mode"]

# OpenTelemetry GenAI semantic conventions: the advised explicit bucket boundaries.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TTFC_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0)
TPOC_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4 ** i) for i in range(14))  # 1, 4, 16, ... 67108864
MAX_MODELS = 50  # distinct model label values per process; later ones become "other"
MAX_MODEL_LABEL = 128  # characters of a model name kept in a label
MAX_CHILDREN = 4096  # labelled children kept by Metrics._child
PUBLISH_INTERVAL = 1.0  # seconds, multiprocess mode only

_EXCHANGE = ("provider", "api", "model", "status_class", "end_reason")
_STREAM = ("provider", "api", "model")


def multiprocess_mode() -> bool:
    """prometheus_client chose its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` was set
    when it was imported)."""
    return values.ValueClass is not values.MutexValue


def label_model(ex: Exchange, usage: Any) -> str | None:
    """The model an exchange is labelled with: as answered, else as requested when the upstream
    accepted the request. A name the upstream refused is the client's word alone: labelling by
    it would let made-up names use up the ``max_models`` labels."""
    answered = getattr(usage, "model", None)
    if answered:
        return answered
    return ex.model_requested if ex.status is not None and 200 <= ex.status < 300 else None


def _files_collector() -> type:
    """prometheus_client's multiprocess collector, skipping a file another worker has just
    created and not sized yet (empty: reading it raised, failing that scrape)."""
    from prometheus_client.multiprocess import MultiProcessCollector

    class FilesCollector(MultiProcessCollector):
        def collect(self) -> Any:
            files = [f for f in glob.glob(os.path.join(self._path, "*.db"))
                     if _size(f) > 0]
            return self.merge(files, accumulate=True)

    return FilesCollector


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # removed meanwhile (a worker marked dead)
        return 0


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


class Metrics:
    """The app's instruments and its registry. ``multiprocess`` defaults to the library's mode."""

    def __init__(self, *, multiprocess: bool | None = None, max_models: int = MAX_MODELS,
                 accounting: bool = True) -> None:
        """``accounting``: there is a usage writer (its queue and store figures are shown)."""
        self.multiprocess = multiprocess_mode() if multiprocess is None else multiprocess
        # Multiprocess: no collect at registration; it read every worker's file, and one that a
        # worker starting beside this one had just created (still empty) failed the start-up.
        self.registry = CollectorRegistry(auto_describe=not self.multiprocess)
        if self.multiprocess:
            _files_collector()(self.registry)
            reg = None  # the instruments write files; the collector reads every worker's
        else:
            from prometheus_client.process_collector import ProcessCollector

            ProcessCollector(registry=self.registry)
            reg = self.registry
        self._models: set[str] = set()
        self._unknown = 0  # labels given to names the price table does not know
        self._max_models = max_models
        self._published: dict[tuple[str, ...], float] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see _child
        self._define(reg)
        if accounting:
            self._define_writer(reg)

    def _define(self, reg: CollectorRegistry | None) -> None:
        live = {"multiprocess_mode": "livesum"}
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: request received to response ended",
            _EXCHANGE, buckets=DURATION_BUCKETS, registry=reg)
        self.ttfc = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the first content chunk of a streamed response", _STREAM,
            buckets=TTFC_BUCKETS, registry=reg)
        self.tpoc = Histogram(
            "gen_ai_client_operation_time_per_output_chunk_seconds",
            "Time per output chunk after the first: one observation per streamed response, "
            "its median chunk gap", _STREAM, buckets=TPOC_BUCKETS, registry=reg)
        self.tokens = Histogram(
            "gen_ai_client_token_usage", "Tokens used per response (input includes cache)",
            (*_STREAM, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=reg)
        self.requests = Counter(
            "trioproxy_requests", "Proxied requests (WebSocket responses) by outcome",
            _EXCHANGE, registry=reg)
        self.cost = Counter("trioproxy_cost_usd", "Cost of the usage in US dollars",
                            ("provider", "model"), registry=reg)
        self.in_flight = Gauge("trioproxy_streams_in_flight",
                               "Requests and WebSocket connections being relayed", registry=reg,
                               **live)
        self.draining = Gauge("trioproxy_draining", "1 while the process drains before exit",
                              registry=reg, multiprocess_mode="livemax")
        self.restarts = Gauge("trioproxy_worker_restarts",
                              "Worker processes trioproxy serve restarted after they died",
                              registry=reg, multiprocess_mode="livemax")
        self.conns = Gauge("trioproxy_upstream_connections",
                           "Upstream connections per origin: in use or idle (kept alive)",
                           ("origin", "state"), registry=reg, **live)
        self.pool_waiting = Gauge("trioproxy_upstream_pool_waiting",
                                  "Requests waiting now for a free upstream connection",
                                  ("origin",), registry=reg, **live)
        self.pool_waits = Counter("trioproxy_upstream_pool_waits",
                                  "Requests that had to wait for a free upstream connection",
                                  ("origin",), registry=reg)

    def _define_writer(self, reg: CollectorRegistry | None) -> None:
        live = {"multiprocess_mode": "livesum"}
        self.queue = Gauge("trioproxy_usage_queue_depth",
                           "Usage records in memory waiting for the store", registry=reg, **live)
        self.store_up = Gauge("trioproxy_usage_store_up",
                              "1 when the last usage-store attempt succeeded", registry=reg,
                              multiprocess_mode="livemin")
        self.outage = Gauge("trioproxy_usage_store_outage_seconds",
                            "Seconds the usage store has been unavailable (0 while it is up)",
                            registry=reg, multiprocess_mode="livemax")
        self.spilled = Counter("trioproxy_usage_records_spilled",
                               "Usage records written to the spill file", registry=reg)

    # -- per exchange (a finaliser) ---------------------------------------------------------------

    def model_label(self, model: str | None, *, provider: str | None = None,
                    claim: bool = True) -> str:
        """``model`` itself (cut to ``MAX_MODEL_LABEL`` characters) once it has a label, else
        ``other``. A new name gets a label only with ``claim`` (the upstream answered 2xx)
        while labels are free; names the price table does not know (an upstream may echo any
        name it is sent) get at most half of them, so the priced models keep theirs."""
        if not model:
            return "none"
        model = model[:MAX_MODEL_LABEL]
        if model in self._models:
            return model
        if not claim or len(self._models) >= self._max_models:
            return "other"
        if not known_model(model, provider):
            if self._unknown >= self._max_models // 2:
                return "other"
            self._unknown += 1
        self._models.add(model)
        return model

    def observe(self, ex: Exchange) -> None:
        """Observe one finalised exchange: outcome, duration, tokens, cost, TTFT and chunk gaps."""
        usage = ex.usage()
        provider, api = ex.provider or "unknown", ex.api()
        answered_2xx = ex.status is not None and 200 <= ex.status < 300
        model = self.model_label(label_model(ex, usage), provider=provider, claim=answered_2xx)
        end = ex.end_reason or "unknown"
        child = self._child
        labels = (provider, api, model, status_class(ex.status), end)
        child(self.requests, labels).inc()
        if ex.finalised_at is not None:
            child(self.duration, labels).observe(max(0.0, ex.finalised_at - ex.started))
        if usage is not None and usage.known:
            for kind, count in (("input", usage.input_tokens), ("output", usage.output_tokens)):
                if count is not None:
                    child(self.tokens, (provider, api, model, kind)).observe(count)
            cost = ex.cost_usd()
            if cost:
                child(self.cost, (provider, model)).inc(cost)
        latency = ex.latency()
        if latency is not None and ex.streamed:
            if latency.ttft_ms is not None:
                child(self.ttfc, (provider, api, model)).observe(latency.ttft_ms / 1000)
            if latency.itl_p50_ms is not None:
                child(self.tpoc, (provider, api, model)).observe(latency.itl_p50_ms / 1000)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, kept: ``labels()`` validates and locks on every call.
        Bounded (label values are bounded anyway); the metrics keep their own children."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= MAX_CHILDREN:
                self._children.clear()
            found = self._children[key] = metric.labels(*labels)
        return found

    # -- read at scrape time -----------------------------------------------------------------

    def refresh(
        self, *, in_flight: int, draining: bool, pool: Mapping[str, Mapping[str, int]],
        writer: Any = None, worker_restarts: int = 0,
    ) -> None:
        """Set the figures that live elsewhere: ``pool`` is ``UpstreamPool.origin_statistics()``,
        ``writer`` a ``WriterStatistics`` (None without accounting)."""
        self.in_flight.set(in_flight)
        self.draining.set(1 if draining else 0)
        self.restarts.set(worker_restarts)
        for origin, stats in pool.items():
            self.conns.labels(origin, "in_use").set(stats["in_use"])
            self.conns.labels(origin, "idle").set(stats["idle"])
            self.pool_waiting.labels(origin).set(stats["waiting"])
            self._advance(self.pool_waits.labels(origin), ("waits", origin), stats["waits"])
        if writer is not None and hasattr(self, "queue"):
            self.queue.set(writer.pending)
            self.store_up.set(1 if writer.store_available else 0)
            self.outage.set(writer.outage_seconds)
            self._advance(self.spilled, ("spilled",), writer.spilled)

    def _advance(self, counter: Any, key: tuple[str, ...], total: float) -> None:
        """Bring a counter up to a running total kept elsewhere."""
        delta = total - self._published.get(key, 0)
        if delta > 0:
            counter.inc(delta)
            self._published[key] = total

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def run_publisher(
        self, read: Callable[[], dict[str, Any]], interval: float = PUBLISH_INTERVAL
    ) -> None:
        """Multiprocess mode: publish ``refresh(**read())`` every ``interval`` until cancelled."""
        while True:
            self.refresh(**read())
            await trio.sleep(interval)


