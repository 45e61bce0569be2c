"""Fault tests (docs/faults.md): kill -9 of the server, of a sandbox's pid 1 and of its other
processes at every step of the lifecycle, a full disk, a damaged database. After each fault the
store and the host agree (`cove.devserver.inconsistencies`), nothing leaks, and what was
acknowledged before the fault is still there.

One scratch server per fault family (crashes and guest faults share one; disk-full has its own with
a small storage image and a checkpoint dir on a tiny tmpfs); warm pools are off so that every
sandbox on the host has a record to check against.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cove.devserver import Server, inconsistencies
from cove.node.checkpoint import stray_tables
from cove.node.namespaces.cgroups import Cgroup

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


# -- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    server = Server(f"faults-{WORKER}", {"COVE_POOLS": ""})
    server.start()
    yield server
    server.extra_env.pop("COVE_FAULT", None)
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    server.close()


def crash(srv: Server) -> None:
    """kill -9 of the server: no shutdown code runs."""
    assert srv.proc is not None
    srv.proc.kill()
    srv.proc.wait()


def delete_all(c: httpx.Client, states: tuple[str, ...]) -> None:
    """Delete the sandboxes in `states`, then every snapshot."""
    for st in states:
        for s in c.get("/v1/sandboxes", params={"state": st, "limit": 1000}).json()["items"]:
            c.delete(f"/v1/sandboxes/{s['id']}")
    for snap in c.get("/v1/snapshots").json()["items"]:
        c.delete(f"/v1/snapshots/{snap['id']}")


def settled(srv: Server, timeout: float = 8.0) -> None:
    """The store and the host agree (after the reaper had time to notice what died)."""
    deadline = time.monotonic() + timeout
    while (found := inconsistencies(srv)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found == []


def new_sandbox(c: httpx.Client, mark: str) -> tuple[str, str]:
    """A sandbox with an acknowledged file and a background process; returns (id, its pid)."""
    r = c.post("/v1/sandboxes", json={"timeout": 600})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = c.post(
        f"/v1/sandboxes/{sid}/exec",
        json={
            "cmd": f"echo {mark} > /home/user/ack && (setsid sleep 1000 >/dev/null 2>&1 < /dev/null & echo $!)"
        },
    )
    assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
    return sid, r.json()["stdout"].strip()


def sh(c: httpx.Client, sid: str, cmd: str) -> str:
    r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def state(c: httpx.Client, sid: str) -> dict[str, Any]:
    r = c.get(f"/v1/sandboxes/{sid}")
    assert r.status_code == 200, r.text
    return r.json()


def init_pid(srv: Server, sid: str) -> int | None:
    db = sqlite3.connect(f"file:{srv.home / 'cove.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT node FROM sandboxes WHERE id = ?", (sid,)).fetchone()
    finally:
        db.close()
    return json.loads(row[0]).get("pid") if row else None


def kill_tree(srv: Server, sid: str) -> None:
    """kill -9 of every process of a sandbox, pid 1 first, from the host."""
    pids = sorted(Cgroup(f"{srv.cgroup_parent}/{sid}").pids())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def no_500(r: httpx.Response | BaseException | None) -> None:
    if isinstance(r, httpx.Response):
        assert r.status_code < 500 or r.json()["error"]["code"] != "internal", r.text


def in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run `fn` in a thread; the returned callable joins it and gives its result (or exception)."""
    out: list[Any] = [None]

    def run() -> None:
        try:
            out[0] = fn()
        except BaseException as e:  # the caller inspects it
            out[0] = e

    t = threading.Thread(target=run)
    t.start()

    def join() -> Any:
        t.join(60)
        assert not t.is_alive(), "the request hung"
        return out[0]

    return join


# -- kill -9 of the server at each step ------------------------------------------------------------
def _hibernated(c: httpx.Client, sid: str) -> None:
    r = c.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200 and r.json()["state"] == "hibernated", r.text


