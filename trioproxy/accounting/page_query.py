"""Latency percentiles per model, aggregated in the database (the usage page's year view).

``trioproxy latency`` reads every row and computes exact percentiles; the page refreshes every
few seconds over up to a year, so it must not. Here the database returns, per model, the sums
and counts (exact: counts, means, the ITL mean) and a histogram of each figure with three
significant digits: a value is rounded to 0.1 ms (or 0.1 token/s), and values of 100 and more
are grouped by their first three digits, so a bucket is at most 1 % wide and there are at most
900 buckets per decade, however many rows there are. Percentiles are read off the histogram
the way :func:`trioproxy.protocol.latency.percentile` reads sorted values (linear between ranks),
with the values of a bucket spread evenly across it: within 1 % of the exact figures.

ITL is pooled from each request's stored summary exactly as ``trioproxy latency`` models it:
a CDF linear through (lo, 0), (p50, 0.5), (p90, 0.9), (p99, 0.99), (max, 1), the requests
weighted by their gap counts. Such a mixture is a sum of density steps at the knots, and sums
add up in SQL: per bucket of positions the database returns the steps' total, their total
times position and the point masses, which give the pooled CDF exactly at the edges of the
buckets, linear in between (one request gives back its own p50/p90/p99).

Only SQL common to SQLite and PostgreSQL is used (no ``ln``: SQLite may lack its math
functions). NaN and negative values are left out (PostgreSQL can store NaN).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["latency_summary"]

# (metric key in the output, column)
_FIGURES = (("ttft_ms", "ttft_ms"), ("tpot_ms", "tpot_ms"), ("e2e_ms", "e2e_ms"),
            ("tokens_per_s", "tokens_per_s"))
_KNOT_COLUMNS = ("itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms")
_SHARES = (0.5, 0.4, 0.09, 0.01)  # of a request's gaps between consecutive knots
_METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "tokens_per_s")  # latency_report.METRICS
_MIN_SAMPLES = {"p50": 1, "p90": 10, "p99": 100}
_QUANTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
_EVENTS = 2 * len(_SHARES)  # ITL: a start and an end per segment of a request's CDF
_K = len(_FIGURES) + _EVENTS  # rows each record is unpivoted into


def _valid(column: str) -> str:
    return f"({column} >= 0 AND {column} < 1e15)"  # NaN compares False on SQLite, > all on PG


def _greater(a: str, b: str) -> str:
    return f"CASE WHEN {a} > {b} THEN {a} ELSE {b} END"  # max(): GREATEST on PG only


_KNOTS_OK = " AND ".join(_valid(c) for c in _KNOT_COLUMNS)
_GROUP = "COALESCE(model, model_requested)"
_LO = _greater("0", "itl_p50_ms - 1.25 * " + _greater("0", "itl_p90_ms - itl_p50_ms"))


def _event(k: int) -> tuple[str, str, str]:
    """(position, density step, point mass) of unpivoted row ``k`` (figures: the value)."""
    if k <= len(_FIGURES):
        return _FIGURES[k - 1][1], "0", "0"
    segment, end = divmod(k - len(_FIGURES) - 1, 2)
    a, b, share = f"x{segment}", f"x{segment + 1}", _SHARES[segment]
    step = f"CASE WHEN {b} > {a} THEN {'-' if end else ''}{share} / ({b} - {a}) ELSE 0 END"
    mass = f"CASE WHEN {b} > {a} THEN 0 ELSE {share} END" if end else "0"
    return (b if end else a), step, mass


def _pick(part: int) -> str:
    return "CASE k " + " ".join(f"WHEN {k} THEN {_event(k)[part]}" for k in range(1, _K + 1)) \
        + " END"


def _histogram_sql(where: str) -> str:
    """Per (group, k, bucket): count, min, max; for ITL the sums of density steps, of steps
    times position and of point masses, unweighted and weighted by the gap count."""
    figures = ", ".join(c for _, c in _FIGURES)
    knots = (f"x0, itl_p50_ms AS x1, x2, {_greater('itl_p99_ms', 'x2')} AS x3, "
             f"{_greater('itl_max_ms', _greater('itl_p99_ms', 'x2'))} AS x4")
    chain = (f"SELECT g, {figures}, w, ok, {knots} FROM ("
             f"SELECT {_GROUP} AS g, {figures}, itl_count AS w, itl_p50_ms, itl_p99_ms, "
             f"itl_max_ms, CASE WHEN {_KNOTS_OK} THEN 1 ELSE 0 END AS ok, {_LO} AS x0, "
             f"{_greater('itl_p90_ms', 'itl_p50_ms')} AS x2 FROM usage_records{where}) r")
    unpivot = " UNION ALL ".join(f"SELECT {i} AS k" for i in range(1, _K + 1))
    picked = (f"SELECT g, ks.k AS k, {_pick(0)} AS v, {_pick(1)} AS dd, {_pick(2)} AS pm, "
              f"COALESCE(w, 0) AS w FROM ({chain}) c CROSS JOIN ({unpivot}) ks "
              f"WHERE ks.k <= {len(_FIGURES)} OR c.ok = 1")
    digits = "CAST(CAST(ROUND(v * 10) AS BIGINT) AS TEXT)"
    return (
        f"SELECT g, k, length(s), substr(s, 1, 3), COUNT(*), MIN(v), MAX(v), SUM(dd), "
        f"SUM(dd * v), SUM(pm), SUM(dd * w), SUM(dd * w * v), SUM(pm * w) FROM ("
        f"SELECT g, k, v, dd, pm, w, {digits} AS s FROM ({picked}) p WHERE {_valid('v')}) d "
        f"GROUP BY g, k, length(s), substr(s, 1, 3) ORDER BY g, k, length(s), substr(s, 1, 3)"
    )


def _stats_sql(where: str) -> str:
    figures = ", ".join(f"COUNT(CASE WHEN {_valid(c)} THEN 1 END), "
                        f"SUM(CASE WHEN {_valid(c)} THEN {c} END)" for _, c in _FIGURES)
    with_mean = "tpot_ms IS NOT NULL AND output_tokens IS NOT NULL AND itl_count IS NOT NULL"
    return (
        f"SELECT {_GROUP}, COUNT(*), {figures}, "
        f"COUNT(CASE WHEN {_KNOTS_OK} THEN 1 END), "
        f"COUNT(CASE WHEN {_KNOTS_OK} AND itl_count > 0 THEN 1 END), "
        f"SUM(CASE WHEN {_KNOTS_OK} THEN itl_count END), "
        f"COUNT(CASE WHEN {_KNOTS_OK} AND {with_mean} THEN 1 END), "
        f"SUM(CASE WHEN {_KNOTS_OK} THEN tpot_ms * (output_tokens - 1) END) "
        f"FROM usage_records{where} GROUP BY {_GROUP}"
    )


def latency_summary(cursor: Any, sql: Any, where: str, params: Sequence[Any]) -> list[dict]:
    """Per-model latency groups, shaped as ``summarize_latency(...)["groups"]``. ``cursor`` is a
    store cursor (bounded in time by its back end), ``sql`` the dialect's placeholder mapping,
    ``where`` the rows' filter (`` WHERE ...`` with ``?`` placeholders) and ``params`` its
    values. The histogram comes ordered and is read one figure at a time: memory holds one
    figure's buckets (ITL: its events'), never the rows."""
    cursor.execute(sql(_stats_sql(where)), tuple(params))
    stats = {row[0]: row for row in cursor.fetchall()}
    metrics: dict[Any, dict[str, Any]] = {group: {} for group in stats}
    cursor.execute(sql(_histogram_sql(where)), tuple(params))
    events: dict[Any, list[Bucket]] = {}
    for (group, k), series in _series(cursor):
        row = stats.get(group)
        if row is None:  # a row written between the two statements
            continue
        if k <= len(_FIGURES):
            metrics[group][_FIGURES[k - 1][0]] = _figure(series, row[2 * k], row[2 * k + 1])
        else:
            events.setdefault(group, []).extend(series)
            if k == _K:  # the group's last event kind
                metrics[group]["itl_ms"] = _itl(events.pop(group), row[2 + 2 * len(_FIGURES):])
    out = []
    for group, row in stats.items():
        found = metrics[group]
        for i, (name, _) in enumerate(_FIGURES, 1):
            found.setdefault(name, _figure([], row[2 * i], None))
        found.setdefault("itl_ms", _itl(events.get(group, []), row[2 + 2 * len(_FIGURES):]))
        out.append({"group": group if group is not None else "(unknown)",
                    "requests": int(row[1]), "metrics": {m: found[m] for m in _METRICS}})
    return sorted(out, key=lambda g: g["group"])


Bucket = tuple[float, float, int, float, float, float]  # min, max, count, steps, x steps, mass


def _series(cursor: Any) -> Iterator[tuple[tuple[Any, int], list[Bucket]]]:
    """Consecutive histogram rows of one (group, k); ITL sums weighted by gap count when the
    group's requests all have one (chosen later: both come)."""
    key: tuple[Any, int] | None = None
    series: list[Any] = []
    for group, k, _, _, count, low, high, *sums in cursor:
        if (group, int(k)) != key:
            if key is not None:
                yield key, series
            key, series = (group, int(k)), []
        series.append((float(low), float(high), int(count), *(float(x or 0) for x in sums)))
    if key is not None:
        yield key, series


