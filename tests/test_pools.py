"""Warm pools: refill after claims, claims carry the caller's settings and nothing of anyone else,
scaling, snapshot pools, the API and CLI; per-tenant quotas (docs/pools.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from cove.cli.main import app as cli
from cove.controlplane.pools import MOST_DEFERRED, QUIET_GAP, Traffic
from cove.devserver import Server
from cove.node.namespaces.cgroups import Cgroup


@pytest.fixture(scope="module")
def pooled() -> Iterator[Server]:
    """A scratch server with a small base pool that shrinks after one idle second."""
    srv = Server("pools", extra_env={"COVE_POOLS": "base=2:6", "COVE_POOL_IDLE": "1", "COVE_KERNEL": "0"})
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def api(pooled: Server) -> Iterator[httpx.Client]:
    with pooled.client() as c:
        yield c


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pool(api: httpx.Client, name: str = "base") -> dict:
    r = api.get(f"/v1/pools/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def ready(api: httpx.Client, n: int, name: str = "base") -> dict:
    return wait_for(lambda: (p := pool(api, name))["ready"] >= n and p, f"{n} ready in pool {name}")


def member_ids(pooled: Server) -> set[str]:
    """Sandboxes on disk that the API does not list: the pool's members."""
    on_disk = {p.name for p in (pooled.home / "sandboxes").iterdir()}
    with pooled.client() as c:
        listed = {s["id"] for s in c.get("/v1/sandboxes", params={"limit": 1000}).json()["items"]}
    return on_disk - listed


def test_pool_refills_after_claims(api: httpx.Client, pooled: Server) -> None:
    before = ready(api, 2)
    members = member_ids(pooled)
    assert len(members) >= 2
    ids = [api.post("/v1/sandboxes", json={}).json()["id"] for _ in range(2)]
    try:
        assert set(ids) <= members  # claimed the ready ones
        after = pool(api)
        assert after["hits"] == before["hits"] + 2
        ready(api, 2)
        assert not member_ids(pooled) & set(ids)  # fresh members, never the claimed ones
        for sid in ids:
            out = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo ok"}).json()
            assert out["stdout"] == "ok\n"
    finally:
        for sid in ids:
            api.delete(f"/v1/sandboxes/{sid}")


def test_claim_carries_env_limits_user_workdir(api: httpx.Client, pooled: Server) -> None:
    hits = ready(api, 1)["hits"]
    body = {
        "env": {"GREETING": "hello pool"},
        "memory_mb": 300,
        "pids": 77,
        "cpu": 0.5,
        "user": "root",
        "workdir": "/srv/work",
        "metadata": {"team": "pools"},
    }
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    sb = r.json()
    try:
        assert pool(api)["hits"] == hits + 1
        assert sb["metadata"] == {"team": "pools"}
        out = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "echo $GREETING; id -un; pwd"}).json()
        assert out["stdout"] == "hello pool\nroot\n/srv/work\n", out
        # Background processes started later get the same env.
        proc = api.post(f"/v1/sandboxes/{sb['id']}/processes", json={"cmd": "echo $GREETING"}).json()
        logs = wait_for(
            lambda: api.get(f"/v1/sandboxes/{sb['id']}/processes/{proc['id']}/output").text, "process output"
        )
        assert "hello pool" in logs
        cg = Cgroup(f"{pooled.cgroup_parent}/{sb['id']}")
        memory = Path(cg._controller_file("memory", "memory.limit_in_bytes", "memory.max") or "")
        assert int(memory.read_text()) == 300 << 20
        assert Path(cg._controller_file("pids", "pids.max", "pids.max") or "").read_text().strip() == "77"
        assert not cg.frozen()
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def _cpu_weight(cg: Cgroup) -> int:
    """The cgroup's CPU weight in cgroup2 units (v1 shares scaled back), or -1 without a cpu controller."""
    f = cg._controller_file("cpu", "cpu.shares", "cpu.weight")
    if not f:
        return -1
    value = int(Path(f).read_text())
    return value * 100 // 1024 if f.endswith("cpu.shares") else value


