"""A minimal HTTP/2 (h2c prior knowledge) client on the `h2` library, for trailer tests."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import trio


@dataclass
class H2Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] | None = None
    ended: bool = False  # END_STREAM seen
    reset: bool = False  # RST_STREAM or connection lost before END_STREAM


async def h2_request(
    port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"",
    *, ssl_context: ssl.SSLContext | None = None,
) -> H2Response:
    """One request over h2c prior knowledge, or over TLS with ALPN h2 given ``ssl_context``."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ssl_context is not None:
        ssl_context.set_alpn_protocols(["h2"])
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    scheme = "https" if ssl_context is not None else "http"
    hs = [(":method", method), (":path", path), (":scheme", scheme), (":authority", "proxy.test")]
    hs += [(k.lower(), v) for k, v in headers]
    if body:
        hs.append(("content-length", str(len(body))))
    conn.send_headers(sid, hs, end_stream=not body)
    if body:
        conn.send_data(sid, body, end_stream=True)
    await stream.send_all(conn.data_to_send())
    resp = H2Response()
    parts: list[bytes] = []
    try:
        while not (resp.ended or resp.reset):
            data = await stream.receive_some(65536)
            if not data:
                resp.reset = True
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    decoded = {_s(k): _s(v) for k, v in event.headers}
                    resp.status = int(decoded.pop(":status"))
                    resp.headers = decoded
                elif isinstance(event, h2.events.DataReceived):
                    parts.append(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, h2.events.TrailersReceived):
                    resp.trailers = {_s(k): _s(v) for k, v in event.headers}
                elif isinstance(event, h2.events.StreamEnded):
                    resp.ended = True
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    resp.reset = True
            await stream.send_all(conn.data_to_send())
    finally:
        await stream.aclose()
    resp.body = b"".join(parts)
    return resp


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
