"""Scale: warm-pool creates, concurrency, sustained rate, idle density, hibernated sandboxes.

    .venv/bin/python bench/scale.py [--quick] [--idle 500] [--hibernated 5000] [--rate 50 --duration 60]
    .venv/bin/python bench/scale.py --only sustained --rate 30 --duration 30   # one part alone

Each figure is beside its floor measured in the same run (bubblewrap `true`, a raw exec), and the
plots (latency distributions, cost growth with the number of sandboxes) go to docs/bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from core import BWRAP, _cpu_ms, _spawn, _time
from cove.devserver import Server
from cove.node.namespaces.cgroups import Cgroup

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ROOT / "docs" / "bench"
PARTS = ("pool", "concurrent", "sustained", "cold", "idle", "hibernated")


@dataclass
class Sizes:
    creates: int = 200
    concurrent: int = 100
    rate: int = 50
    safe_rate: int = 35  # a second sustained run, at a rate 2 cores serve (0: none)
    duration: float = 60
    idle: int = 500
    hibernated: int = 5000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(creates=100, concurrent=50, rate=20, safe_rate=0, duration=10, idle=100, hibernated=50)


@dataclass
class Result:
    sizes: Sizes
    pool_create: list[float] = field(default_factory=list)
    bwrap_true: list[float] = field(default_factory=list)
    pool_hits: int = 0
    pool_misses: int = 0
    cold_create: list[float] = field(default_factory=list)
    concurrent_s: float = 0.0
    concurrent_lat: list[float] = field(default_factory=list)
    sustained: dict = field(default_factory=dict)
    sustained_safe: dict = field(default_factory=dict)
    idle: dict = field(default_factory=dict)
    growth: list[dict] = field(default_factory=list)
    hibernated: dict = field(default_factory=dict)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def server_rss_mib(srv: Server) -> float:
    """The server process itself, plus its launcher (fork server)."""
    total = rss_kib(srv.proc.pid)  # type: ignore[union-attr]
    for child in Path(f"/proc/{srv.proc.pid}/task").iterdir():  # type: ignore[union-attr]
        with open(child / "children") as f:
            total += sum(rss_kib(int(p)) for p in f.read().split())
    return total / 1024


def wait_ready(c: httpx.Client, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.get("/v1/pools/base").json()["ready"] >= n:
            return
        time.sleep(0.1)


def wait_settled(c: httpx.Client, timeout: float = 120) -> None:
    """Until the base pool has its target and starts nothing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = c.get("/v1/pools/base").json()
        if not p["starting"] and p["ready"] >= p["target"]:
            return
        time.sleep(0.2)


def pool_creates(srv: Server, c: httpx.Client, res: Result) -> None:
    """Create → first exec output from the pool, beside bubblewrap `true`, interleaved."""
    bwrap = shutil.which("bwrap")
    true = shutil.which("true") or "/bin/true"
    before = c.get("/v1/pools/base").json()
    made: list[str] = []
    for i in range(res.sizes.creates):
        if i % 16 == 0:
            # Measure claims, not the refill or the teardown of the last batch racing them: both
            # run here, between batches (their cost is the sustained run's).
            for sid in made:
                c.delete(f"/v1/sandboxes/{sid}")
            made.clear()
            wait_settled(c)
        if bwrap:
            res.bwrap_true.append(_time(lambda: _spawn([bwrap, *BWRAP, true])))
        t = time.perf_counter()
        sid = c.post("/v1/sandboxes", json={}).json()["id"]
        out = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo hi"}).json()["stdout"]
        res.pool_create.append((time.perf_counter() - t) * 1000)
        assert out == "hi\n", out
        made.append(sid)
    for sid in made:
        c.delete(f"/v1/sandboxes/{sid}")
    after = c.get("/v1/pools/base").json()
    res.pool_hits = after["hits"] - before["hits"]
    res.pool_misses = after["misses"] - before["misses"]


def cold_creates(c: httpx.Client, res: Result, n: int = 30) -> None:
    """The same without a pool (a template that is not pooled: pool min/max 0)."""
    c.put("/v1/pools/base", json={"min": 0, "max": 0}).raise_for_status()
    time.sleep(0.5)
    for _ in range(n):
        t = time.perf_counter()
        sid = c.post("/v1/sandboxes", json={}).json()["id"]
        c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo hi"}).raise_for_status()
        res.cold_create.append((time.perf_counter() - t) * 1000)
        c.delete(f"/v1/sandboxes/{sid}")


