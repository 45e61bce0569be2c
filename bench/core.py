"""Core benchmarks: create → first output, exec round trip, idle memory; each beside its floor.

The floors run in the same process, interleaved with cove's runs, so a noisy machine moves both.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from cove.devserver import Server

BWRAP = [
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
    "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin", "--tmpfs", "/tmp", "--proc", "/proc",
    "--dev", "/dev", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
    "--die-with-parent", "--new-session",
]  # fmt: skip
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc"]


@dataclass
class Row:
    name: str
    samples_ms: list[float] = field(default_factory=list)
    cpu_ms: float | None = None
    note: str = ""

    def pct(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(q * len(s)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_ms)


def _spawn(argv: list[str]) -> None:
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed")


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _cpu_ms(pid: int) -> float:
    """utime+stime of a process and its reaped children, in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")


def run(runs: int = 50, exec_runs: int = 200, idle: int = 10) -> dict[str, Row]:
    true = shutil.which("true") or "/bin/true"
    bwrap = shutil.which("bwrap")
    unshare = shutil.which("unshare")
    rows = {
        "fork_exec": Row("fork+exec `true` (floor)"),
        "unshare": Row("`unshare` user+pid+mnt+net+uts+ipc, `true`"),
        "bwrap_py": Row("bubblewrap + `python3 -c pass`"),
        "create": Row("cove: cold create (no pool) → first exec output"),
        "exec": Row("cove: exec round trip of `true` (HTTP)"),
    }
    srv = Server("bench", extra_env={"COVE_POOLS": ""})  # cold creates; pools: bench/scale.py
    srv.start()
    try:
        with srv.client() as c:
            c.delete(f"/v1/sandboxes/{c.post('/v1/sandboxes', json={}).json()['id']}")  # warm the template
            cpu_before = _cpu_ms(srv.proc.pid)  # type: ignore[union-attr]
            for _ in range(runs):
                rows["fork_exec"].samples_ms.append(_time(lambda: _spawn([true])))
                if unshare:
                    rows["unshare"].samples_ms.append(_time(lambda: _spawn([unshare, *UNSHARE, true])))
                if bwrap:
                    rows["bwrap_py"].samples_ms.append(
                        _time(lambda: _spawn([bwrap, *BWRAP, "/usr/bin/python3", "-c", "pass"]))
                    )
                t = time.perf_counter()
                sid = c.post("/v1/sandboxes", json={}).json()["id"]
                out = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo hi"}).json()["stdout"]
                rows["create"].samples_ms.append((time.perf_counter() - t) * 1000)
                assert out == "hi\n"
                c.delete(f"/v1/sandboxes/{sid}")
            # CPU of the server and its launcher children per create (kill included, exec excluded).
            rows["create"].cpu_ms = (_cpu_ms(srv.proc.pid) - cpu_before) / runs  # type: ignore[union-attr]

            sid = c.post("/v1/sandboxes", json={}).json()["id"]
            for _ in range(10):
                c.post(f"/v1/sandboxes/{sid}/exec", json={"argv": ["true"]})
            for _ in range(exec_runs):
                rows["exec"].samples_ms.append(
                    _time(
                        lambda: c.post(
                            f"/v1/sandboxes/{sid}/exec", json={"argv": ["true"]}
                        ).raise_for_status()
                    )
                )
            c.delete(f"/v1/sandboxes/{sid}")
            memory = idle_memory(srv, c, idle)
    finally:
        srv.close()
    rows = {k: v for k, v in rows.items() if v.samples_ms}
    return {"rows": rows, "memory": memory}  # type: ignore[return-value]


