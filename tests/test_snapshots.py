"""Snapshots, sandboxes started from them, forks and (file-level) hibernation."""

from __future__ import annotations

import time

import httpx

from conftest import Server


def sh(api: httpx.Client, sid: str, cmd: str) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return r.json()


def layers_on_disk(server: Server) -> set[str]:
    return {p.name for p in (server.home / "storage" / "layers").iterdir() if not p.name.startswith(".")}


def test_snapshot_restore_and_layer_lifetime(server: Server, api: httpx.Client) -> None:
    before = layers_on_disk(server)  # other tests' layers may be on this server too
    a = api.post("/v1/sandboxes", json={"env": {"ORIGIN": "a"}}).json()
    try:
        sh(api, a["id"], "echo before > /home/user/note")
        r = api.post(f"/v1/sandboxes/{a['id']}/snapshots", json={"name": "checkpoint-1"})
        assert r.status_code == 201, r.text
        snap = r.json()
        assert snap["name"] == "checkpoint-1" and snap["sandbox_id"] == a["id"]
        sh(api, a["id"], "echo after > /home/user/later")
        assert snap["id"] in [s["id"] for s in api.get("/v1/snapshots").json()["items"]]

        b = api.post("/v1/sandboxes", json={"snapshot": snap["id"]}).json()
        assert b["state"] == "running"
        out = sh(api, b["id"], "cat /home/user/note; ls /home/user; echo $ORIGIN")["stdout"]
        assert out.startswith("before\n") and "later" not in out and out.endswith("a\n")
        sh(api, b["id"], "echo from-b > /home/user/note")
        assert sh(api, a["id"], "cat /home/user/note")["stdout"] == "before\n"

        # Deleting the snapshot keeps the layers B still runs on.
        assert api.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
        assert api.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert sh(api, b["id"], "cat /home/user/note")["stdout"] == "from-b\n"
        snap_layers = {name for name in layers_on_disk(server) - before if name.startswith("snap-")}
        assert snap_layers, "B's snapshot layer must still exist"
        api.delete(f"/v1/sandboxes/{b['id']}")
        deadline = time.monotonic() + 10  # collection runs after the kill returns
        while snap_layers & layers_on_disk(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (snap_layers & layers_on_disk(server)), "an unused layer must be collected"
    finally:
        api.delete(f"/v1/sandboxes/{a['id']}")


def test_fork_children_start_from_the_same_instant_and_diverge(api: httpx.Client) -> None:
    policy = {"on_timeout": "hibernate", "idle_timeout": 900, "on_idle": "hibernate"}
    src = api.post("/v1/sandboxes", json={"metadata": {"team": "x"}, **policy}).json()
    try:
        # Written right before the fork, without any sync: every child must have it.
        sh(
            api,
            src["id"],
            "head -c 3000000 /dev/urandom > /home/user/data && sha256sum /home/user/data > /home/user/sum",
        )
        r = api.post(f"/v1/sandboxes/{src['id']}/fork", json={"count": 3})
        assert r.status_code == 201, r.text
        children = r.json()["items"]
        assert len(children) == 3 and len({c["id"] for c in children}) == 3
        for i, child in enumerate(children):
            assert child["metadata"]["forked_from"] == src["id"] and child["metadata"]["team"] == "x"
            assert {k: child[k] for k in policy} == policy, "children end the way their source does"
            assert sh(api, child["id"], "sha256sum -c /home/user/sum")["exit_code"] == 0
            sh(api, child["id"], f"echo {i} > /home/user/mine")
        for i, child in enumerate(children):
            assert sh(api, child["id"], "cat /home/user/mine")["stdout"] == f"{i}\n"
        assert sh(api, src["id"], "ls /home/user/mine")["exit_code"] != 0, (
            "children must not write into the source"
        )
        assert api.get(f"/v1/sandboxes/{src['id']}").json()["state"] == "running"
        for child in children:
            api.delete(f"/v1/sandboxes/{child['id']}")
    finally:
        api.delete(f"/v1/sandboxes/{src['id']}")


def test_hibernate_keeps_files_and_resumes_on_the_next_call(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    sh(api, sid, "echo kept > /home/user/state")
    r = api.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "hibernated" and "memory" in r.json()["hibernation"]
    assert api.post(f"/v1/sandboxes/{sid}/hibernate").json()["state"] == "hibernated"  # idempotent
    assert sh(api, sid, "cat /home/user/state")["stdout"] == "kept\n"  # auto-resume
    assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"


def test_snapshot_errors(server: Server, api: httpx.Client, sandbox: dict) -> None:
    assert api.post("/v1/sandboxes/nope/snapshots").status_code == 404
    assert api.post("/v1/sandboxes", json={"snapshot": "snapnothere"}).status_code == 404
    assert api.post(f"/v1/sandboxes/{sandbox['id']}/fork", json={"count": 0}).status_code == 422
    assert api.post(f"/v1/sandboxes/{sandbox['id']}/fork", json={"count": 21}).status_code == 422
    snap = api.post(f"/v1/sandboxes/{sandbox['id']}/snapshots").json()
    other = api.post("/v1/keys", json={"name": "snap-other", "tenant": "snap-other"}).json()
    with server.client(other["key"]) as c:
        assert c.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert c.post("/v1/sandboxes", json={"snapshot": snap["id"]}).status_code == 404
        assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert c.get("/v1/snapshots").json()["items"] == []
    api.delete(f"/v1/keys/{other['id']}")
    assert api.delete(f"/v1/snapshots/{snap['id']}").status_code == 204


def test_long_snapshot_chains_are_flattened() -> None:
    from cove.devserver import Server as DevServer

    srv = DevServer("flatten", extra_env={"COVE_FLATTEN_AT": "1"})
    srv.start()
    try:
        with srv.client() as api:
            sb = api.post("/v1/sandboxes", json={}).json()
            sh(api, sb["id"], "echo 1 > /home/user/one; echo gone > /home/user/doomed")
            for step in range(2):  # each generation adds a layer: base + 3 snapshot layers
                snap = api.post(f"/v1/sandboxes/{sb['id']}/snapshots").json()
                nxt = api.post("/v1/sandboxes", json={"snapshot": snap["id"]}).json()
                api.delete(f"/v1/sandboxes/{sb['id']}")
                sb = nxt
                sh(api, sb["id"], "rm /home/user/doomed" if step == 0 else "echo 3 > /home/user/three")
            snap = api.post(f"/v1/sandboxes/{sb['id']}/snapshots").json()
            assert snap["layers"] >= 2  # earlier generations may already be flattened: timing
            deadline = time.monotonic() + 60
            while api.get(f"/v1/snapshots/{snap['id']}").json()["layers"] != 1:
                if time.monotonic() > deadline:
                    events = [ln for ln in srv.log.read_text().splitlines() if "cove.access" not in ln]
                    raise AssertionError(
                        "the chain was not flattened; server log:\n" + "\n".join(events[-25:])
                    )
                time.sleep(0.2)
            flat = api.post("/v1/sandboxes", json={"snapshot": snap["id"]}).json()
            out = sh(api, flat["id"], "cat /home/user/one /home/user/three; ls /home/user/doomed; id -un")
            assert out["stdout"].startswith("1\n3\n") and "No such file" in out["stderr"], out
            assert out["stdout"].endswith("user\n")
            api.delete(f"/v1/sandboxes/{flat['id']}")
            api.delete(f"/v1/sandboxes/{sb['id']}")
    finally:
        srv.close()
