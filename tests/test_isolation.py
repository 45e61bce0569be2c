"""A sandbox cannot see or reach the host, other sandboxes, or the network, and its limits hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from conftest import Server
from cove.node.guest_client import Idle
from cove.node.namespaces.cgroups import Cgroup


def run(api: httpx.Client, sid: str, cmd: str, **kw: object) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_sees_only_its_own_processes(api: httpx.Client, sandbox: dict) -> None:
    out = run(api, sandbox["id"], "ls /proc | grep -E '^[0-9]+$' | wc -l; tr '\\0' ' ' < /proc/1/cmdline")[
        "stdout"
    ]
    count, cmdline = out.splitlines()
    assert int(count) < 10, "host processes are visible"
    assert "agent.py" in cmdline, "pid 1 must be the guest agent"


def test_pid_1_shows_nothing_of_the_host(server: Server, api: httpx.Client, sandbox: dict) -> None:
    """Pid 1 is a fork of the host's launcher: its command line, environment and memory map must
    not carry the launcher's (host paths, or the server's environment with its secrets)."""
    out = run(api, sandbox["id"], "cat /proc/1/cmdline /proc/1/environ /proc/1/maps", user="root")
    assert out["exit_code"] == 0, out
    seen = out["stdout"]
    assert "agent.pyc" in seen
    for host_thing in (
        server.api_key,
        str(server.home),
        str(Path(__file__).parent.parent),
        "COVE_",
        "launcher",
    ):
        assert host_thing not in seen, f"{host_thing!r} is visible in pid 1's /proc files"


def test_root_inside_is_unprivileged_outside(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    assert run(api, sid, "cat /proc/self/uid_map", user="root")["stdout"].split() == ["0", "100000", "65536"]
    caps = run(api, sid, "grep CapBnd /proc/self/status", user="root")["stdout"].split()[1]
    assert not int(caps, 16) & (1 << 21), "CAP_SYS_ADMIN must not be in the bounding set"
    assert run(api, sid, "grep NoNewPrivs /proc/self/status")["stdout"].split()[1] == "1"
    res = run(api, sid, "mount -t tmpfs none /mnt", user="root")
    assert res["exit_code"] != 0
    res = run(
        api,
        sid,
        "python3 -c 'import ctypes; l=ctypes.CDLL(None,use_errno=True); print(l.unshare(0x10000000), ctypes.get_errno())'",
    )
    assert res["stdout"].split() == ["-1", "1"], "creating a user namespace must be refused (EPERM)"
    res = run(api, sid, "touch /usr/bin/evil", user="root")
    assert res["exit_code"] != 0 and "Read-only" in res["stderr"]
    assert not Path("/usr/bin/evil").exists()


def test_template_layer_is_never_written(server: Server, api: httpx.Client, sandbox: dict) -> None:
    assert (
        run(api, sandbox["id"], "echo 'intruder:x:0:0::/:/bin/sh' >> /etc/passwd", user="root")["exit_code"]
        == 0
    )
    layers = list((server.home / "storage" / "layers").iterdir())
    assert layers
    checked = 0
    for layer in layers:
        try:  # a layer being collected meanwhile may vanish
            assert "intruder" not in (layer / "upper" / "etc" / "passwd").read_text()
            checked += 1
        except FileNotFoundError:
            continue
    assert checked
    fresh = api.post("/v1/sandboxes", json={}).json()
    try:
        assert "intruder" not in run(api, fresh["id"], "cat /etc/passwd")["stdout"]
    finally:
        api.delete(f"/v1/sandboxes/{fresh['id']}")


def test_cannot_see_other_sandboxes_files(server: Server, api: httpx.Client, sandbox: dict) -> None:
    other = api.post("/v1/sandboxes", json={}).json()
    try:
        assert run(api, sandbox["id"], "echo secret > /tmp/mine")["exit_code"] == 0
        upper = server.home / "storage" / "active" / sandbox["id"] / "upper"
        assert (upper / "tmp" / "mine").exists()
        res = run(api, other["id"], f"cat /tmp/mine; ls {upper}; ls {server.home}")
        assert "secret" not in res["stdout"] and res["exit_code"] != 0
    finally:
        api.delete(f"/v1/sandboxes/{other['id']}")


def test_has_no_network(server: Server, api: httpx.Client, sandbox: dict) -> None:
    # Only loopback addresses are probed: the sandbox's 127.0.0.1 is its own, not the host's.
    probe = (
        "import socket\n"
        "s = socket.socket(); s.settimeout(2)\n"
        "try:\n"
        f"    s.connect(('127.0.0.1', {server.port})); print('connected')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    out = run(api, sandbox["id"], f'python3 -c "{probe}"')["stdout"]
    assert out.startswith("refused"), out
    interfaces = run(api, sandbox["id"], "tail -n +3 /proc/net/dev | cut -d: -f1")["stdout"].split()
    assert interfaces == ["lo"]
    routes = run(api, sandbox["id"], "tail -n +2 /proc/net/route")["stdout"]
    assert routes.strip() == "", "there must be no route out of the sandbox"


def test_memory_limit_kills_inside_the_sandbox_only(api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"memory_mb": 64}).json()
    try:
        res = run(api, sb["id"], "python3 -c 'b = bytearray(300 * 1024 * 1024); print(len(b))'")
        assert res["exit_code"] == 137, res  # SIGKILL by the OOM killer of the sandbox's cgroup
        assert run(api, sb["id"], "echo still alive")["stdout"] == "still alive\n"
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_disk_limit_stops_writes_inside_only(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"disk_mb": 32}).json()
    try:
        res = run(api, sb["id"], "dd if=/dev/zero of=/home/user/fill bs=1M count=64")
        assert res["exit_code"] != 0 and "Disk quota exceeded" in res["stderr"]
        assert run(api, sb["id"], "rm /home/user/fill && echo freed")["stdout"] == "freed\n"
        assert run(api, sb["id"], "dd if=/dev/zero of=/home/user/half bs=1M count=20")["exit_code"] == 0
        r = api.put(f"/v1/sandboxes/{sb['id']}/files", params={"path": "/tmp/big"}, content=b"x" * (20 << 20))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
        assert "big" not in run(api, sb["id"], "ls -A /tmp")["stdout"]
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")
    assert not (server.home / "storage" / "active" / sb["id"]).exists()


def test_fork_bomb_is_contained(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"pids": 64}).json()
    try:
        started = time.monotonic()
        r = api.post(
            f"/v1/sandboxes/{sb['id']}/exec",
            json={"cmd": "bomb() { bomb | bomb & }; bomb; sleep 3", "timeout": 4},
        )
        assert r.status_code == 200
        # The host stays responsive: the server answers right away while the bomb runs its course.
        t = time.monotonic()
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t < 2
        pids_max = Path(f"/sys/fs/cgroup/pids/{server.cgroup_parent}/{sb['id']}/pids.max")
        if pids_max.exists():
            assert pids_max.read_text().strip() == "64"
        assert time.monotonic() - started < 30
    finally:
        assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204


def test_kill_leaves_nothing_behind(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={}).json()
    # A daemonised process (own session) must die with the sandbox too.
    assert (
        run(api, sb["id"], "setsid sleep 1000 > /dev/null 2>&1 < /dev/null & echo started")["exit_code"] == 0
    )
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
    with open("/proc/self/mountinfo") as f:
        assert sb["id"] not in f.read()
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        assert sb["id"] not in dirs, f"cgroup left in {root}"
        if root.count("/") > 5:
            dirs[:] = []
    assert not (server.home / "sandboxes" / sb["id"]).exists()
    assert not (server.home / "storage" / "active" / sb["id"]).exists()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                # Zombies only wait for the host's init to reap them (this host's init is lazy).
                if "\nState:\tZ" in (p / "status").read_text():
                    continue
                assert sb["id"] not in (p / "cgroup").read_text(), f"process {p.name} survived"
            except OSError:
                pass


def test_planted_symlink_cannot_redirect_the_server(
    server: Server, api: httpx.Client, tmp_path: Path
) -> None:
    import socket

    trap_path = tmp_path / "host.sock"
    trap = socket.socket(socket.AF_UNIX)
    trap.bind(str(trap_path))
    trap.listen(1)
    trap.settimeout(0.5)
    sb = api.post("/v1/sandboxes", json={}).json()
    try:
        cmd = f"mv /run/cove/sock/agent.sock /run/cove/sock/moved && ln -s {trap_path} /run/cove/sock/agent.sock"
        assert run(api, sb["id"], cmd, user="root")["exit_code"] == 0
        # Connections the server keeps reach the real agent; once they expire, a new one must not
        # follow the planted symlink.
        time.sleep(Idle.EXPIRY + 0.5)
        r = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "true"})
        assert r.status_code == 503 and "not a socket" in r.json()["error"]["message"]
        try:
            trap.accept()
            raise AssertionError("the server followed a symlink planted in the sandbox")
        except TimeoutError:
            pass
    finally:
        trap.close()
        assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204


def _ids(status: str, field: str) -> list[str]:
    return next(line.split()[1:] for line in status.splitlines() if line.startswith(field + ":"))


def test_a_kept_connection_serves_each_user_with_only_that_users_rights(
    server: Server, api: httpx.Client, sandbox: dict
) -> None:
    """The server keeps a connection (and its handler) between operations: the handler returns to
    root after each one, and a command never inherits a way back to root."""
    show = "echo $PPID; cat /proc/self/status"
    turns = [run(api, sandbox["id"], show, user=u)["stdout"] for u in ("user", "root", "user")]
    handlers = {out.split("\n", 1)[0] for out in turns}
    assert len(handlers) == 1, f"consecutive operations were not served by one kept handler: {handlers}"
    for out, uid in zip(turns, ("1000", "0", "1000"), strict=True):
        status = out.split("\n", 1)[1]
        assert _ids(status, "Uid") == [uid] * 4, status  # real, effective, saved, filesystem
        assert _ids(status, "Gid") == [uid] * 4, status
        if uid != "0":
            assert _ids(status, "CapPrm") == ["0000000000000000"], status
            assert _ids(status, "CapEff") == ["0000000000000000"], status
    # While it serves the user, the handler (the probe's parent) acts as the user and keeps root
    # only as its saved id, which the user's processes can neither use nor inspect it through.
    handler = handlers.pop()
    probe = run(
        api, sandbox["id"], f"grep Uid /proc/{handler}/status; cat /proc/{handler}/environ", user="user"
    )
    assert probe["stdout"].split()[1:5] == ["1000", "1000", "0", "1000"], probe
    assert probe["exit_code"] != 0 and "Permission denied" in probe["stderr"], probe


def test_kept_connections_expire(server: Server, api: httpx.Client, sandbox: dict) -> None:
    cg = Cgroup(f"{server.cgroup_parent}/{sandbox['id']}")
    run(api, sandbox["id"], "true")
    deadline = time.monotonic() + Idle.EXPIRY + 10
    while len(cg.pids()) > 2 and time.monotonic() < deadline:  # pid 1 and its pre-forked handler
        time.sleep(0.1)
    assert len(cg.pids()) == 2, cg.pids()
