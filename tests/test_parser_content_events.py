"""Content events (what latency is timed by): the parsers count them in the recorded streams as
decoding every event would, and a latency tracker changes no usage."""

from __future__ import annotations

import json

import pytest

from trioproxy.providers import make_parser

from .recorded import EXPECTED, bytewise, load, run


def _content_by_meaning(name: str) -> int:
    """Content events of a recorded stream, every event decoded and judged by meaning."""
    from trioproxy.protocol.sse import SSEFramer
    from trioproxy.providers.anthropic import is_content_delta
    from trioproxy.providers.openai_chat import has_content
    from trioproxy.providers.openai_responses import is_content_event

    api, _ = EXPECTED[name]
    count = 0
    for event in SSEFramer().feed(load(name)):
        obj = json.loads(event.data) if event.data.startswith(b"{") else None
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type", "")
        count += bool(
            (api == "anthropic.messages" and kind == "content_block_delta"
             and is_content_delta(obj))
            or (api == "openai.chat" and has_content(obj))
            or (api == "openai.responses" and kind.endswith(".delta") and is_content_event(obj)))
    return count


def _content_events(name: str, chunks: list[bytes]) -> tuple[int, float | None]:
    from trioproxy.protocol.latency import LatencyTracker

    api, _ = EXPECTED[name]
    tracker = LatencyTracker(0.0)
    parser = make_parser(api, streaming=True, latency=tracker)
    for i, chunk in enumerate(chunks):
        parser.feed(chunk, float(i))
    parser.close()
    return tracker.content_events, tracker.first_content


STREAMS = [n for n in EXPECTED if n.endswith(".sse")]


@pytest.mark.parametrize("name", STREAMS)
def test_recorded_streams_count_content_events_as_decoding_would(name: str) -> None:
    data = load(name)
    expected = _content_by_meaning(name)
    assert _content_events(name, [data]) == (expected, 0.0 if expected else None)
    assert _content_events(name, bytewise(data))[0] == expected


@pytest.mark.parametrize("name", STREAMS)
def test_recorded_streams_give_the_same_usage_with_a_latency_tracker(name: str) -> None:
    from trioproxy.protocol.latency import LatencyTracker

    api, _ = EXPECTED[name]
    parser = make_parser(api, streaming=True, latency=LatencyTracker(0.0))
    parser.feed(load(name), 1.0)
    assert parser.close() == run(name, [load(name)])
