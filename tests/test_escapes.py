"""Escape attempts, run against every runtime this host has (docs/runtimes.md): each fails inside the
sandbox, and the host is checked afterwards to be unharmed. test_isolation.py holds the namespaces
runtime's structural checks (uid maps, capability sets, the agent's socket)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Server
from cove.config import Settings
from cove.node.gvisor.runtime import detect

GVISOR, GVISOR_WHY = detect(Settings())


@pytest.fixture(
    scope="module",
    params=[
        "namespaces",
        pytest.param(
            "gvisor", marks=pytest.mark.skipif(not GVISOR, reason=f"gvisor runtime unavailable: {GVISOR_WHY}")
        ),
    ],
)
def rt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def boxes(server: Server, rt: str) -> Iterator[dict[str, str]]:
    """Two sandboxes of runtime `rt`: `a` with small limits (the attacker), `b` (a neighbour)."""
    with server.client() as api:
        made: dict[str, str] = {}
        try:
            for name, body in (("a", {"pids": 64, "disk_mb": 32, "memory_mb": 256}), ("b", {})):
                r = api.post("/v1/sandboxes", json={"runtime": rt, "timeout": 600, **body})
                assert r.status_code == 201, r.text
                assert r.json()["runtime"] == rt
                made[name] = r.json()["id"]
            yield made
        finally:
            for sid in made.values():
                api.delete(f"/v1/sandboxes/{sid}")


def py(api: httpx.Client, sid: str, code: str, user: str = "root", timeout: float = 60) -> dict:
    """Run Python in the sandbox; its last stdout line is JSON."""
    r = api.post(
        f"/v1/sandboxes/{sid}/exec",
        json={"argv": ["python3", "-c", code], "user": user, "timeout": timeout},
        timeout=timeout + 30,
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["exit_code"] == 0, res
    return json.loads(res["stdout"].strip().splitlines()[-1])


def healthy(server: Server) -> None:
    t = time.monotonic()
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert time.monotonic() - t < 2, "the host became unresponsive"


def _modules() -> str:
    """The host's loaded modules (this kernel may have no module support at all)."""
    try:
        return Path("/proc/modules").read_text()
    except OSError:
        return ""


TRY = """
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def sys(name, nr, *args):
    ctypes.set_errno(0)
    out[name] = [libc.syscall(nr, *args), ctypes.get_errno()]
"""


def test_host_files_are_out_of_reach(server: Server, api: httpx.Client, boxes: dict[str, str]) -> None:
    secret = server.home / "escape-secret"
    secret.write_text("host-secret-7731")
    secret.chmod(0o644)  # readable by anyone on the host: only the sandbox's view keeps it out
    try:
        code = f"""
import json, os
seen = []
for p in [{str(secret)!r}, "/proc/1/root{secret}", "/proc/self/root{secret}", "/etc/hostname"]:
    try:
        seen.append(open(p).read())
    except OSError as e:
        seen.append(e.errno)
print(json.dumps({{"seen": seen, "home": os.path.exists({str(server.home)!r})}}))
"""
        res = py(api, boxes["a"], code)
        assert "host-secret-7731" not in json.dumps(res), res
        assert not res["home"], "the host's cove data dir is visible"
    finally:
        secret.unlink()


def test_host_and_neighbour_processes_are_invisible_and_unsignalable(
    server: Server, api: httpx.Client, boxes: dict[str, str]
) -> None:
    host = subprocess.Popen(["sleep", "1000.7731"])
    try:
        r = api.post(
            f"/v1/sandboxes/{boxes['b']}/processes", json={"cmd": "sleep 4242.7731", "tag": "neighbour"}
        )
        assert r.status_code in (200, 201), r.text
        code = f"""
import json, os, errno
found = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            cmd = open(f"/proc/{{p}}/cmdline", "rb").read()
        except OSError:
            continue
        if b"77" + b"31" in cmd:  # not the literal: this probe's own cmdline has it
            found.append(cmd.decode(errors="replace"))
kills = []
for pid in ({host.pid}, {os.getpid()}, {server.proc.pid if server.proc else 1}):
    try:
        os.kill(pid, 9); kills.append("sent")
    except OSError as e:
        kills.append(e.errno)
print(json.dumps({{"found": found, "kills": kills, "pids": len([p for p in os.listdir("/proc") if p.isdigit()])}}))
"""
        res = py(api, boxes["a"], code)
        assert res["found"] == [], "host or neighbour processes are visible"
        assert "sent" not in res["kills"], res
        assert res["pids"] < 20
        time.sleep(0.2)
        assert host.poll() is None, "the host process was killed from inside a sandbox"
        procs = api.get(f"/v1/sandboxes/{boxes['b']}/processes").json()
        items = procs["items"]
        assert any(p.get("tag") == "neighbour" and p.get("running") for p in items), procs
    finally:
        host.kill()
        host.wait()
    healthy(server)


