"""The include_usage stripper: cuts the usage-only chunk by JSON meaning, keeps every other
byte, gives the same output for any chunking, and works in linear time and bounded memory."""

from __future__ import annotations

import itertools
import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.protocol.usage_wire import UsageChunkStripper
from trioproxy.testing import JSONStyle

SETTINGS = settings(max_examples=200, deadline=None)
USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
         "completion_tokens_details": {"reasoning_tokens": 0}}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "h\u00e9 [] \u2713"}, "finish_reason": None,
                      "logprobs": None}], "usage": None}
USAGE_CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "m", "choices": [], "usage": USAGE}
STYLES = [JSONStyle(), JSONStyle(spaced=True), JSONStyle(shuffled=True, seed=1),
          JSONStyle(spaced=True, shuffled=True, seed=2), JSONStyle(spaced=True, ascii=True)]

# Events that look like the usage chunk to a byte matcher but are not it by meaning.
NEAR_MISSES = [
    {"choices": [], "usage": None},  # what every chunk has with include_usage, bar "choices"
    {"choices": [{"index": 0, "delta": {}}], "usage": USAGE},  # usage on a content chunk
    {"choices": {}, "usage": USAGE},
    {"choices": [], "usage": [USAGE]},
    {"choices": [], "usage": USAGE, "error": {"message": "overloaded"}},  # errors must reach
    {"choices": [{"delta": {"content": '"choices": [], "usage": {"prompt_tokens": 1}'}}]},
]


def usage_text(style: JSONStyle, variant: int) -> str:
    text = style.dumps(USAGE_CHUNK)
    if variant == 1:  # keys written with escapes: the same object
        text = text.replace('"usage"', '"\\u0075sage"').replace('"choices"', '"ch\\u006fices"')
    elif variant == 2:  # whitespace inside the empty list and around the tokens
        text = text.replace("[]", "[ \t\n ]").replace("{", "{\n  ")
    return text


def data_lines(text: str, multiline: bool, eol: bytes) -> bytes:
    """``data:`` lines; ``multiline`` splits the JSON at whitespace-only newlines."""
    parts = text.split("\n") if multiline else [text.replace("\n", " ")]
    return b"".join(b"data: " + p.encode() + eol for p in parts)


@st.composite
def blocks(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One SSE block (fields and comments up to and including its blank line) and whether it
    is the usage chunk."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    style = draw(st.sampled_from(STYLES))
    kind = draw(st.sampled_from(["chunk", "usage", "near", "comment", "done", "blank", "junk"]))
    prefix = draw(st.sampled_from([b"", b": keepalive" + eol, b"event: chunk" + eol,
                                   b"id: 7" + eol]))
    if kind == "usage":
        text = usage_text(style, draw(st.integers(0, 2)))
        return prefix + data_lines(text, draw(st.booleans()), eol) + eol, True
    if kind == "chunk":
        return prefix + data_lines(style.dumps(CHUNK), False, eol) + eol, False
    if kind == "near":
        return prefix + data_lines(style.dumps(draw(st.sampled_from(NEAR_MISSES))), False,
                                   eol) + eol, False
    if kind == "junk":  # not JSON, but holding an empty list
        return prefix + b'data: {"choices": [], "usage": {' + eol + eol, False
    if kind == "comment":
        return b": ping" + eol + eol, False
    if kind == "blank":
        return eol, False
    return prefix + b"data: [DONE]" + eol + eol, False


def expected(stream_blocks: list[tuple[bytes, bool]]) -> bytes:
    """The stream without the usage blocks. A usage block that ends in CR also takes a
    following LF: CR LF is one line end."""
    out, after_cut_cr = [], False
    for raw, is_usage in stream_blocks:
        if after_cut_cr and raw.startswith(b"\n"):
            raw = raw[1:]
        after_cut_cr = is_usage and raw.endswith(b"\r")
        if not is_usage:
            out.append(raw)
    return b"".join(out)


def strip(*chunks: bytes, **kwargs: int) -> tuple[bytes, UsageChunkStripper]:
    s = UsageChunkStripper(**kwargs)
    return b"".join(s.feed(c) for c in chunks) + s.flush(), s


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


STREAMS = st.lists(blocks(), max_size=12)
POINTS = st.lists(st.integers(min_value=0, max_value=20_000), max_size=25)


@SETTINGS
@given(STREAMS, POINTS)
def test_whole_byte_by_byte_and_random_splits_give_the_same_stripped_stream(
    stream_blocks: list[tuple[bytes, bool]], points: list[int],
) -> None:
    data = b"".join(raw for raw, _ in stream_blocks)
    want = expected(stream_blocks)
    assert strip(data)[0] == want
    assert strip(*[data[i:i + 1] for i in range(len(data))])[0] == want
    assert strip(*split(data, points))[0] == want


@SETTINGS
@given(STREAMS)
def test_each_complete_event_passes_at_once(stream_blocks: list[tuple[bytes, bool]]) -> None:
    s = UsageChunkStripper()
    sent = b""
    for i, (raw, _) in enumerate(stream_blocks):
        sent += s.feed(raw)
        assert sent == expected(stream_blocks[: i + 1])  # nothing held back at a block's end
    assert s.flush() == b""


def test_spaced_and_shuffled_usage_chunks_are_cut_compact_ones_too() -> None:
    for style in STYLES:
        chunk = b"data: " + style.dumps(CHUNK).encode() + b"\n\n"
        usage = b"data: " + style.dumps(USAGE_CHUNK).encode() + b"\n\n"
        out, s = strip(chunk, usage, b"data: [DONE]\n\n")
        assert out == chunk + b"data: [DONE]\n\n" and s.stripped, style


def test_a_crlf_stream_keeps_its_bytes_and_loses_only_the_usage_event() -> None:
    chunk = b"data: " + json.dumps(CHUNK).encode() + b"\r\n\r\n"
    usage = b": c\r\nid: 3\r\ndata: " + json.dumps(USAGE_CHUNK).encode() + b"\r\n\r\n"
    stream = chunk + usage + b"data: [DONE]\r\n\r\n"
    for cut in range(len(stream) + 1):
        assert strip(stream[:cut], stream[cut:])[0] == chunk + b"data: [DONE]\r\n\r\n"


def test_an_unterminated_usage_chunk_at_the_end_is_dropped_other_tails_kept() -> None:
    usage = b"data: " + json.dumps(USAGE_CHUNK).encode()
    assert strip(b"data: 1\n\n", usage)[0] == b"data: 1\n\n"
    assert strip(b"data: 1\n\n", b"data: {\"choices\": [")[0] == b'data: 1\n\ndata: {"choices": ['


def test_only_events_that_can_be_the_usage_chunk_are_decoded() -> None:
    style = JSONStyle(spaced=True, shuffled=True)
    chunk = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "x"}}]}
    stream = [b"data: " + style.dumps(chunk).encode() + b"\n\n" for _ in range(500)]
    stream.append(b"data: " + style.dumps(USAGE_CHUNK).encode() + b"\n\n")
    _, s = strip(*stream)
    assert s.statistics().events_decoded == 1 and s.statistics().events_stripped == 1


