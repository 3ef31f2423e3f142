"""Idle Responses WebSockets through one trioproxy worker (Codex keeps one open per session).

Per mode, on a fresh proxy (``hypercorn trioproxy:app``, one worker, accounting on, its own
SQLite ledger): measure the worker's RSS, open N WebSockets to ``/v1/responses`` (at most 64
handshaking at once), run one ``response.create`` turn on each (so every socket has moved a
response both ways, as a session between turns has), then leave them idle; measure RSS per
open socket (RSS open minus before, over N) and the proxy's CPU while they idle; close them
all and check that each response has exactly one record in the ledger.

Modes: ``plain`` (the client offers no extension) and ``deflate`` (the client offers
permessage-deflate, as Codex does; the proxy's server side, Hypercorn/wsproto, accepts it and
keeps a compressor and a decompressor per socket). The upstream is
``trioproxy.testing.websocket.FakeResponsesWS`` in its own process (core 0), the clients are raw
wsproto over trio in this process (core 0); the proxy runs on core 1.

``--create-kb N`` pads each ``response.create`` with N KB of instructions (Codex's bodies are
tens of KB: the whole context). ``--old REV`` runs every mode on that git revision's
``trioproxy/`` too (exported with ``git archive``), old and new in turn, in the same run.

    python bench/ws_idle.py [--sockets 1000] [--idle 20] [--modes plain,deflate]
                            [--create-kb 40] [--old REV]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from typing import Any

import common
import trio
from common import HOST, PY, Procs, Progress, fmt, table
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

AUTH = [(b"authorization", b"Bearer sk-bench-ws"),
        (b"openai-beta", b"responses_websockets=2026-02-06")]


def create_frame(pad_kb: int) -> str:
    return json.dumps({"type": "response.create", "model": "gpt-5-codex",
                       "instructions": "You are a coding agent. " * (pad_kb * 1024 // 24),
                       "input": [{"type": "message", "role": "user", "content": [
                           {"type": "input_text", "text": "hi"}]}]})


CREATE = create_frame(0)
UPSTREAM = (
    "import sys, trio\n"
    "from trio_websocket import serve_websocket\n"
    "from trioproxy.testing.websocket import FakeResponsesWS\n"
    "fake = FakeResponsesWS()\n"
    "trio.run(lambda: serve_websocket(fake._handle, '127.0.0.1', int(sys.argv[1]), "
    "ssl_context=None, max_message_size=1 << 26))\n"
)


class Client:
    """One WebSocket to the proxy: handshake, one turn, then idle until closed."""

    def __init__(self, deflate: bool, frame: str = CREATE) -> None:
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.deflate = deflate
        self.frame = frame
        self.stream: trio.SocketStream | None = None

    async def _until(self, wanted: type) -> Any:
        assert self.stream is not None
        while True:
            for event in self.conn.events():
                if isinstance(event, Ping):
                    await self.stream.send_all(self.conn.send(event.response()))
                elif isinstance(event, wanted) and (
                        wanted is not TextMessage or '"response.completed"' in event.data):
                    return event
            data = await self.stream.receive_some(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.conn.receive_data(data)

    async def open_and_turn(self, port: int) -> None:
        self.stream = await trio.open_tcp_stream(HOST, port)
        await self.stream.send_all(self.conn.send(Request(
            host=HOST, target="/v1/responses", extra_headers=AUTH,
            extensions=[PerMessageDeflate()] if self.deflate else [])))
        await self._until(AcceptConnection)
        await self.stream.send_all(self.conn.send(TextMessage(data=self.frame)))
        await self._until(TextMessage)

    async def close(self) -> None:
        if self.stream is None:
            return
        try:
            await self.stream.send_all(self.conn.send(CloseConnection(code=1000)))
            with trio.move_on_after(5):
                await self._until(CloseConnection)
        except (trio.BrokenResourceError, ConnectionError, trio.ClosedResourceError):
            pass
        await self.stream.aclose()


async def drive(port: int, n: int, deflate: bool, frame: str, on_open: Any, wait_idle: Any
                ) -> dict[str, Any]:
    """Open n sockets (64 at a time), a turn each; call ``wait_idle()`` (in a thread) while
    they idle; close them all. Returns counts and timings."""
    clients = [Client(deflate, frame) for _ in range(n)]
    failures: list[str] = []
    limit = trio.CapacityLimiter(64)

    async def one(c: Client) -> None:
        async with limit:
            try:
                with trio.fail_after(60):
                    await c.open_and_turn(port)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(one, c)
    open_s = time.monotonic() - t0
    on_open(n - len(failures))
    idle = await trio.to_thread.run_sync(wait_idle)
    t1 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for c in clients:
            nursery.start_soon(c.close)
    return {"opened": n - len(failures), "failures": sorted(set(failures))[:5],
            "open_seconds": open_s, "close_seconds": time.monotonic() - t1, **idle}


def ledger_rows(db: Any, want: int, wait_s: float = 30.0) -> dict[str, Any]:
    deadline, rows = time.monotonic() + wait_s, []
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT request_id, transport, end_reason FROM "
                                    "usage_records WHERE transport = 'websocket'").fetchall()
        except sqlite3.Error:
            rows = []
        if len(rows) >= want:
            break
        time.sleep(0.5)
    sockets = {r[0].rsplit(".", 1)[0] for r in rows}
    ends: dict[str, int] = {}
    for r in rows:
        ends[r[2] or "none"] = ends.get(r[2] or "none", 0) + 1
    return {"records": len(rows), "distinct_request_ids": len({r[0] for r in rows}),
            "sockets_with_a_record": len(sockets), "end_reasons": ends}


def run_mode(procs: Procs, up_port: int, mode: str, n: int, idle_s: float,
             progress: Progress, frame: str, rev: str = "new", src: str | None = None
             ) -> dict[str, Any]:
    data = procs.logdir / f"data-ws-{mode}-{rev}"
    data.mkdir()
    env = {"TRIOPROXY_ACCOUNTING": "true", "XDG_DATA_HOME": str(data)}
    if src is not None:
        env["PYTHONPATH"] = src
    proc = procs.proxy("trioproxy", up_port, trioproxy_env=env)
    sampler = proc.sampler()
    time.sleep(1.0)
    rss0, worker0 = sampler.rss(), sampler.worker_rss()
    out: dict[str, Any] = {}

    def on_open(k: int) -> None:
        progress(f"{mode}: {k}/{n} sockets open", force=True)

    def wait_idle() -> dict[str, Any]:
        time.sleep(2.0)  # settle
        rss, worker, fds = sampler.rss(), sampler.worker_rss(), sampler.fds()
        c0, t0 = sampler.cpu(), time.monotonic()
        time.sleep(idle_s)
        cpu = (sampler.cpu() - c0) / (time.monotonic() - t0)
        return {"rss_open_mb": rss / 2**20, "worker_rss_open_mb": worker / 2**20, "fds": fds,
                "cpu_idle_cores": cpu}

    out = trio.run(drive, proc.port, n, mode == "deflate", frame, on_open, wait_idle)
    out.update(ledger_rows(data / "trioproxy" / "usage.db", out["opened"]))
    procs.stop(proc)
    opened = out["opened"] or 1
    return {"mode": mode, "rev": rev, "sockets": n, "rss_base_mb": rss0 / 2**20,
            "worker_rss_base_mb": worker0 / 2**20,
            "kb_per_socket": (out["rss_open_mb"] * 2**20 - rss0) / opened / 1024,
            "worker_kb_per_socket": (out["worker_rss_open_mb"] * 2**20 - worker0) / opened / 1024,
            **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--modes", default="plain,deflate")
    ap.add_argument("--name", default="ws_idle")
    ap.add_argument("--create-kb", type=int, default=0)
    ap.add_argument("--old", default=None, help="also run this git revision, in turn")
    args = ap.parse_args()
    frame = create_frame(args.create_kb)
    revs: list[tuple[str, str | None]] = [("new", None)]
    if args.old:
        revs = [(args.old, common.export_revision(args.old)), ("new", None)]
    common.banner(args.name, False)
    common.check_trioproxy_imports()
    nofile = common.raise_nofile()[0]
    progress = Progress("ws_idle")
    t_start = time.monotonic()
    rows = []
    with Procs() as procs:
        port = common.free_port()
        up = procs.spawn("ws-upstream", [PY, "-c", UPSTREAM, str(port)], port=port,
                         core=common.LOAD_CORE)
        for mode, (rev, src) in [(m, r) for m in args.modes.split(",") for r in revs]:
            row = run_mode(procs, up.port, mode, args.sockets, args.idle, progress, frame, rev,
                           src)
            rows.append(row)
            progress(f"{mode} {rev}: {fmt(row['kb_per_socket'], ' KB', 1)}/socket, idle cpu "
                     f"{fmt(row['cpu_idle_cores'], '', 4)}, records {row['records']}", force=True)
    print(table(["mode", "rev", "open", "open s", "RSS base MB", "RSS open MB", "KB/socket",
                 "idle cpu", "fds", "records", "failures"],
                [[r["mode"], r["rev"], r["opened"], fmt(r["open_seconds"], "", 1),
                  fmt(r["rss_base_mb"], "", 1), fmt(r["rss_open_mb"], "", 1),
                  fmt(r["kb_per_socket"], "", 1), fmt(r["cpu_idle_cores"], "", 4), r["fds"],
                  r["records"], len(r["failures"])] for r in rows]))
    out = common.write_result(args.name, False, {
        "config": {"sockets": args.sockets, "idle_s": args.idle, "modes": args.modes,
                   "create_kb": args.create_kb, "old": args.old,
                   "rlimit_nofile": nofile, "max_handshaking": 64},
        "rows": rows, "run_seconds": time.monotonic() - t_start})
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
