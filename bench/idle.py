"""Scenario 1: long silent streams against client idle timeouts.

Each stream is Anthropic-shaped SSE: ``message_start``, a 280 s silence, 40 deltas over 20 s,
another 280 s silence, then ``content_block_stop``/``message_delta``/``message_stop`` (~580 s).
Clients with idle timeouts of none, 60 s (a typical load balancer) and 300 s (the Codex /
Claude Code default) read it through every path, several streams per (path, client), all at
the same time, so the whole run takes ~10 minutes of real time (processes are real: no virtual
time). ``--quick`` scales every duration by 0.05 (silences 14 s, timeouts 3 s / 15 s,
keepalive 0.75 s: ~30 s).

Reported per path x client: completed or aborted (when, why), the longest gap between bytes
the client saw, TTFB, and whether the bytes are identical to what the upstream sent (which is
what the direct path receives; for the keepalive path after stripping the ``: keepalive``
comments, counted separately), plus what the upstream saw (stream completed, or its peer went
away and when).

    python bench/idle.py [--quick | --scale X] [--streams N]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import common
import loadgen
import upstream as fake
from common import PATHS, Procs, Progress, fmt, start_paths, table

SILENCE = 280.0
DELTAS = 40
DELTA_SPAN = 20.0
KEEPALIVE = 15.0
CLIENTS = {"none": None, "60s": 60.0, "300s": 300.0}


def shape(scale: float) -> dict[str, Any]:
    # events: 1 message_start, 2 content_block_start, 3..42 deltas, 43 content_block_stop, ...
    return {"events": DELTAS, "interval": DELTA_SPAN * scale / DELTAS, "size": 40, "stamp": False,
            "silences": [[1, SILENCE * scale], [2 + DELTAS + 1, SILENCE * scale]]}


def stream_seconds(scale: float) -> float:
    return (2 * SILENCE + DELTA_SPAN) * scale


def compare(path: str, body: bytes, expected: bytes, complete: bool) -> tuple[str, int]:
    """('identical' | 'prefix' | 'DIFFERENT', keepalive comments removed)."""
    comments = 0
    if path == "trioproxy_ka":
        comments = body.count(loadgen.KEEPALIVE_COMMENT)
        body = body.replace(loadgen.KEEPALIVE_COMMENT, b"")
    if body == expected:
        return "identical", comments
    if not complete and expected.startswith(body):
        return "prefix", comments
    return "DIFFERENT", comments


def summarize_group(recs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in recs if r["outcome"] == "complete"]
    aborted = [r for r in recs if r["outcome"] != "complete"]
    ttfbs = [r["ttfb_s"] for r in recs if r["ttfb_s"] is not None]
    return {
        "streams": len(recs), "completed": len(done), "aborted": len(aborted),
        "abort_at_s": common.percentile([r["t_end_s"] for r in aborted], 50) if aborted else None,
        "abort_reasons": sorted({r["reason"] for r in aborted}),
        "longest_gap_s": max(r["max_gap_s"] for r in recs),
        "ttfb_s_p50": common.percentile(ttfbs, 50),
        "ttfb_s_max": max(ttfbs) if ttfbs else None,
        "bytes": sorted({r["bytes_vs_upstream"] for r in recs}),
        "keepalive_comments_max": max(r["keepalive_comments"] for r in recs),
        "upstream_saw": sorted({r["upstream"] for r in recs}),
    }


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="scale durations by 0.05 (~30 s)")
    ap.add_argument("--scale", type=float, default=None, help="duration scale (default 1, quick 0.05)")
    ap.add_argument("--streams", type=int, default=3, help="streams per path x client")
    ap.add_argument("--paths", default=",".join(PATHS))
    return ap.parse_args()


def stream_requests(paths: list[str], streams: int, bench: dict[str, Any], scale: float,
                    total: float) -> tuple[list[tuple[str, str, int, str]], list[loadgen.Req]]:
    """``streams`` requests per path x client, each with its own stream id: (path, client, k,
    id) per request, and the requests."""
    meta: list[tuple[str, str, int, str]] = []
    reqs: list[loadgen.Req] = []
    for path in paths:
        for client, timeout in CLIENTS.items():
            for k in range(streams):
                sid = f"{path}.{client}.{k}"
                meta.append((path, client, k, sid))
                reqs.append(loadgen.Req(
                    "POST", "/v1/messages?beta=true", loadgen.stream_body(**bench, id=sid),
                    idle_timeout=timeout * scale if timeout else None,
                    total_timeout=total * 1.2 + 60, keep_body=True, timeline=True, label=sid))
    return meta, reqs


def run_streams(paths: list[str], streams: int, bench: dict[str, Any], scale: float,
                total: float, progress: Progress
                ) -> tuple[list[tuple[str, str, int, str]], list[loadgen.StreamResult], dict[str, Any]]:
    """Start the paths, warm each up, then run every stream at once on one engine, one
    connection per stream to its own path's port. Returns (meta, results, the upstream's stats)."""
    with Procs() as procs:
        up, targets = start_paths(procs, paths, keepalive=KEEPALIVE * scale)
        eng = loadgen.Engine()
        warm = loadgen.stream_body(events=4, interval=0.001)
        loadgen.parallel(eng, [t.port for t in targets.values()],
                         [loadgen.Req("POST", "/v1/messages", warm) for _ in targets],
                         deadline=time.monotonic() + 10)
        meta, reqs = stream_requests(paths, streams, bench, scale, total)
        ports = {p: targets[p].port for p in paths}
        by_port = [ports[m[0]] for m in meta]
        progress(f"{len(reqs)} streams of {total:.0f} s ({len(paths)} paths x {len(CLIENTS)} "
                 f"clients x {streams}), keepalive {KEEPALIVE * scale:g} s", force=True)

        def tick(results: list[loadgen.StreamResult]) -> None:
            ended = defaultdict(int)
            for r in results:
                ended[r.outcome] += 1
            progress(f"{len(reqs) - len(results)} open, ended: {dict(ended)} "
                     f"(stream t={time.monotonic() - t_run:.0f}/{total:.0f} s)")

        t_run = time.monotonic()
        results = loadgen.parallel(eng, by_port, reqs, deadline=t_run + total * 1.2 + 90,
                                   tick=tick, tick_every=progress.every)
        stats = loadgen.control(up.port, "GET", "/bench/stats")
    return meta, results, stats


def upstream_saw(u: dict[str, Any], quick: bool) -> str:
    """What the upstream saw of one stream, from its ``/bench/stats`` outcome."""
    if not u:
        return "unknown"
    if u["outcome"] == "complete":
        return "ran to the end"
    # rounded so that the streams of one group read alike
    return f"peer gone at {u['at']:.{1 if quick else 0}f}s"


def stream_records(meta: list[tuple[str, str, int, str]], results: list[loadgen.StreamResult],
                   outcomes: dict[str, Any], bench: dict[str, Any], quick: bool
                   ) -> list[dict[str, Any]]:
    """One record per stream: what the client saw, its bytes against the upstream's."""
    records = []
    for (path, client, k, sid), r in zip(meta, results):
        expected = fake.expected_body({**bench, "id": sid})
        verdict, comments = compare(path, r.body or b"", expected, r.outcome == "complete")
        u = outcomes.get(sid, {})
        records.append({
            "path": path, "client": client, "k": k, "id": sid, "outcome": r.outcome,
            "reason": r.reason, "status": r.status, "ttfb_s": r.ttfb, "first_event_s": r.first_event,
            "t_end_s": r.t_end, "max_gap_s": r.max_gap, "nbytes": r.nbytes,
            "bytes_vs_upstream": verdict, "keepalive_comments": comments,
            "upstream": upstream_saw(u, quick),
            "upstream_detail": u, "timeline": r.timeline if k == 0 else None,
        })
    return records


