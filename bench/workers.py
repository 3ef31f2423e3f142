"""Multi-core: ``trioproxy serve --workers 1`` against ``--workers auto`` (one per usable CPU).

Both run as users run them: ``trioproxy serve`` (a master and N spawned workers sharing the
listening socket), **accounting on** (the SQLite ledger in a temp dir of each path's own),
against the bench's fake upstream. Measured per round, the paths in rotating order:
- ``rps``: small ``stream: false`` requests, 64 closed-loop users on kept-alive connections;
  requests/s and latency p50/p99;
- ``streams``: 64-event streams (2 ms apart), 64 closed-loop users: an offered load of about
  500 streams/s, more than one worker (or this machine) can relay; streams/s, events/s, TTFB
  and per-event delay p50/p99.
Each cell also records the CPU seconds of the proxy's processes (master + each worker, psutil /
schedstat), of the upstream and of the load generator, over the cell's wall time.

**Nothing is pinned** (unlike the other scenarios): ``auto`` must see every core, so the load
generator and the fake upstream share the machine's cores with the workers. On a 2-core box
the scaling shown is therefore a lower bound of what more cores give.

    python bench/workers.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import common
import loadgen
from common import HOST, PY, Procs, Progress, fmt, md_table, ms, summarize
from overhead import PathSpec, ledger_rows

USERS = 64
EVENTS = 64
INTERVAL = 0.002
PATHS = {"w1": "1", "wauto": "auto"}
SERVE = "import sys; from trioproxy.commands.cli import main; sys.exit(main(sys.argv[1:]))"


def plan(quick: bool) -> dict[str, Any]:
    return {"rounds": 3, "cell_s": 4.0 if quick else 10.0}


def spawn(procs: Procs, name: str, workers: str, up_port: int) -> common.Target:
    """``trioproxy serve --workers <workers>`` on a free port, accounting on, not pinned."""
    port = common.free_port()
    base = f"http://{HOST}:{up_port}"
    data = procs.logdir / f"data-{name}"
    data.mkdir(exist_ok=True)
    env = {"XDG_DATA_HOME": str(data), "TRIOPROXY_ANTHROPIC_BASE_URL": base,
           "TRIOPROXY_OPENAI_BASE_URL": base, "TRIOPROXY_LOG_LEVEL": "WARNING",
           "TRIOPROXY_ACCOUNTING": "true", "TRIOPROXY_DRAIN_NOTICE": "0",
           "TRIOPROXY_GRACEFUL_TIMEOUT": "1"}
    argv = [PY, "-c", SERVE, "serve", "--host", HOST, "--port", str(port),
            "--workers", workers]
    proc = procs.spawn(name, argv, port=port, env=env, core=None)
    return common.Target(name, port, proc)


def worker_pids(t: common.Target) -> list[int]:
    """The worker processes of a ``trioproxy serve`` tree (not multiprocessing's helpers)."""
    return [p.pid for p in t.proc.sampler()._tree()[1:]  # type: ignore[union-attr]
            if "resource_tracker" not in " ".join(p.cmdline())]


class Cpu:
    """CPU seconds of the proxy's master and each worker, the upstream and this process."""

    def __init__(self, up: common.Proc, t: common.Target) -> None:
        self.pids = {"master": t.proc.pid, **{  # type: ignore[union-attr]
            f"worker{i}": pid for i, pid in enumerate(worker_pids(t))}}
        self.up = up.pid
        self.t0, self.wall0 = self._snap(), time.monotonic()

    def _snap(self) -> dict[str, float]:
        out = {k: common._schedstat_seconds(pid) for k, pid in self.pids.items()}
        out["upstream"] = common._schedstat_seconds(self.up)
        out["loadgen"] = common.self_cpu()
        return out

    def delta(self) -> dict[str, Any]:
        t1, wall = self._snap(), time.monotonic() - self.wall0
        used = {k: t1[k] - self.t0[k] for k in t1}
        proxy = sum(v for k, v in used.items() if k not in ("upstream", "loadgen"))
        return {"wall_s": wall, "cpu_s": used, "proxy_cpu_s": proxy,
                "proxy_cores": proxy / wall, "upstream_cores": used["upstream"] / wall,
                "loadgen_cores": used["loadgen"] / wall}


def rps_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target,
             p: dict[str, Any]) -> dict[str, Any]:
    cpu = Cpu(up, t)
    results, wall = loadgen.closed_loop(
        eng, t.port, USERS, p["cell_s"],
        lambda i, k: loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY, total_timeout=30.0),
        stagger=0.1)
    ok = [r for r in results if r.outcome == "complete" and r.status == 200]
    lat = summarize(ms([r.t_end for r in ok if r.t_end is not None]))
    c = cpu.delta()
    return {"requests": len(results), "ok": len(ok), "requests_per_s": len(ok) / wall,
            "latency_p50": lat.get("p50"), "latency_p99": lat.get("p99"),
            "cpu_ms_per_request": c["proxy_cpu_s"] / len(ok) * 1000 if ok else None, "cpu": c}


