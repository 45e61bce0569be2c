"""Pause and resume: a frozen sandbox uses no CPU, keeps its memory, and continues where it stopped."""

from __future__ import annotations

import time

import httpx

from conftest import Server

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /home/user/counter; sleep 0.05; done"


def counter(server: Server, sid: str) -> int:
    # Read from the host side, so that looking does not resume the sandbox.
    path = server.home / "storage" / "active" / sid / "upper" / "home" / "user" / "counter"
    for _ in range(50):
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the counter never appeared")


def start_counter(api: httpx.Client, sid: str) -> None:
    cmd = f"setsid bash -c '{COUNTER}' > /dev/null 2>&1 < /dev/null &"
    assert api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}).json()["exit_code"] == 0


def test_pause_freezes_and_resume_continues(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"auto_resume": False}).json()
    sid = sb["id"]
    try:
        start_counter(api, sid)
        time.sleep(0.3)
        r = api.post(f"/v1/sandboxes/{sid}/pause")
        assert r.status_code == 200 and r.json()["state"] == "paused"
        assert api.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"  # idempotent
        frozen_at = counter(server, sid)
        time.sleep(0.5)
        assert counter(server, sid) == frozen_at, "a paused sandbox must not run"
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
        assert r.status_code == 409 and "paused" in r.json()["error"]["message"]
        r = api.post(f"/v1/sandboxes/{sid}/resume")
        assert r.status_code == 200 and r.json()["state"] == "running"
        time.sleep(0.3)
        assert counter(server, sid) > frozen_at
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_calls_resume_a_paused_sandbox_by_default(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    assert api.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo awake"})
    assert r.status_code == 200 and r.json()["stdout"] == "awake\n"
    assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"


def test_idle_sandbox_is_paused_and_wakes_on_the_next_call(api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"idle_timeout": 1}).json()
    try:
        deadline = time.monotonic() + 10
        while api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] != "paused":
            assert time.monotonic() < deadline, "an idle sandbox was not paused"
            time.sleep(0.2)
        r = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "echo back"})
        assert r.json()["stdout"] == "back\n"
        assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "running"
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_killing_a_paused_sandbox_frees_it(server: Server, api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={}).json()
    start_counter(api, sb["id"])
    api.post(f"/v1/sandboxes/{sb['id']}/pause")
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
    assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "killed"
    assert not (server.home / "sandboxes" / sb["id"]).exists()
    r = api.post(f"/v1/sandboxes/{sb['id']}/resume")
    assert r.status_code == 409