def _figure(buckets: list[Any], count: Any, total: Any) -> dict:
    n = int(count or 0)
    out: dict[str, Any] = {"count": n}
    starts = []  # index of each bucket's first value among all values, in order
    seen = 0
    for bucket in buckets:
        starts.append(seen)
        seen += bucket[2]
    for name, q in _QUANTILES:
        out[name] = round(_linear(buckets, starts, seen, q), 3) \
            if seen and seen >= _MIN_SAMPLES[name] else None
    out["mean"] = round(float(total) / n, 3) if n and total is not None else None
    return out


def _linear(buckets: list[Any], starts: list[int], n: int, q: float) -> float:
    """As :func:`trioproxy.protocol.latency.percentile`: linear between ranks."""
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    a, b = _nth(buckets, starts, lo), _nth(buckets, starts, hi)
    return a + (b - a) * (pos - lo)


def _nth(buckets: list[Any], starts: list[int], j: int) -> float:
    """The ``j``-th value (0-based): a bucket's values spread evenly from its least to its
    greatest (both exact)."""
    i = bisect.bisect_right(starts, j) - 1
    low, high, count = buckets[i][:3]
    return low if count == 1 else low + (high - low) * (j - starts[i]) / (count - 1)


def _itl(buckets: list[Any], row: Sequence[Any]) -> dict[str, Any]:
    rows, positive, gaps, with_mean, span = row
    rows, positive = int(rows or 0), int(positive or 0)
    weighted = rows > 0 and positive == rows
    samples = int(gaps or 0) if weighted else rows
    out: dict[str, Any] = {"count": samples}
    total = float(gaps or 0) if weighted else float(rows)
    pooled = _mixture_quantiles(sorted(buckets), total, weighted, [q for _, q in _QUANTILES])
    for (name, _), value in zip(_QUANTILES, pooled, strict=True):
        out[name] = round(value, 3) if value is not None and samples >= _MIN_SAMPLES[name] \
            else None
    mean = None
    if weighted and int(with_mean or 0) == rows and gaps:
        mean = round(float(span) / float(gaps), 3)
    out["mean"] = mean
    return out


