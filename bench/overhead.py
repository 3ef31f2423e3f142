"""Scenario 5: trioproxy's own cost against the floor of its stack, with accounting on.

Paths (all against the same fake upstream; proxies on core 1 as everywhere in bench/):
- ``direct``: no proxy;
- ``floor``: ``floor/relay.py``, the thinnest correct relay on Hypercorn-trio + h11 -- a
  **lower bound**, not a product (no routing, parsing, accounting, timeouts, extensions);
- ``trioproxy``: as users run it by default, **accounting on** (its SQLite ledger in a temp dir);
- ``trioproxy_noacct``: the same with ``TRIOPROXY_ACCOUNTING=false`` (shows the ledger's share);
- ``streaming``: the conventional streaming proxy (Starlette/uvicorn/httpx, peers/).

Measured per round, paths in rotating order within each cell:
- CPU per request: 32 closed-loop users of a small ``stream: false`` request;
- 64-event streams (20 ms apart) at 20 and 50 concurrent streams, two arrival patterns:
  *staggered* (closed loop, first starts spread over a fraction of a second) and *burst*
  (synchronised arrivals: N kept-alive connections, all N requests released at the same
  instant by a barrier in the load generator, ``loadgen.burst``; several bursts per round);
  TTFB and per-event delay p50/p99, CPU per stream.
Every metric is taken per round; the report gives the median over rounds and the min..max
spread (the noise), ratios (trioproxy ÷ floor, ÷ streaming, ÷ direct) per round then their
median, and the load average before each round. ``--quick`` keeps the whole run under ~5 min.

    python bench/overhead.py [--quick] [--rounds N] [--paths direct,floor,trioproxy,...]

``compare_revs.py`` runs the same measurements for two git revisions of trioproxy.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import common
import loadgen
from common import BENCH, HOST, PY, Procs, Progress, fmt, md_table, ms, summarize, table

EVENTS = 64
INTERVAL = 0.02
LEVELS = (20, 50)
MODES = ("stagger", "burst")
LAT_METRICS = ("ttfb_p50", "ttfb_p99", "delay_p50", "delay_p99")


@dataclass(frozen=True)
class PathSpec:
    """One path of the run. ``src``: a directory holding ``trioproxy/`` to put first on the
    proxy's PYTHONPATH (a revision's snapshot); None: the installed (working tree) one."""

    name: str
    kind: str  # direct | floor | trioproxy | streaming
    accounting: bool = True
    src: str | None = None
    label: str = ""


DEFAULT_SPECS = {
    "direct": PathSpec("direct", "direct", label="direct (no proxy)"),
    "floor": PathSpec("floor", "floor", label="floor (lower bound: raw ASGI + h11, no accounting)"),
    "trioproxy": PathSpec("trioproxy", "trioproxy", True, label="trioproxy, accounting on (SQLite)"),
    "trioproxy_noacct": PathSpec("trioproxy_noacct", "trioproxy", False,
                                 label="trioproxy, accounting off"),
    "streaming": PathSpec("streaming", "streaming",
                          label="conventional streaming (Starlette/uvicorn/httpx)"),
}


def plan(quick: bool) -> dict[str, Any]:
    if quick:
        return {"rounds": 3, "rps_s": 1.0, "rps_users": 32, "stagger_s": 1.5, "stagger_spread": 0.3,
                "bursts": 2}
    return {"rounds": 4, "rps_s": 2.0, "rps_users": 32, "stagger_s": 2.5, "stagger_spread": 0.6,
            "bursts": 3}


# -- processes ------------------------------------------------------------------------------------

def spawn(procs: Procs, spec: PathSpec, up_port: int) -> common.Target:
    """Start ``spec``'s proxy on core 1 in front of the upstream (each with its own data dir)."""
    if spec.kind == "direct":
        return common.Target(spec.name, up_port, None)
    port = common.free_port()
    base = f"http://{HOST}:{up_port}"
    data = procs.logdir / f"data-{spec.name}"
    data.mkdir(exist_ok=True)
    env = {"XDG_DATA_HOME": str(data)}
    hyper = ["-m", "hypercorn", "--worker-class", "trio", "--bind", f"{HOST}:{port}"]
    if spec.kind == "trioproxy":
        env.update({"TRIOPROXY_ANTHROPIC_BASE_URL": base, "TRIOPROXY_OPENAI_BASE_URL": base,
                    "TRIOPROXY_LOG_LEVEL": "WARNING",
                    "TRIOPROXY_ACCOUNTING": "true" if spec.accounting else "false"})
        src = spec.src or os.environ.get("BENCH_TRIOPROXY_SRC")
        if src:
            env["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
        argv = [PY, *hyper, "trioproxy:app"]
    elif spec.kind == "floor":
        env.update({"UPSTREAM": base, "PYTHONPATH": os.pathsep.join(
            x for x in (os.environ.get("PYTHONPATH"), str(BENCH)) if x)})
        argv = [PY, *hyper, "floor.relay:app"]
    elif spec.kind == "streaming":
        env["UPSTREAM"] = base
        argv = [PY, str(BENCH / "peers" / "streaming_proxy.py"), "--port", str(port)]
    else:
        raise ValueError(spec.kind)
    proc = procs.spawn(spec.name, argv, port=port, env=env, core=common.PROXY_CORE)
    return common.Target(spec.name, port, proc)


def ledger_rows(procs: Procs, spec: PathSpec) -> int | None:
    """Usage records in the path's SQLite ledger (proof that accounting ran), None if none."""
    db = procs.logdir / f"data-{spec.name}" / "trioproxy" / "usage.db"
    if spec.kind != "trioproxy" or not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM usage_records").fetchone()[0]
    except sqlite3.Error:
        return None


# -- cells ----------------------------------------------------------------------------------------

def stream_req(body: bytes) -> loadgen.Req:
    return loadgen.Req("POST", "/v1/messages?beta=true", body, stamps=True, total_timeout=60.0)


def lat_metrics(results: list[loadgen.StreamResult], cpu_s: float | None) -> dict[str, Any]:
    ttfb = ms([r.ttfb for r in results if r.ttfb is not None])
    delays = ms([d for r in results for d in r.delays])
    ok = sum(r.outcome == "complete" and r.status == 200 for r in results)
    t, d = summarize(ttfb), summarize(delays)
    return {"streams": len(results), "ok": ok, "events": len(delays),
            "ttfb_p50": t.get("p50"), "ttfb_p99": t.get("p99"),
            "delay_p50": d.get("p50"), "delay_p99": d.get("p99"),
            "cpu_ms_per_stream": cpu_s / ok * 1000 if cpu_s is not None and ok else None,
            "_ttfb": ttfb, "_delay": delays}


def stagger_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target, n: int,
                 p: dict[str, Any], body: bytes) -> dict[str, Any]:
    meter = common.CpuMeter(up, t.proc)
    results, _ = loadgen.closed_loop(eng, t.port, n, p["stagger_s"], lambda i, k: stream_req(body),
                                     stagger=p["stagger_spread"])
    return lat_metrics(results, meter.delta()["proxy"])


