"""Sandboxes outlive a restart of the server: live ones are re-adopted, dead ones are marked."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import Server


@pytest.fixture
def own_server() -> Iterator[Server]:
    srv = Server(f"restart-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")
    srv.start()
    yield srv
    srv.close()


def test_restart_readopts_live_sandboxes_and_marks_dead_ones(own_server: Server) -> None:
    srv = own_server
    with srv.client() as c:
        alive = c.post("/v1/sandboxes", json={"metadata": {"keep": "yes"}}).json()
        doomed = c.post("/v1/sandboxes", json={}).json()
        paused = c.post("/v1/sandboxes", json={}).json()
        assert c.post(f"/v1/sandboxes/{paused['id']}/pause").json()["state"] == "paused"
        c.put(f"/v1/sandboxes/{alive['id']}/files", params={"path": "/home/user/state.txt"}, content=b"kept")
        r = c.post(
            f"/v1/sandboxes/{alive['id']}/exec",
            json={
                "cmd": "setsid python3 -c 'import time; time.sleep(600)' >/dev/null 2>&1 < /dev/null & echo $!"
            },
        )
        bg = r.json()["stdout"].strip()

    srv.stop()
    # While the server is down, one sandbox dies (its init process is killed from the host).
    db = sqlite3.connect(srv.home / "cove.db")
    (node,) = db.execute("SELECT node FROM sandboxes WHERE id = ?", (doomed["id"],)).fetchone()
    db.close()
    os.kill(__import__("json").loads(node)["pid"], signal.SIGKILL)
    srv.start()

    with srv.client() as c:
        got = c.get(f"/v1/sandboxes/{alive['id']}").json()
        assert got["state"] == "running" and got["metadata"] == {"keep": "yes"}
        assert c.get(f"/v1/sandboxes/{alive['id']}/files", params={"path": "state.txt"}).content == b"kept"
        r = c.post(f"/v1/sandboxes/{alive['id']}/exec", json={"cmd": f"kill -0 {bg} && echo running"})
        assert r.json()["stdout"] == "running\n", "a background process must survive the server restart"
        dead = c.get(f"/v1/sandboxes/{doomed['id']}").json()
        assert dead["state"] == "error" and "server was down" in dead["end_reason"]
        assert not (srv.home / "sandboxes" / doomed["id"]).exists()
        listed = {s["id"] for s in c.get("/v1/sandboxes", params={"state": "running"}).json()["items"]}
        assert listed == {alive["id"]}
        assert c.get(f"/v1/sandboxes/{paused['id']}").json()["state"] == "paused"
        assert (
            c.post(f"/v1/sandboxes/{paused['id']}/exec", json={"cmd": "echo thawed"}).json()["stdout"]
            == "thawed\n"
        )


def test_restart_keeps_hibernated_sandboxes_and_rolls_back_half_made_snapshots(own_server: Server) -> None:
    srv = own_server
    with srv.client() as c:
        sb = c.post("/v1/sandboxes", json={}).json()
        c.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "echo saved > /home/user/f"})
        assert c.post(f"/v1/sandboxes/{sb['id']}/hibernate").json()["state"] == "hibernated"
    srv.stop()
    db = sqlite3.connect(srv.home / "cove.db")
    with db:  # what a server killed in the middle of a snapshot leaves behind
        db.execute(
            "INSERT INTO snapshots (id, tenant, name, sandbox_id, state, created_at, layers, memory, config)"
            " VALUES ('snaphalfmade', 'default', NULL, ?, 'creating', 0, '[]', 0, '{}')",
            (sb["id"],),
        )
    db.close()
    srv.start()
    with srv.client() as c:
        assert c.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "hibernated"
        assert c.get("/v1/snapshots/snaphalfmade").status_code == 404
        r = c.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "cat /home/user/f"})
        assert r.json()["stdout"] == "saved\n"
    db = sqlite3.connect(srv.home / "cove.db")
    assert db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] == 0
    db.close()


def test_sigkill_during_fork_leaves_a_consistent_state(own_server: Server) -> None:
    import threading

    srv = own_server
    with srv.client() as c:
        src = c.post("/v1/sandboxes", json={}).json()
        c.post(f"/v1/sandboxes/{src['id']}/exec", json={"cmd": "echo parent > /home/user/f"})

    def fork() -> None:
        with srv.client() as c2, contextlib.suppress(httpx.HTTPError):  # the server dies under it
            c2.post(f"/v1/sandboxes/{src['id']}/fork", json={"count": 4}, timeout=30)

    t = threading.Thread(target=fork)
    t.start()
    time.sleep(0.25)  # somewhere inside the fork: the invariants must hold wherever that is
    srv.proc.kill()  # type: ignore[union-attr]
    srv.proc.wait()  # type: ignore[union-attr]
    t.join()
    srv.start()
    with srv.client() as c:
        assert c.get("/v1/snapshots").json()["items"] == [], "a fork's snapshot must never stay visible"
        states = {}
        for sb in c.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]:
            states[sb["id"]] = sb["state"]
            assert sb["state"] in ("running", "error"), sb
            if sb["state"] == "running":
                r = c.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "cat /home/user/f"})
                assert r.json()["stdout"] == "parent\n", (sb["id"], r.text)
        assert states[src["id"]] == "running"
    db = sqlite3.connect(srv.home / "cove.db")
    assert db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0] == 0
    db.close()