def _paused(c: httpx.Client, sid: str) -> None:
    assert c.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"


# point -> (setup of the sandbox, the request that reaches the point, the state found after restart)
STEPS: dict[str, tuple[Callable[..., None] | None, Callable[[httpx.Client, str], Any], str]] = {
    "create.recorded": (None, lambda c, sid: c.post("/v1/sandboxes", json={}), "running"),
    "create.launched": (None, lambda c, sid: c.post("/v1/sandboxes", json={}), "running"),
    "snapshot.recorded": (None, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/snapshots", json={}), "running"),
    "snapshot.committed": (
        None,
        lambda c, sid: c.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True}),
        "running",
    ),
    "hibernate.dumped": (None, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/hibernate"), "hibernated"),
    "resume.restored": (_hibernated, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/resume"), "hibernated"),
    "pause.frozen": (None, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/pause"), "running"),
    "resume.thawed": (_paused, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/resume"), "paused"),
    "kill.stopped": (None, lambda c, sid: c.delete(f"/v1/sandboxes/{sid}"), "error"),
    "fork.created": (None, lambda c, sid: c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 2}), "running"),
}


@pytest.mark.parametrize("point", list(STEPS))
def test_server_sigkill_at_each_step(srv: Server, point: str) -> None:
    setup, request, after = STEPS[point]
    with srv.client() as c:
        sid, bg = new_sandbox(c, point)
    srv.stop()  # sandboxes outlive it
    srv.extra_env["COVE_FAULT"] = point
    srv.start()
    with srv.client() as c:
        if setup:
            setup(c, sid)
        before = {s["id"] for s in c.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]}
        with pytest.raises(httpx.HTTPError):  # the server dies under the request
            request(c, sid)
    assert srv.proc is not None and srv.proc.wait(10) == -signal.SIGKILL
    srv.extra_env.pop("COVE_FAULT")
    srv.start()
    settled(srv)
    with srv.client() as c:
        got = state(c, sid)
        assert got["state"] == after, got
        if point.startswith("create."):  # the new sandbox was never acknowledged: it is marked
            items = c.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]
            (new,) = [s for s in items if s["id"] not in before]
            assert new["state"] == "error" and new["end_reason"] == "creation interrupted by restart"
        if point.startswith(("snapshot.", "fork.")):
            assert c.get("/v1/snapshots").json()["items"] == [], "an unacknowledged snapshot stays hidden"
        if after == "error":
            return  # the kill had released it; the restart finished the job
        assert got["state"] == after
        assert sh(c, sid, "cat /home/user/ack") == f"{point}\n", "acknowledged data is kept"
        if point == "hibernate.dumped":  # its dump was complete: the processes come back
            assert got["hibernation"]["memory"] is True
        assert sh(c, sid, f"kill -0 {bg} && echo alive") == "alive\n", "its processes survive"
        if point == "fork.created":
            for child in c.get("/v1/sandboxes", params={"state": "running", "limit": 1000}).json()["items"]:
                if child["metadata"].get("forked_from") == sid:
                    assert sh(c, child["id"], "cat /home/user/ack") == f"{point}\n"
        c.delete(f"/v1/sandboxes/{sid}")
    settled(srv)


