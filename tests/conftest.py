"""Shared fixtures: a real cove server on loopback (see cove.devserver)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import kube
import pg
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


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.Postgres]:
    """A PostgreSQL 15 server of the test session's own (tests/pg.py); skips where none is installed."""
    why = pg.missing()
    if why:
        pytest.skip(why)
    srv = pg.Postgres()
    srv.start()
    yield srv
    srv.stop()
    assert not srv.processes(), f"PostgreSQL processes left running: {srv.processes()}"


@pytest.fixture
def pg_url(postgres: pg.Postgres) -> str:
    """The URL of a new, empty database on the test PostgreSQL."""
    return postgres.create_database()


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """An HTTP client with the server's admin key."""
    with server.client() as c:
        yield c


@pytest.fixture
def made(api: httpx.Client) -> Iterator[list[str]]:
    """Ids of sandboxes to kill at the end of the test (through whichever `api` the module uses)."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        api.delete(f"/v1/sandboxes/{sid}")


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


@pytest.fixture
def sandboxes(e2b_env: Server) -> Iterator[list[str]]:
    """Ids of sandboxes to kill at the end of the test, whatever happened."""
    ids: list[str] = []
    yield ids
    with e2b_env.client() as c:
        for sid in ids:
            c.delete(f"/v1/sandboxes/{sid}")


@pytest.fixture
def sbx(sandboxes: list[str]) -> Any:
    """A sandbox made by the real e2b SDK (`e2b.Sandbox`), killed after the test."""
    from e2b import Sandbox

    sb = Sandbox.create(timeout=300)
    sandboxes.append(sb.sandbox_id)
    return sb


@pytest.fixture(scope="session")
def kernel_ready(server: Server) -> None:
    """The server builds the kernel environment in the background on its first start (pip)."""
    deadline = time.monotonic() + 240
    with server.client() as api:
        while time.monotonic() < deadline:
            sb = api.post("/v1/sandboxes", json={}).json()
            r = api.post(f"/v1/sandboxes/{sb['id']}/contexts", json={}, timeout=120)
            api.delete(f"/v1/sandboxes/{sb['id']}")
            if r.status_code == 201:
                return
            if "building" not in r.text:
                pytest.skip(f"code contexts unavailable here: {r.text}")
            time.sleep(2)
    pytest.skip("the kernel environment was not built in time")


@pytest.fixture(scope="module")
def control_plane() -> Iterator[kube.KubeControlPlane]:
    """A Kubernetes v1.20.2 control plane of the module's own (tests/kube.py); skips where its
    binaries are not built (scripts/kube/build.sh, which setup.sh runs)."""
    why = kube.missing()
    if why:
        pytest.skip(why)
    cp = kube.KubeControlPlane()
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()
    assert not cp.processes(), f"control plane processes left running: {cp.processes()}"
    assert not cp.dir.exists()
