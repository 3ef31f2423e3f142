"""Scenario 3: the most events/s one proxy worker relays in time, and small requests/s.

Streaming knee: 50 concurrent SSE streams on kept-alive connections, started evenly over
0.5 s; only events emitted while all 50 run (the steady window) count. The offered rate is
ramped geometrically (x1.5 from 1,000 events/s, x2 with ``--quick``, up to 48,000) by
shortening the interval. A level passes *strictly* when every event arrives within 50 ms of
its emission and the upstream kept to the offered rate; the p99 knee only asks p99 <= 50 ms.
The ramp stops after two consecutive p99 failures (or at the cap);
with the full run one more level is tried between the last strict pass and the first
failure. The direct path runs the same ramp: where *it* fails, the upstream + load generator
core is the limit and higher proxy numbers would be meaningless.

Non-streaming: 32 closed-loop users sending a small ``stream: false`` Messages request; requests/s,
latency p50/p99 and proxy CPU per request.

    python bench/throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from typing import Any

import common
import loadgen
from common import CpuMeter, Procs, Progress, fmt, ms, per_k, start_paths, summarize, table

STREAMS = 50
RAMP_S = 0.5  # stream starts are spread over this long; events before all run are not counted
BUDGET_MS = 50.0
CAP = 48000.0


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"level_s": 0.8, "start": 1000.0, "factor": 2.0, "refine": False, "rps_s": 1.0,
                "rps_users": 32}
    return {"level_s": 3.0, "start": 1000.0, "factor": 1.5, "refine": True, "rps_s": 3.0,
            "rps_users": 32}


def run_level(eng: loadgen.Engine, up: common.Proc, t: common.Target,
              conns: list[loadgen.ClientConn], rate: float, seconds: float) -> dict[str, Any]:
    """One level: STREAMS streams on kept-alive connections, started evenly over RAMP_S; only
    events emitted in the steady window (all streams running) count."""
    interval = STREAMS / rate
    n = max(2, int(math.ceil((RAMP_S + seconds) / interval)))
    body = loadgen.stream_body(events=n, interval=interval, size=40)
    reqs = [loadgen.Req("POST", "/v1/messages", body, stamps=True, emits=True,
                        total_timeout=seconds * 4 + 20) for _ in range(STREAMS)]
    starts = [RAMP_S * i / STREAMS for i in range(STREAMS)]
    meter = CpuMeter(up, t.proc)
    results = loadgen.parallel(eng, t.port, reqs, starts=starts, conns=conns,
                               deadline=time.monotonic() + seconds * 4 + 30)
    cpu = meter.delta()
    # steady window: after the last stream's first delta, before the first stream's last delta
    firsts = [r.emits[0] for r in results if r.emits]
    lasts = [r.emits[-1] for r in results if r.emits]
    ok_streams = sum(r.outcome == "complete" and len(r.delays) == n + 5 for r in results)
    lo = max(firsts) + int(interval * 1e9) if firsts else 0
    hi = min(lasts) - int(interval * 1e9) if lasts else 0
    delays = ms([d for r in results if r.emits for d, e in zip(r.delays, r.emits) if lo <= e <= hi])
    in_window = len(delays)
    window_s = (hi - lo) / 1e9 if hi > lo else 0.0
    achieved = in_window / window_s if window_s > 0 else None
    d = summarize(delays)
    source_ok = achieved is not None and achieved >= 0.95 * rate
    p99_ok = d.get("p99") is not None and d["p99"] <= BUDGET_MS and ok_streams == STREAMS
    strict_ok = p99_ok and d["max"] <= BUDGET_MS and source_ok
    return {
        "offered_events_per_s": rate, "interval_ms": interval * 1000, "events_per_stream": n,
        "complete_streams": ok_streams, "steady_window_s": window_s, "events_in_window": in_window,
        "achieved_rate_in_window": achieved, "source_kept_up": source_ok,
        "delay_ms": d, "delay_all_events_ms": summarize(ms([x for r in results for x in r.delays])),
        "pass_strict": strict_ok, "pass_p99": p99_ok,
        "proxy_cpu_util": cpu["proxy"] / cpu["wall"] if cpu.get("proxy") is not None else None,
        "proxy_cpu_us_per_event": per_k(cpu.get("proxy"), sum(len(r.delays) for r in results),
                                        1_000_000),
        "core0_util": (cpu["loadgen"] + cpu["upstream"]) / cpu["wall"],
        "wall_s": cpu["wall"],
    }


def ramp(eng: loadgen.Engine, up: common.Proc, t: common.Target, p: dict[str, Any],
         progress: Progress) -> dict[str, Any]:
    levels: list[dict[str, Any]] = []
    rate = p["start"]
    fails = 0
    conns = [loadgen.ClientConn(eng, t.port) for _ in range(STREAMS)]

    def one(r: float) -> dict[str, Any]:
        lv = run_level(eng, up, t, conns, r, p["level_s"])
        levels.append(lv)
        d = lv["delay_ms"]
        progress(f"{t.path}: {r:7.0f} ev/s offered -> p50 {fmt(d.get('p50'), 'ms', 2)} p99 "
                 f"{fmt(d.get('p99'), 'ms', 1)} max {fmt(d.get('max'), 'ms', 1)}; proxy cpu "
                 f"{fmt(lv['proxy_cpu_util'], '', 2)}; core0 {lv['core0_util']:.2f}; "
                 f"{'PASS' if lv['pass_strict'] else ('p99 ok' if lv['pass_p99'] else 'FAIL')}",
                 force=True)
        return lv

    for _ in range(20):  # bounded
        lv = one(rate)
        fails = 0 if lv["pass_p99"] else fails + 1
        if fails >= 2 or rate * p["factor"] > CAP * 1.01:
            break
        rate = round(rate * p["factor"])
    if p["refine"]:
        passed = [lv["offered_events_per_s"] for lv in levels if lv["pass_strict"]]
        best = max(passed) if passed else None
        above = [lv["offered_events_per_s"] for lv in levels
                 if best is not None and lv["offered_events_per_s"] > best and not lv["pass_strict"]]
        if best is not None and above:
            mid = round(math.sqrt(best * min(above)))
            if best < mid < min(above):
                one(mid)
    for c in conns:
        c.close()
    strict = [lv["offered_events_per_s"] for lv in levels if lv["pass_strict"]]
    p99 = [lv["offered_events_per_s"] for lv in levels if lv["pass_p99"]]
    top = max(levels, key=lambda lv: lv["offered_events_per_s"])
    return {
        "path": t.path, "levels": sorted(levels, key=lambda lv: lv["offered_events_per_s"]),
        "knee_strict_events_per_s": max(strict) if strict else None,
        "knee_p99_events_per_s": max(p99) if p99 else None,
        "first_strict_failure": min((lv["offered_events_per_s"] for lv in levels
                                     if not lv["pass_strict"]), default=None),
        "highest_tested": top["offered_events_per_s"],
        "hit_cap": top["offered_events_per_s"] * p["factor"] > CAP * 1.01 and top["pass_p99"],
    }


def requests_per_s(eng: loadgen.Engine, up: common.Proc, t: common.Target, users: int,
                   seconds: float) -> dict[str, Any]:
    meter = CpuMeter(up, t.proc)
    results, wall = loadgen.closed_loop(
        eng, t.port, users, seconds,
        lambda i, k: loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY, total_timeout=30.0),
        stagger=0.1)
    cpu = meter.delta()
    ok = [r for r in results if r.outcome == "complete" and r.status == 200]
    lat = ms([r.t_end for r in ok if r.t_end is not None])
    outcomes: dict[str, int] = defaultdict(int)
    for r in results:
        outcomes[f"{r.outcome}:{r.status}"] += 1
    return {
        "path": t.path, "users": users, "requests": len(results), "ok": len(ok),
        "outcomes": dict(outcomes), "requests_per_s": len(ok) / wall, "latency_ms": summarize(lat),
        "proxy_cpu_ms_per_request": per_k(cpu.get("proxy"), len(ok), 1000),
        "proxy_cpu_util": cpu["proxy"] / cpu["wall"] if cpu.get("proxy") is not None else None,
        "core0_util": (cpu["loadgen"] + cpu["upstream"]) / cpu["wall"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--paths", default="direct,trioproxy,streaming",
                    help="paths for the streaming ramp")
    ap.add_argument("--rps-paths", default="direct,trioproxy,streaming,buffering")
    args = ap.parse_args()
    common.banner("throughput", args.quick)
    common.check_trioproxy_imports()
    p = plan(args.quick)
    ramp_paths = args.paths.split(",")
    rps_paths = args.rps_paths.split(",")
    paths = [x for x in common.PATHS if x in ramp_paths or x in rps_paths]
    progress = Progress("throughput")
    t_start = time.monotonic()
    with Procs() as procs:
        up, targets = start_paths(procs, paths)
        eng = loadgen.Engine()
        warm = loadgen.stream_body(events=8, interval=0.002)
        for t in targets.values():
            loadgen.parallel(eng, t.port, [loadgen.Req("POST", "/v1/messages", warm)
                                           for _ in range(4)], deadline=time.monotonic() + 30)
        ramps = [ramp(eng, up, targets[path], p, progress) for path in ramp_paths]
        rps = []
        for path in rps_paths:
            row = requests_per_s(eng, up, targets[path], p["rps_users"], p["rps_s"])
            rps.append(row)
            progress(f"requests/s {path}: {row['requests_per_s']:.0f} req/s, p50 "
                     f"{fmt(row['latency_ms'].get('p50'), 'ms', 2)}", force=True)
    rows = [[r["path"], fmt(r["knee_strict_events_per_s"], "", 0),
             fmt(r["first_strict_failure"], "", 0), fmt(r["knee_p99_events_per_s"], "", 0),
             fmt(r["highest_tested"], "", 0), "yes" if r["hit_cap"] else "no"] for r in ramps]
    print(table(["path", "knee (max<=50ms) ev/s", "first strict fail", "knee (p99<=50ms) ev/s",
                 "highest tested", "hit cap"], rows))
    print()
    rows = [[r["path"], fmt(r["requests_per_s"], "", 0), fmt(r["latency_ms"].get("p50"), "", 2),
             fmt(r["latency_ms"].get("p99"), "", 2), fmt(r["proxy_cpu_ms_per_request"], "", 3),
             fmt(r["core0_util"], "", 2), ",".join(f"{k}={v}" for k, v in r["outcomes"].items())]
            for r in rps]
    print(table(["path", "req/s", "lat p50 ms", "lat p99 ms", "proxy cpu ms/req", "core0 util",
                 "outcomes"], rows))
    out = common.write_result("throughput", args.quick, {
        "config": {"streams": STREAMS, "budget_ms": BUDGET_MS, "cap_events_per_s": CAP, **p,
                   "ramp_paths": ramp_paths, "rps_paths": rps_paths},
        "ramps": ramps, "requests_per_s": rps, "run_seconds": time.monotonic() - t_start,
    })
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
