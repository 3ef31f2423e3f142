"""Usage parsers: recorded-shape streams fed whole, byte by byte and split at random points."""

from __future__ import annotations

import gzip
import itertools
import json
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.protocol.decoding import DecodeError, Decoder, decompress
from trioproxy.providers import (
    AnthropicMessagesParser,
    DecodingParser,
    NullParser,
    OpenAIChatParser,
    OpenAIResponsesParser,
    Usage,
    UsageParser,
    make_parser,
)

DATA = Path(__file__).parent / "data"
POINTS = st.lists(st.integers(min_value=0, max_value=100_000), max_size=30)

# fixture -> (api, expected fields); streaming is the file suffix.
EXPECTED: dict[str, tuple[str, dict[str, Any]]] = {
    "anthropic_stream.sse": ("anthropic.messages", {
        "model": "claude-sonnet-4-5-20250929", "response_id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "input_tokens": 12 + 1500 + 20480, "output_tokens": 87, "cache_read_tokens": 20480,
        "cache_write_tokens": 1500, "stop_reason": "tool_use", "complete": True, "known": True,
        "error": None,
    }),
    "anthropic_stream_legacy.sse": ("anthropic.messages", {
        "response_id": "msg_01Legacy", "input_tokens": 25, "output_tokens": 15,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "stop_reason": "end_turn",
        "complete": True, "known": True,
    }),
    "anthropic_stream_error.sse": ("anthropic.messages", {
        "response_id": "msg_01Err", "input_tokens": 3410, "output_tokens": 3,
        "cache_read_tokens": 3000, "stop_reason": None, "complete": False, "known": True,
        "error": "overloaded_error: Overloaded",
    }),
    "anthropic_message.json": ("anthropic.messages", {
        "model": "claude-opus-4-1-20250805", "response_id": "msg_01JSON", "input_tokens": 2095,
        "output_tokens": 503, "cache_read_tokens": 0, "stop_reason": "max_tokens",
        "complete": True, "known": True,
    }),
    "anthropic_error.json": ("anthropic.messages", {
        "known": False, "complete": True, "input_tokens": None,
        "error": "rate_limit_error: Number of request tokens has exceeded your per-minute"
        " rate limit",
    }),
    "chat_stream_usage.sse": ("openai.chat", {
        "model": "gpt-4o-mini-2024-07-18", "response_id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "input_tokens": 1117, "output_tokens": 46, "cache_read_tokens": 1024,
        "audio_input_tokens": 0, "reasoning_tokens": 0, "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0, "stop_reason": "tool_calls", "complete": True,
        "known": True,
    }),
    "chat_stream_no_usage.sse": ("openai.chat", {
        "model": "gpt-4.1-2025-04-14", "response_id": "chatcmpl-NoUsage", "input_tokens": None,
        "output_tokens": None, "stop_reason": "length", "complete": True, "known": False,
        "raw_usage": None,
    }),
    "chat_stream_azure.sse": ("openai.chat", {
        "model": "gpt-4o-2024-11-20", "response_id": "chatcmpl-Azure1", "input_tokens": 9,
        "output_tokens": 2, "cache_read_tokens": None, "stop_reason": "stop", "complete": True,
        "known": True,
    }),
    "chat_stream_error.sse": ("openai.chat", {
        "response_id": "chatcmpl-Err", "known": False, "complete": False,
        "error": "server_error: The server had an error while processing your request.",
    }),
    "chat_completion.json": ("openai.chat", {
        "model": "gpt-4o-audio-preview-2024-12-17", "response_id": "chatcmpl-JSON1",
        "input_tokens": 300, "output_tokens": 120, "cache_read_tokens": 128,
        "audio_input_tokens": 40, "audio_output_tokens": 50, "reasoning_tokens": 32,
        "accepted_prediction_tokens": 7, "rejected_prediction_tokens": 3, "stop_reason": "stop",
        "complete": True, "known": True,
    }),
    "responses_stream.sse": ("openai.responses", {
        "model": "gpt-5-codex",
        "response_id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
        "input_tokens": 9120, "output_tokens": 412, "cache_read_tokens": 8064,
        "reasoning_tokens": 256, "stop_reason": "completed", "complete": True, "known": True,
        "error": None,
    }),
    "responses_incomplete.sse": ("openai.responses", {
        "response_id": "resp_incomplete", "input_tokens": 500, "output_tokens": 64,
        "reasoning_tokens": 60, "stop_reason": "max_output_tokens", "complete": True,
        "known": True,
    }),
    "responses_failed.sse": ("openai.responses", {
        "response_id": "resp_failed", "known": False, "complete": True, "stop_reason": "failed",
        "error": "server_error: The model failed to generate a response.",
    }),
    "responses_error.sse": ("openai.responses", {
        "response_id": "resp_err", "model": "gpt-5-codex", "known": False, "complete": False,
        "error": "rate_limit_exceeded: Rate limit reached for gpt-5-codex",
    }),
    "responses.json": ("openai.responses", {
        "model": "o4-mini-2025-04-16", "response_id": "resp_json", "input_tokens": 36,
        "output_tokens": 87, "cache_read_tokens": 0, "reasoning_tokens": 64,
        "stop_reason": "completed", "complete": True, "known": True,
    }),
}
SSE_FIXTURES = [name for name in EXPECTED if name.endswith(".sse")]


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def run(name: str, chunks: list[bytes], encoding: str | None = None) -> Usage:
    api, _ = EXPECTED[name]
    parser = make_parser(api, streaming=name.endswith(".sse"), content_encoding=encoding)
    for chunk in chunks:
        parser.feed(chunk)
    return parser.close()


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# -- the recorded shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED)
def test_fixture_gives_expected_usage(name: str) -> None:
    usage = run(name, [load(name)])
    for field, value in EXPECTED[name][1].items():
        assert getattr(usage, field) == value, field


