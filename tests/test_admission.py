"""Admission control: a host low on memory or pids refuses creates with 503, a reason and
Retry-After (simulated with thresholds above what any host has; docs/pools.md)."""

from __future__ import annotations

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
