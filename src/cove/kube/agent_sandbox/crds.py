"""The kinds, their CRD files (deploy/crds/, the source of truth) and the names they share: groups, labels,
annotations, condition helpers. Plain data: the controller and the router import it, it imports neither."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition

AGENTS = "agents.x-k8s.io"
EXTENSIONS = "extensions.agents.x-k8s.io"
COVE = "cove.dev"
V1BETA1 = "v1beta1"
V1ALPHA1 = "v1alpha1"

Sandbox = create_namespaced_resource(AGENTS, V1BETA1, "Sandbox", "sandboxes")
SandboxTemplate = create_namespaced_resource(EXTENSIONS, V1BETA1, "SandboxTemplate", "sandboxtemplates")
SandboxClaim = create_namespaced_resource(EXTENSIONS, V1BETA1, "SandboxClaim", "sandboxclaims")
SandboxWarmPool = create_namespaced_resource(EXTENSIONS, V1BETA1, "SandboxWarmPool", "sandboxwarmpools")
SandboxSnapshot = create_namespaced_resource(COVE, V1ALPHA1, "SandboxSnapshot", "sandboxsnapshots")
SandboxFork = create_namespaced_resource(COVE, V1ALPHA1, "SandboxFork", "sandboxforks")

API_VERSION = {
    "Sandbox": f"{AGENTS}/{V1BETA1}",
    "SandboxTemplate": f"{EXTENSIONS}/{V1BETA1}",
    "SandboxClaim": f"{EXTENSIONS}/{V1BETA1}",
    "SandboxWarmPool": f"{EXTENSIONS}/{V1BETA1}",
    "SandboxSnapshot": f"{COVE}/{V1ALPHA1}",
    "SandboxFork": f"{COVE}/{V1ALPHA1}",
}

# Labels and annotations upstream's controller and client use, kept verbatim so their tools keep working.
LABEL_SANDBOX_NAME_HASH = "agents.x-k8s.io/sandbox-name-hash"  # on the Pod: what status.selector selects
LABEL_SANDBOX_NAME = "agents.x-k8s.io/sandbox-name"  # on the Pod, when the name fits a label value
LABEL_POOL = "agents.x-k8s.io/warm-pool-sandbox"  # on a pool's Sandboxes (and Pods) while the pool owns them
LABEL_LAUNCH_TYPE = "agents.x-k8s.io/launch-type"  # warm (made by a pool) or cold (made for a claim)
LABEL_CLAIM_UID = "agents.x-k8s.io/claim-uid"
ANNOTATION_TEMPLATE_REF = "agents.x-k8s.io/sandbox-template-ref"
# cove's own.
ANNOTATION_SANDBOX = "cove.dev/sandbox"  # on the Pod, written by cove's kubelet: the cove sandbox id
# On a fork's child Sandbox: the cove snapshot it starts from.
ANNOTATION_FROM_SNAPSHOT = "cove.dev/from-snapshot"
ANNOTATION_NODE = "cove.dev/node"  # on a fork's child Sandbox: the node holding that snapshot
ANNOTATION_NETWORK = "cove.dev/network"  # on a Sandbox: the cove egress policy (JSON) its template asks for
LABEL_FORK = "cove.dev/fork"  # on a fork's children
FINALIZER = "cove.dev/sandbox"  # a Sandbox's cove sandbox is killed before the object goes
SNAPSHOT_FINALIZER = "cove.dev/snapshot"  # a SandboxSnapshot's / SandboxFork's cove snapshot is deleted
# Pods that cove's controller places itself (a fork's children must land where their snapshot is, after
# their cove sandbox exists): no scheduler has this name, so kube-scheduler leaves them alone.
SCHEDULER_NAME = "cove-agent-sandbox"
RUNTIME_CLASSES = ("cove-namespaces", "cove-gvisor")
DEFAULT_RUNTIME_CLASS = "cove-namespaces"


def crd_dir() -> Path:
    """deploy/crds/ of this checkout, or COVE_CRDS_DIR (an installed package has no deploy/)."""
    env = os.environ.get("COVE_CRDS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[4] / "deploy" / "crds"


def load_crds(directory: Path | None = None) -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in the directory's YAML files, sorted by name."""
    directory = directory or crd_dir()
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        with path.open() as f:
            docs += [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "CustomResourceDefinition"]
    if not docs:
        raise FileNotFoundError(f"no CustomResourceDefinitions in {directory}")
    return sorted(docs, key=lambda d: d["metadata"]["name"])


async def install_crds(
    client: AsyncClient, directory: Path | None = None, timeout: float = 30.0
) -> list[str]:
    """Creates the CRDs, or replaces them with these files' version (the files are the truth); waits until
    each is Established. Their names."""
    names = []
    for doc in load_crds(directory):
        name = doc["metadata"]["name"]
        try:
            await client.create(CustomResourceDefinition.from_dict(doc))
        except ApiError as e:
            if e.status.code != 409:
                raise
            current = await client.get(CustomResourceDefinition, name)
            body = {
                **doc,
                "metadata": {**doc["metadata"], "resourceVersion": current.metadata.resourceVersion},
            }
            await client.replace(CustomResourceDefinition.from_dict(body))
        names.append(name)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = await client.get(CustomResourceDefinition, name)
            conditions = (crd.status.conditions if crd.status else None) or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established within {timeout} s")
            await asyncio.sleep(0.05)
    return names


# --- small helpers shared by the controller and the router ---------------------------------------------------


def now() -> str:
    """metav1.Time: RFC 3339 in whole seconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> float | None:
    """A metav1.Time as a Unix time; None for None or for something that is not one."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def name_hash(name: str) -> str:
    """A label value for any object name (names may be 253 characters, label values only 63)."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def label_value(name: str) -> str:
    """The name itself where it is a valid label value, else its hash."""
    return name if len(name) <= 63 and name[-1:].isalnum() else name_hash(name)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def is_true(obj: dict[str, Any], kind: str) -> bool:
    c = condition(obj, kind)
    return c is not None and c.get("status") == "True"


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """`conditions` with `kind` set; lastTransitionTime moves only when the status changes."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == kind), None)
    since = (
        old["lastTransitionTime"]
        if old and old.get("status") == value and old.get("lastTransitionTime")
        else now()
    )
    new: dict[str, Any] = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    return [*(c for c in conditions if c.get("type") != kind), new]


def same_conditions(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal but for lastTransitionTime (so an unchanged status is not written again)."""

    def key(cs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
            for c in cs
        )

    return key(a) == key(b)


def owner_ref(obj: dict[str, Any], controller: bool = True) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": obj.get("apiVersion") or API_VERSION[obj["kind"]],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def controller_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the object's controlling owner."""
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None
