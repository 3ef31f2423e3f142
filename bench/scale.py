"""Scenario 4: 2,000 concurrent slow streams through one proxy worker.

Per path, one at a time: measure the proxy's RSS and idle CPU with no streams (baseline), open
2,000 streams (at most 64 connecting at once, so no listen backlog overflows) that send
``message_start`` and then stay silent (the upstream holds them), measure RSS and CPU while
they idle, release them (a few deltas and the end), and check they all complete. The
keepalive path keeps its 15 s keepalive timers running through the idle window, so its cost
is visible. RLIMIT_NOFILE is raised for the bench and its children. trioproxy runs with
TRIOPROXY_MAX_CONNECTIONS=4096 (its default of 200 upstream connections per origin would cap
it at 200 open streams; ``--default-limits`` shows that), the same limit the conventional
proxy's httpx pool gets.

Reported: streams opened and completed (within 60 s of the release; 30 s quick), time to
open them all and to drain them after the release, proxy RSS per open stream (RSS with them
open minus baseline, over the count), proxy CPU while they idle (fraction of a core) against
its idle baseline, and file descriptors. ``--quick`` uses 500 streams.

    python bench/scale.py [--quick] [--streams N]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import common
import loadgen
from common import Procs, Progress, fmt, start_paths, table


MAX_CONNECTIONS = 4096


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"streams": 500, "baseline_s": 0.5, "idle_s": 2.0, "hold_max_s": 60.0,
                "drain_max_s": 30.0}
    return {"streams": 2000, "baseline_s": 3.0, "idle_s": 15.0, "hold_max_s": 120.0,
            "drain_max_s": 60.0}


def idle_cpu(s: common.ProcSampler | None, seconds: float, eng: loadgen.Engine) -> float | None:
    """Fraction of a core the process tree uses over ``seconds`` (the engine keeps reading)."""
    if s is None:
        return None
    c0, t0 = s.cpu(), time.monotonic()
    eng.run(lambda: False, time.monotonic() + seconds)
    return (s.cpu() - c0) / (time.monotonic() - t0)


def run_path(eng: loadgen.Engine, up: common.Proc, t: common.Target, p: dict[str, Any],
             progress: Progress) -> dict[str, Any]:
    n = p["streams"]
    sampler = t.sampler() if t.proc else up.sampler()  # direct: the upstream's own cost
    rss0 = sampler.rss()
    cpu_base = idle_cpu(sampler, p["baseline_s"], eng)
    group = f"scale-{t.path}"
    opened = [0]
    body = loadgen.stream_body(events=4, interval=0.01, hold=group, hold_max=p["hold_max_s"])
    reqs = [loadgen.Req("POST", "/v1/messages", body, stamps=True,
                        total_timeout=p["hold_max_s"] + 60,
                        on_first=lambda r: opened.__setitem__(0, opened[0] + 1))
            for _ in range(n)]
    results: list[loadgen.StreamResult | None] = [None] * n
    done = [0]
    c_open0 = sampler.cpu()
    t0 = time.monotonic()
    for i, req in enumerate(reqs):
        def finished(r: loadgen.StreamResult, i: int = i) -> None:
            results[i] = r
            done[0] += 1
        req.on_done = finished
        loadgen.ClientConn(eng, t.port).request(req)
    eng.run(lambda: opened[0] + done[0] >= n, t0 + 90,
            tick=lambda: progress(f"{t.path}: {opened[0]}/{n} streams open"), tick_every=5.0)
    open_s = time.monotonic() - t0
    cpu_open = sampler.cpu() - c_open0
    progress(f"{t.path}: {opened[0]} open in {open_s:.1f} s ({done[0]} ended early)", force=True)
    eng.run(lambda: False, time.monotonic() + 1.0)  # settle
    rss_open = sampler.rss()
    worker_rss_open = sampler.worker_rss()
    fds = sampler.fds()
    cpu_idle = idle_cpu(sampler, p["idle_s"], eng)
    rss_after_idle = sampler.rss()
    still_open = opened[0] - done[0]
    released = loadgen.control(up.port, "POST", f"/bench/release?group={group}")
    t_rel = time.monotonic()
    eng.run(lambda: done[0] >= n, t_rel + p["drain_max_s"],
            tick=lambda: progress(f"{t.path}: {done[0]}/{n} streams done"), tick_every=5.0)
    drain_s = time.monotonic() - t_rel
    final = [r if r is not None else loadgen.StreamResult(
        outcome="error", reason=f"not finished {p['drain_max_s']:g} s after the release")
        for r in results]
    outcomes: dict[str, int] = defaultdict(int)
    for r in final:
        outcomes[r.outcome] += 1
    eng.run(lambda: False, time.monotonic() + 0.5)
    rss_end = sampler.rss()
    per_stream = (rss_open - rss0) / still_open if still_open else None
    return {
        "path": t.path, "measured_process": "proxy" if t.proc else "upstream (direct path)",
        "streams": n, "opened": opened[0], "open_during_idle": still_open,
        "released": released.get("streams") if isinstance(released, dict) else None,
        "outcomes": dict(outcomes),
        "errors": sorted({r.reason for r in final if r.outcome != "complete"})[:5],
        "open_seconds": open_s, "open_cpu_ms_per_stream": cpu_open / max(1, opened[0]) * 1000,
        "rss_baseline_mb": rss0 / 2**20, "rss_open_mb": rss_open / 2**20,
        "worker_rss_open_mb": worker_rss_open / 2**20,
        "rss_after_idle_mb": rss_after_idle / 2**20, "rss_end_mb": rss_end / 2**20,
        "rss_per_stream_kb": per_stream / 1024 if per_stream is not None else None,
        "cpu_idle_baseline": cpu_base, "cpu_idle_with_streams": cpu_idle,
        "cpu_idle_per_1k_streams": ((cpu_idle - (cpu_base or 0)) / still_open * 1000)
        if cpu_idle is not None and still_open else None,
        "fds_open": fds, "drain_seconds": drain_s,
        "completed_within_drain_max": sum(r.outcome == "complete" for r in final),
        "ttfb_ms": common.summarize(common.ms([r.ttfb for r in final if r.ttfb is not None])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--streams", type=int, default=None)
    ap.add_argument("--paths", default="direct,trioproxy,trioproxy_ka,streaming")
    ap.add_argument("--default-limits", action="store_true",
                    help="keep trioproxy's default TRIOPROXY_MAX_CONNECTIONS (200 per upstream)")
    args = ap.parse_args()
    common.banner("scale", args.quick)
    common.check_trioproxy_imports()
    p = plan(args.quick)
    if args.streams:
        p["streams"] = args.streams
    paths = args.paths.split(",")
    progress = Progress("scale")
    t_start = time.monotonic()
    rows = []
    with Procs() as procs:
        # One upstream connection per open stream (HTTP/1.1): trioproxy's default pool limit of
        # 200 per origin would queue the rest (and 504 them after the 30 s pool timeout), so
        # it gets the same 4096 as the conventional proxy's httpx pool.
        env = {} if args.default_limits else {"TRIOPROXY_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
        up, targets = start_paths(procs, paths, trioproxy_env=env)
        eng = loadgen.Engine(max_opening=64)
        warm = loadgen.stream_body(events=4, interval=0.001)
        for t in targets.values():
            loadgen.parallel(eng, t.port, [loadgen.Req("POST", "/v1/messages", warm)
                                           for _ in range(8)], deadline=time.monotonic() + 30)
        for path in paths:
            row = run_path(eng, up, targets[path], p, progress)
            rows.append(row)
            progress(f"{path}: {fmt(row['rss_per_stream_kb'], ' KB', 1)}/stream, idle cpu "
                     f"{fmt(row['cpu_idle_with_streams'], '', 3)} (baseline "
                     f"{fmt(row['cpu_idle_baseline'], '', 3)}), outcomes {row['outcomes']}",
                     force=True)
    print(table(["path", "open", "open s", "drain s", "RSS base MB", "RSS open MB", "KB/stream",
                 "idle cpu base", "idle cpu open", "fds", "outcomes"],
                [[r["path"], r["open_during_idle"], fmt(r["open_seconds"], "", 1),
                  fmt(r["drain_seconds"], "", 1),
                  fmt(r["rss_baseline_mb"], "", 1), fmt(r["rss_open_mb"], "", 1),
                  fmt(r["rss_per_stream_kb"], "", 1), fmt(r["cpu_idle_baseline"], "", 3),
                  fmt(r["cpu_idle_with_streams"], "", 3), r["fds_open"],
                  ",".join(f"{k}:{v}" for k, v in r["outcomes"].items())] for r in rows]))
    out = common.write_result("scale", args.quick, {
        "config": {**p, "paths": paths, "max_opening": 64, "keepalive_s": 15.0,
                   "trioproxy_max_connections": None if args.default_limits else MAX_CONNECTIONS,
                   "rlimit_nofile": common.raise_nofile()[0]},
        "rows": rows, "run_seconds": time.monotonic() - t_start,
    })
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
