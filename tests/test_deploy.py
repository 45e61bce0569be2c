"""deploy/ (docs/kubernetes.md) is accepted by a real Kubernetes API server: every manifest the
kustomization lists is created with server-side dry run (the API server's own schema validation
and defaulting) on the v1.20.2 control plane of tests/kube.py, and what the containers run is
cove's real command line and settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import kube

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SRC = Path(__file__).resolve().parent.parent / "src" / "cove"
KUSTOMIZATION = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
# kind -> (API path prefix, plural, namespaced)
PATHS = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Secret": ("/api/v1", "secrets", True),
    "Service": ("/api/v1", "services", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "RuntimeClass": ("/apis/node.k8s.io/v1", "runtimeclasses", False),
    "Deployment": ("/apis/apps/v1", "deployments", True),
    "DaemonSet": ("/apis/apps/v1", "daemonsets", True),
    "CustomResourceDefinition": ("/apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for name in KUSTOMIZATION["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


@pytest.fixture(scope="module")
def api(control_plane: kube.KubeControlPlane) -> Iterator[httpx.Client]:
    with control_plane.client() as client:
        yield client


def test_the_kustomization_lists_every_manifest() -> None:
    on_disk = {p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(KUSTOMIZATION["resources"])


def test_every_manifest_is_accepted_by_the_api_server(api: httpx.Client) -> None:
    docs = _documents()
    assert {d["kind"] for _, d in docs} >= {
        "Deployment",
        "DaemonSet",
        "ClusterRole",
        "RuntimeClass",
        "Service",
    }
    # The namespace for real (namespaced dry runs need it), everything else as a dry run.
    namespaces = {d["metadata"]["name"] for _, d in docs if d["kind"] == "Namespace"}
    for ns in (d for _, d in docs if d["kind"] == "Namespace"):
        assert api.post("/api/v1/namespaces", json=ns).status_code in (201, 409)
    for name, doc in docs:
        if doc["kind"] == "Namespace":
            continue
        prefix, plural, namespaced = PATHS[doc["kind"]]
        if namespaced:
            namespace = doc["metadata"].get("namespace")
            assert namespace in namespaces, f"{name}: {doc['kind']} in {namespace!r}, which deploy/ does not make"
            path = f"{prefix}/namespaces/{namespace}/{plural}"
        else:
            path = f"{prefix}/{plural}"
        r = api.post(path, params={"dryRun": "All", "fieldManager": "cove-test"}, json=doc)
        assert r.status_code == 201, (
            f"{name}: {doc['kind']} {doc['metadata']['name']}: {r.status_code} {r.text[:500]}"
        )


def _cli(command: list[str]) -> tuple[list[str], list[str]]:
    """The argv that asks `command`'s program for its help, and the options `command` passes."""
    if command[0] == "cove":
        return ["-m", "cove", command[1], "--help"], command[2:]
    assert command[:3] == ["python3", "-m", "cove.kube.agent_sandbox"], command
    return ["-m", "cove.kube.agent_sandbox", command[3], "--help"], command[4:]


def test_the_containers_run_coves_real_commands_and_settings() -> None:
    sources = "\n".join(p.read_text() for p in SRC.rglob("*.py"))
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    checked = 0
    for name, doc in _documents():
        for container in _containers(doc):
            argv, rest = _cli(container["command"])
            done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"{name}: {container['command']} is not a command: {done.stderr}"
            for option in (a for a in rest if a.startswith("--")):
                assert option in done.stdout, f"{name}: {container['command']}: no option {option}"
            for var in container.get("env", []):
                if var["name"].startswith("COVE_"):
                    assert re.search(rf"[\"']{var['name']}[\"']", sources), (
                        f"{name}: cove reads no {var['name']}"
                    )
            checked += 1
    assert checked >= 4


def test_the_roles_are_the_ones_the_code_declares() -> None:
    from cove.kube import kubelet
    from cove.kube.agent_sandbox import controller, router

    roles = {d["metadata"]["name"]: d["rules"] for _, d in _documents() if d["kind"] == "ClusterRole"}
    assert roles["cove-node"] == kubelet.RBAC_RULES
    assert roles["cove-agent-sandbox-controller"] == controller.RBAC_RULES
    assert roles["cove-agent-sandbox-router"] == router.RBAC_RULES
