"""Agreement of trioproxy's latency records with a standard benchmark client (NVIDIA AIPerf).

AIPerf streams OpenAI chat requests through ``trioproxy serve`` to ``trioproxy fake-upstream``
(first token ~300 ms, then 20 ms between tokens, ±10 % jitter). trioproxy adopts AIPerf's
``X-Request-ID`` as each record's correlation id (``--request-id-header x-request-id``), so
every AIPerf request is matched with its own usage record, and their figures compared:

- TTFT: AIPerf ``time_to_first_token`` vs the record's ``ttft_ms``;
- end to end: AIPerf ``request_latency`` (to the last *content* chunk) vs ``last_token_ms``,
  and vs ``e2e_ms`` (to the last byte, after the finish, usage and ``[DONE]`` chunks);
- ITL per token: AIPerf ``inter_token_latency`` ((latency - TTFT) / (tokens - 1)) vs
  ``tpot_ms``; per chunk: AIPerf ``inter_chunk_latency`` (every gap) pooled vs the records'
  gap sketches pooled (what ``trioproxy latency`` reports as ``itl_ms``).

The client-side figure minus the record's is the proxy's own time plus the loopback: a few ms.
Then the same AIPerf load runs straight at the fake (``direct``) and through trioproxy again,
alternating (direct, proxy, direct, proxy), so the ratio/difference of AIPerf's own medians is
what trioproxy adds on this machine, from one run.

AIPerf is heavy (zmq, pandas, transformers...): install it in a venv of its own and pass its
executable. It needs a tokenizer; with no model hub here one is trained locally with the
``tokenizers`` library (which AIPerf's venv has).

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf==0.13.0
    python bench/agreement.py --aiperf /tmp/aiperf/bin/aiperf            # ~3 min
    python bench/agreement.py --aiperf /tmp/aiperf/bin/aiperf --quick    # ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import (
    HOST,
    LOAD_CORE,
    PROXY_CORE,
    PY,
    Procs,
    banner,
    free_port,
    install_signal_handlers,
    machine_info,
    md_table,
    percentile,
    write_result,
)

from trioproxy.protocol.gapsketch import merge_sketches

TRAIN_TOKENIZER = r"""
import json, os, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
words = ("the quick brown fox jumps over a lazy dog again lorem ipsum dolor sit amet "
         "consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
         "magna aliqua").split()
corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20
tok = Tokenizer(models.BPE(unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=500, special_tokens=["[UNK]", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
tok.save(os.path.join(out, "tokenizer.json"))
json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": "</s>", "unk_token": "[UNK]", "model_max_length": 1000000},
          open(os.path.join(out, "tokenizer_config.json"), "w"))
"""


def run_aiperf(args: argparse.Namespace, url: str, tokenizer: Path, out: Path) -> list[dict]:
    """One AIPerf profile run; its per-request records (profile_export.jsonl)."""
    argv = [args.aiperf, "profile", "--model", "fake-model", "--url", url,
            "--endpoint-type", "chat", "--streaming", "--request-count", str(args.requests),
            "--concurrency", str(args.concurrency), "--tokenizer", str(tokenizer),
            "--isl", "64", "--osl", str(args.tokens), "--use-server-token-count",
            "--random-seed", "1", "--artifact-dir", str(out), "--ui-type", "none",
            # keep the client light on a small machine: one worker, one record processor, no
            # /metrics scraping (the fake has none; trioproxy would answer, and pay for, it)
            "--workers-max", "1", "--record-processors", "1", "--no-server-metrics",
            "--no-gpu-telemetry"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        sys.exit(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("metadata", {}).get("benchmark_phase") == "profiling"]


def metric(row: dict, name: str) -> Any:
    value = row["metrics"].get(name)
    return None if value is None else value["value"]


def load_records(db: Path) -> dict[str, dict]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute(
            "SELECT correlation_id, ttft_ms, last_token_ms, e2e_ms, tpot_ms, itl_p50_ms, "
            "itl_sketch, output_tokens, proxy_overhead_ms, proxy_relay_max_ms FROM usage_records "
            "WHERE api = 'openai.chat'").fetchall()
    finally:
        con.close()
    return {r["correlation_id"]: dict(r) for r in rows if r["correlation_id"]}


def diffs(pairs: list[tuple[dict, dict]], client: str, record: str) -> list[float]:
    return [c - r for a, rec in pairs
            if (c := metric(a, client)) is not None and (r := rec[record]) is not None]


def spread(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {"n": len(values), "median": percentile(ordered, 50), "p90": percentile(ordered, 90),
            "min": ordered[0] if ordered else None, "max": ordered[-1] if ordered else None}


def agreement(rows: list[dict], records: dict[str, dict]) -> dict[str, Any]:
    pairs = [(r, records[r["metadata"]["x_request_id"]]) for r in rows
             if r["metadata"].get("x_request_id") in records]
    out: dict[str, Any] = {"matched": len(pairs), "client_requests": len(rows)}
    for name, client, record in (
        ("ttft", "time_to_first_token", "ttft_ms"),
        ("latency_vs_last_token", "request_latency", "last_token_ms"),
        ("latency_vs_e2e", "request_latency", "e2e_ms"),
        ("itl_per_token_vs_tpot", "inter_token_latency", "tpot_ms"),
    ):
        out[name] = spread(diffs(pairs, client, record))
    gaps = sorted(g for a, _ in pairs for g in (metric(a, "inter_chunk_latency") or []))
    pooled = merge_sketches(rec["itl_sketch"] for _, rec in pairs)
    out["pooled_chunk_gaps"] = {
        "client_gaps": len(gaps), "record_gaps": pooled.count,
        **{f"p{q}": {"client": percentile(gaps, q), "trioproxy": v}
           for q, v in zip((50, 90, 99), pooled.percentiles((50, 90, 99)), strict=True)}}
    for key in ("proxy_overhead_ms", "proxy_relay_max_ms"):
        out[key] = spread([rec[key] for _, rec in pairs if rec[key] is not None])
    out["tokens_match"] = sum(metric(a, "output_sequence_length") == rec["output_tokens"]
                              for a, rec in pairs)
    return out


def medians(rows: list[dict]) -> dict[str, float | None]:
    out = {}
    for name in ("time_to_first_token", "request_latency", "inter_token_latency"):
        values = [v for r in rows if (v := metric(r, name)) is not None]
        out[name] = statistics.median(values) if values else None
    gaps = [g for r in rows for g in (metric(r, "inter_chunk_latency") or [])]
    out["inter_chunk_latency"] = statistics.median(gaps) if gaps else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aiperf", required=True, help="the aiperf executable (its own venv)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2, help="direct/proxy alternations")
    ap.add_argument("--quick", action="store_true", help="20 requests of 100 tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.tokens, args.rounds = 20, 100, 1
    install_signal_handlers()
    banner("agreement with AIPerf", args.quick)
    with Procs() as procs:
        tokenizer = procs.logdir / "tokenizer"
        subprocess.run([str(Path(args.aiperf).parent / "python"), "-c", TRAIN_TOKENIZER,
                        str(tokenizer)], check=True, capture_output=True, timeout=300)
        fake_port, proxy_port = free_port(), free_port()
        fake = procs.spawn("fake-upstream", [
            PY, "-m", "trioproxy.commands.cli", "fake-upstream", "--port", str(fake_port), "--ttft",
            "300ms", "--itl", "20ms", "--tokens", str(args.tokens), "--jitter", "10%"],
            port=fake_port, core=LOAD_CORE)
        db = procs.datadir / "usage.db"
        base = f"http://{HOST}:{fake_port}"
        proxy = procs.spawn("trioproxy", [
            PY, "-m", "trioproxy.commands.cli", "serve", "--port", str(proxy_port),
            "--openai-base-url", base, "--anthropic-base-url", base, "--database-url", str(db),
            "--request-id-header", "x-request-id", "--log-level", "WARNING"],
            port=proxy_port, core=PROXY_CORE)
        runs: dict[str, list[list[dict]]] = {"direct": [], "trioproxy": []}
        for i in range(args.rounds):
            for path, port in (("direct", fake_port), ("trioproxy", proxy_port)):
                print(f"round {i + 1}: aiperf -> {path}", flush=True)
                rows = run_aiperf(args, f"http://{HOST}:{port}", tokenizer,
                                  procs.logdir / f"aiperf-{path}-{i}")
                runs[path].append(rows)
        procs.stop(proxy)  # drains and flushes the ledger
        procs.stop(fake)
        records = load_records(db)
    proxied = [r for run in runs["trioproxy"] for r in run]
    result = {"machine": machine_info(), "args": vars(args),
              "agreement": agreement(proxied, records),
              "medians": {path: [medians(run) for run in rs] for path, rs in runs.items()}}
    path = write_result("agreement", args.quick, result)
    print(report(result))
    print(f"-> {path}")


def report(result: dict[str, Any]) -> str:
    a = result["agreement"]
    rows = []
    labels = {"ttft": "TTFT: time_to_first_token - ttft_ms",
              "latency_vs_last_token": "request_latency - last_token_ms",
              "latency_vs_e2e": "request_latency - e2e_ms",
              "itl_per_token_vs_tpot": "inter_token_latency - tpot_ms"}
    for key, label in labels.items():
        s = a[key]
        rows.append([label, s["n"], *(f"{s[k]:+.2f}" for k in ("median", "p90", "min", "max"))])
    for key, label in (("proxy_overhead_ms", "(record) proxy_overhead_ms"),
                       ("proxy_relay_max_ms", "(record) proxy_relay_max_ms")):
        s = a[key]
        rows.append([label, s["n"], *(f"{s[k]:.2f}" for k in ("median", "p90", "min", "max"))])
    out = [(f"matched {a['matched']} of {a['client_requests']} AIPerf requests with their records; "
           f"output tokens equal in {a['tokens_match']}"), "",
           md_table(["AIPerf minus trioproxy (ms)", "n", "median", "p90", "min", "max"], rows), ""]
    g = a["pooled_chunk_gaps"]
    out.append(md_table(["pooled gaps (ms)", "AIPerf inter_chunk_latency", "trioproxy sketch"],
                        [[f"p{q} (n={g['client_gaps']} / {g['record_gaps']})",
                          f"{g[f'p{q}']['client']:.2f}", f"{g[f'p{q}']['trioproxy']:.2f}"]
                         for q in (50, 90, 99)]))
    med = result["medians"]
    mrows = []
    for name in ("time_to_first_token", "request_latency", "inter_token_latency",
                 "inter_chunk_latency"):
        d = [r[name] for r in med["direct"]]
        p = [r[name] for r in med["trioproxy"]]
        mrows.append([name, " / ".join(f"{v:.2f}" for v in d), " / ".join(f"{v:.2f}" for v in p),
                      " / ".join(f"{y - x:+.2f}" for x, y in zip(d, p, strict=True))])
    out += ["", md_table(["AIPerf median (ms), per round", "direct", "through trioproxy",
                          "added"], mrows)]
    return "\n".join(out)


if __name__ == "__main__":
    main()