@pytest.mark.parametrize("name", EXPECTED)
def test_fed_byte_by_byte_gives_the_same_usage(name: str) -> None:
    data = load(name)
    assert run(name, bytewise(data)) == run(name, [data])


@pytest.mark.parametrize("name", EXPECTED)
@settings(max_examples=15, deadline=None)
@given(points=POINTS)
def test_split_at_random_points_gives_the_same_usage(name: str, points: list[int]) -> None:
    data = load(name)
    assert run(name, split(data, points)) == run(name, [data])


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_crlf_and_cr_line_endings_give_the_same_usage(name: str, eol: bytes) -> None:
    data = load(name)
    assert run(name, bytewise(data.replace(b"\n", eol))) == run(name, [data])


def test_raw_usage_keeps_provider_field_names_merged_across_events() -> None:
    usage = run("anthropic_stream.sse", [load("anthropic_stream.sse")])
    assert usage.raw_usage == {
        "input_tokens": 12, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 20480,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 87, "service_tier": "standard",
    }


# -- only the events that matter are decoded -----------------------------------------------------

DECODES = {
    "anthropic_stream.sse": 2,  # message_start, message_delta (of 16 events)
    "chat_stream_usage.sse": 3,  # first chunk, finish_reason chunk, usage chunk (of 10)
    "chat_stream_no_usage.sse": 2,  # first chunk, finish_reason chunk
    "responses_stream.sse": 2,  # response.created, response.completed (of 17)
}


