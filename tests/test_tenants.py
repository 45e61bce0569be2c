"""Tenants (docs/tenants.md): another tenant's objects are 404 on every route of the API, admin keys
manage keys (create, list, revoke, rotate), and lifecycle actions land in the audit log."""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from cove.devserver import Server

# Routes anyone may call (no key): nothing of a tenant's behind them.
PUBLIC = {"/healthz", "/metrics"}
# Routes that take their own credential instead of an API key (a signed URL, a volume's token):
# an API key alone, A's or B's, gets 401 there.
OWN_TOKEN = re.compile(r"^/(e2b/template-files|volumecontent)/")
# Routes for admin keys only: another tenant's plain key gets 403 (401 without a valid key).
ADMIN_ONLY = re.compile(r"^/v1/(keys|tenants|nodes)(/|$)")
# Changing a pool needs an admin key (403 for a plain one); reading one of A's is 404 for anyone.
ADMIN_WRITES = re.compile(r"^/v1/pools/")


@dataclass
class Tenant:
    name: str
    key: str
    key_id: str
    http: httpx.Client


def _tenant(server: Server, api: httpx.Client, prefix: str, admin: bool = False) -> Tenant:
    name = f"{prefix}-{secrets.token_hex(3)}"
    r = api.post("/v1/keys", json={"name": name, "tenant": name, "admin": admin})
    assert r.status_code == 201, r.text
    return Tenant(name, r.json()["key"], r.json()["id"], server.client(r.json()["key"]))


@dataclass
class Objects:
    """Tenant A's real objects, one of each kind, for B to try to reach."""

    sandbox: str
    snapshot: str
    volume: str
    process: str
    key_id: str
    tenant: str
    template: str
    volume_id: str


@pytest.fixture(scope="module")
def owner(server: Server) -> Iterator[tuple[Tenant, Objects]]:
    with server.client() as api:
        a = _tenant(server, api, "tenant-a")
    h = a.http
    sb = h.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
    proc = h.post(f"/v1/sandboxes/{sb}/processes", json={"cmd": "sleep 600"})
    assert proc.status_code == 201, proc.text
    snap = h.post(f"/v1/sandboxes/{sb}/snapshots", json={"name": "a-snap"})
    assert snap.status_code == 201, snap.text
    vol = "a-vol-" + secrets.token_hex(3)
    made = h.post("/v1/volumes", json={"name": vol, "size_mb": 16})
    assert made.status_code == 201, made.text
    # e2b's volume API names volumes by id (cove's own API by name).
    listed = h.get("/volumes", headers={"X-API-KEY": a.key}).json()
    vol_id = next(v["volumeID"] for v in listed if v["name"] == vol)
    tpl = "a-tpl-" + secrets.token_hex(3)
    built = h.post("/v1/templates", json={"name": tpl, "from": "base", "steps": []}, timeout=120)
    assert built.status_code == 200 and '"done"' in built.text, built.text[-500:]
    # A warm pool of A's snapshot, set by an admin key of A's tenant.
    with server.client() as api:
        key = api.post("/v1/keys", json={"name": "a-admin", "tenant": a.name, "admin": True}).json()["key"]
    with server.client(key) as a_admin:
        r = a_admin.put(f"/v1/pools/{snap.json()['id']}", json={"min": 0, "max": 1})
        assert r.status_code == 200, r.text
    yield a, Objects(sb, snap.json()["id"], vol, proc.json()["id"], a.key_id, a.name, tpl, vol_id)
    with server.client(key) as a_admin:
        a_admin.delete(f"/v1/pools/{snap.json()['id']}")
    h.delete(f"/v1/templates/{tpl}")
    h.delete(f"/v1/sandboxes/{sb}")
    h.delete(f"/v1/snapshots/{snap.json()['id']}")
    h.delete(f"/v1/volumes/{vol}")
    h.close()


