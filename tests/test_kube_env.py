"""The tests' own Kubernetes v1.20.2 control plane (tests/kube.py, built by scripts/kube/build.sh): token auth,
the scheduler binding a Pod to a Node registered over plain HTTP, and a node agent's Lease keeping the node
Ready. The test plays the kubelet: there is none."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import kube

# The node lifecycle controller's grace period (--node-monitor-grace-period in tests/kube.py).
GRACE_S = 8.0


@pytest.fixture
def k8s(control_plane: kube.KubeControlPlane) -> Iterator[httpx.Client]:
    with control_plane.client() as c:
        yield c


def _now(micro: bool = False) -> str:
    # metav1.Time is RFC 3339 in seconds; metav1.MicroTime (a Lease's renewTime) in microseconds.
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _until(what: str, check: Callable[[], Any], timeout: float) -> Any:
    """Polls `check` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


@pytest.fixture
def node(k8s: httpx.Client) -> Iterator[str]:
    """A Ready Node with room for pods, registered the way a kubelet does (status set on create); deleted
    afterwards (with its pods: the pod garbage collector removes pods of vanished nodes)."""
    name = f"node-{secrets.token_hex(3)}"
    now = _now()
    resources = {"cpu": "4", "memory": "8Gi", "pods": "110"}
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "a test",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
        },
    }
    r = k8s.post("/api/v1/nodes", json=body)
    assert r.status_code == 201, r.text
    # A new node carries the not-ready taint (TaintNodesByCondition admission) until the node lifecycle
    # controller has seen it Ready. A pod the scheduler tries in that window backs off (1 s, 2 s, 4 s...):
    # measured 3 s to bind instead of 0.05 s. So a node agent, like this fixture, waits for it to go.
    _until("the node loses its not-ready taint", lambda: not _taints(k8s, name), timeout=10)
    yield name
    k8s.delete(f"/api/v1/nodes/{name}")


def _taints(k8s: httpx.Client, node: str) -> set[str]:
    return {t["key"] for t in k8s.get(f"/api/v1/nodes/{node}").json()["spec"].get("taints", [])}


def test_version_needs_a_token(control_plane: kube.KubeControlPlane, k8s: httpx.Client) -> None:
    r = k8s.get("/version")
    assert r.status_code == 200, r.text
    assert r.json()["gitVersion"] == kube.VERSION
    with httpx.Client(base_url=control_plane.server, verify=control_plane.ssl_context()) as anonymous:
        assert anonymous.get("/version").status_code == 401
        assert anonymous.get("/api/v1/nodes").status_code == 401
        assert anonymous.get("/version", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert Path(control_plane.kubeconfig).is_file()


def test_scheduler_binds_a_pod_to_the_ready_node(k8s: httpx.Client, node: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"p-{secrets.token_hex(3)}"},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "cove.invalid/none",
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                }
            ]
        },
    }
    t0 = time.monotonic()
    r = k8s.post("/api/v1/namespaces/default/pods", json=pod)
    assert r.status_code == 201, r.text
    assert "nodeName" not in r.json()["spec"]
    url = f"/api/v1/namespaces/default/pods/{pod['metadata']['name']}"
    bound = _until("the pod is bound", lambda: k8s.get(url).json()["spec"].get("nodeName"), timeout=5)
    assert bound == node, f"bound to {bound}, not {node}"
    assert time.monotonic() - t0 < 5
    conditions = {c["type"]: c["status"] for c in k8s.get(url).json()["status"]["conditions"]}
    assert conditions["PodScheduled"] == "True"
    # No kubelet will confirm the end: delete at once.
    assert k8s.delete(url, params={"gracePeriodSeconds": 0}).status_code == 200


def _ready(k8s: httpx.Client, node: str) -> str:
    status = k8s.get(f"/api/v1/nodes/{node}").json()["status"]
    return next(c["status"] for c in status["conditions"] if c["type"] == "Ready")


def test_a_renewed_lease_keeps_the_node_ready(k8s: httpx.Client, node: str) -> None:
    """Past the grace period on Lease renewals alone (the node's own heartbeat left stale), the node stays
    Ready; without renewals it turns Unknown and is tainted unreachable."""
    leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": node},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 8, "renewTime": _now(micro=True)},
    }
    r = k8s.post(leases, json=lease)
    assert r.status_code == 201, r.text
    lease = r.json()
    renewed = time.monotonic()
    until = renewed + GRACE_S + 2
    while time.monotonic() < until:
        time.sleep(0.5)
        before = lease["spec"]["renewTime"]
        lease["spec"]["renewTime"] = _now(micro=True)
        r = k8s.put(f"{leases}/{node}", json=lease)  # carries resourceVersion: a conflict would be a 409
        assert r.status_code == 200, r.text
        lease = r.json()
        assert lease["spec"]["renewTime"] > before
        assert _ready(k8s, node) == "True"
    renewed = time.monotonic()
    _until("the node turns Unknown", lambda: _ready(k8s, node) == "Unknown", timeout=GRACE_S + 5)
    assert time.monotonic() - renewed > GRACE_S - 1
    unreachable = "node.kubernetes.io/unreachable"
    _until("the node is tainted unreachable", lambda: unreachable in _taints(k8s, node), timeout=5)
    assert k8s.delete(f"{leases}/{node}").status_code == 200


def test_a_failed_start_leaves_nothing_behind() -> None:
    why = kube.missing()
    if why:
        pytest.skip(why)
    cp = kube.KubeControlPlane(apiserver_flags=["--no-such-flag"])
    with pytest.raises(RuntimeError, match=r"(?s)kube-apiserver exited.*no-such-flag"):
        cp.start()
    assert "etcd" in cp.procs  # etcd had been started
    assert not cp.processes()
    assert not cp.dir.exists()
