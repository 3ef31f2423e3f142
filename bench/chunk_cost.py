"""Per-chunk cost of what trioproxy does on the hot path besides moving bytes.

Measures, per SSE event (one event per chunk, as upstreams send them):
- the usage parser's ``feed`` for each API (Anthropic, Chat, Responses), without and with a
  ``LatencyTracker`` (chunk times passed as ``feed(chunk, now)``, "arg", or set as
  ``parser.now`` before ``feed(chunk)``, "attr");
- the tracker alone (one content event and one relayed chunk per event);
- the include_usage ``UsageChunkStripper`` on a Chat stream;
- ``Exchange.observe_chunk`` (timing and byte counters);
- the relay writer's hand-over of one chunk, as before the latency work (the bare chunk) and
  with it (a ``(chunk, read_at)`` item, ``relay.handed_over``: a clock read and ``on_relay``),
  inside ``trio.run`` since it reads trio's clock;
- the WebSocket response book's attribution of one delta frame, with its latency (``feed_message``);
and, for scale, one ``b"".join`` of two chunks (the writer's coalescing).

Run: ``python bench/chunk_cost.py [--events 20000] [--repeat 7] [--out FILE]``. Prints a table
(median and worst of the per-event time over the repeats) and writes
``bench/results/chunk_cost.json`` (or FILE). Pure CPU, single process, no network: takes ~10 s.
It runs against older revisions too (``compare_revs.py`` puts a snapshot first on PYTHONPATH):
a case whose API does not exist at that revision (e.g. the LatencyTracker before it was added)
is reported as not available instead of failing the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import trio

import trioproxy
from trioproxy.exchange import Exchange
from trioproxy.providers import make_parser
from trioproxy.testing import anthropic_sse, openai_chat_sse, openai_responses_sse

# Older revisions lack some of these (or keep them elsewhere): their cases are left out.
try:
    from trioproxy.protocol.usage_wire import UsageChunkStripper
except ImportError:  # before the protocol/ package
    from trioproxy.usage_wire import UsageChunkStripper
try:
    from trioproxy.protocol.latency import LatencyTracker
except ImportError:
    try:
        from trioproxy.latency import LatencyTracker
    except ImportError:  # revisions before the latency tracker
        LatencyTracker = None
try:
    from trioproxy.relay.http import handed_over
    try:
        from trioproxy.relay.ws_responses import ResponseBook
    except ImportError:  # before the layout by role: the book was protocol's ResponseLedger
        from trioproxy.protocol.websocket import ResponseLedger as ResponseBook
except ImportError:  # revisions before the latency wiring
    ResponseBook = handed_over = None


def _close(parser):
    """The parser's usage: ``close()``, which older revisions spelled ``finish()``."""
    return (parser.close if hasattr(parser, "close") else parser.finish)()


def _figures(tracker, ended: float, output_tokens: int):
    """The tracker's latency figures: ``figures()``, which older revisions spelled ``finish()``."""
    method = tracker.figures if hasattr(tracker, "figures") else tracker.finish
    return method(ended, output_tokens)

RESULTS = Path(__file__).parent / "results"


def _events(reply) -> list[bytes]:
    return [bytes(p) for p in reply.body if isinstance(p, bytes | bytearray)]


def _streams(n: int) -> dict[str, list[bytes]]:
    words = [f" word{i}" for i in range(n)]
    return {
        "anthropic.messages": _events(anthropic_sse(words)),
        "openai.chat": _events(openai_chat_sse(words, include_usage=True)),
        "openai.responses": _events(openai_responses_sse(words)),
    }


