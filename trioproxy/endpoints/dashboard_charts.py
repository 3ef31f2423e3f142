"""The usage page's chart data, aggregated in the database and bounded whatever the traffic.

- ``ttft_cdf``: per model, the TTFT distribution as at most :data:`CDF_POINTS` points: the
  database splits each model's values into that many equal tiles (``NTILE``) and returns each
  tile's largest value and size, so a point is (value, share of requests at or below it).
- ``itl_cdf``: per model, the pooled inter-token gaps (every gap of every request, from the
  records' gap sketches, within 1 %) of the newest :data:`ITL_REQUESTS` requests, as (value,
  share of gaps at or below it) per sketch bucket (a few hundred at most).
- ``ttft_series``: TTFT p50 and p90 per model in at most :data:`SERIES_BUCKETS` time buckets
  (nearest rank from ``NTILE(10)`` tiles, so the p90 of a bucket with under ten requests is its
  maximum).
- ``waterfalls``: the newest :data:`WATERFALLS` measured requests, each as its timestamps in ms
  after the request reached the proxy: written upstream, response head, first token, last
  token, last byte; and the proxy's own time (before the request went upstream, and its mean
  delay per relayed chunk).

Spend per day is the page's ``by_day`` totals. Rows are the responses ``trioproxy latency``
counts (complete, 2xx, a generation API).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..accounting.store import Store

__all__ = ["CDF_POINTS", "SERIES_BUCKETS", "WATERFALLS", "chart_data"]

CDF_POINTS = 100
SERIES_BUCKETS = 96
SERIES_TILES = 10
ITL_REQUESTS = 2000
WATERFALLS = 12
_STEPS = (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_MEASURED = (
    "e2e_ms IS NOT NULL AND end_reason = 'complete' AND status >= 200 AND status < 300 "
    "AND api IN ('anthropic.messages', 'openai.chat', 'openai.responses') AND started_at >= ?"
)
_MODEL = "COALESCE(model, model_requested, '(unknown)')"
_WATERFALL = ("started_at", "model", "api", "proxy_request_ms", "upstream_head_ms", "ttft_ms",
              "last_token_ms", "e2e_ms", "proxy_relay_ms")


def chart_data(store: Store, since: float, now: float) -> dict[str, Any]:
    """The charts' data over ``[since, now)`` (see the module docs)."""
    step = next((s for s in _STEPS if (now - since) / s <= SERIES_BUCKETS), _STEPS[-1])
    return {
        "ttft_cdf": _cdfs(_tiles(store, since, [_MODEL], "ttft_ms", CDF_POINTS)),
        "itl_cdf": _itl_cdfs(store, since),
        "ttft_series": {"step": step, "models": _series(store, since, step)},
        "waterfalls": _waterfalls(store, since),
    }


def _query(store: Any, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    backend = store.backend
    with backend.cursor() as cur:
        cur.execute(backend.sql(sql), tuple(params))
        return cur.fetchall()


def _tiles(store: Store, since: float, keys: list[str], column: str,
           tiles: int) -> list[tuple[Any, ...]]:
    """(*keys, tile, largest value, rows) for ``column`` split into ``tiles`` equal tiles per
    key, in the database: at most ``tiles`` rows per key whatever the number of records."""
    names = ", ".join(f"k{i}" for i in range(len(keys)))
    selected = ", ".join(f"{expr} AS k{i}" for i, expr in enumerate(keys))
    sql = (f"SELECT {names}, t, MAX(v), COUNT(*) FROM ("
           f"SELECT {selected}, {column} AS v, NTILE({int(tiles)}) OVER "
           f"(PARTITION BY {', '.join(keys)} ORDER BY {column}) AS t "
           f"FROM usage_records WHERE {_MEASURED} AND {column} IS NOT NULL) AS tiled "
           f"GROUP BY {names}, t ORDER BY {names}, t")
    return _query(store, sql, (since,))


def _cdfs(rows: list[tuple[Any, ...]]) -> dict[str, list[list[float]]]:
    """{model: [[value, share at or below], ...]} from (model, tile, max, count) rows."""
    totals: dict[str, int] = {}
    for model, _, _, n in rows:
        totals[model] = totals.get(model, 0) + int(n)
    out: dict[str, list[list[float]]] = {}
    seen: dict[str, int] = {}
    for model, _, value, n in rows:
        seen[model] = seen.get(model, 0) + int(n)
        out.setdefault(model, []).append([round(float(value), 3),
                                          round(seen[model] / totals[model], 4)])
    return out


def _itl_cdfs(store: Store, since: float) -> dict[str, list[list[float]]]:
    from ..protocol.gapsketch import GapSketch

    rows = _query(store, f"SELECT {_MODEL}, itl_sketch FROM usage_records WHERE {_MEASURED} "
                  "AND itl_sketch IS NOT NULL ORDER BY started_at DESC LIMIT ?",
                  (since, ITL_REQUESTS))
    pooled: dict[str, GapSketch] = {}
    for model, text in rows:
        try:
            pooled.setdefault(model, GapSketch()).merge(GapSketch.decode(text))
        except (ValueError, TypeError):
            continue
    out = {}
    for model, sketch in sorted(pooled.items()):
        total, seen, points = sketch.count, 0, []
        for value, n in sketch.items():
            seen += n
            points.append([round(value, 3), round(seen / total, 4)])
        if points:
            out[model] = points
    return out


def _series(store: Store, since: float, step: int) -> dict[str, list[list[float]]]:
    """{model: [[bucket start, p50, p90, requests], ...]}: nearest-rank percentiles."""
    # floor(x) for x >= 0 in both dialects (ROUND goes half away from zero in both)
    bucket = f"ROUND(CAST((started_at - {float(since)!r}) / {int(step)} + 0.5 AS NUMERIC)) - 1"
    groups: dict[tuple[str, float], list[tuple[float, int]]] = {}
    for b, model, _, value, n in _tiles(store, since, [bucket, _MODEL], "ttft_ms", SERIES_TILES):
        groups.setdefault((model, float(b)), []).append((float(value), int(n)))
    out: dict[str, list[list[float]]] = {}
    for (model, b), tiles in sorted(groups.items()):
        total = sum(n for _, n in tiles)
        out.setdefault(model, []).append([
            since + max(b, 0.0) * step, _rank(tiles, 0.5 * total), _rank(tiles, 0.9 * total),
            total])
    return out


def _rank(tiles: list[tuple[float, int]], rank: float) -> float:
    seen = 0
    for value, n in tiles:
        seen += n
        if seen >= rank:
            return round(value, 3)
    return round(tiles[-1][0], 3)


def _waterfalls(store: Store, since: float) -> list[dict[str, Any]]:
    rows = _query(store, f"SELECT {', '.join(_WATERFALL)} FROM usage_records WHERE "
                  f"{_MEASURED} ORDER BY started_at DESC, request_id LIMIT ?",
                  (since, WATERFALLS))
    out = []
    for row in rows:
        r = dict(zip(_WATERFALL, row, strict=True))
        written = r["proxy_request_ms"]
        head = None if written is None or r["upstream_head_ms"] is None else (
            written + r["upstream_head_ms"])
        out.append({"started_at": r["started_at"], "model": r["model"], "api": r["api"],
                    "written_ms": written, "head_ms": head, "first_token_ms": r["ttft_ms"],
                    "last_token_ms": r["last_token_ms"], "last_byte_ms": r["e2e_ms"],
                    "proxy_ms": written, "proxy_relay_ms": r["proxy_relay_ms"]})
    return out
