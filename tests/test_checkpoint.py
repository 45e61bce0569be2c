"""Hibernate, resume and fork with memory (real CRIU): processes continue where they were."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cove.devserver import Server
from cove.node import checkpoint

pytestmark = pytest.mark.skipif(
    not checkpoint.available(), reason="needs CRIU >= 4.1 (scripts/install-criu.sh builds it)"
)

# A process whose state lives in memory: a random token, a counter, and a log it keeps open.
WORKER = r"""
import os, time
token = os.urandom(8).hex()
log = open('/home/user/ticks.log', 'a')
n = 0
while True:
    n += 1
    log.write(f'{n}\n'); log.flush()
    with open('/home/user/state.tmp', 'w') as f:
        f.write(f'{token} {n}')
    os.replace('/home/user/state.tmp', '/home/user/state')
    time.sleep(0.05)
"""


def sh(api: httpx.Client, sid: str, cmd: str) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 30})
    assert r.status_code == 200, r.text
    return r.json()


def start_workload(api: httpx.Client, sid: str) -> None:
    api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/worker.py"}, content=WORKER.encode())
    sh(api, sid, "setsid python3 /home/user/worker.py >/dev/null 2>&1 </dev/null &")
    sh(api, sid, "setsid python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &")
    deadline = time.monotonic() + 10
    while sh(api, sid, "test -s /home/user/state && echo ok")["stdout"] != "ok\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def state(api: httpx.Client, sid: str) -> tuple[str, int]:
    token, n = sh(api, sid, "cat /home/user/state")["stdout"].split()
    return token, int(n)


def http_status(api: httpx.Client, sid: str) -> str:
    probe = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000', timeout=5).status)"
    res = sh(api, sid, f'python3 -c "{probe}"')
    return res["stdout"].strip() or res["stderr"].strip().splitlines()[-1]


def test_hibernate_resume_keeps_processes_memory_and_open_files(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={}).json()
    sid = sb["id"]
    try:
        start_workload(api, sid)
        time.sleep(0.3)
        token, _ = state(api, sid)
        r = api.post(f"/v1/sandboxes/{sid}/hibernate")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "hibernated" and r.json()["hibernation"]["memory"] is True
        hib_token, hib_n = read_upper(server, sid).split()
        assert hib_token == token
        time.sleep(0.3)
        assert int(read_upper(server, sid).split()[1]) == int(hib_n), "a hibernated sandbox must not run"
        time.sleep(0.3)
        token2, n2 = state(api, sid)
        assert token2 == token, "the process restarted instead of continuing"
        assert n2 > int(hib_n), "the restored process is not running"
        info = api.get(f"/v1/sandboxes/{sid}").json()
        assert info["state"] == "running" and info["hibernation"]["restored"] is True
        ticks = [int(x) for x in sh(api, sid, "cat /home/user/ticks.log")["stdout"].split()]
        assert ticks == list(range(1, len(ticks) + 1)), "the kept-open log lost or repeated lines"
        assert http_status(api, sid) == "200", "the background server does not answer after resume"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def read_upper(server: Server, sid: str) -> str:
    """The state file as the hibernated sandbox left it, read on the host (reading through the API
    would resume the sandbox)."""
    return (server.home / "storage" / "active" / sid / "upper" / "home" / "user" / "state").read_text()


def test_fork_children_continue_the_same_processes_and_diverge(api: httpx.Client) -> None:
    src = api.post("/v1/sandboxes", json={}).json()
    try:
        start_workload(api, src["id"])
        token, _ = state(api, src["id"])
        r = api.post(f"/v1/sandboxes/{src['id']}/fork", json={"count": 2})
        assert r.status_code == 201, r.text
        assert r.json()["memory"] is True
        children = [c["id"] for c in r.json()["items"]]
        time.sleep(0.3)
        for cid in children:
            assert state(api, cid)[0] == token, "a child must continue the parent's process, not a new one"
            assert http_status(api, cid) == "200"
        # Diverge: stop the worker in child 0 only.
        sh(api, children[0], "pkill -f worker.py")
        time.sleep(0.2)
        n0 = state(api, children[0])[1]
        time.sleep(0.3)
        assert state(api, children[0])[1] == n0
        n1 = state(api, children[1])[1]
        time.sleep(0.3)
        assert state(api, children[1])[1] > n1, "the other child must run on"
        assert (
            state(api, src["id"])[0] == token
            and api.get(f"/v1/sandboxes/{src['id']}").json()["state"] == "running"
        )
        for cid in children:
            api.delete(f"/v1/sandboxes/{cid}")
    finally:
        api.delete(f"/v1/sandboxes/{src['id']}")


def test_memory_snapshot_starts_sandboxes_with_running_processes(api: httpx.Client) -> None:
    src = api.post("/v1/sandboxes", json={}).json()
    try:
        start_workload(api, src["id"])
        token, _ = state(api, src["id"])
        snap = api.post(f"/v1/sandboxes/{src['id']}/snapshots", json={"memory": True, "name": "warm"}).json()
        assert snap["memory"] is True
        copy = api.post("/v1/sandboxes", json={"snapshot": snap["id"]}).json()
        assert copy["state"] == "running"
        time.sleep(0.2)
        assert state(api, copy["id"])[0] == token
        api.delete(f"/v1/sandboxes/{copy['id']}")
        assert api.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
    finally:
        api.delete(f"/v1/sandboxes/{src['id']}")


@pytest.fixture
def failing_criu_server(tmp_path: Path) -> Iterator[Server]:
    fake = tmp_path / "criu"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then exec {checkpoint.CRIU} --version; fi\n'
        'echo "Error (criu/fake.c:1): injected failure" >&2\nexit 1\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    srv = Server("criufail", extra_env={"COVE_CRIU": str(fake)})
    srv.start()
    yield srv
    srv.close()


def test_criu_failure_leaves_the_sandbox_running(failing_criu_server: Server) -> None:
    with failing_criu_server.client() as api:
        sb = api.post("/v1/sandboxes", json={}).json()
        sh(api, sb["id"], "echo alive > /home/user/f")
        r = api.post(f"/v1/sandboxes/{sb['id']}/hibernate")
        assert r.status_code == 503 and "injected failure" in r.json()["error"]["message"]
        assert "still running" in r.json()["error"]["message"]
        assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "running"
        assert sh(api, sb["id"], "cat /home/user/f")["stdout"] == "alive\n"
        api.post(f"/v1/sandboxes/{sb['id']}/pause")
        r = api.post(f"/v1/sandboxes/{sb['id']}/hibernate")
        assert r.status_code == 503 and "still paused" in r.json()["error"]["message"]
        assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "paused"
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_hibernation_completed_by_a_crashed_server_is_recovered() -> None:
    srv = Server(f"criu-crash-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    srv.start()
    try:
        with srv.client() as api:
            sb = api.post("/v1/sandboxes", json={}).json()
            start_workload(api, sb["id"])
            token, _ = state(api, sb["id"])
            r = api.post(f"/v1/sandboxes/{sb['id']}/hibernate")
            assert r.status_code == 200 and r.json()["state"] == "hibernated", r.text
        srv.proc.kill()  # type: ignore[union-attr]  # SIGKILL, as in a crash
        srv.proc.wait()  # type: ignore[union-attr]
        db = sqlite3.connect(srv.home / "cove.db")
        with db:  # as if the server died after the dump but before it recorded the new state
            db.execute("UPDATE sandboxes SET state = 'running' WHERE id = ?", (sb["id"],))
        db.close()
        srv.start()
        with srv.client() as api:
            info = api.get(f"/v1/sandboxes/{sb['id']}").json()
            assert info["state"] == "hibernated" and info["hibernation"]["recovered"] is True
            time.sleep(0.1)
            assert state(api, sb["id"])[0] == token
    finally:
        srv.close()


def test_disk_full_during_hibernate_leaves_the_sandbox_running(tmp_path: Path) -> None:
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "cove-test-small", str(small)], check=True)
    srv = Server("diskfull", extra_env={"COVE_CHECKPOINT_DIR": str(small)})
    srv.start()
    try:
        with srv.client() as api:
            sb = api.post("/v1/sandboxes", json={}).json()
            start_workload(api, sb["id"])  # ~20 MB of process memory: the image cannot fit in 2 MB
            r = api.post(f"/v1/sandboxes/{sb['id']}/hibernate")
            assert r.status_code == 503, r.text
            assert "still running" in r.json()["error"]["message"]
            assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "running"
            _, n = state(api, sb["id"])
            time.sleep(0.3)
            assert state(api, sb["id"])[1] > n, "the sandbox must keep running after a failed hibernate"
            assert list(small.iterdir()) == [], "a failed checkpoint must not be left behind"
            api.delete(f"/v1/sandboxes/{sb['id']}")
    finally:
        srv.close()
        subprocess.run(["umount", str(small)], check=False)


def test_timeout_can_hibernate_instead_of_kill(api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"timeout": 1, "on_timeout": "hibernate"}).json()
    try:
        sh(api, sb["id"], "echo kept > /home/user/f")
        deadline = time.monotonic() + 15
        while (info := api.get(f"/v1/sandboxes/{sb['id']}").json())["state"] != "hibernated":
            assert info["state"] == "running", info
            assert time.monotonic() < deadline, "the timeout did not hibernate the sandbox"
            time.sleep(0.2)
        assert info["expires_at"] is None
        assert sh(api, sb["id"], "cat /home/user/f")["stdout"] == "kept\n"
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_background_processes_survive_hibernate_and_fork(api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={}).json()
    sid = sb["id"]
    try:
        proc = api.post(
            f"/v1/sandboxes/{sid}/processes",
            json={"cmd": "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done", "tag": "ticker"},
        ).json()
        time.sleep(0.4)
        assert api.post(f"/v1/sandboxes/{sid}/hibernate").json()["hibernation"]["memory"] is True
        assert api.post(f"/v1/sandboxes/{sid}/resume").json()["state"] == "running"
        listed = {p["id"]: p for p in api.get(f"/v1/sandboxes/{sid}/processes").json()["items"]}
        assert listed[proc["id"]]["running"] and listed[proc["id"]]["tag"] == "ticker"
        children = api.post(f"/v1/sandboxes/{sid}/fork", json={"count": 1}).json()["items"]
        for target in (sid, children[0]["id"]):
            with api.stream("GET", f"/v1/sandboxes/{target}/processes/{proc['id']}/output", timeout=20) as r:
                assert r.status_code == 200, r.read()
                ticks = 0
                for line in r.iter_lines():
                    if line and '"stdout"' in line:
                        ticks += 1
                    if ticks >= 8:  # history from before the hibernation, then live ones
                        break
            assert ticks >= 8
        api.delete(f"/v1/sandboxes/{children[0]['id']}")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_passing_dump_failures_are_retried_and_others_not() -> None:
    """The runtime thaws and dumps again only for failures that a moment of running resolves."""
    seen = [
        "criu dump failed: Error (criu/sk-unix.c:1021): sk unix: Unix socket 0x1 not found",
        "criu dump failed: Error (compel/src/lib/infect.c:263): Unseizable non-zombie 12807 found, state D",
        "criu dump failed: Error (criu/sk-inet.c:177): inet: In-flight connections can be ignored with ...",
    ]
    assert all(checkpoint.transient(checkpoint.CheckpointError(m)) for m in seen)
    lasting = ["criu dump failed: Error (criu/cr-dump.c:1): No space left on device", "criu dump stopped"]
    assert not any(checkpoint.transient(checkpoint.CheckpointError(m)) for m in lasting)