# -- a restart with sandboxes in every state -------------------------------------------------------
def test_server_sigkill_with_sandboxes_in_every_state(srv: Server) -> None:
    with srv.client() as c:
        ids = {s: new_sandbox(c, s) for s in ("running", "paused", "hibernated", "killed", "error", "snap")}
        _paused(c, ids["paused"][0])
        _hibernated(c, ids["hibernated"][0])
        c.delete(f"/v1/sandboxes/{ids['killed'][0]}")
        kill_tree(srv, ids["error"][0])
        r = c.post(f"/v1/sandboxes/{ids['snap'][0]}/snapshots", json={"memory": True})
        assert r.status_code == 201, r.text
        snap = r.json()["id"]
        settled(srv)  # the reaper has marked the dead one
    crash(srv)
    db = sqlite3.connect(srv.home / "cove.db")
    with db:  # a snapshot the crash interrupted, and a create that never got its sandbox started
        db.execute(
            "INSERT INTO snapshots (id, tenant, name, sandbox_id, state, created_at, layers, memory, config)"
            " VALUES ('snaphalfmade', 'default', NULL, ?, 'creating', 0, '[]', 1, '{}')",
            (ids["running"][0],),
        )
        row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (ids["running"][0],)).fetchone()
        cols = [d[0] for d in db.execute("SELECT * FROM sandboxes LIMIT 0").description]
        rec = dict(zip(cols, row, strict=True))
        rec.update(seq=None, id="startingsandbox0", state="starting", node="{}")
        db.execute(
            f"INSERT INTO sandboxes ({', '.join(rec)}) VALUES ({', '.join('?' * len(rec))})",
            list(rec.values()),
        )
    db.close()
    srv.start()
    settled(srv)
    with srv.client() as c:
        want = {"running": "running", "paused": "paused", "hibernated": "hibernated", "killed": "killed"}
        for name, expected in want.items():
            assert state(c, ids[name][0])["state"] == expected, name
        assert state(c, ids["error"][0])["state"] == "error"
        assert state(c, "startingsandbox0")["state"] == "error"
        assert c.get("/v1/snapshots/snaphalfmade").status_code == 404
        for name in ("running", "paused", "hibernated"):  # paused and hibernated resume on exec
            sid, bg = ids[name]
            assert sh(c, sid, f"cat /home/user/ack; kill -0 {bg} && echo alive") == f"{name}\nalive\n"
        # The acknowledged memory snapshot is usable: files and processes.
        r = c.post("/v1/sandboxes", json={"snapshot": snap})
        assert r.status_code == 201, r.text
        child = r.json()["id"]
        assert sh(c, child, f"cat /home/user/ack; kill -0 {ids['snap'][1]} && echo alive") == "snap\nalive\n"
        for sid in [child, *(v[0] for v in ids.values())]:
            c.delete(f"/v1/sandboxes/{sid}")
        assert c.delete(f"/v1/snapshots/{snap}").status_code == 204
    settled(srv)


# -- kill -9 of the server at moments chosen by time, under a workload -----------------------------
def _workload(
    srv: Server, ledger: str, acked: list[int], snaps: list[tuple[str, int]], stop: threading.Event
) -> None:
    """Lifecycle calls on the ledger sandbox, recording what was acknowledged; ends when the server dies."""
    steps = ["write", "snapshot", "write", "hibernate", "write", "pause", "write", "fork", "throwaway"]
    n = len(acked)
    with srv.client() as c, contextlib.suppress(httpx.HTTPError):
        while not stop.is_set():
            for step in steps:
                if step == "write":
                    r = c.post(f"/v1/sandboxes/{ledger}/exec", json={"cmd": f"echo {n} > /home/user/ack-{n}"})
                    if r.status_code == 200 and r.json()["exit_code"] == 0:
                        acked.append(n)
                    n += 1
                elif step == "snapshot":
                    r = c.post(f"/v1/sandboxes/{ledger}/snapshots", json={"memory": n % 2 == 0})
                    if r.status_code == 201:
                        snaps.append((r.json()["id"], len(acked)))
                elif step in ("hibernate", "pause"):
                    c.post(f"/v1/sandboxes/{ledger}/{step}")
                elif step == "fork":
                    r = c.post(f"/v1/sandboxes/{ledger}/fork", json={"count": 1})
                    for child in r.json().get("sandboxes", []) if r.status_code == 201 else []:
                        c.delete(f"/v1/sandboxes/{child['id']}")
                else:
                    r = c.post("/v1/sandboxes", json={})
                    if r.status_code == 201:
                        c.delete(f"/v1/sandboxes/{r.json()['id']}")


