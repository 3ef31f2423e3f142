"""An idle Responses WebSocket (Codex keeps one open per session, between turns) holds no
leftovers of the turn it finished: not the finished response's exchange (its parser, latency
tracker and usage), not the last upstream event decoded, and not the ``response.create`` frame
(40 KB to several MB: an agent's whole context)."""

from __future__ import annotations

import gc

import trio

from trioproxy.exchange import Exchange

from .ws_proxy import connect, create, start_pair, turn


def alive(kind: type, test) -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kind) and test(o)]


async def test_an_idle_socket_keeps_nothing_of_its_finished_response(
    nursery: trio.Nursery,
) -> None:
    _fake, proxy = await start_pair(nursery)
    with trio.fail_after(20):
        async with connect(proxy) as ws:
            events = await turn(ws, create())
            assert events[-1]["type"] == "response.completed"
            (ex, _), = await proxy.wait_records(1)
            rid = ex.request_id
            del events, ex
            proxy.records.clear()  # the test's own capture
            await trio.sleep(0.1)  # the socket idles between turns
            exchanges = alive(Exchange, lambda o: o.request_id == rid)
            completed = alive(dict, lambda o: o.get("type") == "response.completed")
            await ws.send_message(create())  # the socket still works afterwards
            assert (await ws.get_message()) is not None
    assert exchanges == []
    assert completed == []