def _mixture_quantiles(buckets: list[Any], total: float, weighted: bool,
                       qs: Sequence[float]) -> list[float | None]:
    """Quantiles of the pooled ITL CDF ``F(x) = x * D - X + J`` (D: density steps so far, X:
    steps times their positions, J: point masses), exact at the buckets' least and greatest
    positions, linear within a bucket."""
    if total <= 0 or not buckets:
        return [None] * len(qs)
    targets = [q / 100.0 * total * (1 - 1e-12) for q in qs]
    out: list[float | None] = []
    density = moment = jumps = 0.0
    prev = buckets[0][0]
    for low, high, _, *sums in buckets:
        step, x_step, mass = sums[3:] if weighted else sums[:3]
        before = low * density - moment + jumps
        while len(out) < len(targets) and targets[len(out)] <= before:
            t = targets[len(out)]
            out.append(min(low, max(prev, (t + moment - jumps) / density)) if density > 0
                       else low)
        density, moment, jumps = density + step, moment + x_step, jumps + mass
        after = high * density - moment + jumps
        while len(out) < len(targets) and targets[len(out)] <= after:
            t = targets[len(out)]
            out.append(low if high <= low or after <= before
                       else low + (high - low) * (t - before) / (after - before))
        prev = high
    return out + [prev] * (len(targets) - len(out))
