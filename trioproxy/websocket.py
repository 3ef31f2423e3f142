"""The Responses WebSocket relay (not implemented yet: refuses the upgrade)."""

from __future__ import annotations

from typing import Any


async def relay_websocket(runtime: Any, scope: dict, receive: Any, send: Any) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008})
