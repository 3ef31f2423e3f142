"""Latency figures: content events timed by the parsers, the tracker's figures, the report.

Streams are the fakes' own event sequences (trioproxy.testing) fed at scripted times, so every
figure is known to the microsecond."""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
from typing import Any

import pytest

from trioproxy.accounting.latency_summary import mixture_quantiles, summarize_latency
from trioproxy.commands.latency_report import add_latency_parser, run_latency
from trioproxy.protocol.latency import (
    EXACT_GAPS,
    Latency,
    LatencyTracker,
    server_timing,
)
from trioproxy.providers import make_parser
from trioproxy.providers.openai_chat import has_content
from trioproxy.testing import anthropic_sse, openai_chat_sse, openai_responses_sse

WORDS = ["Hel", "lo", " wor", "ld"]
# Content events at 200, 250, 350 and 650 ms: gaps 50, 100, 300 ms.
CONTENT_AT = [0.200, 0.250, 0.350, 0.650]
EXPECTED = {  # received at 0, written upstream at 2 ms, head at 50 ms, end at 750 ms, 5 tokens
    "ttft_ms": 200.0, "itl_p50_ms": 100.0, "itl_p90_ms": 260.0, "itl_p99_ms": 296.0,
    "itl_max_ms": 300.0, "itl_count": 3, "tpot_ms": 112.5, "tokens_per_s": 7.273,
    "duration_ms": 750.0, "upstream_head_ms": 48.0, "proxy_request_ms": 2.0,
    "content_events": 4,
}


def events(reply: Any) -> list[bytes]:
    return [bytes(p) for p in reply.body if isinstance(p, bytes | bytearray)]


def schedule(chunks: list[bytes], content: set[int]) -> list[tuple[float, bytes]]:
    """Content chunks (by index) at CONTENT_AT; others 10 ms after the previous chunk
    (the first at 100 ms), the last one at 700 ms."""
    out, times, t = [], iter(CONTENT_AT), 0.090
    for i, chunk in enumerate(chunks):
        t = next(times) if i in content else t + 0.010
        out.append((t, chunk))
    return out


def measure(api: str, timed: list[tuple[float, bytes]], **kw: Any) -> Latency:
    tracker = LatencyTracker(0.0)
    tracker.request_sent(0.002)
    tracker.response_head(0.050)
    parser = make_parser(api, streaming=True, latency=tracker, **kw)
    for now, chunk in timed:
        parser.feed(chunk, now)
    return tracker.figures(0.750, parser.close().output_tokens)


def assert_expected(latency: Latency) -> None:
    got = {k: getattr(latency, k) for k in EXPECTED}
    assert got == EXPECTED


STREAMS = {
    # message_start, content_block_start and ping come first; 4 content_block_delta at 3..6
    "anthropic.messages": (lambda: anthropic_sse(WORDS, output_tokens=5), {3, 4, 5, 6}),
    # the role-only chunk (content "") first; a finish chunk, a usage chunk and [DONE] last
    "openai.chat": (lambda: openai_chat_sse(WORDS, include_usage=True, completion_tokens=5),
                    {1, 2, 3, 4}),
    # response.created, in_progress, output_item.added, content_part.added first
    "openai.responses": (lambda: openai_responses_sse(WORDS, output_tokens=5), {4, 5, 6, 7}),
}


@pytest.mark.parametrize("api", STREAMS)
def test_stream_figures_to_the_millisecond(api: str) -> None:
    make, content = STREAMS[api]
    assert_expected(measure(api, schedule(events(make()), content)))


@pytest.mark.parametrize("api", STREAMS)
def test_events_split_across_chunks_are_timed_by_the_chunk_completing_them(api: str) -> None:
    make, content = STREAMS[api]
    timed = []
    for t, chunk in schedule(events(make()), content):
        half = len(chunk) // 2  # the first half arrives 5 ms early
        timed += [(t - 0.005, chunk[:half]), (t, chunk[half:])]
    assert_expected(measure(api, timed))


