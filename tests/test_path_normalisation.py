"""Dot-segments in the request path, end to end: a path that climbs out of its route (in any
spelling) is a 400 and nothing is forwarded; dot-segments inside the route forward the
normalised path with the query untouched."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from trioproxy.testing import FakeUpstream

from .conftest import ProxyServer, RawClient
from .spawned_server import ANTHROPIC, MESSAGE

ESCAPES = [
    b"/anthropic/../../x",
    b"/anthropic/v1/messages/../../../x",
    b"/anthropic/%2e%2e/%2e%2e/x",
    b"/anthropic/.%2E/x",
    b"/anthropic/../openai/v1/chat/completions",
    b"/anthropic/..%2f..%2fx",
    b"/anthropic/v1/..;/..;/x",
    b"/anthropic\\..\\..\\x",
    b"/v1/messages/../../../x",
]


@pytest.mark.parametrize("path", ESCAPES, ids=lambda p: p.decode())
async def test_path_escaping_its_route_is_a_400_and_nothing_is_forwarded(
    proxy: ProxyServer, raw_client: RawClient, upstream: FakeUpstream, path: bytes
) -> None:
    with trio.fail_after(10):
        resp = await raw_client.request("POST", path + b"?beta=true", ANTHROPIC, b"{}")
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 400
    error = json.loads(resp.body)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []
    assert (ex.status, ex.end_reason) == (400, "rejected")


async def test_percent_encoded_escape_via_httpx_is_refused(
    proxy: ProxyServer, upstream: FakeUpstream
) -> None:
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        with trio.fail_after(10):
            resp = await client.post("/openai/v1/%2e%2e/%2E%2E/admin", json={},
                                     headers={"authorization": "Bearer sk-test"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_path"
    assert upstream.requests == []


@pytest.mark.parametrize("path", [b"/anthropic/v1/files/../messages",
                                  b"/anthropic/v1/x/%2e%2E/./messages", b"/./v1/messages"])
async def test_dot_segments_inside_the_route_forward_the_normalised_path_and_query(
    proxy: ProxyServer, raw_client: RawClient, upstream: FakeUpstream, path: bytes
) -> None:
    query = b"beta=true&next=../%2e%2e/x&a=%2F"
    with trio.fail_after(10):
        resp = await raw_client.request("POST", path + b"?" + query, ANTHROPIC,
                                        json.dumps(MESSAGE).encode())
        (ex,) = await proxy.wait_exchanges(1)
    assert resp.status == 200
    (seen,) = upstream.requests
    assert seen.target == b"/anthropic-upstream/v1/messages?" + query
    assert ex.route is not None and ex.route.api == "anthropic.messages"
