"""Pure pieces: routing table, header policy, settings, error shapes."""

from __future__ import annotations

import json

import h11
import pytest

from trioproxy.config import ConfigError, Settings, UpstreamURL
from trioproxy.errors import ClientRequestError, error_body
from trioproxy.protocol.headers import (
    MAX_HEAD_BYTES,
    check_head_size,
    client_response_headers,
    hypercorn_head_limit,
    request_head_size,
    upstream_request_headers,
)
from trioproxy.protocol.routing import provider_hint, remove_dot_segments, resolve

ANTHROPIC_AUTH = [(b"x-api-key", b"sk-ant-test"), (b"anthropic-version", b"2023-06-01")]
OPENAI_AUTH = [(b"authorization", b"Bearer sk-test")]


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("POST", b"/v1/messages", [], ("anthropic", "anthropic.messages", b"/v1/messages")),
        ("POST", b"/v1/messages/count_tokens", [], ("anthropic", "anthropic.count_tokens", None)),
        ("GET", b"/v1/messages/batches/msgbatch_1/results", [], ("anthropic", "anthropic.batches", None)),
        ("POST", b"/v1/chat/completions", ANTHROPIC_AUTH, ("openai", "openai.chat", None)),
        ("POST", b"/v1/responses", [], ("openai", "openai.responses", None)),
        ("GET", b"/v1/responses/resp_1/input_items", [], ("openai", "openai.responses.other", None)),
        ("GET", b"/v1/models", ANTHROPIC_AUTH, ("anthropic", "anthropic.other", b"/v1/models")),
        ("GET", b"/v1/models", OPENAI_AUTH, ("openai", "openai.other", b"/v1/models")),
        ("POST", b"/anthropic/v1/files", OPENAI_AUTH, ("anthropic", "anthropic.other", b"/v1/files")),
        ("POST", b"/openai/v1/embeddings", ANTHROPIC_AUTH, ("openai", "openai.other", b"/v1/embeddings")),
        ("POST", b"/openai/v1/chat/completions", [], ("openai", "openai.chat", b"/v1/chat/completions")),
    ],
)
def test_routes(method, path, headers, expected) -> None:
    route = resolve(method, path, headers)
    assert route is not None
    provider, api, upstream_path = expected
    assert (route.provider, route.api) == (provider, api)
    assert route.path == (upstream_path or path)


@pytest.mark.parametrize(
    "path", [b"/", b"/v2/messages", b"/anthropicfoo/v1/messages", b"/v1/models", b"/admin"]
)
def test_unroutable_paths_have_no_route(path: bytes) -> None:
    # /v1/models without any auth style is ambiguous: no route rather than a guess.
    assert resolve("GET", path, []) is None


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        (b"/v1/messages", b"/v1/messages"),
        (b"/v1/files/../messages", b"/v1/messages"),
        (b"/v1/./messages", b"/v1/messages"),
        (b"/v1/x/%2e%2E/messages", b"/v1/messages"),
        (b"/v1/messages/..", b"/v1/"),  # RFC 3986 5.2.4: the trailing slash stays
        (b"/v1/messages/.", b"/v1/messages/"),
        (b"/v1/a%2fb/../c%20d", b"/v1/c%20d"),  # other percent-encoding untouched
        (b"/v1/.../x", b"/v1/.../x"),  # three dots are a name, not a dot-segment
        (b"/v1/a%2fb", b"/v1/a%2fb"),  # an encoded slash without dots is forwarded as-is
    ],
)
def test_remove_dot_segments(path: bytes, clean: bytes) -> None:
    assert remove_dot_segments(path) == clean


@pytest.mark.parametrize(
    "path", [b"/..", b"/v1/../..", b"/%2e%2e/x", b"/v1/..%2f..%2fx", b"/v1/..%5cx",
             b"/v1\\..\\..", b"/v1/..;/x", b"/v1/a/.;x/.."],
)
def test_dot_segments_that_climb_out_or_hide_behind_other_separators_are_refused(
    path: bytes,
) -> None:
    with pytest.raises(ClientRequestError) as info:
        remove_dot_segments(path)
    assert (info.value.status, info.value.code) == (400, "invalid_path")


def test_routes_are_chosen_on_the_normalised_path_and_prefix_escapes_are_refused() -> None:
    route = resolve("POST", b"/./anthropic/v1/files/../messages", [])
    assert route is not None and (route.api, route.path) == ("anthropic.messages", b"/v1/messages")
    with pytest.raises(ClientRequestError, match="/anthropic route"):
        resolve("POST", b"/anthropic/../openai/v1/chat/completions", [])
    assert resolve("OPTIONS", b"*", []) is None


def _scope(target: bytes, headers: list[tuple[bytes, bytes]]) -> dict:
    path, _, query = target.partition(b"?")
    return {"method": "POST", "path": path.decode(), "raw_path": path, "query_string": query,
            "headers": headers}


@pytest.mark.parametrize("target", [b"/v1/messages", b"/v1/messages?beta=true&x=%2F"])
def test_request_head_size_is_the_size_of_the_head_on_the_wire(target: bytes) -> None:
    headers = [(b"host", b"proxy.test"), (b"x-api-key", b"sk-ant-x"), (b"x-pad", b"p" * 999)]
    wire = h11.Connection(h11.CLIENT).send(h11.Request(method="POST", target=target,
                                                        headers=headers))
    assert request_head_size(_scope(target, headers)) == len(wire)


