"""``trioproxy latency --compare BY A B``: two groups side by side, with confidence intervals.

For each metric (TTFT, ITL, TPOT, e2e, tokens/s) and for p50 and p90: each group's value with a
95 % percentile-bootstrap confidence interval, the relative difference of B against A (with the
interval of that ratio, from the same resamples), and whether the two groups' intervals
*separate* (do not overlap: a conservative test, stricter than a 5 % one).

- TTFT, TPOT, e2e and tokens/s: one value per request; resampling draws requests with
  replacement and takes the percentile of each resample (numpy, vectorised).
- ITL pools the gaps of all requests; gaps within a request are not independent, so resampling
  draws *requests* (a cluster bootstrap) and pools their gaps: their gap sketches (every gap,
  within 1 %; :mod:`trioproxy.protocol.gapsketch`) or, for records stored before sketches, their
  stored p50/p90/p99/max weighted by their gap counts (the estimate ``trioproxy latency`` makes,
  see :mod:`trioproxy.commands.latency_report`) laid on a shared grid of at most :data:`ITL_GRID` points.

Too few samples: a group with fewer than :data:`MIN_REQUESTS` requests is refused (exit 2);
a p50 needs :data:`MIN_SAMPLES` ``["p50"]`` values per side, a p90 ``["p90"]``, else the line
says ``n<…`` and compares nothing. Resampling is seeded (``--seed``, default 0): the same ledger
gives the same output. numpy is an optional extra (``trioproxy[compare]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..accounting.latency_summary import FIELD, group_of, itl_knots, mixture_quantiles, number
from ..textsafe import for_terminal

__all__ = ["COMPARE_BY", "MIN_REQUESTS", "MIN_SAMPLES", "compare_groups", "run_compare"]

COMPARE_BY = ("provider", "model", "key", "hour")
MIN_REQUESTS = 10  # per group, or the comparison is refused
MIN_SAMPLES = {"p50": 10, "p90": 30}  # per side and metric, or that line compares nothing
QUANTILES = (("p50", 50.0), ("p90", 90.0))
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "tokens_per_s")
RESAMPLES = 2000
CONFIDENCE = 0.95
ITL_GRID = 512  # grid points for the pooled ITL of a resample
_CELLS_PER_CHUNK = 2_000_000  # bounds the memory of one block of resamples
_ITL_FLOPS = 4e8  # bounds the work of the ITL resamples (the grid shrinks for huge groups)
_FRACTIONS = (0.0, 0.5, 0.9, 0.99, 1.0)
NUMPY_HINT = "--compare needs numpy: pip install 'trioproxy[compare]'"
PLOT_HINT = "--plot needs matplotlib: pip install 'trioproxy[plot]'"


def select(rows: Sequence[dict[str, Any]], by: str, name: str) -> list[dict[str, Any]]:
    """The rows of group ``name`` (as ``trioproxy latency --by BY`` labels it). For ``key`` and
    ``hour`` a prefix is enough: a fingerprint's first characters, or ``2025-06-15`` for a
    whole day."""
    prefix = by in ("key", "hour")
    return [r for r in rows
            if (label := group_of(r, by)) == name or (prefix and label.startswith(name))]


def compare_groups(
    a_rows: Sequence[dict[str, Any]], b_rows: Sequence[dict[str, Any]], *,
    resamples: int = RESAMPLES, seed: int | None = 0,
) -> list[dict[str, Any]]:
    """One dict per (metric, quantile): each side's ``n``, ``value`` and ``ci``, B's relative
    difference in % with its ``diff_ci``, and ``separated`` (None when there are too few
    samples to compare, with ``note`` saying why). Needs numpy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    qs = [q for _, q in QUANTILES]
    out = []
    for metric in METRICS:
        sides = [_itl_side(rows, qs, rng, resamples) if metric == "itl_ms"
                 else _scalar_side(rows, FIELD[metric], qs, rng, resamples)
                 for rows in (a_rows, b_rows)]
        for i, (name, _) in enumerate(QUANTILES):
            out.append(_line(metric, name, i, *sides))
    return out


