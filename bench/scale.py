"""Scenario 4: thousands of concurrent slow streams through one proxy worker.

Per path, one at a time: measure the proxy's RSS and idle CPU with no streams (baseline), open
2,000 streams (at most 64 connecting at once, so no listen backlog overflows) that send
``message_start`` and then stay silent (the upstream holds them), measure RSS and CPU while
they idle, release them (a few deltas and the end), and check they all complete. The
keepalive path keeps its 15 s keepalive timers running through the idle window, so its cost
is visible. RLIMIT_NOFILE is raised for the bench and its children. trioproxy runs on its
defaults (``max_connections = "auto"``: what its open-files limit allows) **with accounting
on** (a SQLite ledger of each path's own), and after the drain the bench checks that every
stream has exactly one record, under the request id its response carried. ``--max-connections
4096`` gives trioproxy the conventional proxy's httpx pool limit instead.

The agent-scale run (each stream held like a long agent turn, then released):
``python bench/scale.py --streams 9000 --paths direct,trioproxy --idle 40 --name scale9000``.
The idle window is longer than a quarter of the shorter relay timeout (the stream watcher's
wake-up period, 15 s on defaults), so watcher wake-ups show in the idle CPU. A path
``trioproxy+TRIOPROXY_NAME=VALUE`` is trioproxy with that setting, measured in the same run
(e.g. ``trioproxy+TRIOPROXY_WRITE_STALL_TIMEOUT=600`` wakes the watcher 10x less often), and
``trioproxy@REV`` is that git revision's ``trioproxy/`` (a before/after in one run).

Reported: streams opened and completed (within 60 s of the release; 30 s quick), time to
open them all and to drain them after the release, proxy RSS per open stream (RSS with them
open minus baseline, over the count), proxy CPU while they idle (fraction of a core) against
its idle baseline, and file descriptors. ``--quick`` uses 500 streams.

    python bench/scale.py [--quick] [--streams N] [--idle S] [--paths ...] [--name NAME]
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import common
import loadgen
from common import Procs, Progress, fmt, table

REQUEST_ID = b"x-trioproxy-request-id"


def plan(quick: bool, streams: int | None = None, idle: float | None = None,
         settle: float = 1.0) -> dict[str, Any]:
    p = _plan(quick)
    if streams:
        p["streams"] = streams
    if idle:
        p["idle_s"] = idle
    p["settle_s"] = settle
    p["hold_max_s"] += settle
    # held until released: opening (~3 ms of proxy CPU each), the idle window, the sampling
    p["hold_max_s"] = max(p["hold_max_s"], p["streams"] * 0.01 + p["idle_s"] + 90)
    return p


def _plan(quick: bool) -> dict[str, Any]:
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


def ledger_check(db: Any, results: list[loadgen.StreamResult], wait_s: float = 30.0
                 ) -> dict[str, Any]:
    """Each stream's record in the SQLite ledger, by the request id its response carried:
    how many streams have exactly one, none, and how the records ended."""
    ids = [dict(r.headers or []).get(REQUEST_ID, b"").decode() for r in results]
    deadline = time.monotonic() + wait_s
    found: dict[str, str] = {}
    while time.monotonic() < deadline:  # the writer commits in batches: wait for the last
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT request_id, end_reason FROM usage_records").fetchall()
        except sqlite3.Error:
            rows = []
        found = {rid: end for rid, end in rows}
        if all(i in found for i in ids if i):
            break
        time.sleep(0.5)
    ends: dict[str, int] = defaultdict(int)
    for i in ids:
        if i in found:
            ends[found[i] or "none"] += 1
    return {"streams_with_id": sum(1 for i in ids if i),
            "streams_with_one_record": sum(1 for i in ids if i and i in found),
            "streams_without_record": sum(1 for i in ids if i and i not in found),
            "distinct_ids": len({i for i in ids if i}), "ledger_rows": len(found),
            "record_end_reasons": dict(ends)}


class HeldStreams:
    """A path's streams while they are held open: filled in by the requests' callbacks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.opened = 0  # streams with a first body byte
        self.done = 0  # streams ended
        self.results: list[loadgen.StreamResult | None] = [None] * n

    def first_byte(self, r: loadgen.StreamResult) -> None:
        self.opened += 1

    def finisher(self, i: int) -> Callable[[loadgen.StreamResult], None]:
        def finished(r: loadgen.StreamResult) -> None:
            self.results[i] = r
            self.done += 1
        return finished


