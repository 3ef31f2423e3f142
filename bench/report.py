"""Turn the latest results into ``bench/results/REPORT.md`` and PNG plots (matplotlib, Agg).

    python bench/report.py [--quick]

Reads ``results/{idle,latency,throughput,scale}.json`` (``*.quick.json`` with ``--quick``,
writing ``REPORT.quick.md`` and ``*.quick.png``); a missing scenario is skipped. The headline
is ratios: trioproxy against direct and against the conventional streaming proxy, all from
the same run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402
import overhead  # noqa: E402
from common import PATH_LABEL, PATHS, RESULTS, fmt, md_table, ratio  # noqa: E402

COLORS = {"direct": "#444444", "trioproxy": "#1f77b4", "trioproxy_ka": "#17becf",
          "streaming": "#d62728", "buffering": "#ff7f0e"}


def x(v: float | None, digits: int = 1) -> str:
    """A ratio as '2.3x'."""
    if v is None:
        return "-"
    if abs(v) < 0.095:
        return f"{v:.3f}x"
    return f"{v:.{digits}f}x"


def cell(lat: dict[str, Any], conc: int, path: str) -> dict[str, Any] | None:
    for c in lat["cells"]:
        if c["concurrency"] == conc and c["path"] == path:
            return c
    return None


# -- headline ----------------------------------------------------------------------------------

def headline(lat: dict | None, thr: dict | None, scale: dict | None, idle: dict | None) -> str:
    rows: list[list[Any]] = []

    def add(metric: str, d: float | None, t: float | None, s: float | None, unit: str,
            digits: int = 2, lower_better: bool = True) -> None:
        rows.append([metric, fmt(d, unit, digits), fmt(t, unit, digits), fmt(s, unit, digits),
                     x(ratio(t, d)), x(ratio(t, s), 2)])

    if lat:
        for conc in lat["config"]["concurrency"]:
            d, t, s = (cell(lat, conc, p) for p in ("direct", "trioproxy", "streaming"))
            if not (d and t and s):
                continue
            for q in ("p50", "p99"):
                add(f"TTFB {q}, c={conc}", d["ttfb_ms"].get(q), t["ttfb_ms"].get(q),
                    s["ttfb_ms"].get(q), " ms")
            for q in ("p50", "p99"):
                add(f"per-event delay {q}, c={conc}", d["delay_ms"].get(q), t["delay_ms"].get(q),
                    s["delay_ms"].get(q), " ms")
            add(f"proxy CPU s / 1,000 events, c={conc}", None, t["proxy_cpu_s_per_1k_events"],
                s["proxy_cpu_s_per_1k_events"], " s", 3)
    if thr:
        r = {x_["path"]: x_ for x_ in thr["ramps"]}
        if {"direct", "trioproxy", "streaming"} <= r.keys():
            add("events/s relayed, every event <= 50 ms", r["direct"]["knee_strict_events_per_s"],
                r["trioproxy"]["knee_strict_events_per_s"], r["streaming"]["knee_strict_events_per_s"],
                "", 0)
            add("events/s relayed, p99 <= 50 ms", r["direct"]["knee_p99_events_per_s"],
                r["trioproxy"]["knee_p99_events_per_s"], r["streaming"]["knee_p99_events_per_s"], "", 0)
        q = {x_["path"]: x_ for x_ in thr["requests_per_s"]}
        if {"direct", "trioproxy", "streaming"} <= q.keys():
            add("small non-streaming requests/s", q["direct"]["requests_per_s"],
                q["trioproxy"]["requests_per_s"], q["streaming"]["requests_per_s"], "", 0)
            add("non-streaming latency p99", q["direct"]["latency_ms"].get("p99"),
                q["trioproxy"]["latency_ms"].get("p99"), q["streaming"]["latency_ms"].get("p99"), " ms")
    if scale:
        s_ = {x_["path"]: x_ for x_ in scale["rows"]}
        if {"trioproxy", "streaming"} <= s_.keys():
            n = scale["config"]["streams"]
            add(f"proxy RSS per open stream ({n} streams)", None, s_["trioproxy"]["rss_per_stream_kb"],
                s_["streaming"]["rss_per_stream_kb"], " KB", 1)
            add(f"proxy CPU while {n} streams idle (cores)", None,
                s_["trioproxy"]["cpu_idle_with_streams"], s_["streaming"]["cpu_idle_with_streams"], "", 3)
            add(f"drain after release ({n} streams)", s_.get("direct", {}).get("drain_seconds"),
                s_["trioproxy"]["drain_seconds"], s_["streaming"]["drain_seconds"], " s", 1)
    out = md_table(["metric", "direct", "trioproxy", "conventional streaming",
                    "trioproxy ÷ direct", "trioproxy ÷ conventional"], rows)
    if idle:
        out += "\n\n" + idle_matrix(idle)
    return out


def idle_matrix(idle: dict[str, Any]) -> str:
    clients = list(idle["config"]["client_idle_timeouts_s"])
    rows = []
    for path in idle["config"]["paths"]:
        row = [PATH_LABEL.get(path, path)]
        for client in clients:
            g = next((g for g in idle["groups"] if g["path"] == path and g["client"] == client), None)
            if g is None:
                row.append("-")
            elif g["completed"] == g["streams"]:
                row.append(f"completed {g['completed']}/{g['streams']}")
            else:
                row.append(f"**aborted** {g['aborted']}/{g['streams']} at {fmt(g['abort_at_s'], ' s', 1)}")
        rows.append(row)
    timeouts = idle["config"]["client_idle_timeouts_s"]
    head = ["path"] + [f"client idle timeout {c} ({fmt(t, ' s', 1) if t else 'none'})"
                       for c, t in timeouts.items()]
    return (f"Idle streams ({idle['config']['stream_s']:.0f} s, silences of "
            f"{idle['config']['silence_s']:.0f} s):\n\n" + md_table(head, rows))


# -- sections ----------------------------------------------------------------------------------

def idle_section(idle: dict[str, Any]) -> str:
    cfg = idle["config"]
    rows = []
    for g in idle["groups"]:
        rows.append([g["path"], g["client"], f"{g['completed']}/{g['streams']}",
                     fmt(g["abort_at_s"], " s", 1) if g["aborted"] else "-",
                     "; ".join(g["abort_reasons"]) or "-", fmt(g["longest_gap_s"], " s", 1),
                     fmt(g["ttfb_s_p50"] * 1000 if g["ttfb_s_p50"] is not None else None, " ms", 1),
                     ", ".join(g["bytes"]), g["keepalive_comments_max"], "; ".join(g["upstream_saw"])])
    return (
        f"## 1. Idle timeouts on long streams\n\n"
        f"Each stream: `message_start`, {cfg['silence_s']:.0f} s silence, {cfg['deltas']} deltas over "
        f"{cfg['delta_span_s']:.0f} s, {cfg['silence_s']:.0f} s silence, end ({cfg['stream_s']:.0f} s; "
        f"scale {cfg['scale']:g}). {cfg['streams_per_cell']} streams per path x client, all at once. "
        f"SSE keepalive on the keepalive path: every {cfg['keepalive_s']:g} s of silence.\n\n"
        f"Bytes: {cfg['bytes_note']}.\n\n"
        + md_table(["path", "client", "completed", "aborted at", "why", "longest gap", "TTFB p50",
                    "bytes vs upstream", "keepalive comments", "upstream saw"], rows)
        + "\n\n![bytes received over time](idle_timeline{sfx}.png)\n"
    )


def latency_section(lat: dict[str, Any]) -> str:
    cfg = lat["config"]
    rows = []
    for c in lat["cells"]:
        rows.append([c["concurrency"], c["path"], c["streams"], c["events"],
                     fmt(c["ttfb_ms"].get("p50"), "", 2), fmt(c["ttfb_ms"].get("p99"), "", 2),
                     fmt(c["delay_ms"].get("p50"), "", 2), fmt(c["delay_ms"].get("p99"), "", 2),
                     fmt(c["proxy_cpu_s_per_1k_events"], "", 3), fmt(c["proxy_cpu_util"], "", 2),
                     fmt(c["loadgen_cpu_s_per_1k_events"], "", 3), fmt(c["core0_util"], "", 2)])
    add_rows = [[a["concurrency"], a["path"], fmt(a["added_ttfb_p50_ms"], "", 2),
                 fmt(a["added_ttfb_p99_ms"], "", 2), fmt(a["added_delay_p50_ms"], "", 2),
                 fmt(a["added_delay_p99_ms"], "", 2)] for a in lat["added"]]
    out = (
        f"## 2. Latency\n\n{cfg['events_per_stream']} deltas at {cfg['interval_s'] * 1000:.0f} ms "
        f"per stream, closed loop, concurrency {', '.join(map(str, cfg['concurrency']))}; "
        f"{cfg['rounds']} round(s) per path, rotating order. TTFB = first response byte; "
        f"delay = client receive time - upstream emit stamp.\n\n"
        "Added over direct (ms):\n\n"
        + md_table(["conc", "path", "+TTFB p50", "+TTFB p99", "+delay p50", "+delay p99"], add_rows)
        + "\n\nAll cells (ms; CPU in s per 1,000 events; util = fraction of a core; core 0 = "
          "upstream + load generator):\n\n"
        + md_table(["conc", "path", "streams", "events", "TTFB p50", "TTFB p99", "delay p50",
                    "delay p99", "proxy CPU", "proxy util", "loadgen CPU", "core 0 util"], rows)
        + "\n\n![per-event delay CDF](latency_cdf{sfx}.png)\n\n![TTFB CDF](latency_ttfb_cdf{sfx}.png)\n"
    )
    cal = lat.get("loadgen_calibration")
    if cal:
        rows = [[c["client"], c["concurrency"], fmt(c["events_per_s"], "", 0),
                 fmt(c["client_cpu_us_per_event"], "", 1), fmt(c["upstream_cpu_us_per_event"], "", 1),
                 fmt((c["delay_ms"] or {}).get("p99"), "", 2)] for c in cal]
        out += ("\nLoad-generator candidates on the direct path (CPU µs per event received):\n\n"
                + md_table(["client", "conc", "events/s", "client µs/event", "upstream µs/event",
                            "delay p99 ms"], rows) + "\n")
    return out


def throughput_section(thr: dict[str, Any]) -> str:
    cfg = thr["config"]
    rows = [[r["path"], fmt(r["knee_strict_events_per_s"], "", 0),
             fmt(r.get("first_strict_failure"), "", 0), fmt(r["knee_p99_events_per_s"], "", 0),
             fmt(r["highest_tested"], "", 0), "yes" if r["hit_cap"] else "no"] for r in thr["ramps"]]
    lv_rows = []
    for r in thr["ramps"]:
        for lv in r["levels"]:
            d = lv["delay_ms"]
            lv_rows.append([r["path"], fmt(lv["offered_events_per_s"], "", 0),
                            fmt(lv["achieved_rate_in_window"], "", 0), fmt(d.get("p50"), "", 2),
                            fmt(d.get("p99"), "", 1), fmt(d.get("max"), "", 1),
                            fmt(lv["proxy_cpu_util"], "", 2), fmt(lv["proxy_cpu_us_per_event"], "", 0),
                            fmt(lv["core0_util"], "", 2),
                            "strict" if lv["pass_strict"] else ("p99" if lv["pass_p99"] else "FAIL")])
    q_rows = [[q["path"], fmt(q["requests_per_s"], "", 0), fmt(q["latency_ms"].get("p50"), "", 2),
               fmt(q["latency_ms"].get("p99"), "", 2), fmt(q["proxy_cpu_ms_per_request"], "", 3),
               fmt(q["core0_util"], "", 2)] for q in thr["requests_per_s"]]
    return (
        f"## 3. Throughput\n\n{cfg['streams']} streams on kept-alive connections, offered rate ramped "
        f"x{cfg['factor']:g} from {cfg['start']:.0f} events/s, {cfg['level_s']:g} s per level; only "
        f"events emitted while all streams run count. Knee = highest offered rate passing.\n\n"
        + md_table(["path", "knee: every event <= 50 ms", "lowest level failing that",
                    "knee: p99 <= 50 ms", "highest tested", "passed at the cap"], rows)
        + "\n\n![delay vs offered load](throughput{sfx}.png)\n\nLevels (ms; proxy util = fraction "
          "of a core):\n\n"
        + md_table(["path", "offered ev/s", "achieved", "p50", "p99", "max", "proxy util",
                    "proxy µs/event", "core 0 util", "pass"], lv_rows)
        + f"\n\nSmall non-streaming requests ({thr['requests_per_s'][0]['users'] if thr['requests_per_s'] else '-'}"
          " closed-loop users):\n\n"
        + md_table(["path", "req/s", "latency p50 ms", "latency p99 ms", "proxy CPU ms/req",
                    "core 0 util"], q_rows) + "\n"
    )


def scale_section(sc: dict[str, Any]) -> str:
    cfg = sc["config"]
    rows = [[r["path"], r["measured_process"], r["open_during_idle"], fmt(r["open_seconds"], "", 1),
             fmt(r["rss_baseline_mb"], "", 1), fmt(r["rss_open_mb"], "", 1),
             fmt(r["rss_per_stream_kb"], "", 1), fmt(r["cpu_idle_baseline"], "", 3),
             fmt(r["cpu_idle_with_streams"], "", 3), r["fds_open"], fmt(r["drain_seconds"], "", 1),
             ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items())] for r in sc["rows"]]
    return (
        f"## 4. Scale\n\n{cfg['streams']} concurrent streams held silent after `message_start`, "
        f"idle window {cfg['idle_s']:g} s, then released. trioproxy max upstream connections: "
        f"{cfg.get('trioproxy_max_connections') or 'default (200)'}.\n\n"
        + md_table(["path", "measured", "open", "open s", "RSS base MB", "RSS open MB", "KB/stream",
                    "idle CPU base", "idle CPU open", "fds", "drain s", "outcomes"], rows)
        + "\n\n![scale](scale{sfx}.png)\n"
    )


# -- plots -------------------------------------------------------------------------------------

def plot_idle(idle: dict[str, Any], path: Path) -> None:
    clients = list(idle["config"]["client_idle_timeouts_s"])
    fig, axes = plt.subplots(1, len(clients), figsize=(5 * len(clients), 4), sharey=True)
    for ax, client in zip(axes, clients):
        for rec in idle["streams"]:
            if rec["client"] != client or not rec["timeline"]:
                continue
            tl = rec["timeline"]
            ts = [p[0] for p in tl] + ([rec["t_end_s"]] if rec["t_end_s"] else [])
            bs = [p[1] for p in tl] + ([tl[-1][1]] if rec["t_end_s"] else [])
            wide = {"direct": 6, "trioproxy": 3.5}.get(rec["path"], 1.5)  # overlapping lines
            ax.step(ts, [b / 1024 for b in bs], where="post", color=COLORS.get(rec["path"]),
                    label=rec["path"], lw=wide, alpha=0.45 if wide > 2 else 1.0)
            if rec["outcome"] != "complete":
                ax.plot([ts[-1]], [bs[-1] / 1024], "x", color=COLORS.get(rec["path"]), ms=10, mew=2)
        t = idle["config"]["client_idle_timeouts_s"][client]
        ax.set_title(f"client idle timeout: {client}" + (f" ({t:g} s)" if t else ""))
        ax.set_xlabel("seconds since request")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KiB received (x = client aborted)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdf(lat: dict[str, Any], key: str, title: str, path: Path) -> None:
    levels = lat["config"]["concurrency"]
    fig, axes = plt.subplots(1, len(levels), figsize=(5 * len(levels), 4))
    for ax, conc in zip(axes if len(levels) > 1 else [axes], levels):
        for p in PATHS:
            c = cell(lat, conc, p)
            if not c or not c[key]:
                continue
            pts = c[key]
            ax.plot([max(v, 1e-3) for _, v in pts], [q / 100 for q, _ in pts],
                    color=COLORS.get(p), label=p)
        ax.set_xscale("log")
        ax.set_title(f"{title}, concurrency {conc}")
        ax.set_xlabel("ms (log)")
        ax.set_ylim(0, 1.001)
        ax.grid(alpha=0.3, which="both")
    (axes[0] if len(levels) > 1 else axes).set_ylabel("fraction")
    (axes[0] if len(levels) > 1 else axes).legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(thr: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in thr["ramps"]:
        lv = r["levels"]
        xs = [v["offered_events_per_s"] for v in lv]
        ax.plot(xs, [max(v["delay_ms"].get("p99") or 1e-3, 1e-3) for v in lv], "o-",
                color=COLORS.get(r["path"]), label=f"{r['path']} p99")
        ax.plot(xs, [max(v["delay_ms"].get("max") or 1e-3, 1e-3) for v in lv], "x--",
                color=COLORS.get(r["path"]), alpha=0.6, label=f"{r['path']} max")
    ax.axhline(thr["config"]["budget_ms"], color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered events/s")
    ax.set_ylabel("per-event delay, ms")
    ax.set_title("delay vs offered load (dotted: 50 ms budget)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(sc: dict[str, Any], path: Path) -> None:
    rows = [r for r in sc["rows"] if r["path"] != "direct"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["path"] for r in rows]
    a.bar(names, [r["rss_per_stream_kb"] or 0 for r in rows], color=[COLORS.get(n) for n in names])
    a.set_title(f"proxy RSS per open stream ({sc['config']['streams']} streams)")
    a.set_ylabel("KB")
    b.bar(names, [r["cpu_idle_with_streams"] or 0 for r in rows], color=[COLORS.get(n) for n in names])
    b.set_title("proxy CPU while the streams idle")
    b.set_ylabel("fraction of a core")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="report the --quick results")
    args = ap.parse_args()
    q = args.quick
    sfx = ".quick" if q else ""
    idle, lat, thr, sc = (common.load_result(n, q) for n in ("idle", "latency", "throughput", "scale"))
    parts = [f"# trioproxy bench report{' (quick run)' if q else ''}\n"]
    any_ = next((r for r in (idle, lat, thr, sc) if r), None)
    if any_ is None:
        print("no results yet: run bench/run_all.py first")
        return
    m = any_["machine"]
    parts.append(
        f"Machine: {m['cpus']} cores, Python {m['python']}, {m['pinning']}; versions "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; trioproxy from {m.get('trioproxy', {}).get('source')} (git "
        f"{m.get('trioproxy', {}).get('git_head')}, "
        f"{m.get('trioproxy', {}).get('working_tree_changes_in_trioproxy')} uncommitted file(s) "
        f"in trioproxy/). Runs: "
        + ", ".join(f"{r['scenario']} {r['machine']['time']} ({r.get('run_seconds', 0):.0f} s, "
                    f"loadavg at start {r['machine']['loadavg_at_start'][0]:.2f})"
                    for r in (idle, lat, thr, sc) if r)
        + ". The machine is shared: other processes ran during the bench, so compare paths "
          "within a run (ratios), not absolute numbers across runs.\n")
    parts.append("## Headline\n\n" + headline(lat, thr, sc, idle) + "\n")
    if idle:
        parts.append(idle_section(idle))
        plot_idle(idle, RESULTS / f"idle_timeline{sfx}.png")
    if lat:
        parts.append(latency_section(lat))
        plot_cdf(lat, "delay_cdf_ms", "per-event delay", RESULTS / f"latency_cdf{sfx}.png")
        plot_cdf(lat, "ttfb_cdf_ms", "TTFB", RESULTS / f"latency_ttfb_cdf{sfx}.png")
    if thr:
        parts.append(throughput_section(thr))
        plot_throughput(thr, RESULTS / f"throughput{sfx}.png")
    if sc:
        parts.append(scale_section(sc))
        plot_scale(sc, RESULTS / f"scale{sfx}.png")
    ovh = common.load_result("overhead", q)
    if ovh:
        parts.append(overhead.markdown_section(ovh))
    # results/ keeps the current runs only: a compare_revs.py before/after is linked while its
    # file is there (earlier ones are in git history)
    compares = [f"[{md.name}]({md.name})" for md in sorted(RESULTS.glob("compare_*.md"))]
    if compares:
        parts.append(f"Before/after (compare_revs.py): {', '.join(compares)}.\n")
    prof = RESULTS / "profile.txt"
    if prof.exists() and not q:
        parts.append("## Profile\n\nSee [profile.txt](profile.txt) (trioproxy under the latency "
                     "load, cProfile).\n")
    text = "\n".join(parts).replace("{sfx}", sfx)
    out = RESULTS / f"REPORT{sfx}.md"
    out.write_text(text)
    print(f"wrote {out} and plots in {RESULTS}")


if __name__ == "__main__":
    main()
