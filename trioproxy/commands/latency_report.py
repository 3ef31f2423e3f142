"""``trioproxy latency``: the latency percentiles of stored requests per group
(:mod:`trioproxy.accounting.latency_summary`) as a table, JSON or CSV, or plotted; with
``--compare``, two groups side by side (:mod:`.latency_compare`).

A percentile is printed only with enough samples (``MIN_SAMPLES``: p90 needs 10, p99 100);
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

from ..accounting.latency_summary import (
    GROUP_BY,
    METRICS,
    MIN_SAMPLES,
    group_of,
    itl_knots,
    mixture_quantiles,
    number,
    summarize_latency,
)
from ..accounting.query import parse_when
from ..textsafe import for_csv, for_terminal

__all__ = ["add_latency_parser", "format_csv", "format_table", "plot_latency", "run_latency"]


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
        by_model.setdefault(group_of(row, "model"), []).append(row)
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    ttft_ax, itl_ax, series_ax = fig.subplots(1, 3)
    grid = [q / 2 for q in range(1, 200)]
    for model, members in sorted(by_model.items()):
        ttft = sorted(v for r in members if (v := number(r.get("ttft_ms"))) is not None)
        if ttft:
            ttft_ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=model)
            points = [(datetime.fromtimestamp(t, UTC), v) for r in members
                      if (t := number(r.get("started_at"))) is not None
                      and (v := number(r.get("ttft_ms"))) is not None]
            series_ax.plot([p[0] for p in points], [p[1] for p in points], ".", label=model)
        summaries = [(c if (c := number(r.get("itl_count"))) else 1.0, k)
                     for r in members if (k := itl_knots(r)) is not None]
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
        t = number(row.get("started_at"))
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