@pytest.mark.parametrize("delays", [(0.05, 0.2, 0.35, 0.5, 0.7, 0.9)])
def test_server_sigkill_at_random_moments_loses_nothing_acknowledged(
    srv: Server, delays: tuple[float, ...]
) -> None:
    with srv.client() as c:
        ledger, _ = new_sandbox(c, "ledger")
    acked: list[int] = []
    snaps: list[tuple[str, int]] = []
    for delay in delays:
        stop = threading.Event()
        t = threading.Thread(target=_workload, args=(srv, ledger, acked, snaps, stop))
        t.start()
        time.sleep(delay)
        crash(srv)
        stop.set()
        t.join(30)
        srv.start()
        settled(srv)
        with srv.client() as c:
            assert state(c, ledger)["state"] in ("running", "paused", "hibernated"), state(c, ledger)
            have = sh(c, ledger, "cat /home/user/ack-* 2>/dev/null").split()
            assert set(map(str, acked)) <= set(have), (
                f"acknowledged writes lost: {set(map(str, acked)) - set(have)}"
            )
    assert acked, "the workload made no progress"
    with srv.client() as c:
        for snap, count in snaps[-3:]:  # acknowledged snapshots are usable, with what preceded them
            r = c.post("/v1/sandboxes", json={"snapshot": snap})
            assert r.status_code == 201, r.text
            have = sh(c, r.json()["id"], "cat /home/user/ack-* 2>/dev/null").split()
            assert set(map(str, acked[:count])) <= set(have)
            c.delete(f"/v1/sandboxes/{r.json()['id']}")
        for snap, _ in snaps:
            c.delete(f"/v1/snapshots/{snap}")
        c.delete(f"/v1/sandboxes/{ledger}")
    settled(srv)


# -- kill -9 of a sandbox's pid 1 (its guest agent) and of its other processes ---------------------
def test_guest_agent_sigkill_during_exec(srv: Server) -> None:
    with srv.client() as c:
        sid, _ = new_sandbox(c, "agent")
        pending = in_background(lambda: c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "sleep 30"}))
        time.sleep(0.5)
        pid = init_pid(srv, sid)
        assert pid
        os.kill(pid, signal.SIGKILL)
        r = pending()
        assert isinstance(r, httpx.Response) and r.status_code in (409, 502, 503), r
        settled(srv)
        got = state(c, sid)
        assert got["state"] == "error" and "init process exited" in got["end_reason"], got
        r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
        assert r.status_code == 409 and "error" in r.json()["error"]["message"], r.text


OPS: dict[str, Callable[[httpx.Client, str], httpx.Response]] = {
    "hibernate": lambda c, sid: c.post(f"/v1/sandboxes/{sid}/hibernate"),
    "snapshot": lambda c, sid: c.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True}),
    "fork": lambda c, sid: c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 2}),
    "resume": lambda c, sid: c.post(f"/v1/sandboxes/{sid}/resume"),
    "kill": lambda c, sid: c.delete(f"/v1/sandboxes/{sid}"),
}


