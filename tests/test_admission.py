"""Admission control: a host low on memory or pids refuses creates with 503, a reason and
Retry-After (simulated with thresholds above what any host has), and so does a server whose queue of
creates waiting to start a sandbox is full (docs/pools.md)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cove.devserver import Server


@pytest.mark.parametrize(
    ("setting", "code"),
    [("COVE_ADMIT_MIN_MEMORY_MB", "host_low_memory"), ("COVE_ADMIT_MIN_PIDS", "host_low_pids")],
)
def test_create_refused_when_host_runs_low(setting: str, code: str) -> None:
    srv = Server("admission", extra_env={setting: str(10**9), "COVE_KERNEL": "0", "COVE_POOLS": "base=1:2"})
    srv.start()
    try:
        with srv.client() as c:
            r = c.post("/v1/sandboxes", json={})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == code
            assert "retry later" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "5"
            # The pool does not fill either, and nothing was left half-made.
            assert c.get("/v1/pools/base").json()["ready"] == 0
            assert c.get("/v1/sandboxes").json()["items"] == []
            assert f'cove_admission_rejections_total{{reason="{code.removeprefix("host_low_")}"}} 1.0' in (
                c.get("/metrics").text
            )
    finally:
        srv.close()


def test_creates_beyond_the_queue_get_server_busy() -> None:
    """One sandbox starts at a time and two creates may wait: of a burst, some are created and the
    rest refused at once with 503 server_busy, leaving nothing behind; the server then creates again."""
    srv = Server(
        "admission-busy",
        extra_env={
            "COVE_POOLS": "",
            "COVE_KERNEL": "0",
            "COVE_MAX_STARTING": "1",
            "COVE_MAX_QUEUED_CREATES": "2",
        },
    )
    srv.start()
    try:

        async def burst(n: int) -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            headers = {"Authorization": f"Bearer {srv.api_key}"}
            async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=60, limits=limits) as ac:
                await asyncio.gather(*(ac.get("/healthz") for _ in range(n)))  # connections open first
                return await asyncio.gather(*(ac.post("/v1/sandboxes", json={}) for _ in range(n)))

        responses = asyncio.run(burst(12))
        created = [r.json()["id"] for r in responses if r.status_code == 201]
        refused = [r for r in responses if r.status_code != 201]
        assert created, [r.text for r in responses]
        assert refused, "12 concurrent creates with 1 starting and 2 queued: some must be refused"
        for r in refused:
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "server_busy"
            assert "2 creates are queued" in error["message"]
            assert "retry later" in error["message"]
            assert r.headers["retry-after"] == "5"
        with srv.client() as c:
            metrics = c.get("/metrics").text
            assert f'cove_admission_rejections_total{{reason="busy"}} {float(len(refused))}' in metrics
            assert "cove_creates_queued 0.0" in metrics
            assert "cove_creates_starting 0.0" in metrics
            # The refused creates recorded nothing; the created ones run.
            items = c.get("/v1/sandboxes", params={"limit": 100}).json()["items"]
            assert sorted(sb["id"] for sb in items) == sorted(created)
            assert {sb["state"] for sb in items} == {"running"}
            for sid in created:
                assert c.delete(f"/v1/sandboxes/{sid}").status_code in (200, 204)
            # With the burst over, a create passes again and its sandbox works.
            r = c.post("/v1/sandboxes", json={})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            out = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "echo ok"})
            assert out.json()["stdout"] == "ok\n", out.text
            c.delete(f"/v1/sandboxes/{sid}")
    finally:
        srv.close()