def _params(path: str, objs: Objects) -> dict[str, str]:
    """A's object for each path parameter; a new kind of parameter must be added here."""
    values = {
        "sandbox_id": objs.sandbox,
        "snapshot_id": objs.snapshot,
        "process_id": objs.process,
        "context_id": "ctx-" + objs.sandbox,  # its sandbox is looked up first
        "key_id": objs.key_id,
        "tenant": objs.tenant,
        "template_id": objs.snapshot,  # e2b names snapshots as templates
        "volume_id": objs.volume_id,  # e2b's volumes are cove's, by id
        "alias": objs.template,
        "build_id": "00000000-0000-4000-8000-000000000000",  # no build of A's is known to B
        "files_hash": "0" * 64,
    }
    out = {}
    for name in re.findall(r"\{(\w+)(?::\w+)?\}", path):
        if name == "name":
            if path.startswith("/v1/volumes"):
                out[name] = objs.volume
            elif path.startswith("/v1/templates"):
                out[name] = objs.template
            elif path.startswith("/v1/pools"):
                out[name] = objs.snapshot
            else:
                raise AssertionError(f"{path}: which object of tenant A does {{name}} name? add it here")
        elif name in values:
            out[name] = values[name]
        else:
            raise AssertionError(
                f"{path}: unknown path parameter {{{name}}}: add tenant A's object to _params"
            )
    return out


def _example(schema: dict[str, Any], spec: dict[str, Any]) -> Any:
    """A small valid instance of a JSON schema (required fields only) for a request body."""
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        return _example(spec["components"]["schemas"][ref], spec)
    for combo in ("anyOf", "oneOf", "allOf"):
        if combo in schema:
            options = [s for s in schema[combo] if s.get("type") != "null"]
            return _example(options[0], spec)
    if "default" in schema:
        return schema["default"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _example(props[k], spec) for k in schema.get("required", []) if k in props}
    if kind == "array":
        return [_example(schema["items"], spec)] if schema.get("minItems") else []
    if kind in ("integer", "number"):
        return max(1, schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1))
    if kind == "boolean":
        return False
    return "x"


# Bodies that would be valid for A's own objects (so a 404 is the tenant check, not validation).
BODIES = {
    ("post", "/v1/sandboxes/{sandbox_id}/files/rename"): {"src": "/tmp/a", "dst": "/tmp/b"},
    ("post", "/v1/sandboxes/{sandbox_id}/files/mkdir"): {"path": "/tmp/d"},
    ("post", "/v1/sandboxes/{sandbox_id}/exec"): {"cmd": "true"},
    ("post", "/v1/sandboxes/{sandbox_id}/exec/stream"): {"cmd": "true"},
    ("post", "/v1/sandboxes/{sandbox_id}/processes"): {"cmd": "true"},
    ("post", "/v1/sandboxes/{sandbox_id}/code"): {"code": "1"},
    ("post", "/v1/sandboxes/{sandbox_id}/urls"): {"port": 8000},
    ("post", "/v1/sandboxes/{sandbox_id}/durability"): {"snapshot_every": 0},
}
QUERIES = {"path": "/tmp", "paths": "/tmp"}  # files routes need a path


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield method, path, op


def _request(
    t: Tenant, spec: dict[str, Any], method: str, path: str, op: dict[str, Any], objs: Objects
) -> httpx.Response:
    url = path
    for name, value in _params(path, objs).items():
        url = re.sub(r"\{" + name + r"(:\w+)?\}", value, url)
    query = {
        p["name"]: QUERIES.get(p["name"], "x")
        for p in op.get("parameters", [])
        if p["in"] == "query" and p.get("required")
    }
    body = None
    if (method, path) in BODIES:
        body = BODIES[(method, path)]
    elif "requestBody" in op:
        content = op["requestBody"].get("content", {})
        if "application/json" in content:
            body = _example(content["application/json"]["schema"], spec)
    if body is None and method in ("post", "put"):
        body = {} if "requestBody" in op and "application/json" in op["requestBody"]["content"] else None
    return t.http.request(method.upper(), url, params=query, json=body, timeout=30)


def test_another_tenant_reaches_nothing_on_any_route(
    server: Server, api: httpx.Client, owner: tuple[Tenant, Objects]
) -> None:
    """Every route of the OpenAPI schema with a path parameter, called by tenant B (a plain key
    and an admin key) on tenant A's real objects: 404, as for ids that do not exist (admin-only
    routes: 403 for the plain key). Routes added later are walked too."""
    a, objs = owner
    spec = api.get("/openapi.json").json()
    b = _tenant(server, api, "tenant-b")
    b_admin = _tenant(server, api, "tenant-b-admin", admin=True)
    walked, problems = 0, []
    for method, path, op in _operations(spec):
        if path in PUBLIC or "{" not in path:
            continue
        for who in (b, b_admin):
            if ADMIN_ONLY.match(path) and who is b_admin:
                continue  # admin keys manage every tenant's keys and quotas by design
            r = _request(who, spec, method, path, op, objs)
            walked += 1
            expected = {401, 403} if ADMIN_ONLY.match(path) else {401} if OWN_TOKEN.match(path) else {404}
            if ADMIN_WRITES.match(path) and method != "get" and who is b:
                expected = {403}
            if r.status_code not in expected:
                problems.append(f"{method.upper()} {path} as {who.name}: {r.status_code} {r.text[:200]}")
    assert not problems, "\n".join(problems)
    assert walked > 40  # the walk really covered the API

    # A's objects are untouched and still A's.
    assert a.http.get(f"/v1/sandboxes/{objs.sandbox}").json()["state"] == "running"
    assert a.http.get(f"/v1/snapshots/{objs.snapshot}").status_code == 200
    assert a.http.get(f"/v1/volumes/{objs.volume}").status_code == 200
    assert a.http.get(f"/v1/templates/{objs.template}").status_code == 200
    assert a.http.get(f"/v1/sandboxes/{objs.sandbox}/processes/{objs.process}").json()["running"]
    b.http.close()
    b_admin.http.close()