@pytest.mark.parametrize("api", STREAMS)
def test_events_in_one_chunk_share_its_time(api: str) -> None:
    make, content = STREAMS[api]
    chunks = events(make())
    first, last = min(content), max(content)
    body = [(0.1, b"".join(chunks[:first])), (0.2, b"".join(chunks[first:last])),
            (0.3, b"".join(chunks[last:]))]
    latency = measure(api, body)
    assert (latency.ttft_ms, latency.content_events, latency.itl_p50_ms, latency.itl_max_ms) == (
        200.0, 4, 0.0, 100.0)


@pytest.mark.parametrize("api", STREAMS)
def test_gzip_stream_times_content_by_compressed_chunk(api: str) -> None:
    make, content = STREAMS[api]
    timed = schedule(events(make()), content)
    comp = gzip.compress(b"".join(c for _, c in timed))  # a decoder emits nothing until the end
    latency = measure(api, [(0.1, comp)], content_encoding="gzip")
    assert (latency.ttft_ms, latency.content_events) == (100.0, 4)


def test_ping_message_start_and_role_chunk_alone_give_no_ttft() -> None:
    anthropic = events(anthropic_sse(WORDS))[:3] + [b": keepalive\n\n"]
    chat = events(openai_chat_sse(WORDS))[:1] + events(openai_chat_sse(WORDS))[-2:]
    responses = events(openai_responses_sse(WORDS))[:4]
    for api, chunks in (("anthropic.messages", anthropic), ("openai.chat", chat),
                        ("openai.responses", responses)):
        latency = measure(api, [(0.1 * (i + 1), c) for i, c in enumerate(chunks)])
        assert (latency.ttft_ms, latency.content_events, latency.itl_p50_ms) == (None, 0, None)


def _anthropic_delta(delta: dict[str, Any]) -> bytes:
    obj = {"type": "content_block_delta", "index": 0, "delta": delta}
    return b"event: content_block_delta\ndata: " + json.dumps(obj).encode() + b"\n\n"


def test_anthropic_tool_thinking_count_but_signature_and_empty_deltas_do_not() -> None:
    start = events(anthropic_sse([]))[:3]
    deltas = [{"type": "thinking_delta", "thinking": "hmm"},
              {"type": "signature_delta", "signature": "EqQBCkgIAR"},
              {"type": "input_json_delta", "partial_json": ""},
              {"type": "input_json_delta", "partial_json": '{"city": "Par'},
              {"type": "text_delta", "text": ""},
              {"type": "citations_delta", "citation": {"type": "char_location", "cited_text": "x"}},
              {"text": 'say "text": "x"', "type": "text_delta"}]
    timed = [(0.1, b"".join(start))] + [(0.2 + i, _anthropic_delta(d)) for i, d in
                                        enumerate(deltas)]
    latency = measure("anthropic.messages", timed)
    assert (latency.ttft_ms, latency.content_events, latency.itl_max_ms) == (200.0, 3, 3000.0)


def _chat(delta: dict[str, Any], style: int) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    text = (json.dumps(obj, separators=(",", ":")), json.dumps(obj),
            json.dumps(obj, indent=2, sort_keys=True).replace("\n", " "))[style]
    return b"data: " + text.encode() + b"\n\n"


CHAT_DELTAS = [
    {"content": "x"}, {"content": ""}, {"role": "assistant", "content": "", "refusal": None},
    {}, {"content": None}, {"reasoning_content": "think"}, {"reasoning": "r", "content": None},
    {"refusal": "no"}, {"tool_calls": []}, {"content": 'a "content": "b'},
    {"tool_calls": [{"index": 0, "function": {"arguments": '{"a'}}]},
    {"content": "", "tool_calls": None, "audio": {}}, {"audio": {"transcript": "hi"}},
]


@pytest.mark.parametrize("style", [0, 1, 2], ids=["compact", "spaced", "indented-sorted"])
def test_chat_content_detection_matches_the_decoded_meaning(style: int) -> None:
    chunks = [_chat({"role": "assistant"}, style)] + [_chat(d, style) for d in CHAT_DELTAS]
    expected = sum(has_content(json.loads(c[6:])) for c in chunks)
    latency = measure("openai.chat", [(0.1 * (i + 1), c) for i, c in enumerate(chunks)])
    assert latency.content_events == expected == 7


