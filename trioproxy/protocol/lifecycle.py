"""The lifecycle of one exchange as a state machine without I/O (in the style of h11's _state.py).

An exchange is one proxied HTTP request, or one response on the Responses WebSocket. The trio
drivers (``relay/http.py``, ``relay/ws_responses.py``) feed it what happened; it validates each
transition and decides the outcome exactly once, in :meth:`Lifecycle.decide`.

States::

    RECEIVED ──sent_upstream──▶ AWAITING_HEAD ──head──▶ BUFFERING ──(overflow)──▶ STREAMING
        │                            │                      │                         │
        │                            ├──head(trailers)──▶ STREAMING_TRAILERS          │
        └────────────── decide ──────┴──────────────────────┴─────────────────────────┴──▶ DONE

Facts that may arrive in any state, and never move the state (after DONE they change
nothing: an exchange finalised early, for a stalled client, may still hear of its end):

- ``fail(reason)``: the first failure wins; later ones (also after DONE) are consequences;
- ``answered(status)``: the client was given a response head (the proxy's or the upstream's);
- ``body_ended()``: the upstream body arrived whole (or a WebSocket terminal event);
- ``delivered()``: the last message of the response was handed to the server.

The outcome (:class:`Outcome`) is the first failure if there was one, else ``complete`` when
the upstream body ended and was delivered (or, for an answer the proxy made itself without a
body from upstream, when that answer was delivered), else
``cancelled``: something outside the exchange cut it short (shutdown, a cancelled task).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["End", "Lifecycle", "LifecycleError", "Outcome", "State"]


class State(enum.Enum):
    RECEIVED = "received"  # request head in; body read, routed, prepared
    AWAITING_HEAD = "awaiting_head"  # request on its way upstream: it may have arrived
    BUFFERING = "buffering"  # reading the whole body to answer with usage headers
    STREAMING = "streaming"  # relaying body chunks as they arrive
    STREAMING_TRAILERS = "streaming_trailers"  # the same, usage as HTTP/2 trailers at the end
    DONE = "done"


class End(enum.StrEnum):
    """Why an exchange ended: the usage record's ``end_reason``."""

    COMPLETE = "complete"
    CLIENT_DISCONNECT = "client_disconnect"
    CLIENT_STALLED = "client_stalled"  # the client stopped reading past the write-stall timeout
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"
    UPSTREAM_ERROR = "upstream_error"
    REJECTED = "rejected"  # the proxy refused the request (404, 400, 413, 431, 503 ...)
    EXTENSION_ERROR = "extension_error"
    PROXY_ERROR = "proxy_error"
    CANCELLED = "cancelled"  # cut from outside: shutdown, graceful timeout
    ABORTED = "aborted"  # a WebSocket response the relay stopped before it ended


_NEXT: dict[State, frozenset[State]] = {
    State.RECEIVED: frozenset({State.AWAITING_HEAD, State.DONE}),
    State.AWAITING_HEAD: frozenset(
        {State.BUFFERING, State.STREAMING, State.STREAMING_TRAILERS, State.DONE}),
    State.BUFFERING: frozenset({State.STREAMING, State.DONE}),
    State.STREAMING: frozenset({State.DONE}),
    State.STREAMING_TRAILERS: frozenset({State.DONE}),
    State.DONE: frozenset(),
}
_BODY_STATES = frozenset({State.BUFFERING, State.STREAMING, State.STREAMING_TRAILERS})


class LifecycleError(RuntimeError):
    """A driver asked for a transition the lifecycle does not allow (a bug, never input)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    end_reason: End
    error: str | None
    upstream_complete: bool


class Lifecycle:
    """One exchange's state, its facts and, once decided, its outcome."""

    __slots__ = (
        "answered_status",
        "error",
        "failure",
        "is_delivered",
        "outcome",
        "state",
        "upstream_complete",
    )

    def __init__(self) -> None:
        self.state = State.RECEIVED
        self.failure: End | None = None
        self.error: str | None = None
        self.upstream_complete = False
        self.answered_status: int | None = None
        self.is_delivered = False
        self.outcome: Outcome | None = None

    def __repr__(self) -> str:
        return f"<Lifecycle {self.state.value} failure={self.failure} outcome={self.outcome}>"

    # -- transitions -------------------------------------------------------------------------

    def _to(self, new: State) -> None:
        if new not in _NEXT[self.state]:
            raise LifecycleError(f"cannot go from {self.state.value} to {new.value}")
        self.state = new

    def sent_upstream(self) -> None:
        """The request is being written upstream: from here on it may have arrived."""
        self._to(State.AWAITING_HEAD)

    def head(self, *, buffer: bool = False, trailers: bool = False) -> None:
        """The upstream response head arrived; the body is buffered or streamed."""
        if buffer:
            self._to(State.BUFFERING)
        else:
            self._to(State.STREAMING_TRAILERS if trailers else State.STREAMING)

    def overflow(self) -> None:
        """A buffered body grew too large: it streams on (without usage headers)."""
        self._to(State.STREAMING)

    def decide(self) -> Outcome:
        """Decide the outcome, once. A second call is a driver bug."""
        if self.state is State.DONE:
            raise LifecycleError("the outcome is already decided")
        relayed = self.state in _BODY_STATES
        self.state = State.DONE
        if self.failure is not None:
            end = self.failure
        elif self.is_delivered and (self.upstream_complete or not relayed):
            end = End.COMPLETE
        else:
            end = End.CANCELLED
            self.error = self.error or "the exchange was cut off before it ended"
        self.outcome = Outcome(end, self.error, self.upstream_complete)
        return self.outcome

    # -- facts ---------------------------------------------------------------------------------

    def fail(self, reason: End, error: str | None = None) -> bool:
        """Note a failure; only the first counts. True if this one did.

        After the outcome was decided a failure changes nothing (a disconnect noticed after a
        stalled exchange was finalised early): it is a consequence, like any later failure."""
        if self.state is State.DONE or self.failure is not None:
            return False
        self.failure, self.error = reason, error
        return True

    def answered(self, status: int) -> None:
        """The client was sent a response head with ``status``."""
        if self.state is not State.DONE:
            self.answered_status = status

    def body_ended(self) -> None:
        """The upstream body (or WebSocket response) arrived whole."""
        if self.state is State.DONE:
            return
        if self.state not in _BODY_STATES:
            raise LifecycleError(f"body ended in state {self.state.value}")
        self.upstream_complete = True

    def delivered(self) -> None:
        """The response's last message was handed to the server."""
        if self.state is State.DONE:
            return
        if self.answered_status is None:
            raise LifecycleError("delivered before anything was answered")
        self.is_delivered = True

    # -- questions -------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    @property
    def started(self) -> bool:
        """The client has a response head: errors can no longer become a clean error body."""
        return self.answered_status is not None

    def end_reason(self) -> str | None:
        """The outcome's end reason, or the failure so far while the exchange runs."""
        if self.outcome is not None:
            return self.outcome.end_reason.value
        return self.failure.value if self.failure is not None else None