def open_streams(eng: loadgen.Engine, t: common.Target, p: dict[str, Any], group: str,
                 streams: HeldStreams, sampler: common.ProcSampler, progress: Progress
                 ) -> dict[str, float]:
    """Open the streams (the upstream holds each after its first event) and wait until each
    is open or ended: the time that took, the proxy's and the load generator's CPU meanwhile."""
    n = streams.n
    body = loadgen.stream_body(events=4, interval=0.01, hold=group, hold_max=p["hold_max_s"])
    reqs = [loadgen.Req("POST", "/v1/messages", body, stamps=True,
                        total_timeout=p["hold_max_s"] + 60, on_first=streams.first_byte)
            for _ in range(n)]
    c_open0, gen0 = sampler.cpu(), common.self_cpu()
    t0 = time.monotonic()
    for i, req in enumerate(reqs):
        req.on_done = streams.finisher(i)
        loadgen.ClientConn(eng, t.port).request(req)
    eng.run(lambda: streams.opened + streams.done >= n, t0 + max(90.0, n * 0.02),
            tick=lambda: progress(f"{t.path}: {streams.opened}/{n} streams open"), tick_every=5.0)
    open_s = time.monotonic() - t0
    cpu_open = sampler.cpu() - c_open0
    gen_open = common.self_cpu() - gen0
    progress(f"{t.path}: {streams.opened} open in {open_s:.1f} s ({streams.done} ended early)",
             force=True)
    return {"open_s": open_s, "cpu_open": cpu_open, "gen_open": gen_open}


def measure_idle(eng: loadgen.Engine, sampler: common.ProcSampler, p: dict[str, Any]
                 ) -> dict[str, Any]:
    """After the settle time: RSS and fds with the streams open, CPU while they idle (the
    proxy's, and the load generator's per second), RSS after the idle window."""
    eng.run(lambda: False, time.monotonic() + p["settle_s"])  # settle
    rss_open = sampler.rss()
    worker_rss_open = sampler.worker_rss()
    fds = sampler.fds()
    gen0 = common.self_cpu()
    cpu_idle = idle_cpu(sampler, p["idle_s"], eng)
    gen_idle = (common.self_cpu() - gen0) / p["idle_s"]
    return {"rss_open": rss_open, "worker_rss_open": worker_rss_open, "fds": fds,
            "cpu_idle": cpu_idle, "gen_idle": gen_idle, "rss_after_idle": sampler.rss()}


def release_and_drain(eng: loadgen.Engine, up: common.Proc, path: str, group: str,
                      p: dict[str, Any], streams: HeldStreams, progress: Progress
                      ) -> tuple[Any, float, list[loadgen.StreamResult]]:
    """Release the held streams and wait for them to end: (the upstream's answer to the
    release, seconds to drain, every stream's result)."""
    released = loadgen.control(up.port, "POST", f"/bench/release?group={group}")
    t_rel = time.monotonic()
    eng.run(lambda: streams.done >= streams.n, t_rel + p["drain_max_s"],
            tick=lambda: progress(f"{path}: {streams.done}/{streams.n} streams done"),
            tick_every=5.0)
    drain_s = time.monotonic() - t_rel
    final = [r if r is not None else loadgen.StreamResult(
        outcome="error", reason=f"not finished {p['drain_max_s']:g} s after the release")
        for r in streams.results]
    return released, drain_s, final