def test_another_tenant_lists_and_references_nothing(
    server: Server, api: httpx.Client, owner: tuple[Tenant, Objects]
) -> None:
    """Lists, filters and references in bodies (start from A's snapshot, mount A's volume) do not
    reach A's objects either."""
    _, objs = owner
    b = _tenant(server, api, "tenant-b")
    spec = api.get("/openapi.json").json()
    mine = (objs.sandbox, objs.snapshot, objs.volume, objs.template)
    for method, path, op in _operations(spec):
        if method != "get" or "{" in path or path in PUBLIC or ADMIN_ONLY.match(path):
            continue
        r = _request(b, spec, method, path, op, objs)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:200]}"
        assert not any(x in r.text for x in mine), f"GET {path} shows tenant A's objects: {r.text[:300]}"
    metrics = b.http.get("/sandboxes/metrics", params={"sandbox_ids": objs.sandbox})
    assert objs.sandbox not in metrics.text
    assert b.http.post("/v1/sandboxes", json={"snapshot": objs.snapshot}).status_code == 404
    assert b.http.post("/sandboxes", json={"templateID": objs.snapshot}).status_code == 404
    assert b.http.post("/v1/sandboxes", json={"template": objs.template}).status_code == 404
    assert b.http.post("/sandboxes", json={"templateID": objs.template}).status_code == 404
    built = b.http.post("/v1/templates", json={"name": "b-" + objs.template, "from": objs.template})
    assert built.status_code == 404, built.text
    r = b.http.post("/v1/sandboxes", json={"volumes": [{"name": objs.volume, "path": "/data"}]})
    assert r.status_code == 404, r.text
    # The same volume name is a different volume in another tenant.
    assert b.http.post("/v1/volumes", json={"name": objs.volume, "size_mb": 16}).status_code == 201
    assert b.http.delete(f"/v1/volumes/{objs.volume}").status_code == 204
    # e2b's in-sandbox API (envd) needs the sandbox's own token, not any tenant's key.
    envd = b.http.post(
        "/process.Process/List",
        headers={"E2B-Sandbox-Id": objs.sandbox, "Content-Type": "application/json", "X-API-Key": b.key},
        content=b"{}",
    )
    assert envd.status_code == 401, envd.text
    # An audit log filtered on A's sandbox is empty for B; asking for A's tenant is refused.
    assert b.http.get("/v1/audit", params={"sandbox": objs.sandbox}).json()["items"] == []
    assert b.http.get("/v1/audit", params={"tenant": objs.tenant}).status_code == 403
    b.http.close()


def test_a_pool_of_a_tenants_template_is_that_tenants(
    server: Server, api: httpx.Client, owner: tuple[Tenant, Objects]
) -> None:
    a, objs = owner
    with server.client() as admin_api:
        key = admin_api.post("/v1/keys", json={"name": "a-admin2", "tenant": a.name, "admin": True})
    b = _tenant(server, api, "tenant-b")
    with server.client(key.json()["key"]) as a_admin:
        assert a_admin.put(f"/v1/pools/{objs.template}", json={"min": 0, "max": 1}).status_code == 200
        try:
            assert b.http.get(f"/v1/pools/{objs.template}").status_code == 404
            assert objs.template not in b.http.get("/v1/pools").text
            assert api.delete(f"/v1/pools/{objs.template}").status_code == 404  # another tenant's admin
        finally:
            a_admin.delete(f"/v1/pools/{objs.template}")
            b.http.close()


