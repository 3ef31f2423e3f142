"""The incremental SSE framer: WHATWG line rules, any chunking, linear time."""

from __future__ import annotations

import itertools
import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.protocol.sse import SSEEvent, SSEFramer, SSEOverflow

DATA = Path(__file__).parent / "data"
SETTINGS = settings(max_examples=150, deadline=None)


def frame(*chunks: bytes, flush: bool = False) -> list[SSEEvent]:
    framer = SSEFramer()
    events = [e for c in chunks for e in framer.feed(c)]
    return events + framer.close(flush=flush)


def split(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def reference(data: bytes) -> list[SSEEvent]:
    """A whole-input reference: split lines on CRLF|CR|LF with a regex, then apply the fields."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    events: list[SSEEvent] = []
    kind, lines, last_id = None, [], None
    for line in re.split(rb"\r\n|\r|\n", data)[:-1]:  # the last piece is unterminated
        if not line:
            if lines:
                events.append(SSEEvent(kind, b"\n".join(lines), last_id))
            kind, lines = None, []
            continue
        if line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        value = value[1:] if colon and value.startswith(b" ") else value
        if name == b"data":
            lines.append(value)
        elif name == b"event":
            kind = value.decode("utf-8", "replace") or None
        elif name == b"id" and b"\0" not in value:
            last_id = value.decode("utf-8", "replace")
    return events


SSE_PIECES = st.sampled_from([
    b"data", b"data:", b"data: ", b"event: ", b"event:", b"id: ", b"id", b":", b": ", b" ",
    b"x", b"\r", b"\n", b"\r\n", b"\xc3\xa9", b"\xe2\x9c\x93", b"\x00", b"retry: 1",
    b"\xef\xbb\xbf",
])
SSE_TEXT = st.lists(SSE_PIECES, max_size=80).map(b"".join)
POINTS = st.lists(st.integers(min_value=0, max_value=10_000), max_size=20)


def test_fields_comments_and_colon_rules() -> None:
    stream = (
        b": a comment\n"
        b"event: message_start\n"
        b"id: 42\n"
        b"data:no-space\n"
        b"data:  two spaces\n"
        b"data\n"
        b"retry: 1000\n"
        b"unknown: field\n"
        b"\n"
    )
    assert frame(stream) == [
        SSEEvent("message_start", b"no-space\n two spaces\n", "42")
    ]


def test_event_without_data_is_not_dispatched_but_empty_data_is() -> None:
    assert frame(b"event: ping\n\n: only a comment\n\n\n") == []
    assert frame(b"event: x\ndata\n\n") == [SSEEvent("x", b"", None)]
    assert frame(b"event:\ndata: y\n\n") == [SSEEvent(None, b"y", None)]


def test_id_persists_across_events_and_nul_is_ignored() -> None:
    events = frame(b"id: a\ndata: 1\n\ndata: 2\n\nid: b\x00c\ndata: 3\n\nid\ndata: 4\n\n")
    assert [e.id for e in events] == ["a", "a", "a", ""]


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"])
def test_crlf_and_cr_streams_frame_like_lf(eol: bytes) -> None:
    lf = (DATA / "anthropic_stream.sse").read_bytes()
    other = lf.replace(b"\n", eol)
    expected = frame(lf)
    assert len(expected) == 16
    assert frame(other) == expected
    assert frame(*[other[i : i + 1] for i in range(len(other))]) == expected


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # Were the LF taken as a second line end, "a" would be dispatched alone.
    assert frame(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent(None, b"a\nb")]


def test_cr_at_chunk_end_followed_by_other_byte() -> None:
    assert frame(b"data: a\r", b"data: b\r", b"\r") == [SSEEvent(None, b"a\nb")]


def test_utf8_character_split_across_chunks_is_kept_intact() -> None:
    payload = "data: h\u00e9 \u2713 \U0001f914\n\n".encode()
    for cut in range(len(payload) + 1):
        [event] = frame(payload[:cut], payload[cut:])
        assert event.text() == "h\u00e9 \u2713 \U0001f914"


def test_leading_bom_is_stripped_even_when_split_but_only_at_the_start() -> None:
    assert frame(b"\xef", b"\xbb", b"\xbfdata: 1\n\n") == [SSEEvent(None, b"1")]
    events = frame(b"data: 1\n\n\xef\xbb\xbfdata: 2\n\n")
    assert events == [SSEEvent(None, b"1")]  # a later BOM makes an unknown field name


def test_close_discards_an_unterminated_event_unless_flushed() -> None:
    assert frame(b"data: 1\n\ndata: 2\n") == [SSEEvent(None, b"1")]
    assert frame(b"data: 1\n\ndata: 2\ndata: 3", flush=True) == [
        SSEEvent(None, b"1"), SSEEvent(None, b"2\n3")
    ]


def test_close_resets_the_framer() -> None:
    framer = SSEFramer()
    framer.feed(b"event: x\ndata: partial")
    framer.close()
    assert framer.at_boundary
    assert framer.feed(b"data: fresh\n\n") == [SSEEvent(None, b"fresh")]


def test_at_boundary_tracks_event_boundaries() -> None:
    framer = SSEFramer()
    assert framer.at_boundary
    states = []
    for chunk in [b"event: a\n", b"data: 1", b"\n", b"\n", b": keepalive\n", b"data: 2\r",
                  b"\r", b"\n", b"\xef"]:
        framer.feed(chunk)
        states.append(framer.at_boundary)
    assert states == [False, False, False, True, True, False, True, True, False]


@SETTINGS
@given(SSE_TEXT, POINTS)
def test_any_chunking_matches_the_whole_input_reference(data: bytes, points: list[int]) -> None:
    expected = reference(data)
    assert frame(data) == expected
    assert frame(*split(data, points)) == expected


@SETTINGS
@given(st.binary(max_size=300), POINTS)
def test_random_bytes_never_raise_and_chunking_does_not_matter(
    data: bytes, points: list[int]
) -> None:
    assert frame(*split(data, points), flush=True) == frame(data, flush=True)


def test_oversized_event_raises_overflow() -> None:
    framer = SSEFramer(max_event_size=1000)
    framer.feed(b"data: " + b"x" * 500 + b"\n")
    with pytest.raises(SSEOverflow):
        framer.feed(b"data: " + b"y" * 600)


@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_a_long_line_in_small_chunks_is_scanned_once(eol: bytes) -> None:
    framer = SSEFramer()
    chunk = b"x" * 512
    assert framer.feed(b": switch to CR-aware scanning" + eol + b"data: ") == []
    for _ in range(32768):  # a 16 MiB line: re-scanning it per chunk would take minutes
        assert framer.feed(chunk) == []
        assert framer._scan == len(framer._buf)  # the next feed searches only the new bytes
    [event] = framer.feed(eol + eol)
    assert len(event.data) == 16 * 1024 * 1024


def test_many_small_events_in_one_chunk_are_all_dispatched() -> None:
    stream = b"event: content_block_delta\ndata: {\"i\": 1}\n\n" * 50_000
    framer = SSEFramer()
    events = framer.feed(stream)
    assert len(events) == 50_000 and events[-1].end == len(stream)
    assert framer.at_boundary and not framer._buf


def blocks(*chunks: bytes) -> list[tuple[int, int, bytes]]:
    framer = SSEFramer()
    return [(e.start, e.end, e.data) for c in chunks for e in framer.feed(c)]


def test_events_carry_the_offsets_of_their_block() -> None:
    stream = b": hi\n\ndata: 1\n\n\n: c\nevent: x\ndata: 2\r\n\r\ndata: 3\r\r"
    assert blocks(stream) == [(6, 15, b"1"), (16, 40, b"2"), (40, 49, b"3")]
    assert stream[16:40] == b": c\nevent: x\ndata: 2\r\n\r\n"
    assert blocks(b"\xef\xbb\xbfdata: 1\n\n") == [(3, 12, b"1")]  # the BOM is no event's


def test_block_start_moves_past_blank_lines_only() -> None:
    framer = SSEFramer()
    starts = []
    for chunk in [b"data: 1\n", b"\n", b": c\n", b"\r", b"\n", b"data: 2\r", b"\r", b"\ndata"]:
        framer.feed(chunk)
        starts.append(framer.block_start)
    # the LF after a CR that ended a blank line belongs to that blank line
    assert starts == [0, 9, 9, 14, 15, 15, 24, 25]


@SETTINGS
@given(SSE_TEXT, POINTS)
def test_block_offsets_do_not_depend_on_chunking(data: bytes, points: list[int]) -> None:
    whole = blocks(data)
    chunked = blocks(*split(data, points))
    assert [(s, d) for s, _, d in chunked] == [(s, d) for s, _, d in whole]
    for (_, end, _), (_, whole_end, _) in zip(chunked, whole, strict=True):
        # a CRLF blank line split after its CR: the LF is not yet known to the event
        assert end == whole_end or (end == whole_end - 1 and data[end - 1:end + 1] == b"\r\n")
    for start, end, payload in whole:  # each block frames alone to its own event
        assert [e.data for e in frame(data[start:end])] == [payload]
        assert whole == sorted(whole) and start >= 0 and end <= len(data)


def test_skip_mode_drops_an_oversized_event_keeps_memory_bounded_and_goes_on() -> None:
    framer = SSEFramer(max_event_size=1000, on_overflow="skip")
    assert framer.feed(b"data: small\n\ndata: ") == [SSEEvent(None, b"small")]
    for _ in range(100):  # 50 KB of one line, then more data lines of the same event
        assert framer.feed(b"y" * 500) == []
    assert framer.skipping
    assert framer.feed(b"\n" + b"data: zzzz\n" * 300) == []
    [event] = framer.feed(b"\nevent: next\ndata: after\n\n")
    assert event == SSEEvent("next", b"after") and not framer.skipping
    assert (event.start, event.end) == (13 + 6 + 50_000 + 1 + 11 * 300 + 1,
                                        13 + 6 + 50_000 + 1 + 11 * 300 + 1 + 25)


def test_skip_mode_memory_stays_bounded_by_the_limit() -> None:
    framer = SSEFramer(max_event_size=1000, on_overflow="skip")
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        framer.feed(b"data: ")
        for _ in range(160):  # a 10 MiB line
            framer.feed(chunk)
        framer.feed(b"\n")
        line = b"data: " + b"x" * 900 + b"\n"
        for _ in range(1000):  # then 900 KB of data lines
            framer.feed(line)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert framer.skipping and peak < 3 * 65536 + 2000  # the chunk being fed + the limit
    assert framer.feed(b"\ndata: next\n\n") == [SSEEvent(None, b"next")]


def test_skip_whole_blocks_only_between_events_and_offsets_go_on() -> None:
    framer = SSEFramer()
    assert not framer.skip_whole_blocks(b"data: 0\n\n")  # a BOM may still come
    assert framer.feed(b"data: 1\n\n") == [SSEEvent(None, b"1")]
    assert framer.skip_whole_blocks(b"data: 2\n\n: c\n\n")
    assert framer.block_start == 9 + 14
    assert not framer.skip_whole_blocks(b"data: 3\n")  # does not end with a blank line
    framer.feed(b"data: 3")
    assert not framer.skip_whole_blocks(b"\n\n")  # an event is pending: frame it
    [event] = framer.feed(b"\n\n")
    assert (event.start, event.end) == (23, 32)
    assert framer.feed(b"data: 4\r\r") == [SSEEvent(None, b"4")]
    assert not framer.skip_whole_blocks(b"\ndata: 5\n\n")  # the LF may end the CR's line
