"""Runtime selection and the gvisor runtime's API surface (docs/runtimes.md); escapes: test_escapes.py."""

from __future__ import annotations

import httpx
import pytest

from cove.config import Settings
from cove.doctor import runtime_checks
from cove.node.gvisor.runtime import detect
from cove.node.microvm.runtime import detect as detect_microvm

GVISOR, GVISOR_WHY = detect(Settings())
needs_gvisor = pytest.mark.skipif(not GVISOR, reason=f"gvisor runtime unavailable: {GVISOR_WHY}")


def test_microvm_is_refused_with_the_reason(api: httpx.Client) -> None:
    ok, why = detect_microvm()
    if ok:
        pytest.skip("this host could run microVMs")
    r = api.post("/v1/sandboxes", json={"runtime": "microvm"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "runtime_unavailable", r.text
    assert r.json()["error"]["message"] == f"microvm runtime unavailable on this host: {why}"
    assert api.post("/v1/sandboxes", json={"runtime": "kata"}).status_code == 422


def test_detection_without_hardware_virtualisation() -> None:
    ok, why = detect_microvm(cpuinfo="flags\t: fpu sse2 hypervisor\n", modules="kvm_pvm 1 0\n")
    assert not ok and "no vmx/svm" in why
    names = {c.name: c for c in runtime_checks()}
    assert names["runtime namespaces"].ok and not names["runtime microvm"].ok
    assert names["runtime gvisor"].ok == GVISOR


@needs_gvisor
def test_gvisor_sandbox_api(api: httpx.Client) -> None:
    sb = api.post("/v1/sandboxes", json={"runtime": "gvisor", "memory_mb": 256}).json()
    sid = sb["id"]
    try:
        assert sb["runtime"] == "gvisor" and sb["state"] == "running"
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "uname -r; id -un"}).json()
        assert out["stdout"] == "4.4.0\nuser\n", out  # gVisor's kernel answers, not the host's
        r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/a.txt"}, content=b"kept")
        assert r.status_code in (200, 201, 204), r.text
        assert api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/a.txt"}).content == b"kept"
        assert api.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"
        assert api.post(f"/v1/sandboxes/{sid}/resume").json()["state"] == "running"
        r = api.post(f"/v1/sandboxes/{sid}/snapshots", json={"memory": True})
        assert r.status_code == 409 and "gvisor" in r.json()["error"]["message"], r.text
        snap = api.post(f"/v1/sandboxes/{sid}/snapshots", json={}).json()
        r = api.put(f"/v1/sandboxes/{sid}/network", json={"mode": "open"})
        assert r.status_code == 409, r.text
        hib = api.post(f"/v1/sandboxes/{sid}/hibernate").json()
        assert hib["state"] == "hibernated" and hib["hibernation"]["memory"] is False, hib
        out = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /home/user/a.txt"}).json()
        assert out["stdout"] == "kept", out  # resumed: fresh processes on the same files
        child = api.post("/v1/sandboxes", json={"snapshot": snap["id"]}).json()
        try:
            assert child["runtime"] == "gvisor"
            out = api.post(f"/v1/sandboxes/{child['id']}/exec", json={"cmd": "cat /home/user/a.txt"}).json()
            assert out["stdout"] == "kept"
        finally:
            api.delete(f"/v1/sandboxes/{child['id']}")
        api.delete(f"/v1/snapshots/{snap['id']}")
    finally:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    r = api.post("/v1/sandboxes", json={"runtime": "gvisor", "network": {"mode": "open"}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_supported"
