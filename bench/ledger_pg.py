"""The shared ledger: usage-record inserts/s that several processes sustain into one PostgreSQL.

Each writer process stands for one trioproxy worker's usage writer: it opens the store the way
trioproxy does (``open_store``: one connection, autocommit, explicit transactions) and calls
``Store.insert_many`` in a loop, one transaction per batch, with realistic records (a streamed
Anthropic response: tokens, latency figures, raw usage, key fingerprint). The writer never
waits to fill a batch, so a lightly loaded instance inserts batches of 1 and a saturated one
batches of up to 200 (``open_usage_writer``'s ``batch_size``); both ends are measured.

Per cell (writers × batch size): every writer connects, then all start together and insert
for ``--seconds``;
reported are rows/s and transactions/s over all writers, the per-transaction latency p50/p99
seen by the writers, and the server's own CPU (the postgres processes, from /proc) per 1,000
rows. Runs in a fresh schema of the database ``test`` on 127.0.0.1:5432 (dropped at the end).
Nothing is pinned: the writers, like trioproxy instances, share the machine with PostgreSQL.

    python bench/ledger_pg.py [--writers 1,2,4,8] [--batches 1,20,200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import time
from typing import Any

import common
import psutil
import psycopg
from common import Progress, fmt, md_table, table

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def record(i: int, writer: int) -> Any:
    from trioproxy.accounting.record import UsageRecord

    now = time.time()
    return UsageRecord(
        request_id=f"tp_{writer:02d}{i:010d}{secrets.token_hex(4)}", started_at=now,
        provider="anthropic", api="anthropic.messages", transport="http", method="POST",
        path="/v1/messages", status=200, streamed=True, model_requested="claude-sonnet-4-5",
        model="claude-sonnet-4-5-20250929", response_id="msg_01" + secrets.token_hex(11),
        upstream_request_id="req_011" + secrets.token_hex(10), input_tokens=41_233,
        output_tokens=812, cache_read_tokens=40_100, cache_write_tokens=1_000,
        raw_usage={"input_tokens": 133, "cache_creation_input_tokens": 1000,
                   "cache_read_input_tokens": 40100, "output_tokens": 812},
        stop_reason="tool_use", end_reason="complete", cost_usd=0.0321, ttfb_ms=812.5,
        duration_ms=41_800.0, max_gap_ms=30_100.0, bytes_in=48_211, bytes_out=9_812,
        key_fingerprint=secrets.token_hex(8), key_last4="ab12", user_agent="claude-cli/2.0",
        session_id="sess-" + secrets.token_hex(6))


def writer_main(url: str, writer: int, batch: int, seconds: float, ready: Any, go: Any,
                done: Any, out: Any) -> None:
    """Connect, say so, insert from ``go`` for ``seconds``, report, stay connected until
    ``done`` (so the server's backend CPU can be read before it exits)."""
    from trioproxy.accounting.locations import open_store

    store = open_store(url)
    lat: list[float] = []
    rows = i = 0
    ready.put(writer)
    go.wait()
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        recs = [record(i + k, writer) for k in range(batch)]
        i += batch
        t0 = time.perf_counter()
        rows += store.insert_many(recs)
        lat.append(time.perf_counter() - t0)
    out.put({"rows": rows, "transactions": len(lat), "lat": lat})
    done.wait()
    store.close()


def postgres_cpu() -> float:
    """CPU seconds of every postgres process on the machine (the server under test)."""
    total = 0.0
    for p in psutil.process_iter(["name"]):
        if p.info["name"] and p.info["name"].startswith("postgres"):
            try:
                total += common._schedstat_seconds(p.pid)
            except OSError:
                pass
    return total


def cell(url: str, writers: int, batch: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, out, go, done = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=writer_main, args=(url, w, batch, seconds, ready, go, done, out))
             for w in range(writers)]
    for p in procs:
        p.start()
    try:
        for _ in procs:  # every writer connected (its server backend running)
            ready.get(timeout=120)
        c0 = postgres_cpu()
        go.set()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        c1 = postgres_cpu()
    finally:
        done.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    rows = sum(r["rows"] for r in results)
    txs = sum(r["transactions"] for r in results)
    lat = [x * 1000 for r in results for x in r["lat"]]
    return {"writers": writers, "batch": batch, "rows": rows, "rows_per_s": rows / seconds,
            "transactions_per_s": txs / seconds, "tx_ms_p50": common.percentile(lat, 50),
            "tx_ms_p99": common.percentile(lat, 99),
            "postgres_cpu_ms_per_1k_rows": (c1 - c0) / rows * 1e6 if rows else None,
            "postgres_cores": (c1 - c0) / seconds}


def server_settings(url: str) -> dict[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in (
            "server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="1,2,4,8")
    ap.add_argument("--batches", default="1,20,200")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--name", default="ledger_pg")
    args = ap.parse_args()
    common.banner(args.name, False)
    progress = Progress("ledger_pg")
    schema = f"tp_bench_{secrets.token_hex(6)}"
    admin = psycopg.connect(PG_URL, autocommit=True)
    admin.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    rows = []
    t_start = time.monotonic()
    try:
        from trioproxy.accounting.locations import open_store

        store = open_store(url)
        store.migrate()
        store.close()
        for batch in (int(b) for b in args.batches.split(",")):
            for writers in (int(w) for w in args.writers.split(",")):
                row = cell(url, writers, batch, args.seconds)
                rows.append(row)
                progress(f"{writers} writers x batch {batch}: {row['rows_per_s']:.0f} rows/s, "
                         f"{row['transactions_per_s']:.0f} tx/s, tx p99 "
                         f"{fmt(row['tx_ms_p99'], ' ms', 1)}", force=True)
        total = admin.execute(f"SELECT count(*) FROM {schema}.usage_records").fetchone()[0]
        pg = server_settings(PG_URL)
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()
    head = ["writers", "batch", "rows/s", "transactions/s", "tx p50 ms", "tx p99 ms",
            "postgres CPU ms / 1k rows", "postgres cores"]
    cells = [[r["writers"], r["batch"], fmt(r["rows_per_s"], "", 0),
              fmt(r["transactions_per_s"], "", 0), fmt(r["tx_ms_p50"], "", 2),
              fmt(r["tx_ms_p99"], "", 2), fmt(r["postgres_cpu_ms_per_1k_rows"], "", 0),
              fmt(r["postgres_cores"], "", 2)] for r in rows]
    print(table(head, cells))
    out = common.write_result(args.name, False, {
        "config": {"seconds": args.seconds, "writers": args.writers, "batches": args.batches,
                   "postgres": pg, "rows_checked_in_table": total,
                   "rows_reported_by_writers": sum(r["rows"] for r in rows)},
        "rows": rows, "run_seconds": time.monotonic() - t_start})
    md = common.RESULTS / f"{args.name}.md"
    md.write_text(f"# Inserts into one PostgreSQL from several writers (bench/ledger_pg.py)\n\n"
                  f"PostgreSQL {pg['server_version']} on this machine (synchronous_commit="
                  f"{pg['synchronous_commit']}, fsync={pg['fsync']}, shared_buffers="
                  f"{pg['shared_buffers']}); {args.seconds:g} s per cell; nothing pinned, "
                  f"machine shared. Rows in the table at the end: {total}.\n\n"
                  + md_table(head, cells) + "\n")
    print(f"wrote {out} and {md} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