def _line(metric: str, name: str, i: int, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    need = MIN_SAMPLES[name]
    line: dict[str, Any] = {"metric": metric, "quantile": name, "separated": None,
                            "diff_pct": None, "diff_ci_pct": None, "note": None}
    enough = a["n"] >= need and b["n"] >= need
    for side, s in (("a", a), ("b", b)):
        line[side] = {"n": s["n"], **({"gaps": s["gaps"]} if "gaps" in s else {}),
                      "value": _r(s["values"][i]) if enough else None,
                      "ci": [_r(v) for v in s["ci"][i]] if enough else None}
    if not enough:
        line["note"] = f"n<{need}"
        return line
    lo_a, hi_a = a["ci"][i]
    lo_b, hi_b = b["ci"][i]
    line["separated"] = bool(hi_a < lo_b or hi_b < lo_a)
    va, vb = a["values"][i], b["values"][i]
    if va:
        line["diff_pct"] = _r(100.0 * (vb - va) / va)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = 100.0 * (b["reps"][:, i] - a["reps"][:, i]) / a["reps"][:, i]
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size:
            line["diff_ci_pct"] = [_r(v) for v in _interval(ratio)]
    return line


def _r(value: float) -> float:
    return round(float(value), 3)


def _interval(reps: Any) -> Any:
    """The central CONFIDENCE interval of replicates (axis 0)."""
    import numpy as np

    tail = (1.0 - CONFIDENCE) / 2 * 100.0
    return np.percentile(reps, [tail, 100.0 - tail], axis=0).T


def _scalar_side(rows: Sequence[dict[str, Any]], field: str, qs: list[float], rng: Any,
                 resamples: int) -> dict[str, Any]:
    """One value per request: resample requests; a resample is its count of each value."""
    import numpy as np

    x = np.sort([v for r in rows if (v := number(r.get(field))) is not None]).astype(float)
    if x.size == 0:
        return {"n": 0}
    reps = np.empty((resamples, len(qs)))
    for start, counts in _draws(rng, x.size, resamples, x.size):
        reps[start:start + len(counts)] = _rank_quantiles(counts, x, qs)
    return {"n": int(x.size), "values": np.percentile(x, qs), "reps": reps,
            "ci": _interval(reps)}


def _draws(rng: Any, n: int, resamples: int, width: int) -> Any:
    """(first replicate, counts) blocks: ``counts[b, i]`` is how often item ``i`` of ``n`` was
    drawn (with replacement, ``n`` draws) in replicate ``b``; blocks bound the memory."""
    import numpy as np

    step = max(1, _CELLS_PER_CHUNK // max(n, width))
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        picks = rng.integers(0, n, size=(rows, n)) + (np.arange(rows) * n)[:, None]
        yield start, np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n)


def _itl_side(rows: Sequence[dict[str, Any]], qs: list[float], rng: Any,
              resamples: int) -> dict[str, Any]:
    sketches = _sketches(rows)
    if sketches is not None:
        return _sketch_side(sketches, qs, rng, resamples)
    return _summary_side(rows, qs, rng, resamples)


def _sketches(rows: Sequence[dict[str, Any]]) -> list[Any] | None:
    """Each request's gap sketch; None when a request with ITL figures has none (recorded
    before sketches were stored): then only the per-request summaries can be pooled."""
    from ..accounting.latency_summary import pooled_gaps
    from ..protocol.gapsketch import GapSketch

    if pooled_gaps(rows) is None:
        return None
    out = [GapSketch.decode(text) for r in rows if (text := r.get("itl_sketch")) is not None]
    return [s for s in out if s]


def _resampled(mass: Any, values: Any, qs: list[float], rng: Any, resamples: int,
               quantiles: Any) -> Any:
    """Cluster bootstrap: draw requests (rows of ``mass``) with replacement, pool their mass
    over ``values`` and read ``quantiles(pooled, values, qs)``."""
    import numpy as np

    reps = np.empty((resamples, len(qs)))
    for start, counts in _draws(rng, mass.shape[0], resamples, values.size):
        reps[start:start + len(counts)] = quantiles(counts @ mass, values, qs)
    return reps


def _sketch_side(sketches: list[Any], qs: list[float], rng: Any,
                 resamples: int) -> dict[str, Any]:
    """Pooled ITL from the requests' gap sketches (within 1 % of the exact gaps)."""
    import numpy as np

    from ..protocol.gapsketch import merge_sketches

    if not sketches:
        return {"n": 0, "gaps": 0}
    items = [s.items() for s in sketches]
    values = np.unique(np.fromiter((v for it in items for v, _ in it), dtype=float))
    mass = np.zeros((len(items), values.size))
    for i, it in enumerate(items):
        mass[i, np.searchsorted(values, [v for v, _ in it])] = [c for _, c in it]
    most = int(max(32, _ITL_FLOPS / (resamples * len(items))))
    if values.size > most:  # a huge group: neighbouring buckets share a column
        width = -(-values.size // most)
        cols = np.arange(values.size) // width
        mass = np.add.reduceat(mass, np.flatnonzero(np.diff(cols, prepend=-1)), axis=1)
        values = values[::width]
    pooled = merge_sketches(sketches)
    reps = _resampled(mass, values, qs, rng, resamples, _rank_quantiles)
    return {"n": len(sketches), "gaps": pooled.count, "values": pooled.percentiles(qs),
            "reps": reps, "ci": _interval(reps)}


def _rank_quantiles(counts: Any, values: Any, qs: list[float]) -> Any:
    """Percentiles (linear between closest ranks, as numpy's default) of multisets given as
    counts per value (rows)."""
    import numpy as np

    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    out = np.empty((counts.shape[0], len(qs)))
    for i, q in enumerate(qs):
        pos = (total - 1) * q / 100.0
        lo = np.floor(pos)
        hi = np.minimum(lo + 1, total - 1)
        at_lo = values[np.argmax(cum > lo[:, None], axis=1)]
        at_hi = values[np.argmax(cum > hi[:, None], axis=1)]
        out[:, i] = at_lo + (at_hi - at_lo) * (pos - lo)
    return out


def _summary_side(rows: Sequence[dict[str, Any]], qs: list[float], rng: Any,
                  resamples: int) -> dict[str, Any]:
    """Pooled ITL from the requests' stored p50/p90/p99/max (records without a sketch)."""
    import numpy as np

    summaries = [(c if (c := number(r.get("itl_count"))) and c > 0 else 1.0, k)
                 for r in rows if (k := itl_knots(r)) is not None]
    if not summaries:
        return {"n": 0, "gaps": 0}
    weights = np.array([w for w, _ in summaries])
    knots = np.array([[max(0.0, k[0] - 1.25 * max(0.0, k[1] - k[0])), *k] for _, k in summaries])
    knots = np.maximum.accumulate(knots, axis=1)  # odd rows (p90 < p50) stay monotone
    n = len(summaries)
    size = int(min(ITL_GRID, max(32, _ITL_FLOPS / (resamples * n))))
    grid = np.unique(np.quantile(knots, np.linspace(0.0, 1.0, size)))
    # each request's CDF on the grid (linear between its knots), as mass per grid cell
    steps = np.arange(len(_FRACTIONS)) * 1e-9  # ties become steep steps, in order
    cdf = np.array([np.interp(grid, k + steps, _FRACTIONS) for k in knots])
    mass = np.diff(cdf, axis=1, prepend=0.0) * weights[:, None]
    reps = _resampled(mass, grid, qs, rng, resamples, _grid_quantiles)
    return {"n": n, "gaps": int(weights.sum()), "values": mixture_quantiles(summaries, qs),
            "reps": reps, "ci": _interval(reps)}


def _grid_quantiles(mass: Any, grid: Any, qs: list[float]) -> Any:
    """Quantiles (percent) of distributions given as mass per grid point (rows), linear
    between grid points."""
    import numpy as np

    cum = np.cumsum(mass, axis=1)
    cum /= cum[:, -1:]
    out = np.empty((mass.shape[0], len(qs)))
    rows = np.arange(mass.shape[0])
    for i, q in enumerate(qs):
        target = q / 100.0
        j = np.minimum(np.argmax(cum >= target - 1e-12, axis=1), grid.size - 1)
        prev = np.maximum(j - 1, 0)
        lo, hi = cum[rows, prev], cum[rows, j]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(hi > lo, (target - lo) / (hi - lo), 1.0)
        out[:, i] = grid[prev] + np.clip(frac, 0.0, 1.0) * (grid[j] - grid[prev])
    return out


# -- the command ---------------------------------------------------------------------------------


def run_compare(args: argparse.Namespace, rows: Any = None) -> int:
    """``trioproxy latency --compare BY A B``: 0 ok, 1 store unreachable or plot failed,
    2 bad arguments, too few requests, or numpy / matplotlib missing."""
    from ..accounting.query import parse_when
    from .latency_report import _store_rows, _within

    by, a_name, b_name = args.compare
    try:
        if by not in COMPARE_BY:
            raise ValueError(f"--compare groups by one of {', '.join(COMPARE_BY)}, not {by!r}")
        if args.csv:
            raise ValueError("--compare prints a table, or JSON with --json; not CSV")
        if args.resamples < 100:
            raise ValueError("--resamples needs at least 100 for a 95 % interval")
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
        import numpy  # noqa: F401 - optional: say which extra brings it
    except ImportError:
        return _fail(NUMPY_HINT)
    except ValueError as exc:
        return _fail(str(exc))
    if args.plot and not _has_matplotlib():
        return _fail(PLOT_HINT)
    if rows is None:
        rows = _store_rows(args.database_url, since, until)
        if rows is None:
            return 1
    rows = _within(list(rows), since, until)
    a_rows, b_rows = select(rows, by, a_name), select(rows, by, b_name)
    problem = _refusal(rows, by, (a_name, a_rows), (b_name, b_rows))
    if problem:
        return _fail(problem)
    lines = compare_groups(a_rows, b_rows, resamples=args.resamples, seed=args.seed)
    report = {"object": "trioproxy.latency_comparison", "by": by, "since": since,
              "until": until, "confidence": CONFIDENCE, "resamples": args.resamples,
              "seed": args.seed, "min_samples": dict(MIN_SAMPLES),
              "a": {"group": a_name, "requests": len(a_rows)},
              "b": {"group": b_name, "requests": len(b_rows)}, "lines": lines}
    print(json.dumps(report, indent=2) if args.json else format_comparison(report))
    if any(line["note"] for line in lines):
        print("trioproxy latency: some lines have too few samples to compare (n<…); "
              f"p50 needs {MIN_SAMPLES['p50']} per side, p90 {MIN_SAMPLES['p90']}",
              file=sys.stderr)
    if args.plot:
        try:
            plot_comparison(a_rows, b_rows, (a_name, b_name), args.plot)
        except Exception as exc:  # noqa: BLE001 - a bad path or backend: say so, keep the report
            print(f"trioproxy latency: cannot draw {args.plot}: {exc}", file=sys.stderr)
            return 1
    return 0


def _fail(message: str) -> int:
    print(f"trioproxy latency: {message}", file=sys.stderr)
    return 2


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _refusal(rows: list[dict[str, Any]], by: str, *sides: tuple[str, list]) -> str | None:
    for name, members in sides:
        if not members:
            known = sorted({group_of(r, by) for r in rows})
            shown = ", ".join(map(for_terminal, known[:12])) + (", …" if len(known) > 12 else "")
            return f"no requests in {by} {name!r} (groups: {shown or 'none'})"
    if {id(r) for r in sides[0][1]} & {id(r) for r in sides[1][1]}:
        return f"{sides[0][0]!r} and {sides[1][0]!r} share requests: compare two distinct groups"
    few = [f"{name!r} has {len(m)}" for name, m in sides if len(m) < MIN_REQUESTS]
    if few:
        return (f"too few requests to compare ({'; '.join(few)}; each side needs at least "
                f"{MIN_REQUESTS})")
    return None


def _ci(side: dict[str, Any]) -> str:
    if side["value"] is None:
        return "-"
    lo, hi = side["ci"]
    return f"{side['value']:,.1f} [{lo:,.1f}, {hi:,.1f}]"


def format_comparison(report: dict[str, Any]) -> str:
    """The plain-text comparison table."""
    a, b = report["a"], report["b"]
    head = [(f"{report['by']}: A = {a['group']} ({a['requests']:,} requests), "
            f"B = {b['group']} ({b['requests']:,} requests)"),
            (f"{report['confidence']:.0%} bootstrap intervals ({report['resamples']:,} resamples, "
            f"seed {report['seed']}); separate = the two intervals do not overlap"), ""]
    rows = [["metric", "q", "n A", "n B", "A [95% CI]", "B [95% CI]", "B vs A [95% CI]",
             "separate"]]
    for line in report["lines"]:
        diff = "-"
        if line["diff_pct"] is not None:
            diff = f"{line['diff_pct']:+.1f}%"
            if line["diff_ci_pct"]:
                diff += " [{:+.1f}, {:+.1f}]".format(*line["diff_ci_pct"])
        sep = line["note"] or ("yes" if line["separated"] else "no")
        rows.append([line["metric"], line["quantile"], f"{line['a']['n']:,}",
                     f"{line['b']['n']:,}", _ci(line["a"]), _ci(line["b"]), diff, sep])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = ["  ".join(c.rjust(w) if 1 < i < 4 else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]
    itl = next((ln for ln in report["lines"] if ln["metric"] == "itl_ms"), None)
    foot = []
    if itl is not None:
        foot = [(f"itl_ms: n = requests (resampled whole); gaps pooled: "
                f"A {itl['a'].get('gaps', 0):,}, B {itl['b'].get('gaps', 0):,}")]
    return "\n".join([*head, text[0], "  ".join("-" * w for w in widths), *text[1:], *foot])


def plot_comparison(a_rows: Sequence[dict[str, Any]], b_rows: Sequence[dict[str, Any]],
                    names: tuple[str, str], path: str) -> None:
    """Both groups' CDFs, one panel per metric, as a PNG at ``path`` (needs matplotlib)."""
    from matplotlib.figure import Figure  # optional: no pyplot, no global state

    fig = Figure(figsize=(18, 4), layout="constrained")
    grid = [q / 2 for q in range(1, 200)]
    for ax, metric in zip(fig.subplots(1, len(METRICS)), METRICS, strict=True):
        for rows, name in ((a_rows, f"A: {names[0]}"), (b_rows, f"B: {names[1]}")):
            if metric == "itl_ms":
                ax.plot(*_itl_cdf(rows, grid), label=name)
                continue
            xs = sorted(v for r in rows if (v := number(r.get(FIELD[metric]))) is not None)
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        ax.set_title(metric.replace("_ms", " (ms)").replace("tokens_per_s", "tokens/s"))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("fraction (ITL: of all gaps)")
    fig.axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _itl_cdf(rows: Sequence[dict[str, Any]], grid: list[float]) -> tuple[list, list]:
    """(x, fraction) of the pooled gaps: from the sketches, else the summaries' estimate."""
    from ..accounting.latency_summary import pooled_gaps

    pooled = pooled_gaps(rows)
    if pooled is not None:
        seen, xs, fs = 0, [], []
        for value, n in pooled.items():
            seen += n
            xs.append(value)
            fs.append(seen / pooled.count)
        return xs, fs
    summaries = [(c if (c := number(r.get("itl_count"))) else 1.0, k)
                 for r in rows if (k := itl_knots(r)) is not None]
    xs = mixture_quantiles(summaries, grid) if summaries else []
    return xs, [q / 100 for q in grid][:len(xs)]
