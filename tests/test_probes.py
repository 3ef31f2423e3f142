"""Probes are not traffic: a load balancer's health and readiness checks (every 500 ms per
instance) leave no access line and no request metric, unless asked for."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
import trio

from trioproxy.testing import FakeUpstream

from .conftest import proxy_settings, start_proxy
from .test_metrics import samples, scrape, value

PROBES = ["/_trioproxy/healthz", "/_trioproxy/readyz", "/health"]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def access_paths(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.access["path"] for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "trioproxy.access"]


async def probe_then_proxy(url: str, probes: int = 10) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(probes):
            for path in PROBES:
                assert (await client.get(url + path)).status_code == 200
                assert (await client.head(url + path)).status_code == 200
        resp = await client.post(url + "/v1/chat/completions",
                                 headers={"authorization": "Bearer sk-test"}, json=CHAT)
        assert resp.status_code == 200


async def test_probes_write_no_access_line(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    with trio.fail_after(20):
        await probe_then_proxy(proxy.url)
        await proxy.wait_exchanges(1)
    assert access_paths(caplog) == ["/v1/chat/completions"]  # the proxied request only
    await proxy.stop()


async def test_probe_access_lines_come_back_with_log_probes(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy = await start_proxy(nursery, proxy_settings(upstream, log_probes=True))
    with trio.fail_after(20):
        await probe_then_proxy(proxy.url, probes=2)
        await proxy.wait_exchanges(1)
    each_round = [p for p in PROBES for _ in ("GET", "HEAD")]
    assert access_paths(caplog) == [*each_round * 2, "/v1/chat/completions"]
    await proxy.stop()


async def test_a_failing_readiness_probe_is_still_not_a_request(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A draining instance answers its probes 503 many times a second: not logged either."""
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    proxy.app.runtime.drain_state.started = trio.current_time()  # what SIGTERM starts (the
    # drain itself is tested elsewhere): readiness fails from then on
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            for _ in range(5):
                resp = await client.get(proxy.url + "/_trioproxy/readyz")
                assert (resp.status_code, resp.json()["status"]) == (503, "draining")
    assert access_paths(caplog) == []
    await proxy.stop()


async def test_probes_are_not_counted_as_requests_in_the_metrics(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    with trio.fail_after(20):
        await probe_then_proxy(proxy.url)
        async with httpx.AsyncClient() as client:
            text = await scrape(client, proxy.url)
    assert value(text, "trioproxy_requests_total") == 1  # the proxied request, not 60 probes
    assert not [s for s in samples(text) if "trioproxy" in json.dumps(s[1])]  # no own labels
    assert value(text, "trioproxy_streams_in_flight") == 0
    await proxy.stop()
