"""The ASGI app's own CPU per small request, without the server: floor vs trioproxy.

Hypercorn's cost is the same for every app it serves; what differs between the floor and
trioproxy is the app. This drives each app directly (its lifespan, then ``app(scope, receive,
send)`` from ``--users`` concurrent tasks) against the bench's fake upstream in its own process,
and reports CPU per request of this process (the event loop and the ledger writer thread; the
driver's own work is the same for every app). ``--profile`` runs trioproxy once more under
cProfile and prints its heaviest functions (tottime; cProfile inflates small calls, so use it for
ranking, the plain runs for costs).

    python bench/app_cost.py [--requests 4000] [--users 32] [--rounds 3] [--profile]
    python bench/app_cost.py --stream --requests 400 --users 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import common
import loadgen

SMALL = loadgen.JSON_BODY
# --stream: 64 content events 2 ms apart (the relay's per-event work, without 20 ms waits)
STREAM = loadgen.stream_body(events=64, interval=0.002, stamp=False)


def scope(body: bytes, bypass: bool = False) -> dict[str, Any]:
    headers = [*([(b"x-trioproxy-bypass", b"true")] if bypass else []),
        (b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
        (b"x-api-key", b"sk-ant-bench"), (b"anthropic-version", b"2023-06-01"),
        (b"content-length", str(len(body)).encode()), (b"user-agent", b"app-cost/1"),
    ]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/messages", "raw_path": b"/v1/messages",
        "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "extensions": {},
    }


async def one_request(app: Any, body: bytes) -> int:
    bypass = getattr(app, "bench_bypass", False)
    """One request through ``app``; the status it answered."""
    sent = False
    done = trio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status
        if msg["type"] == "http.response.start":
            status = msg["status"]
        elif msg["type"] == "http.response.body" and not msg.get("more_body"):
            done.set()

    await app(scope(body, bypass), receive, send)
    done.set()
    return status


async def run_app(app: Any, requests: int, users: int, body: bytes = SMALL) -> float:
    """CPU seconds per request over ``requests`` requests (after a warm-up)."""
    to_app, app_in = trio.open_memory_channel[dict[str, Any]](4)
    app_out, from_app = trio.open_memory_channel[dict[str, Any]](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, {"type": "lifespan"}, app_in.receive, app_out.send)
        await to_app.send({"type": "lifespan.startup"})
        msg = await from_app.receive()
        assert msg["type"] == "lifespan.startup.complete", msg

        async def user(n: int) -> None:
            for _ in range(n):
                status = await one_request(app, body)
                assert status == 200, status

        async with trio.open_nursery() as warm:
            for _ in range(users):
                warm.start_soon(user, 20 if body is SMALL else 1)
        await trio.sleep(0.2)  # let the ledger writer settle
        cpu0 = time.process_time()
        async with trio.open_nursery() as load:
            for _ in range(users):
                load.start_soon(user, requests // users)
        await trio.sleep(0.2)  # the ledger writer's linger: its work belongs to these requests
        cpu = time.process_time() - cpu0
        await to_app.send({"type": "lifespan.shutdown"})
        await from_app.receive()
    return cpu / (requests // users * users)


def make_app(kind: str, upstream: str) -> Any:
    if kind == "floor":
        from floor.relay import FloorRelay

        return FloorRelay(upstream)
    from trioproxy.app import TrioProxy
    from trioproxy.config import Settings

    env = {"TRIOPROXY_ANTHROPIC_BASE_URL": upstream, "TRIOPROXY_OPENAI_BASE_URL": upstream,
           "TRIOPROXY_LOG_LEVEL": "WARNING",
           "TRIOPROXY_ACCOUNTING": "true" if kind == "trioproxy" else "false",
           "TRIOPROXY_METRICS": "true" if kind in ("trioproxy", "trioproxy_noacct") else "false"}
    os.environ.update(env)
    app = TrioProxy(Settings.from_env())
    app.bench_bypass = kind == "trioproxy_bypass"  # type: ignore[attr-defined]
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="floor,trioproxy,trioproxy_noacct,trioproxy_bare",
                    help="trioproxy_noacct: accounting off; trioproxy_bare: accounting and "
                    "metrics off; trioproxy_bypass: that, and every request sent with "
                    "x-trioproxy-bypass: true (no usage parsing, usage headers or pricing)")
    ap.add_argument("--stream", action="store_true",
                    help="CPU per 64-event stream instead of per small request")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    with common.Procs() as procs:
        os.environ["XDG_DATA_HOME"] = str(procs.datadir)
        up = procs.upstream()
        base = f"http://{common.HOST}:{up.port}"
        costs: dict[str, list[float]] = {k: [] for k in kinds}
        body = STREAM if args.stream else SMALL
        unit = "stream" if args.stream else "request"
        for _ in range(args.rounds):
            for kind in kinds:
                costs[kind].append(trio.run(run_app, make_app(kind, base), args.requests,
                                            args.users, body))
        floor = statistics.median(costs["floor"]) if "floor" in costs else None
        for kind, vals in costs.items():
            med = statistics.median(vals)
            ratio = f"  {med / floor:.2f}x floor, +{(med - floor) * 1e6:.0f} us" if floor else ""
            print(f"{kind:18s} {med * 1e6:7.1f} us/{unit} "
                  f"({min(vals) * 1e6:.0f}..{max(vals) * 1e6:.0f}){ratio}")
        if args.profile:
            prof = cProfile.Profile()
            app = make_app("trioproxy", base)
            prof.enable()
            trio.run(run_app, app, args.requests, args.users, body)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(45)
            print(out.getvalue())


if __name__ == "__main__":
    main()