@pytest.mark.parametrize("name", DECODES)
def test_only_events_that_can_carry_usage_are_json_decoded(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    real = json.loads

    def counting(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counting)
    assert run(name, [load(name)]).complete
    assert len(calls) == DECODES[name]


# -- truncation, variants and odd upstreams -----------------------------------------------------


@pytest.mark.parametrize("name", SSE_FIXTURES)
def test_every_truncation_is_incomplete_and_never_raises(name: str) -> None:
    data = load(name)
    terminal = (b"message_stop", b"[DONE]", b"response.completed", b"response.incomplete",
                b"response.failed")
    for cut in range(0, len(data), 7):
        usage = run(name, [data[:cut]])
        if not any(t in data[:cut] for t in terminal):
            assert not usage.complete


def test_anthropic_stream_cut_after_message_start_reports_tokens_so_far() -> None:
    data = load("anthropic_stream.sse")
    cut = data.index(b"event: content_block_start")
    usage = run("anthropic_stream.sse", [data[:cut]])
    assert (usage.known, usage.complete) == (True, False)
    assert (usage.input_tokens, usage.output_tokens) == (21992, 1)


def test_anthropic_gateway_reporting_input_only_in_message_delta() -> None:
    data = load("anthropic_stream.sse")
    start = data[: data.index(b"\n\n") + 2]
    zeroed = start.replace(b'"input_tokens":12,', b'"input_tokens":0,').replace(
        b'"cache_creation_input_tokens":1500', b'"cache_creation_input_tokens":0').replace(
        b'"cache_read_input_tokens":20480', b'"cache_read_input_tokens":0')
    assert zeroed != start
    usage = run("anthropic_stream.sse", [zeroed + data[len(start):]])
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (21992, 20480, 87)


def test_anthropic_message_delta_with_zero_input_does_not_erase_message_start() -> None:
    data = load("anthropic_stream.sse")
    head, tail = data.split(b"event: message_delta")
    delta = b'"usage":{"input_tokens":12,"cache_creation_input_tokens":1500,'
    assert delta in tail
    zeroed = head + b"event: message_delta" + tail.replace(
        delta, b'"usage":{"input_tokens":0,"cache_creation_input_tokens":0,')
    usage = run("anthropic_stream.sse", [zeroed])
    assert (usage.input_tokens, usage.cache_write_tokens) == (21992, 1500)


def test_chat_stream_cut_before_the_usage_chunk_keeps_model_and_stop_reason() -> None:
    data = load("chat_stream_usage.sse")
    usage = run("chat_stream_usage.sse", [data[: data.index(b'"choices":[]')]])
    assert (usage.known, usage.complete, usage.input_tokens) == (False, False, None)
    assert (usage.model, usage.stop_reason) == ("gpt-4o-mini-2024-07-18", "tool_calls")


def test_anthropic_stream_without_event_lines_is_sniffed_by_type() -> None:
    data = b"\n".join(
        line for line in load("anthropic_stream.sse").split(b"\n") if not line.startswith(b"event:")
    )
    assert run("anthropic_stream.sse", [data]) == run("anthropic_stream.sse", [load(
        "anthropic_stream.sse")])


def test_count_tokens_response() -> None:
    parser = make_parser("anthropic.count_tokens", streaming=False)
    parser.feed(b'{"input_tokens": 2095}')
    usage = parser.close()
    assert (usage.input_tokens, usage.output_tokens, usage.known) == (2095, 0, True)


def test_openai_json_error_body() -> None:
    parser = make_parser("openai.responses", streaming=False)
    parser.feed(b'{"error": {"message": "Incorrect API key", "type": "invalid_request_error", '
                b'"param": null, "code": "invalid_api_key"}}')
    usage = parser.close()
    assert (usage.known, usage.error) == (False, "invalid_request_error: Incorrect API key")


@pytest.mark.parametrize("api", ["anthropic.other", "openai.other", "nonsense", ""])
def test_unknown_api_gets_a_null_parser(api: str) -> None:
    parser = make_parser(api, streaming=True)
    parser.feed(load("anthropic_stream.sse"))
    assert isinstance(parser, NullParser) and parser.close() == Usage(known=False)


def test_json_body_over_the_cap_gives_unknown_usage() -> None:
    parser = AnthropicMessagesParser(False, max_body=100)
    parser.feed(load("anthropic_message.json"))
    usage = parser.close()
    assert (usage.known, usage.input_tokens) == (False, None)


def test_finish_is_computed_once_and_later_feeds_are_ignored() -> None:
    parser = make_parser("openai.chat", streaming=True)
    parser.feed(load("chat_stream_usage.sse"))
    first = parser.close()
    parser.feed(load("chat_stream_azure.sse"))
    assert parser.close() is first and first.input_tokens == 1117


def test_an_internal_failure_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: UsageParser, event: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(OpenAIChatParser, "on_event", boom)
    parser = OpenAIChatParser(True)
    parser.feed(load("chat_stream_usage.sse"))
    assert parser.close().known is False and parser.failed == "RuntimeError: boom"


# -- garbage ------------------------------------------------------------------------------------

APIS = ["anthropic.messages", "anthropic.count_tokens", "openai.chat", "openai.responses"]


@settings(max_examples=60, deadline=None)
@given(api=st.sampled_from(APIS), streaming=st.booleans(), data=st.binary(max_size=400),
       points=POINTS)
def test_random_bytes_never_raise_and_give_unknown(
    api: str, streaming: bool, data: bytes, points: list[int]
) -> None:
    parser = make_parser(api, streaming=streaming)
    for chunk in split(data, points):
        parser.feed(chunk)
    assert parser.close().known is False


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=30), inner,
                                                                 max_size=3),
    max_leaves=8,
)
SLOTS = {  # fixture, a JSON fragment to replace with arbitrary JSON
    "anthropic_stream.sse": b'{"input_tokens":12,"cache_creation_input_tokens":1500,'
                            b'"cache_read_input_tokens":20480,"output_tokens":87}',
    "chat_stream_usage.sse": b'"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0}',
    "responses_stream.sse": b'{"cached_tokens":8064}',
}


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(SLOTS)), value=JSON)
def test_wrongly_typed_fields_never_raise(name: str, value: object) -> None:
    slot = SLOTS[name]
    encoded = json.dumps(value).encode()
    if slot.startswith(b'"'):
        encoded = slot.split(b":", 1)[0] + b":" + encoded
    data = load(name)
    assert slot in data
    usage = run(name, [data.replace(slot, encoded)])
    assert usage.complete and isinstance(usage.known, bool)
    assert usage.output_tokens is None or isinstance(usage.output_tokens, int)


@settings(max_examples=40, deadline=None)
@given(events=st.lists(JSON, max_size=5))
def test_responses_feed_event_never_raises(events: list[object]) -> None:
    parser = OpenAIResponsesParser(True)
    for event in events:
        parser.feed_event(event)  # type: ignore[arg-type]
        parser.feed_event({"type": "response.completed", "response": event})
    assert isinstance(parser.close(), Usage)