def test_chat_content_in_the_finish_chunk_counts() -> None:
    obj = {"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "!"},
                                                   "finish_reason": "stop"}]}
    chunks = [events(openai_chat_sse(WORDS))[0], b"data: " + json.dumps(obj).encode() + b"\n\n"]
    latency = measure("openai.chat", [(0.1, chunks[0]), (0.3, chunks[1])])
    assert (latency.ttft_ms, latency.content_events) == (300.0, 1)


def _responses_objects() -> list[dict[str, Any]]:
    objs = [json.loads(e.split(b"data: ", 1)[1]) for e in events(openai_responses_sse(WORDS,
                                                                                    output_tokens=5))]
    return objs


def test_responses_feed_event_figures_to_the_millisecond() -> None:
    tracker = LatencyTracker(0.0)
    tracker.request_sent(0.002)
    tracker.response_head(0.050)
    parser = make_parser("openai.responses", streaming=True, latency=tracker)
    for now, obj in schedule(_responses_objects(), {4, 5, 6, 7}):  # type: ignore[arg-type]
        parser.feed_event(obj, now)  # type: ignore[attr-defined]
    assert_expected(tracker.figures(0.750, parser.close().output_tokens))


def test_responses_feed_message_with_known_kind_and_other_delta_types() -> None:
    tracker = LatencyTracker(0.0)
    parser = make_parser("openai.responses", streaming=True, latency=tracker)
    frames = [{"type": "response.created", "response": {"id": "r", "model": "m"}},
              {"type": "response.reasoning_summary_text.delta", "delta": "thinking"},
              {"type": "response.output_text.delta", "delta": ""},
              {"type": "response.function_call_arguments.delta", "delta": '{"q":"'},
              {"delta": "late type", "type": "response.output_text.delta"}]
    for i, frame in enumerate(frames):
        text = json.dumps(frame)
        kind = frame["type"] if i % 2 else None  # the relay may know the type already
        parser.feed_message(text, 0.1 * (i + 1), kind)  # type: ignore[attr-defined]
    latency = tracker.figures(1.0, None)
    assert (latency.ttft_ms, latency.content_events, latency.itl_max_ms) == (200.0, 3, 200.0)


def test_tpot_and_rate_need_two_tokens_and_a_stream() -> None:
    tracker = LatencyTracker(10.0)
    tracker.on_content(10.5)
    one = tracker.figures(11.0, 1)
    assert (one.ttft_ms, one.tpot_ms, one.tokens_per_s, one.itl_p50_ms) == (500.0, None, None,
                                                                           None)
    buffered = LatencyTracker(10.0).figures(10.25, 40)
    assert (buffered.ttft_ms, buffered.tokens_per_s, buffered.duration_ms) == (None, None, 250.0)
    assert buffered.proxy_overhead_ms is None


def test_proxy_overhead_is_request_time_plus_mean_relay_delay() -> None:
    tracker = LatencyTracker(0.0)
    tracker.request_sent(0.004)
    for read, handed in ((0.1, 0.101), (0.2, 0.203), (0.3, 0.302)):
        tracker.on_relay(read, handed)
    latency = tracker.figures(0.5, None)
    assert (latency.proxy_request_ms, latency.proxy_relay_ms, latency.proxy_relay_max_ms,
            latency.proxy_overhead_ms) == (4.0, 2.0, 3.0, 6.0)


def test_long_streams_keep_bounded_memory_and_close_percentiles() -> None:
    tracker = LatencyTracker(0.0)
    now, n = 0.0, 5 * EXACT_GAPS
    for i in range(n + 1):  # gaps cycle through 1..100 ms
        tracker.on_content(now)
        now += (i % 100 + 1) / 1000
    latency = tracker.figures(now, n + 1)
    assert len(tracker._gaps) == EXACT_GAPS  # the rest went to the histogram
    assert latency.itl_max_ms == 100.0 and latency.itl_count == n
    for got, want in ((latency.itl_p50_ms, 50.5), (latency.itl_p90_ms, 90.1),
                      (latency.itl_p99_ms, 99.01)):
        assert got == pytest.approx(want, rel=0.012)


