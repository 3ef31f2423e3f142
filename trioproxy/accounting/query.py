"""The read side: time ranges, per-group totals and their table / JSON rendering.

Used by ``trioproxy usage``; works on either store. Days and hours are UTC; an ISO date or time
without a zone is taken as UTC too, so ``--since 2025-06-01 --by day`` lines up.

Costs: a request is *priced* (its cost is known), *unpriced* (it reached a model, but the price
is unknown: the total shows ``+?``) or *free* by nature (it never reached a model: a 404, a
413, a connect failure, an error answer, ``GET /v1/models``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ..textsafe import for_terminal
from .store import GROUP_BY, Store

__all__ = ["format_table", "parse_when", "summarize"]

_RELATIVE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*\Z", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TOTAL_FIELDS = (
    "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "priced_requests", "unpriced_requests", "free_requests",
)


def parse_when(text: str, now: float | None = None) -> float:
    """Unix time for ``30m``/``24h``/``7d``/``2w`` ago, ``now``, ``today`` (UTC midnight) or an
    ISO 8601 date or date-time (UTC unless it names a zone). Raises ValueError."""
    now = time.time() if now is None else now
    value = text.strip()
    if m := _RELATIVE.match(value):
        return now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if value.lower() == "now":
        return now
    if value.lower() == "today":
        day = datetime.fromtimestamp(now, UTC).date()
        return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use e.g. 30m, 24h, 7d, 2w, today, 2025-06-01 or "
            "2025-06-01T12:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def summarize(
    store: Store | None, group_by: str = "model", since: float | None = None,
    until: float | None = None,
) -> dict[str, Any]:
    """Per-group totals and the grand total, as a JSON-ready dict (no store: nothing yet)."""
    if group_by not in GROUP_BY:
        raise ValueError(f"--by must be one of {', '.join(GROUP_BY)}")
    groups = store.aggregate(group_by, since, until) if store is not None else []
    return {
        "object": "trioproxy.usage_summary",
        "group_by": group_by,
        "since": since,
        "until": until,
        "groups": groups,
        "totals": _totals(groups),
    }


def _totals(groups: Sequence[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {name: sum(g[name] for g in groups) for name in _TOTAL_FIELDS}
    costs = [g["cost_usd"] for g in groups if g["cost_usd"] is not None]
    totals["cost_usd"] = sum(costs) if costs else (None if totals["unpriced_requests"] else 0.0)
    outcomes: dict[str, int] = {}
    for g in groups:
        for name, n in g["outcomes"].items():
            outcomes[name] = outcomes.get(name, 0) + n
    totals["outcomes"] = outcomes
    return totals


def _label(group_by: str, group: dict[str, Any]) -> str:
    """The group's name as the table shows it (client text escaped for the terminal)."""
    return for_terminal(_name(group_by, group))


def _name(group_by: str, group: dict[str, Any]) -> str:
    value = group["group"]
    if group_by == "key":
        if value is None:
            return "(no key)"
        last4 = group.get("key_last4")
        return f"…{last4} {value}" if last4 else str(value)
    return str(value) if value is not None else "(unknown)" if group_by == "model" else "(none)"


def _cost(cost: float | None, unpriced: int) -> str:
    """Dollars to the micro-dollar (a small request costs well under a cent); ``?`` unknown."""
    if cost is None:
        return "?"
    return f"{cost:,.6f}" + ("+?" if unpriced else "")


def _outcomes(outcomes: dict[str, int]) -> str:
    """``ok 12, timeout 1``: ok first, then the most frequent."""
    order = sorted(outcomes.items(), key=lambda kv: (kv[0] != "ok", -kv[1], kv[0]))
    return ", ".join(f"{name} {n:,}" for name, n in order)


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table; unknown cost shows as ``?`` and is counted in ``unpriced``."""
    group_by = summary["group_by"]
    header = [group_by, "requests", "input", "output", "cache read", "cache write", "reasoning",
              "cost_usd", "unpriced", "outcomes"]
    rows = [_row(_label(group_by, g), g) for g in summary["groups"]]
    rows.append(_row("total", summary["totals"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:-1], widths[1:-1], strict=True))
        return "  ".join([first, *rest, cells[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [*map(line, rows[:-1]), rule] if len(rows) > 1 else []
    return "\n".join([line(header), rule, *body, line(rows[-1])])


def _row(label: str, g: dict[str, Any]) -> list[str]:
    counts = [f"{g[name]:,}" for name in (
        "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
        "reasoning_tokens",
    )]
    return [label, *counts, _cost(g["cost_usd"], g["unpriced_requests"]),
            f"{g['unpriced_requests']:,}", _outcomes(g["outcomes"])]