@pytest.mark.parametrize("op", list(OPS))
def test_sandbox_sigkill_during_each_operation(srv: Server, op: str) -> None:
    """Every process of the sandbox is killed from the host at a few moments of an operation."""
    tables = set(stray_tables())
    with srv.client() as c:
        for delay in (0.0, 0.03, 0.12):
            sid, _ = new_sandbox(c, op)
            if op == "resume":
                _hibernated(c, sid)
            pending = in_background(lambda: OPS[op](c, sid))  # noqa: B023 - joined in this iteration
            time.sleep(delay)
            kill_tree(srv, sid)
            no_500(pending())
            settled(srv)
            got = state(c, sid)
            if got["state"] in ("running", "paused", "hibernated"):
                assert sh(c, sid, "cat /home/user/ack") == f"{op}\n", "a live sandbox keeps its files"
            delete_all(c, ("running", "hibernated"))
    settled(srv)
    assert set(stray_tables()) <= tables, "a CRIU that was stopped left its nftables table in the host"


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_sandbox_processes_other_than_pid_1(srv: Server) -> None:
    with srv.client() as c:
        sid, bg = new_sandbox(c, "procs")
        pid1 = init_pid(srv, sid)
        cg = Cgroup(f"{srv.cgroup_parent}/{sid}")
        # The command of an exec in flight: the exec ends with its signal, at once.
        pending = in_background(lambda: c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "exec sleep 31"}))
        deadline = time.monotonic() + 5
        target = None
        while target is None and time.monotonic() < deadline:
            for pid in cg.pids():
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == b"sleep\x0031\x00":
                        target = pid
            time.sleep(0.05)
        assert target, "the command did not start"
        os.kill(target, signal.SIGKILL)
        r = pending()
        assert r.status_code == 200 and r.json()["exit_code"] != 0, r.text
        # Every other process (the agent's handlers, the background process): the agent carries on.
        killed = [pid for pid in cg.pids() if pid != pid1]
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Until they are gone: a spare handler dying with a SIGKILL pending may still accept one
        # connection and drop it (reset), which is the kill itself, not the agent failing after it.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in killed) and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(3):
            assert sh(c, sid, "cat /home/user/ack") == "procs\n"
        assert sh(c, sid, f"kill -0 {bg} 2>/dev/null || echo gone") == "gone\n"
        assert state(c, sid)["state"] == "running"
        c.delete(f"/v1/sandboxes/{sid}")
    settled(srv)


# -- a damaged database --------------------------------------------------------------------------
def test_damaged_database(srv: Server) -> None:
    with srv.client() as c:
        sid, bg = new_sandbox(c, "db")
    crash(srv)  # its WAL holds the latest transactions
    db, wal = srv.home / "cove.db", srv.home / "cove.db-wal"
    assert wal.exists() and wal.stat().st_size > 0
    # A torn write at the WAL's end (what a crash during a write leaves): ignored.
    with open(wal, "ab") as f:
        f.write(os.urandom(3000))
    srv.start()
    settled(srv)
    with srv.client() as c:
        assert sh(c, sid, f"cat /home/user/ack; kill -0 {bg} && echo alive") == "db\nalive\n"
    srv.stop()
    # Garbage over the file: the server refuses to start, says why, and touches no sandbox.
    saved = db.read_bytes()
    with open(db, "r+b") as f:
        f.write(os.urandom(4096))
    with pytest.raises(
        RuntimeError, match=r"the database .*cove\.db cannot be used .*Restore it from a backup"
    ):
        srv.start()
    db.write_bytes(saved)  # the operator restores the backup
    srv.start()
    settled(srv)
    with srv.client() as c:
        assert sh(c, sid, f"cat /home/user/ack; kill -0 {bg} && echo alive") == "db\nalive\n"
        c.delete(f"/v1/sandboxes/{sid}")
    settled(srv)


