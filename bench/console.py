"""The web console's list page with many sandboxes (issue 22: ≤ 300 ms server time with 500).

    .venv/bin/python bench/console.py [--sandboxes 500] [--runs 20]   # as root

Starts a scratch server, creates the sandboxes, then times, on loopback, what the list page costs the
server: the page itself (`GET /console/sandboxes`) and the one API call its script makes every 2 s
(`GET /v1/sandboxes?state=…&limit=1000`, with the session cookie), against `GET /healthz` (the floor:
one request through the same server). With chromium present (apt-get install chromium) it also reports
what the browser takes to fetch and render the rows (the figure the page prints at its foot),
while a quarter of the sandboxes are paused and resumed underneath it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from cove.devserver import Server

LIVE = ["starting", "running", "paused", "hibernated"]


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sandboxes", type=int, default=500)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    srv = Server("console-bench", extra_env={"COVE_MAX_QUEUED_CREATES": "10000"})
    srv.start()
    key = ""
    try:
        with srv.client() as api:
            key = api.post("/v1/keys", json={"name": "bench", "tenant": "bench"}).json()["key"]
        t0 = time.perf_counter()
        with srv.client(key) as api, ThreadPoolExecutor(4) as pool:

            def create(i: int) -> str:
                for _ in range(50):
                    r = api.post("/v1/sandboxes", json={"timeout": 0, "metadata": {"n": str(i)}})
                    if r.status_code == 201:
                        return r.json()["id"]
                    time.sleep(float(r.headers.get("retry-after", "0.2")))
                raise RuntimeError(r.text)

            ids = list(pool.map(create, range(args.sandboxes)))
        print(f"created {len(ids)} sandboxes in {time.perf_counter() - t0:.1f} s")
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/console/login", data={"api_key": key})
            assert r.status_code == 303, r.text
            params = [("state", s) for s in LIVE] + [("limit", "1000")]
            page = timed(lambda: c.get("/console/sandboxes").raise_for_status(), args.runs)
            listing = timed(lambda: c.get("/v1/sandboxes", params=params).raise_for_status(), args.runs)
            latest = timed(lambda: c.get("/v1/sandboxes/metrics").raise_for_status(), args.runs)
            floor = timed(lambda: c.get("/healthz").raise_for_status(), args.runs)
            size = len(c.get("/v1/sandboxes", params=params).content)
        print(f"\n{'request (loopback, ' + str(args.runs) + ' runs)':<46} {'median ms':>10} {'p90 ms':>8}")
        print(f"{'GET /healthz (floor)':<46} {floor[0]:>10.1f} {floor[1]:>8.1f}")
        print(f"{'GET /console/sandboxes (the page)':<46} {page[0]:>10.1f} {page[1]:>8.1f}")
        print(
            f"{f'GET /v1/sandboxes ({len(ids)} items, {size // 1024} KiB)':<46} {listing[0]:>10.1f} {listing[1]:>8.1f}"
        )
        print(f"{'GET /v1/sandboxes/metrics (CPU, memory now)':<46} {latest[0]:>10.1f} {latest[1]:>8.1f}")
        browser(srv, key, ids)
    finally:
        if key:  # the server's close() kills its admin tenant's sandboxes only: these are another's
            with srv.client(key) as api, ThreadPoolExecutor(4) as pool:
                items = api.get("/v1/sandboxes", params=[("state", s) for s in LIVE] + [("limit", "1000")])
                list(pool.map(lambda sb: api.delete(f"/v1/sandboxes/{sb['id']}"), items.json()["items"]))
        srv.close()


def browser(srv: Server, key: str, ids: list[str]) -> None:
    chromium = "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("(playwright not installed: no browser figures)")
        return
    if not os.path.exists(chromium):
        print("(no chromium: no browser figures)")
        return
    stop = threading.Event()

    def churn() -> None:  # a quarter of the sandboxes change state under the page
        with srv.client(key) as api:
            while not stop.is_set():
                for sid in ids[: len(ids) // 4]:
                    api.post(f"/v1/sandboxes/{sid}/pause")
                for sid in ids[: len(ids) // 4]:
                    api.post(f"/v1/sandboxes/{sid}/resume")

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = b.new_page(base_url=srv.url)
        page.goto("/console/login")
        page.fill("#api_key", key)
        t0 = time.perf_counter()
        page.click("#sign-in")
        page.wait_for_function(f"() => document.querySelectorAll('#sandboxes tbody tr').length >= {len(ids)}")
        first = (time.perf_counter() - t0) * 1000
        thread = threading.Thread(target=churn, daemon=True)
        thread.start()
        refreshes = []
        for _ in range(10):
            page.wait_for_timeout(2100)
            text = page.locator("#updated").text_content() or ""
            m = re.search(r"\((\d+) ms\)", text)
            if m:
                refreshes.append(int(m.group(1)))
        lag = page.evaluate("""async () => { const t = performance.now();
            await new Promise(r => setTimeout(r, 0)); return performance.now() - t; }""")
        stop.set()
        thread.join()
        b.close()
    print(
        f"\nbrowser: sign-in to {len(ids)} rows shown {first:.0f} ms; refresh (fetch + render) while "
        f"{len(ids) // 4} change state: median {statistics.median(refreshes):.0f} ms, max {max(refreshes)} ms; "
        f"event-loop lag {lag:.1f} ms"
    )


if __name__ == "__main__":
    main()
