"""The controller: reconciles Sandboxes, SandboxTemplates, SandboxWarmPools, SandboxClaims (agent-sandbox's
API) and cove's SandboxSnapshots and SandboxForks, against the API server and cove's REST API.

Shape: one informer (list + watch cache) per kind, whose events enqueue keys; a work queue runs one
reconcile at a time per key (a burst of events is handled once) and any number of keys at once; only the
leader of the Lease reconciles (the others keep warm caches and take over when it stops renewing).
Reconciles read the caches and write through to them, so the path from a claim's watch event to its Ready
status is two API writes and no polling: take a Ready warm Sandbox (move its ownerReference from the pool
to the claim, relabel it), then write the claim's status.

A Sandbox is one Pod (named as the Sandbox, owned by it) that cove's kubelet (cove.kube.kubelet) runs as a
cove sandbox and annotates `cove.dev/sandbox: <id>`; what Kubernetes cannot express goes to cove's API with
that id: Suspended hibernates the sandbox with its memory and Running resumes it, a fork's children are
restored from one cove snapshot before their Pods are bound to the node that holds it, the template's
egress policy is the sandbox's network setting."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from lightkube import ApiError, AsyncClient
from lightkube.operators import exists
from lightkube.resources.core_v1 import Event, Pod, Service
from lightkube.types import CascadeType, PatchType

from cove.kube.agent_sandbox import crds
from cove.kube.agent_sandbox.cove_api import CoveAPI, CoveError
from cove.kube.agent_sandbox.crds import (
    ANNOTATION_FROM_SNAPSHOT,
    ANNOTATION_NETWORK,
    ANNOTATION_NODE,
    ANNOTATION_SANDBOX,
    ANNOTATION_TEMPLATE_REF,
    FINALIZER,
    LABEL_CLAIM_UID,
    LABEL_FORK,
    LABEL_LAUNCH_TYPE,
    LABEL_POOL,
    LABEL_SANDBOX_NAME,
    LABEL_SANDBOX_NAME_HASH,
    SNAPSHOT_FINALIZER,
    Sandbox,
    SandboxClaim,
    SandboxFork,
    SandboxSnapshot,
    SandboxTemplate,
    SandboxWarmPool,
    controller_uid,
    is_true,
    label_value,
    name_hash,
    owner_ref,
    parse_time,
    same_conditions,
    set_condition,
)
from cove.kube.agent_sandbox.informer import Informer, as_dict
from cove.kube.agent_sandbox.leader import LeaderElector
from cove.kube.agent_sandbox.network import Unmappable, cove_network

log = logging.getLogger("cove.kube.agent_sandbox")

COMPONENT = "cove-agent-sandbox"  # field manager of its writes, source of its Events
ANNOTATION_TEMPLATE_HASH = "cove.dev/template-hash"  # on a pool's Sandboxes: which template version made them
CLUSTER_DOMAIN = "cluster.local"
RETRY_MAX_S = 30.0

# What the controller's identity needs (docs/agent-sandbox.md gives it as a ClusterRole).
RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes"],
     "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
    {"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes/status"], "verbs": ["get", "update", "patch"]},
    {"apiGroups": ["extensions.agents.x-k8s.io"], "resources": ["sandboxtemplates"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["extensions.agents.x-k8s.io"], "resources": ["sandboxclaims", "sandboxwarmpools"],
     "verbs": ["get", "list", "watch", "update", "patch", "delete"]},
    {"apiGroups": ["extensions.agents.x-k8s.io"], "resources": ["sandboxclaims/status", "sandboxwarmpools/status"],
     "verbs": ["get", "update", "patch"]},
    {"apiGroups": ["cove.dev"], "resources": ["sandboxsnapshots", "sandboxforks"],
     "verbs": ["get", "list", "watch", "update", "patch"]},
    {"apiGroups": ["cove.dev"], "resources": ["sandboxsnapshots/status", "sandboxforks/status"],
     "verbs": ["get", "update", "patch"]},
    # Owner references that block deletion need this where OwnerReferencesPermissionEnforcement is on.
    {"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["extensions.agents.x-k8s.io"], "resources": ["sandboxclaims/finalizers", "sandboxwarmpools/finalizers"],
     "verbs": ["update"]},
    {"apiGroups": ["cove.dev"], "resources": ["sandboxforks/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods/binding"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update", "patch"]},
]  # fmt: skip

Key = tuple[str, str, str]  # (kind, namespace, name)


class Invalid(Exception):
    """The object asks for something cove cannot do: reported on it, not retried until it changes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _gen(obj: dict[str, Any]) -> int | None:
    return obj["metadata"].get("generation")


def _deleting(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _pod_phase(pod: dict[str, Any] | None) -> str | None:
    return ((pod or {}).get("status") or {}).get("phase")


def _pod_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return _pod_phase(pod) == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


def _pod_ips(pod: dict[str, Any] | None) -> list[str]:
    status = (pod or {}).get("status") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if p.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


def cove_id(pod: dict[str, Any] | None) -> str | None:
    """The cove sandbox a Pod runs as (cove's kubelet annotates it)."""
    return ((pod or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SANDBOX) or None


def validate_sandbox(spec: dict[str, Any]) -> None:
    """What the schema cannot check on every cluster (v1.20: no CEL), and what cove cannot run."""
    mode = spec.get("operatingMode", "Running")
    if mode not in ("Running", "Suspended"):
        raise Invalid("InvalidConfiguration", f"spec.operatingMode {mode!r}: give Running or Suspended")
    policy = spec.get("shutdownPolicy", "Retain")
    if policy not in ("Delete", "Retain"):
        raise Invalid("InvalidConfiguration", f"spec.shutdownPolicy {policy!r}: give Delete or Retain")
    if spec.get("shutdownTime") and parse_time(spec["shutdownTime"]) is None:
        raise Invalid("InvalidConfiguration", f"spec.shutdownTime {spec['shutdownTime']!r} is not a time")
    pod = (spec.get("podTemplate") or {}).get("spec") or {}
    containers = pod.get("containers") or []
    if len(containers) != 1 or pod.get("initContainers"):
        raise Invalid(
            "InvalidConfiguration",
            "cove runs a sandbox as one container: give exactly one container and no initContainers",
        )


def pod_for(sb: dict[str, Any]) -> dict[str, Any]:
    """The Pod a Sandbox runs as."""
    meta, spec = sb["metadata"], sb["spec"]
    template = spec["podTemplate"]
    pod_spec = copy.deepcopy(template.get("spec") or {})
    if pod_spec.get("runtimeClassName") not in crds.RUNTIME_CLASSES:
        pod_spec["runtimeClassName"] = crds.DEFAULT_RUNTIME_CLASS  # only cove's nodes run these pods
    pod_spec.setdefault("automountServiceAccountToken", False)  # as upstream: secure by default
    pod_spec.pop("nodeName", None)
    name = meta["name"]
    labels = {
        **((template.get("metadata") or {}).get("labels") or {}),
        LABEL_SANDBOX_NAME_HASH: name_hash(name),
    }
    if len(name) <= 63:
        labels[LABEL_SANDBOX_NAME] = name
    for key in (LABEL_POOL, LABEL_LAUNCH_TYPE, LABEL_FORK):
        if (meta.get("labels") or {}).get(key):
            labels[key] = meta["labels"][key]
    annotations = dict((template.get("metadata") or {}).get("annotations") or {})
    if (meta.get("annotations") or {}).get(ANNOTATION_FROM_SNAPSHOT):
        # cove's controller binds it itself once its cove sandbox is restored (see _start_from_snapshot).
        pod_spec["schedulerName"] = crds.SCHEDULER_NAME
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_ref(sb)],
        },
        "spec": pod_spec,
    }


