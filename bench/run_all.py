"""Run the five scenarios one after the other, then the report.

    python bench/run_all.py [--quick] [--profile] [--only idle,latency,...]

Each scenario runs as its own process (``python bench/<name>.py``), so a failure in one does
not stop the others; the exit status is non-zero if any failed. Timings go to
``results/run_all[.quick].json``. Full: ~25 min (idle alone is ~10 min of real time,
overhead ~6.5 min); ``--quick``: ~5 min. ``--profile`` adds ``profile_relay.py`` (~40 s, full runs only).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common
from common import BENCH, RESULTS

SCENARIOS = ["idle", "latency", "throughput", "scale", "overhead"]
# --quick: overhead.py without its accounting-off path, to keep the whole quick run near 5 min
QUICK_ARGS = {"overhead": ["--paths", "direct,floor,trioproxy,streaming"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile the relay")
    ap.add_argument("--only", default=",".join(SCENARIOS))
    args = ap.parse_args()
    common.install_signal_handlers()
    common.check_trioproxy_imports()
    t0 = time.monotonic()
    timings: dict[str, dict[str, float | int]] = {}
    failed = []
    for name in args.only.split(","):
        argv = [sys.executable, str(BENCH / f"{name}.py")]
        if args.quick:
            argv += ["--quick", *QUICK_ARGS.get(name, [])]
        elif name == "latency":
            argv.append("--calibrate")
        print(f"\n######## {name} ({time.monotonic() - t0:.0f} s into the run)", flush=True)
        t = time.monotonic()
        rc = subprocess.call(argv)
        timings[name] = {"seconds": round(time.monotonic() - t, 1), "exit": rc}
        if rc != 0:
            failed.append(name)
    if args.profile and not args.quick:
        print("\n######## profile", flush=True)
        t = time.monotonic()
        rc = subprocess.call([sys.executable, str(BENCH / "profile_relay.py")])
        timings["profile"] = {"seconds": round(time.monotonic() - t, 1), "exit": rc}
    print("\n######## report", flush=True)
    argv = [sys.executable, str(BENCH / "report.py")] + (["--quick"] if args.quick else [])
    t = time.monotonic()
    rc = subprocess.call(argv)
    timings["report"] = {"seconds": round(time.monotonic() - t, 1), "exit": rc}
    total = time.monotonic() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"run_all{'.quick' if args.quick else ''}.json").write_text(json.dumps(
        {"quick": args.quick, "total_seconds": round(total, 1), "steps": timings,
         "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, indent=1))
    print("\n" + common.table(["step", "seconds", "exit"],
                              [[k, v["seconds"], v["exit"]] for k, v in timings.items()]))
    print(f"total {total:.0f} s ({total / 60:.1f} min){'; FAILED: ' + ', '.join(failed) if failed else ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
