"""The exchange lifecycle: transitions are validated and every exchange has one outcome.

The property test plays a driver (what the HTTP and WebSocket relays do) through any sequence
of events -- client disconnects, upstream cuts, timeouts, extension failures, stalls and
shutdown at any point -- and checks that finalising yields exactly one outcome and exactly one
record, however often and from however many tasks finalisation is asked for.
"""

from __future__ import annotations

import re

import pytest
import trio
import trio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import Settings
from trioproxy.exchange import Exchange
from trioproxy.extensions import ExtensionManager
from trioproxy.protocol.lifecycle import (
    End,
    Lifecycle,
    LifecycleError,
    State,
)
from trioproxy.runtime import Runtime
from trioproxy.upstream import UpstreamPool

FAILURES = {
    "client_disconnect": End.CLIENT_DISCONNECT, "client_stalled": End.CLIENT_STALLED,
    "upstream_cut": End.UPSTREAM_ERROR, "timeout": End.TIMEOUT,
    "connect_error": End.CONNECT_ERROR, "extension_error": End.EXTENSION_ERROR,
    "rejected": End.REJECTED, "proxy_error": End.PROXY_ERROR,
}
STEPS = ["send", "head_stream", "head_buffer", "head_trailers", "overflow", "answer",
         "body_end", "deliver", *FAILURES]


def drive(life: Lifecycle, step: str) -> None:
    """Apply ``step`` if a driver could take it in the current state, as the relays do."""
    state = life.state
    if step == "send" and state is State.RECEIVED:
        life.sent_upstream()
    elif step.startswith("head_") and state is State.AWAITING_HEAD:
        life.head(buffer=step == "head_buffer", trailers=step == "head_trailers")
    elif step == "overflow" and state is State.BUFFERING:
        life.overflow()
    elif step == "answer" and life.answered_status is None:
        life.answered(200)
    elif step == "body_end" and state in (State.BUFFERING, State.STREAMING,
                                           State.STREAMING_TRAILERS):
        life.body_ended()
    elif step == "deliver" and life.answered_status is not None:
        life.delivered()
    elif step in FAILURES:
        life.fail(FAILURES[step], step)


def expected(steps: list[str], life: Lifecycle, relayed: bool) -> End:
    failures = [FAILURES[s] for s in steps if s in FAILURES]
    if failures:
        return failures[0]
    if life.is_delivered and (life.upstream_complete or not relayed):
        return End.COMPLETE
    return End.CANCELLED


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(STEPS), max_size=14))
def test_any_sequence_of_events_has_exactly_one_outcome(steps: list[str]) -> None:
    life = Lifecycle()
    for step in steps:
        drive(life, step)
    relayed = life.state in (State.BUFFERING, State.STREAMING, State.STREAMING_TRAILERS)
    outcome = life.decide()
    assert outcome.end_reason is expected(steps, life, relayed)
    assert life.done and life.end_reason() == outcome.end_reason.value
    with pytest.raises(LifecycleError):
        life.decide()
    assert not life.fail(End.CLIENT_DISCONNECT)  # too late: a consequence, not an outcome
    life.answered(500)
    life.delivered()
    if relayed:
        life.body_ended()
    assert life.outcome is outcome and life.end_reason() == outcome.end_reason.value


def test_transitions_the_relay_never_makes_are_refused() -> None:
    life = Lifecycle()
    with pytest.raises(LifecycleError):
        life.head()  # a head before the request went upstream
    with pytest.raises(LifecycleError):
        life.body_ended()
    with pytest.raises(LifecycleError):
        life.delivered()  # nothing was answered
    life.sent_upstream()
    life.head(trailers=True)
    with pytest.raises(LifecycleError):
        life.overflow()  # only a buffered body overflows into a stream
    with pytest.raises(LifecycleError):
        life.sent_upstream()


def test_the_first_failure_names_the_outcome() -> None:
    life = Lifecycle()
    life.sent_upstream()
    life.head()
    assert life.fail(End.UPSTREAM_ERROR, "cut")
    assert not life.fail(End.CLIENT_DISCONNECT, "then the client left")
    outcome = life.decide()
    assert (outcome.end_reason, outcome.error) == (End.UPSTREAM_ERROR, "cut")


def test_a_relayed_body_that_never_ended_is_not_complete() -> None:
    life = Lifecycle()
    life.sent_upstream()
    life.head()
    life.answered(200)
    life.delivered()
    assert life.decide().end_reason is End.CANCELLED


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.sampled_from(STEPS), max_size=10),
       callers=st.integers(min_value=1, max_value=5))
def test_finalising_from_several_tasks_writes_one_record(steps: list[str], callers: int) -> None:
    async def main() -> list[Exchange]:
        runtime = Runtime(Settings(), UpstreamPool(Settings(), proxies={}), ExtensionManager([]))
        records: list[Exchange] = []

        async def record(ex: Exchange) -> None:
            await trio.lowlevel.checkpoint()  # a checkpoint inside finalisation
            records.append(ex)

        runtime.finalisers.append(record)
        ex = Exchange(method="POST", path="/v1/messages", provider="anthropic")
        for step in steps:
            drive(ex.life, step)
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(runtime.finalise, ex)
        await runtime.finalise(ex)
        assert ex.finalised.is_set()
        return records

    records = trio.run(main)
    assert len(records) == 1 and records[0].end_reason is not None


def test_request_ids_are_unique_and_sort_by_creation() -> None:
    """The ledger's key: never repeated, and later ids sort after earlier ones (the store's
    primary-key index is appended to instead of written all over)."""
    import time

    from trioproxy.exchange import new_request_id

    first = [new_request_id() for _ in range(2000)]
    time.sleep(0.002)
    later = new_request_id()
    assert len(set(first)) == len(first)
    assert all(re.fullmatch(r"tp_[0-9a-f]{31}", i) for i in [*first, later])
    assert later > max(first)