# -- a full disk ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> Iterator[Server]:
    """A server whose storage image is 256 MiB and whose checkpoints go to a 2 MiB tmpfs."""
    ckpt = Path(tempfile.mkdtemp(prefix="cove-fault-ckpt-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(ckpt)], check=True)
    server = Server(
        f"faults-disk-{WORKER}",
        {"COVE_POOLS": "", "COVE_STORAGE_SIZE": "256M", "COVE_CHECKPOINT_DIR": str(ckpt)},
    )
    try:
        server.start()
        yield server
        server.close()
    finally:
        subprocess.run(["umount", str(ckpt)], check=False)
        ckpt.rmdir()


def test_storage_full(small: Server) -> None:
    with small.client() as c:
        keep, bg = new_sandbox(c, "kept")
        hog, _ = new_sandbox(c, "hog")
        r = c.post(
            f"/v1/sandboxes/{hog}/exec",
            json={"cmd": "dd if=/dev/urandom of=/home/user/fill bs=1M count=400 status=none; echo rc=$?"},
            timeout=120,
        )
        assert r.status_code == 200 and "No space left" in r.json()["stderr"], r.text
        # While it is full: every call answers (works, or a clear error), nothing is half-made.
        results = [
            c.post("/v1/sandboxes", json={}),
            c.post(f"/v1/sandboxes/{keep}/snapshots", json={}),
            c.post(f"/v1/sandboxes/{keep}/exec", json={"cmd": "echo more >> /home/user/ack"}),
            c.post(f"/v1/sandboxes/{keep}/fork", json={"count": 1}),
        ]
        for r in results:
            no_500(r)
        assert sh(c, keep, f"head -1 /home/user/ack; kill -0 {bg} && echo alive") == "kept\nalive\n"
        settled(small)
        # Freed again: everything works.
        assert sh(c, hog, "rm /home/user/fill && sync && echo freed") == "freed\n"
        r = c.post("/v1/sandboxes", json={})
        assert r.status_code == 201, r.text
        r = c.post(f"/v1/sandboxes/{keep}/snapshots", json={})
        assert r.status_code == 201, r.text
        delete_all(c, ("running",))
    settled(small)


def test_checkpoint_dir_full(small: Server) -> None:
    ckpt = Path(small.env["COVE_CHECKPOINT_DIR"])
    with small.client() as c:
        sid, bg = new_sandbox(c, "ckpt")
        r = c.post(f"/v1/sandboxes/{sid}/hibernate")
        assert r.status_code == 503 and r.json()["error"]["code"] == "hibernate_failed", r.text
        assert "still running" in r.json()["error"]["message"]
        r = c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "snapshot_failed", r.text
        assert list(ckpt.iterdir()) == [], "a failed dump leaves no image"
        assert sh(c, sid, f"cat /home/user/ack; kill -0 {bg} && echo alive") == "ckpt\nalive\n"
        assert [s["id"] for s in c.get("/v1/sandboxes", params={"state": "running"}).json()["items"]] == [sid]
        settled(small)
        subprocess.run(["mount", "-o", "remount,size=512m", str(ckpt)], check=True)
        assert c.post(f"/v1/sandboxes/{sid}/hibernate").json()["state"] == "hibernated"
        assert sh(c, sid, f"cat /home/user/ack; kill -0 {bg} && echo alive") == "ckpt\nalive\n"
        subprocess.run(["mount", "-o", "remount,size=2m", str(ckpt)], check=True)
        c.delete(f"/v1/sandboxes/{sid}")
    settled(small)


def test_the_reaper_checks_every_sandbox_in_turn() -> None:
    """With more active sandboxes than ALIVE_CHECKS, each tick checks the next ALIVE_CHECKS of
    them, so every death is noticed within a few ticks (the real check is covered above)."""
    import asyncio
    from types import SimpleNamespace

    from cove.controlplane.reaper import ALIVE_CHECKS, Reaper

    n = ALIVE_CHECKS * 2 + 5
    recs = [SimpleNamespace(id=f"sb{i}", node={"pid": i}, node_id="") for i in range(n)]
    asked: list[list[str]] = []

    async def dead(items: list[tuple[str, dict]]) -> list[str]:
        asked.append([sid for sid, _ in items])
        return [sid for sid, _ in items if sid == "sb7"]

    node = SimpleNamespace(dead=dead)
    fake = SimpleNamespace(_alive_turn=0, fleet=SimpleNamespace(of=lambda node_id: node))
    found = [asyncio.run(Reaper._dead_among(fake, recs)) for _ in range(3)]  # type: ignore[arg-type]
    assert all(len(a) == ALIVE_CHECKS for a in asked)
    assert {sid for a in asked for sid in a} == {r.id for r in recs}  # three ticks cover all
    assert sum("sb7" in f for f in found) >= 1
