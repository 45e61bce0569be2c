"""Ports inside a sandbox reached through cove: by path and by host name, with an API key or a signed
URL (and the cookie it leaves), HTTP and WebSocket; everyone else is refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import Server
from cove import Sandbox
from port_app import start_app

PORT = 8123


@pytest.fixture(scope="module")
def app_sandbox(server: Server) -> Iterator[Sandbox]:
    sb = Sandbox.create(url=server.url, api_key=server.api_key, timeout=600)
    try:
        with server.client() as api:
            start_app(api, sb.id, PORT)
        yield sb
    finally:
        sb.kill()


@pytest.fixture(scope="module")
def other_tenant_key(server: Server) -> str:
    with server.client() as api:
        r = api.post("/v1/keys", json={"name": "other", "tenant": "other-tenant"})
        assert r.status_code == 201, r.text
        return r.json()["key"]


def _headers(r: httpx.Response) -> dict[str, str]:
    """The headers the app in the sandbox received, by lower-case name."""
    return {k.lower(): v for k, v in r.json()["headers"].items()}


def _base(server: Server, sb: Sandbox) -> str:
    return f"{server.url}/v1/sandboxes/{sb.id}/ports/{PORT}"


def test_by_path_with_the_api_key(server: Server, app_sandbox: Sandbox) -> None:
    r = httpx.get(
        _base(server, app_sandbox) + "/headers?x=1", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "/headers?x=1"  # the prefix is cove's, the rest is the app's
    assert "authorization" not in _headers(r)  # cove's credential stays with cove
    assert _headers(r)["x-forwarded-for"] == "127.0.0.1"
    body = b"x" * 300_000
    r = httpx.post(_base(server, app_sandbox) + "/echo", content=body, headers={"X-API-Key": server.api_key})
    assert r.status_code == 200 and r.json()["size"] == len(body)


def test_by_path_needs_a_credential_and_the_right_tenant(
    server: Server, app_sandbox: Sandbox, other_tenant_key: str
) -> None:
    r = httpx.get(_base(server, app_sandbox) + "/headers")
    assert r.status_code == 401 and "signed URL" in r.json()["error"]["message"]
    r = httpx.get(_base(server, app_sandbox) + "/headers", headers={"X-API-Key": "cove_wrong"})
    assert r.status_code == 401
    # Another tenant's key: the same answer as for a sandbox that does not exist (ids do not leak).
    r = httpx.get(_base(server, app_sandbox) + "/headers", headers={"X-API-Key": other_tenant_key})
    assert r.status_code == 404
    r = httpx.get(
        f"{server.url}/v1/sandboxes/nosuchsandbox/ports/{PORT}/headers", headers={"X-API-Key": server.api_key}
    )
    assert r.status_code == 404
    r = httpx.get(
        f"{server.url}/v1/sandboxes/{app_sandbox.id}/ports/70000/", headers={"X-API-Key": server.api_key}
    )
    assert r.status_code == 400


def test_a_closed_port_and_the_trailing_slash(server: Server, app_sandbox: Sandbox) -> None:
    auth = {"X-API-Key": server.api_key}
    r = httpx.get(f"{server.url}/v1/sandboxes/{app_sandbox.id}/ports/8999/", headers=auth)
    assert r.status_code == 502 and "port is not open" in r.json()["error"]["message"]
    r = httpx.get(_base(server, app_sandbox) + "?a=b", headers=auth)
    assert r.status_code == 307 and r.headers["location"].endswith(f"/ports/{PORT}/?a=b")


def test_signed_url_by_path_then_its_cookie(server: Server, app_sandbox: Sandbox) -> None:
    url = app_sandbox.get_url(PORT, path="/headers", by="path", expires_in=120)
    assert url.startswith(_base(server, app_sandbox) + "/headers?")
    with httpx.Client() as browser:  # keeps cookies, sends no API key
        r = browser.get(url)
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/headers"  # the signature is not passed on
        assert "cove_port=" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
        r = browser.get(_base(server, app_sandbox) + "/headers?later=1")
        assert r.status_code == 200 and r.json()["path"] == "/headers?later=1"
        assert "cove_port" not in _headers(r).get("cookie", "")
    # The signature is for this sandbox and port only, and cannot be altered.
    other_port = url.replace(f"/ports/{PORT}/", "/ports/8999/")
    assert httpx.get(other_port).status_code == 403
    tampered = url.replace("cove_expires=", "cove_expires=9")
    r = httpx.get(tampered)
    assert r.status_code == 403 and "invalid or has expired" in r.json()["error"]["message"]


def test_a_signed_url_expires(server: Server, app_sandbox: Sandbox) -> None:
    url = app_sandbox.get_url(PORT, path="/headers", by="path", expires_in=3)
    assert httpx.get(url).status_code == 200  # valid for at least 2 s (expiry is in whole seconds)
    time.sleep(4.1)
    assert httpx.get(url).status_code == 403


def test_by_host_name(server: Server, app_sandbox: Sandbox) -> None:
    url = app_sandbox.get_url(PORT, path="/headers")
    parts = urlsplit(url)
    assert parts.hostname == f"{PORT}-{app_sandbox.id}.localhost" and parts.port == server.port
    # *.localhost does not resolve on this machine: connect to loopback and name the host.
    direct = f"{server.url}{parts.path}?{parts.query}"
    host = {"Host": parts.netloc}
    r = httpx.get(direct, headers=host)
    assert r.status_code == 200 and r.json()["path"] == "/headers"
    assert _headers(r)["host"] == parts.netloc
    r = httpx.get(f"{server.url}/headers", headers={**host, "X-API-Key": server.api_key})
    assert r.status_code == 200
    r = httpx.get(f"{server.url}/headers", headers=host)  # cove's sandboxes have no public ports
    assert r.status_code == 403


def test_websocket_by_path(server: Server, app_sandbox: Sandbox) -> None:
    ws_base = _base(server, app_sandbox).replace("http://", "ws://")
    with ws_connect(ws_base + "/chat", additional_headers={"X-API-Key": server.api_key}) as ws:
        assert ws.recv() == "path=/chat"
        ws.send("hello")
        assert ws.recv() == "hello"
    signed = app_sandbox.get_url(PORT, path="/signed", by="path").replace("http://", "ws://")
    with ws_connect(signed) as ws:
        assert ws.recv() == "path=/signed"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_base + "/chat").close()
    assert refused.value.response.status_code == 401


def test_websocket_by_host_name(server: Server, app_sandbox: Sandbox) -> None:
    ws_url = server.url.replace("http://", "ws://") + "/live"
    host = f"{PORT}-{app_sandbox.id}.localhost:{server.port}"
    with ws_connect(ws_url, additional_headers={"Host": host, "X-API-Key": server.api_key}) as ws:
        assert ws.recv() == "path=/live"
        ws.send(b"\x00binary")
        assert ws.recv() == b"\x00binary"
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_url, additional_headers={"Host": host}).close()
    assert refused.value.response.status_code == 403


def test_signed_url_bad_requests(server: Server, app_sandbox: Sandbox) -> None:
    with server.client() as api:
        path = f"/v1/sandboxes/{app_sandbox.id}/urls"
        assert api.post(path, json={"port": 0}).status_code == 422
        assert api.post(path, json={"port": 80, "expires_in": 10**9}).status_code == 422
        assert api.post(path, json={"port": 80, "path": "no-slash"}).status_code == 422
        assert api.post("/v1/sandboxes/nosuch/urls", json={"port": 80}).status_code == 404
        both = api.post(path, json={"port": 80, "file": "/etc/hostname"})
        assert both.status_code == 422 and "exactly one" in both.text
        assert api.post(path, json={}).status_code == 422


def test_signed_file_urls(server: Server, app_sandbox: Sandbox) -> None:
    app_sandbox.files.write("/home/user/report.txt", "quarterly numbers")
    down = app_sandbox.files.download_url("/home/user/report.txt", expires_in=60)
    r = httpx.get(down)  # no API key
    assert r.status_code == 200 and r.text == "quarterly numbers"
    up = app_sandbox.files.upload_url("/home/user/in/upload.bin", expires_in=60)
    r = httpx.put(up, content=b"\x00\x01payload")
    assert r.status_code == 200, r.text
    assert app_sandbox.files.read("/home/user/in/upload.bin", format="bytes") == b"\x00\x01payload"
    # A signature opens exactly its file and method.
    assert httpx.put(down, content=b"x").status_code == 403  # a download URL cannot upload
    assert httpx.get(up).status_code == 403  # nor the other way round
    other = down.replace("report.txt", "other.txt")
    assert httpx.get(other).status_code == 403
    as_root = down + "&user=root"
    assert httpx.get(as_root).status_code == 403
    assert app_sandbox.files.read("/home/user/report.txt") == "quarterly numbers"
    short = app_sandbox.files.download_url("/home/user/report.txt", expires_in=1)
    time.sleep(2.1)
    r = httpx.get(short)
    assert r.status_code == 403 and "expired" in r.json()["error"]["message"]