def run_path(eng: loadgen.Engine, up: common.Proc, t: common.Target, p: dict[str, Any],
             progress: Progress, ledger: Any = None) -> dict[str, Any]:
    """One path: its idle baseline, then the streams opened, held idle, released and drained;
    returns the path's row."""
    sampler = t.sampler() if t.proc else up.sampler()  # direct: the upstream's own cost
    rss0 = sampler.rss()
    cpu_base = idle_cpu(sampler, p["baseline_s"], eng)
    group = "scale-" + "".join(c if c.isalnum() else "_" for c in t.path)  # URL-safe
    streams = HeldStreams(p["streams"])
    opening = open_streams(eng, t, p, group, streams, sampler, progress)
    idle = measure_idle(eng, sampler, p)
    still_open = streams.opened - streams.done
    released, drain_s, final = release_and_drain(eng, up, t.path, group, p, streams, progress)
    eng.run(lambda: False, time.monotonic() + 0.5)
    rss_end = sampler.rss()
    records = ledger_check(ledger, final) if ledger is not None else None
    return path_row(t, streams, final, still_open, released, records, {
        **opening, **idle, "rss0": rss0, "cpu_base": cpu_base, "drain_s": drain_s,
        "rss_end": rss_end})


def path_row(t: common.Target, streams: HeldStreams, final: list[loadgen.StreamResult],
             still_open: int, released: Any, records: dict[str, Any] | None,
             m: dict[str, Any]) -> dict[str, Any]:
    """The path's row from its measurements ``m`` (bytes, CPU seconds, seconds)."""
    outcomes: dict[str, int] = defaultdict(int)
    for r in final:
        outcomes[r.outcome] += 1
    open_s, cpu_open, cpu_idle = m["open_s"], m["cpu_open"], m["cpu_idle"]
    per_stream = (m["rss_open"] - m["rss0"]) / still_open if still_open else None
    return {
        "path": t.path, "measured_process": "proxy" if t.proc else "upstream (direct path)",
        "streams": streams.n, "opened": streams.opened, "open_during_idle": still_open,
        "released": released.get("streams") if isinstance(released, dict) else None,
        "outcomes": dict(outcomes),
        "errors": sorted({r.reason for r in final if r.outcome != "complete"})[:5],
        "open_seconds": open_s, "open_cpu_ms_per_stream": cpu_open / max(1, streams.opened) * 1000,
        "open_proxy_cores": cpu_open / open_s if open_s else None,
        "loadgen_open_cores": m["gen_open"] / open_s if open_s else None,
        "loadgen_idle_cores": m["gen_idle"], "records": records,
        "rss_baseline_mb": m["rss0"] / 2**20, "rss_open_mb": m["rss_open"] / 2**20,
        "worker_rss_open_mb": m["worker_rss_open"] / 2**20,
        "rss_after_idle_mb": m["rss_after_idle"] / 2**20, "rss_end_mb": m["rss_end"] / 2**20,
        "rss_per_stream_kb": per_stream / 1024 if per_stream is not None else None,
        "cpu_idle_baseline": m["cpu_base"], "cpu_idle_with_streams": cpu_idle,
        "cpu_idle_per_1k_streams": ((cpu_idle - (m["cpu_base"] or 0)) / still_open * 1000)
        if cpu_idle is not None and still_open else None,
        "fds_open": m["fds"], "drain_seconds": m["drain_s"],
        "completed_within_drain_max": sum(r.outcome == "complete" for r in final),
        "ttfb_ms": common.summarize(common.ms([r.ttfb for r in final if r.ttfb is not None])),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--streams", type=int, default=None)
    ap.add_argument("--idle", type=float, default=None, help="seconds the streams idle open")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between the last stream opening and the idle measurement "
                         "(over 60: each watcher's one wake-up after the first event's send "
                         "is past, so the idle CPU is the steady state of a long silence)")
    ap.add_argument("--paths", default="direct,trioproxy,trioproxy_ka,streaming")
    ap.add_argument("--max-connections", default=None,
                    help="trioproxy's TRIOPROXY_MAX_CONNECTIONS (default: its own, auto)")
    ap.add_argument("--name", default="scale", help="result file name (results/NAME.json)")
    return ap.parse_args()


