"""The Kubelet: registers this server's node with a Kubernetes API server, keeps it alive (Lease and Ready
condition) and runs the Pods bound to it as sandboxes, writing their status (the design: `cove.kube`).

Everything it does goes through the API server (lightkube's async client) and cove's own service:
`SandboxService.create` / `end` and the guest of each sandbox, never the node's runtimes directly. Each pod
has one worker at a time (`_Pod`), woken by its watch events and by the poll of its sandbox, that brings
the sandbox and the pod's status in line with what it last saw of the pod; events for one pod are
therefore never handled concurrently, and a burst of them is handled once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import platform
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic
from lightkube import ApiError as KubeError
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.coordination_v1 import Lease
from lightkube.resources.core_v1 import Event, Namespace, Node, Pod
from lightkube.resources.node_v1 import RuntimeClass
from lightkube.types import PatchType

from cove import __version__
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import CreateSandbox
from cove.controlplane.states import LIVE
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

log = logging.getLogger("cove.kube")

COMPONENT = "cove-kubelet"  # the field manager of its writes and the source of its Events
# The Kubernetes version whose kubelet API this node speaks (tests/kube.py runs it); the suffix says who.
KUBELET_VERSION = f"v1.20.2-cove-{__version__}"
RUNTIME_CLASSES = {"cove-namespaces": "namespaces", "cove-gvisor": "gvisor"}  # name -> cove runtime
TAINT = {"key": "virtual-kubelet.io/provider", "value": "cove", "effect": "NoSchedule"}
NODE_LABEL = "cove.dev/node"
GVISOR_LABEL = "cove.dev/gvisor"  # only on nodes where gvisor runs: cove-gvisor pods go there alone
ANNOTATION_TEMPLATE = "cove.dev/template"
ANNOTATION_SANDBOX = "cove.dev/sandbox"
ANNOTATION_TENANT = "cove.dev/tenant"  # on a Namespace: the cove tenant of its pods' sandboxes
MAIN_TAG = "k8s-main"  # the tag of the process that runs the container's command
LEASE_NAMESPACE = "kube-node-lease"
LEASE_S = 2.0  # renewals; the node-lifecycle controller's grace period is 40 s upstream
LEASE_DURATION_S = 40  # what kubelet writes
STATUS_S = 10.0  # the Ready condition's heartbeat (kubelet: 10 s, and on change)
POLL_S = 2.0  # how often each pod's sandbox (and command) is looked at
MAX_PODS = 110  # kubelet's default
BACKOFF_MAX_S = 30.0

# What the node's identity needs from the API server (docs/kubernetes.md gives it as a ClusterRole).
RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "verbs": ["get", "create"]},
]


# --- small pure helpers ------------------------------------------------------------------------------------


def _time(at: float | None = None) -> str:
    """metav1.Time: RFC 3339 in whole seconds."""
    return datetime.fromtimestamp(time.time() if at is None else at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_time() -> str:
    """metav1.MicroTime (a Lease's renewTime): exactly six fractional digits, which the API server demands
    (a datetime encoded by lightkube drops them when the microseconds are 0)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_QUANTITY = re.compile(
    r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$"
)
_SUFFIX = {
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}  # fmt: skip


def parse_quantity(text: str) -> float:
    """A Kubernetes resource quantity in base units: "500m" -> 0.5, "2" -> 2.0, "512Mi" -> 536870912.0,
    "1G" -> 1e9, "1e3" -> 1000.0. ValueError for anything else."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = m.groups()
    return float(number) * (10.0 ** int(exponent[1:]) if exponent else _SUFFIX[suffix or ""])


def _meminfo_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


class Unsupported(Exception):
    """A pod this node cannot run as asked: it goes Failed with `reason` and the message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def sandbox_request(pod: Pod, node: str) -> tuple[CreateSandbox, list[str] | None]:
    """The sandbox a pod asks for, and the argv of its command (None: none given). Raises Unsupported."""
    spec, meta = pod.spec, pod.metadata
    rc = spec.runtimeClassName
    if rc not in RUNTIME_CLASSES:
        named = f"runtimeClassName {rc!r}" if rc else "no runtimeClassName"
        raise Unsupported(
            "UnsupportedRuntime",
            f"the pod has {named}: this node (cove) runs only pods with runtimeClassName "
            + " or ".join(sorted(RUNTIME_CLASSES)),
        )
    if len(spec.containers) != 1 or spec.initContainers:
        raise Unsupported(
            "UnsupportedSpec",
            "cove runs a pod as one sandbox: give exactly one container and no initContainers",
        )
    c = spec.containers[0]
    env: dict[str, str] = {}
    for var in c.env or []:
        if var.valueFrom is not None:
            raise Unsupported(
                "UnsupportedSpec",
                f"container {c.name}: env {var.name} uses valueFrom, which cove does not resolve: give a value",
            )
        env[var.name] = var.value or ""
    if c.envFrom:
        raise Unsupported("UnsupportedSpec", f"container {c.name}: envFrom is not supported: give env values")
    limits = (c.resources.limits if c.resources else None) or {}
    try:
        cpu = parse_quantity(limits["cpu"]) if "cpu" in limits else None
        memory_mb = math.floor(parse_quantity(limits["memory"]) / 2**20) if "memory" in limits else None
    except ValueError as e:
        raise Unsupported("SandboxFailed", f"container {c.name}: resources.limits: {e}") from e
    annotations = meta.annotations or {}
    argv = [*(c.command or []), *(c.args or [])] or None
    try:
        req = CreateSandbox(
            template=annotations.get(ANNOTATION_TEMPLATE, "base"),
            env=env,
            workdir=c.workingDir,
            cpu=cpu,
            memory_mb=memory_mb,
            timeout=0,  # never: the pod's lifetime is Kubernetes'
            metadata={
                "k8s.namespace": meta.namespace,
                "k8s.pod": meta.name,
                "k8s.uid": meta.uid,
                "k8s.node": node,  # which kubelet owns it (its start-up sweep looks only at its own)
            },
            runtime=RUNTIME_CLASSES[rc],
        )
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise Unsupported("SandboxFailed", f"the pod does not make a valid sandbox: {problems}") from e
    return req, argv


@dataclass
class _Pod:
    """What the kubelet knows of one pod (by uid) and the one worker that acts on it."""

    uid: str
    pod: Pod
    sandbox: str | None = None  # its sandbox's id, once made or found
    looked_up: bool = False  # the store was searched for a sandbox of this uid
    done: bool = False  # a terminal phase was written (or seen): no more status to write
    ended: bool = False  # its sandbox was ended (or found ended)
    gone: bool = False  # the pod object no longer exists
    pending: bool = True  # something changed since the worker last looked
    worker: asyncio.Task[None] | None = field(default=None, repr=False)
    started_at: str = ""

    @property
    def key(self) -> str:
        return f"{self.pod.metadata.namespace}/{self.pod.metadata.name}"


class Kubelet:
    def __init__(self, cove: Cove, kubeconfig: str) -> None:
        self.cove = cove
        self.kubeconfig = kubeconfig  # a path, or "in-cluster" (the pod's service account)
        self.name = ""  # the Node's name: this server's node id, known once the fleet has started
        self.address = self._address()
        self.client: AsyncClient | None = None
        self._pods: dict[str, _Pod] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = asyncio.Event()
        self._ready_since: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def _config(self) -> KubeConfig:
        if self.kubeconfig == "in-cluster":
            return KubeConfig.from_service_account()
        return KubeConfig.from_file(self.kubeconfig)

    def _address(self) -> str:
        """The node's address: the host of COVE_NODE_ADVERTISE, else the API's listening address if it is
        a concrete one, else loopback. Sandboxes have no IP of their own: pods report this one."""
        s = self.cove.settings
        for candidate in (s.node_advertise.rsplit(":", 1)[0] if s.node_advertise else None, s.host):
            host = (candidate or "").strip("[]")
            if host and host not in ("0.0.0.0", "::", "localhost"):
                with contextlib.suppress(OSError):
                    return socket.getaddrinfo(host, None)[0][4][0]
        return "127.0.0.1"

    async def start(self) -> None:
        """Connects and returns; registration and the loops go on in the background (a cluster that is
        down delays them, never the server's own start). A kubeconfig that cannot be read fails here."""
        # lightkube's HTTP client logs every request at INFO (a Lease renewal each 2 s): quiet it, as
        # cove's logging setup quiets httpx.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        self.client = AsyncClient(self._config(), field_manager=COMPONENT, namespace="default")
        self.name = self.cove.fleet.id
        if self.cove.fleet.shared:
            log.warning(
                "kubelet with a shared store: cove's own placement may start a pod's sandbox on another "
                "node than the one kube-scheduler chose (docs/kubernetes.md)",
                extra={"node": self.name},
            )
        self._tasks = [
            asyncio.create_task(self._registration(), name="kubelet-register"),
            asyncio.create_task(self._lease_loop(), name="kubelet-lease"),
            asyncio.create_task(self._status_loop(), name="kubelet-status"),
            asyncio.create_task(self._pods_loop(), name="kubelet-pods"),
            asyncio.create_task(self._poll_loop(), name="kubelet-poll"),
        ]
        log.info("kubelet started", extra={"node": self.name, "address": self.address})

    async def close(self) -> None:
        """Stops every task; leaves the sandboxes, the pods and the Node as they are (the node goes
        NotReady when its Lease runs out, as with a kubelet that stops)."""
        tasks = self._tasks + [p.worker for p in self._pods.values() if p.worker]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def _retrying(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Runs `step()` until it succeeds, backing off (1 s doubling to 30 s) after each failure."""
        delay = 1.0
        while True:
            try:
                await step()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("kubelet: %s failed, retrying in %.0f s", what, delay, extra={"error": str(e)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    # --- the node ------------------------------------------------------------------------------------------

    def _node_body(self) -> dict[str, Any]:
        cpus = os.cpu_count() or 1
        memory_kib = _meminfo_kib()
        # cove's admission refuses creates below this much free memory: it is not the pods'.
        reserved_kib = self.cove.settings.admit_min_memory_mb * 1024
        labels: dict[str, str | None] = {
            "type": "virtual-kubelet",
            "kubernetes.io/role": "agent",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": _arch(),
            NODE_LABEL: "true",
            GVISOR_LABEL: "true" if self.cove.node.runtime_problem("gvisor") is None else None,
        }
        return {
            "metadata": {"name": self.name, "labels": labels},
            "status": {
                "capacity": {"cpu": str(cpus), "memory": f"{memory_kib}Ki", "pods": str(MAX_PODS)},
                "allocatable": {
                    "cpu": str(cpus),
                    "memory": f"{max(memory_kib - reserved_kib, 0)}Ki",
                    "pods": str(MAX_PODS),
                },
                "nodeInfo": {
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": KUBELET_VERSION,
                    "operatingSystem": "linux",
                    "architecture": _arch(),
                    "kernelVersion": platform.release(),
                    "osImage": platform.platform(terse=True),
                    "containerRuntimeVersion": f"cove://{__version__}",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
                "addresses": [
                    {"type": "InternalIP", "address": self.address},
                    {"type": "Hostname", "address": socket.gethostname()},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},  # no kubelet API: logs/exec are cove's
            },
        }

    def _ready_condition(self, since: str) -> dict[str, str]:
        return {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "cove is running sandboxes",
            "lastHeartbeatTime": _time(),
            "lastTransitionTime": since,
        }

    async def _registration(self) -> None:
        await self._retrying("node registration", self._register)
        await self._retrying("RuntimeClasses", self._ensure_runtime_classes)

    async def _register(self) -> None:
        """Creates the Node (status included, as kubelet does), or brings an existing one up to date:
        labels, the taint (kept alongside the controllers' own), status."""
        assert self.client is not None
        body = self._node_body()
        try:
            await self.client.get(Node, self.name)
        except KubeError as e:
            if e.status.code != 404:
                raise
            body["metadata"]["labels"] = {k: v for k, v in body["metadata"]["labels"].items() if v}
            self._ready_since = _time()
            body["status"]["conditions"] = [self._ready_condition(self._ready_since)]
            node = Node.from_dict({**body, "spec": {"taints": [TAINT]}})
            await self.client.create(node)
            log.info("node registered", extra={"node": self.name})
        else:
            await self._ensure_taint()
            await self.client.patch(
                Node, self.name, {"metadata": body["metadata"]}, patch_type=PatchType.MERGE
            )
            await self._patch_node_status(body["status"])
            log.info("node re-registered", extra={"node": self.name})
        self._registered.set()

    async def _ensure_taint(self) -> None:
        assert self.client is not None
        while True:
            node = await self.client.get(Node, self.name)
            taints = [t.to_dict() for t in (node.spec.taints or [])]
            if any(t.get("key") == TAINT["key"] and t.get("effect") == TAINT["effect"] for t in taints):
                return
            patch = {"metadata": {"resourceVersion": node.metadata.resourceVersion}, "spec": {"taints": [*taints, TAINT]}}  # fmt: skip
            try:  # the resourceVersion makes it a compare-and-set: the controllers taint nodes too
                await self.client.patch(Node, self.name, patch, patch_type=PatchType.MERGE)
                return
            except KubeError as e:
                if e.status.code != 409:
                    raise

    async def _patch_node_status(self, status: dict[str, Any] | None = None) -> None:
        """The Ready heartbeat (conditions merge by type), with `status`'s other fields if given."""
        assert self.client is not None
        node = await self.client.get(Node, self.name)
        ready = (
            next((c for c in (node.status.conditions or []) if c.type == "Ready"), None)
            if node.status
            else None
        )
        if ready is None or ready.status != "True":
            self._ready_since = _time()  # it becomes Ready now (again, after the controller saw it silent)
        elif self._ready_since is None:  # Ready already (this server restarted quickly): since then
            since = ready.lastTransitionTime
            self._ready_since = _time(since.timestamp()) if since else _time()
        body = {**(status or {}), "conditions": [self._ready_condition(self._ready_since)]}
        await self.client.patch(Node.Status, self.name, {"status": body})

    async def _ensure_runtime_classes(self) -> None:
        """Creates cove's RuntimeClasses if they are missing (an install may have made them already)."""
        assert self.client is not None
        for name, handler in RUNTIME_CLASSES.items():
            selector = {NODE_LABEL: "true", **({GVISOR_LABEL: "true"} if handler == "gvisor" else {})}
            toleration = {"operator": "Equal", **TAINT}
            rc = RuntimeClass.from_dict({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": COMPONENT}},
                "handler": handler,
                "scheduling": {"nodeSelector": selector, "tolerations": [toleration]},
            })  # fmt: skip
            try:  # looked up first: an install that made them may grant no `create`
                await self.client.get(RuntimeClass, name)
                continue
            except KubeError as e:
                if e.status.code != 404:
                    raise
            try:
                await self.client.create(rc)
                log.info("RuntimeClass created", extra={"runtime_class": name})
            except KubeError as e:
                if e.status.code != 409:  # 409: another node made it meanwhile
                    raise

    async def _lease_loop(self) -> None:
        await self._registered.wait()
        while True:
            try:
                await self._renew_lease()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("kubelet: lease renewal failed", extra={"error": str(e)})
            await asyncio.sleep(LEASE_S)

    async def _renew_lease(self) -> None:
        assert self.client is not None
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": _micro_time(),
        }
        try:
            await self.client.patch(
                Lease, self.name, {"spec": spec}, namespace=LEASE_NAMESPACE, patch_type=PatchType.MERGE
            )
        except KubeError as e:
            if e.status.code != 404:
                raise
            node = await self.client.get(Node, self.name)
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node.metadata.uid}
            meta = {"name": self.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]}
            # The owner reference: the garbage collector deletes the Lease with its Node.
            await self.client.create(Lease.from_dict({"metadata": meta, "spec": spec}))

    async def _status_loop(self) -> None:
        await self._registered.wait()
        while True:
            await asyncio.sleep(STATUS_S)
            try:
                await self._patch_node_status()
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status.code == 404:  # someone deleted the Node: register it again, as kubelet does
                    log.warning("node deleted: registering it again", extra={"node": self.name})
                    self._registered.clear()
                    await self._retrying("node registration", self._register)
                else:
                    log.warning("kubelet: node status failed", extra={"error": str(e)})
            except Exception as e:
                log.warning("kubelet: node status failed", extra={"error": str(e)})

    # --- the pods: list, watch, sweep ---------------------------------------------------------------------

    async def _pods_loop(self) -> None:
        """List the node's pods, then watch from that version; on 410 Gone list again, on any other failure
        back off and watch again from the last version seen (the events missed are replayed)."""
        await self._registered.wait()
        assert self.client is not None
        fields = {"spec.nodeName": self.name}
        version: str | None = None
        delay = 1.0
        while True:
            try:
                if version is None:
                    version = await self._relist()
                async for kind, pod in self.client.watch(
                    Pod, namespace="*", fields=fields, resource_version=version, server_timeout=300
                ):
                    version = pod.metadata.resourceVersion
                    delay = 1.0
                    self._on_pod(kind, pod)
            except asyncio.CancelledError:
                raise
            except KubeError as e:
                if e.status.code == 410:
                    log.info("pod watch expired: listing again", extra={"node": self.name})
                    version = None
                    continue
                log.warning("kubelet: pod watch failed", extra={"error": str(e), "retry_s": delay})
            except Exception as e:
                log.warning("kubelet: pod watch failed", extra={"error": str(e), "retry_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _relist(self) -> str:
        """Every pod bound here, each handed to its worker; then the pods known but no longer there are
        gone, and the sandboxes of this node's pods that no longer exist are ended. Its resourceVersion."""
        assert self.client is not None
        listing = self.client.list(Pod, namespace="*", fields={"spec.nodeName": self.name})
        pods = [p async for p in listing]
        version = listing.resourceVersion
        uids = {p.metadata.uid for p in pods}
        for pod in pods:
            self._on_pod("ADDED", pod)
        for uid, p in list(self._pods.items()):
            if uid not in uids:
                self._on_pod("DELETED", p.pod)
        page = await self.cove.store.list_sandboxes(
            None, list(LIVE), {"k8s.node": self.name}, limit=1_000_000
        )
        for rec in page.items:
            uid = rec.metadata.get("k8s.uid", "")
            if uid not in uids and uid not in self._pods:
                log.info(
                    "pod gone: ending its sandbox",
                    extra={"sandbox": rec.id, "pod": rec.metadata.get("k8s.pod")},
                )
                await self._end(rec, "pod deleted")
        return version

    async def _poll_loop(self) -> None:
        """Every POLL_S each pod's worker looks at its sandbox: ended by itself, or its command exited."""
        while True:
            await asyncio.sleep(POLL_S)
            for p in list(self._pods.values()):
                if p.sandbox and not (p.done and p.ended):
                    self._wake(p)

    def _on_pod(self, kind: str, pod: Pod) -> None:
        uid = pod.metadata.uid
        p = self._pods.get(uid)
        if p is None:  # also for a pod first seen deleted: its sandbox, if any, is ended
            p = self._pods[uid] = _Pod(uid=uid, pod=pod)
        p.pod = pod
        if kind == "DELETED":
            p.gone = True
        self._wake(p)

    def _wake(self, p: _Pod) -> None:
        p.pending = True
        if p.worker is None or p.worker.done():
            p.worker = asyncio.create_task(self._work(p), name=f"kubelet-pod-{p.uid}")

    async def _work(self, p: _Pod) -> None:
        while p.pending:
            p.pending = False
            try:
                await self._sync(p)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the next event or poll tries again
                log.warning("kubelet: pod sync failed", extra={"pod": p.key, "error": repr(e)})
        if p.gone:
            self._pods.pop(p.uid, None)

    # --- one pod -------------------------------------------------------------------------------------------

    async def _sync(self, p: _Pod) -> None:
        pod = p.pod
        if not p.looked_up:
            rec = await self._find_sandbox(p)
            p.looked_up = True
            if rec is not None:
                p.sandbox = rec.id
        if p.gone:
            p.done = True
            await self._end_of(p, "pod deleted")
            return
        if pod.metadata.deletionTimestamp is not None:
            # The kubelet's part of a graceful deletion: stop what runs, then remove the object.
            p.done = True
            await self._end_of(p, "pod deleted")
            assert self.client is not None
            # 404: removed already. (Without a uid precondition, which lightkube's delete cannot send: a
            # pod that is being deleted cannot have a namesake yet, and only this node removes it.)
            with contextlib.suppress(KubeError):
                await self.client.delete(
                    Pod, pod.metadata.name, namespace=pod.metadata.namespace, grace_period=0
                )
            log.info("pod deleted", extra={"pod": p.key, "sandbox": p.sandbox})
            return
        phase = pod.status.phase if pod.status else None
        if p.done or phase in ("Succeeded", "Failed"):
            p.done = True
            # A finished pod holds nothing (cove may have stopped between its status and the kill).
            if not p.ended:
                await self._end_of(p, f"the pod is {phase or 'finished'}")
            return
        if p.sandbox is None:
            if phase == "Running" or (pod.metadata.annotations or {}).get(ANNOTATION_SANDBOX):
                await self._fail(p, "SandboxLost", "the pod's sandbox is not in this node's store any more")
                return
            await self._start(p)
            return
        rec = await self.cove.store.get_sandbox(p.sandbox)
        if rec is None or rec.state not in LIVE:
            await self._sandbox_ended(p, rec)
            return
        c = pod.spec.containers[0]
        if rec.state == "running" and (c.command or c.args):
            exited = await self._main_exit(rec)
            if exited is not None:
                await self._command_exited(p, *exited)
                return
        if not self._reported(pod, rec):
            await self._report_running(p, rec)

    async def _find_sandbox(self, p: _Pod) -> SandboxRecord | None:
        """The sandbox made for this pod before (by uid), e.g. by this kubelet before a restart."""
        page = await self.cove.store.list_sandboxes(None, None, {"k8s.uid": p.uid}, limit=100)
        recs = sorted(page.items, key=lambda r: r.created_at)
        live = [r for r in recs if r.state in LIVE]
        return (live or recs or [None])[-1]

    async def _start(self, p: _Pod) -> None:
        pod = p.pod
        try:
            req, argv = sandbox_request(pod, self.name)
            tenant = await self._tenant(pod.metadata.namespace)
        except Unsupported as e:
            await self._fail(p, e.reason, e.message)
            return
        started = time.perf_counter()
        try:
            rec = await self.cove.service.create(Caller(key_id="kubelet", tenant=tenant, admin=False), req)
        except ApiError as e:
            await self._fail(p, "SandboxFailed", f"the sandbox could not be created: {e.code}: {e.message}")
            return
        p.sandbox = rec.id  # from here on, a failure is retried by the next wake-up
        if argv:
            try:
                await self.cove.service.guest(rec).spawn(
                    argv=argv, user=rec.user, cwd=rec.workdir, tag=MAIN_TAG
                )
            except (GuestError, GuestUnavailable) as e:
                await self._end(rec, "the pod's command could not start")
                await self._fail(p, "SandboxFailed", f"the command {argv!r} could not start: {e}")
                return
        await self._report_running(p, rec)
        log.info(
            "pod running",
            extra={"pod": p.key, "sandbox": rec.id, "tenant": tenant, "ms": round((time.perf_counter() - started) * 1000)},
        )  # fmt: skip

    async def _tenant(self, namespace: str) -> str:
        assert self.client is not None
        ns = await self.client.get(Namespace, namespace)
        return (ns.metadata.annotations or {}).get(ANNOTATION_TENANT) or "default"

    async def _main_exit(self, rec: SandboxRecord) -> tuple[int, float | None] | None:
        """(exit code, end time) once the pod's command has exited; None while it runs (or unknown)."""
        try:
            procs = await self.cove.service.guest(rec).processes()
        except (GuestError, GuestUnavailable):
            return None  # a sandbox that died is the reaper's to mark; the next poll sees it
        mains = [pr for pr in procs if pr.get("tag") == MAIN_TAG]
        if not mains or any(pr.get("running") for pr in mains):
            return None
        last = max(mains, key=lambda pr: pr.get("started_at") or 0)
        code = last.get("exit_code")
        return (code if code is not None else -1), last.get("ended_at")

    def _reported(self, pod: Pod, rec: SandboxRecord) -> bool:
        """Does the pod show what this node reports of a running sandbox (its annotation, Running, Ready)?
        The node-lifecycle controller sets Ready False while the node is unreachable: this writes it back."""
        status = pod.status
        if (pod.metadata.annotations or {}).get(ANNOTATION_SANDBOX) != rec.id:
            return False
        if status is None or status.phase != "Running":
            return False
        ready = next((c for c in (status.conditions or []) if c.type == "Ready"), None)
        return ready is not None and ready.status == "True" and bool(status.containerStatuses)

    async def _report_running(self, p: _Pod, rec: SandboxRecord) -> None:
        """The annotation naming the sandbox (first: whoever sees the pod Running finds it), then the status."""
        pod = p.pod
        assert self.client is not None
        if (pod.metadata.annotations or {}).get(ANNOTATION_SANDBOX) != rec.id:
            # The uid is a precondition (as kubelet's status patches carry it): never a namesake's pod.
            annotations = {"metadata": {"uid": pod.metadata.uid, "annotations": {ANNOTATION_SANDBOX: rec.id}}}
            await self.client.patch(Pod, pod.metadata.name, annotations, namespace=pod.metadata.namespace, patch_type=PatchType.MERGE)  # fmt: skip
        c = pod.spec.containers[0]
        started = _time(rec.created_at)
        now = _time()
        conditions = [
            {"type": t, "status": "True", "lastTransitionTime": now}
            for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]
        status = {
            "phase": "Running",
            "startTime": started,
            "hostIP": self.address,
            "podIP": self.address,  # sandboxes have no IP of their own: they are reached through the node
            "podIPs": [{"ip": self.address}],
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image or "",
                    "imageID": f"cove://template/{rec.template}",
                    "containerID": f"cove://{rec.id}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        }
        await self._patch_status(pod, status)

    async def _sandbox_ended(self, p: _Pod, rec: SandboxRecord | None) -> None:
        """The sandbox ended without the pod's deletion: killed through cove's API, failed, or its node lost."""
        state = rec.state if rec else "gone"
        reason = {"killed": "SandboxKilled", "error": "SandboxError", "lost": "SandboxLost"}.get(
            state, "SandboxLost"
        )
        why = f" ({rec.end_reason})" if rec and rec.end_reason else ""
        message = f"sandbox {p.sandbox} is {state}{why}"
        await self._terminate(
            p, "Failed", reason, message, exit_code=137, finished=rec.updated_at if rec else None
        )

    async def _command_exited(self, p: _Pod, code: int, ended_at: float | None) -> None:
        """The pod's command has exited: the pod is Succeeded for exit code 0, Failed otherwise, and its
        sandbox is ended (its work is done). The status first: a failure to write it is retried by the next
        poll, which finds the command exited again (ended first, the sandbox would read as killed)."""
        ok = code == 0
        message = f"the command exited with status {code}"
        await self._terminate(
            p, "Succeeded" if ok else "Failed", "Completed" if ok else "Error", message, code, ended_at
        )
        await self._end_of(p, f"the pod's command exited with status {code}")

    async def _terminate(
        self, p: _Pod, phase: str, reason: str, message: str, exit_code: int, finished: float | None
    ) -> None:
        pod = p.pod
        c = pod.spec.containers[0]
        started = pod.status.startTime if pod.status and pod.status.startTime else None
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "message": message,
            "finishedAt": _time(finished),
            "startedAt": _time(started.timestamp()) if started else _time(finished),
            "containerID": f"cove://{p.sandbox}",
        }
        status = {
            "phase": phase,
            "reason": reason,
            "message": message,
            "conditions": [
                {"type": t, "status": "False", "reason": reason, "lastTransitionTime": _time()}
                for t in ("Ready", "ContainersReady")
            ],
            "containerStatuses": [
                {
                    "name": c.name,
                    "image": c.image or "",
                    "imageID": "",
                    "containerID": f"cove://{p.sandbox}",
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        await self._patch_status(pod, status)
        p.done = True
        if phase == "Failed":
            await self._event(pod, reason, message)
        log.info("pod %s", phase.lower(), extra={"pod": p.key, "sandbox": p.sandbox, "reason": reason})

    async def _fail(self, p: _Pod, reason: str, message: str) -> None:
        """The pod cannot run here (nothing started, or what started was ended): Failed, with an Event."""
        status = {
            "phase": "Failed",
            "reason": reason,
            "message": message,
            "conditions": [
                {"type": t, "status": "False", "reason": reason, "lastTransitionTime": _time()}
                for t in ("Ready", "ContainersReady")
            ],
        }
        await self._patch_status(p.pod, status)
        p.done = True
        await self._event(p.pod, reason, message)
        log.info("pod failed", extra={"pod": p.key, "reason": reason, "detail": message})

    async def _patch_status(self, pod: Pod, status: dict[str, Any]) -> None:
        assert self.client is not None
        # A strategic merge: conditions merge by type (the scheduler's PodScheduled stays). The uid is a
        # precondition, as in kubelet's own status patches: a newer pod of the same name is left alone.
        p = await self.client.patch(
            Pod.Status,
            pod.metadata.name,
            {"metadata": {"uid": pod.metadata.uid}, "status": status},
            namespace=pod.metadata.namespace,
        )
        uid = pod.metadata.uid
        if uid in self._pods and p.metadata and p.metadata.uid == uid:
            self._pods[uid].pod = p  # what the API server now holds (the watch event follows)

    async def _event(self, pod: Pod, reason: str, message: str) -> None:
        """A Warning Event on the pod (what `kubectl describe pod` shows)."""
        assert self.client is not None
        now = _time()
        meta = pod.metadata
        event = Event.from_dict({
            "metadata": {"name": f"{meta.name}.{secrets.token_hex(8)}", "namespace": meta.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": meta.namespace, "name": meta.name,
                               "uid": meta.uid, "resourceVersion": meta.resourceVersion},
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": COMPONENT, "host": self.name},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        })  # fmt: skip
        try:
            await self.client.create(event)
        except KubeError as e:  # an Event is a courtesy: its failure changes nothing
            log.warning("kubelet: event not recorded", extra={"error": str(e)})

    async def _end_of(self, p: _Pod, reason: str) -> None:
        """Ends the pod's sandbox, if it has one still live."""
        if p.sandbox is None:
            p.ended = True
            return
        rec = await self.cove.store.get_sandbox(p.sandbox)
        if rec is not None:
            await self._end(rec, reason)
        p.ended = True

    async def _end(self, rec: SandboxRecord, reason: str) -> None:
        if rec.state in LIVE:
            await self.cove.service.end(rec, "killed", reason)