def test_head_size_limit_is_inclusive_and_hypercorn_gets_room_above_it() -> None:
    headers = [(b"host", b"x")]
    base = request_head_size(_scope(b"/v1/messages", headers))
    pad = MAX_HEAD_BYTES - base - len(b"x-pad: \r\n")
    check_head_size(_scope(b"/v1/messages", [*headers, (b"x-pad", b"p" * pad)]))
    with pytest.raises(ClientRequestError) as info:
        check_head_size(_scope(b"/v1/messages", [*headers, (b"x-pad", b"p" * (pad + 1))]))
    assert info.value.status == 431
    assert hypercorn_head_limit(MAX_HEAD_BYTES) >= MAX_HEAD_BYTES + 64 * 1024


def test_error_format_follows_the_caller() -> None:
    assert provider_hint(b"/nope", ANTHROPIC_AUTH) == "anthropic"
    assert provider_hint(b"/nope", OPENAI_AUTH) == "openai"
    assert provider_hint(b"/anthropic/x", OPENAI_AUTH) == "anthropic"


def test_request_headers_drop_hop_by_hop_control_and_host() -> None:
    inbound = [
        (b"host", b"evil.example"),
        (b"connection", b"keep-alive, x-secret-hop"),
        (b"keep-alive", b"timeout=5"),
        (b"x-secret-hop", b"1"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"x-trioproxy-bypass", b"true"),
        (b"x-trioproxy-request-id", b"abc"),
        (b"content-length", b"999"),
        (b"x-api-key", b"sk-ant-test"),
        (b"anthropic-beta", b"a,b"),
        (b"anthropic-beta", b"c"),
        (b"content-encoding", b"gzip"),
    ]
    out = upstream_request_headers(inbound, b"api.anthropic.com", 12)
    assert out[0] == (b"host", b"api.anthropic.com")
    names = [k for k, _ in out]
    assert names.count(b"host") == 1
    for dropped in (b"connection", b"keep-alive", b"x-secret-hop", b"te", b"transfer-encoding",
                    b"x-trioproxy-bypass", b"x-trioproxy-request-id"):
        assert dropped not in names
    assert (b"content-length", b"12") in out and names.count(b"content-length") == 1
    # repeated end-to-end headers keep order and multiplicity; encodings pass as-is
    assert [v for k, v in out if k == b"anthropic-beta"] == [b"a,b", b"c"]
    assert (b"content-encoding", b"gzip") in out


def test_response_headers_keep_ids_and_rate_limits() -> None:
    inbound = [
        (b"date", b"x"), (b"server", b"cloudflare"), (b"connection", b"keep-alive"),
        (b"keep-alive", b"timeout=30"), (b"transfer-encoding", b"chunked"),
        (b"request-id", b"req_1"), (b"anthropic-ratelimit-requests-remaining", b"49"),
        (b"x-ratelimit-limit-tokens", b"1000"), (b"retry-after", b"3"),
        (b"openai-processing-ms", b"12"), (b"x-codex-primary-used-percent", b"3"),
        (b"x-request-id", b"req_2"), (b"anthropic-request-id", b"req_3"),
    ]
    out = dict(client_response_headers(inbound))
    assert set(out) == {
        b"request-id", b"anthropic-ratelimit-requests-remaining", b"x-ratelimit-limit-tokens",
        b"retry-after", b"openai-processing-ms", b"x-codex-primary-used-percent",
        b"x-request-id", b"anthropic-request-id",
    }


def test_upstream_url_prefix_and_host_header() -> None:
    u = UpstreamURL.parse("http://127.0.0.1:9000/anthropic/")
    assert (u.scheme, u.host, u.port, u.prefix) == ("http", "127.0.0.1", 9000, b"/anthropic")
    assert u.host_header == b"127.0.0.1:9000"
    assert UpstreamURL.parse("https://api.anthropic.com").host_header == b"api.anthropic.com"


@pytest.mark.parametrize("bad", ["ftp://x", "api.openai.com", "http://x/?q=1", "http://x:99999"])
def test_bad_base_url_is_a_clear_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="TRIOPROXY_OPENAI_BASE_URL"):
        Settings(openai_base_url=bad)


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "TRIOPROXY_READ_TIMEOUT": "120",
            "TRIOPROXY_SSE_KEEPALIVE": "15",
            "TRIOPROXY_REQUEST_ID_HEADER": "X-Api-Request-Log-Id",
            "TRIOPROXY_MAX_BODY_BYTES": "1024",
        }
    )
    assert s.read_timeout == 120.0 and s.sse_keepalive == 15.0
    assert s.request_id_header == "x-api-request-log-id" and s.max_body_bytes == 1024
    assert Settings.from_env({"TRIOPROXY_SSE_KEEPALIVE": "off"}).sse_keepalive is None
    with pytest.raises(ConfigError, match="TRIOPROXY_READ_TIMEOUT"):
        Settings.from_env({"TRIOPROXY_READ_TIMEOUT": "soon"})


def test_error_bodies_have_the_provider_shape() -> None:
    a = json.loads(error_body("anthropic", 504, "slow"))
    assert a == {"type": "error", "error": {"type": "timeout_error", "message": "slow"}}
    o = json.loads(error_body("openai", 502, "down", code="upstream_connect_error"))
    assert o == {"error": {"message": "down", "type": "server_error", "param": None,
                           "code": "upstream_connect_error"}}
