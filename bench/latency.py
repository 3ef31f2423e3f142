"""Scenario 2: added latency of each path under streaming load.

Streams of 64 deltas at 20 ms intervals (Anthropic-shaped SSE, each event stamped by the
upstream) at concurrency 1, 50 and 200, closed loop (each simulated user on its own keep-alive
connection starts its next stream when one ends). The paths take turns within one run, in
rounds with a rotating order, so drift in the machine's load spreads over all of them.

Reported per path and concurrency: TTFB (first response byte) and per-event delay (client
receive time minus the upstream's emit stamp) at p50/p99, both also as *added over direct*;
proxy CPU seconds per 1,000 events (psutil, the proxy's process tree, before/after each turn);
the load generator's and the upstream's CPU per 1,000 events (to show they are not the
bottleneck). ``--calibrate`` also measures the candidate load-generator clients (epoll+raw
parser, trio+raw parser, trio+h11, httpx) on the direct path.

    python bench/latency.py [--quick] [--calibrate]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import common
import loadgen
from common import (
    PATHS, CpuMeter, Procs, Progress, cdf_points, fmt, ms, per_k, start_paths, summarize, table,
)

EVENTS = 64
INTERVAL = 0.02


def plan(quick: bool) -> dict[str, Any]:
    """Seconds of closed-loop load per (concurrency, path, round)."""
    if quick:
        return {"rounds": 1, "duration": {1: 1.3, 50: 1.0, 200: 0.9}, "stagger": 0.3}
    return {"rounds": 2, "duration": {1: 4.0, 50: 2.5, 200: 2.5}, "stagger": 0.6}


def warm_up(targets: dict[str, common.Target]) -> None:
    """A few short streams and JSON requests per path (imports, pools, first-request costs)."""
    eng = loadgen.Engine()
    body = loadgen.stream_body(events=8, interval=0.002)
    for t in targets.values():
        reqs = [loadgen.Req("POST", "/v1/messages", body) for _ in range(4)]
        reqs += [loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY) for _ in range(4)]
        loadgen.parallel(eng, t.port, reqs, deadline=time.monotonic() + 30)


def run_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target, conc: int, duration: float,
             stagger: float, body: bytes) -> dict[str, Any]:
    meter = CpuMeter(up, t.proc)
    results, wall = loadgen.closed_loop(
        eng, t.port, conc, duration,
        lambda i, k: loadgen.Req("POST", "/v1/messages?beta=true", body, stamps=True,
                                 total_timeout=60.0),
        stagger=stagger if conc > 1 else 0.0)
    cpu = meter.delta()
    return {"results": results, "cpu": cpu, "wall": wall}


def aggregate(conc: int, path: str, turns: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for turn in turns for r in turn["results"]]
    ttfb = ms([r.ttfb for r in results if r.ttfb is not None])
    delays = ms([d for r in results for d in r.delays])
    events = len(delays)
    cpu: dict[str, float] = defaultdict(float)
    for turn in turns:
        for k, v in turn["cpu"].items():
            if v is not None:
                cpu[k] += v
    outcomes: dict[str, int] = defaultdict(int)
    for r in results:
        outcomes[r.outcome] += 1
    return {
        "concurrency": conc, "path": path, "streams": len(results), "events": events,
        "outcomes": dict(outcomes),
        "errors": sorted({r.reason for r in results if r.outcome != "complete"})[:5],
        "ttfb_ms": summarize(ttfb), "delay_ms": summarize(delays),
        "ttfb_cdf_ms": cdf_points(ttfb), "delay_cdf_ms": cdf_points(delays),
        "wall_s": cpu.get("wall"),
        "events_per_s": events / cpu["wall"] if cpu.get("wall") else None,
        "proxy_cpu_s": cpu.get("proxy") if path != "direct" else None,
        "proxy_cpu_s_per_1k_events": per_k(cpu.get("proxy"), events) if path != "direct" else None,
        "proxy_cpu_util": (cpu["proxy"] / cpu["wall"]) if path != "direct" and cpu.get("wall") else None,
        "loadgen_cpu_s_per_1k_events": per_k(cpu.get("loadgen"), events),
        "upstream_cpu_s_per_1k_events": per_k(cpu.get("upstream"), events),
        "core0_util": ((cpu.get("loadgen", 0) + cpu.get("upstream", 0)) / cpu["wall"])
        if cpu.get("wall") else None,
    }


def added(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency: each path's TTFB and delay minus direct's, at p50 and p99."""
    by = {(c["concurrency"], c["path"]): c for c in cells}
    out = []
    for (conc, path), c in by.items():
        d = by.get((conc, "direct"))
        if d is None or path == "direct":
            continue
        row = {"concurrency": conc, "path": path}
        for metric in ("ttfb_ms", "delay_ms"):
            for q in ("p50", "p99"):
                a, b = c[metric].get(q), d[metric].get(q)
                row[f"added_{metric[:-3]}_{q}_ms"] = (a - b) if a is not None and b is not None else None
        row["proxy_cpu_s_per_1k_events"] = c["proxy_cpu_s_per_1k_events"]
        out.append(row)
    return out