def test_mount_modules_raw_sockets_and_ptrace_fail(
    server: Server, api: httpx.Client, boxes: dict[str, str], rt: str
) -> None:
    modules = _modules()
    target = subprocess.Popen(["sleep", "1000"])
    try:
        code = (
            TRY
            + f"""
import ctypes
out["mount"] = [libc.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno()]
sys("init_module", 175, 0, 0, b"")
fd = os.open("/usr/bin/true", os.O_RDONLY)
sys("finit_module", 313, fd, b"", 0)
sys("ptrace_host", 101, 16, {target.pid}, 0, 0)
for name, fam, typ, proto in (("packet", 17, socket.SOCK_RAW, 0), ("raw_icmp", 2, socket.SOCK_RAW, 1)):
    try:
        socket.socket(fam, typ, proto).close(); out[name] = "opened"
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"""
        )
        res = py(api, boxes["a"], code)
        for name in ("mount", "init_module", "finit_module", "ptrace_host"):
            assert res[name][0] == -1, (name, res)
        assert res["packet"] != "opened" and res["raw_icmp"] != "opened", res
        # An unprivileged user cannot trace the agent (pid 1) either.
        res = py(
            api, boxes["a"], TRY + 'sys("ptrace_init", 101, 16, 1, 0, 0)\nprint(json.dumps(out))', "user"
        )
        assert res["ptrace_init"][0] == -1, res
        assert target.poll() is None
        assert _modules() == modules
    finally:
        target.kill()
        target.wait()


def test_template_and_host_usr_stay_untouched(
    server: Server, api: httpx.Client, boxes: dict[str, str]
) -> None:
    r = api.post(
        f"/v1/sandboxes/{boxes['a']}/exec",
        json={
            "cmd": "touch /usr/bin/cove-escape; echo 'intruder:x:0:0::/:/bin/sh' >> /etc/passwd",
            "user": "root",
        },
    )
    assert r.status_code == 200
    assert "cove-escape" in r.json()["stderr"], r.json()  # touch failed: /usr is read-only
    assert not Path("/usr/bin/cove-escape").exists()
    for layer in (server.home / "storage" / "layers").iterdir():
        passwd = layer / "upper" / "etc" / "passwd"
        if passwd.exists():
            assert "intruder" not in passwd.read_text()
    r = api.post(f"/v1/sandboxes/{boxes['b']}/exec", json={"cmd": "cat /etc/passwd"})
    assert "intruder" not in r.json()["stdout"], "a write reached the shared template"


def test_host_loopback_is_unreachable(server: Server, api: httpx.Client, boxes: dict[str, str]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    try:
        code = f"""
import json, socket
out = {{}}
for port in ({port}, {server.port}):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port)); out[port] = "connected"
    except OSError as e:
        out[port] = e.errno
print(json.dumps(out))
"""
        res = py(api, boxes["a"], code)
        assert "connected" not in res.values(), res
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()


def test_disk_and_pids_exhaustion_stay_inside(
    server: Server, api: httpx.Client, boxes: dict[str, str], rt: str
) -> None:
    sid = boxes["a"]
    before = os.statvfs(server.home).f_bavail * os.statvfs(server.home).f_frsize
    r = api.post(
        f"/v1/sandboxes/{sid}/exec",
        json={
            "cmd": "dd if=/dev/zero of=/home/user/fill bs=1M count=64; rm -f /home/user/fill",
            "timeout": 60,
        },
        timeout=90,
    )
    assert r.status_code == 200, r.text
    assert "Disk quota exceeded" in r.json()["stderr"], r.json()
    after = os.statvfs(server.home).f_bavail * os.statvfs(server.home).f_frsize
    assert before - after < 200 << 20, "the sandbox filled the host's disk"
    # Last: the bomb's remains may hold the sandbox's pids for a moment.
    r = api.post(
        f"/v1/sandboxes/{sid}/exec",
        json={"cmd": "bomb() { bomb | bomb & }; bomb; sleep 2", "timeout": 3},
        timeout=60,
    )
    # gvisor: when the bomb exhausts the pids cgroup, the sentry cannot start a thread and the
    # whole sandbox ends (409 "stopped while the call ran"); the host's limit holds either way.
    assert r.status_code == 200 or (rt == "gvisor" and r.status_code == 409), r.text
    healthy(server)
    slack = 512 if rt == "gvisor" else 0  # the sentry's own threads and stubs count there too
    pids_max = Path(f"/sys/fs/cgroup/pids/{server.cgroup_parent}/{sid}/pids.max")
    if pids_max.exists():
        assert pids_max.read_text().strip() == str(64 + slack)


def test_memory_exhaustion_stays_inside(server: Server, api: httpx.Client, rt: str) -> None:
    """namespaces: the cgroup's OOM killer ends the command. gvisor: the whole sandbox (its sentry
    holds every page) is ended, and the host is unharmed either way."""
    sb = api.post("/v1/sandboxes", json={"runtime": rt, "memory_mb": 128}).json()
    try:
        r = api.post(
            f"/v1/sandboxes/{sb['id']}/exec",
            json={"cmd": "python3 -c 'b = bytearray(600 << 20); print(len(b))'", "timeout": 60},
            timeout=90,
        )
        healthy(server)
        if rt == "namespaces":
            assert r.status_code == 200 and r.json()["exit_code"] == 137, r.text
        else:
            assert r.status_code != 200 or r.json()["exit_code"] != 0, r.text
    finally:
        assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
