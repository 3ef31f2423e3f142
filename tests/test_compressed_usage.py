"""Usage from compressed bodies: every content-coding (and chains of them) gives the plain body's
usage; corrupt and unsupported codings give unknown usage; a decompression bomb stops at the
cap."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings

from trioproxy.protocol.decoding import DecodeError, Decoder, decompress
from trioproxy.providers import DecodingParser, OpenAIChatParser, make_parser

from .recorded import POINTS, bytewise, load, run, split


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