# -- the WebSocket entry points -----------------------------------------------------------------


def _responses_events() -> list[bytes]:
    return [line[6:] for line in load("responses_stream.sse").split(b"\n")
            if line.startswith(b"data: ")]


def test_responses_feed_event_matches_sse() -> None:
    parser = OpenAIResponsesParser(True)
    for frame in _responses_events():
        parser.feed_event(json.loads(frame))
    assert parser.close() == run("responses_stream.sse", [load("responses_stream.sse")])


def test_responses_feed_message_decodes_only_interesting_frames(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = _responses_events()
    calls: list[object] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda d, *a, **k: calls.append(d) or real(d, *a, **k))
    parser = OpenAIResponsesParser(True)
    for frame in frames:
        parser.feed_message(frame.decode())
    assert parser.close().input_tokens == 9120
    assert len(calls) == 2 and len(frames) == 15


# -- compressed bodies --------------------------------------------------------------------------


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": _zstd,
}


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
@pytest.mark.parametrize("name", ["anthropic_stream.sse", "chat_completion.json",
                                  "responses_stream.sse", "anthropic_message.json"])
@settings(max_examples=8, deadline=None)
@given(points=POINTS)
def test_compressed_bodies_give_the_same_usage(
    name: str, encoding: str, points: list[int]
) -> None:
    plain = load(name)
    body = COMPRESS[encoding](plain)
    assert run(name, split(body, points), encoding) == run(name, [plain])


def test_raw_deflate_gzip_members_and_encoding_chains() -> None:
    name, plain = "chat_completion.json", load("chat_completion.json")
    expected = run(name, [plain])
    raw = zlib.compressobj(wbits=-15)
    raw_body = raw.compress(plain) + raw.flush()
    members = gzip.compress(plain[:100]) + gzip.compress(plain[100:])
    chain = brotli.compress(gzip.compress(plain))
    assert run(name, bytewise(raw_body), "deflate") == expected
    assert run(name, bytewise(members), "gzip") == expected
    assert run(name, split(chain, [5, 50]), "gzip, br") == expected
    assert run(name, [plain], "identity") == expected


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_corrupt_compressed_body_gives_unknown_usage(encoding: str) -> None:
    body = COMPRESS[encoding](load("anthropic_message.json"))
    broken = body[:10] + bytes(b ^ 0x5A for b in body[10:40]) + body[40:]
    usage = run("anthropic_message.json", [broken], encoding)
    assert usage.known is False


def test_unsupported_encoding_gives_unknown_usage() -> None:
    parser = make_parser("openai.chat", streaming=False, content_encoding="compress")
    parser.feed(load("chat_completion.json"))
    assert parser.close().known is False


BOMB_COMPRESS = {
    "gzip": lambda d: gzip.compress(d, 1),
    "deflate": lambda d: zlib.compress(d, 1),
    "br": lambda d: brotli.compress(d, quality=1),
    "zstd": _zstd,
}


@pytest.mark.parametrize("encoding", sorted(BOMB_COMPRESS))
def test_decompression_bomb_stops_at_the_cap(encoding: str) -> None:
    plain = b'{"usage": ' + b" " * 30_000_000 + b"}"
    bomb = BOMB_COMPRESS[encoding](plain)
    parser = DecodingParser(OpenAIChatParser(False), encoding, limit=1_000_000)
    tracemalloc.start()
    try:
        parser.feed(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parser.failed is not None and "cap" in parser.failed
    assert peak < 8_000_000  # never held the 30 MB
    assert parser.close().known is False
    assert decompress(bomb, encoding, limit=1_000_000) is None
    assert decompress(bomb, encoding) == plain


def test_decoder_reports_errors_as_decode_error() -> None:
    with pytest.raises(DecodeError):
        Decoder("compress")
    with pytest.raises(DecodeError):
        Decoder("gzip").decode(b"\x1f\x8b\x08\x00garbage" * 4)
    assert decompress(b"not brotli at all", "br") is None


# -- content events (latency) -------------------------------------------------------------------

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


def _escape_keys(text: str, *keys: str) -> str:
    """JSON where the given keys are spelled with \\u escapes (valid, and the same meaning)."""
    for key in keys:
        text = text.replace(f'"{key}"', '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"')
    return text


def test_chat_usage_with_escaped_key_names_is_still_counted() -> None:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o",
             "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7}}
    first = {**chunk, "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    events = [json.dumps(first), _escape_keys(json.dumps(chunk), "usage", "prompt_tokens"),
              "[DONE]"]
    parser = OpenAIChatParser(streaming=True)
    parser.feed("".join(f"data: {e}\n\n" for e in events).encode())
    usage = parser.close()
    assert usage.known and (usage.input_tokens, usage.output_tokens) == (11, 7)
