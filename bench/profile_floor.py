"""Where trioproxy's CPU goes beyond the floor's, under 20 concurrent 64-event streams.

For each target -- ``floor`` (the lower bound), ``trioproxy`` (accounting on, as users run it),
``trioproxy_noacct`` (accounting off) -- three windows on a fresh proxy each:
1. **counts**: the proxy runs with ``trio_counts/sitecustomize.py`` (an Instrument counting
   spawned tasks and task steps); 20 closed-loop stream users, then 32 closed-loop users of
   small non-streaming requests: trio tasks per request and scheduler steps per relayed event;
2. **CPU**: the plain proxy, the same stream load: CPU per stream and per event (schedstat);
3. **py-spy** (if installed; ``pip install py-spy``): the plain worker sampled at 250 Hz, all
   threads, during the same load: own-time and inclusive shares, the split between the event
   loop thread and other threads (the ledger writer), and inclusive shares of named suspects
   (json decode, sqlite, h11, the usage parser, the deadline moves ...).

    python bench/profile_floor.py [--seconds 8] [--concurrency 20]

Writes ``results/profile_floor.txt`` and ``results/profile_floor.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import loadgen
import overhead
from common import BENCH, RESULTS, Procs, Progress
from profile_relay import pyspy_bin

TARGETS = ["floor", "trioproxy", "trioproxy_noacct"]

# inclusive suspects: label -> substrings, any of which on the stack counts the sample
SUSPECTS = {
    "json decode (json.loads / decoder)": ["json/decoder.py", "loads (json/__init__.py"],
    "json encode": ["json/encoder.py", "dumps (json/__init__.py"],
    "sqlite / ledger store (accounting/sqlite.py, store.py)": ["accounting/sqlite.py",
                                                              "accounting/store.py"],
    "accounting/ (all, both threads)": ["trioproxy/accounting/"],
    "record building (accounting/build.py)": ["trioproxy/accounting/build.py"],
    "usage parsers (providers/)": ["trioproxy/providers/"],
    "SSE framer (sse.py)": ["trioproxy/protocol/sse.py"],
    "include_usage (usage_wire.py)": ["trioproxy/protocol/usage_wire.py"],
    "latency tracker (latency.py)": ["trioproxy/protocol/latency.py"],
    "lifecycle / exchange": ["trioproxy/protocol/lifecycle.py", "trioproxy/exchange.py"],
    "relay/ (all below it)": ["trioproxy/relay/"],
    "app.py (all below it)": ["trioproxy/app.py"],
    "upstream/ (pool, http11 client)": ["trioproxy/upstream/"],
    "intake / headers / routing / payload": ["trioproxy/intake.py",
                                             "trioproxy/protocol/headers.py",
                                             "trioproxy/protocol/routing.py",
                                             "trioproxy/payload.py"],
    "deadline moves (CancelScope.deadline)": ["deadline (trio/_core/_run.py"],
    "memory channel (trio/_channel.py)": ["trio/_channel.py"],
    "h11 (all)": ["(h11/"],
    "hypercorn protocol (send/receive path)": ["(hypercorn/protocol/"],
    "floor relay (all below it)": ["floor/relay.py"],
}
# leaf frames of threads that wait (py-spy's idle detection misses these lock waits)
WAITING = ("Condition.wait (threading.py", "WorkerThread._work (trio/_core/_thread_cache.py",
           "Event.wait (threading.py", "Queue.get (queue.py", "Thread.join (threading.py",
           "Thread._wait_for_tstate_lock (threading.py")


def counts_files(prefix: str) -> dict[str, int]:
    tot = {"tasks": 0, "steps": 0}
    d = Path(prefix).parent
    for f in d.glob(Path(prefix).name + ".*.json"):
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        tot["tasks"] += c["tasks"]
        tot["steps"] += c["steps"]
    return tot


def stream_load(port: int, conc: int, seconds: float) -> list[loadgen.StreamResult]:
    body = loadgen.stream_body(events=64, interval=0.02, size=40)
    res, _ = loadgen.closed_loop(loadgen.Engine(), port, conc, seconds,
                                 lambda i, k: overhead.stream_req(body), stagger=0.5)
    return res


def json_load(port: int, seconds: float) -> list[loadgen.StreamResult]:
    res, _ = loadgen.closed_loop(loadgen.Engine(), port, 32, seconds,
                                 lambda i, k: loadgen.Req("POST", "/v1/messages", loadgen.JSON_BODY),
                                 stagger=0.1)
    return res


def counts_window(procs: Procs, up: common.Proc, spec: overhead.PathSpec, conc: int,
                  seconds: float) -> dict[str, Any]:
    prefix = str(procs.logdir / f"counts-{spec.name}")
    hook = str(BENCH / "trio_counts")
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = hook + (os.pathsep + old if old else "")
    os.environ["BENCH_TRIO_COUNTS"] = prefix
    try:
        t = overhead.spawn(procs, spec, up.port)
    finally:
        os.environ["PYTHONPATH"] = old
        os.environ.pop("BENCH_TRIO_COUNTS", None)
    stream_load(t.port, 4, 0.5)
    time.sleep(0.5)
    c0 = counts_files(prefix)
    res = stream_load(t.port, conc, seconds)
    time.sleep(0.5)
    c1 = counts_files(prefix)
    j = json_load(t.port, seconds / 2)
    time.sleep(0.5)
    c2 = counts_files(prefix)
    procs.stop(t.proc)
    streams = sum(r.outcome == "complete" for r in res)
    events = sum(len(r.delays) for r in res)
    reqs = sum(r.outcome == "complete" for r in j)
    return {"streams": streams, "events": events, "small_requests": reqs,
            "tasks_per_stream": (c1["tasks"] - c0["tasks"]) / streams if streams else None,
            "steps_per_event": (c1["steps"] - c0["steps"]) / events if events else None,
            "tasks_per_small_request": (c2["tasks"] - c1["tasks"]) / reqs if reqs else None,
            "steps_per_small_request": (c2["steps"] - c1["steps"]) / reqs if reqs else None}


def classify(raw: Path) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> busy samples, event-loop vs other threads, leaf and
    inclusive top lists, suspect shares."""
    leaf: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    sus: collections.Counter[str] = collections.Counter()
    busy = loop = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames or ("poll" in frames[-1] and ("epoll" in frames[-1] or "get_events" in frames[-1])):
            continue
        if frames[-1].startswith(WAITING):
            continue
        cnt = int(n)
        busy += cnt
        if any("trio/_core/_run.py" in f for f in frames):
            loop += cnt
        leaf[_short(frames[-1])] += cnt
        for f in {_short(f) for f in frames}:
            incl[f] += cnt
        joined = ";".join(frames)
        for label, keys in SUSPECTS.items():
            if any(k in joined for k in keys):
                sus[label] += cnt
    return {"busy": busy, "event_loop": loop, "leaf": leaf.most_common(25),
            "inclusive": incl.most_common(40), "suspects": dict(sus)}