def test_keys_rotate_and_revoke(server: Server, api: httpx.Client) -> None:
    t = _tenant(server, api, "rot")
    assert t.http.get("/v1/sandboxes").status_code == 200
    r = api.post(f"/v1/keys/{t.key_id}/rotate")
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["id"] == t.key_id and new["tenant"] == t.name and new["key"] != t.key
    # The old secret stops working at once on this server (its key cache forgets it).
    assert t.http.get("/v1/sandboxes").status_code == 401
    with server.client(new["key"]) as fresh:
        assert fresh.get("/v1/sandboxes").status_code == 200
        # A plain key manages no keys, not even its own.
        assert fresh.post(f"/v1/keys/{t.key_id}/rotate").status_code == 403
        assert api.get("/v1/keys", params={"tenant": t.name}).json()["items"][0]["id"] == t.key_id
        assert api.delete(f"/v1/keys/{t.key_id}").status_code == 204
        assert fresh.get("/v1/sandboxes").status_code == 401
    assert api.post(f"/v1/keys/{t.key_id}/rotate").status_code == 404
    assert api.delete(f"/v1/keys/{t.key_id}").status_code == 404
    t.http.close()

    log = api.get("/v1/audit", params={"object": f"key/{t.key_id}"}).json()["items"]
    # Newest first; the plain key's refused rotation never reached the key (no entry).
    assert [(e["action"], e["outcome"]) for e in log] == [
        ("key.revoke", "key_not_found"),
        ("key.rotate", "key_not_found"),
        ("key.revoke", "ok"),
        ("key.rotate", "ok"),
        ("key.create", "ok"),
    ]
    assert log[-1]["detail"] == {"for_tenant": t.name, "admin": False}


def test_the_last_admin_key_cannot_be_revoked() -> None:
    srv = Server("tenants-last-admin", extra_env={"COVE_POOLS": ""})
    srv.start()
    try:
        with srv.client() as api:
            me = api.get("/v1/keys").json()["items"]
            assert len(me) == 1 and me[0]["admin"]
            r = api.delete(f"/v1/keys/{me[0]['id']}")
            assert r.status_code == 409 and r.json()["error"]["code"] == "last_admin_key"
            other = api.post("/v1/keys", json={"name": "second", "admin": True}).json()
            assert api.delete(f"/v1/keys/{me[0]['id']}").status_code == 204
            assert api.get("/v1/keys").status_code == 401
        with srv.client(other["key"]) as api2:
            assert api2.get("/v1/keys").json()["items"][0]["id"] == other["id"]
    finally:
        srv.close()


