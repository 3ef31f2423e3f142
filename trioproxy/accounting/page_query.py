"""Latency percentiles per model for the usage page, without loading the ledger into the worker.

``trioproxy latency`` reads every row and computes exact percentiles; the page refreshes every
few seconds over up to a year, so it must not. The database returns the exact figures (requests,
counts, means, the ITL mean) per model by SQL; the percentiles are computed, as
``trioproxy latency`` computes them, over a bounded sample: every row of a model with at most
:data:`SAMPLE_PER_MODEL` requests in the window (so the page and the CLI agree exactly), else
that many chosen by the random part of the proxy's request id (``tp_<ms><20 random hex>``:
its last four hex digits), so the sample is the same at every refresh; at most
:data:`SAMPLE_ROWS` rows in all (models with many requests get proportionally fewer).

Only SQL common to SQLite and PostgreSQL is used; NaN (which PostgreSQL can store) never
reaches the JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["SAMPLE_PER_MODEL", "SAMPLE_ROWS", "latency_summary"]

SAMPLE_PER_MODEL = 2000  # rows of one model the percentiles are computed from, at most
SAMPLE_ROWS = 12_000  # rows in all
_KEY_SPACE = 16 ** 4  # the last four hex digits of a request id
_GROUP = "COALESCE(model, model_requested)"
# (metric, column): the one-value figures of latency_report.METRICS
_FIGURES = (("ttft_ms", "ttft_ms"), ("tpot_ms", "tpot_ms"), ("e2e_ms", "e2e_ms"),
            ("last_token_ms", "last_token_ms"), ("tokens_per_s", "tokens_per_s"))
_FIGURE_COLUMNS = tuple(column for _, column in _FIGURES)
_KNOTS = "itl_p50_ms IS NOT NULL AND itl_p90_ms IS NOT NULL AND itl_p99_ms IS NOT NULL AND " \
    "itl_max_ms IS NOT NULL"
_WITH_MEAN = "tpot_ms IS NOT NULL AND output_tokens IS NOT NULL AND itl_count IS NOT NULL"


def _stats_sql(where: str) -> str:
    figures = ", ".join(f"COUNT({c}), SUM({c})" for c in _FIGURE_COLUMNS)
    return (
        f"SELECT g, COUNT(*), {figures}, SUM(kn), "
        f"SUM(CASE WHEN kn = 1 AND itl_count > 0 THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN kn = 1 THEN itl_count END), "
        f"SUM(CASE WHEN kn = 1 AND {_WITH_MEAN} THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN kn = 1 THEN tpot_ms * (output_tokens - 1) END) FROM ("
        f"SELECT {_GROUP} AS g, {', '.join(_FIGURE_COLUMNS)}, itl_count, output_tokens, "
        f"CASE WHEN {_KNOTS} THEN 1 ELSE 0 END AS kn FROM usage_records{where}) r GROUP BY g"
    )


def latency_summary(
    cursor: Any, sql: Any, where: str, params: Sequence[Any], select: Sequence[tuple[str, str]],
) -> list[dict[str, Any]]:
    """Per-model latency groups, shaped as ``summarize_latency(...)["groups"]``. ``cursor`` is a
    store cursor (bounded in time by its back end), ``sql`` the dialect's placeholder mapping,
    ``where`` the rows' filter (`` WHERE ...`` with ``?``), ``params`` its values, ``select``
    the (row key, SQL) pairs of a latency row."""
    from .latency_summary import summarize_latency

    cursor.execute(sql(_stats_sql(where)), tuple(params))
    stats = {row[0]: row for row in cursor.fetchall()}
    if not stats:
        return []
    thresholds = _thresholds({g: int(row[1]) for g, row in stats.items()})
    sample_where, sample_params = where, list(params)
    if thresholds:
        suffix = "substr(request_id, length(request_id) - 3, 4)"
        cases = " ".join(f"WHEN ? THEN {suffix} < ?" for _ in thresholds)
        sample_where += f" AND CASE {_GROUP} {cases} ELSE 1 = 1 END"
        sample_params += [v for pair in thresholds.items() for v in pair]
    keys = [key for key, _ in select]
    cursor.execute(sql(f"SELECT {', '.join(e for _, e in select)} FROM usage_records"
                       f"{sample_where} LIMIT ?"), (*sample_params, SAMPLE_ROWS * 2))
    sample = (dict(zip(keys, row, strict=True)) for row in cursor)
    groups = {g["group"]: g for g in summarize_latency(sample, "model")["groups"]}
    out = []
    for group, row in stats.items():
        label = group if group is not None else "(unknown)"
        found = groups.get(label) or _empty(label)
        _exact(found, row)
        out.append(found)
    return sorted(out, key=lambda g: g["group"])


def _thresholds(counts: dict[Any, int]) -> dict[Any, str]:
    """For each model sampled: the request-id suffix below which a row is taken (four hex
    digits). Each model gets up to :data:`SAMPLE_PER_MODEL` rows, all of its rows when it has
    fewer; when that exceeds :data:`SAMPLE_ROWS` in all, the largest models give up rows first
    (one cap for all: the smaller ones keep every row)."""
    cap = float(SAMPLE_PER_MODEL)
    ordered = sorted(min(n, SAMPLE_PER_MODEL) for n in counts.values())
    budget, left = float(SAMPLE_ROWS), len(ordered)
    for share in ordered:  # water-filling: the cap at which the shares add up to the budget
        if share * left >= budget:
            cap = min(cap, budget / left)
            break
        budget -= share
        left -= 1
    out = {}
    for group, n in counts.items():
        fraction = min(n, cap) / n if n else 1.0
        if fraction < 1.0 and group is not None:
            out[group] = f"{max(1, math.ceil(fraction * _KEY_SPACE)):04x}"
    return out


def _empty(label: str) -> dict[str, Any]:
    from .latency_summary import METRICS

    blank = {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    return {"group": label, "requests": 0, "metrics": {m: dict(blank) for m in METRICS}}


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _exact(group: dict[str, Any], row: Sequence[Any]) -> None:
    """Put the database's exact counts and means in place of the sample's; no NaN."""
    group["requests"] = int(row[1])
    metrics = group["metrics"]
    for i, (metric, _) in enumerate(_FIGURES):
        count, total = int(row[2 + 2 * i] or 0), _number(row[3 + 2 * i])
        metrics[metric]["count"] = count
        metrics[metric]["mean"] = round(total / count, 3) if count and total is not None \
            else None
        for q in ("p50", "p90", "p99"):
            metrics[metric][q] = _number(metrics[metric][q])
    rows, positive, gaps, with_mean, span = row[2 + 2 * len(_FIGURES):]
    rows, positive, gaps = int(rows or 0), int(positive or 0), _number(gaps) or 0.0
    weighted = rows > 0 and positive == rows
    itl = metrics["itl_ms"]
    itl["count"] = int(gaps) if weighted else rows
    span = _number(span)
    itl["mean"] = round(span / gaps, 3) if weighted and int(with_mean or 0) == rows and gaps \
        and span is not None else None
    for q in ("p50", "p90", "p99"):
        itl[q] = _number(itl[q])
