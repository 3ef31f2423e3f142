"""The README's screenshots of the usage page: the paced traffic of ``latency_example.py``
through trioproxy, then the page in headless Chromium (Playwright), desktop and phone.

So that the day and time charts have something to show, the recorded requests are spread over
the last five days afterwards (their start times are moved back by whole days in the temporary
database; every other figure is as measured).

Run: ``python docs/usage_page_example.py [--requests 16] [--out docs/usage-page.png]``
(needs Chromium: ``apt-get install chromium``). Real time: about half a minute.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

sys.path.insert(0, str(Path(__file__).parent))
from latency_example import run  # the same paced traffic, recorded

from trioproxy import Settings, TrioProxy

DAY = 86400.0


def spread(db: Path, days: int = 5) -> None:
    """Move the i-th request back by i mod ``days`` whole days."""
    with sqlite3.connect(db) as conn:
        ids = [r[0] for r in conn.execute("SELECT request_id FROM usage_records "
                                          "ORDER BY started_at")]
        conn.executemany("UPDATE usage_records SET started_at = started_at - ? "
                         "WHERE request_id = ?",
                         [((i % days) * DAY, rid) for i, rid in enumerate(ids)])


def screenshot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            for path, viewport in ((out, {"width": 1200, "height": 900}),
                                   (out.with_name(out.stem + "-phone.png"),
                                    {"width": 390, "height": 844})):
                page = browser.new_page(viewport=viewport)
                page.goto(url)
                page.wait_for_selector("body[data-charts]", state="attached")
                page.screenshot(path=str(path), full_page=True)
                page.close()
                print(f"wrote {path}")
        finally:
            browser.close()


async def show(db: Path, out: Path) -> None:
    settings = Settings(accounting=True, database_url=str(db))
    app = TrioProxy(settings, configure_logging=False)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = config.errorlog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            app, config, shutdown_trigger=stop.wait, task_status=task_status))
        try:
            await trio.to_thread.run_sync(screenshot, binds[0] + "/_trioproxy/", out)
        finally:
            stop.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="streamed requests per model")
    ap.add_argument("--out", default=str(Path(__file__).with_name("usage-page.png")))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "usage.db"
        trio.run(run, db, args.requests)
        spread(db)
        trio.run(show, db, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
