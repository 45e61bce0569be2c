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
from cove.node import checkpoint


def _ms(fn: Callable[..., object], *args: object) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1000


def _ok(r: httpx.Response) -> dict:
    r.raise_for_status()
    return r.json() if r.content else {}


HOLDER = "import time; x = bytearray(%d << 20); x[::4096] = b'x' * len(x[::4096]); time.sleep(100000)"


def raw_criu(mb: int) -> tuple[float, float]:
    """The floor: CRIU dump and restore of the same kind of process on the host, no sandbox around it."""
    with tempfile.TemporaryDirectory() as img:
        proc = subprocess.Popen(
            ["setsid", "/usr/bin/python3", "-c", HOLDER % mb],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5 + mb / 1000)
        dump = _ms(subprocess.run, [checkpoint.CRIU, "dump", "-t", str(proc.pid), "-D", img, "-o", "d.log"])
        proc.wait()
        pidfile = os.path.join(img, "pid")
        argv = [checkpoint.CRIU, "restore", "-D", img, "-d", "-o", "r.log", "--pidfile", pidfile]
        restore = _ms(subprocess.run, argv)
        try:
            with open(pidfile) as f:
                os.kill(int(f.read()), 9)
        except (OSError, ValueError):
            pass
    return dump, restore


def run_memory(sizes_mb: tuple[int, ...] = (10, 100, 1024), forks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Hibernate/resume of a sandbox holding an N MB Python process; forks of a 100 MB one."""
    out: dict = {"hibernate": [], "fork": []}
    if not checkpoint.available():
        return out
    srv = Server("bench-memory")
    srv.start()
    try:
        with srv.client() as c:
            for mb in sizes_mb:
                sid = _ok(c.post("/v1/sandboxes", json={"timeout": 0, "memory_mb": mb + 512}))["id"]
                cmd = (
                    f'setsid python3 -c "{HOLDER % mb}" >/dev/null 2>&1 </dev/null & sleep {0.5 + mb / 1000}'
                )
                _ok(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 120}))
                hibs, ress, raws = [], [], []
                for _ in range(3):  # median of 3 cycles on the same sandbox
                    hibs.append(
                        _ms(lambda url: _ok(c.post(url, timeout=600)), f"/v1/sandboxes/{sid}/hibernate")
                    )
                    ress.append(_ms(lambda url: _ok(c.post(url, timeout=600)), f"/v1/sandboxes/{sid}/resume"))
                    raws.append(raw_criu(mb))
                hib, res = statistics.median(hibs), statistics.median(ress)
                raw_dump = statistics.median(r[0] for r in raws)
                raw_restore = statistics.median(r[1] for r in raws)
                row = {
                    "mb": mb,
                    "hibernate": hib,
                    "resume": res,
                    "raw_dump": raw_dump,
                    "raw_restore": raw_restore,
                }
                out["hibernate"].append(row)
                c.delete(f"/v1/sandboxes/{sid}")
            sid = _ok(c.post("/v1/sandboxes", json={"timeout": 0}))["id"]
            cmd = f'setsid python3 -c "{HOLDER % 100}" >/dev/null 2>&1 </dev/null & sleep 0.6'
            _ok(c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}))
            for n in forks:
                t = time.perf_counter()
                r = _ok(c.post(f"/v1/sandboxes/{sid}/fork", json={"count": n}, timeout=600))
                out["fork"].append({"n": n, "ms": (time.perf_counter() - t) * 1000, "memory": r["memory"]})
                for child in r["items"]:
                    c.delete(f"/v1/sandboxes/{child['id']}")
            c.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.close()
    return out


def render_memory(res: dict) -> list[str]:
    if not res["hibernate"]:
        return ["## Hibernate and fork with memory", "", "Skipped: no CRIU >= 4.1 on this machine."]
    lines = [
        "## Hibernate and resume with memory (CRIU)",
        "`POST …/hibernate` and `POST …/resume` of a sandbox whose Python process holds N MB, beside raw",
        "CRIU dump and restore of the same kind of process on the host (no namespaces, no overlay) in the",
        "same run (medians of 3). Targets: hibernate and resume of a 100 MB process ≤ 300 ms each.",
        "",
        "| process memory | hibernate ms | resume ms | raw `criu dump` ms | raw `criu restore` ms |",
        "|---|---|---|---|---|",
    ]
    for h in res["hibernate"]:
        lines.append(
            f"| {h['mb']} MB | {h['hibernate']:.0f} | {h['resume']:.0f} | {h['raw_dump']:.0f} | {h['raw_restore']:.0f} |"
        )
    lines += [
        "",
        "## Fork with memory",
        "`POST …/fork` of a sandbox whose Python process holds 100 MB: one checkpoint, N concurrent restores",
        "(each child runs the same process from the same instant). Target: 10 children ≤ 2 s.",
        "",
        "| children | total ms | per child ms | memory kept |",
        "|---|---|---|---|",
    ]
    for f in res["fork"]:
        lines.append(
            f"| {f['n']} | {f['ms']:.0f} | {f['ms'] / f['n']:.0f} | {'yes' if f['memory'] else 'no'} |"
        )
    return lines


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
        "avoids (`cp -a` of the same upper dir). *Dirty*: right after the write, so the data still in the",
        "page cache is written back first (cove does that before it freezes the sandbox, which runs on",
        "meanwhile); *clean*: after `sync`. Target: ≤ 50 ms at any size.",
        "",
        "| written | snapshot, dirty ms | snapshot, clean ms | `cp -a` of the upper dir ms |",
        "|---|---|---|---|",
    ]
    for s in res["snapshot"]:
        lines.append(f"| {s['mb']} MB | {s['dirty_ms']:.1f} | {s['clean_ms']:.1f} | {s['cp_ms']:.1f} |")
    lines += [
        "",
        "## Fork of files",
        "`POST …/fork` of a sandbox holding 100 MB of files (no process to carry over), into N children, all",
        "running when it returns.",
        "",
        "| children | total ms | per child ms |",
        "|---|---|---|",
    ]
    for f in res["fork"]:
        lines.append(f"| {f['n']} | {f['ms']:.0f} | {f['ms'] / f['n']:.0f} |")
    return lines