async def _create_exec(ac: httpx.AsyncClient) -> tuple[str, float]:
    t = time.perf_counter()
    r = await ac.post("/v1/sandboxes", json={})
    r.raise_for_status()
    sid = r.json()["id"]
    out = await ac.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo hi"})
    out.raise_for_status()
    assert out.json()["stdout"] == "hi\n"
    return sid, (time.perf_counter() - t) * 1000


def concurrent(srv: Server, res: Result) -> None:
    n = res.sizes.concurrent

    async def go() -> None:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        headers = {"Authorization": f"Bearer {srv.api_key}"}
        async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=120, limits=limits) as ac:
            t = time.perf_counter()
            done = await asyncio.gather(*(_create_exec(ac) for _ in range(n)))
            res.concurrent_s = time.perf_counter() - t
            res.concurrent_lat = [ms for _, ms in done]
            await asyncio.gather(*(ac.delete(f"/v1/sandboxes/{sid}") for sid, _ in done))

    asyncio.run(go())


def sustained(srv: Server, res: Result, rate: int) -> dict:
    """`rate` creates (each with an exec, then a kill) per second for `duration` seconds."""
    duration = res.sizes.duration
    out: dict = {}

    async def go() -> None:
        client = loadgen.Client(srv.url, srv.api_key, connections=256)
        lat: list[float] = []
        errors: list[str] = []
        kinds: Counter[str] = Counter()

        async def one() -> None:
            t = time.perf_counter()
            try:
                sid = (await client.request("POST", "/v1/sandboxes", {}))["id"]
                out = await client.request("POST", f"/v1/sandboxes/{sid}/exec", {"cmd": "echo hi"})
                assert out["stdout"] == "hi\n", out
                lat.append((time.perf_counter() - t) * 1000)
                await client.request("DELETE", f"/v1/sandboxes/{sid}")
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                kinds[error_kind(e)] += 1

        tasks = []
        cpu0 = cpu_split(srv)
        start = time.perf_counter()
        for i in range(int(rate * duration)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        await asyncio.sleep(2)  # the last teardowns
        cpu = {k: (v - cpu0[k]) / len(tasks) for k, v in cpu_split(srv).items()}
        await client.close()
        out.update(
            {
                "cpu": cpu,
                "rate": rate,
                "duration": duration,
                "count": len(tasks),
                "errors": len(errors),
                "first_error": errors[0] if errors else "",
                "kinds": dict(kinds),
                "lat": lat,
                "wall": wall,
            }
        )

    asyncio.run(go())
    return out


def cpu_split(srv: Server) -> dict[str, float]:
    """CPU ms used so far: the whole machine, the server with its launcher, every sandbox (the cgroup
    tree keeps what its removed children used) and this client."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    machine = (sum(v) - v[3] - v[4]) * 1000 / hz
    server = _cpu_ms(srv.proc.pid)  # type: ignore[union-attr]
    for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():  # type: ignore[union-attr]
        with open(task / "children") as f:
            server += sum(_cpu_ms(int(p)) for p in f.read().split())
    sandboxes = (Cgroup(srv.cgroup_parent).cpu_usage_usec() or 0) / 1000
    return {"machine": machine, "server": server, "sandboxes": sandboxes, "client": _cpu_ms(os.getpid())}


def error_kind(e: Exception) -> str:
    """`ReadError`, or an HTTP error by status and cove's error code (`503 server_busy`)."""
    if isinstance(e, loadgen.HTTPError):
        return f"{e.status} {e.code}".strip()
    if isinstance(e, httpx.HTTPStatusError):
        try:
            code = e.response.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = ""
        return f"{e.response.status_code} {code}".strip()
    return type(e).__name__


def idle_density(srv: Server, c: httpx.Client, res: Result) -> None:
    """`idle` running sandboxes: server RSS and sandbox memory as they accumulate, and exec
    latency while they idle, beside a raw fork+exec."""
    n = res.sizes.idle
    ids: list[str] = []
    step = max(1, n // 5)
    base_rss = server_rss_mib(srv)
    res.growth.append({"n": 0, "server_mib": base_rss, "sandboxes_mib": 0.0})
    try:
        while len(ids) < n:
            r = c.post("/v1/sandboxes", json={"timeout": 0})
            r.raise_for_status()
            ids.append(r.json()["id"])
            if len(ids) % step == 0 or len(ids) == n:
                time.sleep(0.5)
                mem = sum(Cgroup(f"{srv.cgroup_parent}/{sid}").memory_usage() or 0 for sid in ids)
                res.growth.append(
                    {"n": len(ids), "server_mib": server_rss_mib(srv), "sandboxes_mib": mem / 2**20}
                )
        time.sleep(2)  # let them settle into idleness
        wait_settled(c)  # and the pool's refill finish: measure the server with idle sandboxes only
        target = ids[len(ids) // 2]
        for _ in range(10):
            c.post(f"/v1/sandboxes/{target}/exec", json={"argv": ["true"]})
        lat = [
            _time(lambda: c.post(f"/v1/sandboxes/{target}/exec", json={"argv": ["true"]}).raise_for_status())
            for _ in range(200)
        ]
        floor = [_time(lambda: _spawn([shutil.which("true") or "/bin/true"])) for _ in range(200)]
        pss = 0
        sample = ids[:: max(1, n // 20)]
        for sid in sample:
            for pid in Cgroup(f"{srv.cgroup_parent}/{sid}").pids():
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        pss += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
                except (OSError, StopIteration):
                    pass
        last = res.growth[-1]
        res.idle = {
            "n": n,
            "exec": lat,
            "floor": floor,
            "server_mib": last["server_mib"],
            # slope over the sandboxes created (the first sample holds start-up garbage)
            "server_per_sandbox_kib": max(0.0, last["server_mib"] - res.growth[1]["server_mib"])
            * 1024
            / max(1, n - res.growth[1]["n"]),
            "cgroup_per_sandbox_mib": last["sandboxes_mib"] / n,
            "pss_per_sandbox_mib": pss / len(sample) / 1024,
        }
    finally:
        for sid in ids:
            c.delete(f"/v1/sandboxes/{sid}")


def hibernated(srv: Server, c: httpx.Client, res: Result) -> None:
    """`hibernated` sandboxes hibernated one after another, then each resumed (an exec) and killed."""
    n = res.sizes.hibernated
    ids: list[str] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        r = c.post("/v1/sandboxes", json={"timeout": 0})
        r.raise_for_status()
        sid = r.json()["id"]
        c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": f"echo {sid} > /home/user/id"}).raise_for_status()
        h = c.post(f"/v1/sandboxes/{sid}/hibernate", timeout=600)
        if h.status_code != 200:
            errors.append(h.text[:200])
        ids.append(sid)
    create_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in (srv.home / "checkpoints").rglob("*") if f.is_file())
    held = server_rss_mib(srv)
    t1 = time.perf_counter()
    resumed = 0
    for sid in ids:
        r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /home/user/id"}, timeout=600)
        if r.status_code == 200 and r.json()["stdout"].strip() == sid:
            resumed += 1
        else:
            errors.append(r.text[:200])
        c.delete(f"/v1/sandboxes/{sid}")
    res.hibernated = {
        "n": n,
        "hibernate_s": create_s,
        "resume_s": time.perf_counter() - t1,
        "resumed": resumed,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "checkpoint_mib_each": disk / max(1, n) / 2**20,
        "server_mib": held,
    }


def run(sizes: Sizes, skip: set[str] | None = None, env: dict[str, str] | None = None) -> Result:
    """Every part of PARTS not in `skip`, on one server (`env`: extra COVE_* settings for it)."""
    skip = skip or set()
    res = Result(sizes)
    srv = Server("bench-scale", extra_env={"COVE_POOLS": "base=32:128", "COVE_KERNEL": "0", **(env or {})})
    srv.start()
    try:
        with srv.client() as c:
            wait_ready(c, 32)
            if "pool" not in skip:
                pool_creates(srv, c, res)
                wait_ready(c, 32)
            if "concurrent" not in skip:
                concurrent(srv, res)
            if "sustained" not in skip:
                if sizes.safe_rate:
                    wait_ready(c, 32)
                    res.sustained_safe = sustained(srv, res, sizes.safe_rate)
                wait_ready(c, 32)
                res.sustained = sustained(srv, res, sizes.rate)
            if "cold" not in skip:
                cold_creates(c, res)
            c.put("/v1/pools/base", json={"min": 2, "max": 16}).raise_for_status()
            if "idle" not in skip:
                idle_density(srv, c, res)
            if "hibernated" not in skip:
                hibernated(srv, c, res)
    finally:
        srv.close()
    return res


def plots(res: Result) -> list[str]:
    """PNG plots under docs/bench/; returns their paths relative to docs/."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = []

    fig, ax = plt.subplots(figsize=(7, 4))
    series = [
        ("bubblewrap `true` (floor)", res.bwrap_true),
        ("cove: pool create → first output", res.pool_create),
        ("cove: cold create → first output", res.cold_create),
        (f"cove: {res.sizes.concurrent} concurrent (each)", res.concurrent_lat),
        ("cove: sustained rate (each)", res.sustained.get("lat", [])),
    ]
    for name, samples in series:
        if samples:
            s = sorted(samples)
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of creates")
    ax.set_title("Create → first exec output (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / "create-latency.png", dpi=110)
    plt.close(fig)
    out.append("bench/create-latency.png")

    if res.growth:
        fig, ax = plt.subplots(figsize=(7, 4))
        n = [g["n"] for g in res.growth]
        ax.plot(n, [g["server_mib"] for g in res.growth], marker="o", label="server + launcher RSS")
        ax.plot(
            n, [g["sandboxes_mib"] for g in res.growth], marker="o", label="sandboxes (cgroup memory, sum)"
        )
        ax.set_xlabel("idle sandboxes")
        ax.set_ylabel("MiB")
        ax.set_title("Memory as idle sandboxes accumulate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLOTS / "idle-memory.png", dpi=110)
        plt.close(fig)
        out.append("bench/idle-memory.png")

    if res.idle:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.hist(res.idle["exec"], bins=40, alpha=0.7, label=f"cove exec `true`, {res.idle['n']} idle")
        ax.hist(res.idle["floor"], bins=40, alpha=0.7, label="fork+exec `true` (floor)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        ax.set_title("Exec round trip while sandboxes idle")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(PLOTS / "exec-idle.png", dpi=110)
        plt.close(fig)
        out.append("bench/exec-idle.png")
    return out


def render(res: Result, images: list[str]) -> list[str]:
    s = res.sizes
    bw = statistics.median(res.bwrap_true) if res.bwrap_true else float("nan")
    p50 = statistics.median(res.pool_create) if res.pool_create else float("nan")
    p99 = pct(res.pool_create, 0.99)
    lines = [
        "## Warm pools and scale",
        "A server with a `base` pool of 32 (growing to 128 under demand). *Pool create* is `POST",
        "/v1/sandboxes` + `POST …/exec` of `echo hi` on one keep-alive connection, a claimed pooled",
        "sandbox each time, beside bubblewrap `true` run interleaved (the same namespaces, /proc, /dev",
        "and a tmpfs); between batches of 16 the loop deletes them and waits for the refill, so it",
        "measures claims, not the refill or the teardown; *cold* is the same with the pool set to 0.",
        "The sustained runs go through a lean keep-alive client (`bench/loadgen.py`), open loop.",
        "Targets: pool p50 ≤ 5 ms, p99 ≤ 20 ms; 100 concurrent ≤ 3 s; the rate with no error; exec",
        "p50 ≤ 5 ms while the sandboxes idle; ≤ 15 MB per idle sandbox.",
        "",
        "| measurement | p50 ms | p99 ms | n | note |",
        "|---|---|---|---|---|",
    ]
    if res.pool_create:
        lines += [
            f"| bubblewrap `true` (floor) | {bw:.2f} | {pct(res.bwrap_true, 0.99):.2f} | {len(res.bwrap_true)} | |",
            f"| cove: create from the pool → first exec output | {p50:.2f} | {p99:.2f} | {len(res.pool_create)} | "
            f"{p50 / bw:.1f}× bubblewrap; {res.pool_hits} hits, {res.pool_misses} misses |",
        ]
    if res.cold_create:
        lines.append(
            f"| cove: cold create (no pool) → first exec output | {statistics.median(res.cold_create):.2f} | "
            f"{pct(res.cold_create, 0.99):.2f} | {len(res.cold_create)} | |"
        )
    if res.concurrent_lat:
        lines.append(
            f"| cove: {s.concurrent} concurrent creates with exec, each | "
            f"{statistics.median(res.concurrent_lat):.1f} | {pct(res.concurrent_lat, 0.99):.1f} | "
            f"{s.concurrent} | all done in **{res.concurrent_s:.2f} s** |"
        )
    for st in (res.sustained_safe, res.sustained):
        if not st:
            continue
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(st["kinds"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| cove: {st['rate']} creates/s for {st['duration']:g} s (create, exec, kill), each | "
            f"{statistics.median(st['lat']) if st['lat'] else float('nan'):.1f} | {pct(st['lat'], 0.99):.1f} | "
            f"{len(st['lat'])} of {st['count']} | **{st['errors']} errors**{' (' + kinds + ')' if st['errors'] else ''}; "
            f"finished in {st['wall']:.1f} s |"
        )
    idle = res.idle
    if idle:
        lines += [
            f"| cove: exec `true` while {idle['n']} sandboxes idle | {statistics.median(idle['exec']):.2f} | "
            f"{pct(idle['exec'], 0.99):.2f} | {len(idle['exec'])} | |",
            f"| fork+exec `true` on the host (floor) | {statistics.median(idle['floor']):.2f} | "
            f"{pct(idle['floor'], 0.99):.2f} | {len(idle['floor'])} | |",
            "",
            "| idle sandboxes | server + launcher RSS | server RSS per sandbox | cgroup memory per sandbox | PSS per sandbox |",
            "|---|---|---|---|---|",
            f"| {idle['n']} | {idle['server_mib']:.0f} MiB | {idle['server_per_sandbox_kib']:.0f} KiB | "
            f"{idle['cgroup_per_sandbox_mib']:.2f} MiB | {idle['pss_per_sandbox_mib']:.2f} MiB |",
        ]
    for st in (res.sustained_safe, res.sustained):
        cpu = st.get("cpu") if st else None
        if not cpu or st["errors"]:
            continue  # refused creates cost a little and count as cycles: only a clean run splits right
        other = cpu["machine"] - cpu["server"] - cpu["sandboxes"] - cpu["client"]
        lines += [
            "",
            f"CPU per create, exec and kill at {st['rate']}/s: **{cpu['machine']:.1f} ms** "
            f"(server and launcher {cpu['server']:.1f}, the sandbox's own processes {cpu['sandboxes']:.1f}, "
            f"this load client {cpu['client']:.1f}, the rest {other:.1f}: a launch before its sandbox's cgroup "
            f"and kernel threads); {os.cpu_count()} cores serve at most "
            f"≈ {os.cpu_count() * 1000 / cpu['machine']:.0f} per second.",
        ]
    h = res.hibernated
    if h:
        lines += [
            "",
            f"**{h['n']} hibernated sandboxes**: created, written to and hibernated one after another in "
            f"{h['hibernate_s']:.0f} s ({h['hibernate_s'] / h['n'] * 1000:.0f} ms each), "
            f"{h['checkpoint_mib_each']:.1f} MiB of checkpoint each on disk, server RSS {h['server_mib']:.0f} MiB "
            f"with all of them hibernated; then each resumed by an exec that reads its file back and killed: "
            f"{h['resumed']} of {h['n']} resumed in {h['resume_s']:.0f} s "
            f"({h['resume_s'] / h['n'] * 1000:.0f} ms each), {h['errors']} errors"
            f"{' (' + h['first_error'] + ')' if h['errors'] else ''}. At the default 5,000 this takes about "
            f"{(h['hibernate_s'] + h['resume_s']) / h['n'] * 5000 / 60:.0f} minutes here.",
        ]
    if images:
        lines += ["", *(f"![{Path(i).stem}]({i})" for i in images)]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smaller counts (100 creates, 100 idle, 50 hibernated)"
    )
    ap.add_argument("--creates", type=int)
    ap.add_argument("--concurrent", type=int)
    ap.add_argument("--rate", type=int, help="creates per second for the sustained run")
    ap.add_argument("--safe-rate", type=int, help="creates per second for a second sustained run (0: none)")
    ap.add_argument("--duration", type=float, help="seconds of the sustained run")
    ap.add_argument("--idle", type=int, help="idle running sandboxes")
    ap.add_argument("--hibernated", type=int, help="hibernated sandboxes (each resumed afterwards)")
    ap.add_argument(
        "--only", help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all; no plots)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/scale.py needs root (it starts a cove server)")
    only = set(args.only.split(",")) if args.only else set(PARTS)
    if only - set(PARTS):
        sys.exit(f"--only: unknown parts {sorted(only - set(PARTS))}; parts: {', '.join(PARTS)}")
    res = run(sizes_from(args), skip=set(PARTS) - only)
    # Part of a run would overwrite the plots in docs/bench/ with part of the data: print only.
    print("\n".join(render(res, plots(res) if only == set(PARTS) else [])))


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    for name in ("creates", "concurrent", "rate", "safe_rate", "duration", "idle", "hibernated"):
        if getattr(args, name, None) is not None:
            setattr(sizes, name, getattr(args, name))
    return sizes


if __name__ == "__main__":
    main()
