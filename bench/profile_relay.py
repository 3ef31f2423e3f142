"""Where trioproxy's relay spends its time under the latency scenario's load.

Runs the trioproxy worker in-process (``hypercorn --workers 0``) under cProfile while 50
closed-loop users stream 64-delta / 20 ms SSE through it, then stops it with SIGINT (cProfile
writes its stats on the way out) and writes ``bench/results/profile.txt``: top functions by
own time and by cumulative time, each as a share of the busy (non-idle) profile time, and the
own time grouped by package. If ``py-spy`` is installed (``pip install py-spy``; or put its
binary on PATH / in BENCH_PYSPY) it also samples the default, unprofiled worker for the same
load, which has no cProfile overhead, and adds its top leaf functions.

    python bench/profile_relay.py [--seconds 15] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import shutil
import signal
import subprocess
import time
from pathlib import Path

import common
import loadgen
from common import RESULTS, Procs, Progress

IDLE = ("~", "<method 'poll' of 'select.epoll' objects>")  # cProfile's key for the epoll wait


def is_idle(r: tuple) -> bool:
    return (r[0], r[2]) == IDLE


def load(port: int, conc: int, seconds: float) -> int:
    body = loadgen.stream_body(events=64, interval=0.02)
    res, _ = loadgen.closed_loop(loadgen.Engine(), port, conc, seconds,
                                 lambda i, k: loadgen.Req("POST", "/v1/messages", body, stamps=True),
                                 stagger=0.5)
    return sum(r.events for r in res)


def package(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins (C: sockets, epoll, bytes ...)"
    for key in ("trioproxy", "hypercorn", "h11", "trio", "h2", "wsproto", "priority"):
        if f"/{key}/" in filename:
            return key
    return "stdlib / other"


def cprofile_text(stats_path: Path, events: int, seconds: float) -> str:
    st = pstats.Stats(str(stats_path))
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((fn, line, name, nc, tt, ct))
    total = sum(r[4] for r in rows)
    idle = sum(r[4] for r in rows if is_idle(r))
    busy = max(total - idle, 1e-9)
    out = [f"cProfile of the trioproxy worker: {events} events relayed in {seconds:.0f} s of load "
           f"(50 closed-loop users, 64 deltas at 20 ms).",
           f"profile total {total:.2f} s, of which waiting in epoll {idle:.2f} s; shares below are of "
           f"the busy time {busy:.2f} s ({busy / max(events, 1) * 1e6:.0f} µs per event under cProfile; "
           f"cProfile inflates Python-heavy code, see the py-spy section for undistorted shares).", ""]

    def name_of(r: tuple) -> str:
        fn, line, name = r[0], r[1], r[2]
        if fn == "~":
            return name
        short = fn.split("site-packages/")[-1].split("/work/main/")[-1]
        return f"{short}:{line}({name})"

    out.append("Top 30 by own time (tottime):")
    out.append(f"{'share':>7} {'own s':>8} {'cum s':>8} {'calls':>9}  function")
    for r in sorted(rows, key=lambda r: -r[4])[:31]:
        if is_idle(r):
            out.append(f"{'(idle)':>7} {r[4]:8.3f} {r[5]:8.3f} {r[3]:9d}  {name_of(r)}")
            continue
        out.append(f"{r[4] / busy:7.1%} {r[4]:8.3f} {r[5]:8.3f} {r[3]:9d}  {name_of(r)}")
    out += ["", "Top 40 by cumulative time (cumtime), as a share of the busy time (nested, so shares "
                "overlap; entries above 100% include the epoll wait):",
            f"{'share':>7} {'cum s':>8} {'own s':>8} {'calls':>9}  function"]
    for r in sorted(rows, key=lambda r: -r[5])[:40]:
        out.append(f"{r[5] / busy:7.1%} {r[5]:8.3f} {r[4]:8.3f} {r[3]:9d}  {name_of(r)}")
    groups: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        if not is_idle(r):
            groups[package(r[0])] += r[4]
    out += ["", "Own time by package:"]
    for k, v in sorted(groups.items(), key=lambda kv: -kv[1]):
        out.append(f"{v / busy:7.1%} {v:8.3f} s  {k}")
    return "\n".join(out)


def pyspy_bin() -> str | None:
    for cand in (os.environ.get("BENCH_PYSPY"), shutil.which("py-spy"), "/tmp/pyspy/bin/py-spy"):
        if cand and os.path.exists(cand):
            return cand
    return None


def pyspy_text(raw: Path, events: int) -> str:
    """Leaf ('self') and inclusive shares from py-spy's collapsed stacks."""
    leaf: dict[str, int] = collections.Counter()
    incl: dict[str, int] = collections.Counter()
    total = 0
    idle = 0
    def func(frame: str) -> str:  # "name (file:line)" -> "name (file)"
        head, _, tail = frame.rpartition(":")
        return head + ")" if tail.rstrip(")").isdigit() else frame

    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [func(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        if "poll" in frames[-1] and ("epoll" in frames[-1] or "_run.py" in frames[-1] or
                                     "get_events" in frames[-1]):
            idle += count
            continue
        leaf[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    busy = max(total - idle, 1)
    out = [f"py-spy (sampling at 250 Hz, no instrumentation overhead) of the default worker "
           f"(hypercorn's spawned process), same load: {total} non-idle samples ({events} events); "
           f"{idle} of them in the epoll wait; shares of the {busy} busy samples.",
           "", "Top 25 functions by own time (leaf of the sampled stack):"]
    for f, c in leaf.most_common(25):
        out.append(f"{c / busy:7.1%}  {f}")
    out += ["", "Top 40 functions by inclusive time (on the stack):"]
    for f, c in incl.most_common(40):
        out.append(f"{c / busy:7.1%}  {f}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    common.banner("profile", False)
    common.check_trioproxy_imports()
    progress = Progress("profile")
    RESULTS.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    with Procs() as procs:
        stats_path = procs.logdir / "profile.prof"
        up = procs.upstream()
        prox = procs.proxy("trioproxy", up.port, profile=str(stats_path))
        load(prox.port, 4, 1.0)  # warm up
        progress(f"cProfile run: c={args.concurrency} for {args.seconds:g} s", force=True)
        events = load(prox.port, args.concurrency, args.seconds)
        procs.stop(prox, signal.SIGINT, grace=20)
        if stats_path.exists():
            sections.append(cprofile_text(stats_path, events, args.seconds))
        else:
            sections.append(f"cProfile wrote no stats; proxy log tail:\n{prox.tail()}")
        spy = pyspy_bin()
        if spy:
            plain = procs.proxy("trioproxy", up.port)
            load(plain.port, 4, 1.0)
            kids = plain.sampler().root.children(recursive=True)
            worker = max(kids, key=lambda p: p.memory_info().rss).pid if kids else plain.pid
            raw = procs.logdir / "profile.pyspy.txt"
            progress(f"py-spy run on worker pid {worker}", force=True)
            cmd = [spy, "record", "--format", "raw", "-o", str(raw), "-r", "250", "-d",
                   str(int(args.seconds)), "-p", str(worker)]
            with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as sp:
                try:
                    time.sleep(0.5)
                    ev2 = load(plain.port, args.concurrency, args.seconds - 1.5)
                    _, err = sp.communicate(timeout=args.seconds + 30)
                finally:
                    if sp.poll() is None:
                        sp.kill()
            if raw.exists():
                sections.append(pyspy_text(raw, ev2))
            else:
                sections.append(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        else:
            sections.append("py-spy not installed: no sampling profile (pip install py-spy).")
    text = "\n\n".join(sections) + "\n"
    (RESULTS / "profile.txt").write_text(text)
    print(text[:6000])
    print(f"wrote {RESULTS / 'profile.txt'}")


if __name__ == "__main__":
    main()
