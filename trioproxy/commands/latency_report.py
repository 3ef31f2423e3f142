"""``trioproxy latency``: TTFT, ITL, TPOT, e2e and tokens/s percentiles per group.

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

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from ..accounting.query import parse_when
from ..protocol.gapsketch import GapSketch
from ..protocol.latency import percentile
from ..textsafe import for_csv, for_terminal

__all__ = [
    "GROUP_BY",
    "MIN_SAMPLES",
    "ROW_KEYS",
    "add_latency_parser",
    "format_csv",
    "format_table",
    "mixture_quantiles",
    "pooled_gaps",
    "run_latency",
    "summarize_latency",
]

ROW_KEYS = (
    "started_at", "model", "provider", "api", "key_fingerprint", "session_id", "ttft_ms",
    "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms", "itl_count", "tpot_ms",
    "tokens_per_s", "duration_ms", "output_tokens", "last_token_ms", "itl_sketch",
)
GROUP_BY = ("model", "provider", "api", "key", "session", "hour")
_GROUP_FIELD = {"key": "key_fingerprint", "session": "session_id"}
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "last_token_ms", "tokens_per_s")
_FIELD = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "e2e_ms": "duration_ms",
          "last_token_ms": "last_token_ms", "tokens_per_s": "tokens_per_s"}
MIN_SAMPLES = {"p50": 1, "p90": 10, "p99": 100}
_QUANTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
_ITL_KNOTS = (("itl_p50_ms", 0.5), ("itl_p90_ms", 0.9), ("itl_p99_ms", 0.99), ("itl_max_ms", 1.0))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _group(row: dict[str, Any], group_by: str) -> str:
    if group_by == "hour":
        started = _number(row.get("started_at"))
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


def _itl_knots(row: dict[str, Any]) -> list[float] | None:
    xs = [_number(row.get(key)) for key, _ in _ITL_KNOTS]
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
            if _itl_knots(row) is not None:
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
        out["mean"] = _itl_mean(r for r in rows if _itl_knots(r) is not None) if samples else None
        return out
    with_itl = [(row, knots) for row in rows if (knots := _itl_knots(row)) is not None]
    counts = [_number(row.get("itl_count")) for row, _ in with_itl]
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
        tpot, out, count = (_number(row.get(k)) for k in ("tpot_ms", "output_tokens", "itl_count"))
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
        started = _number(row.get("started_at"))
        if started is not None and ((since is not None and started < since)
                                    or (until is not None and started >= until)):
            continue
        groups.setdefault(_group(row, group_by), []).append(row)
    out = []
    for label in sorted(groups):
        members = groups[label]
        metrics = {"itl_ms": _itl_stats(members)}
        for metric, field in _FIELD.items():
            values = [v for row in members if (v := _number(row.get(field))) is not None]
            metrics[metric] = _stats(values)
        out.append({"group": label, "requests": len(members),
                    "metrics": {m: metrics[m] for m in METRICS}})
    return {"object": "trioproxy.latency_summary", "group_by": group_by, "since": since,
            "until": until, "min_samples": dict(MIN_SAMPLES), "groups": out}


def _cell(stats: dict[str, Any], name: str) -> str:
    value = stats[name]
    if value is not None:
        return f"{value:,.1f}"
    if name in MIN_SAMPLES and stats["count"]:
        return f"n<{MIN_SAMPLES[name]}"
    return "-"


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table, one line per group and metric."""
    header = [summary["group_by"], "requests", "metric", "n", "p50", "p90", "p99", "mean"]
    rows = []
    for g in summary["groups"]:
        for i, metric in enumerate(METRICS):
            s = g["metrics"][metric]
            rows.append([for_terminal(g["group"]) if i == 0 else "", f"{g['requests']:,}" if i == 0 else "",
                         metric, f"{s['count']:,}", *(_cell(s, n) for n in
                                                      ("p50", "p90", "p99", "mean"))])
    if not rows:
        return "no requests with latency figures in this period"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:1], widths, strict=False)]
        right = [c.rjust(w) for c, w in zip(cells[1:2], widths[1:2], strict=True)]
        mid = [cells[2].ljust(widths[2])]
        rest = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(left + right + mid + rest).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_csv(summary: dict[str, Any]) -> str:
    """CSV, one line per group and metric; a percentile without enough samples is empty."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([summary["group_by"], "requests", "metric", "count", "p50", "p90", "p99",
                     "mean"])
    for g in summary["groups"]:
        for metric in METRICS:
            s = g["metrics"][metric]
            writer.writerow([for_csv(g["group"]), g["requests"], metric, s["count"],
                             *("" if s[n] is None else s[n] for n in ("p50", "p90", "p99", "mean"))])
    return buf.getvalue()


PLOT_HINT = "--plot needs matplotlib: pip install 'trioproxy[plot]'"


def plot_latency(rows: Sequence[dict[str, Any]], path: str) -> None:
    """TTFT and ITL CDFs per model and a TTFT time series, as a PNG at ``path``.

    Raises ImportError without matplotlib (the ``plot`` extra)."""
    from matplotlib.figure import Figure  # optional: no pyplot, no global state

    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(_group(row, "model"), []).append(row)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ttft_ax, itl_ax, series_ax = fig.subplots(1, 3)
    grid = [q / 2 for q in range(1, 200)]
    for model, members in sorted(by_model.items()):
        ttft = sorted(v for r in members if (v := _number(r.get("ttft_ms"))) is not None)
        if ttft:
            ttft_ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=model)
            points = [(datetime.fromtimestamp(t, UTC), v) for r in members
                      if (t := _number(r.get("started_at"))) is not None
                      and (v := _number(r.get("ttft_ms"))) is not None]
            series_ax.plot([p[0] for p in points], [p[1] for p in points], ".", label=model)
        summaries = [(c if (c := _number(r.get("itl_count"))) else 1.0, k)
                     for r in members if (k := _itl_knots(r)) is not None]
        if summaries:
            itl_ax.plot(mixture_quantiles(summaries, grid), [q / 100 for q in grid], label=model)
    for ax, title, xlabel in ((ttft_ax, "TTFT CDF", "ms"), (itl_ax, "ITL CDF (pooled)", "ms"),
                              (series_ax, "TTFT over time (UTC)", "")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ttft_ax.set_ylabel("fraction of requests")
    itl_ax.set_ylabel("fraction of gaps")
    series_ax.set_ylabel("TTFT ms")
    if by_model:
        ttft_ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


EPILOG = """\
Figures (GenAI-Perf / vLLM names): ttft_ms = time to first token (first text, tool-call or
reasoning delta), itl_ms = inter-token latency (gaps between content events, pooled over the
requests from their gap sketches: within 1 %; records older than the sketches are estimated
from their p50/p90/p99/max), tpot_ms = time per output token,
e2e_ms = request latency to the last byte, last_token_ms = to the last content event (where
AIPerf's request latency stops), tokens_per_s = (output tokens - 1) / (e2e - TTFT).
A percentile needs enough samples: p90 >= 10, p99 >= 100 (else "n<10" / "n<100").

Examples:
  trioproxy latency --since 24h
  trioproxy latency --by hour --since today --csv > latency.csv
  trioproxy latency --since 7d --plot latency.png
  trioproxy latency --since 7d --compare provider anthropic openai --plot cdf.png
"""


def add_latency_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``latency`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "latency", help="TTFT / ITL / TPOT / e2e / tokens/s percentiles from the usage store",
        description="Latency percentiles of recorded requests, per group.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", metavar="URL",
                   help="SQLite path/URL or postgresql://… (default: $TRIOPROXY_DATABASE_URL, "
                        "else $XDG_DATA_HOME/trioproxy/usage.db)")
    p.add_argument("--by", choices=GROUP_BY, default="model", help="group by (default: model)")
    p.add_argument("--since", metavar="WHEN", help="only requests started at or after WHEN")
    p.add_argument("--until", metavar="WHEN", help="only requests started before WHEN")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--plot", metavar="FILE.png", help="also draw CDFs and a TTFT time series")
    p.add_argument("--compare", nargs=3, metavar=("BY", "A", "B"),
                   help="put groups A and B side by side (BY: provider, model, key, hour) with "
                        "95%% bootstrap intervals (needs numpy: trioproxy[compare])")
    p.add_argument("--seed", type=int, default=0, help="--compare's resampling seed (default 0)")
    p.add_argument("--resamples", type=int, default=2000, metavar="N",
                   help="--compare's bootstrap resamples (default 2000)")
    return p


def run_latency(args: argparse.Namespace, rows: Iterable[dict[str, Any]] | None = None) -> int:
    """Run ``trioproxy latency`` on ``rows`` (default: the store's ``latency_rows``).
    0: ok, 1: store unreachable or plot failed, 2: bad arguments or matplotlib missing."""
    if getattr(args, "compare", None):
        from .latency_compare import run_compare

        return run_compare(args, rows)
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        print(f"trioproxy latency: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"trioproxy latency: {PLOT_HINT}", file=sys.stderr)
            return 2
    if rows is None:
        loaded = _store_rows(args.database_url, since, until)
        if loaded is None:
            return 1
        rows = loaded
    rows = list(rows)
    summary = summarize_latency(rows, args.by, since, until)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_csv(summary) if args.csv else format_table(summary), end="" if args.csv
              else "\n")
    if args.plot:
        try:
            plot_latency(_within(rows, since, until), args.plot)
        except Exception as exc:  # noqa: BLE001 - a bad path or backend: say so, keep the report
            print(f"trioproxy latency: cannot draw {args.plot}: {exc}", file=sys.stderr)
            return 1
    return 0


def _within(rows: list[dict[str, Any]], since: float | None, until: float | None) -> list:
    def inside(row: dict[str, Any]) -> bool:
        t = _number(row.get("started_at"))
        return t is None or ((since is None or t >= since) and (until is None or t < until))

    return [row for row in rows if inside(row)]


def _store_rows(url: str | None, since: float | None, until: float | None) -> list | None:
    from ..accounting.locations import (
        is_postgres_url,
        open_store,
        resolve_database_url,
        sqlite_path,
    )

    resolved = resolve_database_url(url)
    if not is_postgres_url(resolved) and not sqlite_path(resolved).exists():
        print(f"trioproxy latency: no usage database at {sqlite_path(resolved)} (nothing "
              "recorded yet)", file=sys.stderr)
        return []
    try:
        store = open_store(resolved)
    except Exception as exc:  # noqa: BLE001 - any connection failure is reported the same way
        print(f"trioproxy latency: cannot open the usage store: {exc}", file=sys.stderr)
        return None
    try:
        store.migrate()
        return list(store.latency_rows(since, until))
    finally:
        store.close()
