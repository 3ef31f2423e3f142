"""The usage page's charts: their data aggregated in the database and bounded (both stores), and
the charts themselves drawn by the vendored uPlot in Debian's Chromium after real traffic."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trioproxy.accounting.locations import open_store
from trioproxy.endpoints.dashboard_charts import CDF_POINTS, WATERFALLS, chart_data
from trioproxy.protocol.gapsketch import GapSketch
from trioproxy.testing import FakeUpstream, anthropic_sse, openai_chat_sse

from .conftest import proxy_settings, start_proxy
from .test_dashboard_browser import CHROMIUM, needs_browser
from .test_store import T0, database_url, make_record

SHOT_DIR = Path(os.environ.get("TRIOPROXY_SCREENSHOT_DIR", "/tmp"))
MEASURED = {"status": 200, "end_reason": "complete"}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    for url in database_url(request.param, tmp_path):
        s = open_store(url)
        s.migrate()
        try:
            yield s
        finally:
            s.close()


def test_ttft_distribution_is_a_bounded_cdf_from_the_database(store: Any) -> None:
    store.insert_many(
        [make_record(i, ttft_ms=float(i), e2e_ms=2000.0, **MEASURED) for i in range(1, 1001)]
        + [make_record(2000 + i, model="small", ttft_ms=10.0 * i, e2e_ms=900.0, **MEASURED)
           for i in range(1, 31)]
        # not a measured response: an upstream error
        + [make_record(3000, model="small", ttft_ms=99999.0, e2e_ms=1.0, status=500,
                       end_reason="complete")])
    cdf = chart_data(store, T0 - 1, T0 + 4000)["ttft_cdf"]
    big = cdf["claude-sonnet-4-5"]
    assert len(big) == CDF_POINTS  # 1,000 requests, 100 points
    assert big[:3] == [[10.0, 0.01], [20.0, 0.02], [30.0, 0.03]] and big[-1] == [1000.0, 1.0]
    assert cdf["small"] == [[10.0 * i, round(i / 30, 4)] for i in range(1, 31)]


def test_ttft_over_time_gives_p50_and_p90_per_bucket(store: Any) -> None:
    # two hours, 20 requests each: TTFT 1..20 ms in the first, 101..120 in the second
    store.insert_many([make_record(h * 100 + i, started_at=T0 + h * 3600 + i,
                                   ttft_ms=100.0 * h + i + 1, e2e_ms=500.0, **MEASURED)
                       for h in (0, 1) for i in range(20)])
    series = chart_data(store, T0, T0 + 86400)["ttft_series"]
    assert series["step"] == 900  # a day in at most 96 buckets
    assert series["models"]["claude-sonnet-4-5"] == [
        [T0, 10.0, 18.0, 20], [T0 + 3600, 110.0, 118.0, 20]]


def test_itl_distribution_pools_every_gap_of_the_sketches(store: Any) -> None:
    fast, slow = [10.0] * 30, [40.0] * 10
    store.insert_many([
        make_record(1, ttft_ms=5.0, e2e_ms=400.0, itl_sketch=GapSketch.from_ms(fast).encode(),
                    **MEASURED),
        make_record(2, ttft_ms=5.0, e2e_ms=400.0, itl_sketch=GapSketch.from_ms(slow).encode(),
                    **MEASURED)])
    (x1, f1), (x2, f2) = chart_data(store, T0 - 1, T0 + 10)["itl_cdf"]["claude-sonnet-4-5"]
    assert (x1, f1) == (pytest.approx(10.0, rel=0.01), 0.75)  # 30 of the 40 gaps
    assert (x2, f2) == (pytest.approx(40.0, rel=0.01), 1.0)


def test_waterfalls_are_the_newest_requests_timestamps(store: Any) -> None:
    store.insert_many([make_record(i, ttft_ms=300.0 + i, e2e_ms=900.0 + i, proxy_request_ms=0.5,
                                   upstream_head_ms=200.0, last_token_ms=850.0 + i,
                                   proxy_relay_ms=0.02, **MEASURED) for i in range(20)])
    falls = chart_data(store, T0 - 1, T0 + 100)["waterfalls"]
    assert len(falls) == WATERFALLS
    newest = falls[0]
    assert newest["started_at"] == T0 + 19
    assert {k: newest[k] for k in ("written_ms", "head_ms", "first_token_ms", "last_token_ms",
                                   "last_byte_ms", "proxy_ms", "proxy_relay_ms")} == {
        "written_ms": 0.5, "head_ms": 200.5, "first_token_ms": 319.0, "last_token_ms": 869.0,
        "last_byte_ms": 919.0, "proxy_ms": 0.5, "proxy_relay_ms": 0.02}


# -- in the browser ------------------------------------------------------------------------------

CHARTS = ("spend", "ttft", "itl", "ttft-time", "waterfall")


def look(url: str) -> dict:
    """In a worker thread: open the page on a desktop and a phone, read what each chart holds
    and whether it painted anything, and save screenshots."""
    from playwright.sync_api import sync_playwright

    probe = """names => Object.fromEntries(names.map(n => {
        const u = window.trioproxyCharts[n];
        if (!u) return [n, null];
        const c = u.ctx.canvas, px = u.ctx.getImageData(0, 0, c.width, c.height).data;
        let inked = 0;
        for (let i = 3; i < px.length; i += 4) if (px[i] > 0) inked++;
        return [n, {series: u.series.slice(1).map(s => s.label), data: u.data,
                    width: c.getBoundingClientRect().width, inked}];
    }))"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            out: dict = {}
            for name, viewport in (("desktop", {"width": 1200, "height": 900}),
                                   ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                errors: list[str] = []
                page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
                page.on("console", lambda m, errors=errors: m.type == "error" and errors.append(
                    m.text))
                page.goto(url)
                page.wait_for_selector("#content:not([hidden])")
                page.wait_for_selector("body[data-charts]", state="attached")
                out[name] = {"charts": page.evaluate(probe, list(CHARTS)), "errors": errors,
                             "note": page.text_content("#waterfall-note"),
                             "overflow": page.evaluate(
                                 "document.documentElement.scrollWidth > window.innerWidth")}
                page.screenshot(path=str(SHOT_DIR / f"trioproxy-charts-{name}.png"),
                                full_page=True)
                page.close()
            return out
        finally:
            browser.close()


async def charted_traffic(proxy_url: str, upstream: FakeUpstream) -> None:
    """Streams of two models with known pacing, and one request that never reaches a model."""
    async with httpx.AsyncClient() as client:
        for i in range(3):
            upstream.enqueue(anthropic_sse(["a", "b", "c", "d"], output_tokens=4,
                                           gaps=[0.12, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]))
            resp = await client.post(proxy_url + "/v1/messages", headers={"x-api-key": "sk-a"},
                                     json={"model": "claude-sonnet-4-5", "max_tokens": 9,
                                           "stream": True, "messages": [{"role": "user",
                                                                         "content": f"hi {i}"}]})
            assert resp.status_code == 200
            upstream.enqueue(openai_chat_sse(["x", "y", "z"], include_usage=True,
                                             completion_tokens=3, gaps=0.03))
            resp = await client.post(proxy_url + "/v1/chat/completions",
                                     headers={"authorization": "Bearer sk-o"},
                                     json={"model": "gpt-4o-mini", "stream": True,
                                           "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200


@needs_browser
async def test_the_page_draws_distributions_ttft_over_time_spend_and_waterfalls(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(120):
        await charted_traffic(proxy.url, upstream)
        await proxy.wait_exchanges(6)
        assert await proxy.app.runtime.writer.flush(10)
        async with httpx.AsyncClient() as client:
            data = (await client.get(proxy.url + "/_trioproxy/api/usage")).json()
            vendored = await client.get(proxy.url + "/_trioproxy/uPlot.iife.min.js")
            licence = await client.get(proxy.url + "/_trioproxy/uPlot.LICENSE.txt")
        shown = await trio.to_thread.run_sync(look, proxy.url + "/_trioproxy/")
    assert vendored.status_code == 200 and b"uPlot" in vendored.content[:200]
    assert "MIT License" in licence.text
    models = ["claude-sonnet-4-5-20250929", "gpt-4o-mini-2024-07-18"]
    for view in shown.values():
        assert view["errors"] == []  # not even the inline favicon is refused by the page's CSP
        assert not view["overflow"]
        charts = view["charts"]
        for name in CHARTS:
            assert charts[name]["inked"] > 500, name  # something was painted
            assert charts[name]["width"] <= (1200 if view is shown["desktop"] else 390)
        assert sorted(charts["ttft"]["series"]) == models
        assert sorted(charts["itl"]["series"]) == models
        assert sorted(charts["ttft-time"]["series"]) == sorted(
            f"{m} {q}" for m in models for q in ("p50", "p90"))
        assert charts["spend"]["data"][1] == [pytest.approx(data["by_day"][0]["cost_usd"])]
        falls = charts["waterfall"]
        assert falls["series"][0] == "written upstream (the proxy's time)"
        assert len(falls["data"][0]) == 6  # the six streams, newest first
        newest = data["charts"]["waterfalls"][0]
        first_token, last_byte = falls["data"][3][0], falls["data"][5][0]
        assert (first_token, last_byte) == (newest["first_token_ms"], newest["last_byte_ms"])
        assert 0 <= falls["data"][1][0] < first_token < last_byte
        assert "the proxy's own time" in view["note"]
    ttft_points = shown["desktop"]["charts"]["ttft"]["data"]
    assert max(x for x in ttft_points[0] if x) >= 120  # the anthropic streams' paced start
    await proxy.stop()
