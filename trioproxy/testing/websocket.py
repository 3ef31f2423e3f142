"""A scriptable fake of the OpenAI Responses WebSocket API, for tests, the bench and demos.

``FakeResponsesWS`` is a real trio-websocket server on 127.0.0.1 speaking the Responses event
protocol: each ``response.create`` text frame is answered with ``response.created``, some
``response.output_text.delta`` events and ``response.completed`` (with usage, echoing ``model``
and ``previous_response_id``). A ``generate: false`` warm-up gets an empty completion with
zero usage. Everything it sees is kept in ``sockets`` (path, handshake headers, frames,
how and when the socket closed). Scripting, per response (``turns``, consumed in order) or for
the whole server (``reject``):

- refuse the upgrade with an HTTP status, headers and body (401, 429 with a JSON body, ...);
- a huge delta frame of N bytes before the completion;
- end with ``response.failed`` / ``response.incomplete``;
- an ``error`` event then a close with a chosen code (the 60-minute connection cap);
- stop mid-response and stay silent, close mid-response, or drop the TCP connection;
- pause before ``response.created``, before each delta and before the end (latency tests).

    fake = FakeResponsesWS(turns=[Turn(big_delta_bytes=2 * MiB)])
    await nursery.start(fake.serve)
    Settings(openai_base_url=fake.base_url)
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from ..protocol.headers import Headers

MiB = 1024 * 1024
End = Literal["completed", "failed", "incomplete", "error_close", "stop", "close", "drop"]

CONNECTION_LIMIT_ERROR: dict[str, Any] = {
    "type": "error",
    "status": 400,
    "error": {
        "type": "invalid_request_error",
        "code": "websocket_connection_limit_reached",
        "message": "Responses websocket connection limit reached (60 minutes). "
        "Create a new websocket connection to continue.",
    },
}

DEFAULT_ACCEPT_HEADERS: Headers = [
    (b"x-request-id", b"req_fake_ws_1"),
    (b"openai-model", b"gpt-5-codex"),
    (b"openai-processing-ms", b"12"),
    (b"x-codex-turn-state", b"fake-turn-state"),
    (b"x-ratelimit-remaining-requests", b"99"),
    (b"x-models-etag", b"etag-1"),
    (b"keep-alive", b"timeout=5"),  # hop-by-hop: a proxy must not forward it
]


@dataclass(frozen=True)
class Rejection:
    """Refuse the upgrade with this HTTP response."""

    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)

    @classmethod
    def json(cls, status: int, message: str, code: str | None = None, **extra: str) -> Rejection:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": code}}).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
        return cls(status, body, headers)


@dataclass(frozen=True)
class Turn:
    """How the fake answers one ``response.create`` (warm-ups ignore it)."""

    deltas: Sequence[str] = ("Hel", "lo", "!")
    big_delta_bytes: int = 0  # one more delta carrying this many bytes of text
    end: End = "completed"
    close_code: int = 1011  # for end="close" and end="error_close"
    close_reason: str = ""
    error: dict[str, Any] = field(default_factory=lambda: dict(CONNECTION_LIMIT_ERROR))
    usage: dict[str, Any] | None = None  # None: derived from the response number
    before_created: float = 0  # seconds (trio time) before response.created
    gaps: float | Sequence[float] = 0  # before each delta: one value, or one per delta
    before_end: float = 0  # seconds before the terminal event
    # True: each gap ends at a fixed time from the create frame's arrival (the sum of the
    # gaps so far), so late wake-ups do not add up (a calibration upstream's schedule)
    scheduled: bool = False

    def gap(self, i: int) -> float:
        """The pause before delta ``i``."""
        if isinstance(self.gaps, int | float):
            return float(self.gaps)
        return float(self.gaps[i]) if i < len(self.gaps) else 0.0


@dataclass(eq=False)
class SeenSocket:
    """One upgrade request as the fake saw it, and what happened on that socket."""

    path: str
    headers: Headers
    subprotocols: tuple[str, ...]
    frames: list[str | bytes] = field(default_factory=list)
    creates: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None  # code received from (or sent to) the proxy
    closed_by: Literal["peer", "fake"] | None = None
    closed_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    def note_closed(self, reason: CloseReason | None, by: Literal["peer", "fake"]) -> None:
        if self.closed.is_set():
            return
        self.close_code = reason.code if reason is not None else None
        self.closed_by = by
        self.closed_at = trio.current_time()
        self.closed.set()


def default_usage(n: int, output_tokens: int) -> dict[str, Any]:
    """Usage of the n-th response on a socket: the context (and the cache) grows each turn."""
    return {
        "input_tokens": 100 * n,
        "input_tokens_details": {"cached_tokens": 100 * (n - 1)},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 1 if output_tokens else 0},
        "total_tokens": 100 * n + output_tokens,
    }


ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0},
              "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
              "total_tokens": 0}


class FakeResponsesWS:
    """A Responses WebSocket upstream on 127.0.0.1:<ephemeral>."""

    def __init__(
        self,
        *,
        turns: Iterable[Turn] = (),
        reject: Rejection | None = None,
        accept_headers: Headers | None = None,
        max_message_size: int = 64 * MiB,
        turn_factory: Callable[[dict[str, Any]], Turn] | None = None,
    ) -> None:
        self.turns: deque[Turn] = deque(turns)
        self.turn_factory = turn_factory  # makes the turn of a create frame once turns run out
        self.reject = reject
        self.accept_headers = list(DEFAULT_ACCEPT_HEADERS if accept_headers is None else accept_headers)
        self.max_message_size = max_message_size
        self.sockets: list[SeenSocket] = []
        self.port = 0
        self._responses = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What to configure as the proxy's OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def last(self) -> SeenSocket:
        return self.sockets[-1]

    @property
    def path(self) -> str:
        return self.last.path

    @property
    def headers(self) -> Headers:
        return self.last.headers

    async def serve(self, *, task_status: trio.TaskStatus[FakeResponsesWS] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``nursery.start(fake.serve)`` returns once it listens."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle, "127.0.0.1", 0, ssl_context=None,
                    max_message_size=self.max_message_size, receive_buffer_size=65536,
                    task_status=task_status,
                )
            )
            self.port = server.port
            task_status.started(self)

    async def handle(self, request: WebSocketRequest) -> None:
        """Answer one upgrade request (for a server that accepts connections itself, e.g.
        ``trioproxy fake-upstream``, which serves HTTP on the same port)."""
        await self._handle(request)

    async def _handle(self, request: WebSocketRequest) -> None:
        seen = SeenSocket(request.path, list(request.headers), request.proposed_subprotocols)
        self.sockets.append(seen)
        if self.reject is not None:
            r = self.reject
            await request.reject(r.status, extra_headers=list(r.headers), body=r.body or None)
            seen.note_closed(None, "fake")
            return
        ws = await request.accept(extra_headers=list(self.accept_headers))
        try:
            await self._converse(ws, seen)
        except ConnectionClosed as exc:
            seen.note_closed(exc.reason, "peer")

    async def _converse(self, ws: WebSocketConnection, seen: SeenSocket) -> None:
        silent = False
        while True:
            message = await ws.get_message()
            seen.frames.append(message)
            if silent or not isinstance(message, str):
                continue
            try:
                frame = json.loads(message)
            except ValueError:
                continue
            if not isinstance(frame, dict) or frame.get("type") != "response.create":
                continue
            seen.creates.append(frame)
            outcome = await self._respond(ws, frame, seen)
            if outcome == "stop":
                silent = True
            elif outcome in ("close", "error_close", "drop"):
                return

    async def _respond(self, ws: WebSocketConnection, frame: dict[str, Any], seen: SeenSocket) -> End:
        self._responses += 1
        n = self._responses
        due = trio.current_time()
        rid = f"resp_fake_{n}"
        base = {"id": rid, "object": "response", "created_at": 1_700_000_000 + n,
                "model": frame.get("model"), "previous_response_id": frame.get("previous_response_id")}
        seq = _Seq()
        if frame.get("generate") is False:  # a warm-up: answered at once, consumes no turn
            turn = Turn()
        elif self.turns:
            turn = self.turns.popleft()
        else:
            turn = self.turn_factory(frame) if self.turn_factory is not None else Turn()
        if turn.before_created:
            await trio.sleep(turn.before_created)
        await ws.send_message(seq.event("response.created", response={**base, "status": "in_progress",
                                                                       "output": [], "usage": None}))
        if frame.get("generate") is False:
            await ws.send_message(seq.event("response.completed", response={
                **base, "status": "completed", "output": [], "usage": dict(ZERO_USAGE)}))
            return "completed"
        deltas = list(turn.deltas) + (["x" * turn.big_delta_bytes] if turn.big_delta_bytes else [])
        for i, delta in enumerate(deltas):
            if turn.gap(i):
                due += turn.gap(i)
                if turn.scheduled:
                    await trio.sleep_until(due)
                else:
                    await trio.sleep(turn.gap(i))
            await ws.send_message(seq.event("response.output_text.delta", item_id=f"msg_{n}",
                                            output_index=0, content_index=0, delta=delta))
            if turn.end in ("stop", "close", "drop") and i == 0:
                return await self._cut(ws, turn, seen)
        if turn.end == "error_close":
            await ws.send_message(json.dumps(turn.error))
            return await self._cut(ws, turn, seen)
        if turn.before_end:
            await trio.sleep(turn.before_end)
        usage = turn.usage if turn.usage is not None else default_usage(n, len(deltas))
        text = "".join(turn.deltas)
        output = [{"type": "message", "id": f"msg_{n}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        final = {**base, "status": turn.end, "output": output, "usage": usage}
        if turn.end == "failed":
            final["error"] = {"code": "server_error", "message": "The model failed."}
        if turn.end == "incomplete":
            final["incomplete_details"] = {"reason": "max_output_tokens"}
        await ws.send_message(seq.event(f"response.{turn.end}", response=final))
        return turn.end

    async def _cut(self, ws: WebSocketConnection, turn: Turn, seen: SeenSocket) -> End:
        if turn.end in ("close", "error_close"):
            seen.note_closed(CloseReason(turn.close_code, turn.close_reason or None), "fake")
            await ws.aclose(turn.close_code, turn.close_reason or None)
        elif turn.end == "drop":
            seen.note_closed(None, "fake")
            # Abort the TCP connection without a close frame (a crashed upstream).
            await ws._stream.aclose()  # test double: no public API for an abort
        return turn.end


class _Seq:
    """Numbers events the way the Responses API does (``sequence_number``)."""

    def __init__(self) -> None:
        self.n = 0

    def event(self, kind: str, **fields: Any) -> str:
        text = json.dumps({"type": kind, "sequence_number": self.n, **fields},
                          separators=(",", ":"))
        self.n += 1
        return text