def start_targets(procs: Procs, up: common.Proc, paths: list[str], max_connections: str | None
                  ) -> tuple[dict[str, common.Target], dict[str, Any]]:
    """Start every path's proxy (accounting on, a data dir of its own; ``PATH+TRIOPROXY_X=V``
    a setting, ``PATH@REV`` a revision): the targets, and the ledger of each trioproxy path."""
    targets: dict[str, common.Target] = {}
    ledgers: dict[str, Any] = {}
    for path in paths:
        if path == "direct":
            targets[path] = common.Target(path, up.port, None)
            continue
        data = procs.logdir / f"data-{len(targets)}"
        data.mkdir()
        env = {"TRIOPROXY_ACCOUNTING": "true", "XDG_DATA_HOME": str(data)}
        if max_connections:
            env["TRIOPROXY_MAX_CONNECTIONS"] = max_connections
        base, *extra = path.split("+")  # trioproxy+TRIOPROXY_X=1: a variant, same run
        env.update(e.split("=", 1) for e in extra)
        base, _, rev = base.partition("@")  # trioproxy@REV: that revision's code
        if rev:
            env["PYTHONPATH"] = common.export_revision(rev)
        proc = procs.proxy(base, up.port, trioproxy_env=env)
        targets[path] = common.Target(path, proc.port, proc)
        if path.startswith("trioproxy"):
            ledgers[path] = data / "trioproxy" / "usage.db"
    return targets, ledgers


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(table(["path", "open", "open s", "drain s", "RSS base MB", "RSS open MB", "KB/stream",
                 "idle cpu base", "idle cpu open", "fds", "outcomes", "one record"],
                [[r["path"], r["open_during_idle"], fmt(r["open_seconds"], "", 1),
                  fmt(r["drain_seconds"], "", 1),
                  fmt(r["rss_baseline_mb"], "", 1), fmt(r["rss_open_mb"], "", 1),
                  fmt(r["rss_per_stream_kb"], "", 1), fmt(r["cpu_idle_baseline"], "", 3),
                  fmt(r["cpu_idle_with_streams"], "", 3), r["fds_open"],
                  ",".join(f"{k}:{v}" for k, v in r["outcomes"].items()),
                  r["records"]["streams_with_one_record"] if r["records"] else "-"]
                 for r in rows]))


def main() -> None:
    args = parse_args()
    common.banner(args.name, args.quick)
    common.check_trioproxy_imports()
    p = plan(args.quick, args.streams, args.idle, args.settle)
    paths = args.paths.split(",")
    progress = Progress("scale")
    t_start = time.monotonic()
    rows = []
    nofile = common.raise_nofile()[0]
    with Procs() as procs:
        up = procs.upstream()
        targets, ledgers = start_targets(procs, up, paths, args.max_connections)
        eng = loadgen.Engine(max_opening=64)
        warm = loadgen.stream_body(events=4, interval=0.001)
        for t in targets.values():
            loadgen.parallel(eng, t.port, [loadgen.Req("POST", "/v1/messages", warm)
                                           for _ in range(8)], deadline=time.monotonic() + 30)
        for path in paths:
            row = run_path(eng, up, targets[path], p, progress, ledgers.get(path))
            rows.append(row)
            progress(f"{path}: {fmt(row['rss_per_stream_kb'], ' KB', 1)}/stream, idle cpu "
                     f"{fmt(row['cpu_idle_with_streams'], '', 3)} (baseline "
                     f"{fmt(row['cpu_idle_baseline'], '', 3)}), outcomes {row['outcomes']}, "
                     f"records {row['records']}", force=True)
    print_rows(rows)
    out = common.write_result(args.name, args.quick, {
        "config": {**p, "paths": paths, "max_opening": 64, "keepalive_s": 15.0,
                   "trioproxy_max_connections": args.max_connections or "auto (default)",
                   "trioproxy_accounting": "on (SQLite)", "rlimit_nofile": nofile},
        "rows": rows, "run_seconds": time.monotonic() - t_start,
    })
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