def burst_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target, n: int,
               p: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Open n kept-alive connections (warmed by one small concurrent request each, which also
    fills the proxy's upstream pool), then ``bursts`` synchronised bursts of n streams."""
    conns = [loadgen.ClientConn(eng, t.port) for _ in range(n)]
    try:
        loadgen.burst(eng, conns, lambda i: loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY),
                      deadline=time.monotonic() + 30)
        meter = common.CpuMeter(up, t.proc)
        results: list[loadgen.StreamResult] = []
        spreads = []
        for _ in range(p["bursts"]):
            res, spread = loadgen.burst(eng, conns, lambda i: stream_req(body),
                                        deadline=time.monotonic() + 60)
            results += res
            spreads.append(spread)
        out = lat_metrics(results, meter.delta()["proxy"])
        out["release_spread_ms"] = max(spreads) * 1000
        return out
    finally:
        for c in conns:
            c.close()


def rps_cell(eng: loadgen.Engine, up: common.Proc, t: common.Target,
             p: dict[str, Any]) -> dict[str, Any]:
    meter = common.CpuMeter(up, t.proc)
    results, wall = loadgen.closed_loop(
        eng, t.port, p["rps_users"], p["rps_s"],
        lambda i, k: loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY, total_timeout=30.0),
        stagger=0.1)
    cpu = meter.delta()["proxy"]
    ok = sum(r.outcome == "complete" and r.status == 200 for r in results)
    return {"requests": len(results), "ok": ok, "requests_per_s": ok / wall if wall else None,
            "cpu_ms_per_request": cpu / ok * 1000 if cpu is not None and ok else None}


def warm_up(eng: loadgen.Engine, targets: dict[str, common.Target]) -> None:
    body = loadgen.stream_body(events=8, interval=0.002)
    for t in targets.values():
        reqs = [loadgen.Req("POST", "/v1/messages", body) for _ in range(8)]
        reqs += [loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY) for _ in range(8)]
        loadgen.parallel(eng, t.port, reqs, deadline=time.monotonic() + 30)


# -- the run --------------------------------------------------------------------------------------

