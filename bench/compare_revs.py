"""Before/after in one run: two git revisions of trioproxy measured side by side.

    python bench/compare_revs.py --old 37035b6 --new HEAD [--quick] [--rounds N] [--no-chunk-cost]

Each revision's ``trioproxy/`` is exported with ``git archive`` into a temporary directory (no
git worktree, nothing changes in the repository) and run from there: the directory goes first on
the proxy's PYTHONPATH, with a ``sitecustomize.py`` that removes the editable install's import
hook, so a module missing at that revision fails to import instead of being taken from the
working tree. Both revisions run in the same Python environment, in the same run, against the
same upstream, in rotating order, beside ``direct`` and the ``floor`` (overhead.py's cells:
CPU per small request; 64-event streams at 20 and 50, staggered and burst: CPU per stream,
TTFB and per-event delay p50/p99), both with accounting on (SQLite ledger in a temp dir). Then
``chunk_cost.py`` (per-event hot-path costs, pure CPU) runs once per revision.

Writes ``results/compare_<old>_<new>[.quick].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import overhead
from common import BENCH, PY, ROOT, Progress, fmt, md_table

SITECUSTOMIZE = '''\
"""Written by bench/compare_revs.py: import trioproxy only from this snapshot."""
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in (getattr(f, "__module__", "") or "")]
'''


def rev_short(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def rev_subject(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%s", rev], check=True,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def snapshot(rev: str, into: Path) -> Path:
    """``into/trioproxy`` at ``rev`` plus the sitecustomize; returns ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "trioproxy"],
                             check=True, capture_output=True, timeout=60).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    (into / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return into


def check_import(src: Path) -> str:
    """The path trioproxy imports from with ``src`` first on PYTHONPATH (must be inside it)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    res = subprocess.run([PY, "-c", "import trioproxy, trioproxy.relay; print(trioproxy.__file__)"],
                         cwd=src, env=env, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0 or not res.stdout.strip().startswith(str(src)):
        raise SystemExit(f"snapshot {src} does not import on its own:\n{res.stdout}{res.stderr[-2000:]}")
    return res.stdout.strip()


def chunk_cost(src: Path, events: int, repeat: int) -> dict[str, Any]:
    out = src / "chunk_cost.json"
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([PY, str(BENCH / "chunk_cost.py"), "--events", str(events), "--repeat",
                    str(repeat), "--out", str(out)], cwd=src, env=env, check=True, timeout=600)
    return json.loads(out.read_text())


def chunk_rows(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    o = {r["case"]: r for r in old["rows"]}
    n = {r["case"]: r for r in new["rows"]}
    rows = []
    for case in list(o) + [c for c in n if c not in o]:
        a, b = o.get(case), n.get(case)
        rows.append({"case": case, "old_ns": a["median_ns"] if a else None,
                     "new_ns": b["median_ns"] if b else None,
                     "new_over_old": common.ratio(b["median_ns"], a["median_ns"]) if a and b else None})
    return rows


def cell(s: dict[str, Any] | None, digits: int = 2, unit: str = "") -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{fmt(s['median'], unit, digits)} ({fmt(s['min'], '', digits)}..{fmt(s['max'], '', digits)})"


def markdown(data: dict[str, Any]) -> str:
    old, new = data["old"]["short"], data["new"]["short"]
    po, pn = f"trioproxy@{old}", f"trioproxy@{new}"
    med, rat = data["medians"], data["ratios"]
    la = data["loadavg"]
    lines = [
        f"# trioproxy {old} (before) vs {new} (after), same run",
        "",
        (f"- before: `{old}` {data['old']['subject']} (trioproxy/ tree "
         f"`{data['old'].get('trioproxy_tree')}`)"),
        (f"- after: `{new}` {data['new']['subject']} (trioproxy/ tree "
         f"`{data['new'].get('trioproxy_tree')}`)"),
        (f"- {data['plan']['rounds']} rounds{' (quick)' if data['quick'] else ''}, paths in "
         f"rotating order; both with accounting {data.get('accounting', 'on')} (the ledger: SQLite "
         f"in a temp dir); proxies pinned to core 1, upstream + load generator on core 0. Values: "
         f"median over rounds (min..max over rounds)."),
        (f"- load average (1 min) before each round and at the end: "
         f"{', '.join(f'{x[0]:.2f}' for x in la)}; ledger records written: "
         f"{data['ledger_records']}."),
        (f"- `python bench/compare_revs.py --old {data['old']['rev']} --new {data['new']['rev']}"
         f"{' --quick' if data['quick'] else ''}"
         f"{' --accounting off' if data.get('accounting') == 'off' else ''}` "
         f"({data['run_seconds']:.0f} s)."),
        "",
        "## Cost per request and per stream, latency",
        "",
    ]
    rows = []
    for m in med[pn]:
        rows.append([m, cell(med["floor"][m]) if "floor" in med else "-", cell(med[po][m]),
                     cell(med[pn][m]), cell(rat[f"{pn}/{po}"][m], 2, "×"),
                     cell(rat[f"{po}/floor"][m], 2, "×"), cell(rat[f"{pn}/floor"][m], 2, "×")])
    lines.append(md_table(["metric (ms)", "floor", "before", "after", "after ÷ before",
                           "before ÷ floor", "after ÷ floor"], rows))
    lines += ["", ("Metric names: `cpu_ms_per_request` (32 users of small non-streaming requests); "
                   "`staggerN`/`burstN`: N concurrent 64-event streams, staggered starts or released "
                   "together; `ttfb` = first response byte, `delay` = per-event receive − emit "
                   "stamp."), ""]
    if data.get("chunk_cost"):
        lines += ["## Per-event hot-path cost (`chunk_cost.py`, pure CPU, median of repeats)", ""]
        lines.append(md_table(["case", "before µs", "after µs", "after ÷ before"], [
            [r["case"], fmt(r["old_ns"] / 1000 if r["old_ns"] else None, "", 2),
             fmt(r["new_ns"] / 1000 if r["new_ns"] else None, "", 2),
             fmt(r["new_over_old"], "×", 2)] for r in data["chunk_cost"]]))
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="37035b6")
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-chunk-cost", action="store_true")
    ap.add_argument("--accounting", choices=("on", "off"), default="on",
                    help="both revisions with the ledger on (default, as users run it) or off")
    args = ap.parse_args()
    common.banner("compare_revs", args.quick)
    t0 = time.monotonic()
    revs = {"old": {"rev": args.old}, "new": {"rev": args.new}}
    for r in revs.values():
        r["short"], r["subject"] = rev_short(r["rev"]), rev_subject(r["rev"])
        r["trioproxy_tree"] = rev_short(f"{r['rev']}:trioproxy")
    p = overhead.plan(args.quick)
    if args.rounds:
        p["rounds"] = args.rounds
    with tempfile.TemporaryDirectory(prefix="trioproxy-revs-") as tmp:
        srcs = {k: snapshot(r["rev"], Path(tmp) / r["short"]) for k, r in revs.items()}
        for k, src in srcs.items():
            revs[k]["imports_from"] = check_import(src)
        po, pn = (f"trioproxy@{revs[k]['short']}" for k in ("old", "new"))
        acct = args.accounting == "on"
        specs = [overhead.DEFAULT_SPECS["direct"], overhead.DEFAULT_SPECS["floor"],
                 overhead.PathSpec(po, "trioproxy", acct, str(srcs["old"]),
                                   f"{po}, accounting {args.accounting}"),
                 overhead.PathSpec(pn, "trioproxy", acct, str(srcs["new"]),
                                   f"{pn}, accounting {args.accounting}")]
        res = overhead.measure(specs, p, Progress("compare"))
        chunks = None
        if not args.no_chunk_cost:
            cc = {k: chunk_cost(src, 5000 if args.quick else 20000, 5 if args.quick else 7)
                  for k, src in srcs.items()}
            chunks = chunk_rows(cc["old"], cc["new"])
    rat = {f"{pn}/{po}": overhead.ratios(res["rounds"], pn, po),
           f"{po}/floor": overhead.ratios(res["rounds"], po, "floor"),
           f"{pn}/floor": overhead.ratios(res["rounds"], pn, "floor")}
    data = {"quick": args.quick, "accounting": args.accounting, "old": revs["old"], "new": revs["new"], "plan": p, **res,
            "medians": overhead.medians(res["rounds"]), "ratios": rat,
            "added_over_direct_ms": {n: overhead.added(res["rounds"], n) for n in (po, pn, "floor")},
            "chunk_cost": chunks, "run_seconds": time.monotonic() - t0}
    name = f"compare_{revs['old']['short']}_{revs['new']['short']}"
    if args.accounting == "off":
        name += "_noacct"
    path = common.write_result(name, args.quick, data)
    md = markdown(data)
    path.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {path} and {path.with_suffix('.md')} in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
