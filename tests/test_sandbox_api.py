"""The native REST API: lifecycle, listing, timeouts, auth and bad input."""

from __future__ import annotations

import time

import httpx
import pytest

from conftest import Server


def exec_ok(api: httpx.Client, sid: str, cmd: str, **kw: object) -> dict:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_create_exec_kill_lifecycle(api: httpx.Client) -> None:
    r = api.post("/v1/sandboxes", json={"metadata": {"suite": "lifecycle"}, "env": {"GREETING": "hi"}})
    assert r.status_code == 201, r.text
    sb = r.json()
    assert sb["state"] == "running"
    assert sb["runtime"] == "namespaces"
    assert sb["user"] == "user" and sb["workdir"] == "/home/user"
    res = exec_ok(api, sb["id"], "echo $GREETING from $(whoami) in $(pwd)")
    assert res["stdout"] == "hi from user in /home/user\n"
    assert res["exit_code"] == 0 and res["timed_out"] is False
    assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "running"
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
    got = api.get(f"/v1/sandboxes/{sb['id']}").json()
    assert got["state"] == "killed" and got["end_reason"] == "killed by request"
    r = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "true"})
    assert r.status_code == 409 and "killed" in r.json()["error"]["message"]
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204  # idempotent


def test_a_new_workdir_is_created_for_the_user(api: httpx.Client) -> None:
    r = api.post("/v1/sandboxes", json={"workdir": "/srv/app/src"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        res = exec_ok(api, sid, "pwd; stat -c %U /srv/app /srv/app/src; touch here && echo ok")
        assert res["stdout"] == "/srv/app/src\nuser\nuser\nok\n", res
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_exec_results_streaming_and_timeouts(api: httpx.Client, sandbox: dict) -> None:
    sid = sandbox["id"]
    res = exec_ok(api, sid, "echo out; echo err >&2; exit 3")
    assert (res["stdout"], res["stderr"], res["exit_code"]) == ("out\n", "err\n", 3)
    res = exec_ok(api, sid, "sleep 30", timeout=0.5)
    assert res["timed_out"] is True and res["exit_code"] != 0
    r = api.post(
        f"/v1/sandboxes/{sid}/exec", json={"argv": ["python3", "-c", "import sys; print(sys.argv)", "a b"]}
    )
    assert r.json()["stdout"] == "['-c', 'a b']\n"
    assert exec_ok(api, sid, "cat", stdin="fed through stdin")["stdout"] == "fed through stdin"
    assert exec_ok(api, sid, "id -u", user="root")["stdout"] == "0\n"
    assert exec_ok(api, sid, "pwd", cwd="/tmp")["stdout"] == "/tmp\n"
    assert exec_ok(api, sid, "no-such-command")["exit_code"] == 127

    events = []
    first_at = None
    started = time.monotonic()
    with api.stream(
        "POST", f"/v1/sandboxes/{sid}/exec/stream", json={"cmd": "echo one; sleep 1; echo two"}
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                events.append(httpx.Response(200, content=line).json())
                first_at = first_at or time.monotonic() - started
    assert [e["type"] for e in events] == ["stdout", "stdout", "exit"]
    assert events[0]["data"] == "one\n" and events[-1]["exit_code"] == 0
    assert first_at is not None and first_at < 0.9, "output must stream before the command ends"


def test_list_filters_and_pagination(api: httpx.Client) -> None:
    ids = []
    for i in range(3):
        r = api.post("/v1/sandboxes", json={"metadata": {"suite": "list", "n": str(i)}})
        assert r.status_code == 201
        ids.append(r.json()["id"])
    try:
        api.delete(f"/v1/sandboxes/{ids[2]}")
        running = api.get("/v1/sandboxes", params={"metadata": "suite=list", "state": "running"}).json()[
            "items"
        ]
        assert {s["id"] for s in running} == set(ids[:2])
        one = api.get("/v1/sandboxes", params=[("metadata", "suite=list"), ("metadata", "n=1")]).json()[
            "items"
        ]
        assert [s["id"] for s in one] == [ids[1]]
        seen, cursor = [], None
        while True:
            params = {"metadata": "suite=list", "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = api.get("/v1/sandboxes", params=params).json()
            seen += [s["id"] for s in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == ids
    finally:
        for sid in ids:
            api.delete(f"/v1/sandboxes/{sid}")


def test_timeout_kills_and_can_be_extended(api: httpx.Client) -> None:
    short = api.post("/v1/sandboxes", json={"timeout": 1}).json()
    extended = api.post("/v1/sandboxes", json={"timeout": 1}).json()
    r = api.post(f"/v1/sandboxes/{extended['id']}/timeout", json={"timeout": 120})
    assert r.status_code == 200 and r.json()["timeout"] == 120
    deadline = time.monotonic() + 10
    while api.get(f"/v1/sandboxes/{short['id']}").json()["state"] == "running":
        assert time.monotonic() < deadline, "the server did not kill a sandbox past its timeout"
        time.sleep(0.2)
    got = api.get(f"/v1/sandboxes/{short['id']}").json()
    assert got["state"] == "killed" and got["end_reason"] == "timeout"
    assert api.get(f"/v1/sandboxes/{extended['id']}").json()["state"] == "running"
    api.delete(f"/v1/sandboxes/{extended['id']}")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"memory_mb": 1}, "memory_mb"),
        ({"cpu": 0}, "cpu"),
        ({"pids": 2}, "pids"),
        ({"timeout": -5}, "timeout"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"workdir": "relative/path"}, "workdir"),
        ({"user": "Robert'); DROP"}, "user"),
        ({"templat": "base"}, "templat"),
        ({"disk_mb": 1}, "disk_mb"),
    ],
)
def test_invalid_create_is_422_naming_the_field(api: httpx.Client, body: dict, field: str) -> None:
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 422, r.text
    assert field in r.json()["error"]["message"]