def test_audit_log_records_lifecycle_actions(server: Server, api: httpx.Client) -> None:
    t = _tenant(server, api, "aud")
    h = t.http
    since = time.time() - 1
    sb = h.post("/v1/sandboxes", json={"timeout": 600}).json()["id"]
    assert h.post(f"/v1/sandboxes/{sb}/exec", json={"cmd": "true"}).status_code == 200
    assert h.post(f"/v1/sandboxes/{sb}/pause").status_code == 200
    assert h.post(f"/v1/sandboxes/{sb}/exec", json={"cmd": "true"}).status_code == 200  # auto-resume
    assert h.put(f"/v1/sandboxes/{sb}/network", json={"mode": "open"}).status_code == 200
    snap = h.post(f"/v1/sandboxes/{sb}/snapshots", json={}).json()["id"]
    fork = h.post(f"/v1/sandboxes/{sb}/fork", json={"count": 1}).json()["items"][0]["id"]
    assert h.delete(f"/v1/snapshots/{snap}").status_code == 204
    assert h.delete(f"/v1/sandboxes/{sb}").status_code == 204
    assert h.post(f"/v1/sandboxes/{sb}/pause").status_code == 409  # a failed action is recorded too
    assert h.delete(f"/v1/sandboxes/{fork}").status_code == 204
    # A sandbox that times out is killed by the server itself.
    short = h.post("/v1/sandboxes", json={"timeout": 1}).json()["id"]
    deadline = time.monotonic() + 10
    while h.get(f"/v1/sandboxes/{short}").json()["state"] != "killed" and time.monotonic() < deadline:
        time.sleep(0.2)

    entries = h.get("/v1/audit", params={"limit": 1000}).json()["items"]
    got = [(e["action"], e["object"], e["outcome"]) for e in reversed(entries) if e["sandbox"] == sb]
    assert got == [
        ("sandbox.create", f"sandbox/{sb}", "ok"),
        ("sandbox.pause", f"sandbox/{sb}", "ok"),
        ("sandbox.resume", f"sandbox/{sb}", "ok"),
        ("sandbox.network", f"sandbox/{sb}", "ok"),
        ("sandbox.snapshot", f"snapshot/{snap}", "ok"),
        ("sandbox.fork", f"sandbox/{sb}", "ok"),
        ("sandbox.kill", f"sandbox/{sb}", "ok"),
        ("sandbox.pause", f"sandbox/{sb}", "not_running"),
    ], got  # exec is not audited; the fork's own snapshot and creates are part of the fork
    by_action = {e["action"]: e for e in entries if e["sandbox"] == sb}
    assert by_action["sandbox.resume"]["detail"] == {"auto": True}
    assert by_action["sandbox.fork"]["detail"]["children"] == [fork]
    assert by_action["sandbox.network"]["detail"] == {"mode": "open"}
    assert all(e["tenant"] == t.name and e["key_id"] == t.key_id for e in by_action.values())
    deleted = [e for e in entries if e["action"] == "snapshot.delete"]
    assert deleted and deleted[0]["object"] == f"snapshot/{snap}"
    timed_out = [e for e in entries if e["sandbox"] == short and e["action"] == "sandbox.kill"]
    assert timed_out and timed_out[0]["key_id"] == "" and timed_out[0]["detail"] == {"reason": "timeout"}

    # Filters: action, sandbox, time; pages by cursor; admins see every tenant, or one.
    kills = h.get("/v1/audit", params={"action": "sandbox.kill", "sandbox": sb}).json()["items"]
    assert len(kills) == 1
    assert h.get("/v1/audit", params={"until": "2000-01-01T00:00:00Z"}).json()["items"] == []
    recent = h.get("/v1/audit", params={"since": since, "limit": 3}).json()
    assert len(recent["items"]) == 3 and recent["next_cursor"]
    rest = h.get("/v1/audit", params={"limit": 1000, "cursor": recent["next_cursor"]}).json()["items"]
    assert len(rest) == len(entries) - 3 and rest[0]["seq"] < recent["items"][-1]["seq"]
    as_admin = api.get("/v1/audit", params={"tenant": t.name, "limit": 1000}).json()["items"]
    assert [e["seq"] for e in as_admin] == [e["seq"] for e in entries]
    everyone = api.get("/v1/audit", params={"limit": 1000}).json()["items"]
    assert {e["tenant"] for e in everyone} > {t.name}
    assert h.get("/v1/audit", params={"cursor": "nope"}).status_code == 422
    h.close()


def test_cli_and_sdk_rotate_and_audit(server: Server, api: httpx.Client) -> None:
    from typer.testing import CliRunner

    from cove.cli.main import app
    from cove.sdk.sync import audit_log, rotate_key

    t = _tenant(server, api, "cli-aud")
    sid = t.http.post("/v1/sandboxes", json={}).json()["id"]
    t.http.delete(f"/v1/sandboxes/{sid}")
    env = {"COVE_URL": server.url, "COVE_API_KEY": t.key, "COLUMNS": "200"}
    runner = CliRunner()
    shown = runner.invoke(app, ["audit", "--sandbox", sid], env=env, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "ACTION" in shown.stdout and sid[:8] in shown.stdout  # a table (its width is the terminal's)
    as_json = runner.invoke(app, ["audit", "--json", "--sandbox", sid], env=env, catch_exceptions=False)
    lines = [json.loads(line) for line in as_json.stdout.splitlines() if line.strip()]
    assert [(e["action"], e["key_id"]) for e in lines] == [
        ("sandbox.kill", t.key_id),
        ("sandbox.create", t.key_id),
    ]

    admin_env = {**env, "COVE_API_KEY": server.api_key}
    rotated = runner.invoke(app, ["keys", "rotate", t.key_id], env=admin_env, catch_exceptions=False)
    assert rotated.exit_code == 0, rotated.output
    new_secret = rotated.stdout.strip()
    assert new_secret.startswith("cove_") and "rotated" in rotated.stderr
    assert runner.invoke(app, ["audit"], env=env).exit_code == 1  # the old secret is gone
    again = rotate_key(t.key_id, url=server.url, api_key=server.api_key)
    assert again.key and again.key != new_secret
    entries = audit_log(action="sandbox.kill", url=server.url, api_key=again.key)
    assert [e.object for e in entries] == [f"sandbox/{sid}"] and entries[0].key_id == t.key_id
    t.http.close()
