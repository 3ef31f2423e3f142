"""The database URL's credentials never reach a log, in any form libpq accepts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from trioproxy import Settings
from trioproxy.accounting.ledger import open_ledger
from trioproxy.accounting.redact import redact_dsn

from .test_store import _postgres_schema_url

SECRET = "s3cr3t-Pw"

FORMS = [
    f"postgresql://trioproxy:{SECRET}@db.internal:5432/ledger",
    f"postgres://trioproxy:{SECRET}@h1:5432,h2:5433/ledger?sslmode=require",
    f"postgresql://trioproxy@db.internal/ledger?password={SECRET}",
    f"postgresql://trioproxy@db.internal/ledger?sslmode=require&password={SECRET}&x=1",
    f"postgresql:///ledger?host=/run/pg&sslpassword={SECRET}",
    f"postgresql://db.internal/ledger?%70assword={SECRET}",  # percent-encoded key, as libpq decodes
    f"postgresql://trioproxy@db.internal/ledger?PASSWORD={SECRET}",
    f"host=db.internal dbname=ledger user=trioproxy password={SECRET}",
    f"host=db.internal password = '{SECRET} with spaces \\' quote' dbname=ledger",
    f"host=db.internal sslpassword={SECRET} dbname=ledger",
    f"dbname=ledger password='{SECRET}'",
]


@pytest.mark.parametrize("dsn", FORMS)
def test_every_libpq_credential_form_is_redacted_and_the_rest_kept(dsn: str) -> None:
    shown = redact_dsn(dsn)
    assert SECRET not in shown and "with spaces" not in shown and "quote" not in shown
    assert "ledger" in shown  # still says which database
    assert "***" in shown


@pytest.mark.parametrize("dsn", ["sqlite:///var/lib/usage.db", "/tmp/usage.db",
                                 "postgresql://trioproxy@db.internal:5432/ledger?sslmode=require"])
def test_a_url_without_credentials_is_shown_as_it_is(dsn: str) -> None:
    assert redact_dsn(dsn) == dsn


async def test_the_ledger_logs_no_password_given_in_the_query_string(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for url in _postgres_schema_url():
        settings = Settings(database_url=f"{url}&password={SECRET}", data_home=str(tmp_path))
        with trio.fail_after(20):
            async with open_ledger(settings):
                pass
    said = [r.getMessage() for r in caplog.records]
    assert any("usage ledger:" in m for m in said)
    assert not [m for m in said if SECRET in m]


async def test_a_keyword_value_dsn_is_a_postgresql_store_not_a_file_named_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from trioproxy.accounting.locations import open_store

    from .test_store import count_rows, make_record

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)  # a DSN read as a SQLite path would create a file here
    for url in _postgres_schema_url():
        dsn = make_conninfo(**conninfo_to_dict(url), password=SECRET)
        store = open_store(dsn, data_home=tmp_path)
        try:
            store.migrate()
            store.insert_many([make_record(1)])
        finally:
            store.close()
        assert count_rows(url) == 1
        settings = Settings(database_url=dsn, data_home=str(tmp_path))
        with trio.fail_after(20):
            async with open_ledger(settings):
                pass
    assert not [p for p in tmp_path.rglob("*") if "host=" in p.name or SECRET in p.name]
    assert not [r for r in caplog.records if SECRET in r.getMessage()]