def _short(frame: str) -> str:
    head, _, tail = frame.rpartition(":")
    frame = head + ")" if tail.rstrip(")").isdigit() else frame
    return frame.replace("site-packages/", "").split("/work/")[-1]


def spy_window(spy: str | None, worker: int, raw: Path, seconds: float, load: Any,
               meter: common.CpuMeter) -> tuple[Any, float | None, dict[str, Any] | None]:
    """Run ``load()`` while py-spy samples ``worker``; (load's result, proxy CPU s, shares)."""
    sp = None
    if spy:
        sp = subprocess.Popen([spy, "record", "--format", "raw", "--threads", "-o", str(raw),
                               "-r", "250", "-d", str(int(seconds) + 1), "-p", str(worker)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
    try:
        res = load()
        cpu = meter.delta()["proxy"]
        if sp is not None:
            sp.communicate(timeout=seconds + 30)
    finally:
        if sp is not None and sp.poll() is None:
            sp.kill()
            sp.wait(5)
    return res, cpu, (classify(raw) if sp is not None and raw.exists() else None)


def cpu_and_spy(procs: Procs, up: common.Proc, spec: overhead.PathSpec, conc: int,
                seconds: float, spy: str | None) -> dict[str, Any]:
    """Two windows on one plain proxy: ``conc`` streams, then 32 users of small requests."""
    t = overhead.spawn(procs, spec, up.port)
    stream_load(t.port, 4, 0.5)
    json_load(t.port, 0.5)
    kids = t.proc.sampler().root.children(recursive=True)
    worker = max(kids, key=lambda p: p.memory_info().rss).pid if kids else t.pid
    res, cpu, shares = spy_window(spy, worker, procs.logdir / f"spy-{spec.name}.txt", seconds,
                                  lambda: stream_load(t.port, conc, seconds),
                                  common.CpuMeter(up, t.proc))
    small, cpu_small, shares_small = spy_window(
        spy, worker, procs.logdir / f"spy-small-{spec.name}.txt", seconds / 2,
        lambda: json_load(t.port, seconds / 2), common.CpuMeter(up, t.proc))
    procs.stop(t.proc)
    streams = sum(r.outcome == "complete" for r in res)
    events = sum(len(r.delays) for r in res)
    reqs = sum(r.outcome == "complete" for r in small)
    return {"streams": streams, "events": events, "cpu_s": cpu, "pyspy": shares,
            "cpu_ms_per_stream": cpu / streams * 1000 if streams and cpu else None,
            "cpu_us_per_event": cpu / events * 1e6 if events and cpu else None,
            "small_requests": reqs, "pyspy_small": shares_small,
            "cpu_ms_per_small_request": cpu_small / reqs * 1000 if reqs and cpu_small else None}


def shares_text(data: dict[str, Any], key: str, title: str) -> list[str]:
    spy = {t: data["cpu"][t].get(key) for t in data["targets"]}
    if not all(spy.values()):
        return []
    lines = ["", f"== py-spy under {title}: share of busy samples (all threads; waits excluded)",
             f"{'':44}" + "".join(f"{t:>18}" for t in data["targets"]),
             f"{'event loop thread':44}" + "".join(
                 f"{spy[t]['event_loop'] / max(spy[t]['busy'], 1):>18.1%}" for t in data["targets"])]
    for label in SUSPECTS:
        lines.append(f"{label[:44]:44}" + "".join(
            f"{spy[t]['suspects'].get(label, 0) / max(spy[t]['busy'], 1):>18.1%}"
            for t in data["targets"]))
    for t in data["targets"]:
        s = spy[t]
        lines += ["", f"[{t}, {title}] top own time (leaf), share of {s['busy']} busy samples:"]
        lines += [f"{c / s['busy']:7.1%}  {f}" for f, c in s["leaf"][:15]]
        lines += [f"[{t}, {title}] top inclusive:"]
        lines += [f"{c / s['busy']:7.1%}  {f}" for f, c in s["inclusive"][:25]]
    return lines


def text(data: dict[str, Any]) -> str:
    lines = [(f"profile_floor.py: {data['concurrency']} closed-loop streams of 64 events at 20 ms, "
              f"{data['seconds']:g} s per window; loadavg {data['loadavg'][0][0]:.2f} -> "
              f"{data['loadavg'][1][0]:.2f}. floor = lower bound (bench/floor/relay.py)."), ""]
    hdr = f"{'':34}" + "".join(f"{t:>18}" for t in data["targets"])
    lines.append(hdr)
    for key in ("cpu_ms_per_stream", "cpu_us_per_event", "cpu_ms_per_small_request"):
        lines.append(f"{key:34}" + "".join(f"{common.fmt(data['cpu'][t].get(key), '', 2):>18}"
                                          for t in data["targets"]))
    for key in ("tasks_per_stream", "steps_per_event", "tasks_per_small_request",
                "steps_per_small_request"):
        lines.append(f"{key:34}" + "".join(f"{common.fmt(data['counts'][t].get(key), '', 2):>18}"
                                          for t in data["targets"]))
    for key, title in (("pyspy", f"{data['concurrency']} streams"),
                       ("pyspy_small", "32 users of small non-streaming requests")):
        lines += shares_text(data, key, title)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--targets", default=",".join(TARGETS))
    args = ap.parse_args()
    common.banner("profile_floor", False)
    common.check_trioproxy_imports()
    progress = Progress("profile_floor")
    targets = args.targets.split(",")
    spy = pyspy_bin()
    la0 = os.getloadavg()
    counts, cpu = {}, {}
    with Procs() as procs:
        up = procs.upstream()
        for name in targets:
            spec = overhead.DEFAULT_SPECS[name]
            counts[name] = counts_window(procs, up, spec, args.concurrency, args.seconds)
            progress(f"{name}: counts {counts[name]}", force=True)
            cpu[name] = cpu_and_spy(procs, up, spec, args.concurrency, args.seconds, spy)
            progress(f"{name}: {common.fmt(cpu[name]['cpu_ms_per_stream'], ' ms/stream', 2)}",
                     force=True)
    data = {"concurrency": args.concurrency, "seconds": args.seconds, "targets": targets,
            "loadavg": [la0, os.getloadavg()], "counts": counts, "cpu": cpu,
            "pyspy": bool(spy), "machine": common.machine_info()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_floor.json").write_text(json.dumps(data, indent=1))
    out = text(data)
    (RESULTS / "profile_floor.txt").write_text(out)
    print(out)


if __name__ == "__main__":
    main()