def _proc_kib(pid: int, field_name: str, path: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_memory(srv: Server, c: httpx.Client, n: int) -> dict[str, float]:
    """RSS and PSS of every process of `n` idle sandboxes (the guest agent), per sandbox."""
    ids = [c.post("/v1/sandboxes", json={}).json()["id"] for _ in range(n)]
    try:
        time.sleep(1)
        rss = pss = cg = 0
        for sid in ids:
            pids = _cgroup_pids(srv.cgroup_parent, sid)
            rss += sum(_proc_kib(p, "VmRSS", "status") for p in pids)
            pss += sum(_proc_kib(p, "Pss", "smaps_rollup") for p in pids)
            cg += _cgroup_memory(srv.cgroup_parent, sid)
        return {
            "sandboxes": n,
            "rss_mib": rss / n / 1024,
            "pss_mib": pss / n / 1024,
            "cgroup_mib": cg / n / 2**20,
        }
    finally:
        for sid in ids:
            c.delete(f"/v1/sandboxes/{sid}")


def _cgroup_pids(parent: str, sid: str) -> list[int]:
    from cove.node.namespaces.cgroups import Cgroup

    return Cgroup(f"{parent}/{sid}").pids()


def _cgroup_memory(parent: str, sid: str) -> int:
    from cove.node.namespaces.cgroups import Cgroup

    return Cgroup(f"{parent}/{sid}").memory_usage() or 0


class Lean:
    """A keep-alive HTTP/1.1 client on http.client (far less per request than httpx): the exec
    round trip measured with it is cove's, not the client library's."""

    def __init__(self, url: str, api_key: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80)
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def post(self, path: str, body: bytes) -> tuple[bytes, str]:
        """The body and the Server-Timing header of a 2xx reply."""
        self.conn.request("POST", path, body, self.headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{resp.status}: {data[:200]!r}")
        return data, resp.getheader("server-timing") or ""

    def close(self) -> None:
        self.conn.close()


def _server_timing(header: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


STAGES = {
    "auth": "routing, body read, API key (cached hash lookup)",
    "route": "dependencies, body validation",
    "store": "sandbox record read",
    "node": "node and guest client lookup",
    "connection": "guest connection (kept, or a new one)",
    "guest": "request sent, command spawned and run in the sandbox, reply read",
    "output": "result built and serialised",
}


def exec_path(runs: int = 500, stages: bool = False, compare: str | None = None) -> dict[str, object]:
    """The exec round trip of `true` through the HTTP API beside host fork+exec `true`, interleaved;
    with httpx (what the SDK uses) and with a lean client. `stages`: the server stamps each stage
    (COVE_TRACE_STAGES=1) and the breakdown's medians come back too. `compare`: another tree's
    `src` directory, served by a second server and timed in the same loop (before/after a change)."""
    true = shutil.which("true") or "/bin/true"
    env = {"COVE_POOLS": "", **({"COVE_TRACE_STAGES": "1"} if stages else {})}
    rows = {"fork_exec": Row("fork+exec `true` on the host (floor)")}
    sides = {"": env, **({" (compared tree)": {**env, "PYTHONPATH": compare}} if compare else {})}
    for tag in sides:
        rows["lean" + tag] = Row(f"cove{tag}: exec `true`, HTTP (lean keep-alive client)")
        rows["httpx" + tag] = Row(f"cove{tag}: exec `true`, HTTP (httpx keep-alive client)")
    breakdown: dict[str, list[float]] = {}
    servers = {tag: Server(f"bench-exec{i}", extra_env=e) for i, (tag, e) in enumerate(sides.items())}
    clients: dict[str, tuple[httpx.Client, Lean, str]] = {}
    body = b'{"argv": ["true"]}'
    json_type = {"Content-Type": "application/json"}
    try:
        for tag, srv in servers.items():
            srv.start()
            c = srv.client()
            sid = c.post("/v1/sandboxes", json={}).json()["id"]
            clients[tag] = (c, Lean(srv.url, srv.api_key), f"/v1/sandboxes/{sid}/exec")
            for _ in range(20):  # warm both paths
                clients[tag][1].post(clients[tag][2], body)
                c.post(clients[tag][2], content=body, headers=json_type).raise_for_status()
        for _ in range(runs):
            rows["fork_exec"].samples_ms.append(_time(lambda: _spawn([true])))
            for tag, (c, lean, path) in clients.items():
                t = time.perf_counter()
                _, timing = lean.post(path, body)
                total = (time.perf_counter() - t) * 1000
                rows["lean" + tag].samples_ms.append(total)
                rows["httpx" + tag].samples_ms.append(
                    _time(
                        lambda c=c, path=path: c.post(
                            path, content=body, headers=json_type
                        ).raise_for_status()
                    )
                )
                if stages and not tag:
                    parsed = _server_timing(timing)
                    for name, ms in parsed.items():
                        breakdown.setdefault(name, []).append(ms)
                    breakdown.setdefault("http", []).append(total - parsed.get("total", 0.0))
    finally:
        for c, lean, path in clients.values():
            lean.close()
            c.delete(path.removesuffix("/exec"))
            c.close()
        for srv in servers.values():
            srv.close()
    return {"rows": rows, "stages": {k: statistics.median(v) for k, v in breakdown.items()}}


def render_exec_path(res: dict[str, object]) -> list[str]:
    rows: dict[str, Row] = res["rows"]  # type: ignore[assignment]
    floor = rows["fork_exec"]
    lines = [
        "| measurement | p50 ms | p99 ms | runs | vs. floor (p50) |",
        "|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        vs = "" if key == "fork_exec" else f"+{row.p50 - floor.p50:.2f} ms, {row.p50 / floor.p50:.2f}×"
        lines.append(f"| {row.name} | {row.p50:.2f} | {row.pct(0.99):.2f} | {len(row.samples_ms)} | {vs} |")
    st: dict[str, float] = res["stages"]  # type: ignore[assignment]
    if st:
        lines += ["", "| stage (median) | ms | what |", "|---|---|---|"]
        lines.append(
            f"| http | {st.get('http', 0):.3f} | client, loopback TCP, uvicorn's parsing (client total − server total) |"
        )
        for name, what in STAGES.items():
            if name in st:
                lines.append(f"| {name} | {st[name]:.3f} | {what} |")
        lines.append(
            f"| server total | {st.get('total', 0):.3f} | from cove's ASGI app to the response's headers |"
        )
    return lines


CLAIM_STAGES = {
    "auth": "routing, body read, API key",
    "admission": "admission check",
    "template": "template and its defaults",
    "quota defaults": "the tenant's default CPU",
    "quota admit": "the tenant's quota",
    "to thread": "hand-over to a worker thread (the node's file and cgroup work)",
    "config": "the owner's config written (the agent re-reads it)",
    "limits": "cgroup limits and weight",
    "thaw": "the pooled sandbox thawed (cgroup freezer)",
    "configured": "back from the thread",
    "ping": "the agent answers (a new connection: it is kept for the first exec)",
    "egress policy": "egress policy",
    "store insert": "the record written",
    "output": "the result serialised",
}


def claim_path(runs: int = 64, compare: str | None = None) -> dict[str, object]:
    """Create from the warm pool → first exec output (`echo hi`), beside bubblewrap `true`,
    interleaved, with the create's and the first exec's stages (COVE_TRACE_STAGES=1). Between
    batches of 16 the sandboxes are deleted and the refill awaited (as bench/scale.py's pool part).
    `compare`: another tree's `src`, its server's claims timed in the same loop."""
    import json

    bwrap = shutil.which("bwrap")
    true = shutil.which("true") or "/bin/true"
    env = {"COVE_TRACE_STAGES": "1"}
    sides = {"": env, **({" (compared tree)": {**env, "PYTHONPATH": compare}} if compare else {})}
    rows = {"bwrap": Row("bubblewrap `true` (floor)")}
    for tag in sides:
        rows["claim" + tag] = Row(f"cove{tag}: create from the pool → first exec output")
        rows["create" + tag] = Row(f"cove{tag}: the create alone")
        rows["exec" + tag] = Row(f"cove{tag}: its first exec (`echo hi`)")
    create_st: dict[str, list[float]] = {}
    exec_st: dict[str, list[float]] = {}
    servers = {tag: Server(f"bench-claim{i}", extra_env=e) for i, (tag, e) in enumerate(sides.items())}
    clients: dict[str, tuple[httpx.Client, Lean, list[str]]] = {}
    try:
        for tag, srv in servers.items():
            srv.start()
            clients[tag] = (srv.client(), Lean(srv.url, srv.api_key), [])
        for i in range(runs):
            if i % 16 == 0:
                for c, _, made in clients.values():
                    for sid in made:
                        c.delete(f"/v1/sandboxes/{sid}")
                    made.clear()
                for c, _, _ in clients.values():
                    _settled(c)
            if bwrap:
                rows["bwrap"].samples_ms.append(_time(lambda: _spawn([bwrap, *BWRAP, true])))
            for tag, (_, lean, made) in clients.items():
                t = time.perf_counter()
                data, timing = lean.post("/v1/sandboxes", b"{}")
                t1 = time.perf_counter()
                sid = json.loads(data)["id"]
                out, exec_timing = lean.post(f"/v1/sandboxes/{sid}/exec", b'{"cmd": "echo hi"}')
                t2 = time.perf_counter()
                assert json.loads(out)["stdout"] == "hi\n"
                made.append(sid)
                rows["claim" + tag].samples_ms.append((t2 - t) * 1000)
                rows["create" + tag].samples_ms.append((t1 - t) * 1000)
                rows["exec" + tag].samples_ms.append((t2 - t1) * 1000)
                if not tag:
                    for name, ms in _server_timing(timing).items():
                        create_st.setdefault(name, []).append(ms)
                    for name, ms in _server_timing(exec_timing).items():
                        exec_st.setdefault(name, []).append(ms)
    finally:
        for c, lean, made in clients.values():
            lean.close()
            for sid in made:
                c.delete(f"/v1/sandboxes/{sid}")
            c.close()
        for srv in servers.values():
            srv.close()
    med = statistics.median
    return {
        "rows": {k: v for k, v in rows.items() if v.samples_ms},
        "create": {k: med(v) for k, v in create_st.items()},
        "exec": {k: med(v) for k, v in exec_st.items()},
    }


def _settled(c: httpx.Client) -> None:
    """Wait for the base pool to be full (its refill done)."""
    for _ in range(600):
        p = c.get("/v1/pools/base").json()
        if not p["starting"] and p["ready"] >= p["target"]:
            return
        time.sleep(0.2)


def render_claim_path(res: dict[str, object]) -> list[str]:
    rows: dict[str, Row] = res["rows"]  # type: ignore[assignment]
    floor = rows.get("bwrap")
    lines = ["| measurement | p50 ms | p99 ms | runs | vs. floor (p50 / p99) |", "|---|---|---|---|---|"]
    for key, row in rows.items():
        vs = ""
        if floor and key.startswith("claim"):
            vs = f"{row.p50 / floor.p50:.2f}× / {row.pct(0.99) / floor.pct(0.99):.2f}×"
        lines.append(f"| {row.name} | {row.p50:.2f} | {row.pct(0.99):.2f} | {len(row.samples_ms)} | {vs} |")
    create: dict[str, float] = res["create"]  # type: ignore[assignment]
    lines += ["", "| create stage (median) | ms | what |", "|---|---|---|"]
    for name, what in CLAIM_STAGES.items():
        if name in create:
            lines.append(f"| {name} | {create[name]:.3f} | {what} |")
    lines.append(f"| server total | {create.get('total', 0):.3f} | |")
    first: dict[str, float] = res["exec"]  # type: ignore[assignment]
    lines += ["", "| first exec stage (median) | ms |", "|---|---|"]
    for name in (*STAGES, "total"):
        if name in first:
            lines.append(f"| {name} | {first[name]:.3f} |")
    return lines


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the exec round trip beside its floor (and its stages)")
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--stages", action="store_true", help="stamp each stage (COVE_TRACE_STAGES=1)")
    ap.add_argument("--compare", help="another tree's src directory, timed in the same run")
    ap.add_argument("--claim", action="store_true", help="the pool claim path and its stages instead")
    args = ap.parse_args()
    if args.claim:
        print("\n".join(render_claim_path(claim_path(args.runs, args.compare))))
    else:
        print("\n".join(render_exec_path(exec_path(args.runs, args.stages, args.compare))))
