"""The usage page's year view over a big ledger: time to build the page's data and the worker's
memory, the earlier way (every latency row loaded into Python, percentiles computed there) vs
aggregated in the database, in one run, A B A B.

    python bench/page_data.py                  # 1,000,000 rows, SQLite, 2 rounds (~5 min)
    python bench/page_data.py --rows 100000 --rounds 3
    python bench/page_data.py --postgres postgresql://postgres@127.0.0.1/test   # also PostgreSQL

Each measurement runs in a fresh process (``--trial``) that opens the store, notes its RSS,
builds the page's data once (``days=366``) and reports the elapsed time, its peak RSS and the
longest gap a 1 ms ticker thread saw meanwhile (how long the GIL was held away from an event
loop in that worker). Results: ``bench/results/page_data.json``. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NOW = time.time()
COLUMNS = ("request_id", "started_at", "provider", "api", "status", "streamed", "model",
           "model_requested", "input_tokens", "output_tokens", "cost_usd", "end_reason",
           "duration_ms", "ttft_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms",
           "itl_count", "tpot_ms", "tokens_per_s", "e2e_ms")
MODELS = ("claude-sonnet-4-5-20250929", "claude-haiku-4-5", "gpt-4o-mini-2024-07-18", "gpt-5",
          "claude-opus-4-1", "o3-mini")


def rows(n: int, seed: int = 1) -> Any:
    rng = random.Random(seed)
    span = 360 * 86400.0
    for i in range(n):
        p50 = rng.lognormvariate(3, 0.5)
        started = NOW - span + span * i / n
        yield (f"tp_{int(started * 1000):011x}{rng.getrandbits(80):020x}", started, "anthropic", "anthropic.messages",
               200, True, MODELS[i % len(MODELS)], MODELS[i % len(MODELS)], 1200,
               rng.randint(2, 800), 0.004, "complete", rng.lognormvariate(8, 0.7),
               rng.lognormvariate(5.5, 0.8), p50, p50 * 1.7, p50 * 3.2, p50 * 6,
               rng.randint(1, 800), rng.lognormvariate(3, 0.3), rng.uniform(10, 200),
               rng.lognormvariate(8, 0.7))


def build(url: str, n: int) -> None:
    from trioproxy.accounting.locations import open_store

    store = open_store(url, timeout=600)
    store.migrate()
    sql = store._sql(f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES "
                     f"({', '.join('?' * len(COLUMNS))})")
    batch: list[tuple] = []
    with store._transaction() as cur:
        for row in rows(n):
            batch.append(row)
            if len(batch) == 20_000:
                cur.executemany(sql, batch)
                batch = []
        if batch:
            cur.executemany(sql, batch)
    store.close()


def legacy_summary(store: Any, since: float, now: float) -> dict[str, Any]:
    """The page's data as it was built before: every latency row into Python."""
    from trioproxy.accounting.latency_summary import summarize_latency

    return {
        "by_model": store.aggregate("model", since), "by_day": store.aggregate("day", since),
        "latency": summarize_latency(store.latency_rows(since, None), "model")["groups"],
        "recent": store.recent(25, since),
    }


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trial(url: str, way: str) -> dict[str, Any]:
    from trioproxy.accounting.locations import open_store
    from trioproxy.endpoints.dashboard import usage_summary

    store = open_store(url, timeout=600)
    store.recent(1)  # connected, statements warm
    before = rss_mb()
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:  # an event loop's view: how late does a 1 ms sleep wake up?
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            t = time.perf_counter()
            gaps.append(t - last)
            last = t

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    since = time.time() - 366 * 86400
    t0 = time.perf_counter()
    data = (legacy_summary if way == "before" else usage_summary)(store, since, time.time())
    elapsed = time.perf_counter() - t0
    done.set()
    ticker.join()
    store.close()
    return {"way": way, "seconds": elapsed, "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "longest_tick_gap_ms": max(gaps) * 1000 if gaps else None,
            "models": len(data["latency"])}


def run(url: str, label: str, rounds: int) -> list[dict[str, Any]]:
    out = []
    for r in range(rounds):
        for way in ("before", "after"):
            proc = subprocess.run(
                [sys.executable, __file__, "--trial", way, "--url", url],
                capture_output=True, text=True, check=True)
            result = json.loads(proc.stdout)
            result.update(store=label, round=r)
            out.append(result)
            print(f"{label} round {r} {way:6}: {result['seconds']:7.2f} s  peak RSS "
                  f"{result['peak_rss_mb']:7.1f} MB (before the query {result['rss_before_mb']:.1f})"
                  f"  longest 1 ms tick {result['longest_tick_gap_ms']:.1f} ms", flush=True)
    return out


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in sorted({r["store"] for r in results}):
        med = {way: {k: statistics.median(r[k] for r in results
                                          if r["store"] == label and r["way"] == way)
                     for k in ("seconds", "peak_rss_mb", "rss_before_mb", "longest_tick_gap_ms")}
               for way in ("before", "after")}
        b, a = med["before"], med["after"]
        out[label] = {**med, "time_ratio_after_over_before": a["seconds"] / b["seconds"],
                      "query_memory_ratio": (a["peak_rss_mb"] - a["rss_before_mb"])
                      / max(1e-9, b["peak_rss_mb"] - b["rss_before_mb"])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--postgres", metavar="URL", help="also measure this (empty) PostgreSQL")
    p.add_argument("--trial", choices=("before", "after"), help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trial:
        print(json.dumps(trial(args.url, args.trial)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "usage.db")
        t0 = time.perf_counter()
        build(url, args.rows)
        print(f"SQLite: {args.rows:,} rows written in {time.perf_counter() - t0:.0f} s",
              flush=True)
        results += run(url, "sqlite", args.rounds)
    if args.postgres:
        build(args.postgres, args.rows)
        print(f"PostgreSQL: {args.rows:,} rows written", flush=True)
        results += run(args.postgres, "postgres", args.rounds)
    report = {"rows": args.rows, "rounds": args.rounds, "machine": "2 cores, shared with other "
              "work while measured", "results": results, "medians": summary(results)}
    out = HERE / "results" / "page_data.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["medians"], indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
