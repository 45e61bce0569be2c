"""Several servers sharing one PostgreSQL are one fleet (docs/fleet.md): any of them serves any
sandbox, whichever node holds it, over that node's authenticated node API; the reaper runs on one
server at a time (a lease); a node that stops heartbeating has its sandboxes marked lost.

Real parts: a PostgreSQL 15 (tests/pg.py), two `cove serve` processes and one `cove node`, each
with its own data dir and cgroup parent, on this one host."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

import pg
from cove.devserver import Server
from cove.sdk import Sandbox

KEY = "cove_test_fleet_" + "ab" * 8


@pytest.fixture(scope="module")
def fleet(postgres: pg.Postgres) -> Iterator[tuple[Server, Server, Server, str]]:
    """Replicas A and B (each a node too) and a node-only C, on one database."""
    url = postgres.create_database()
    env = {"COVE_DATABASE_URL": url, "COVE_API_KEY": KEY, "COVE_POOLS": "", "COVE_KERNEL": "0"}
    made: list[Server] = []
    try:
        for tag, node_only in (("fleet-a", False), ("fleet-b", False), ("fleet-c", True)):
            srv = Server(tag, {**env, "COVE_NODE_ID": tag}, node_only=node_only)
            srv.api_key = KEY
            srv.start()
            made.append(srv)
        a, b, c = made
        _wait_for(lambda: _ready_nodes(a) >= {"fleet-a", "fleet-b", "fleet-c"}, "every node joins A")
        _wait_for(lambda: _ready_nodes(b) >= {"fleet-a", "fleet-b", "fleet-c"}, "every node joins B")
        yield a, b, c, url
    finally:
        for srv in made:  # the node-only one last: the replicas kill what it holds first
            srv.close()


def _rows(url: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return list(conn.execute(sql, args).fetchall())


def _ready_nodes(srv: Server) -> set[str]:
    with srv.client() as c:
        r = c.get("/v1/nodes")
        return {n["id"] for n in r.json()["nodes"] if n["state"] == "ready" and n["reachable"]}


def _wait_for(check: object, what: str, timeout: float = 30) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def _exec(c: httpx.Client, sid: str, cmd: str) -> dict:
    r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return r.json()


def test_sandboxes_created_through_one_replica_are_served_by_the_other(fleet: tuple) -> None:
    a, b, _c, url = fleet
    with a.client() as ca, b.client() as cb:
        ids = []
        for _ in range(6):
            r = ca.post("/v1/sandboxes", json={"timeout": 600})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        nodes = {row[0]: row[1] for row in _rows(url, "SELECT id, node_id FROM sandboxes")}
        # Placement spreads by load: every node got some.
        assert Counter(nodes[i] for i in ids) == {"fleet-a": 2, "fleet-b": 2, "fleet-c": 2}
        listed = {s["id"] for s in cb.get("/v1/sandboxes", params={"limit": 100}).json()["items"]}
        assert set(ids) <= listed
        for i, sid in enumerate(ids):
            out = _exec(cb, sid, f"echo hello-{i} && hostname")
            assert out["stdout"].startswith(f"hello-{i}\n") and out["exit_code"] == 0
            payload = f"file {i} through B\n".encode() * 1000
            assert (
                cb.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/x"}, content=payload).status_code
                < 300
            )
            got = ca.get(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/x"})
            assert got.status_code == 200 and got.content == payload
        for sid in ids:
            assert cb.delete(f"/v1/sandboxes/{sid}").status_code == 204
        states = {row[0] for row in _rows(url, "SELECT state FROM sandboxes WHERE id = ANY(%s)", (ids,))}
        assert states == {"killed"}


def test_a_pty_and_a_process_started_through_one_replica_are_read_through_the_other(fleet: tuple) -> None:
    a, b, _, _url = fleet
    with a.client() as ca, b.client() as cb:
        sid = ca.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
        try:
            proc = ca.post(
                f"/v1/sandboxes/{sid}/processes",
                json={"cmd": "bash --norc -i", "pty": {"rows": 24, "cols": 80}},
            ).json()
            assert (
                cb.post(
                    f"/v1/sandboxes/{sid}/processes/{proc['id']}/resize", json={"rows": 40, "cols": 100}
                ).status_code
                == 204
            )
            ws_url = (
                b.url.replace("http://", "ws://") + f"/v1/sandboxes/{sid}/processes/{proc['id']}/ws?offset=0"
            )
            with ws_connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
                cb.post(
                    f"/v1/sandboxes/{sid}/processes/{proc['id']}/stdin", json={"data": "stty size; exit\n"}
                )
                seen = b""
                for message in ws:
                    if isinstance(message, bytes):
                        seen += message
                    else:
                        assert json.loads(message)["exit_code"] == 0
                        break
            assert b"40 100" in seen
        finally:
            cb.delete(f"/v1/sandboxes/{sid}")


def test_the_sdk_connects_through_either_replica(fleet: tuple) -> None:
    a, b, _, _ = fleet
    with Sandbox.create(url=a.url, api_key=KEY, timeout=600) as sb:
        other = Sandbox.connect(sb.id, url=b.url, api_key=KEY)
        other.files.write("/tmp/note", b"written through B")
        assert sb.files.read("/tmp/note") == "written through B"
        assert other.exec("cat /tmp/note").stdout == "written through B"


def test_a_node_api_refuses_calls_without_its_credential(fleet: tuple) -> None:
    _, _, _, url = fleet
    (address, token), *_ = _rows(url, "SELECT address, token FROM nodes WHERE id = 'fleet-c'")
    host, port = address.rsplit(":", 1)

    async def ask(line: dict) -> dict:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(json.dumps(line).encode() + b"\n")
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        return reply

    for creds in ({}, {"token": "not-the-token"}, {"token": token[:-1]}):
        reply = asyncio.run(ask({**creds, "call": "sweep", "args": {"keep": []}}))
        assert reply["ok"] is False and reply["code"] == "unauthorized", reply
        reply = asyncio.run(ask({**creds, "tunnel": "guest", "sandbox": "abc"}))
        assert reply["ok"] is False and reply["code"] == "unauthorized", reply
    assert asyncio.run(
        ask({"token": token, "call": "runtime_problem", "args": {"runtime": "namespaces"}})
    ) == {
        "ok": True,
        "result": None,
    }


def test_one_reaper_at_a_time_and_timeouts_end_once(fleet: tuple) -> None:
    a, _b, _, url = fleet
    holders = {row[0] for row in _rows(url, "SELECT holder FROM leases WHERE name = 'reaper'")}
    assert len(holders) == 1 and holders <= {"fleet-a", "fleet-b", "fleet-c"}
    with a.client() as ca:
        ids = [ca.post("/v1/sandboxes", json={"timeout": 2}).json()["id"] for _ in range(3)]
    _wait_for(
        lambda: (
            {r[0] for r in _rows(url, "SELECT state FROM sandboxes WHERE id = ANY(%s)", (ids,))} == {"killed"}
        ),
        "the short-lived sandboxes time out",
    )
    time.sleep(2)  # a second reaper would end them again now
    ends = _rows(
        url,
        "SELECT sandbox, COUNT(*) FROM audit WHERE sandbox = ANY(%s) AND action = 'sandbox.kill'"
        " GROUP BY sandbox",
        (ids,),
    )
    assert sorted(n for _, n in ends) == [1, 1, 1], ends


def test_idle_use_through_one_replica_counts_for_the_reaper_on_the_other(fleet: tuple) -> None:
    a, b, _, _ = fleet
    with a.client() as ca, b.client() as cb:
        sid = ca.post("/v1/sandboxes", json={"timeout": 600, "idle_timeout": 4}).json()["id"]
        try:
            for _ in range(8):  # used for 8 s through A and B in turn: never idle for 4 s
                _exec(ca, sid, "true")
                time.sleep(0.5)
                _exec(cb, sid, "true")
                time.sleep(0.5)
            assert cb.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
        finally:
            cb.delete(f"/v1/sandboxes/{sid}")


def test_a_node_that_stops_heartbeating_has_its_sandboxes_marked_lost(postgres: pg.Postgres) -> None:
    """Its own fleet: a node is killed here."""
    url = postgres.create_database()
    env = {"COVE_DATABASE_URL": url, "COVE_API_KEY": KEY, "COVE_POOLS": "", "COVE_KERNEL": "0"}
    a = Server("lost-a", {**env, "COVE_NODE_ID": "lost-a"})
    n = Server("lost-n", {**env, "COVE_NODE_ID": "lost-n"}, node_only=True)
    a.api_key = KEY
    a.start()
    try:
        n.start()
        _wait_for(lambda: "lost-n" in _ready_nodes(a), "the node joins")
        with a.client() as ca:
            ids = [ca.post("/v1/sandboxes", json={"timeout": 600}).json()["id"] for _ in range(4)]
            on_n = [r[0] for r in _rows(url, "SELECT id FROM sandboxes WHERE node_id = 'lost-n'")]
            assert len(on_n) == 2
            assert n.proc is not None
            n.proc.kill()  # kill -9: no goodbye
            n.proc.wait()
            killed_at = time.monotonic()
            took = _wait_for(
                lambda: all(ca.get(f"/v1/sandboxes/{sid}").json()["state"] == "lost" for sid in on_n),
                "the node's sandboxes are marked lost",
            )
            print(f"\nnode lost -> sandboxes marked lost in {time.monotonic() - killed_at:.1f} s")
            assert took < 20
            info = ca.get(f"/v1/sandboxes/{on_n[0]}").json()
            assert "lost-n" in info["end_reason"] and "heartbeat" in info["end_reason"]
            r = _exec(ca, next(i for i in ids if i not in on_n), "echo still here")  # the others live on
            assert r["stdout"] == "still here\n"
            r = ca.post(f"/v1/sandboxes/{on_n[0]}/exec", json={"cmd": "true"})
            assert r.status_code == 409 and "lost" in r.json()["error"]["message"]
            # One is killed while lost; the node comes back: the other returns, the killed one goes.
            assert ca.delete(f"/v1/sandboxes/{on_n[1]}").status_code == 204
            assert ca.get(f"/v1/sandboxes/{on_n[1]}").json()["state"] == "killed"
            n.start()
            _wait_for(
                lambda: ca.get(f"/v1/sandboxes/{on_n[0]}").json()["state"] == "running", "it comes back"
            )
            _wait_for(lambda: "lost-n" in _ready_nodes(a), "the node is reachable again")
            assert _exec(ca, on_n[0], "echo back")["stdout"] == "back\n"
            assert not [p for p in _node_processes(n) if on_n[1] in p]
    finally:
        a.close()  # kills what is left, on both nodes
        n.close()


def _node_processes(srv: Server) -> list[str]:
    from cove.devserver import leaks

    return [x for x in leaks(srv) if x.startswith("process") or "/sandboxes/" in x]


def test_a_port_is_served_through_the_replica_that_does_not_hold_it(fleet: tuple) -> None:
    a, b, _, url = fleet
    with a.client() as ca, b.client() as cb:
        for _ in range(3):  # until one lands on a node other than B's own
            sid = ca.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
            if _rows(url, "SELECT node_id FROM sandboxes WHERE id = %s", (sid,))[0][0] != "fleet-b":
                break
            cb.delete(f"/v1/sandboxes/{sid}")
        try:
            ca.post(f"/v1/sandboxes/{sid}/files/mkdir", params={"path": "/tmp/site"})
            ca.put(
                f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/site/index.html"}, content=b"<h1>far</h1>"
            )
            ca.post(
                f"/v1/sandboxes/{sid}/processes",
                json={"cmd": "python3 -m http.server 8123 --bind 127.0.0.1 --directory /tmp/site"},
            )
            got = None
            for _ in range(50):
                got = cb.get(f"/v1/sandboxes/{sid}/ports/8123/index.html")
                if got.status_code == 200:
                    break
                time.sleep(0.1)
            assert got is not None and got.status_code == 200 and got.text == "<h1>far</h1>"
            closed = cb.get(f"/v1/sandboxes/{sid}/ports/8124/")
            assert closed.status_code == 502 and "not open" in closed.text
        finally:
            cb.delete(f"/v1/sandboxes/{sid}")


def test_a_pool_set_through_one_replica_is_shared_by_both(fleet: tuple) -> None:
    """A pool's min is the fleet's: each of the two replicas keeps half of it warm, and a change
    made through one reaches the other at its next heartbeat."""
    a, b, _, _ = fleet
    with a.client() as ca, b.client() as cb:
        assert ca.put("/v1/pools/base", json={"min": 4, "max": 8}).status_code == 200
        try:

            def both_hold_two() -> bool:
                pa, pb = ca.get("/v1/pools/base"), cb.get("/v1/pools/base")
                return (
                    pa.status_code == pb.status_code == 200 and pa.json()["ready"] == pb.json()["ready"] == 2
                )

            _wait_for(both_hold_two, "each replica keeps 2 of the pool's 4")
            assert cb.get("/v1/pools/base").json()["min"] == 4
            sid = cb.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
            assert cb.get("/v1/pools/base").json()["hits"] == 1  # a warm claim through B
            cb.delete(f"/v1/sandboxes/{sid}")
        finally:
            assert ca.delete("/v1/pools/base").status_code == 204
        _wait_for(lambda: cb.get("/v1/pools/base").status_code == 404, "the removal reaches B")
