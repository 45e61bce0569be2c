"""The in-process node: this host runs the sandboxes itself (the single-machine deployment).

`LocalNode` picks the runtime of each call (the spec's, or the one a sandbox was started with) and
keeps the guest connections; its parts (`LocalVolumes`, `LocalSnapshots`, `LocalCheckpoints`,
`LocalContexts`) run the stores' blocking work in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cove.config import Settings
from cove.network import sandbox_socket
from cove.network.egress import Egress, parse_hosts
from cove.network.egress_policy import Policy
from cove.network.transparent import Transparent
from cove.node import checkpoint
from cove.node.base import Handle, NodeAgent, NodeError, SandboxSpec, Seal, TemplateSpec
from cove.node.durable import LocalDurable
from cove.node.guest_client import GuestClient, Idle
from cove.node.gvisor.runtime import GvisorRuntime
from cove.node.microvm.runtime import detect as detect_microvm
from cove.node.namespaces import bucket_mounts, cgroups
from cove.node.namespaces.host import SandboxHost
from cove.node.namespaces.runtime import NamespacesRuntime
from cove.node.runtimes import Checkpointer, Runtime
from cove.node.template_storage import TemplateStorage
from cove.storage import base_template, kernel_layer
from cove.storage.layers import LayerStore, open_storage
from cove.storage.objects import (
    AccessDenied,
    BucketNotFound,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreSettings,
)
from cove.storage.volumes import VolumeStore

log = logging.getLogger("cove.node")


class LocalVolumes:
    def __init__(self, host: SandboxHost) -> None:
        self.store: VolumeStore = host.volumes
        self.host = host
        uid = host.settings.uid_base + 1000  # the base template's `user`: it can write the volume
        self._owner = (uid, uid)

    @property
    def limits(self) -> bool:
        return self.store.can_limit

    async def create(self, volume_id: str, size_mb: int | None) -> None:
        await asyncio.to_thread(self.store.create, volume_id, size_mb, self._owner)

    async def clone(self, sealed_id: str, volume_id: str, size_mb: int | None) -> None:
        await asyncio.to_thread(self.store.clone_sealed, sealed_id, volume_id, size_mb)

    async def delete(self, volume_id: str) -> None:
        await asyncio.to_thread(self.store.delete, volume_id)

    async def delete_sealed(self, sealed_ids: list[str]) -> None:
        def drop() -> None:
            for sealed_id in sealed_ids:
                self.store.delete_sealed(sealed_id)

        await asyncio.to_thread(drop)

    async def ids(self) -> tuple[set[str], set[str]]:
        return await asyncio.to_thread(lambda: (self.store.ids(), self.store.sealed_ids()))

    def content_path(self, volume_id: str) -> str | None:
        path = self.store.path(volume_id)
        return str(path) if path.is_dir() else None

    def buckets_available(self) -> bool:
        return bucket_mounts.available()

    async def buckets_healthy(self, sandbox_id: str, indices: list[int]) -> list[bool]:
        sdir = self.host.sandbox_dir(sandbox_id)

        def check() -> list[bool]:
            bucket_mounts.reap()
            return [bucket_mounts.healthy(sdir, i) for i in indices]

        return await asyncio.to_thread(check)


class LocalSnapshots:
    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.layers: LayerStore = host.layers
        s = host.settings
        cache = Path(s.debian_cache) if s.debian_cache else s.home / "debian"
        self.templates = TemplateStorage(self.layers, s.uid_base, cache)

    async def commit(self, sandbox_id: str, layer_id: str, seal: Seal = ()) -> str:
        # Every runtime's processes sit in cove's cgroup and write through to the host's upper dir, so
        # one freeze there makes the copy consistent whichever runtime runs the sandbox.
        return await asyncio.to_thread(self.host.commit, sandbox_id, layer_id, seal)

    async def flatten(self, layers: list[str], layer_id: str) -> str:
        return await asyncio.to_thread(self.layers.flatten, layers, layer_id)

    async def collect(self, keep: set[str]) -> list[str]:
        def collect() -> list[str]:
            unused = sorted(self.layers.layer_ids() - keep)
            for layer_id in unused:
                self.layers.remove_layer(layer_id)
            return unused

        return await asyncio.to_thread(collect)


class LocalCheckpoints:
    def __init__(self, node: LocalNode) -> None:
        self.node = node
        self.host = node.host

    def available(self, runtime: str = "namespaces") -> bool:
        rt = self.node.runtimes.get(runtime)
        return rt is not None and rt.checkpointer is not None

    def _of(self, runtime: Runtime) -> Checkpointer:
        if runtime.checkpointer is None:
            raise NodeError(f"the {runtime.name} runtime cannot checkpoint processes on this node")
        return runtime.checkpointer

    async def hibernate(self, sandbox_id: str, handle: Handle) -> None:
        checkpointer = self._of(self.node._of(sandbox_id))
        await self.node._forget_connections(sandbox_id, in_use=True)
        # CRIU cannot restore a veth whose other end is in the host's namespace (EPERM from inside
        # the sandbox's user namespace): the link goes before the dump; the attach after the
        # restore (or after a failed dump) makes a new one with the same address.
        await self.node._unplug(sandbox_id)
        await checkpointer.hibernate(sandbox_id, handle)

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: Handle, key: str, layer_id: str, seal: Seal = ()
    ) -> str:
        checkpointer = self._of(self.node._of(sandbox_id))
        await self.node._forget_connections(sandbox_id, in_use=True)
        plugged = await self.node._unplug(sandbox_id)  # as for hibernate; back once it is dumped
        try:
            return await checkpointer.snapshot_with_memory(sandbox_id, handle, key, layer_id, seal)
        finally:
            if plugged:
                await self.node._replug(sandbox_id)

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> Handle:
        return await self._of(self.node._for(spec)).restore(spec, key, resume)

    async def has(self, key: str) -> bool:
        return await asyncio.to_thread(checkpoint.complete, self.host.checkpoint_dir(key))

    async def drop(self, key: str) -> None:
        def drop() -> None:
            checkpoint.release(self.host.checkpoint_dir(key))
            shutil.rmtree(self.host.checkpoint_dir(key), ignore_errors=True)

        await asyncio.to_thread(drop)

    async def keys(self) -> set[str]:
        root = self.host.checkpoint_dir("")
        return await asyncio.to_thread(lambda: {p.name for p in root.iterdir()} if root.is_dir() else set())


class LocalContexts:
    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.status = "not started"
        self._build: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Code contexts need a Python environment with ipykernel; building it takes a while the
        first time (pip), so it happens in the background and sandboxes get it once it is there."""
        s = self.host.settings
        if not s.kernel:
            self.status = "disabled (COVE_KERNEL=0)"
            return
        cache = Path(s.kernel_cache) if s.kernel_cache else s.home / "kernel"
        ready = cache / kernel_layer.recipe_digest() / kernel_layer.LAYER_SUBDIR
        if (ready / "bin" / "python").exists():
            self.host.kernel_env = ready
            self.status = "ready"
            return

        async def build() -> None:
            try:
                root = await asyncio.to_thread(kernel_layer.build_cached, cache)
            except Exception as e:
                self.status = f"unavailable: building the kernel environment failed: {e}"[:500]
                log.warning("kernel environment build failed", extra={"error": str(e)})
                return
            self.host.kernel_env = root / kernel_layer.LAYER_SUBDIR
            self.status = "ready"
            log.info("kernel environment ready", extra={"path": str(root)})

        self.status = "building (the first start installs ipykernel; sandboxes started after it get it)"
        self._build = asyncio.create_task(build())

    async def prepare(self, sandbox_id: str, context_id: str, user: str) -> str:
        return await asyncio.to_thread(self.host.prepare_context, sandbox_id, context_id, user)

    def client(self, sandbox_id: str, context_id: str) -> GuestClient:
        return GuestClient(self.host.context_socket(sandbox_id, context_id))


