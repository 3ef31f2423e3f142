"""API key extraction, keyed fingerprints (cached, bounded), and the fingerprint secret file."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trioproxy.accounting.keys import extract_api_key, fingerprint, load_or_create_secret
from trioproxy.config import Settings

KEY = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123"


def test_x_api_key_header() -> None:
    assert extract_api_key([(b"x-api-key", KEY.encode())]) == KEY


def test_bearer_token_any_scheme_case() -> None:
    assert extract_api_key([(b"authorization", b"Bearer sk-proj-1234")]) == "sk-proj-1234"
    assert extract_api_key([(b"authorization", b"bearer  sk-proj-1234 ")]) == "sk-proj-1234"


def test_x_api_key_wins_over_authorization() -> None:
    headers = [(b"authorization", b"Bearer other"), (b"x-api-key", KEY.encode())]
    assert extract_api_key(headers) == KEY


def test_openai_bills_the_bearer_token_when_both_headers_are_sent() -> None:
    real, decoy = "sk-proj-REALKEYbilled0001", "sk-proj-DECOYkeyXXXX0002"
    headers = [(b"x-api-key", decoy.encode()), (b"authorization", f"Bearer {real}".encode())]
    assert extract_api_key(headers, "openai") == real
    assert extract_api_key(headers, "anthropic") == decoy  # Anthropic's API-key header


@pytest.mark.parametrize("headers", [
    [],
    [(b"authorization", b"Basic dXNlcjpwYXNz")],
    [(b"authorization", b"Bearer ")],
    [(b"x-api-key", b"  ")],
    [(b"x-other", KEY.encode())],
])
def test_no_key(headers: list[tuple[bytes, bytes]]) -> None:
    assert extract_api_key(headers) is None


def test_fingerprint_is_keyed_truncated_and_stable() -> None:
    fp, last4 = fingerprint(KEY, b"a" * 32)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert last4 == "0123"
    assert fingerprint(KEY, b"a" * 32) == (fp, last4)
    assert fingerprint(KEY, b"b" * 32)[0] != fp
    assert fingerprint(KEY + "x", b"a" * 32)[0] != fp
    assert KEY not in fp


def test_short_keys_do_not_reveal_their_tail() -> None:
    assert fingerprint("sk-short", b"a" * 32)[1] == ""


def test_fingerprints_are_cached_per_secret_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import hmac

    from trioproxy.accounting import keys

    monkeypatch.setattr(keys, "FINGERPRINT_CACHE", 3)
    monkeypatch.setattr(keys, "_FINGERPRINTS", {})
    for round_ in range(2):
        for i in range(10):
            key = f"sk-test-key-number-{i}"
            for secret in (b"s" * 32, b"t" * 32):
                want = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]
                assert keys.fingerprint(key, secret) == (want, key[-4:]), round_
            assert len(keys._FINGERPRINTS) <= 3
    assert keys.fingerprint("short", b"s" * 32)[1] == ""
    assert keys.fingerprint("short", b"s" * 32)[1] == ""


def test_secret_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "fingerprint-secret"
    secret = load_or_create_secret(path)
    assert len(secret) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(path) == secret
    assert [p.name for p in path.parent.iterdir()] == ["fingerprint-secret"]  # no temp files


def test_configured_secret_wins(tmp_path: Path) -> None:
    assert load_or_create_secret(tmp_path / "s", "shared-by-every-host") == b"shared-by-every-host"
    assert not (tmp_path / "s").exists()


def test_secret_file_setting_gives_the_generated_files_bytes(tmp_path: Path) -> None:
    """Pointing TRIOPROXY_FINGERPRINT_SECRET_FILE at a generated (binary) secret file gives
    every host the fingerprints the host that generated it computes."""
    generated = load_or_create_secret(tmp_path / "s")
    settings = Settings.from_env(
        {"TRIOPROXY_FINGERPRINT_SECRET_FILE": str(tmp_path / "s")}
    )
    secret = load_or_create_secret(tmp_path / "other", settings.fingerprint_secret)
    if not generated.endswith((b"\n", b"\r")):  # a final newline is stripped, as for any file
        assert secret == generated
    assert fingerprint(KEY, secret) == fingerprint(KEY, generated.rstrip(b"\r\n"))


def test_too_short_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_or_create_secret(tmp_path / "s")


def test_racing_creators_agree(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    barrier = threading.Barrier(8)
    results: list[bytes] = []

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_secret(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code = "import sys; from trioproxy.accounting.keys import load_or_create_secret as f; " \
           "sys.stdout.write(f(sys.argv[1]).hex())"
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                           check=True, env={"PATH": "/usr/bin:/bin"})
    assert len(set(results)) == 1 and len(results) == 8
    assert bytes.fromhex(other.stdout.decode()) == results[0] == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]
