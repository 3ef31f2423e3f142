"""Latency percentiles of stored requests, per group: TTFT, ITL, TPOT, e2e and tokens/s. Used
by ``trioproxy latency`` and by the usage page.

Works on rows, one per request: an iterable of dicts with the keys of :data:`ROW_KEYS` (the
figures of :class:`trioproxy.protocol.latency.Latency` plus the record's identity):

- ``started_at`` (unix seconds), ``model``, ``provider``, ``api``, ``key_fingerprint``,
  ``session_id``: what rows are grouped by (``--by hour`` uses the UTC hour of ``started_at``);
- ``ttft_ms``, ``tpot_ms``, ``duration_ms``, ``tokens_per_s``, ``output_tokens``;
- ``itl_p50_ms``, ``itl_p90_ms``, ``itl_p99_ms``, ``itl_max_ms`` and ``itl_count`` (the
  number of gaps; optional): the request's own inter-token latency summary;
- ``itl_sketch`` (optional): every gap of the request, as
  :class:`trioproxy.protocol.gapsketch.GapSketch` text; ``last_token_ms`` (optional).

Any figure may be None (not streamed, cut short...): the row then counts for the others only.
The store provides them as ``store.latency_rows(since, until)``.

TTFT, TPOT, e2e and tokens/s percentiles are exact over the requests' values (linear
interpolation, as numpy and vLLM compute them). ITL percentiles pool the gaps of all requests
(as vLLM ``bench serve`` does): from the requests' merged gap sketches (:func:`pooled_gaps`),
within 1 % of the exact percentile of all the gaps. When a request in the group was recorded
without a sketch (before they were stored), they are *estimated* instead: each request stands for a distribution whose CDF runs linearly through
(lo, 0), (p50, 0.5), (p90, 0.9), (p99, 0.99), (max, 1), where lo = p50 - 1.25 (p90 - p50)
(at least 0) mirrors the density between p50 and p90 below p50, as no minimum is stored;
the requests are mixed in proportion
to ``itl_count`` (equally when a row lacks it) and the mixture's quantiles are read off exactly.
One request alone gives back its own p50/p90/p99; the ITL mean (total decode time / gaps,
from ``tpot_ms``, ``output_tokens`` and ``itl_count``) is exact.

A percentile is printed only with enough samples (:data:`MIN_SAMPLES`: p90 needs 10, p99 100);
otherwise the table says ``n<10`` / ``n<100`` and JSON / CSV give null / an empty cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from ..protocol.gapsketch import GapSketch
from ..protocol.latency import percentile

__all__ = ["FIELD", "GROUP_BY", "METRICS", "MIN_SAMPLES", "ROW_KEYS", "group_of", "itl_knots",
           "mixture_quantiles", "number", "pooled_gaps", "summarize_latency"]

ROW_KEYS = (
    "started_at", "model", "provider", "api", "key_fingerprint", "session_id", "ttft_ms",
    "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms", "itl_count", "tpot_ms",
    "tokens_per_s", "duration_ms", "output_tokens", "last_token_ms", "itl_sketch",
)
GROUP_BY = ("model", "provider", "api", "key", "session", "hour")
_GROUP_FIELD = {"key": "key_fingerprint", "session": "session_id"}
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "last_token_ms", "tokens_per_s")
FIELD = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "e2e_ms": "duration_ms",
          "last_token_ms": "last_token_ms", "tokens_per_s": "tokens_per_s"}
MIN_SAMPLES = {"p50": 1, "p90": 10, "p99": 100}
_QUANTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
_ITL_KNOTS = (("itl_p50_ms", 0.5), ("itl_p90_ms", 0.9), ("itl_p99_ms", 0.99), ("itl_max_ms", 1.0))


def number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def group_of(row: dict[str, Any], group_by: str) -> str:
    if group_by == "hour":
        started = number(row.get("started_at"))
        if started is None:
            return "(unknown)"
        return datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%dT%H:00Z")
    value = row.get(_GROUP_FIELD.get(group_by, group_by))
    return str(value) if value is not None else "(unknown)" if group_by == "model" else "(none)"


def _stats(values: list[float], mean: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(values)}
    ordered = sorted(values)
    for name, q in _QUANTILES:
        enough = ordered and len(ordered) >= MIN_SAMPLES[name]
        out[name] = round(percentile(ordered, q), 3) if enough else None
    if mean is None and values:
        mean = sum(values) / len(values)
    out["mean"] = round(mean, 3) if mean is not None else None
    return out


def itl_knots(row: dict[str, Any]) -> list[float] | None:
    xs = [number(row.get(key)) for key, _ in _ITL_KNOTS]
    return None if any(x is None for x in xs) else xs  # type: ignore[return-value]


def mixture_quantiles(
    summaries: Sequence[tuple[float, Sequence[float]]], qs: Sequence[float]
) -> list[float]:
    """Quantiles (``qs`` in percent, ascending) of a weighted mixture of per-request ITL
    distributions, each given as (weight, [p50, p90, p99, max]) with a CDF linear between
    (lo, 0) and those knots (see the module docs). Empty when there is nothing."""
    events: list[tuple[float, float, float]] = []  # (x, jump in mass, change of density)
    total = 0.0
    for weight, knots in summaries:
        f0 = 0.0
        x0 = max(0.0, knots[0] - 1.25 * max(0.0, knots[1] - knots[0]))
        for x, (_, f) in zip(knots, _ITL_KNOTS, strict=True):
            x, mass = max(x, x0), (f - f0) * weight
            if x > x0:
                events += [(x0, 0.0, mass / (x - x0)), (x, 0.0, -mass / (x - x0))]
            else:
                events.append((x, mass, 0.0))
            x0, f0 = x, f
        total += weight
    if total <= 0:
        return []
    events.sort()
    targets = [q / 100.0 * total for q in qs]
    out: list[float] = []
    cum = density = prev = 0.0
    for x, jump, change in events:
        if x > prev:
            reach = cum + density * (x - prev)
            while len(out) < len(targets) and density > 0 and targets[len(out)] <= reach:
                out.append(prev + (targets[len(out)] - cum) / density)
            cum, prev = reach, x
        if jump:
            while len(out) < len(targets) and targets[len(out)] <= cum + jump:
                out.append(x)
            cum += jump
        density += change
    out += [prev] * (len(targets) - len(out))  # rounding left a target just above the total
    return out


def pooled_gaps(rows: Iterable[dict[str, Any]]) -> GapSketch | None:
    """The merged gap sketch of ``rows`` (their ``itl_sketch``): every gap of every request,
    within 1 %. None when a row with ITL figures has no readable sketch (recorded before
    sketches were stored): then only the estimate from the per-request summaries is possible."""
    pooled = GapSketch()
    for row in rows:
        text = row.get("itl_sketch")
        if text is None:
            if itl_knots(row) is not None:
                return None
            continue
        try:
            pooled.merge(GapSketch.decode(text))
        except (ValueError, TypeError, AttributeError):
            return None
    return pooled


def _itl_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = pooled_gaps(rows)
    if pooled is not None:  # exact within 1 %: every gap of every request
        values = pooled.percentiles([q for _, q in _QUANTILES])
        samples = pooled.count
        out: dict[str, Any] = {"count": samples}
        for (name, _), value in zip(_QUANTILES, values, strict=True):
            enough = value is not None and samples >= MIN_SAMPLES[name]
            out[name] = round(value, 3) if enough else None  # type: ignore[arg-type]
        out["mean"] = _itl_mean(r for r in rows if itl_knots(r) is not None) if samples else None
        return out
    with_itl = [(row, knots) for row in rows if (knots := itl_knots(row)) is not None]
    counts = [number(row.get("itl_count")) for row, _ in with_itl]
    weighted = all(c is not None and c > 0 for c in counts)
    samples = int(sum(counts)) if weighted and with_itl else len(with_itl)  # type: ignore[arg-type]
    summaries = [((c if weighted else 1.0), knots) for (_, knots), c in zip(with_itl, counts)]
    pooled = mixture_quantiles(summaries, [q for _, q in _QUANTILES])  # type: ignore[arg-type]
    out = {"count": samples}
    for (name, _), value in zip(_QUANTILES, pooled or [None] * 3, strict=True):
        out[name] = round(value, 3) if value is not None and samples >= MIN_SAMPLES[name] else None
    out["mean"] = _itl_mean(row for row, _ in with_itl) if weighted else None
    return out


def _itl_mean(rows: Iterable[dict[str, Any]]) -> float | None:
    """Total decode time / total gaps: TPOT x (output tokens - 1) is last - first content."""
    span = gaps = 0.0
    for row in rows:
        tpot, out, count = (number(row.get(k)) for k in ("tpot_ms", "output_tokens", "itl_count"))
        if tpot is None or out is None or count is None:
            return None
        span += tpot * (out - 1)
        gaps += count
    return round(span / gaps, 3) if gaps else None


def summarize_latency(
    rows: Iterable[dict[str, Any]], group_by: str = "model", since: float | None = None,
    until: float | None = None,
) -> dict[str, Any]:
    """Per-group latency percentiles as a JSON-ready dict (rows outside [since, until) are
    left out)."""
    if group_by not in GROUP_BY:
        raise ValueError(f"--by must be one of {', '.join(GROUP_BY)}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        started = number(row.get("started_at"))
        if started is not None and ((since is not None and started < since)
                                    or (until is not None and started >= until)):
            continue
        groups.setdefault(group_of(row, group_by), []).append(row)
    out = []
    for label in sorted(groups):
        members = groups[label]
        metrics = {"itl_ms": _itl_stats(members)}
        for metric, field in FIELD.items():
            values = [v for row in members if (v := number(row.get(field))) is not None]
            metrics[metric] = _stats(values)
        out.append({"group": label, "requests": len(members),
                    "metrics": {m: metrics[m] for m in METRICS}})
    return {"object": "trioproxy.latency_summary", "group_by": group_by, "since": since,
            "until": until, "min_samples": dict(MIN_SAMPLES), "groups": out}