class LocalNetwork:
    """Each sandbox's way out, served from this process: the egress proxy in its namespace
    (`cove.network.egress`) or transparent egress (`cove.network.transparent`, COVE_EGRESS); and
    ports reached by entering the sandbox's namespace (`cove.network.sandbox_socket`)."""

    def __init__(self, egress: Egress | Transparent) -> None:
        self.egress = egress

    async def attach(self, sandbox_id: str, handle: Handle, network: dict[str, Any]) -> None:
        await self.egress.attach(sandbox_id, handle, Policy.of_record(network))

    async def detach(self, sandbox_id: str, forget: bool = False) -> None:
        await self.egress.detach(sandbox_id, forget)

    async def set_policy(self, sandbox_id: str, network: dict[str, Any]) -> None:
        if isinstance(self.egress, Transparent):
            await self.egress.set_policy(sandbox_id, Policy.of_record(network))
        else:
            self.egress.set_policy(sandbox_id, Policy.of_record(network))

    async def status(self, sandbox_id: str) -> dict[str, Any]:
        return self.egress.status(sandbox_id)

    async def connect(self, sandbox_id: str, handle: Handle, port: int) -> socket.socket:
        return await sandbox_socket.connect(handle, port)


class LocalNode(NodeAgent):
    host: SandboxHost
    runtimes: dict[str, Runtime]
    volumes: LocalVolumes
    snapshots: LocalSnapshots
    checkpoints: LocalCheckpoints
    contexts: LocalContexts
    network: LocalNetwork
    durable: LocalDurable

    def __init__(self, settings: Settings, on_egress: Callable[[str], None] | None = None) -> None:
        """`on_egress`: called with each egress connection's result (allowed, denied…), for metrics."""
        self.settings = settings
        # Each running sandbox's way out (docs/network.md): a proxy listening in its namespace, or
        # a veth whose every packet host-side nftables judge.
        hosts = parse_hosts(settings.egress_hosts)
        if settings.egress_mode == "transparent":
            self.network = LocalNetwork(
                Transparent(
                    settings.home,
                    hosts,
                    lambda sid: self.host.sandbox_dir(sid) / "rootfs",
                    subnet=settings.egress_subnet,
                    upstream=settings.egress_dns,
                    rate=settings.egress_rate,
                    connections=settings.egress_connections,
                    on_result=on_egress,
                )
            )
        elif settings.egress_mode == "proxy":
            self.network = LocalNetwork(Egress(settings.egress_port, hosts, settings.port, on_egress))
        else:
            raise ValueError(f"COVE_EGRESS: {settings.egress_mode!r} is not proxy or transparent")
        self._base: TemplateSpec | None = None
        self.idle = Idle()  # guest connections kept between operations (docs/guest-protocol.md)

    def _object_store(self) -> ObjectStore | None:
        """The bucket durable copies go to (COVE_OBJECT_STORE), checked now so that a wrong name or
        key is reported at start; an endpoint down now is only warned about (it may come back)."""
        s = self.settings
        if not s.object_store:
            return None
        env = {**os.environ, "COVE_OBJECT_STORE": s.object_store, "COVE_HOME": str(s.home)}
        store = ObjectStore(ObjectStoreSettings.from_env(env))  # ConfigError: a bad URL or setting
        try:
            store.check()
        except (AccessDenied, BucketNotFound):
            raise
        except ObjectStoreError as e:
            log.warning("the object store does not answer now", extra={"error": str(e)})
        log.info("object store", extra={"url": s.object_store})
        return store

    async def start(self) -> None:
        s = self.settings
        layers = await asyncio.to_thread(open_storage, s.home, s.storage_backend, s.storage_image_size)
        self.host = host = SandboxHost(s, layers)
        # A server that died mid-operation (docs/faults.md): its CRIU runs finish before adoption
        # looks at the sandboxes they work on, and its half-made layers go.
        if stray := await asyncio.to_thread(checkpoint.wait_stray, host.checkpoint_dir("")):
            log.warning("waited for checkpoints a previous server started", extra={"pids": stray})
        if scratch := await asyncio.to_thread(layers.sweep_scratch):
            log.warning("removed interrupted layer work", extra={"paths": scratch})
        namespaces, gvisor = NamespacesRuntime(host), GvisorRuntime(host)
        self.runtimes = {namespaces.name: namespaces, gvisor.name: gvisor}
        self._microvm_problem = detect_microvm()[1]
        self.volumes = LocalVolumes(host)
        self.snapshots = LocalSnapshots(host)
        self.checkpoints = LocalCheckpoints(self)
        self.contexts = LocalContexts(host)
        self.durable = LocalDurable(host, await asyncio.to_thread(self._object_store))
        if await asyncio.to_thread(cgroups.favor_dynmods):
            log.info("cgroup task migrations are cheap (favordynmods)")
        await self.base_template()
        for runtime in self.runtimes.values():
            if runtime.available:
                await runtime.start()
        self.contexts.start()
        log.info(
            "node ready",
            extra={
                "storage": layers.backend.name,
                "checkpoint": f"criu {'.'.join(map(str, checkpoint.criu_version() or ()))}"
                if namespaces.checkpointer
                else "unavailable",
            },
        )

    # -- runtimes (docs/runtimes.md) -------------------------------------------------------------
    def runtime_problem(self, runtime: str) -> str | None:
        if runtime == "microvm":
            return f"microvm runtime unavailable on this host: {self._microvm_problem}"
        rt = self.runtimes.get(runtime)
        if rt is None:
            return f"unknown runtime {runtime!r}"
        return None if rt.available else f"{runtime} runtime unavailable on this host: {rt.detail}"

    def egress(self, runtime: str) -> bool:
        rt = self.runtimes.get(runtime)
        return rt is not None and rt.egress

    def _for(self, spec: SandboxSpec) -> Runtime:
        problem = self.runtime_problem(spec.runtime)
        if problem:
            raise NodeError(problem)
        return self.runtimes[spec.runtime]

    def _of(self, sandbox_id: str) -> Runtime:
        """The runtime a sandbox of this node runs on (its directory says which)."""
        return self.runtimes[self.host.runtime_of(sandbox_id)]

    async def base_template(self) -> TemplateSpec:
        if self._base is None:
            layer = await asyncio.to_thread(
                self.host.layers.build, lambda root: base_template.fill(root, self.settings.uid_base)
            )
            self._base = TemplateSpec(name="base", layers=(layer,), config=dict(base_template.CONFIG))
        return self._base

    @property
    def generation(self) -> str:  # type: ignore[override]
        return f"kernel={self.host.kernel_env}"

    # -- lifecycle -------------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> Handle:
        return await self._for(spec).create(spec)

    async def restart(self, spec: SandboxSpec) -> Handle:
        return await self._for(spec).create(spec, resume=True)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await self._of(spec.id).configure(spec, thaw)

    async def _forget_connections(self, sandbox_id: str, wait: bool = True, in_use: bool = False) -> None:
        """Before a sandbox is frozen, dumped, stopped or killed: a kept connection would hold a
        handler (and CRIU cannot dump a socket whose peer is outside the sandbox)."""
        await self.idle.drop(self.host.socket_path(sandbox_id), wait, in_use)

    async def stop(self, sandbox_id: str) -> None:
        await self._forget_connections(sandbox_id, wait=False)
        await self._of(sandbox_id).stop(sandbox_id)

    async def kill(self, sandbox_id: str, handle: Handle | None = None) -> None:
        await self._forget_connections(sandbox_id, wait=False)
        await self._of(sandbox_id).kill(sandbox_id)

    async def pause(self, sandbox_id: str) -> None:
        await self._forget_connections(sandbox_id)
        await self._of(sandbox_id).pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await self._of(sandbox_id).resume(sandbox_id)

    # -- inspect ---------------------------------------------------------------------------------
    async def alive(self, sandbox_id: str, handle: Handle) -> bool:
        return not await self.dead([(sandbox_id, handle)])

    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        # One pass per runtime: the reaper asks about many sandboxes each second. The handle names the
        # runtime, so no sandbox dir is read on the event loop.
        by_runtime: dict[str, list[tuple[str, Handle]]] = {}
        for sid, handle in sandboxes:
            by_runtime.setdefault(handle.get("runtime", "namespaces"), []).append((sid, handle))
        gone: list[str] = []
        for name, group in by_runtime.items():
            runtime = self.runtimes.get(name)
            gone += await runtime.dead(group) if runtime else [sid for sid, _ in group]
        return gone

    async def _unplug(self, sandbox_id: str) -> bool:
        """Take a sandbox's transparent-egress link away for a checkpoint; whether it had one."""
        egress = self.network.egress
        return await egress.unplug(sandbox_id) if isinstance(egress, Transparent) else False

    async def _replug(self, sandbox_id: str) -> None:
        if isinstance(self.network.egress, Transparent):
            await self.network.egress.replug(sandbox_id)

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        stats = await self._of(sandbox_id).stats(sandbox_id)
        egress = self.network.egress.status(sandbox_id)  # its way out: bytes through its proxy
        return {**stats, "net_out_bytes": egress["bytes_out"], "net_in_bytes": egress["bytes_in"]}

    def guest(self, sandbox_id: str) -> GuestClient:
        return GuestClient(self.host.socket_path(sandbox_id), idle=self.idle)

    async def sweep(self, keep: set[str]) -> list[str]:
        stray = sorted((await asyncio.to_thread(self.host.present)) - keep)
        for sandbox_id in stray:
            await self._of(sandbox_id).kill(sandbox_id)
        if isinstance(self.network.egress, Transparent):  # links and chains a crash left
            await asyncio.to_thread(self.network.egress.sweep, keep)
        return stray

    async def close(self) -> None:
        await self.network.egress.close()  # sandboxes keep running; a restart re-opens their proxies
        for runtime in self.runtimes.values():
            await runtime.close()
        if self.durable.store is not None:
            self.durable.store.close()