def test_work_is_linear_in_the_stream_size_however_it_is_split() -> None:
    big = b"data: " + json.dumps({**CHUNK, "pad": "x" * 500_000}).encode() + b"\n\n"
    usage = b"data: " + json.dumps(USAGE_CHUNK).encode() + b"\n\n"
    for size in (64, 4096):  # 8,000 and 125 chunks for the one event
        stream = big + usage + big
        out, s = strip(*[stream[i:i + size] for i in range(0, len(stream), size)])
        assert out == big + big
        # each byte is copied at most twice (into the hold buffer, then out of it);
        # re-copying the held tail per chunk would be ~ n^2 / size bytes
        assert s.statistics().bytes_copied <= 2 * len(stream)
    many = (b"data: " + json.dumps(CHUNK).encode() + b"\n\n") * 20_000 + usage
    out, s = strip(many)
    assert out == many[: -len(usage)] and s.statistics().bytes_copied <= len(many)


def test_an_oversized_event_streams_through_undecoded_and_stripping_resumes() -> None:
    cap = 4096
    usage = b"data: " + json.dumps(USAGE_CHUNK).encode() + b"\n\n"
    huge = b"data: " + json.dumps({**USAGE_CHUNK, "pad": "y" * 50_000}).encode() + b"\n\n"
    s = UsageChunkStripper(max_event_size=cap)
    sent = b""
    for i in range(0, len(huge), 1000):
        sent += s.feed(huge[i:i + 1000])
        assert s.statistics().bytes_held <= cap + 1000  # memory stays bounded
        if i >= 2 * cap:
            assert sent == huge[: i + 1000]  # the client is not kept waiting for its end
    assert sent == huge
    assert s.feed(usage) == b"" and s.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert s.statistics().events_oversized == 1 and s.statistics().events_decoded == 1


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    alphabet = b'data: {}[]"choices"usage\r\n:, '
    for _ in range(300):
        data = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        whole = strip(data)[0]
        assert strip(*split(data, [rng.randint(0, 400) for _ in range(8)]))[0] == whole


def test_a_usage_chunk_whose_empty_list_spans_data_lines_is_cut_from_a_whole_chunk() -> None:
    # data lines join with "\n", which is JSON whitespace: `[` ends one line, `]` starts the next
    before = b"data: " + json.dumps(CHUNK).encode() + b"\n\n"
    for middle in (b"", b": a comment\n", b"id: 4\n"):
        usage = (b'data: {"choices": [\n' + middle + b'data: ], "usage": {"prompt_tokens": 3}}\n\n')
        out, s = strip(before + usage + b"data: [DONE]\n\n")  # one chunk, as upstreams send
        assert out == before + b"data: [DONE]\n\n" and s.stripped


def test_a_block_of_endless_comment_lines_is_not_held_past_the_cap() -> None:
    s = UsageChunkStripper(max_event_size=4096)
    sent = b""
    for _ in range(100):
        sent += s.feed(b": still working\n" * 10)
        assert s.statistics().bytes_held <= 4096 + 160
    assert len(sent) >= 160 * 100 - 4096 - 160
    assert s.feed(b"\n") and s.feed(b"data: " + json.dumps(USAGE_CHUNK).encode() + b"\n\n") == b""