def _time_per_event(fn: Callable[[list[bytes]], None], events: list[bytes], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(events)
        samples.append((time.perf_counter() - t0) / len(events) * 1e9)  # ns per event
    return samples


def _parser_run(api: str) -> Callable[[list[bytes]], None]:
    def run(events: list[bytes]) -> None:
        parser = make_parser(api, streaming=True)
        for e in events:
            parser.feed(e)
        _close(parser)

    return run


def _timed_parser_run(api: str, how: str) -> Callable[[list[bytes]], None]:
    """The parser with a LatencyTracker, given each chunk's time as ``feed(chunk, now)``
    (how="arg") or as ``parser.now = now`` before ``feed(chunk)`` (how="attr")."""
    def run(events: list[bytes]) -> None:
        tracker = LatencyTracker(0.0)
        parser = make_parser(api, streaming=True, latency=tracker)
        now = 0.0
        if how == "arg":
            for e in events:
                now += 0.001
                parser.feed(e, now)
        else:
            for e in events:
                now += 0.001
                parser.now = now
                parser.feed(e)
        _figures(tracker, now, _close(parser).output_tokens)

    return run


def _tracker_run(events: list[bytes]) -> None:
    tracker = LatencyTracker(0.0)
    now = 0.0
    for _ in events:
        now += 0.001
        tracker.on_content(now)
        tracker.on_relay(now, now + 0.0001)
    _figures(tracker, now, len(events))


def _paced_trackers(n: int, gaps: int, spread: float) -> list:
    """``n`` trackers of responses with ``gaps`` gaps each: 20 ms × (1 ± 10 %) (spread 0) or
    log-normal with sigma ``spread`` (a real provider's wide gaps: many sketch buckets)."""
    import random

    rng = random.Random(1)
    trackers = []
    for _ in range(n):
        tracker = LatencyTracker(0.0)
        now = 0.3
        for _ in range(gaps + 1):
            tracker.on_content(now)
            now += 0.02 * (rng.lognormvariate(0, spread) if spread else rng.uniform(0.9, 1.1))
        trackers.append(tracker)
    return trackers


def _figures_run(trackers: list) -> None:
    """Per response: the figures (sorted gaps, percentiles, and the gap sketch where it
    exists) at the end of a response."""
    for tracker in trackers:
        _figures(tracker, tracker.last_content + 0.001, 201)


def _stripper_run(events: list[bytes]) -> None:
    s = UsageChunkStripper()
    for e in events:
        s.feed(e)
    s.flush()


def _observe_run(events: list[bytes]) -> None:
    ex = Exchange(request_id="x", method="POST", path="/", provider="openai", started=0.0)
    now = 0.0
    for e in events:
        now += 0.001
        ex.observe_chunk(len(e), now)


def _in_trio(fn: Callable[[list[bytes]], None]) -> Callable[[list[bytes]], None]:
    def run(events: list[bytes]) -> None:
        async def body() -> None:
            fn(events)

        trio.run(body)

    return run


def _handover_plain_run(events: list[bytes]) -> None:
    """The writer before: a bare chunk per channel item, one send per batch of one."""
    for e in events:
        parts = [e]
        parts[0] if len(parts) == 1 else b"".join(parts)


def _handover_timed_run(events: list[bytes]) -> None:
    """The writer now: ``(chunk, read_at)`` items handed over with their relay delay."""
    ex = Exchange(request_id="x", method="POST", path="/", provider="openai", started=0.0)
    ex.track_latency()
    now = 0.0
    for e in events:
        now += 0.001
        handed_over([(e, now)], ex)


def _ws_frames(n: int) -> list[str]:
    return [json.dumps({"type": "response.output_text.delta", "sequence_number": i,
                        "item_id": "msg_1", "output_index": 0, "content_index": 0,
                        "delta": f" word{i}"}, separators=(",", ":")) for i in range(n)]


def _ws_book_run(timed: bool) -> Callable[[list], None]:
    def run(frames: list) -> None:
        _ws_book(frames, timed)

    return _in_trio(run)


def _ws_book(frames: list, timed: bool) -> None:
    """Delta frames attributed by the response book; untimed: no tracker, no parser (before)."""
    book = ResponseBook("ws_x", "s", "/v1/responses", [], False)
    response = book.start(10)
    if not timed:
        response.ex.tracker = response.ex.parser = None
    book.forwarded(response)
    book.on_upstream_frame('{"type":"response.created","response":{"id":"r"}}', 0.0,
                           "response.created", {"type": "response.created",
                                                "response": {"id": "r"}}, 0.0)
    now = 0.0
    for f in frames:
        now += 0.001
        book.on_upstream_frame(f, now, "response.output_text.delta", None, now)


def _join_run(events: list[bytes]) -> None:
    for i in range(0, len(events) - 1, 2):
        b"".join((events[i], events[i + 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "chunk_cost.json"))
    args = ap.parse_args()
    streams = _streams(args.events)
    cases: list[tuple[str, Callable[[list[bytes]], None], list[bytes]]] = [
        (f"parser {api}", _parser_run(api), events) for api, events in streams.items()
    ]
    if LatencyTracker is not None:
        cases += [
            (f"parser {api} + latency, {how}", _timed_parser_run(api, how), events)
            for api, events in streams.items() for how in ("arg", "attr")
        ]
        cases.append(("LatencyTracker on_content+on_relay", _tracker_run, streams["openai.chat"]))
        n = max(20, args.events // 200)
        cases += [  # per response, not per event
            ("LatencyTracker.figures, 200 gaps 20ms±10% (per response)", _figures_run,
             _paced_trackers(n, 200, 0.0)),
            ("LatencyTracker.figures, 200 gaps lognormal s=1 (per response)", _figures_run,
             _paced_trackers(n, 200, 1.0)),
        ]
    cases += [
        ("include_usage stripper (chat)", _stripper_run, streams["openai.chat"]),
        ("Exchange.observe_chunk", _observe_run, streams["openai.chat"]),
        ("writer coalesce join (per pair)", _join_run, streams["openai.chat"]),
    ]
    if handed_over is not None:
        cases += [
            ("writer hand-over, bare chunk (before)", _in_trio(_handover_plain_run),
             streams["openai.chat"]),
            ("writer hand-over + relay delay (now)", _in_trio(_handover_timed_run),
             streams["openai.chat"]),
            ("ws response book delta frame (before)", _ws_book_run(False), _ws_frames(args.events)),
            ("ws response book delta frame + latency (now)", _ws_book_run(True),
             _ws_frames(args.events)),
        ]
    rows = []
    for name, fn, events in cases:
        fn(events[:200])  # warm up
        samples = _time_per_event(fn, events, args.repeat)
        rows.append({"case": name, "events": len(events), "median_ns": statistics.median(samples),
                     "p99_ns": max(samples),
                     "mean_event_bytes": sum(len(e) if isinstance(e, bytes | str) else 0
                                             for e in events) / len(events)})
    print(f"{'per event':44} {'median':>10} {'worst of runs':>14} {'event size':>11}")
    for r in rows:
        print(f"{r['case']:44} {r['median_ns'] / 1000:8.2f}µs {r['p99_ns'] / 1000:12.2f}µs "
              f"{r['mean_event_bytes']:9.0f} B")
    out = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                       "loadavg": __import__("os").getloadavg()},
           "trioproxy": str(Path(trioproxy.__file__).parent), "events": args.events,
           "repeat": args.repeat, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