def print_groups(groups: list[dict[str, Any]]) -> None:
    rows = [[g["path"], g["client"], f"{g['completed']}/{g['streams']}",
             fmt(g["abort_at_s"], "s", 1) if g["aborted"] else "-",
             fmt(g["longest_gap_s"], "s", 1), fmt(g["ttfb_s_p50"] * 1000 if g["ttfb_s_p50"] is not None
                                                   else None, "ms", 1),
             ",".join(g["bytes"]), g["keepalive_comments_max"], "; ".join(g["upstream_saw"]),
             "; ".join(g["abort_reasons"])[:60]]
            for g in groups]
    print(table(["path", "client", "completed", "aborted at", "longest gap", "ttfb p50",
                 "bytes vs upstream", "ka comments", "upstream saw", "abort reason"], rows))


def result_config(scale: float, total: float, streams: int, paths: list[str]) -> dict[str, Any]:
    return {"scale": scale, "silence_s": SILENCE * scale, "deltas": DELTAS,
            "delta_span_s": DELTA_SPAN * scale, "stream_s": total,
            "client_idle_timeouts_s": {c: (t * scale if t else None) for c, t in CLIENTS.items()},
            "keepalive_s": KEEPALIVE * scale, "streams_per_cell": streams, "paths": paths,
            "bytes_note": "compared with the exact bytes the upstream sent for that request "
                          "(what the direct path receives); the keepalive path after removing "
                          "': keepalive\\n\\n' comments; 'prefix' = an aborted stream whose "
                          "bytes are a correct prefix"}


def main() -> None:
    args = parse_args()
    scale = args.scale if args.scale is not None else (0.05 if args.quick else 1.0)
    quick = args.quick or scale < 1.0
    common.banner("idle", quick)
    common.check_trioproxy_imports()
    paths = args.paths.split(",")
    bench = shape(scale)
    total = stream_seconds(scale)
    progress = Progress("idle", every=3.0 if quick else 10.0)
    t_start = time.monotonic()
    meta, results, stats = run_streams(paths, args.streams, bench, scale, total, progress)
    records = stream_records(meta, results, stats.get("outcomes", {}), bench, quick)
    groups = []
    for path in paths:
        for client in CLIENTS:
            recs = [x for x in records if x["path"] == path and x["client"] == client]
            groups.append({"path": path, "client": client, **summarize_group(recs)})
    print_groups(groups)
    out = common.write_result("idle", quick, {
        "config": result_config(scale, total, args.streams, paths),
        "groups": groups, "streams": records, "run_seconds": time.monotonic() - t_start,
    })
    print(f"wrote {out} in {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