def test_bad_requests_get_clear_4xx(api: httpx.Client, sandbox: dict) -> None:
    r = api.post("/v1/sandboxes", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["error"]["message"]
    r = api.post("/v1/sandboxes", json={"template": "nope"})
    assert r.status_code == 404 and "template" in r.json()["error"]["message"]
    for method, path in [
        ("GET", "/v1/sandboxes/doesnotexist"),
        ("DELETE", "/v1/sandboxes/doesnotexist"),
        ("POST", "/v1/sandboxes/doesnotexist/exec"),
        ("GET", "/v1/sandboxes/doesnotexist/files?path=/etc/hosts"),
    ]:
        r = api.request(method, path, json={"cmd": "true"} if method == "POST" else None)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "sandbox_not_found"
    r = api.post(f"/v1/sandboxes/{sandbox['id']}/exec", json={"cmd": "x", "argv": ["y"]})
    assert r.status_code == 422 and "exactly one" in r.json()["error"]["message"]
    r = api.get("/v1/sandboxes", params={"cursor": "%%%"})
    assert r.status_code == 422
    r = api.get("/v1/sandboxes", params={"state": "sleeping"})
    assert r.status_code == 422 and "state" in r.json()["error"]["message"]


def test_auth_and_tenants(server: Server, api: httpx.Client, sandbox: dict) -> None:
    assert httpx.get(f"{server.url}/v1/sandboxes").status_code == 401
    r = httpx.get(f"{server.url}/v1/sandboxes", headers={"Authorization": "Bearer cove_wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    assert httpx.get(f"{server.url}/v1/sandboxes", headers={"X-API-Key": server.api_key}).status_code == 200

    other = api.post("/v1/keys", json={"name": "other team", "tenant": "other"}).json()
    with server.client(other["key"]) as c:
        sid = sandbox["id"]
        assert c.get(f"/v1/sandboxes/{sid}").status_code == 404
        assert c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"}).status_code == 404
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 404
        assert c.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hosts"}).status_code == 404
        assert sid not in [s["id"] for s in c.get("/v1/sandboxes").json()["items"]]
        assert c.post("/v1/keys", json={"name": "escalate"}).status_code == 403
    assert api.get(f"/v1/sandboxes/{sandbox['id']}").json()["state"] == "running"
    assert api.delete(f"/v1/keys/{other['id']}").status_code == 204
    with server.client(other["key"]) as c:
        assert c.get("/v1/sandboxes").status_code == 401  # revoked at once


def test_health_metrics_and_schema(server: Server, api: httpx.Client, sandbox: dict) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    assert 'cove_sandboxes{state="running"}' in text
    running = float(
        next(
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith('cove_sandboxes{state="running"}')
        )
    )
    assert running >= 1
    assert "cove_sandbox_create_seconds_bucket" in text
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/sandboxes/{sandbox_id}/exec" in schema["paths"]


def test_fast_routes_answer_as_the_fastapi_routes_do(api: httpx.Client, server: Server) -> None:
    """create and exec are served by raw routes ahead of FastAPI's (api/fast.py): bodies they do not
    take (not JSON, invalid) fall back to the FastAPI route, so errors keep their shape, and a
    request without a key is 401 before its body is looked at."""
    r = api.post("/v1/sandboxes", content=b'{"timeout": 600}', headers={"Content-Type": "application/json"})
    assert r.status_code == 201 and r.headers["content-type"] == "application/json"
    sb = r.json()
    try:
        assert set(sb) >= {"id", "state", "template"} and sb["state"] == "running"
        path = f"/v1/sandboxes/{sb['id']}/exec"
        ok = api.post(path, content=b'{"argv": ["echo", "hi"]}', headers={"Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.json()["stdout"] == "hi\n" and ok.json()["exit_code"] == 0
        # The same body as text/plain: FastAPI's route answers (it does not take it as JSON)
        plain = api.post(path, content=b'{"argv": ["true"]}', headers={"Content-Type": "text/plain"})
        assert plain.status_code == 422 and plain.json()["error"]["code"] == "validation_error"
        bad = api.post(path, content=b'{"argv": []}', headers={"Content-Type": "application/json"})
        assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "argv"
        broken = api.post(path, content=b'{"argv": [', headers={"Content-Type": "application/json"})
        assert broken.status_code == 422 and "malformed JSON" in broken.json()["error"]["message"]
        nokey = httpx.post(server.url + path, json={"argv": ["true"]})
        assert nokey.status_code == 401 and nokey.json()["error"]["code"] == "unauthorized"
        gone = api.post("/v1/sandboxes/nosuchsandbox/exec", json={"argv": ["true"]})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "sandbox_not_found"
        invalid = api.post("/v1/sandboxes", json={"timeout": -1})
        assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "validation_error"
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_concurrent_execs_and_exec_after_pause(server: Server, sandbox: dict) -> None:
    """Execs on one sandbox at once through the fast route each get their own output (the node keeps
    at most a few guest connections per sandbox: the rest open their own); a paused sandbox is
    resumed by the next exec, whose kept connections were dropped at the pause."""
    import asyncio

    sid = sandbox["id"]

    async def go() -> list[dict]:
        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as ac:
            replies = await asyncio.gather(
                *(
                    ac.post(f"/v1/sandboxes/{sid}/exec", json={"argv": ["sh", "-c", f"sleep 0.2; echo {i}"]})
                    for i in range(8)
                )
            )
        return [r.json() for r in replies]

    results = asyncio.run(go())
    assert [r["stdout"] for r in results] == [f"{i}\n" for i in range(8)]
    with server.client() as api:
        assert api.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"
        assert exec_ok(api, sid, "echo back")["stdout"] == "back\n"
        assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
