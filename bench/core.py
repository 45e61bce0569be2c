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
