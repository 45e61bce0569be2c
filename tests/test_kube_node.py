"""cove as a Kubernetes node (cove.kube, docs/kubernetes.md), end to end: a real `cove serve` with
COVE_KUBECONFIG against the tests' own Kubernetes v1.20.2 control plane (tests/kube.py: API server,
scheduler, controller manager, no kubelet). The node registers, keeps its Lease, gets pods from the upstream
scheduler through its RuntimeClasses and runs them as sandboxes; the upstream node-lifecycle controller
notices when it dies, and the pods' sandboxes outlive it. The server acts as a service account holding only
the rules cove's docs give it (`RBAC_RULES`)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import kube
from cove.devserver import Server
from cove.kube.kubelet import RBAC_RULES, Unsupported, parse_quantity, sandbox_request

# --- without a cluster ---------------------------------------------------------------------------------------


def test_quantities() -> None:
    assert parse_quantity("500m") == 0.5
    assert parse_quantity("2") == 2.0
    assert parse_quantity("1.5") == 1.5
    assert parse_quantity("512Mi") == 512 * 2**20
    assert parse_quantity("1Gi") == 2**30
    assert parse_quantity("1G") == 1e9
    assert parse_quantity("128974848") == 128974848
    assert parse_quantity("129e6") == 129e6
    for bad in ("", "1.2.3", "5 Mi", "1Q", "Mi"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def _pod_model(**container: Any) -> Any:
    from lightkube.resources.core_v1 import Pod

    return Pod.from_dict({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "annotations": {"cove.dev/template": "tpl"}},
        "spec": {"runtimeClassName": "cove-gvisor", "containers": [{"name": "main", "image": "cove/base", **container}]},
    })  # fmt: skip


def test_a_pod_maps_to_a_sandbox_request() -> None:
    pod = _pod_model(
        command=["sleep"],
        args=["9"],
        env=[{"name": "A", "value": "1"}, {"name": "EMPTY"}],
        workingDir="/tmp",
        resources={"limits": {"cpu": "500m", "memory": "1G"}, "requests": {"cpu": "100m"}},
    )
    req, argv = sandbox_request(pod, "n1")
    assert argv == ["sleep", "9"]
    assert (req.template, req.runtime, req.timeout, req.workdir) == ("tpl", "gvisor", 0, "/tmp")
    assert req.env == {"A": "1", "EMPTY": ""}
    assert (req.cpu, req.memory_mb) == (0.5, 953)  # 1e9 bytes, rounded down to whole MiB
    assert req.metadata == {"k8s.namespace": "ns", "k8s.pod": "p", "k8s.uid": "u-1", "k8s.node": "n1"}
    with pytest.raises(Unsupported, match="valueFrom") as e:
        sandbox_request(_pod_model(env=[{"name": "S", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]), "n1")
    assert e.value.reason == "UnsupportedSpec"
    with pytest.raises(Unsupported, match="cpu") as e:
        sandbox_request(_pod_model(resources={"limits": {"cpu": "10m"}}), "n1")  # below cove's 0.05
    assert e.value.reason == "SandboxFailed"


# --- against a cluster -------------------------------------------------------------------------------------

GRACE_S = 8.0  # --node-monitor-grace-period in tests/kube.py
NODE_TAINT = "virtual-kubelet.io/provider"
UNREACHABLE = "node.kubernetes.io/unreachable"
NODE = f"cove-kube-{secrets.token_hex(3)}"  # the server's node id (COVE_NODE_ID): the Node's name


@pytest.fixture(scope="module")
def control_plane() -> Iterator[kube.KubeControlPlane]:
    why = kube.missing()
    if why:
        pytest.skip(why)
    cp = kube.KubeControlPlane()
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="module")
def k8s(control_plane: kube.KubeControlPlane) -> Iterator[httpx.Client]:
    with control_plane.client() as c:
        yield c


def _until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def _node_kubeconfig(cp: kube.KubeControlPlane, k8s: httpx.Client) -> Path:
    """A kubeconfig for a service account bound to exactly RBAC_RULES (what docs/kubernetes.md grants)."""
    name = "cove-node"
    for path, body in (
        ("/apis/rbac.authorization.k8s.io/v1/clusterroles", {"metadata": {"name": name}, "rules": RBAC_RULES}),
        ("/api/v1/namespaces/kube-system/serviceaccounts", {"metadata": {"name": name}}),
        ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}],
        }),
    ):  # fmt: skip
        r = k8s.post(path, json=body)
        assert r.status_code == 201, r.text

    # v1.20's token controller writes the account's token into a Secret.
    def secrets_of() -> Any:
        return k8s.get(f"/api/v1/namespaces/kube-system/serviceaccounts/{name}").json().get("secrets")

    secret = _until("the service account's token", secrets_of, timeout=20)[0]["name"]
    token = base64.b64decode(
        k8s.get(f"/api/v1/namespaces/kube-system/secrets/{secret}").json()["data"]["token"]
    )
    path = cp.dir / "cove-node.kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": cp.server, "certificate-authority": str(cp.ca)}}],
        "users": [{"name": "u", "user": {"token": token.decode()}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def cove_node(control_plane: kube.KubeControlPlane, k8s: httpx.Client) -> Iterator[Server]:
    """A `cove serve` that is a Kubernetes node (named by its node id), Ready, its not-ready taint gone."""
    server = Server(
        "kube",
        extra_env={
            "COVE_KUBECONFIG": str(_node_kubeconfig(control_plane, k8s)),
            "COVE_POOLS": "",
            "COVE_NODE_ID": NODE,
        },
    )
    try:
        server.start()
        _until("the node is Ready, untainted by not-ready", lambda: _ready(k8s, NODE) == "True"
               and "node.kubernetes.io/not-ready" not in _taints(k8s, NODE), timeout=20)  # fmt: skip
        yield server
    finally:
        server.close()


@pytest.fixture
def api(cove_node: Server) -> Iterator[httpx.Client]:
    with cove_node.client() as c:
        yield c


def _node(k8s: httpx.Client, name: str) -> dict[str, Any]:
    r = k8s.get(f"/api/v1/nodes/{name}")
    return r.json() if r.status_code == 200 else {}


def _ready(k8s: httpx.Client, name: str) -> str | None:
    conditions = _node(k8s, name).get("status", {}).get("conditions", [])
    return next((c["status"] for c in conditions if c["type"] == "Ready"), None)


def _taints(k8s: httpx.Client, name: str) -> set[str]:
    return {t["key"] for t in _node(k8s, name).get("spec", {}).get("taints", [])}


def _pod_body(name: str, runtime: str | None = "cove-namespaces", annotations: dict[str, str] | None = None,
              **container: Any) -> dict[str, Any]:  # fmt: skip
    spec: dict[str, Any] = {
        "containers": [{"name": "main", "image": "cove/base", **container}],
        # Past the node-loss test's outage (the API server's default for unreachable is 5 s here).
        "tolerations": [{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
    }  # fmt: skip
    if runtime:
        spec["runtimeClassName"] = runtime
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}  # fmt: skip


def _create_pod(k8s: httpx.Client, body: dict[str, Any], namespace: str = "default") -> str:
    r = k8s.post(f"/api/v1/namespaces/{namespace}/pods", json=body)
    assert r.status_code == 201, r.text
    return f"/api/v1/namespaces/{namespace}/pods/{body['metadata']['name']}"


def _pod(k8s: httpx.Client, url: str) -> dict[str, Any]:
    r = k8s.get(url)
    return r.json() if r.status_code == 200 else {}


def _phase(k8s: httpx.Client, url: str, phase: str) -> dict[str, Any] | None:
    pod = _pod(k8s, url)
    return pod if pod.get("status", {}).get("phase") == phase else None


def _exec(api: httpx.Client, sandbox: str, cmd: str) -> str:
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    return str(r.json()["stdout"])


def _state(api: httpx.Client, sandbox: str) -> str:
    return str(api.get(f"/v1/sandboxes/{sandbox}").json().get("state"))


def _events(k8s: httpx.Client, namespace: str, pod: str) -> list[dict[str, Any]]:
    """The pod's Events from cove (the scheduler's `Scheduled` is there too)."""
    selector = f"involvedObject.kind=Pod,involvedObject.name={pod}"
    events = k8s.get(f"/api/v1/namespaces/{namespace}/events", params={"fieldSelector": selector}).json()
    return [e for e in events["items"] if e.get("source", {}).get("component") == "cove-kubelet"]


@pytest.fixture(scope="module")
def sleeper(cove_node: Server, k8s: httpx.Client) -> dict[str, Any]:
    """A pod left to kube-scheduler, running `sleep 3600` in a sandbox with A=1 (kept for the module)."""
    t0 = time.monotonic()
    url = _create_pod(k8s, _pod_body("sleeper", command=["sleep", "3600"], env=[{"name": "A", "value": "1"}],
                                     resources={"limits": {"cpu": "500m", "memory": "256Mi"}}))  # fmt: skip
    pod = _until("the pod runs", lambda: _phase(k8s, url, "Running"), timeout=20, every=0.02)
    print(f"\npod create -> Running: {time.monotonic() - t0:.2f} s")
    return {"url": url, "pod": pod, "sandbox": pod["metadata"]["annotations"]["cove.dev/sandbox"]}


def test_the_node_registers_and_keeps_its_lease(cove_node: Server, k8s: httpx.Client) -> None:
    name = NODE
    node = _node(k8s, name)
    labels = node["metadata"]["labels"]
    assert {k: labels.get(k) for k in ("type", "kubernetes.io/role", "cove.dev/node")} == {
        "type": "virtual-kubelet", "kubernetes.io/role": "agent", "cove.dev/node": "true"}  # fmt: skip
    assert {"key": NODE_TAINT, "value": "cove", "effect": "NoSchedule"} in node["spec"]["taints"]
    status = node["status"]
    assert status["capacity"]["cpu"] == str(os.cpu_count())
    assert status["capacity"]["memory"].endswith("Ki") and status["capacity"]["pods"] == "110"
    assert status["nodeInfo"]["kubeletVersion"].startswith("v1.20.2-cove-")
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    url = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
    first = _until("the lease exists", lambda: k8s.get(url).json().get("spec"), timeout=5)
    assert first["holderIdentity"] == name and first["leaseDurationSeconds"] == 40
    later = _until("the lease is renewed", lambda: k8s.get(url).json()["spec"]["renewTime"] > first["renewTime"]
                   and k8s.get(url).json()["spec"], timeout=5)  # fmt: skip
    assert later["renewTime"] > first["renewTime"]
    for rc, handler in (("cove-namespaces", "namespaces"), ("cove-gvisor", "gvisor")):
        got = k8s.get(f"/apis/node.k8s.io/v1/runtimeclasses/{rc}").json()
        assert got["handler"] == handler
        assert got["scheduling"]["nodeSelector"]["cove.dev/node"] == "true"
        assert got["scheduling"]["tolerations"][0]["key"] == NODE_TAINT


def test_a_scheduled_pod_runs_as_a_sandbox(
    cove_node: Server, k8s: httpx.Client, api: httpx.Client, sleeper: dict[str, Any]
) -> None:
    pod, sandbox = sleeper["pod"], sleeper["sandbox"]
    assert pod["spec"]["nodeName"] == NODE  # bound by kube-scheduler
    status = pod["status"]
    assert status["podIP"] == status["hostIP"] == "127.0.0.1"
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Initialized": "True",
        "Ready": "True",
        "ContainersReady": "True",
        "PodScheduled": "True",
    }
    (container,) = status["containerStatuses"]
    assert container["containerID"] == f"cove://{sandbox}" and container["ready"] and container["started"]
    assert "running" in container["state"]
    assert _exec(api, sandbox, "echo $A").strip() == "1"
    assert "sleep 3600" in _exec(api, sandbox, "ps -eo args")
    sb = api.get(f"/v1/sandboxes/{sandbox}").json()
    assert sb["metadata"]["k8s.pod"] == "sleeper" and sb["metadata"]["k8s.uid"] == pod["metadata"]["uid"]
    assert (sb["limits"]["cpu"], sb["limits"]["memory_mb"], sb["timeout"]) == (0.5, 256, 0)


def test_a_gvisor_pod_goes_only_to_a_node_that_runs_gvisor(
    cove_node: Server, k8s: httpx.Client, api: httpx.Client
) -> None:
    url = _create_pod(k8s, _pod_body("gvisor", runtime="cove-gvisor", command=["sleep", "600"]))
    if _node(k8s, NODE)["metadata"]["labels"].get("cove.dev/gvisor") == "true":
        pod = _until("the gvisor pod runs", lambda: _phase(k8s, url, "Running"), timeout=30)
        sandbox = pod["metadata"]["annotations"]["cove.dev/sandbox"]
        assert api.get(f"/v1/sandboxes/{sandbox}").json()["runtime"] == "gvisor"
    else:  # no runsc here: the RuntimeClass's node selector keeps it off this node
        _until("the scheduler gives up on it", lambda: _unschedulable(k8s, url), timeout=10)
    assert k8s.delete(url).status_code == 200
    _until("the pod is removed", lambda: k8s.get(url).status_code == 404, timeout=10)


def _unschedulable(k8s: httpx.Client, url: str) -> bool:
    conditions = _pod(k8s, url).get("status", {}).get("conditions", [])
    return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)


def test_a_plain_pod_is_not_scheduled_onto_cove(cove_node: Server, k8s: httpx.Client) -> None:
    url = _create_pod(k8s, _pod_body("plain", runtime=None, command=["sleep", "1"]))
    _until("the scheduler gives up on it", lambda: _unschedulable(k8s, url), timeout=10)
    pod = _pod(k8s, url)
    assert "nodeName" not in pod["spec"] and pod["status"]["phase"] == "Pending"
    assert k8s.delete(url, params={"gracePeriodSeconds": 0}).status_code == 200


def test_pods_it_cannot_run_fail_with_an_event(cove_node: Server, k8s: httpx.Client) -> None:
    bad_template = _create_pod(k8s, _pod_body("bad-template", annotations={"cove.dev/template": "no-such-template"},
                                              command=["sleep", "60"]))  # fmt: skip
    value_from = _create_pod(k8s, _pod_body("value-from", env=[{"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]))  # fmt: skip
    # Bound here directly, tolerating the taint, but not naming a cove RuntimeClass.
    foreign = _pod_body("foreign", runtime=None)
    foreign["spec"]["nodeName"] = NODE
    foreign["spec"]["tolerations"].append({"key": NODE_TAINT, "operator": "Exists"})
    foreign = _create_pod(k8s, foreign)
    for url, reason, says in (
        (bad_template, "SandboxFailed", "no-such-template"),
        (value_from, "UnsupportedSpec", "valueFrom"),
        (foreign, "UnsupportedRuntime", "runtimeClassName"),
    ):
        pod = _until(f"{url} fails", lambda url=url: _phase(k8s, url, "Failed"), timeout=15)
        assert pod["status"]["reason"] == reason, pod["status"]
        assert says in pod["status"]["message"]
        name = pod["metadata"]["name"]
        (event,) = _until(f"an event on {name}", lambda name=name: _events(k8s, "default", name), timeout=5)
        assert (event["reason"], event["type"], event["source"]["component"]) == (
            reason,
            "Warning",
            "cove-kubelet",
        )
        assert says in event["message"]
        assert k8s.delete(url).status_code == 200  # and the kubelet removes it (nothing runs)
        _until(f"{name} is removed", lambda url=url: k8s.get(url).status_code == 404, timeout=10)


def test_the_command_exiting_ends_the_pod(cove_node: Server, k8s: httpx.Client, api: httpx.Client) -> None:
    ok = _create_pod(k8s, _pod_body("exits-0", command=["true"]))
    bad = _create_pod(k8s, _pod_body("exits-3", command=["sh", "-c", "exit 3"]))
    for url, phase, code in ((ok, "Succeeded", 0), (bad, "Failed", 3)):
        pod = _until(f"{url} is {phase}", lambda url=url, phase=phase: _phase(k8s, url, phase), timeout=20)
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == code
        sandbox = pod["metadata"]["annotations"]["cove.dev/sandbox"]
        _until(f"{url}'s sandbox ends", lambda sandbox=sandbox: _state(api, sandbox) == "killed", timeout=5)
        assert k8s.delete(url).status_code == 200


def test_a_sandbox_killed_through_cove_fails_its_pod(
    cove_node: Server, k8s: httpx.Client, api: httpx.Client
) -> None:
    url = _create_pod(k8s, _pod_body("victim", command=["sleep", "600"]))
    pod = _until("the pod runs", lambda: _phase(k8s, url, "Running"), timeout=20)
    assert (
        api.delete(f"/v1/sandboxes/{pod['metadata']['annotations']['cove.dev/sandbox']}").status_code == 204
    )
    pod = _until("the pod fails", lambda: _phase(k8s, url, "Failed"), timeout=10)
    assert pod["status"]["reason"] == "SandboxKilled" and "killed by request" in pod["status"]["message"]
    assert k8s.delete(url).status_code == 200


def test_deleting_a_pod_kills_its_sandbox_in_its_namespace_tenant(
    cove_node: Server, k8s: httpx.Client, api: httpx.Client
) -> None:
    ns = {"metadata": {"name": "team", "annotations": {"cove.dev/tenant": "team-k8s"}}}
    assert k8s.post("/api/v1/namespaces", json=ns).status_code == 201
    url = _create_pod(k8s, _pod_body("doomed", command=["sleep", "600"]), namespace="team")
    pod = _until("the pod runs", lambda: _phase(k8s, url, "Running"), timeout=20)
    sandbox = pod["metadata"]["annotations"]["cove.dev/sandbox"]
    assert api.get(f"/v1/sandboxes/{sandbox}").status_code == 404  # another tenant's
    r = api.post("/v1/keys", json={"name": "team", "tenant": "team-k8s"})
    assert r.status_code == 201, r.text
    with cove_node.client(r.json()["key"]) as team:
        assert _state(team, sandbox) == "running"
        assert k8s.delete(url).status_code == 200  # graceful (30 s): the kubelet ends it at once
        _until("the pod is removed", lambda: k8s.get(url).status_code == 404, timeout=10)
        assert _state(team, sandbox) == "killed"


def test_node_loss_is_detected_upstream_and_sandboxes_outlive_the_server(
    cove_node: Server, k8s: httpx.Client, api: httpx.Client, sleeper: dict[str, Any]
) -> None:
    name = NODE
    orphan = _create_pod(k8s, _pod_body("orphan", command=["sleep", "600"]))
    orphan_sandbox = _until("the orphan runs", lambda: _phase(k8s, orphan, "Running"), timeout=20)["metadata"][
        "annotations"]["cove.dev/sandbox"]  # fmt: skip
    assert cove_node.proc is not None
    cove_node.proc.kill()
    cove_node.proc.wait()
    killed = time.monotonic()
    _until("the node is Unknown", lambda: _ready(k8s, name) == "Unknown", timeout=GRACE_S + 12)
    unknown_s = time.monotonic() - killed
    _until("the node is tainted unreachable", lambda: UNREACHABLE in _taints(k8s, name), timeout=10)
    tainted_s = time.monotonic() - killed
    print(f"\nnode SIGKILLed -> Ready Unknown {unknown_s:.1f} s, -> unreachable taint {tainted_s:.1f} s")
    assert unknown_s > GRACE_S - 3  # the Lease, renewed every 2 s, kept it Ready until then
    pod = _pod(k8s, sleeper["url"])
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"  # the controller marks the pods of an unknown node not ready
    # While the server is down, a pod of it is removed outright: its sandbox must go at the restart.
    assert k8s.delete(orphan, params={"gracePeriodSeconds": 0}).status_code == 200
    restarted = time.monotonic()
    cove_node.start()
    _until("the node is Ready again", lambda: _ready(k8s, name) == "True" and UNREACHABLE not in _taints(k8s, name),
           timeout=15)  # fmt: skip
    print(f"server restarted -> Ready, untainted {time.monotonic() - restarted:.1f} s")

    def running_again() -> dict[str, Any] | None:
        pod = _phase(k8s, sleeper["url"], "Running")
        conditions = {c["type"]: c["status"] for c in (pod or {}).get("status", {}).get("conditions", [])}
        return pod if conditions.get("Ready") == "True" else None

    pod = _until("the pod is Ready again", running_again, timeout=10)
    assert pod["metadata"]["annotations"]["cove.dev/sandbox"] == sleeper["sandbox"]  # the same sandbox
    assert "sleep 3600" in _exec(api, sleeper["sandbox"], "ps -eo args")
    mine = api.get("/v1/sandboxes", params={"metadata": f"k8s.uid={pod['metadata']['uid']}"}).json()["items"]
    assert [sb["id"] for sb in mine] == [sleeper["sandbox"]]  # adopted, not made twice
    _until("the orphan's sandbox is ended", lambda: _state(api, orphan_sandbox) == "killed", timeout=10)
