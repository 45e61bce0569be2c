"""An exposed port: request latency and throughput through cove's proxy, beside the same server's twin
on host loopback (the floor), measured interleaved in one run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import httpx

from core import Row
from cove import Sandbox
from cove.devserver import Server, free_port

PORT = 8000
BIG = 64 << 20  # bytes per throughput sample


def _wait(url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def _mbps(client: httpx.Client, url: str) -> float:
    got, t = 0, time.perf_counter()
    with client.stream("GET", url) as r:
        for chunk in r.iter_bytes(1 << 20):
            got += len(chunk)
    return got / (time.perf_counter() - t) / 1e6


def run(runs: int = 200) -> dict:
    srv = Server("bench-ports")
    srv.start()
    local_dir = tempfile.mkdtemp(prefix="cove-bench-ports-")
    local_port = free_port()
    local = None
    try:
        sb = Sandbox.create(url=srv.url, api_key=srv.api_key, timeout=900)
        sb.exec(f"head -c {BIG} /dev/urandom > /home/user/big && echo hi > /home/user/small")
        sb.processes.start(f"python3 -m http.server {PORT} --bind 127.0.0.1", cwd="/home/user")
        with open(os.path.join(local_dir, "small"), "w") as f:
            f.write("hi\n")
        with open(os.path.join(local_dir, "big"), "wb") as f:
            f.write(os.urandom(BIG))
        local = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(local_port), "--bind", "127.0.0.1"],
            cwd=local_dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        auth = {"Authorization": f"Bearer {srv.api_key}"}
        proxied = f"{srv.url}/v1/sandboxes/{sb.id}/ports/{PORT}"
        direct = f"http://127.0.0.1:{local_port}"
        _wait(proxied + "/small", auth)
        _wait(direct + "/small", {})
        lat = Row("GET 3 bytes through cove"), Row("GET 3 bytes, host loopback")
        thr: tuple[list[float], list[float]] = ([], [])
        # A new connection per request on both sides (cove opens one into the sandbox per request).
        fresh = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(headers=auth, limits=fresh) as c, httpx.Client(limits=fresh) as d:
            for _ in range(runs):
                t = time.perf_counter()
                c.get(proxied + "/small")
                lat[0].samples_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                d.get(direct + "/small")
                lat[1].samples_ms.append((time.perf_counter() - t) * 1000)
        with httpx.Client(headers=auth, timeout=120) as c, httpx.Client(timeout=120) as d:
            for _ in range(5):
                thr[0].append(_mbps(c, proxied + "/big"))
                thr[1].append(_mbps(d, direct + "/big"))
        sb.kill()
        return {"latency": lat, "throughput": thr}
    finally:
        if local is not None:
            local.kill()
        srv.close()
        shutil.rmtree(local_dir, ignore_errors=True)


def render(res: dict) -> list[str]:
    cove_lat, floor_lat = res["latency"]
    cove_thr, floor_thr = res["throughput"]
    med = sorted
    return [
        "## Exposed ports",
        "A `python3 -m http.server` inside a sandbox, reached by path (`/v1/sandboxes/{id}/ports/8000/…`,",
        "API key) through cove's proxy, beside the same server on host loopback; a new connection per",
        f"request on both sides. Throughput: a {BIG >> 20} MiB file, 5 downloads each, median.",
        "",
        "| measurement | through cove | host loopback | ratio |",
        "|---|---|---|---|",
        f"| request latency p50 | {cove_lat.p50:.2f} ms | {floor_lat.p50:.2f} ms | {cove_lat.p50 / floor_lat.p50:.1f}× |",
        f"| request latency p95 | {cove_lat.pct(0.95):.2f} ms | {floor_lat.pct(0.95):.2f} ms | |",
        f"| download throughput | {med(cove_thr)[2]:.0f} MB/s | {med(floor_thr)[2]:.0f} MB/s | "
        f"{med(cove_thr)[2] / med(floor_thr)[2]:.2f}× |",
    ]


if __name__ == "__main__":
    print("\n".join(render(run())))
