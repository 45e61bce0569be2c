"""Stateful workspaces: pause/resume, snapshots at growing sizes (vs. `cp -a`), forks into N children."""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import httpx

from cove.devserver import Server


def _ms(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000


def _ok(r: httpx.Response) -> dict:
    r.raise_for_status()
    return r.json() if r.content else {}


def run(
    pause_runs: int = 50, sizes_mb: tuple[int, ...] = (10, 1024, 5120), forks: tuple[int, ...] = (1, 5, 10)
) -> dict:
    srv = Server("bench-stateful")
    srv.start()
    out: dict = {"pause": [], "resume": [], "snapshot": [], "fork": []}
    try:
        with srv.client() as c:
            sid = _ok(c.post("/v1/sandboxes", json={"timeout": 0}))["id"]
            for _ in range(pause_runs):
                out["pause"].append(_ms(lambda: _ok(c.post(f"/v1/sandboxes/{sid}/pause"))))
                out["resume"].append(_ms(lambda: _ok(c.post(f"/v1/sandboxes/{sid}/resume"))))
            c.delete(f"/v1/sandboxes/{sid}")

            for size in sizes_mb:
                sid = _ok(c.post("/v1/sandboxes", json={"timeout": 0}))["id"]
                cmd = f"dd if=/dev/urandom of=/home/user/data bs=1M count={size} status=none"
                _ok(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 600}))
                snap_url = f"/v1/sandboxes/{sid}/snapshots"
                dirty = _ms(lambda url: _ok(c.post(url, json={})), snap_url)
                subprocess.run(["sync"], check=True)
                clean = _ms(lambda url: _ok(c.post(url, json={})), snap_url)
                upper = srv.home / "storage" / "active" / sid / "upper"
                with tempfile.TemporaryDirectory(dir=srv.home) as tmp:
                    copy = _ms(subprocess.run, ["cp", "-a", str(upper), os.path.join(tmp, "u")])
                out["snapshot"].append({"mb": size, "dirty_ms": dirty, "clean_ms": clean, "cp_ms": copy})
                c.delete(f"/v1/sandboxes/{sid}")
                for snap in _ok(c.get("/v1/snapshots"))["items"]:
                    c.delete(f"/v1/snapshots/{snap['id']}")

            sid = _ok(c.post("/v1/sandboxes", json={"timeout": 0}))["id"]
            cmd = "head -c 100000000 /dev/urandom > /home/user/data && sync"
            _ok(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 600}))
            for n in forks:
                t = time.perf_counter()
                children = _ok(c.post(f"/v1/sandboxes/{sid}/fork", json={"count": n}, timeout=600))["items"]
                took = (time.perf_counter() - t) * 1000
                out["fork"].append({"n": n, "ms": took})
                for child in children:
                    c.delete(f"/v1/sandboxes/{child['id']}")
            c.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.close()
    return out


def render(res: dict) -> list[str]:
    p, r = res["pause"], res["resume"]
    rt = [a + b for a, b in zip(p, r, strict=True)]
    lines = [
        "## Pause and resume",
        "API round trips (`POST …/pause`, `POST …/resume`) on an idle sandbox; the freeze itself is the",
        "kernel's cgroup freezer. Target: pause + resume ≤ 5 ms.",
        "",
        "| measurement | p50 ms | p95 ms | runs |",
        "|---|---|---|---|",
        f"| pause | {statistics.median(p):.2f} | {sorted(p)[int(0.95 * len(p))]:.2f} | {len(p)} |",
        f"| resume | {statistics.median(r):.2f} | {sorted(r)[int(0.95 * len(r))]:.2f} | {len(r)} |",
        f"| pause + resume | {statistics.median(rt):.2f} | {sorted(rt)[int(0.95 * len(rt))]:.2f} | {len(rt)} |",
        "",
        "## Filesystem snapshots",
        "`POST …/snapshots` of a sandbox that wrote one file of the given size, beside the floor the design",
        "avoids (`cp -a` of the same upper dir). *Dirty*: right after the write, so btrfs first flushes the",
        "data still in the page cache; *clean*: after `sync`. Target: ≤ 50 ms at any size.",
        "",
        "| written | snapshot, dirty ms | snapshot, clean ms | `cp -a` of the upper dir ms |",
        "|---|---|---|---|",
    ]
    for s in res["snapshot"]:
        lines.append(f"| {s['mb']} MB | {s['dirty_ms']:.1f} | {s['clean_ms']:.1f} | {s['cp_ms']:.1f} |")
    lines += [
        "",
        "## Fork",
        "`POST …/fork` of a sandbox holding 100 MB of files, into N children (all running when it returns).",
        "Target: fork into 10 ≤ 2 s.",
        "",
        "| children | total ms | per child ms |",
        "|---|---|---|",
    ]
    for f in res["fork"]:
        lines.append(f"| {f['n']} | {f['ms']:.0f} | {f['ms'] / f['n']:.0f} |")
    return lines
