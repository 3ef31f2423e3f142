"""``trioproxy usage``: totals per model, key, session, day, hour, provider, API, status or
outcome from the usage store, over the last 24 h unless told otherwise."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..accounting.locations import is_postgres_url, open_store, resolve_database_url, sqlite_path
from ..accounting.query import format_table, parse_when, summarize
from ..accounting.store import GROUP_BY, Store
from ..config.settings import ConfigError, Settings

__all__ = ["add_usage_parser", "run_usage"]

DEFAULT_SINCE = "24h"

EPILOG = """\
The window is the last 24 hours unless --since says otherwise (--since all: everything).
Times: 30m, 24h, 7d, 2w, today, or an ISO date / date-time (UTC unless a zone is given).
Days and hours (--by day, --by hour) are UTC. Costs are in USD to the micro-dollar. A cost of
"?" means a request reached a model whose price is unknown: it is counted in the "unpriced"
column, and the total shows "+?". Requests that never reached a model (404, 413, connect
failures, error answers) cost nothing and are not unpriced. "outcomes" counts how requests
ended: ok, upstream_4xx / upstream_5xx (the upstream's error answer), client_disconnect,
upstream_error (cut mid-way), connect_error, timeout, rejected (by the proxy), cancelled
(server shutdown), extension_error, proxy_error.

Examples:
  trioproxy usage --since 7d --by day
  trioproxy usage --by outcome --since all
  trioproxy usage --by key --since 2025-06-01 --json
  trioproxy usage --id msg_01ABC...        (one record: proxy, upstream or response id)
"""


def add_usage_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``usage`` sub-command on an ``argparse`` sub-parsers object."""
    p = subparsers.add_parser(
        "usage",
        help="summarise recorded token usage and cost",
        description="Summarise recorded token usage and cost from the usage store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--database-url", metavar="URL",
                   help="SQLite path/URL or postgresql://… (default: the database_url setting "
                        "from TRIOPROXY_DATABASE_URL(_FILE) or --config, else "
                        "$XDG_DATA_HOME/trioproxy/usage.db)")
    p.add_argument("--config", metavar="FILE",
                   help="the proxy's TOML config file, for its database_url [TRIOPROXY_CONFIG]")
    p.add_argument("--by", choices=GROUP_BY, default="model",
                   help="group by (default: %(default)s)")
    p.add_argument("--since", metavar="WHEN", default=DEFAULT_SINCE,
                   help="only requests started at or after WHEN; 'all' for no lower bound "
                        "(default: %(default)s)")
    p.add_argument("--until", metavar="WHEN", help="only requests started before WHEN")
    p.add_argument("--id", dest="record_id", metavar="ID",
                   help="show the one record with this proxy, upstream or response id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run_usage(args: argparse.Namespace) -> int:
    """Run ``trioproxy usage``. 0: ok, 1: record not found or store unreachable, 2: bad args."""
    try:
        since = None if args.since.strip().lower() == "all" else parse_when(args.since)
        until = parse_when(args.until) if args.until else None
        settings = Settings.from_env(config=args.config, database_url=args.database_url)
    except (ValueError, ConfigError) as exc:
        print(f"trioproxy usage: {exc}", file=sys.stderr)
        return 2
    url = resolve_database_url(settings.database_url, settings.data_home)
    if not is_postgres_url(url) and not sqlite_path(url).exists():
        print(f"trioproxy usage: no usage database at {sqlite_path(url)} (nothing recorded yet)",
              file=sys.stderr)
        return 1 if args.record_id else _print_summary(None, args, since, until)
    try:
        store = open_store(url, timeout=settings.store_timeout)
    except Exception as exc:  # noqa: BLE001 - any connection failure is reported the same way
        print(f"trioproxy usage: cannot open the usage store: {exc}", file=sys.stderr)
        return 1
    try:
        store.migrate()
        if args.record_id:
            return _print_record(store, args)
        return _print_summary(store, args, since, until)
    finally:
        store.close()


def _print_record(store: Store, args: argparse.Namespace) -> int:
    record = store.get(args.record_id)
    if record is None:
        print(f"trioproxy usage: no record {args.record_id!r}", file=sys.stderr)
        return 1
    public = record.to_public_json()
    print(json.dumps(public, indent=None if args.json else 2))
    return 0


def _print_summary(
    store: Store | None, args: argparse.Namespace, since: float | None, until: float | None
) -> int:
    summary = summarize(store, args.by, since, until)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_table(summary))
    print(f"\n{_window(args.since, since, until)}")
    return 0


def _window(text: str, since: float | None, until: float | None) -> str:
    def at(t: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))

    start = "all recorded requests" if since is None else f"requests since {at(since)}"
    end = f" until {at(until)}" if until is not None else ""
    hint = " (the default; --since all for everything)" if text == DEFAULT_SINCE else ""
    return f"{start}{end}{hint}"

