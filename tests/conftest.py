"""Shared fixtures: a real cove server on loopback (see cove.devserver)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from cove.devserver import UPLOAD_LIMIT, Server, leaks

__all__ = ["UPLOAD_LIMIT", "Server", "leaks"]

if os.geteuid() != 0:
    pytest.exit("cove's tests create namespaces, cgroups and mounts: run them as root", returncode=2)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    srv = Server(os.environ.get("PYTEST_XDIST_WORKER", "main"))
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client with the server's admin key."""
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(api: httpx.Client) -> Iterator[dict]:
    """A running sandbox (killed afterwards)."""
    r = api.post("/v1/sandboxes", json={"timeout": 600})
    assert r.status_code == 201, r.text
    sb = r.json()
    yield sb
    api.delete(f"/v1/sandboxes/{sb['id']}")


@pytest.fixture
def e2b_env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    """The e2b SDKs pointed at the test server through their three variables, and nothing else."""
    for name in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN", "E2B_HTTP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    monkeypatch.setenv("E2B_API_KEY", server.api_key)
    return server
