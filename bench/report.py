"""Size and render time of `nsd report` on a store (e.g. the Fashion-MNIST demo loop).

    .venv/bin/python bench/report.py --store nsd-store --loop fmnist [--out report.html] [--screenshot x.png]

Writes the report, opens it in headless Chromium (/usr/bin/chromium, driven over the DevTools
pipe by tests/browser.py) and prints: seconds to write it, its size, the page's own load time
(navigation start to the end of the load event), the wall time from navigate to a full-page
screenshot, and the requests the page made besides itself and data: images (should be none).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import Browser  # noqa: E402
from nsd.engine.report import report  # noqa: E402
from nsd.engine.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="nsd-store")
    ap.add_argument("--loop", default=None)
    ap.add_argument("--out", default="report.html")
    ap.add_argument("--screenshot", default=None, help="Also save the top of the page (1280x900) as PNG.")
    args = ap.parse_args()
    t = time.perf_counter()
    path = report(Store(args.store), args.out, loop=args.loop)
    written = time.perf_counter() - t
    browser = Browser(width=1280, height=900)
    try:
        t = time.perf_counter()
        session = browser.open(path.as_uri())
        loaded = time.perf_counter() - t
        page_load = browser.evaluate(session, "performance.getEntriesByType('navigation')[0].loadEventEnd")
        full = browser.screenshot(session)
        shot_s = time.perf_counter() - t
        counts = browser.evaluate(session, "[document.querySelectorAll('svg.plot').length, "
                                           "document.querySelectorAll('img').length]")
        if args.screenshot:
            Path(args.screenshot).write_bytes(browser.screenshot(session, full_page=False))
        others = [u for u in browser.requests(session)[1:] if not u.startswith("data:")]
    finally:
        browser.close()
    print(json.dumps({"report": str(path), "write_s": round(written, 2), "bytes": path.stat().st_size,
                      "plots": counts[0], "thumbnails": counts[1], "page_load_ms": round(page_load),
                      "navigate_to_load_event_s": round(loaded, 2),
                      "navigate_to_full_screenshot_s": round(shot_s, 2), "full_screenshot_bytes": len(full),
                      "other_requests": others}, indent=2))


if __name__ == "__main__":
    main()
