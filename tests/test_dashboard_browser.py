"""The usage page in a real browser (Debian's headless Chromium driven by Playwright), after real
traffic through the proxy; and who may read its data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.accounting.locations import open_store
from trioproxy.testing import FakeUpstream, anthropic_json, openai_chat_sse

from .conftest import ON_CI, proxy_settings, start_proxy

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(os.environ.get("TRIOPROXY_SCREENSHOT_DIR", "/tmp")) / "trioproxy-usage-page.png"
needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not ON_CI,
    reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")

async def traffic(proxy_url: str, upstream: FakeUpstream) -> None:
    upstream.enqueue(anthropic_json(input_tokens=1000, output_tokens=200))
    upstream.enqueue(anthropic_json(input_tokens=3000, output_tokens=100))
    upstream.enqueue(openai_chat_sse(["Hel", "lo"], include_usage=True, prompt_tokens=500,
                                     completion_tokens=50, gaps=0.01))
    async with httpx.AsyncClient() as client:
        for _ in range(2):
            resp = await client.post(proxy_url + "/v1/messages", headers={"x-api-key": "sk-a"},
                                     json={"model": "claude-sonnet-4-5", "max_tokens": 9,
                                           "messages": [{"role": "user", "content": "hi"}]})
            assert resp.status_code == 200
        resp = await client.post(proxy_url + "/v1/chat/completions",
                                 headers={"authorization": "Bearer sk-o"},
                                 json={"model": "gpt-4o-mini", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 200
        resp = await client.post(proxy_url + "/v1/nowhere", json={})
        assert resp.status_code == 404


def browse(url: str, token: str | None) -> dict:
    """In a worker thread: open the page (log in first when ``token``), read what it shows,
    on a desktop and on a phone-sized screen."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            out: dict = {}
            for name, viewport in (("desktop", {"width": 1200, "height": 900}),
                                   ("phone", {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                if token is not None:
                    page.wait_for_selector("#login:not([hidden])")
                    page.fill("input[name=token]", token)
                    page.click("#login button")
                page.wait_for_selector("#content:not([hidden])")
                assert page.is_hidden("#login")
                rows = {t: page.eval_on_selector_all(
                    f"#{t} tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
                    for t in ("by-model", "by-day", "recent", "latency")}
                out[name] = {
                    "cost": page.text_content("#total-cost"),
                    "requests": page.text_content("#total-requests"),
                    "input": page.text_content("#total-input"),
                    "output": page.text_content("#total-output"),
                    "rows": rows,
                    "overflow": page.evaluate(
                        "document.documentElement.scrollWidth > window.innerWidth"),
                }
                if name == "desktop":
                    # it refreshes itself: wait for a second load
                    page.wait_for_selector("body[data-loaded='2']", state="attached",
                                           timeout=20000)
                page.screenshot(path=str(SCREENSHOT) if name == "desktop"
                                else str(SCREENSHOT.with_name(SCREENSHOT.stem + "-phone.png")),
                                full_page=True)
                page.close()
            return out
        finally:
            browser.close()


def stored_cost(db: Path) -> float:
    store = open_store(str(db))
    try:
        return sum(g["cost_usd"] or 0 for g in store.aggregate("model"))
    finally:
        store.close()


@needs_browser
async def test_the_usage_page_shows_spend_tokens_and_last_requests(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    db = tmp_path / "u.db"
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(db), admin_token="adm-secret"))
    with trio.fail_after(90):
        await traffic(proxy.url, upstream)
        await proxy.wait_exchanges(4)
        assert await proxy.app.runtime.writer.flush(10)
        shown = await trio.to_thread.run_sync(
            browse, proxy.url + "/_trioproxy/?refresh=2", "adm-secret")
    cost = stored_cost(db)
    assert cost > 0
    for view in shown.values():
        assert float(view["cost"].removeprefix("$")) == pytest.approx(cost, abs=5e-5)
        assert view["requests"] == "4"
        assert view["input"] == "4,500" and view["output"] == "350"
        by_model = {r[0]: r for r in view["rows"]["by-model"]}
        assert by_model["claude-sonnet-4-5-20250929"][1:4] == ["2", "4,000", "300"]
        assert by_model["gpt-4o-mini-2024-07-18"][1:4] == ["1", "500", "50"]
        assert [r[1] for r in view["rows"]["by-day"]] == ["4"]
        recent = view["rows"]["recent"]
        assert len(recent) == 4
        refused = [r for r in recent if (r[3], r[4]) == ("404", "rejected")]
        assert len(refused) == 1 and refused[0][7] == "–"  # free by nature, not "unpriced"
        assert [(r[3], r[4]) for r in recent].count(("200", "complete")) == 3
        assert not view["overflow"]  # readable on a phone: no sideways scrolling of the page
    assert SCREENSHOT.exists()
    await proxy.stop()


@needs_browser
async def test_the_usage_page_shows_latency_percentiles_by_model(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(90):
        await traffic(proxy.url, upstream)
        await proxy.wait_exchanges(4)
        assert await proxy.app.runtime.writer.flush(10)
        shown = await trio.to_thread.run_sync(browse, proxy.url + "/_trioproxy/", None)
    latency = {r[0]: r for r in shown["desktop"]["rows"]["latency"]}
    chat = latency["gpt-4o-mini-2024-07-18"]
    assert chat[1] == "1" and chat[2] != "–"  # one streamed request with a TTFT p50
    await proxy.stop()


async def test_usage_data_needs_the_admin_token_and_never_shows_it(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db"), admin_token="adm-2"))
    api = proxy.url + "/_trioproxy/api/usage"
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            assert (await client.get(api)).status_code == 401
            assert (await client.get(api, headers={"x-trioproxy-admin-token": "no"})
                    ).status_code == 401
            ok = await client.get(api, headers={"x-trioproxy-admin-token": "adm-2"})
            assert ok.status_code == 200 and ok.json()["by_model"] == []
            bad = await client.post(proxy.url + "/_trioproxy/login", data={"token": "nope"})
            assert bad.status_code == 303 and "set-cookie" not in bad.headers
            login = await client.post(proxy.url + "/_trioproxy/login", data={"token": "adm-2"})
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert "adm-2" not in cookie and "HttpOnly" in cookie
            assert (await client.get(api)).status_code == 200  # the cookie is enough
    await proxy.stop()


async def test_without_an_admin_token_usage_data_is_for_loopback_clients_only(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    from trioproxy.endpoints.dashboard import _loopback

    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(20):
        async with httpx.AsyncClient() as client:
            resp = await client.get(proxy.url + "/_trioproxy/api/usage?days=1")
    assert resp.status_code == 200 and json.loads(resp.text)["days"] == 1
    assert not _loopback({"client": ("192.0.2.7", 5555)})
    assert _loopback({"client": ("::1", 5555)})
    await proxy.stop()