def stream_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target,
                p: dict[str, Any], body: bytes) -> dict[str, Any]:
    cpu = Cpu(up, t)
    results, wall = loadgen.closed_loop(
        eng, t.port, USERS, p["cell_s"],
        lambda i, k: loadgen.Req("POST", "/v1/messages", body, stamps=True, total_timeout=60.0),
        stagger=0.3)
    ok = [r for r in results if r.outcome == "complete" and r.status == 200]
    ttfb = summarize(ms([r.ttfb for r in ok if r.ttfb is not None]))
    delay = summarize(ms([d for r in ok for d in r.delays]))
    events = sum(r.events for r in ok)
    c = cpu.delta()
    return {"streams": len(results), "ok": len(ok), "streams_per_s": len(ok) / wall,
            "events_per_s": events / wall, "ttfb_p50": ttfb.get("p50"),
            "ttfb_p99": ttfb.get("p99"), "delay_p50": delay.get("p50"),
            "delay_p99": delay.get("p99"),
            "cpu_ms_per_stream": c["proxy_cpu_s"] / len(ok) * 1000 if ok else None, "cpu": c}


METRICS = {  # (cell, metric): what the summary shows
    ("rps", "requests_per_s"): "small requests/s",
    ("rps", "latency_p50"): "request p50 (ms)",
    ("rps", "latency_p99"): "request p99 (ms)",
    ("rps", "cpu_ms_per_request"): "proxy CPU per request (ms)",
    ("rps", "proxy_cores"): "proxy CPU during rps (cores)",
    ("rps", "others_cores"): "upstream + load generator CPU during rps (cores)",
    ("streams", "streams_per_s"): "64-event streams/s",
    ("streams", "events_per_s"): "events/s",
    ("streams", "ttfb_p50"): "stream TTFB p50 (ms)",
    ("streams", "ttfb_p99"): "stream TTFB p99 (ms)",
    ("streams", "delay_p50"): "per-event delay p50 (ms)",
    ("streams", "delay_p99"): "per-event delay p99 (ms)",
    ("streams", "cpu_ms_per_stream"): "proxy CPU per stream (ms)",
    ("streams", "proxy_cores"): "proxy CPU during streams (cores)",
    ("streams", "others_cores"): "upstream + load generator CPU during streams (cores)",
}


def value(row: dict[str, Any], cell: str, metric: str) -> float | None:
    c = row[cell]
    if metric == "proxy_cores":
        return c["cpu"]["proxy_cores"]
    if metric == "others_cores":
        return c["cpu"]["upstream_cores"] + c["cpu"]["loadgen_cores"]
    return c[metric]