def test_server_timing_value() -> None:
    latency = Latency(ttft_ms=12.3456, itl_p50_ms=20.0, duration_ms=80.0, upstream_head_ms=0.0004,
                      proxy_overhead_ms=0.25)
    assert server_timing(latency) == (
        b'upstream;dur=0;desc="upstream response head", ttft;dur=12.346;desc="time to first '
        b'token", itl;dur=20;desc="inter-token latency p50", proxy;dur=0.25;desc="added by the '
        b'proxy", total;dur=80;desc="end to end"')
    assert server_timing(Latency()) == b""


# -- the report ---------------------------------------------------------------------------------

def _row(model: str, ttft: float, started: float = 1_750_000_000.0, **kw: Any) -> dict[str, Any]:
    row = {"started_at": started, "model": model, "provider": "openai", "api": "openai.chat",
           "key_fingerprint": "k1", "session_id": None, "ttft_ms": ttft, "itl_p50_ms": 10.0,
           "itl_p90_ms": 20.0, "itl_p99_ms": 40.0, "itl_max_ms": 50.0, "itl_count": 9,
           "tpot_ms": 12.0, "tokens_per_s": 80.0, "duration_ms": ttft + 100, "output_tokens": 10}
    return row | kw


def test_one_request_itl_pool_gives_back_its_own_percentiles() -> None:
    assert mixture_quantiles([(9, [10.0, 20.0, 40.0, 50.0])], [50, 90, 99]) == pytest.approx(
        [10.0, 20.0, 40.0])


def test_itl_pool_weights_requests_by_their_gap_count() -> None:
    slow, fast = [100.0, 100.0, 100.0, 100.0], [10.0, 10.0, 10.0, 10.0]
    assert mixture_quantiles([(1, slow), (3, fast)], [50, 80]) == [10.0, 100.0]


def test_report_percentiles_and_too_few_samples() -> None:
    rows = [_row("a", float(t)) for t in range(1, 101)] + [_row("b", 5.0, ttft_ms=None)]
    summary = summarize_latency(rows)
    a, b = summary["groups"]
    assert a["metrics"]["ttft_ms"] == {"count": 100, "p50": 50.5, "p90": 90.1, "p99": 99.01,
                                       "mean": 50.5}
    assert a["metrics"]["itl_ms"] == {"count": 900, "p50": 10.0, "p90": 20.0, "p99": 40.0,
                                      "mean": 12.0}
    assert b["metrics"]["ttft_ms"] == {"count": 0, "p50": None, "p90": None, "p99": None,
                                       "mean": None}
    assert b["metrics"]["e2e_ms"]["p50"] is not None and b["metrics"]["e2e_ms"]["p90"] is None


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_latency_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["latency", *argv])


def test_cli_table_says_when_samples_are_too_few(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_row("gpt-x", 100.0 + i) for i in range(12)]
    assert run_latency(_args(), rows) == 0
    out = capsys.readouterr().out
    ttft = next(line for line in out.splitlines() if "ttft_ms" in line).split()
    assert ttft == ["gpt-x", "12", "ttft_ms", "12", "105.5", "109.9", "n<100", "105.5"]


def test_cli_csv_groups_by_hour_since(capsys: pytest.CaptureFixture[str]) -> None:
    base = 1_750_000_000.0  # 2025-06-15T15:06:40Z
    rows = [_row("m", 10.0, base - 7200), _row("m", 20.0, base), _row("m", 30.0, base + 3600)]
    assert run_latency(_args("--by", "hour", "--csv", "--since", "2025-06-15T15:00"), rows) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    ttft = [(r["hour"], r["count"], r["p50"], r["p90"]) for r in table if r["metric"] == "ttft_ms"]
    assert ttft == [("2025-06-15T15:00Z", "1", "20.0", ""), ("2025-06-15T16:00Z", "1", "30.0", "")]


def test_cli_json_by_key(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [_row("m", 10.0, key_fingerprint="k1"), _row("m", 30.0, key_fingerprint="k2")]
    assert run_latency(_args("--by", "key", "--json"), rows) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(g["group"], g["metrics"]["ttft_ms"]["p50"]) for g in out["groups"]] == [
        ("k1", 10.0), ("k2", 30.0)]


def test_cli_plot_without_matplotlib_says_how_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert run_latency(_args("--plot", "out.png"), [_row("m", 1.0)]) == 2
    assert "pip install 'trioproxy[plot]'" in capsys.readouterr().err
