"""Usage parsers given garbage never raise: random bytes, wrongly typed fields in the recorded
shapes, arbitrary WebSocket events."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.providers import OpenAIResponsesParser, Usage, make_parser

from .recorded import POINTS, load, run, split

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