def test_members_start_in_the_background_and_claims_get_normal_weight(
    api: httpx.Client, pooled: Server
) -> None:
    ready(api, 2)
    members = member_ids(pooled)
    weights = {_cpu_weight(Cgroup(f"{pooled.cgroup_parent}/{sid}")) for sid in members}
    if weights == {-1}:
        pytest.skip("no cpu cgroup controller on this host: weights cannot be set")
    assert weights == {0}, weights  # the lowest weight (v1 shares 2 = weight 0 when scaled back)
    r = api.post("/v1/sandboxes", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        assert sid in members  # a claim
        assert _cpu_weight(Cgroup(f"{pooled.cgroup_parent}/{sid}")) == 100
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_refill_waits_for_a_pause_in_traffic() -> None:
    traffic = Traffic()
    traffic.begin()  # a request that never ends: the refill waits, but not for ever
    started = time.monotonic()
    asyncio.run(traffic.pause())
    assert time.monotonic() - started >= MOST_DEFERRED
    traffic.end()
    assert not traffic.quiet()  # it just ended: a client's next request may follow at once
    time.sleep(QUIET_GAP)
    assert traffic.quiet()


def test_a_claim_checks_that_the_member_answers(api: httpx.Client, pooled: Server) -> None:
    """A member that died while it waited (here: its pid 1 killed) is discarded at the claim, and the
    create starts a sandbox cold instead of returning a dead one."""
    ready(api, 2)
    dead = member_ids(pooled)
    for sid in dead:
        cg = Cgroup(f"{pooled.cgroup_parent}/{sid}")
        for pid in cg.pids():
            with contextlib.suppress(ProcessLookupError):  # pid 1's death ends the others
                os.kill(pid, signal.SIGKILL)
        cg.freeze(False)  # a frozen task dies only once thawed
        wait_for(lambda cg=cg: not cg.pids(), f"member {sid}'s processes to die")
    for _ in dead:  # each create meets one of them
        r = api.post("/v1/sandboxes", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        try:
            assert sid not in dead
            out = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo alive"}).json()
            assert out["stdout"] == "alive\n", out
        finally:
            api.delete(f"/v1/sandboxes/{sid}")
    wait_for(lambda: not member_ids(pooled) & dead, "the dead members to be discarded", timeout=30)


def test_claim_carries_nothing_of_a_previous_tenant(api: httpx.Client, pooled: Server) -> None:
    ready(api, 2)
    key = api.post("/v1/keys", json={"name": "other", "tenant": "other-tenant"}).json()["key"]
    first = api.post("/v1/sandboxes", json={"env": {"SECRET": "s3cret"}}).json()["id"]
    cmd = "echo s3cret > /home/user/secret; echo x > /tmp/mark; (setsid sleep 600 &); echo done"
    assert api.post(f"/v1/sandboxes/{first}/exec", json={"cmd": cmd}).json()["stdout"] == "done\n"
    api.delete(f"/v1/sandboxes/{first}")
    with pooled.client(key) as other:
        # Every sandbox the pool hands out afterwards (ready ones and refills) is clean.
        ids = [other.post("/v1/sandboxes", json={}).json()["id"] for _ in range(4)]
        try:
            assert first not in ids
            for sid in ids:
                check = "ls /home/user /tmp; env | grep -c SECRET; ps -eo comm | grep -c sleep"
                out = other.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": check}).json()["stdout"]
                assert "secret" not in out and "mark" not in out
                assert out.split()[-2:] == ["0", "0"], out
        finally:
            for sid in ids:
                other.delete(f"/v1/sandboxes/{sid}")


def test_pool_grows_on_misses_and_shrinks_when_idle(api: httpx.Client) -> None:
    ready(api, 2)
    with ThreadPoolExecutor(5) as ex:
        ids = list(ex.map(lambda _: api.post("/v1/sandboxes", json={}).json()["id"], range(5)))
    try:
        grown = pool(api)
        assert grown["misses"] >= 1 and grown["target"] > 2, grown
        assert grown["target"] <= 6
    finally:
        for sid in ids:
            api.delete(f"/v1/sandboxes/{sid}")
    wait_for(lambda: pool(api)["target"] == 2, "the idle pool to shrink back to min", timeout=30)
    wait_for(lambda: pool(api)["ready"] == 2, "the extra members to go", timeout=30)


def test_snapshot_pool(api: httpx.Client) -> None:
    src = api.post("/v1/sandboxes", json={}).json()["id"]
    api.post(f"/v1/sandboxes/{src}/exec", json={"cmd": "echo from-snapshot > /home/user/f"})
    snap = api.post(f"/v1/sandboxes/{src}/snapshots", json={}).json()["id"]
    api.delete(f"/v1/sandboxes/{src}")
    r = api.put(f"/v1/pools/{snap}", json={"min": 1, "max": 2})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "snapshot"
    try:
        ready(api, 1, snap)
    except AssertionError as e:
        raise AssertionError(f"{e}: {pool(api, snap)}") from None
    sid = api.post("/v1/sandboxes", json={"snapshot": snap, "env": {"A": "b"}}).json()["id"]
    try:
        assert pool(api, snap)["hits"] == 1
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /home/user/f; echo $A"}).json()
        assert out["stdout"] == "from-snapshot\nb\n"
    finally:
        api.delete(f"/v1/sandboxes/{sid}")
        assert api.delete(f"/v1/pools/{snap}").status_code == 204
        api.delete(f"/v1/snapshots/{snap}")
    assert api.get(f"/v1/pools/{snap}").status_code == 404


def test_pool_api_errors(api: httpx.Client, pooled: Server) -> None:
    r = api.put("/v1/pools/base", json={"min": 5, "max": 2})
    assert r.status_code == 422 and "min" in r.json()["error"]["message"]
    r = api.put("/v1/pools/no-such-template", json={"min": 1, "max": 1})
    assert r.status_code == 404
    assert api.delete("/v1/pools/no-such-pool").status_code == 404
    user_key = api.post("/v1/keys", json={"name": "plain", "tenant": "default"}).json()["key"]
    with pooled.client(user_key) as plain:
        assert plain.put("/v1/pools/base", json={"min": 1, "max": 1}).status_code == 403
        assert [p["name"] for p in plain.get("/v1/pools").json()["items"]] == ["base"]
    assert "cove_pool_ready" in api.get("/metrics").text


def test_pool_cli(pooled: Server) -> None:
    env = {"COVE_URL": pooled.url, "COVE_API_KEY": pooled.api_key, "COLUMNS": "200"}
    runner = CliRunner()
    r = runner.invoke(cli, ["pool", "set", "base", "--min", "3", "--max", "6"], env=env)
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["pool", "ls"], env=env)
    assert r.exit_code == 0 and "base" in r.output and "template" in r.output
    r = runner.invoke(cli, ["pool", "set", "base", "--min", "2", "--max", "6"], env=env)
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["pool", "rm", "nope"], env=env)
    assert r.exit_code == 1 and "not found" in r.output