def calibrate(up: common.Proc, quick: bool) -> list[dict[str, Any]]:
    """CPU per event of each candidate load-generator client on the direct path."""
    import trio

    import loadgen_alt

    body = loadgen.stream_body(events=EVENTS, interval=INTERVAL)
    duration = 1.5 if quick else 2.0
    rows = []
    for conc in (50, 200):
        for impl in ("epoll+raw", "trio+raw", "trio+h11", "httpx"):
            meter = CpuMeter(up, None)
            if impl == "epoll+raw":
                res, wall = loadgen.closed_loop(
                    loadgen.Engine(), up.port, conc, duration,
                    lambda i, k: loadgen.Req("POST", "/v1/messages", body, stamps=True),
                    stagger=0.5)
                events = sum(r.events for r in res)
                delays = ms([d for r in res for d in r.delays])
            elif impl == "httpx":
                _n, events, wall = trio.run(loadgen_alt.httpx_loop, up.port, conc, duration, body, 0.5)
                delays = []
            else:
                res, wall = trio.run(loadgen_alt.trio_loop, up.port, conc, duration, body,
                                     impl.split("+")[1], 0.5)
                events = sum(r.events for r in res)
                delays = ms([d for r in res for d in r.delays])
            cpu = meter.delta()
            row = {
                "client": impl, "concurrency": conc, "events": events,
                "events_per_s": events / wall if wall else None,
                "client_cpu_us_per_event": per_k(cpu["loadgen"], events, 1_000_000),
                "upstream_cpu_us_per_event": per_k(cpu["upstream"], events, 1_000_000),
                "delay_ms": summarize(delays) if delays else None,
            }
            rows.append(row)
            print(f"  calibrate {impl:10s} c={conc:3d}: {row['events_per_s']:.0f} ev/s, client "
                  f"{row['client_cpu_us_per_event']:.1f} µs/event, upstream "
                  f"{row['upstream_cpu_us_per_event']:.1f} µs/event", flush=True)
    return rows


def print_tables(cells: list[dict[str, Any]], add: list[dict[str, Any]]) -> None:
    rows = []
    for c in cells:
        rows.append([c["concurrency"], c["path"], c["streams"], c["events"],
                     fmt(c["ttfb_ms"].get("p50"), "", 2), fmt(c["ttfb_ms"].get("p99"), "", 2),
                     fmt(c["delay_ms"].get("p50"), "", 2), fmt(c["delay_ms"].get("p99"), "", 2),
                     fmt(c["proxy_cpu_s_per_1k_events"], "", 3),
                     fmt(c["loadgen_cpu_s_per_1k_events"], "", 3), fmt(c["core0_util"], "", 2),
                     ",".join(f"{k}:{v}" for k, v in c["outcomes"].items())])
    print(table(["conc", "path", "streams", "events", "ttfb p50 ms", "ttfb p99", "delay p50 ms",
                 "delay p99", "proxy cpu s/1k ev", "loadgen s/1k", "core0 util", "outcomes"], rows))
    print()
    rows = [[a["concurrency"], a["path"], fmt(a["added_ttfb_p50_ms"], "", 2),
             fmt(a["added_ttfb_p99_ms"], "", 2), fmt(a["added_delay_p50_ms"], "", 2),
             fmt(a["added_delay_p99_ms"], "", 2), fmt(a["proxy_cpu_s_per_1k_events"], "", 3)]
            for a in add]
    print(table(["conc", "path", "+ttfb p50 ms", "+ttfb p99", "+delay p50 ms", "+delay p99",
                 "proxy cpu s/1k ev"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calibrate", action="store_true", help="also compare load-generator clients")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--concurrency", default="1,50,200")
    args = ap.parse_args()
    common.banner("latency", args.quick)
    common.check_trioproxy_imports()
    paths = args.paths.split(",")
    levels = [int(x) for x in args.concurrency.split(",")]
    p = plan(args.quick)
    progress = Progress("latency")
    t_start = time.monotonic()
    body = loadgen.stream_body(events=EVENTS, interval=INTERVAL, size=40)
    turns: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    calibration = None
    with Procs() as procs:
        up, targets = start_paths(procs, paths)
        progress(f"started upstream + {len(targets) - ('direct' in targets)} proxies", force=True)
        warm_up(targets)
        eng = loadgen.Engine()
        for conc in levels:
            for rnd in range(p["rounds"]):
                order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
                for path in order:
                    turn = run_cell(eng, up, targets[path], conc, p["duration"][conc],
                                    p["stagger"], body)
                    turns[(conc, path)].append(turn)
                    n = sum(r.events for r in turn["results"])
                    progress(f"c={conc} round {rnd + 1}/{p['rounds']} {path}: "
                             f"{len(turn['results'])} streams, {n} events in {turn['wall']:.1f}s",
                             force=True)
        if args.calibrate:
            calibration = calibrate(up, args.quick)
    cells = [aggregate(conc, path, turns[(conc, path)]) for conc in levels for path in paths]
    add = added(cells)
    print_tables(cells, add)
    out = common.write_result("latency", args.quick, {
        "config": {"events_per_stream": EVENTS, "interval_s": INTERVAL, "event_text_chars": 40,
                   "concurrency": levels, "paths": paths, **p,
                   "note": "closed loop; each user has its own keep-alive connection; paths take "
                           "turns in rounds with rotating order"},
        "cells": cells, "added": add, "loadgen_calibration": calibration,
        "run_seconds": time.monotonic() - t_start,
    })
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
