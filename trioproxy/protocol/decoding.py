"""Incremental decompression of ``content-encoding`` bodies, for reading them on the side.

The relay forwards compressed bytes untouched; parsers that need the plain text run them
through a :class:`Decoder`. Supports ``gzip`` (also concatenated members), ``deflate`` (zlib or
raw), ``br`` and ``zstd``, and comma-separated chains (``"gzip, br"``, undone right to left).
Output is capped: decoding raises :class:`DecodeError` as soon as the output passes the cap,
and each codec is driven so that it cannot produce much more than that first: zlib (gzip,
deflate) stops at the cap + 1 byte, zstd at the cap + 64 KiB (its write size), brotli >= 1.2 at
about the cap (its output buffer limit), brotli 1.1 (no output limit in its API) at the cap plus
what one input byte decodes to, at most one 16 MiB meta-block. :func:`decompress` is the
one-shot form that returns None instead of raising.

:func:`loads_object` is the one JSON decode the parsers, the payload stage and the WebSocket
relay share: an object, or None.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Protocol

__all__ = ["MAX_DECODED_BYTES", "DecodeError", "Decoder", "decompress", "is_supported",
           "loads_object"]

MAX_DECODED_BYTES = 64 * 1024 * 1024


class DecodeError(ValueError):
    """Unsupported encoding, corrupt data, or output beyond the cap."""


class _Stage(Protocol):
    def decode(self, data: bytes, room: int) -> bytes: ...
    def flush(self, room: int) -> bytes: ...


class _Zlib:
    """gzip (``wbits=47``: gzip or zlib header, multi-member) or deflate (zlib, else raw)."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._head = b""  # deflate: the first bytes until the wrapper is known
        self._d: zlib._Decompress | None = zlib.decompressobj(47) if gzip else None

    def decode(self, data: bytes, room: int) -> bytes:
        try:
            return self._decode(data, room)
        except zlib.error as exc:
            raise DecodeError(f"zlib: {exc}") from None

    def _decode(self, data: bytes, room: int) -> bytes:
        if self._d is None:
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            zlib_header = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._d = zlib.decompressobj(15 if zlib_header else -15)
        out: list[bytes] = []
        while data:
            part = self._d.decompress(data, room + 1)
            if len(part) > room:
                raise DecodeError("decompressed body over the size cap")
            room -= len(part)
            out.append(part)
            data = b""
            if self._gzip and self._d.eof and self._d.unused_data:
                data = self._d.unused_data  # another gzip member follows
                self._d = zlib.decompressobj(47)
        return b"".join(out)

    def flush(self, room: int) -> bytes:
        try:
            return self._d.flush()[: room + 1] if self._d is not None else b""
        except zlib.error as exc:
            raise DecodeError(f"zlib: {exc}") from None


class _Brotli:
    """brotli >= 1.2: ``process(data, output_buffer_limit=...)`` stops the output at the cap.
    brotli 1.1 has only ``process(data)``, which returns all that its input decodes to, so the
    input goes in one byte at a time and the cap is checked after each: one byte completes at
    most one meta-block (16 MiB at most) of output."""

    def __init__(self) -> None:
        import brotli

        self._error = brotli.error
        self._d = brotli.Decompressor()
        self._limited = hasattr(self._d, "can_accept_more_data")  # brotli >= 1.2

    def decode(self, data: bytes, room: int) -> bytes:
        try:
            if not self._limited:
                return self._bytewise(data, room)
            part = self._d.process(data, output_buffer_limit=room + 1)
            if len(part) > room or not self._d.can_accept_more_data():
                raise DecodeError("decompressed body over the size cap")
            return part
        except self._error as exc:
            raise DecodeError(f"brotli: {exc}") from None

    def _bytewise(self, data: bytes, room: int) -> bytes:
        out: list[bytes] = []
        process = self._d.process
        with memoryview(data) as view:
            for i in range(len(view)):
                part = process(view[i : i + 1])
                if part:
                    room -= len(part)
                    if room < 0:
                        raise DecodeError("decompressed body over the size cap")
                    out.append(part)
        return b"".join(out)

    def flush(self, room: int) -> bytes:
        return b""


class _Sink:
    """Collects zstd output; raising in ``write`` stops a bomb mid-way."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.room = 0

    def write(self, data: bytes) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise DecodeError("decompressed body over the size cap")
        self.parts.append(bytes(data))
        return len(data)


class _Zstd:
    def __init__(self) -> None:
        import zstandard

        self._error = zstandard.ZstdError
        self._sink = _Sink()
        self._w = zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=65536)

    def decode(self, data: bytes, room: int) -> bytes:
        sink = self._sink
        sink.room = room
        try:
            self._w.write(data)
        except self._error as exc:
            raise DecodeError(f"zstd: {exc}") from None
        out, sink.parts = b"".join(sink.parts), []
        return out

    def flush(self, room: int) -> bytes:
        return b""


def _stage(name: str) -> _Stage:
    if name in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if name == "deflate":
        return _Zlib(gzip=False)
    if name == "br":
        return _Brotli()
    if name == "zstd":
        return _Zstd()
    raise DecodeError(f"unsupported content-encoding {name!r}")


def _names(encoding: str) -> list[str]:
    names = [n.strip().lower() for n in encoding.split(",")]
    return [n for n in names if n and n != "identity"]


def is_supported(encoding: str | None) -> bool:
    """True if every coding in a ``content-encoding`` value can be decoded (or there is none)."""
    return all(n in ("gzip", "x-gzip", "deflate", "br", "zstd") for n in _names(encoding or ""))


class Decoder:
    """Incremental decoder for one ``content-encoding`` value (``decode`` then ``flush``)."""

    def __init__(self, encoding: str, *, limit: int = MAX_DECODED_BYTES) -> None:
        self._stages = [_stage(n) for n in reversed(_names(encoding))]
        self._limit = limit
        self.total = 0  # plain bytes produced so far

    def decode(self, chunk: bytes) -> bytes:
        """The plain bytes ``chunk`` completes. Raises :class:`DecodeError`."""
        for stage in self._stages:
            if not chunk:
                break
            chunk = stage.decode(chunk, self._limit - self.total)
        return self._count(chunk)

    def flush(self) -> bytes:
        """Whatever the decoders still hold at the end of the body."""
        out = b""
        for stage in self._stages:
            room = self._limit - self.total
            out = stage.decode(out, room) if out else b""
            out += stage.flush(room)
        return self._count(out)

    def _count(self, out: bytes) -> bytes:
        self.total += len(out)
        if self.total > self._limit:
            raise DecodeError("decompressed body over the size cap")
        return out


def decompress(
    data: bytes, encoding: str, *, limit: int = MAX_DECODED_BYTES
) -> bytes | None:
    """One-shot: the decoded body, or None (unsupported, corrupt, or over ``limit``)."""
    try:
        decoder = Decoder(encoding, limit=limit)
        return decoder.decode(data) + decoder.flush()
    except (DecodeError, MemoryError):
        return None


def loads_object(data: bytes | str) -> dict[str, Any] | None:
    """``json.loads`` restricted to objects; None for anything else or invalid JSON."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