def spread(vals: list[float | None]) -> dict[str, Any]:
    v = [x for x in vals if x is not None]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)} if v else {}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per path and metric the median over rounds (min..max), and auto ÷ 1 taken per round."""
    out: dict[str, Any] = {name: {} for name in PATHS}
    out["scaling"] = {}
    for cell, metric in METRICS:
        key = f"{cell}.{metric}"
        for name in PATHS:
            out[name][key] = spread([value(r[name], cell, metric) for r in rounds])
        out["scaling"][key] = spread([
            (a / b) if (a := value(r["wauto"], cell, metric)) is not None
            and (b := value(r["w1"], cell, metric)) else None for r in rounds])
    return out


def measure(p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    body = loadgen.stream_body(events=EVENTS, interval=INTERVAL, size=40)
    rounds, loadavg = [], []
    with Procs() as procs:
        up = procs.upstream(core=None)
        targets = {name: spawn(procs, name, w, up.port) for name, w in PATHS.items()}
        time.sleep(2.0)  # every worker up (the probe only proves one)
        workers = {name: len(worker_pids(t)) for name, t in targets.items()}
        progress(f"started upstream + trioproxy serve: workers {workers}", force=True)
        eng = loadgen.Engine(max_opening=USERS)
        for t in targets.values():  # warm-up: connections, upstream pools, ledger schema
            loadgen.closed_loop(eng, t.port, USERS, 1.0, lambda i, k: loadgen.Req(
                "POST", "/v1/messages", body if k % 2 else loadgen.JSON_BODY))
        names = list(PATHS)
        for rnd in range(p["rounds"]):
            loadavg.append(os.getloadavg())
            order = names[rnd % 2:] + names[:rnd % 2]
            row: dict[str, Any] = {n: {} for n in names}
            for name in order:
                row[name]["rps"] = rps_cell(eng, up, targets[name], p)
            for name in order:
                row[name]["streams"] = stream_cell(eng, up, targets[name], p, body)
            rounds.append(row)
            progress(f"round {rnd + 1}/{p['rounds']}: " + "; ".join(
                f"{n} {row[n]['rps']['requests_per_s']:.0f} req/s, "
                f"{row[n]['streams']['events_per_s']:.0f} events/s" for n in names), force=True)
        time.sleep(1.5)  # let the ledger writers commit
        ledgers = {name: ledger_rows(procs, PathSpec(name, "trioproxy")) for name in names}
    loadavg.append(os.getloadavg())
    return {"rounds": rounds, "loadavg": loadavg, "workers": workers, "ledger_records": ledgers}


def _cell(s: dict[str, Any], digits: int = 1, unit: str = "") -> str:
    if not s:
        return "-"
    return f"{fmt(s['median'], unit, digits)} ({fmt(s['min'], '', digits)}..{fmt(s['max'], '', digits)})"


def markdown(data: dict[str, Any]) -> str:
    s, cfg = data["summary"], data["config"]
    rows = [[label, _cell(s["w1"][f"{c}.{m}"]), _cell(s["wauto"][f"{c}.{m}"]),
             _cell(s["scaling"][f"{c}.{m}"], 2, "×")] for (c, m), label in METRICS.items()]
    n = data["workers"]["wauto"]
    return "\n".join([
        "# trioproxy serve: --workers 1 against --workers auto (bench/workers.py)", "",
        f"{cfg['cpus']} usable CPUs, so `auto` = {n} workers. {cfg['rounds']} rounds of "
        f"{cfg['cell_s']:g} s cells, paths in rotating order; median over rounds (min..max). "
        f"Accounting on (SQLite); {USERS} closed-loop users on kept-alive connections; streams "
        f"of {EVENTS} events {INTERVAL * 1000:g} ms apart. **Nothing pinned**: the load "
        "generator and the fake upstream share the cores with the workers (their CPU is "
        "shown). Load average (1 min) before each round and at the end: "
        + ", ".join(f"{la[0]:.2f}" for la in data["loadavg"])
        + f". Ledger records written: {data['ledger_records']}.", "",
        md_table(["metric", "--workers 1", f"--workers auto ({n})", "auto ÷ 1"], rows), "",
        (f"Command: `python bench/workers.py{' --quick' if cfg['quick'] else ''}` "
         f"({data['run_seconds']:.0f} s)."), ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    common.install_signal_handlers()
    common.raise_nofile()
    common.check_trioproxy_imports()
    print(f"== workers{' (quick)' if args.quick else ''}: nothing pinned; "
          f"{len(os.sched_getaffinity(0))} usable CPUs; loadavg={os.getloadavg()[0]:.2f}",
          flush=True)
    p = plan(args.quick)
    if args.rounds:
        p["rounds"] = args.rounds
    t0 = time.monotonic()
    res = measure(p, Progress("workers"))
    data = {"config": {**p, "quick": args.quick, "users": USERS, "events_per_stream": EVENTS,
                       "interval_s": INTERVAL, "cpus": len(os.sched_getaffinity(0)),
                       "pinned": False, "paths": {n: f"trioproxy serve --workers {w}"
                                                  for n, w in PATHS.items()}},
            **res, "summary": summarise(res["rounds"]), "run_seconds": time.monotonic() - t0}
    out = common.write_result("workers", args.quick, data)
    md = markdown(data)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
