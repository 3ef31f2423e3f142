"""Brotli decompression is bounded for every brotli the dependency range (``brotli>=1.1``)
admits: 1.2+ has ``process(data, output_buffer_limit=...)``; 1.1 has only ``process(data)``,
which returns everything the input decodes to."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import brotli
import pytest

from trioproxy.protocol.decoding import DecodeError, Decoder, decompress

_Decompressor = brotli.Decompressor


class Brotli11Decompressor:
    """The whole ``brotli.Decompressor`` API of brotli 1.1.0 (``process(data)``,
    ``is_finished()``), over the installed library."""

    def __init__(self) -> None:
        self._d = _Decompressor()

    def process(self, data: bytes) -> bytes:
        return self._d.process(data)

    def is_finished(self) -> bool:
        return self._d.is_finished()


@pytest.fixture(params=["installed", "1.1-api"])
def brotli_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "1.1-api":
        monkeypatch.setattr(brotli, "Decompressor", Brotli11Decompressor)
    yield request.param


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def zeros_bomb() -> bytes:
    """128 MiB of zeros in ~100 bytes: meta-blocks of several MiB each."""
    compressor = brotli.Compressor(quality=5, lgwin=24)
    block = bytes(1024 * 1024)
    return b"".join(compressor.process(block) for _ in range(128)) + compressor.finish()


def test_a_dense_bomb_stops_within_a_meta_block_of_the_cap(
    brotli_api: str, zeros_bomb: bytes,
) -> None:
    def run() -> None:
        with pytest.raises(DecodeError, match="cap"):
            Decoder("br", limit=1_000_000).decode(zeros_bomb)

    # brotli 1.1 may build one meta-block (<= 16 MiB) in buffers up to ~3x its size; the whole
    # 128 MiB never
    assert _peak(run) < 64 * 1024 * 1024


def test_a_spread_bomb_stops_at_the_cap(brotli_api: str) -> None:
    bomb = brotli.compress(b'{"usage": ' + b" " * 30_000_000 + b"}", quality=1)
    peak = _peak(lambda: decompress(bomb, "br", limit=1_000_000))
    assert decompress(bomb, "br", limit=1_000_000) is None
    assert peak < 8_000_000


def test_ordinary_bodies_decode_the_same_in_any_chunking(brotli_api: str) -> None:
    plain = b"".join(b'{"i": %d, "text": "hello world"}\n' % i for i in range(5000))
    packed = brotli.compress(plain)
    assert decompress(packed, "br") == plain
    for size in (1, 7, 4096):
        decoder = Decoder("br")
        out = b"".join(decoder.decode(packed[i:i + size]) for i in range(0, len(packed), size))
        assert out + decoder.flush() == plain
    with pytest.raises(DecodeError, match="brotli"):
        Decoder("br").decode(b"not brotli at all" * 10)
