"""Per-API usage parsers: ``make_parser(api, streaming=..., content_encoding=...)``.

Every parser has ``feed(bytes, now=None) -> None`` and ``close() -> Usage`` and never raises;
the Responses parser also has ``feed_event(dict, now=None)`` / ``feed_message(str | bytes,
now=None, kind=None)`` for WebSocket frames. ``now`` (the relay's clock) times the content events
reported to ``parser.latency``. Compressed bodies are decompressed on the side (the relayed bytes are untouched).
"""

from __future__ import annotations

from ..protocol.decoding import (
    MAX_DECODED_BYTES,
    DecodeError,
    Decoder,
    is_supported,
)
from ..protocol.latency import LatencyTracker
from .anthropic import AnthropicCountTokensParser, AnthropicMessagesParser
from .base import NullParser, Usage, UsageParser
from .openai_chat import OpenAIChatParser
from .openai_responses import OpenAIResponsesParser

__all__ = [
    "PARSERS",
    "AnthropicCountTokensParser",
    "AnthropicMessagesParser",
    "DecodingParser",
    "NullParser",
    "OpenAIChatParser",
    "OpenAIResponsesParser",
    "Usage",
    "UsageParser",
    "make_parser",
]

PARSERS: dict[str, type[UsageParser]] = {
    "anthropic.messages": AnthropicMessagesParser,
    "anthropic.count_tokens": AnthropicCountTokensParser,
    "openai.chat": OpenAIChatParser,
    "openai.responses": OpenAIResponsesParser,
}


class DecodingParser(UsageParser):
    """Decompresses a ``content-encoding`` body incrementally and feeds the plain bytes on.

    A corrupt body, an unsupported encoding or output over ``limit`` makes usage unknown.
    """

    def __init__(
        self, inner: UsageParser, content_encoding: str, *, limit: int = MAX_DECODED_BYTES
    ) -> None:
        super().__init__(inner.streaming)
        self.inner = inner
        self.api = inner.api
        self._decoder: Decoder | None = None
        try:
            self._decoder = Decoder(content_encoding, limit=limit)
        except DecodeError as exc:
            self.give_up(str(exc))

    def feed(self, data: bytes, now: float | None = None) -> None:
        if self._decoder is None or not data:
            return
        try:
            plain = self._decoder.decode(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, MemoryError, a codec's own
            self._decoder = None
            self.give_up(f"{type(exc).__name__}: {exc}")
            return
        self.inner.feed(plain, now)

    def close(self) -> Usage:
        if self._usage is None:
            if self._decoder is not None:
                try:
                    self.inner.feed(self._decoder.flush())
                except Exception as exc:  # noqa: BLE001
                    self.give_up(f"{type(exc).__name__}: {exc}")
                self._decoder = None
            inner = self.inner.close()
            if self.failed is not None:
                inner = Usage(model=inner.model, response_id=inner.response_id, error=inner.error)
            self._usage = inner
        return self._usage


def make_parser(
    api: str, *, streaming: bool, content_encoding: str | None = None,
    latency: LatencyTracker | None = None,
) -> UsageParser:
    """The usage parser for ``api`` (a routing API name); a :class:`NullParser` if it has none.

    ``content_encoding`` (the response header value) wraps the parser in a
    :class:`DecodingParser` unless it is empty or ``identity``; unsupported codings give
    unknown usage. ``latency`` is told the arrival time of each content event of a stream.
    """
    cls = PARSERS.get(api)
    if cls is None:
        return NullParser(streaming)
    parser = cls(streaming, latency=latency)
    encoding = (content_encoding or "").strip()
    if encoding and encoding.lower() != "identity":
        if not is_supported(encoding):
            return NullParser(streaming)
        return DecodingParser(parser, encoding)
    return parser
