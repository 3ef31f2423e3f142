"""Who may read the proxy's own data pages (the usage page's data, /metrics): a web page on
another site must not read them from the developer's browser (DNS rebinding, cross-origin
requests), and the page's query parameters are checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import trio

from trioproxy.config import ConfigError
from trioproxy.testing import FakeUpstream

from .conftest import proxy_settings, start_proxy

API = "/_trioproxy/api/usage"


async def get(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url, headers=headers)


async def test_usage_data_refuses_a_host_name_that_is_not_the_proxys_own(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # A rebinding attack: the browser talks to 127.0.0.1 but names the attacker's site.
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    port = proxy.port
    with trio.fail_after(20):
        refused = await get(proxy.url + API, host=f"rebind.attacker.example:{port}")
        assert refused.status_code == 403
        assert "host" in refused.json()["error"]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}",
                     f"127.9.9.9:{port}", f"LOCALHOST.:{port}"):
            assert (await get(proxy.url + API, host=host)).status_code == 200, host
    await proxy.stop()


async def test_usage_data_accepts_the_names_of_the_allowed_hosts_setting(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db"),
        allowed_hosts="devbox.lan, Proxy.Internal"))
    with trio.fail_after(20):
        assert (await get(proxy.url + API, host="devbox.lan:8080")).status_code == 200
        assert (await get(proxy.url + API, host="proxy.internal")).status_code == 200
        assert (await get(proxy.url + API, host="other.lan")).status_code == 403
    await proxy.stop()


async def test_usage_data_refuses_a_foreign_origin(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db"), admin_token="adm"))
    token = {"x-trioproxy-admin-token": "adm"}
    with trio.fail_after(20):
        for origin in ("http://evil.example", "null", f"http://localhost:{proxy.port + 1}"):
            resp = await get(proxy.url + API, origin=origin, **token)
            assert resp.status_code == 403, origin
            assert "origin" in resp.json()["error"]
        same = await get(proxy.url + API, origin=proxy.url, **token)
        assert same.status_code == 200
    await proxy.stop()


async def test_the_usage_page_itself_holds_no_data_and_stays_reachable(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(20):
        page = await get(proxy.url + "/_trioproxy/", host="rebind.attacker.example")
        assert page.status_code == 200 and "<html" in page.text.lower()
    await proxy.stop()


async def test_metrics_refuse_a_foreign_host_and_health_stays_open(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(upstream))
    with trio.fail_after(20):
        assert (await get(proxy.url + "/metrics", host="rebind.attacker.example")
                ).status_code == 403
        assert (await get(proxy.url + "/metrics", origin="http://evil.example")
                ).status_code == 403
        scraped = await get(proxy.url + "/metrics")  # a scraper on loopback, no token
        assert scraped.status_code == 200 and "trioproxy_requests" in scraped.text
        for path in ("/_trioproxy/healthz", "/_trioproxy/readyz"):
            assert (await get(proxy.url + path, host="rebind.attacker.example")
                    ).status_code == 200
    await proxy.stop()


async def test_metrics_can_require_the_admin_token(
    nursery: trio.Nursery, upstream: FakeUpstream
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, admin_token="adm-m", metrics_require_token=True))
    url = proxy.url + "/metrics"
    with trio.fail_after(20):
        assert (await get(url)).status_code == 401
        assert (await get(url, authorization="Bearer wrong")).status_code == 401
        # what Prometheus sends with `authorization: {credentials: ...}`
        assert (await get(url, authorization="Bearer adm-m")).status_code == 200
        assert (await get(url, **{"x-trioproxy-admin-token": "adm-m"})).status_code == 200
        # the token opens it from any host name (a scraper on another host)
        assert (await get(url, host="trioproxy.svc.cluster.local",
                          authorization="Bearer adm-m")).status_code == 200
        assert (await get(proxy.url + "/_trioproxy/readyz")).status_code == 200
    await proxy.stop()


def test_metrics_require_token_needs_an_admin_token() -> None:
    from trioproxy import Settings

    with pytest.raises(ConfigError, match="admin_token"):
        Settings(metrics_require_token=True)


@pytest.mark.parametrize(("host", "server", "allowed", "ok"), [
    ("127.0.0.1:8080", None, "", True),
    ("[::1]:8080", None, "", True),
    ("[::ffff:127.0.0.1]", None, "", True),
    ("localhost", None, "", True),
    ("app.localhost:8080", None, "", True),  # browsers resolve *.localhost themselves
    ("10.1.2.3:8080", ("10.1.2.3", 8080), "", True),  # the address the client connected to
    ("[fd00::5]:80", ("fd00::5", 80), "", True),
    ("10.1.2.3:8080", ("10.9.9.9", 8080), "", False),
    ("attacker.example", ("127.0.0.1", 8080), "", False),
    ("attacker.example", None, "*", True),
    ("", None, "", False),
    ("127.0.0.1.attacker.example", None, "", False),
    ("localhost.attacker.example", None, "", False),
    ("proxy.lan:1", None, "proxy.lan", True),
])
def test_host_rule(host: str, server: tuple[str, int] | None, allowed: str, ok: bool) -> None:
    from trioproxy import Settings
    from trioproxy.endpoints.access import host_allowed

    settings = Settings(allowed_hosts=allowed)
    assert host_allowed(host, server, settings) is ok


def test_the_bound_host_is_the_proxys_own_name() -> None:
    from trioproxy import Settings
    from trioproxy.endpoints.access import host_allowed

    assert host_allowed("devbox.lan:8080", None, Settings(host="devbox.lan"))


@pytest.mark.parametrize("days", ["nan", "NaN", "inf", "-inf", "-1", "0", "1e400", "400",
                                  "abc", ""])
async def test_bad_days_get_a_400_in_the_pages_error_shape(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path, days: str
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(20):
        resp = await get(f"{proxy.url}{API}?days={days}")
    assert resp.status_code == 400
    body = json.loads(resp.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert "days" in body["error"]
    await proxy.stop()


async def test_good_days_are_answered(
    nursery: trio.Nursery, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await start_proxy(nursery, proxy_settings(
        upstream, accounting=True, database_url=str(tmp_path / "u.db")))
    with trio.fail_after(20):
        for days in ("1", "7", "30", "365", "366", "0.5"):
            resp = await get(f"{proxy.url}{API}?days={days}")
            assert resp.status_code == 200
            assert math.isclose(resp.json()["days"], float(days))
        assert (await get(proxy.url + API)).json()["days"] == 7  # the default
    await proxy.stop()
