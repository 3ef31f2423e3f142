"""Usage parsers: recorded-shape streams fed whole, byte by byte and split at random points;
only the events that can carry usage are decoded; truncated streams, provider variants and odd
upstreams; the WebSocket entry points."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings

from trioproxy.providers import (
    AnthropicMessagesParser,
    NullParser,
    OpenAIChatParser,
    OpenAIResponsesParser,
    Usage,
    UsageParser,
    make_parser,
)

from .recorded import EXPECTED, POINTS, SSE_FIXTURES, bytewise, load, run, split

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
