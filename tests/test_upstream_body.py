"""Response bodies read off real upstream connections by the pool's own decoder.

A raw scripted upstream (not h11: it can send what a broken or hostile server sends) answers
each request with the bytes the test gives, in the writes the test gives. What a user would
notice: body bytes relayed exactly and at once, trailers kept, a connection reused only when
its last response ended exactly where its framing said, a broken body reported (never relayed
as if complete) and its connection closed.
"""

from __future__ import annotations

import pytest
import trio

from trioproxy import Settings
from trioproxy.config import UpstreamURL
from trioproxy.errors import UpstreamProtocolError
from trioproxy.upstream import UpstreamPool

HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class ScriptedUpstream:
    """Answers the n-th request (on any connection) with ``replies[n]``: a list of writes;
    None among them closes the connection there."""

    def __init__(self, replies: list[list[bytes | None]]) -> None:
        self.replies = replies
        self.connections = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        async with stream:
            while self.replies:
                while b"\r\n\r\n" not in buf:  # the pool's requests here have no body
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                buf = buf.split(b"\r\n\r\n", 1)[1]
                for part in self.replies.pop(0):
                    if part is None:
                        return
                    await stream.send_all(part)
                    await trio.sleep(0.01)


async def _get(pool: UpstreamPool, base: UpstreamURL) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """One GET: the body reads as they came, and the trailers."""
    resp = await pool.send_request(base, b"GET", b"/v1/models", [(b"host", base.host_header)], b"")
    reads = []
    async with resp:
        while (chunk := await resp.receive_chunk()) is not None:
            reads.append(chunk)
    return reads, resp.trailers


@pytest.fixture
async def scripted(nursery: trio.Nursery, request: pytest.FixtureRequest):
    server = ScriptedUpstream(request.param)
    await nursery.start(server.serve)
    pool = UpstreamPool(Settings(accounting=False), proxies={})
    yield server, pool, UpstreamURL.parse(f"http://127.0.0.1:{server.port}")
    await pool.aclose()


@pytest.mark.parametrize("scripted", [[
    [HEAD_CHUNKED + b"7;ext=1\r\ndata: 1", b"\r\n", b"9\r\n\nda", b"ta: 2\n\r\n0\r\nX-Usage: 5\r\n",
     b"\r\n"],
    [b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab", b"c"],
]], indirect=True)
async def test_bodies_come_out_as_they_arrive_and_the_connection_is_reused(scripted) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        first, trailers = await _get(pool, base)
        second, _ = await _get(pool, base)
    assert b"".join(first) == b"data: 1\ndata: 2\n" and len(first) >= 3  # not held for the end
    assert trailers == [(b"x-usage", b"5")]
    assert b"".join(second) == b"abc"
    assert server.connections == 1 and pool.statistics()["reused"] == 1


@pytest.mark.parametrize("scripted", [[
    [HEAD_CHUNKED + b"1\r\na\r\n0\r\n\r\nstray bytes"],
    [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
    [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokSTRAY"],
    [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
]], indirect=True)
async def test_bytes_past_the_framed_end_are_never_read_as_the_next_response(scripted) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        bodies = [b"".join((await _get(pool, base))[0]) for _ in range(4)]
    assert bodies == [b"a", b"ok", b"ok", b"ok"]
    assert server.connections == 3  # a fresh connection after each response with stray bytes


@pytest.mark.parametrize(("scripted", "what"), [
    ([[HEAD_CHUNKED + b"5\r\nhello\r\nzz\r\n"], [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]],
     "invalid chunk size"),
    ([[HEAD_CHUNKED + b"5\r\nhelloXX0\r\n\r\n"], [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]],
     "not followed by CRLF"),
    ([[HEAD_CHUNKED + b"5\r\nhel", None], [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]],
     "without sending complete message body"),
], indirect=["scripted"])
async def test_a_broken_body_is_an_error_and_its_connection_is_not_reused(scripted, what) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        resp = await pool.send_request(base, b"GET", b"/", [(b"host", base.host_header)], b"")
        got = b""
        with pytest.raises(UpstreamProtocolError) as err:
            async with resp:
                while (chunk := await resp.receive_chunk()) is not None:
                    got += chunk
        assert what in err.value.message
        assert got == {"invalid chunk size": b"hello", "not followed by CRLF": b"hello",
                       "without sending complete message body": b"hel"}[what]
        after, _ = await _get(pool, base)
    assert b"".join(after) == b"ok"
    assert server.connections == 2


async def _call(pool: UpstreamPool, base: UpstreamURL, method: bytes) -> tuple[int, bytes]:
    resp = await pool.send_request(base, method, b"/v1/models", [(b"host", base.host_header)], b"")
    body = b""
    async with resp:
        while (chunk := await resp.receive_chunk()) is not None:
            body += chunk
    return resp.status, body


OK_2 = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]


@pytest.mark.parametrize(("scripted", "method", "first", "connections"), [
    # a HEAD answer announces a length but has no body: the connection stays usable
    ([[b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"], OK_2], b"HEAD", (200, b""), 1),
    ([[b"HTTP/1.1 204 No Content\r\n\r\n"], OK_2], b"GET", (204, b""), 1),
    ([[b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"], OK_2], b"GET", (304, b""), 1),
    # informational heads are skipped, the final answer is relayed
    ([[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
       b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"], OK_2], b"GET", (200, b"yes"), 1),
    # no framing: the body runs until the upstream closes, and that connection is done
    ([[b"HTTP/1.0 200 OK\r\n\r\nuntil ", b"close", None], OK_2], b"GET", (200, b"until close"), 2),
    ([[b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 4\r\n\r\nlast"], OK_2], b"GET",
     (200, b"last"), 2),
], indirect=["scripted"])
async def test_bodiless_informational_and_closing_answers(scripted, method, first, connections
                                                          ) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        got = await _call(pool, base, method)
        after = await _call(pool, base, b"GET")
    assert got == first and after == (200, b"ok")
    assert server.connections == connections


@pytest.mark.parametrize("scripted", [[
    [(b"HTTP/1.1 099 X\r\ncontent-length: 45\r\n\r\n"
      b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nforged!")],
    OK_2,
]], indirect=True)
async def test_a_status_under_100_is_an_error_never_skipped_to_a_forged_answer(scripted) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        with pytest.raises(UpstreamProtocolError) as err:
            await _call(pool, base, b"GET")
        after = await _call(pool, base, b"GET")
    assert "invalid status line" in err.value.message
    assert after == (200, b"ok") and server.connections == 2


@pytest.mark.parametrize("scripted", [[
    [(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n"
      b"5\r\nhello\r\n0\r\n\r\n")],
    OK_2,
]], indirect=True)
async def test_chunked_with_a_content_length_loses_the_length_and_its_connection(scripted) -> None:
    server, pool, base = scripted
    with trio.fail_after(10):
        resp = await pool.send_request(base, b"GET", b"/", [(b"host", base.host_header)], b"")
        async with resp:
            body = b""
            while (chunk := await resp.receive_chunk()) is not None:
                body += chunk
        after = await _call(pool, base, b"GET")
    assert body == b"hello"
    assert b"content-length" not in dict(resp.headers)  # never forwarded beside chunked
    assert after == (200, b"ok") and server.connections == 2  # that connection is not reused