def sandbox_from_template(
    template: dict[str, Any],
    namespace: str,
    *,
    name: str | None = None,
    generate_name: str | None = None,
    owner: dict[str, Any],
    labels: dict[str, str],
    env: list[dict[str, Any]] | None = None,
    pod_metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Sandbox made from a SandboxTemplate (by a pool or a claim). Raises Invalid."""
    tspec = template["spec"]
    pod_template = copy.deepcopy(tspec["podTemplate"])
    if env:
        policy = tspec.get("envVarsInjectionPolicy", "Disallowed")
        if policy == "Disallowed":
            raise Invalid(
                "EnvVarsInjectionRejected",
                f"SandboxTemplate {template['metadata']['name']} has envVarsInjectionPolicy Disallowed",
            )
        containers = pod_template["spec"]["containers"]
        for var in env:
            target = var.get("containerName") or containers[0]["name"]
            container = next((c for c in containers if c.get("name") == target), None)
            if container is None:
                raise Invalid("EnvVarsInjectionRejected", f"env {var['name']}: no container {target!r}")
            current = container.setdefault("env", [])
            old = next((e for e in current if e.get("name") == var["name"]), None)
            if old is not None and policy != "Overrides":
                raise Invalid(
                    "EnvVarsInjectionRejected",
                    f"env {var['name']} is set by the template and envVarsInjectionPolicy is {policy}",
                )
            if old is not None:
                current.remove(old)
            current.append({"name": var["name"], "value": var.get("value", "")})
    if pod_metadata:
        md = pod_template.setdefault("metadata", {})
        for part in ("labels", "annotations"):
            if pod_metadata.get(part):
                md[part] = {**(md.get(part) or {}), **pod_metadata[part]}
    annotations = {
        ANNOTATION_TEMPLATE_REF: template["metadata"]["name"],
        ANNOTATION_TEMPLATE_HASH: _digest(tspec),
    }
    try:
        network = cove_network(tspec)
    except Unmappable as e:
        raise Invalid("NetworkPolicyUnsupported", f"networkPolicy: {e}") from e
    if network is not None:
        annotations[ANNOTATION_NETWORK] = json.dumps(network, sort_keys=True)
    metadata: dict[str, Any] = {
        "namespace": namespace,
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": [owner_ref(owner)],
        "finalizers": [FINALIZER],
    }
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = generate_name
    spec: dict[str, Any] = {"podTemplate": pod_template}
    if tspec.get("service") is not None:
        spec["service"] = tspec["service"]
    return {"apiVersion": crds.API_VERSION["Sandbox"], "kind": "Sandbox", "metadata": metadata, "spec": spec}


class WorkQueue:
    """One reconcile at a time per key; a key enqueued while it runs is run once more afterwards."""

    def __init__(self, handler: Callable[[Key], Awaitable[float | None]], gate: Callable[[], bool]) -> None:
        self.handler = handler
        self.gate = gate
        self._pending: set[Key] = set()
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._failures: dict[Key, int] = {}
        self._timers: dict[Key, asyncio.TimerHandle] = {}

    def add(self, key: Key) -> None:
        if not self.gate():
            return
        self._pending.add(key)
        if key not in self._running:
            self._running[key] = asyncio.get_running_loop().create_task(
                self._work(key), name=f"reconcile-{key}"
            )

    def add_after(self, key: Key, delay: float) -> None:
        old = self._timers.get(key)
        loop = asyncio.get_running_loop()
        when = loop.time() + max(delay, 0.0)
        if old is not None and old.when() <= when and not old.cancelled():
            return  # an earlier wake-up is already set
        if old is not None:
            old.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def _work(self, key: Key) -> None:
        try:
            while key in self._pending:
                self._pending.discard(key)
                if not self.gate():
                    return
                try:
                    t0 = time.perf_counter()
                    again = await self.handler(key)
                    log.debug("reconciled %s/%s/%s in %.1f ms", *key, (time.perf_counter() - t0) * 1000)
                    self._failures.pop(key, None)
                    if again is not None:
                        self.add_after(key, again)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    n = self._failures[key] = self._failures.get(key, 0) + 1
                    delay = min(0.2 * 2**n, RETRY_MAX_S)
                    log.warning("reconcile %s/%s/%s failed (retry in %.1f s): %r", *key, delay, e)
                    self.add_after(key, delay)
        finally:
            self._running.pop(key, None)

    async def close(self) -> None:
        for t in self._timers.values():
            t.cancel()
        self._timers.clear()
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class Controller:
    def __init__(
        self,
        client: AsyncClient,
        cove: CoveAPI,
        *,
        identity: str | None = None,
        namespace: str = "*",
        lease_namespace: str = "default",
        lease_name: str = "cove-agent-sandbox-controller",
        lease_duration_s: int = 15,
        renew_s: float = 2.0,
    ) -> None:
        self.client = client
        self.cove = cove
        self.identity = identity or f"{COMPONENT}-{secrets.token_hex(4)}"
        self.namespace = namespace
        self.elector = LeaderElector(
            client, lease_name, lease_namespace, self.identity, lease_duration_s, renew_s, self._leading
        )
        self.queue = WorkQueue(self._reconcile, lambda: self.elector.leading)
        ns = namespace
        self.sandboxes = Informer(client, Sandbox, self._on_sandbox, namespace=ns)
        self.pods = Informer(
            client, Pod, self._on_pod, namespace=ns, labels={LABEL_SANDBOX_NAME_HASH: exists()}
        )
        self.claims = Informer(client, SandboxClaim, self._on_claim, namespace=ns)
        self.pools = Informer(client, SandboxWarmPool, self._on_pool, namespace=ns)
        self.templates = Informer(client, SandboxTemplate, self._on_template, namespace=ns)
        self.snapshots = Informer(client, SandboxSnapshot, self._on_ref, namespace=ns)
        self.forks = Informer(client, SandboxFork, self._on_ref, namespace=ns)
        self.informers = [
            self.sandboxes, self.pods, self.claims, self.pools, self.templates, self.snapshots, self.forks,
        ]  # fmt: skip
        self._tasks: list[asyncio.Task[None]] = []
        self._reserved: set[tuple[str, str]] = set()  # warm Sandboxes being handed to a claim right now
        self._gone_claims: dict[tuple[str, str], tuple[str, str]] = {}  # claim -> (its sandbox, its uid)
        self._events_sent: set[tuple[str, str, str]] = set()
        # A fork's source as at its snapshot: (pod template, node, cove egress policy).
        self._fork_sources: dict[tuple[str, str], tuple[dict[str, Any], str, dict[str, Any] | None]] = {}

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(i.run(), name=f"informer-{i.kind}") for i in self.informers]
        await asyncio.gather(*(i.synced.wait() for i in self.informers))
        # Campaign only with full caches: a new leader then acts on everything at once.
        self._tasks.append(asyncio.create_task(self.elector.run(), name="leader-election"))
        log.info("controller started", extra={"identity": self.identity})

    async def close(self, release: bool = True) -> None:
        if release:
            await self.elector.release()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.queue.close()

    def _leading(self, leading: bool) -> None:
        if leading:  # a new leader looks at everything
            for inf, kind in ((self.sandboxes, "Sandbox"), (self.claims, "SandboxClaim"),
                              (self.pools, "SandboxWarmPool"), (self.snapshots, "SandboxSnapshot"),
                              (self.forks, "SandboxFork")):  # fmt: skip
                for obj in inf.all():
                    self.queue.add((kind, obj["metadata"]["namespace"], obj["metadata"]["name"]))

    # --- routing events to keys --------------------------------------------------------------------------

    def _owner(self, obj: dict[str, Any]) -> tuple[str, str] | None:
        for ref in obj["metadata"].get("ownerReferences") or []:
            if ref.get("controller"):
                return ref.get("kind"), ref.get("name")
        return None

    def _on_sandbox(self, kind: str, sb: dict[str, Any]) -> None:
        ns, name = sb["metadata"]["namespace"], sb["metadata"]["name"]
        self.queue.add(("Sandbox", ns, name))
        owner = self._owner(sb)
        if owner and owner[0] in ("SandboxClaim", "SandboxWarmPool", "SandboxFork"):
            self.queue.add((owner[0], ns, owner[1]))
        for inf, k in ((self.snapshots, "SandboxSnapshot"), (self.forks, "SandboxFork")):
            for o in inf.in_namespace(ns):
                if (o.get("spec") or {}).get("sandboxRef", {}).get("name") == name:
                    self.queue.add((k, ns, o["metadata"]["name"]))

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        owner = self._owner(pod)
        if owner and owner[0] == "Sandbox":
            self.queue.add(("Sandbox", pod["metadata"]["namespace"], owner[1]))

    def _on_claim(self, kind: str, claim: dict[str, Any]) -> None:
        ns, name = claim["metadata"]["namespace"], claim["metadata"]["name"]
        if kind == "DELETED":
            sandbox = ((claim.get("status") or {}).get("sandbox") or {}).get("name")
            if sandbox:  # faster than the garbage collector, which would delete it too
                self._gone_claims[(ns, name)] = (sandbox, claim["metadata"]["uid"])
                self.queue.add(("ClaimGone", ns, name))
            return
        self.queue.add(("SandboxClaim", ns, name))

    def _on_pool(self, kind: str, pool: dict[str, Any]) -> None:
        ns, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        self.queue.add(("SandboxWarmPool", ns, name))
        for claim in self.claims.in_namespace(ns):  # claims that waited for this pool
            if claim["spec"].get("warmPoolRef", {}).get("name") == name and not self._claimed(claim):
                self.queue.add(("SandboxClaim", ns, claim["metadata"]["name"]))

    def _on_template(self, kind: str, template: dict[str, Any]) -> None:
        ns, name = template["metadata"]["namespace"], template["metadata"]["name"]
        for pool in self.pools.in_namespace(ns):
            if pool["spec"].get("sandboxTemplateRef", {}).get("name") == name:
                self._on_pool("MODIFIED", pool)

    def _on_ref(self, kind: str, obj: dict[str, Any]) -> None:
        self.queue.add((obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]))

    @staticmethod
    def _claimed(claim: dict[str, Any]) -> str | None:
        return ((claim.get("status") or {}).get("sandbox") or {}).get("name") or None

    async def _reconcile(self, key: Key) -> float | None:
        kind, ns, name = key
        handler = {
            "Sandbox": self._sandbox,
            "SandboxClaim": self._claim,
            "SandboxWarmPool": self._pool,
            "SandboxSnapshot": self._snapshot,
            "SandboxFork": self._fork,
            "ClaimGone": self._claim_gone,
        }[kind]
        try:
            return await handler(ns, name)
        except ApiError as e:
            if e.status.code == 404 and not self._exists(kind, ns, name):
                return None  # deleted while it was being reconciled: nothing left to do
            raise

    def _exists(self, kind: str, ns: str, name: str) -> bool:
        inf = {"Sandbox": self.sandboxes, "SandboxClaim": self.claims, "SandboxWarmPool": self.pools,
               "SandboxSnapshot": self.snapshots, "SandboxFork": self.forks}.get(kind)  # fmt: skip
        return inf is not None and inf.get(ns, name) is not None

    # --- writes ------------------------------------------------------------------------------------------

    async def _patch_meta(
        self, res: Any, inf: Informer, obj: dict[str, Any], meta: dict[str, Any]
    ) -> dict[str, Any]:
        """A metadata merge patch, conditional on the version read (409 if it changed meanwhile)."""
        m = obj["metadata"]
        patch = {"metadata": {**meta, "resourceVersion": m["resourceVersion"]}}
        new = await self.client.patch(
            res, m["name"], patch, namespace=m["namespace"], patch_type=PatchType.MERGE
        )
        return inf.update(new)

    async def _write_status(
        self, res: Any, inf: Informer, obj: dict[str, Any], status: dict[str, Any]
    ) -> dict[str, Any]:
        """Writes `status` if it differs from the object's (conditions compared without their times)."""
        old = obj.get("status") or {}
        changed = {k: v for k, v in status.items() if k != "conditions" and old.get(k) != v}
        removed = {k: None for k in old if k not in status}
        if "conditions" in status and not same_conditions(old.get("conditions") or [], status["conditions"]):
            changed["conditions"] = status["conditions"]
        if not changed and not removed:
            return obj
        m = obj["metadata"]
        new = await self.client.patch(
            res.Status, m["name"], {"status": {**changed, **removed}}, namespace=m["namespace"],
            patch_type=PatchType.MERGE,
        )  # fmt: skip
        return inf.update(new)

    async def _set_finalizers(
        self, res: Any, inf: Informer, obj: dict[str, Any], old: list[str], new: list[str]
    ) -> dict[str, Any]:
        """A JSON patch guarded by a test of the finalizers alone: a concurrent status write (which moves
        the resourceVersion) does not make it fail, a concurrent change of the finalizers does."""
        m = obj["metadata"]
        ops: list[dict[str, Any]] = (
            [{"op": "test", "path": "/metadata/finalizers", "value": old}] if old else []
        )
        ops.append({"op": "add", "path": "/metadata/finalizers", "value": new})  # add replaces a member
        got = await self.client.patch(
            res, m["name"], ops, namespace=m["namespace"], patch_type=PatchType.JSON
        )
        return inf.update(got)

    async def _ensure_finalizer(
        self, res: Any, inf: Informer, obj: dict[str, Any], finalizer: str
    ) -> dict[str, Any]:
        finalizers = obj["metadata"].get("finalizers") or []
        if finalizer in finalizers:
            return obj
        return await self._set_finalizers(res, inf, obj, finalizers, [*finalizers, finalizer])

    async def _drop_finalizer(self, res: Any, inf: Informer, obj: dict[str, Any], finalizer: str) -> None:
        finalizers = obj["metadata"].get("finalizers") or []
        if finalizer not in finalizers:
            return
        try:
            await self._set_finalizers(res, inf, obj, finalizers, [f for f in finalizers if f != finalizer])
        except ApiError as e:
            if e.status.code != 404:
                raise

    async def _event(self, obj: dict[str, Any], reason: str, message: str, type_: str = "Warning") -> None:
        """A core/v1 Event on the object (kubectl describe shows it); once per object, reason and message."""
        meta = obj["metadata"]
        seen = (meta.get("uid", ""), reason, message)
        if seen in self._events_sent:
            return
        if len(self._events_sent) > 10_000:
            self._events_sent.clear()
        self._events_sent.add(seen)
        stamp = crds.now()
        event = Event.from_dict({
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                               "namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self.identity, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        })  # fmt: skip
        try:
            await self.client.create(event, namespace=meta["namespace"])
        except ApiError as e:  # an Event is a courtesy
            log.warning("event not recorded: %s", e)

    async def _delete(self, res: Any, namespace: str, name: str, **kw: Any) -> None:
        try:
            await self.client.delete(res, name, namespace=namespace, **kw)
        except ApiError as e:
            if e.status.code != 404:
                raise

    # --- Sandbox -----------------------------------------------------------------------------------------

    async def _sandbox(self, ns: str, name: str) -> float | None:
        sb = self.sandboxes.get(ns, name)
        if sb is None:
            return None
        pod = self.pods.get(ns, name)
        foreign = None  # a pod of this name that is not this Sandbox's (a previous one's, on its way out)
        if pod is not None and controller_uid(pod) != sb["metadata"]["uid"]:
            foreign, pod = pod, None
        if _deleting(sb):
            return await self._finalize_sandbox(sb, pod)
        # The finalizer is written alongside the rest (the pod's create): the pod's owner reference alone
        # already ties it to the Sandbox, and this saves a round trip on the way to Ready.
        fin = None
        if FINALIZER not in (sb["metadata"].get("finalizers") or []):
            fin = asyncio.create_task(self._ensure_finalizer(Sandbox, self.sandboxes, sb, FINALIZER))
        try:
            return await self._sandbox_live(sb, pod, foreign)
        finally:
            if fin is not None:
                await fin

    async def _sandbox_live(
        self, sb: dict[str, Any], pod: dict[str, Any] | None, foreign: dict[str, Any] | None
    ) -> float | None:
        ns, name = sb["metadata"]["namespace"], sb["metadata"]["name"]
        spec = sb["spec"]
        conditions = list((sb.get("status") or {}).get("conditions") or [])
        gen = _gen(sb)
        try:
            validate_sandbox(spec)
        except Invalid as e:
            await self._event(sb, e.reason, e.message)
            conditions = set_condition(conditions, "Ready", False, e.reason, e.message, gen)
            await self._write_status(
                Sandbox, self.sandboxes, sb, {**(sb.get("status") or {}), "conditions": conditions}
            )
            return None
        # Expiry.
        expires = parse_time(spec.get("shutdownTime"))
        if expires is not None and time.time() >= expires:
            if spec.get("shutdownPolicy", "Retain") == "Delete":
                log.info("sandbox expired: deleting it", extra={"sandbox": f"{ns}/{name}"})
                await self._delete(Sandbox, ns, name)
                return None
            await self._end_pod(sb, pod)
            message = f"shutdownTime {spec['shutdownTime']} has passed"
            conditions = set_condition(conditions, "Finished", True, "SandboxExpired", message, gen)
            conditions = set_condition(conditions, "Ready", False, "SandboxExpired", message, gen)
            await self._write_status(
                Sandbox, self.sandboxes, sb, {**self._placement(sb, None), "conditions": conditions}
            )
            return None
        if is_true(sb, "Finished"):
            await self._end_pod(sb, pod)  # a finished sandbox is not started again
            return None
        again = None if expires is None else expires - time.time()
        # The pod.
        if foreign is not None:
            if _deleting(foreign):  # its deletion's event wakes this up again
                message = f"waiting for the previous pod {name} to go"
                conditions = set_condition(conditions, "Ready", False, "DependenciesNotReady", message, gen)
                await self._write_status(Sandbox, self.sandboxes, sb, {"conditions": conditions})
                return again
            e = Invalid("PodConflict", f"a pod named {name} exists and is not this Sandbox's")
            await self._event(sb, e.reason, e.message)
            conditions = set_condition(conditions, "Ready", False, e.reason, e.message, gen)
            await self._write_status(Sandbox, self.sandboxes, sb, {"conditions": conditions})
            return again
        if pod is None:
            try:
                pod = await self._create_pod(sb)
            except Invalid as e:
                await self._event(sb, e.reason, e.message)
                conditions = set_condition(conditions, "Ready", False, e.reason, e.message, gen)
                await self._write_status(Sandbox, self.sandboxes, sb, {"conditions": conditions})
                return again
        phase = _pod_phase(pod)
        if phase in ("Succeeded", "Failed"):
            reason = "PodSucceeded" if phase == "Succeeded" else "PodFailed"
            message = (pod.get("status") or {}).get("message") or f"the pod is {phase}"
            conditions = set_condition(conditions, "Finished", True, reason, message, gen)
            conditions = set_condition(conditions, "Ready", False, reason, message, gen)
            await self._write_status(
                Sandbox, self.sandboxes, sb, {**self._placement(sb, pod), "conditions": conditions}
            )
            if phase == "Failed":
                await self._event(sb, reason, message)
            return None
        sid = cove_id(pod)
        annotations = sb["metadata"].get("annotations") or {}
        if (
            sid is None
            and annotations.get(ANNOTATION_FROM_SNAPSHOT)
            and not (pod.get("spec") or {}).get("nodeName")
        ):
            await self._start_from_snapshot(sb, pod)
        status: dict[str, Any] = self._placement(sb, pod)
        cove_status = dict((sb.get("status") or {}).get("cove") or {})
        if sid and phase == "Running":  # with the Running status (the annotation comes a write earlier)
            cove_status["sandboxID"] = sid
        network_ok = True
        wanted = annotations.get(ANNOTATION_NETWORK)
        if wanted and sid and cove_status.get("network") != _digest(wanted):
            await self.cove.set_network(sid, json.loads(wanted))
            cove_status["network"] = _digest(wanted)
        elif wanted and cove_status.get("network") != _digest(wanted):
            network_ok = False
        if cove_status:
            status["cove"] = cove_status
        running = pod is not None and _pod_ready(pod) and sid is not None
        mode = spec.get("operatingMode", "Running")
        suspended = is_true(sb, "Suspended")
        if mode == "Suspended" and running and not suspended:
            assert sid is not None
            state = (await self.cove.get(sid) or {}).get("state")
            if state in ("running", "paused", "starting"):
                rec = await self.cove.hibernate(sid)
                memory = (rec.get("hibernation") or {}).get("memory")
                log.info(
                    "sandbox suspended", extra={"sandbox": f"{ns}/{name}", "cove": sid, "memory": memory}
                )
            suspended = True
        elif mode == "Running" and suspended and sid:
            state = (await self.cove.get(sid) or {}).get("state")
            if state == "hibernated":
                await self.cove.resume(sid)
                log.info("sandbox resumed", extra={"sandbox": f"{ns}/{name}", "cove": sid})
            suspended = False
        if mode == "Suspended" or suspended or any(c.get("type") == "Suspended" for c in conditions):
            if suspended:
                msg = "hibernated by cove (memory kept where the node can checkpoint it)"
                conditions = set_condition(conditions, "Suspended", True, "SandboxSuspended", msg, gen)
            else:
                conditions = set_condition(conditions, "Suspended", False, "SandboxRunning", "running", gen)
        if suspended:
            ready, reason, message = False, "SandboxSuspended", "operatingMode is Suspended"
        elif not running:
            # One message for every step before Ready (scheduled, started, annotated): each would be a write.
            ready, reason, message = False, "DependenciesNotReady", f"waiting for pod {name} to run"
        elif not network_ok:
            ready, reason, message = False, "DependenciesNotReady", "the egress policy is not applied yet"
        else:
            ready, reason, message = True, "DependenciesReady", f"cove sandbox {sid} is running"
        conditions = set_condition(conditions, "Ready", ready, reason, message, gen)
        status["conditions"] = conditions
        await self._ensure_service(sb, status)
        await self._write_status(Sandbox, self.sandboxes, sb, status)
        return again

    def _placement(self, sb: dict[str, Any], pod: dict[str, Any] | None) -> dict[str, Any]:
        """The status fields that come from the pod (and the selector, which is the Sandbox's own)."""
        status: dict[str, Any] = {
            "selector": f"{LABEL_SANDBOX_NAME_HASH}={name_hash(sb['metadata']['name'])}"
        }
        # The node once the pod runs there (its binding alone would be one more status write before Ready).
        node = ((pod or {}).get("spec") or {}).get("nodeName") if _pod_phase(pod) == "Running" else None
        if node:
            status["nodeName"] = node
        ips = _pod_ips(pod)
        if ips:
            status["podIPs"] = ips
        old = sb.get("status") or {}
        for k in ("service", "serviceFQDN", "cove"):
            if old.get(k):
                status[k] = old[k]
        return status

    async def _ensure_service(self, sb: dict[str, Any], status: dict[str, Any]) -> None:
        """A headless Service selecting the pod when spec.service is true; removed when it is false."""
        meta = sb["metadata"]
        ns, name = meta["namespace"], meta["name"]
        want = sb["spec"].get("service")
        if want and not status.get("service"):
            svc = Service.from_dict({
                "metadata": {"name": name, "namespace": ns, "ownerReferences": [owner_ref(sb)]},
                "spec": {"clusterIP": "None", "selector": {LABEL_SANDBOX_NAME_HASH: name_hash(name)}},
            })  # fmt: skip
            try:
                await self.client.create(svc, namespace=ns)
            except ApiError as e:
                if e.status.code != 409:
                    raise
            status["service"] = name
            status["serviceFQDN"] = f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"
        elif want is False and status.get("service"):
            await self._delete(Service, ns, status["service"])
            status.pop("service", None)
            status.pop("serviceFQDN", None)

    async def _create_pod(self, sb: dict[str, Any]) -> dict[str, Any]:
        body = pod_for(sb)
        meta = body["metadata"]
        try:
            model = Pod.from_dict(body)
        except Exception as e:
            raise Invalid("InvalidConfiguration", f"spec.podTemplate is not a valid Pod: {e}") from e
        try:
            pod = await self.client.create(model, namespace=meta["namespace"])
        except ApiError as e:
            if e.status.code == 409:  # made already (our cache has not seen it yet)
                got = as_dict(await self.client.get(Pod, meta["name"], namespace=meta["namespace"]))
                if controller_uid(got) != sb["metadata"]["uid"]:
                    raise Invalid(
                        "PodConflict", f"a pod named {meta['name']} exists and is not this Sandbox's"
                    ) from e
                return self.pods.update(got)
            if e.status.code in (400, 422):
                raise Invalid("InvalidConfiguration", f"the pod was refused: {e.status.message}") from e
            raise
        log.info("pod created", extra={"sandbox": f"{meta['namespace']}/{meta['name']}", "by": self.identity})
        return self.pods.update(pod)

    async def _start_from_snapshot(self, sb: dict[str, Any], pod: dict[str, Any]) -> None:
        """A fork's child: its cove sandbox is restored from the fork's snapshot under the pod's identity
        (the metadata cove's kubelet finds a pod's sandbox by), then the pod is bound to the node that holds
        the snapshot, where the kubelet adopts that sandbox instead of starting one."""
        annotations = sb["metadata"]["annotations"]
        pm = pod["metadata"]
        node = annotations.get(ANNOTATION_NODE) or ""
        identity = {
            "k8s.namespace": pm["namespace"],
            "k8s.pod": pm["name"],
            "k8s.uid": pm["uid"],
            "k8s.node": node,
        }
        if not await self.cove.find({"k8s.uid": pm["uid"]}):
            body: dict[str, Any] = {
                "snapshot": annotations[ANNOTATION_FROM_SNAPSHOT],
                "timeout": 0,
                "metadata": identity,
            }
            if annotations.get(ANNOTATION_NETWORK):
                body["network"] = json.loads(annotations[ANNOTATION_NETWORK])
            try:
                rec = await self.cove.create(body)
            except CoveError as e:
                if e.status in (400, 404, 409, 422):
                    await self._event(sb, "SnapshotRestoreFailed", e.message)
                raise
            log.info(
                "fork child restored", extra={"sandbox": f"{pm['namespace']}/{pm['name']}", "cove": rec["id"]}
            )
        binding = Pod.Binding.from_dict({
            "metadata": {"name": pm["name"], "namespace": pm["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        })  # fmt: skip
        try:
            await self.client.create(binding, pm["name"], namespace=pm["namespace"])
        except ApiError as e:
            if e.status.code != 409:  # bound already
                raise
        except msgspec.ValidationError:
            pass  # bound: the API server answers a binding with a Status, which lightkube reads as a Binding

    async def _end_pod(self, sb: dict[str, Any], pod: dict[str, Any] | None) -> None:
        """Ends the cove sandbox and deletes the pod (a Retain expiry, a finished sandbox, a deletion)."""
        sid = cove_id(pod) or ((sb.get("status") or {}).get("cove") or {}).get("sandboxID")
        if sid:
            await self.cove.kill(sid)
        if pod is not None and not _deleting(pod):
            await self._delete(Pod, pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def _finalize_sandbox(self, sb: dict[str, Any], pod: dict[str, Any] | None) -> None:
        if FINALIZER not in (sb["metadata"].get("finalizers") or []):
            return
        await self._end_pod(sb, pod)
        status = sb.get("status") or {}
        if status.get("service"):
            await self._delete(Service, sb["metadata"]["namespace"], status["service"])
        await self._drop_finalizer(Sandbox, self.sandboxes, sb, FINALIZER)
        log.info(
            "sandbox deleted", extra={"sandbox": f"{sb['metadata']['namespace']}/{sb['metadata']['name']}"}
        )

    # --- SandboxWarmPool ----------------------------------------------------------------------------------

    async def _drop_orphans(self, ns: str, name: str, uid: str | None) -> None:
        """A deleted pool's members go with it. Their owner references would have the garbage
        collector delete them too, but its view of a CRD's objects can lag far behind (it rediscovers
        resources every 30 s and stalls while any API group fails to list): seen here as a pool's
        members still running 80 s after the pool was deleted, under load."""
        for s in self.sandboxes.in_namespace(ns):
            owner = next((r for r in s["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
            if (
                _deleting(s)
                or owner is None
                or (owner.get("kind"), owner.get("name")) != ("SandboxWarmPool", name)
            ):
                continue
            if uid is not None and owner.get("uid") != uid:
                continue  # a pool being deleted: only its own members (not a newer pool's of that name)
            await self._delete(Sandbox, ns, s["metadata"]["name"])

    def _pool_members(self, pool: dict[str, Any]) -> list[dict[str, Any]]:
        uid = pool["metadata"]["uid"]
        return [
            s for s in self.sandboxes.in_namespace(pool["metadata"]["namespace"])
            if controller_uid(s) == uid and not _deleting(s)
        ]  # fmt: skip

    async def _pool(self, ns: str, name: str) -> float | None:
        pool = self.pools.get(ns, name)
        if pool is None or _deleting(pool):
            await self._drop_orphans(ns, name, None if pool is None else pool["metadata"]["uid"])
            return None
        members = self._pool_members(pool)
        tname = pool["spec"]["sandboxTemplateRef"]["name"]
        template = self.templates.get(ns, tname)
        want = int(pool["spec"].get("replicas") or 0)
        if template is not None:
            digest = _digest(template["spec"])
            if (pool["spec"].get("updateStrategy") or {}).get("type") == "Recreate":
                for s in members:
                    if (s["metadata"].get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH) != digest:
                        await self._delete(Sandbox, ns, s["metadata"]["name"])
                members = [
                    s for s in members
                    if (s["metadata"].get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH) == digest
                ]  # fmt: skip
            for _ in range(want - len(members)):
                labels = {LABEL_POOL: label_value(name), LABEL_LAUNCH_TYPE: "warm"}
                try:
                    body = sandbox_from_template(
                        template, ns, generate_name=f"{name}-", owner=pool, labels=labels
                    )
                except Invalid as e:
                    await self._event(pool, e.reason, e.message)
                    break
                created = await self.client.create(Sandbox(body), namespace=ns)
                members.append(self.sandboxes.update(created))
        else:
            await self._event(pool, "TemplateNotFound", f"SandboxTemplate {tname} not found in {ns}")
        if len(members) > want:
            # Not-ready ones first, then the newest: the ready old ones are what claims are waiting for.
            members.sort(
                key=lambda s: (
                    is_true(s, "Ready"),
                    -(parse_time(s["metadata"].get("creationTimestamp")) or 0),
                )
            )
            for s in members[: len(members) - want]:
                await self._delete(Sandbox, ns, s["metadata"]["name"])
            members = members[len(members) - want :]
        status = {
            "replicas": len(members),
            "readyReplicas": sum(1 for s in members if is_true(s, "Ready")),
            "selector": f"{LABEL_POOL}={label_value(name)}",
        }
        await self._write_status(SandboxWarmPool, self.pools, pool, status)
        return None

    # --- SandboxClaim -------------------------------------------------------------------------------------

    async def _claim(self, ns: str, name: str) -> float | None:
        claim = self.claims.get(ns, name)
        if claim is None or _deleting(claim):
            return None
        gen = _gen(claim)
        status = dict(claim.get("status") or {})
        conditions = list(status.get("conditions") or [])
        lifecycle = claim["spec"].get("lifecycle") or {}
        expires = parse_time(lifecycle.get("shutdownTime"))
        if expires is not None and time.time() >= expires:
            return await self._expire_claim(claim, status, conditions)
        again = None if expires is None else expires - time.time()
        sandbox_name = self._claimed(claim)
        sb = self.sandboxes.get(ns, sandbox_name) if sandbox_name else None
        if sandbox_name is None:
            try:
                sb = await self._bind_claim(claim)
            except Invalid as e:
                conditions = set_condition(conditions, "Ready", False, e.reason, e.message, gen)
                await self._write_status(
                    SandboxClaim, self.claims, claim, {**status, "conditions": conditions}
                )
                await self._event(claim, e.reason, e.message)
                return again
            sandbox_name = sb["metadata"]["name"]
        # The claim's Ready is its Sandbox's, forwarded (the client waits on it alone).
        if sb is None:
            conditions = set_condition(
                conditions, "Ready", False, "SandboxMissing", f"Sandbox {sandbox_name} is gone", gen
            )
        else:
            ready = next(
                (c for c in (sb.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"),
                None,
            )
            if ready is None:
                conditions = set_condition(conditions, "Ready", False, "SandboxNotReady", "starting", gen)
            else:
                conditions = set_condition(
                    conditions,
                    "Ready",
                    ready["status"] == "True",
                    ready.get("reason", ""),
                    ready.get("message", ""),
                    gen,
                )
            finished = next(
                (c for c in (sb.get("status") or {}).get("conditions") or [] if c.get("type") == "Finished"),
                None,
            )
            if finished is not None:
                conditions = set_condition(
                    conditions, "Finished", finished["status"] == "True", finished.get("reason", ""),
                    finished.get("message", ""), gen,
                )  # fmt: skip
        sandbox_status: dict[str, Any] = {"name": sandbox_name}
        ips = (sb or {}).get("status", {}).get("podIPs") if sb else None
        if ips:
            sandbox_status["podIPs"] = ips
        await self._write_status(
            SandboxClaim, self.claims, claim, {"sandbox": sandbox_status, "conditions": conditions}
        )
        ttl = lifecycle.get("ttlSecondsAfterFinished")
        fin = next((c for c in conditions if c.get("type") == "Finished" and c.get("status") == "True"), None)
        if ttl is not None and fin is not None:
            left = (parse_time(fin.get("lastTransitionTime")) or time.time()) + ttl - time.time()
            if left <= 0:
                await self._delete(SandboxClaim, ns, name, cascade=CascadeType.BACKGROUND)
                return None
            again = left if again is None else min(again, left)
        return again

    async def _bind_claim(self, claim: dict[str, Any]) -> dict[str, Any]:
        """The claim's Sandbox: a Ready warm one taken from the pool, else a new one from its template."""
        meta, spec = claim["metadata"], claim["spec"]
        ns = meta["namespace"]
        pool_name = spec["warmPoolRef"]["name"]
        pool = self.pools.get(ns, pool_name)
        if pool is None:
            raise Invalid("WarmPoolNotFound", f"SandboxWarmPool {pool_name} not found in {ns}")
        tname = pool["spec"]["sandboxTemplateRef"]["name"]
        template = self.templates.get(ns, tname)
        if template is None:
            raise Invalid("TemplateNotFound", f"SandboxTemplate {tname} not found in {ns}")
        cold = bool(spec.get("env") or spec.get("volumeClaimTemplates"))
        if not cold:
            sb = await self._take_warm(pool, claim)
            if sb is not None:
                return sb
        # Cold: named as the claim (its own name is free unless something else took it).
        labels = {LABEL_LAUNCH_TYPE: "cold", LABEL_CLAIM_UID: meta["uid"]}
        body = sandbox_from_template(
            template, ns, name=meta["name"], owner=claim, labels=labels,
            env=spec.get("env"), pod_metadata=spec.get("additionalPodMetadata"),
        )  # fmt: skip
        try:
            created = await self.client.create(Sandbox(body), namespace=ns)
        except ApiError as e:
            if e.status.code != 409:
                raise
            existing = await self.client.get(Sandbox, meta["name"], namespace=ns)
            if controller_uid(as_dict(existing)) == meta["uid"]:
                return self.sandboxes.update(existing)
            body["metadata"].pop("name")
            body["metadata"]["generateName"] = f"{meta['name']}-"
            created = await self.client.create(Sandbox(body), namespace=ns)
        log.info("claim bound (cold)", extra={"claim": f"{ns}/{meta['name']}"})
        return self.sandboxes.update(created)

    async def _take_warm(self, pool: dict[str, Any], claim: dict[str, Any]) -> dict[str, Any] | None:
        ns = pool["metadata"]["namespace"]
        candidates = [
            s for s in self._pool_members(pool)
            if is_true(s, "Ready") and not is_true(s, "Finished") and (ns, s["metadata"]["name"]) not in self._reserved
            and (s.get("spec") or {}).get("operatingMode", "Running") == "Running"
        ]  # fmt: skip
        candidates.sort(key=lambda s: parse_time(s["metadata"].get("creationTimestamp")) or 0)
        for s in candidates:
            key = (ns, s["metadata"]["name"])
            self._reserved.add(key)
            try:
                labels = dict(s["metadata"].get("labels") or {})
                taken = await self._patch_meta(Sandbox, self.sandboxes, s, {
                    "ownerReferences": [owner_ref(claim)],
                    "labels": {LABEL_POOL: None, LABEL_LAUNCH_TYPE: "warm", LABEL_CLAIM_UID: claim["metadata"]["uid"]},
                })  # fmt: skip
            except ApiError as e:
                if e.status.code in (404, 409):
                    continue  # changed or gone since the cache saw it: the next one
                raise
            finally:
                self._reserved.discard(key)
            log.info(
                "claim bound (warm)", extra={"claim": f"{ns}/{claim['metadata']['name']}", "sandbox": key[1]}
            )
            self.queue.add(("SandboxWarmPool", ns, pool["metadata"]["name"]))  # refill
            if labels.get(LABEL_POOL):
                asyncio.get_running_loop().create_task(self._relabel_pod(taken, claim))
            return taken
        return None

    async def _relabel_pod(self, sb: dict[str, Any], claim: dict[str, Any]) -> None:
        """After the claim is answered: the pod leaves the pool's selector and gets the claim's metadata."""
        meta = sb["metadata"]
        extra = claim["spec"].get("additionalPodMetadata") or {}
        patch = {
            "metadata": {
                "labels": {LABEL_POOL: None, LABEL_LAUNCH_TYPE: "warm", LABEL_CLAIM_UID: claim["metadata"]["uid"],
                           **(extra.get("labels") or {})},
                "annotations": extra.get("annotations") or {},
            }
        }  # fmt: skip
        try:
            pod = await self.client.patch(
                Pod, meta["name"], patch, namespace=meta["namespace"], patch_type=PatchType.MERGE
            )
            self.pods.update(pod)
        except Exception as e:
            log.warning("pod relabel failed: %r", e)

    async def _expire_claim(
        self, claim: dict[str, Any], status: dict[str, Any], conditions: list[dict[str, Any]]
    ) -> None:
        meta = claim["metadata"]
        ns, name = meta["namespace"], meta["name"]
        policy = (claim["spec"].get("lifecycle") or {}).get("shutdownPolicy", "Retain")
        if policy in ("Delete", "DeleteForeground"):
            cascade = CascadeType.FOREGROUND if policy == "DeleteForeground" else CascadeType.BACKGROUND
            await self._delete(SandboxClaim, ns, name, cascade=cascade)
            return None
        sandbox = self._claimed(claim)
        if sandbox:
            sb = self.sandboxes.get(ns, sandbox)
            if sb is not None and controller_uid(sb) == meta["uid"]:
                await self._delete(Sandbox, ns, sandbox)
        message = "lifecycle.shutdownTime has passed"
        conditions = set_condition(conditions, "Ready", False, "ClaimExpired", message, _gen(claim))
        await self._write_status(SandboxClaim, self.claims, claim, {**status, "conditions": conditions})
        return None

    async def _claim_gone(self, ns: str, name: str) -> None:
        sandbox, uid = self._gone_claims.pop((ns, name), ("", ""))
        sb = self.sandboxes.get(ns, sandbox) if sandbox else None
        if sb is not None and controller_uid(sb) == uid and not _deleting(sb):
            await self._delete(Sandbox, ns, sandbox)

    # --- SandboxSnapshot / SandboxFork --------------------------------------------------------------------

    def _source(self, obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The Sandbox a snapshot or fork names, its pod and its cove sandbox id. Raises Invalid."""
        ns = obj["metadata"]["namespace"]
        ref = obj["spec"]["sandboxRef"]["name"]
        sb = self.sandboxes.get(ns, ref)
        if sb is None:
            raise Invalid("SandboxNotFound", f"Sandbox {ref} not found in {ns}")
        pod = self.pods.get(ns, ref)
        sid = cove_id(pod)
        if pod is None or sid is None or not is_true(sb, "Ready"):
            raise Invalid("SandboxNotReady", f"Sandbox {ref} is not Ready")
        return sb, pod, sid

    async def _take_snapshot(self, obj: dict[str, Any], sid: str, memory: bool) -> dict[str, Any]:
        """A cove snapshot named after the object (found again, not taken twice, after a crash)."""
        meta = obj["metadata"]
        label = f"k8s:{obj['kind']}:{meta['namespace']}/{meta['name']}:{meta['uid']}"
        for snap in await self.cove.snapshots():
            if snap.get("name") == label:
                return snap
        try:
            return await self.cove.snapshot(sid, label, memory)
        except CoveError as e:
            if memory and e.status == 409:  # no CRIU on the node, or nothing running: files only
                await self._event(obj, "MemoryNotKept", e.message, "Normal")
                return await self.cove.snapshot(sid, label, False)
            raise

    async def _snapshot(self, ns: str, name: str) -> None:
        snap = self.snapshots.get(ns, name)
        if snap is None:
            return
        status = dict(snap.get("status") or {})
        if _deleting(snap):
            if status.get("snapshotID"):
                await self.cove.delete_snapshot(status["snapshotID"])
            await self._drop_finalizer(SandboxSnapshot, self.snapshots, snap, SNAPSHOT_FINALIZER)
            return
        snap = await self._ensure_finalizer(SandboxSnapshot, self.snapshots, snap, SNAPSHOT_FINALIZER)
        if status.get("snapshotID"):
            return  # a snapshot is of one instant: taken once
        conditions = list(status.get("conditions") or [])
        try:
            _, _, sid = self._source(snap)
        except Invalid as e:
            conditions = set_condition(conditions, "Ready", False, e.reason, e.message, _gen(snap))
            await self._write_status(SandboxSnapshot, self.snapshots, snap, {"conditions": conditions})
            return
        rec = await self._take_snapshot(snap, sid, bool(snap["spec"].get("memory")))
        conditions = set_condition(
            conditions, "Ready", True, "SnapshotTaken", f"cove snapshot {rec['id']}", _gen(snap)
        )
        await self._write_status(
            SandboxSnapshot, self.snapshots, snap,
            {"snapshotID": rec["id"], "memory": bool(rec.get("memory")), "conditions": conditions},
        )  # fmt: skip
        log.info("snapshot taken", extra={"snapshot": f"{ns}/{name}", "cove": rec["id"]})

    async def _fork(self, ns: str, name: str) -> None:
        fork = self.forks.get(ns, name)
        if fork is None:
            return
        status = dict(fork.get("status") or {})
        if _deleting(fork):  # the children go with it (owner references); the snapshot here
            self._fork_sources.pop((ns, name), None)
            if status.get("snapshotID"):
                await self.cove.delete_snapshot(status["snapshotID"])
            await self._drop_finalizer(SandboxFork, self.forks, fork, SNAPSHOT_FINALIZER)
            return
        fork = await self._ensure_finalizer(SandboxFork, self.forks, fork, SNAPSHOT_FINALIZER)
        gen = _gen(fork)
        conditions = list(status.get("conditions") or [])
        if not status.get("snapshotID"):
            try:
                source, pod, sid = self._source(fork)
            except Invalid as e:
                conditions = set_condition(conditions, "Ready", False, e.reason, e.message, gen)
                await self._write_status(SandboxFork, self.forks, fork, {"conditions": conditions})
                return
            rec = await self._take_snapshot(fork, sid, fork["spec"].get("memory", True))
            network = (await self.cove.get(sid) or {}).get("network")
            # What every child is made from, recorded first: children made later (replicas raised) are
            # of the same instant.
            status.update(snapshotID=rec["id"], memory=bool(rec.get("memory")))
            fork = await self._write_status(
                SandboxFork, self.forks, fork, {**status, "conditions": conditions}
            )
            self._fork_sources[(ns, name)] = (
                source["spec"]["podTemplate"],
                pod["spec"].get("nodeName", ""),
                network,
            )
        children = {
            s["metadata"]["name"]: s for s in self.sandboxes.in_namespace(ns)
            if controller_uid(s) == fork["metadata"]["uid"] and not _deleting(s)
        }  # fmt: skip
        want = int(fork["spec"].get("replicas", 1))
        wanted = [f"{name}-{i}" for i in range(want)]
        missing = [n for n in wanted if n not in children]
        if missing:
            template, node, network = await self._fork_source(fork)
            for child in missing:
                annotations = {ANNOTATION_FROM_SNAPSHOT: status["snapshotID"], ANNOTATION_NODE: node}
                if network:
                    annotations[ANNOTATION_NETWORK] = json.dumps(
                        {k: network[k] for k in ("mode", "allow", "deny") if k in network}, sort_keys=True
                    )
                body = {
                    "apiVersion": crds.API_VERSION["Sandbox"], "kind": "Sandbox",
                    "metadata": {"name": child, "namespace": ns, "labels": {LABEL_FORK: label_value(name)},
                                 "annotations": annotations, "ownerReferences": [owner_ref(fork)],
                                 "finalizers": [FINALIZER]},
                    "spec": {"podTemplate": template},
                }  # fmt: skip
                try:
                    children[child] = self.sandboxes.update(
                        await self.client.create(Sandbox(body), namespace=ns)
                    )
                except ApiError as e:
                    if e.status.code != 409:
                        raise
        for extra in [n for n in children if n not in wanted]:
            await self._delete(Sandbox, ns, extra)
            children.pop(extra)
        ready = sum(1 for n in wanted if n in children and is_true(children[n], "Ready"))
        all_ready = ready == want
        conditions = set_condition(
            conditions, "Ready", all_ready, "ChildrenReady" if all_ready else "ChildrenNotReady",
            f"{ready}/{want} Sandboxes Ready", gen,
        )  # fmt: skip
        status.update(replicas=len(children), readyReplicas=ready, sandboxes=wanted, conditions=conditions)
        await self._write_status(SandboxFork, self.forks, fork, status)

    async def _fork_source(self, fork: dict[str, Any]) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
        """The pod template, node and egress policy of a fork's source, as at its snapshot (or, after a
        restart, as the source is now: the snapshot fixed the files and processes, not these)."""
        key = (fork["metadata"]["namespace"], fork["metadata"]["name"])
        if key in self._fork_sources:
            return self._fork_sources[key]
        ns = key[0]
        ref = fork["spec"]["sandboxRef"]["name"]
        sb = self.sandboxes.get(ns, ref)
        pod = self.pods.get(ns, ref)
        if sb is None or pod is None:
            raise Invalid("SandboxNotFound", f"Sandbox {ref} (the source) not found in {ns}")
        sid = cove_id(pod)
        network = (await self.cove.get(sid) or {}).get("network") if sid else None
        self._fork_sources[key] = (sb["spec"]["podTemplate"], pod["spec"].get("nodeName", ""), network)
        return self._fork_sources[key]