def test_quotas_per_tenant(api: httpx.Client, pooled: Server) -> None:
    key = api.post("/v1/keys", json={"name": "q", "tenant": "quota-team"}).json()["key"]
    r = api.put("/v1/tenants/quota-team/quota", json={"sandboxes": 2, "memory_mb": 800})
    assert r.status_code == 200, r.text
    with pooled.client(key) as team:
        assert team.put("/v1/tenants/quota-team/quota", json={"sandboxes": 9}).status_code == 403
        ids = []
        try:
            for _ in range(2):
                r = team.post("/v1/sandboxes", json={"memory_mb": 256})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            r = team.post("/v1/sandboxes", json={"memory_mb": 256})
            assert r.status_code == 429, r.text
            assert (
                r.json()["error"]["code"] == "quota_exceeded" and "sandboxes" in r.json()["error"]["message"]
            )
            usage = team.get("/v1/quota").json()
            assert usage["usage"] == {"sandboxes": 2, "cpu": 0, "memory_mb": 512}
            # Another tenant is not affected.
            other = api.post("/v1/sandboxes", json={})
            assert other.status_code == 201
            api.delete(f"/v1/sandboxes/{other.json()['id']}")
            # Memory, then CPU (a sandbox without `cpu` counts as one core under a CPU quota).
            api.put("/v1/tenants/quota-team/quota", json={"sandboxes": 10, "memory_mb": 800, "cpu": 1.5})
            r = team.post("/v1/sandboxes", json={"memory_mb": 512})
            assert r.status_code == 429 and "memory" in r.json()["error"]["message"]
            r = team.post("/v1/sandboxes", json={"memory_mb": 64})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            assert r.json()["limits"]["cpu"] == 1
            r = team.post("/v1/sandboxes", json={"memory_mb": 64})
            assert r.status_code == 429 and "CPU" in r.json()["error"]["message"]
            # Hibernated sandboxes hold nothing; resuming one counts again.
            api.put("/v1/tenants/quota-team/quota", json={"sandboxes": 3})
            team.post(f"/v1/sandboxes/{ids[0]}/hibernate").raise_for_status()
            r = team.post("/v1/sandboxes", json={})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            r = team.post(f"/v1/sandboxes/{ids[0]}/resume")
            assert r.status_code == 429, r.text
        finally:
            for sid in ids:
                team.delete(f"/v1/sandboxes/{sid}")
    assert api.delete("/v1/tenants/quota-team/quota").status_code == 204
    assert api.delete("/v1/tenants/quota-team/quota").status_code == 404
    assert api.put("/v1/tenants/bad tenant!/quota", json={}).status_code == 422


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.9])
def test_stopping_while_members_start_leaves_nothing(delay: float) -> None:
    """A server stopped while its refill is starting members: the cancelled starts finish and are
    undone (a cleanup that ran before the launcher had finished left cgroups and mounts behind)."""
    srv = Server("pool-stop", extra_env={"COVE_POOLS": "base=6:6", "COVE_KERNEL": "0"})
    srv.start()
    time.sleep(delay)
    srv.stop()  # the server's own shutdown, with starts in flight
    srv.close()  # raises if anything leaked