def measure(specs: list[PathSpec], p: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """All cells for all paths, ``p["rounds"]`` times. Returns per-round metrics per path
    (``rounds[i][path][metric]``), pooled latency summaries, load averages, ledger counts."""
    names = [s.name for s in specs]
    body = loadgen.stream_body(events=EVENTS, interval=INTERVAL, size=40)
    rounds: list[dict[str, dict[str, Any]]] = []
    pooled: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    loadavg = []
    with Procs() as procs:
        up = procs.upstream()
        targets = {s.name: spawn(procs, s, up.port) for s in specs}
        progress(f"started upstream + {len(specs) - ('direct' in names)} proxies", force=True)
        eng = loadgen.Engine()
        warm_up(eng, targets)
        for rnd in range(p["rounds"]):
            loadavg.append(os.getloadavg())
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            row: dict[str, dict[str, Any]] = {n: {} for n in names}
            for name in order:
                row[name]["rps"] = rps_cell(eng, up, targets[name], p)
            for n in LEVELS:
                for mode, cell in (("stagger", stagger_cell), ("burst", burst_cell)):
                    for name in order:
                        m = cell(eng, up, targets[name], n, p, body)
                        for k in ("_ttfb", "_delay"):
                            pooled[(name, f"{mode}{n}")][k] += m.pop(k)
                        row[name][f"{mode}{n}"] = m
                    progress(f"round {rnd + 1}/{p['rounds']} {mode} {n}: " + ", ".join(
                        f"{nm} ttfb p50 {fmt(row[nm][f'{mode}{n}']['ttfb_p50'], 'ms', 2)}"
                        for nm in names), force=True)
            rounds.append(row)
        time.sleep(1.0)  # let the ledger writers commit what they hold
        ledgers = {s.name: ledger_rows(procs, s) for s in specs if s.kind == "trioproxy"}
    loadavg.append(os.getloadavg())
    pooled_out = {f"{name}|{cell}": {"ttfb_ms": summarize(v["_ttfb"]), "delay_ms": summarize(v["_delay"])}
                  for (name, cell), v in pooled.items()}
    return {"rounds": rounds, "pooled": pooled_out, "loadavg": loadavg, "ledger_records": ledgers}


def flat(cell_row: dict[str, Any]) -> dict[str, float | None]:
    """One path's round as ``{metric: value}``: cpu_ms_per_request, burst20.ttfb_p50, ..."""
    out: dict[str, float | None] = {"cpu_ms_per_request": cell_row["rps"]["cpu_ms_per_request"]}
    for mode in MODES:
        for n in LEVELS:
            c = cell_row[f"{mode}{n}"]
            for k in (*LAT_METRICS, "cpu_ms_per_stream"):
                out[f"{mode}{n}.{k}"] = c[k]
    return out


def spread(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def medians(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per path and metric: median over rounds, min, max."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        per = [flat(r[name]) for r in rounds]
        out[name] = {m: spread([x[m] for x in per]) for m in per[0]}
    return out


def ratios(rounds: list[dict[str, dict[str, Any]]], num: str, den: str) -> dict[str, Any]:
    """num ÷ den per metric, taken per round (same machine moment), then median/min/max."""
    per = [(flat(r[num]), flat(r[den])) for r in rounds]
    return {m: spread([a[m] / b[m] if a[m] is not None and b[m] else None for a, b in per])
            for m in per[0][0]}


def added(rounds: list[dict[str, dict[str, Any]]], name: str, base: str = "direct") -> dict[str, Any]:
    """name − base in ms for the latency metrics, per round, then median/min/max."""
    per = [(flat(r[name]), flat(r[base])) for r in rounds]
    keys = [m for m in per[0][0] if m.split(".")[-1] in LAT_METRICS]
    return {m: spread([a[m] - b[m] if a[m] is not None and b[m] is not None else None
                       for a, b in per]) for m in keys}


def summary_table(med: dict[str, Any], rat: dict[str, Any], num: str, dens: list[str]) -> str:
    rows = []
    for m in med[num]:
        r = [m] + [fmt(med[x][m]["median"], "", 3) for x in med]
        for den in dens:
            s = rat.get(f"{num}/{den}", {}).get(m)
            r.append(f"{fmt(s['median'], '×', 2)} ({fmt(s['min'], '', 2)}..{fmt(s['max'], '', 2)})"
                     if s and s["median"] is not None else "-")
        rows.append(r)
    return table(["metric (ms)", *med, *[f"{num} ÷ {d}" for d in dens]], rows)


def _cell(s: dict[str, Any] | None, unit: str = "", digits: int = 2) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt(s['median'], unit, digits)} ({fmt(s['min'], '', digits)}..{fmt(s['max'], '', digits)})"


def markdown_section(data: dict[str, Any]) -> str:
    """The report's section for ``results/overhead*.json`` (report.py calls this)."""
    med, rat, cfg = data["medians"], data["ratios"], data["config"]
    names = list(cfg["paths"])
    tp = "trioproxy" if "trioproxy" in names else None
    out = ["## trioproxy against the floor of its stack (overhead.py)", "",
           ("The **floor** (`bench/floor/relay.py`) is a *lower bound, not a product*: raw ASGI on "
            "Hypercorn-trio, an h11 upstream connection, the design's three tasks per request (a "
            "disconnect watcher, an upstream reader, the client writer over a byte-bounded "
            "memory channel), no parsing, no "
            "accounting. **trioproxy runs with accounting on** (its SQLite ledger in a temp dir), "
            "as users run it by default. Ratios are taken per round (all paths in the same minute, "
            "rotating order) and the median over rounds is shown with the min..max over rounds "
            "(the noise). Latency ratios are of absolute times (direct included)."), "",
           f"{cfg['rounds']} rounds; load average (1 min) before each round and at the end: "
           + ", ".join(f"{la[0]:.2f}" for la in data["loadavg"])
           + f"; ledger records written: {data.get('ledger_records')}.", ""]
    if tp is None:
        return "\n".join(out) + "\n"
    dens = [d for d in ("floor", "streaming", "direct") if f"{tp}/{d}" in rat]
    extra = [f"{tp}/trioproxy_noacct"] if f"{tp}/trioproxy_noacct" in rat else []
    rows = []
    for m in med[tp]:
        rows.append([m, _cell(med.get("floor", {}).get(m)), _cell(med[tp][m])]
                    + [_cell(rat[f"{tp}/{d}"][m], "×") for d in dens]
                    + [_cell(rat[e][m], "×") for e in extra])
    out.append(md_table(["metric (ms)", "floor", "trioproxy", *[f"÷ {d}" for d in dens],
                         *["÷ accounting off" for _ in extra]], rows))
    out += ["", ("`cpu_ms_per_request`: proxy CPU per small non-streaming request (32 closed-loop "
                 "users). `staggerN` / `burstN`: N concurrent 64-event streams (20 ms apart), starts "
                 "spread (closed loop) or all N released at the same instant on kept-alive "
                 "connections; `ttfb` first response byte, `delay` per-event receive − emit stamp, "
                 "`cpu_ms_per_stream` proxy CPU per completed stream."), ""]
    add = data.get("added_over_direct_ms", {})
    if tp in add and "floor" in add:
        rows = [[m, _cell(add["floor"][m]), _cell(add[tp][m])] for m in add[tp]]
        out += ["Added over direct (ms), same rounds:", "",
                md_table(["metric", "floor", "trioproxy"], rows), ""]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--paths", default=",".join(DEFAULT_SPECS))
    args = ap.parse_args()
    common.banner("overhead", args.quick)
    common.check_trioproxy_imports()
    p = plan(args.quick)
    if args.rounds:
        p["rounds"] = args.rounds
    specs = [DEFAULT_SPECS[n] for n in args.paths.split(",")]
    names = [s.name for s in specs]
    t0 = time.monotonic()
    res = measure(specs, p, Progress("overhead"))
    med = medians(res["rounds"])
    nums = [n for n in ("trioproxy", "trioproxy_noacct") if n in names]
    dens = [n for n in ("floor", "streaming", "direct", "trioproxy_noacct") if n in names]
    rat = {f"{a}/{b}": ratios(res["rounds"], a, b) for a in nums for b in dens if a != b}
    if "floor" in names and "direct" in names:
        rat["floor/direct"] = ratios(res["rounds"], "floor", "direct")
    add = {n: added(res["rounds"], n) for n in names if n != "direct" and "direct" in names}
    if "trioproxy" in names:
        print(summary_table(med, rat, "trioproxy", [d for d in dens if d != "trioproxy"]))
    print(f"ledger records: {res['ledger_records']}; loadavg per round: "
          + ", ".join(f"{la[0]:.2f}" for la in res["loadavg"]))
    out = common.write_result("overhead", args.quick, {
        "config": {"events_per_stream": EVENTS, "interval_s": INTERVAL, "levels": list(LEVELS),
                   **p, "paths": {s.name: s.label for s in specs},
                   "note": "ratios are taken per round, then the median over rounds; min..max is "
                           "the spread over rounds (noise)"},
        **res, "medians": med, "ratios": rat, "added_over_direct_ms": add,
        "run_seconds": time.monotonic() - t0,
    })
    print(f"wrote {out} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
