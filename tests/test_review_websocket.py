"""Review: the Responses WebSocket relay when the upstream closes while a payload hook is still
looking at the client's next ``response.create``."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import trio
import trio.lowlevel
import trio_websocket as tws
from hypercorn.config import Config
from hypercorn.trio import serve

from trioproxy import Settings, TrioProxy
from trioproxy.exchange import Exchange
from trioproxy.extensions import Extension
from trioproxy.testing.websocket import Turn

from .test_websocket import BIG, Proxy, connect, create, start_fake


class SlowHook(Extension):
    """Holds the second create in its payload hook until that create's record is finalised."""

    name = "slow"

    def __init__(self) -> None:
        self.seen = 0
        self.gate = trio.Event()

    async def on_payload(self, ctx: Any, payload: Any, headers: Any) -> None:
        self.seen += 1
        if self.seen == 2:
            await self.gate.wait()

    async def on_complete(self, ctx: Any, record: Any) -> None:
        if (record.extra or {}).get("response_index") == 2:
            self.gate.set()  # the hook returns while the socket is still being finalised
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()


async def test_upstream_close_during_a_payload_hook_leaves_one_record_and_no_crash(
    nursery: trio.Nursery,
) -> None:
    hook = SlowHook()
    app = TrioProxy(Settings(openai_base_url="http://x", accounting=False),
                    configure_logging=False, extensions=[hook])
    crashes: list[BaseException] = []

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        except BaseException as exc:
            crashes.append(exc)
            raise

    with trio.fail_after(10):
        fake = await start_fake(nursery, turns=[Turn(end="close", close_code=1000,
                                                     before_created=0.5)])
        app._settings = Settings(openai_base_url=fake.base_url, accounting=False)
        config = Config()
        config.bind, config.accesslog, config.errorlog = ["127.0.0.1:0"], None, None
        config.websocket_max_message_size = BIG
        binds = await nursery.start(lambda task_status: serve(
            watched, config, shutdown_trigger=trio.sleep_forever, task_status=task_status))
        proxy = Proxy(app, int(binds[0].rsplit(":", 1)[1]), [])

        async def capture(ex: Exchange) -> None:
            proxy.records.append((ex, None))

        app.runtime.finalisers.append(capture)
        async with connect(proxy) as ws:
            await ws.send_message(create())
            await ws.send_message(create())
            with contextlib.suppress(tws.ConnectionClosed):  # the upstream's close reaches us
                while True:
                    json.loads(await ws.get_message())
        records = await proxy.wait_records(2)
        await trio.sleep(0.2)
    assert crashes == []
    assert len(fake.last.creates) == 1  # the held create never went to the closed upstream
    assert sorted(ex.response_index for ex, _ in records) == [1, 2]
