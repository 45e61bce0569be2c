"""The in-process node: this host runs the sandboxes itself (the single-machine deployment)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from cove.config import Settings
from cove.node import bucket_mounts, checkpoint
from cove.node.base import NodeAgent, NodeError, SandboxSpec, TemplateSpec
from cove.node.guest_client import GuestClient, Idle
from cove.node.gvisor.runtime import GvisorRuntime, runtime_of
from cove.node.microvm.runtime import MicroVMRuntime
from cove.node.namespaces import cgroups
from cove.node.namespaces.runtime import NamespacesRuntime
from cove.node.template_storage import TemplateStorage
from cove.storage import base_template, kernel_layer
from cove.storage.layers import LayerStore, open_storage

log = logging.getLogger("cove.node")


class LocalNode(NodeAgent):
    layers: LayerStore
    runtime: NamespacesRuntime  # the default; also owns the volumes and storage all runtimes share
    gvisor: GvisorRuntime

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._base: TemplateSpec | None = None
        self.kernel_status = "not started"
        self._kernel_task: asyncio.Task[None] | None = None
        self._templates: TemplateStorage | None = None
        self.idle = Idle()  # guest connections kept between operations (docs/guest-protocol.md)

    async def start(self) -> None:
        s = self.settings
        self.layers = await asyncio.to_thread(open_storage, s.home, s.storage_backend, s.storage_image_size)
        self.runtime = NamespacesRuntime(s, self.layers)
        # A server that died mid-operation (docs/faults.md): its CRIU runs finish before adoption
        # looks at the sandboxes they work on, and its half-made layers go.
        if stray := await asyncio.to_thread(checkpoint.wait_stray, self.runtime.checkpoint_dir("")):
            log.warning("waited for checkpoints a previous server started", extra={"pids": stray})
        if scratch := await asyncio.to_thread(self.layers.sweep_scratch):
            log.warning("removed interrupted layer work", extra={"paths": scratch})
        self.gvisor = GvisorRuntime(s, self.layers)
        self.microvm = MicroVMRuntime()
        if await asyncio.to_thread(cgroups.favor_dynmods):
            log.info("cgroup task migrations are cheap (favordynmods)")
        await self.base_template()
        await self.runtime.start()
        if self.gvisor.available:
            await self.gvisor.start()
        self._start_kernel_env()
        can = checkpoint.available()
        log.info(
            "node ready",
            extra={
                "storage": self.layers.backend.name,
                "checkpoint": f"criu {'.'.join(map(str, checkpoint.criu_version() or ()))}"
                if can
                else "unavailable",
            },
        )

    def _start_kernel_env(self) -> None:
        """Code contexts need a Python environment with ipykernel; building it takes a while the
        first time (pip), so it happens in the background and sandboxes get it once it is there."""
        if not self.settings.kernel:
            self.kernel_status = "disabled (COVE_KERNEL=0)"
            return
        cache = (
            Path(self.settings.kernel_cache) if self.settings.kernel_cache else self.settings.home / "kernel"
        )
        ready = cache / kernel_layer.recipe_digest() / kernel_layer.LAYER_SUBDIR
        if (ready / "bin" / "python").exists():
            self.runtime.kernel_env = self.gvisor.kernel_env = ready
            self.kernel_status = "ready"
            return

        async def build() -> None:
            try:
                root = await asyncio.to_thread(kernel_layer.build_cached, cache)
            except Exception as e:
                self.kernel_status = f"unavailable: building the kernel environment failed: {e}"[:500]
                log.warning("kernel environment build failed", extra={"error": str(e)})
                return
            self.runtime.kernel_env = self.gvisor.kernel_env = root / kernel_layer.LAYER_SUBDIR
            self.kernel_status = "ready"
            log.info("kernel environment ready", extra={"path": str(root)})

        self.kernel_status = (
            "building (the first start installs ipykernel; sandboxes started after it get it)"
        )
        self._kernel_task = asyncio.create_task(build())

    # -- runtimes (docs/runtimes.md) -------------------------------------------------------------
    def runtime_problem(self, runtime: str) -> str | None:
        if runtime == "namespaces":
            return None
        if runtime == "gvisor":
            if self.gvisor.available:
                return None
            return f"gvisor runtime unavailable on this host: {self.gvisor.detail}"
        if runtime == "microvm":
            return f"microvm runtime unavailable on this host: {self.microvm.reason}"
        return f"unknown runtime {runtime!r}"

    def _for(self, spec: SandboxSpec) -> NamespacesRuntime:
        problem = self.runtime_problem(spec.runtime)
        if problem:
            raise NodeError(problem)
        return self.gvisor if spec.runtime == "gvisor" else self.runtime

    def _of(self, sandbox_id: str) -> NamespacesRuntime:
        """The runtime a sandbox of this node runs on (its directory says which)."""
        if runtime_of(self.runtime.sandbox_dir(sandbox_id)) == "gvisor":
            return self.gvisor
        return self.runtime

    async def prepare_context(self, sandbox_id: str, context_id: str, user: str) -> str:
        return await self.runtime.prepare_context(sandbox_id, context_id, user)

    def context_client(self, sandbox_id: str, context_id: str) -> GuestClient:
        return GuestClient(self.runtime.context_socket(sandbox_id, context_id))

    async def base_template(self) -> TemplateSpec:
        if self._base is None:
            layer = await asyncio.to_thread(
                self.layers.build, lambda root: base_template.fill(root, self.settings.uid_base)
            )
            self._base = TemplateSpec(name="base", layers=(layer,), config=dict(base_template.CONFIG))
        return self._base

    async def create(self, spec: SandboxSpec) -> dict[str, Any]:
        return await self._for(spec).create(spec)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await self.runtime.configure(spec, thaw)

    @property
    def generation(self) -> str:  # type: ignore[override]
        return f"kernel={self.runtime.kernel_env}"

    async def _forget_connections(self, sandbox_id: str, wait: bool = True) -> None:
        """Before a sandbox is frozen, dumped, stopped or killed: a kept connection would hold a
        handler (and CRIU cannot dump a socket whose peer is outside the sandbox)."""
        await self.idle.drop(self.runtime.socket_path(sandbox_id), wait)

    async def stop(self, sandbox_id: str) -> None:
        await self._forget_connections(sandbox_id, wait=False)
        await self._of(sandbox_id).stop(sandbox_id)

    async def restart(self, spec: SandboxSpec) -> dict[str, Any]:
        return await self._for(spec).create(spec, resume=True)

    def can_checkpoint(self, runtime: str = "namespaces") -> bool:
        return runtime == "namespaces" and checkpoint.available()

    async def hibernate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        await self._forget_connections(sandbox_id)
        await self._of(sandbox_id).hibernate(sandbox_id, handle["pid"])

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: dict[str, Any], key: str, seal: tuple[tuple[str, str], ...] = ()
    ) -> str:
        await self._forget_connections(sandbox_id)
        return await self._of(sandbox_id).snapshot_with_memory(sandbox_id, handle["pid"], key, seal)

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> dict[str, Any]:
        return await self._for(spec).restore(spec, key, resume)

    async def has_checkpoint(self, key: str) -> bool:
        return checkpoint.complete(self.runtime.checkpoint_dir(key))

    async def drop_checkpoint(self, key: str) -> None:
        await self.runtime.drop_checkpoint(key)

    async def checkpoint_keys(self) -> set[str]:
        root = self.runtime.checkpoint_dir("")
        return await asyncio.to_thread(lambda: {p.name for p in root.iterdir()} if root.is_dir() else set())

    async def commit(self, sandbox_id: str, seal: tuple[tuple[str, str], ...] = ()) -> str:
        return await self._of(sandbox_id).commit(sandbox_id, seal)

    async def flatten(self, layers: list[str]) -> str:
        return await asyncio.to_thread(self.layers.flatten, layers)

    async def collect_layers(self, keep: set[str]) -> list[str]:
        def collect() -> list[str]:
            unused = sorted(self.layers.layer_ids() - keep)
            for layer_id in unused:
                self.layers.remove_layer(layer_id)
            return unused

        return await asyncio.to_thread(collect)

    async def kill(self, sandbox_id: str, handle: dict[str, Any] | None = None) -> None:
        await self._forget_connections(sandbox_id, wait=False)
        await self._of(sandbox_id).kill(sandbox_id)

    async def alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return await self._of(sandbox_id).alive(sandbox_id, handle)

    async def dead(self, sandboxes: list[tuple[str, dict[str, Any]]]) -> list[str]:
        # One pass in one worker thread: the reaper asks about many sandboxes each second.
        def check() -> list[str]:
            return [sid for sid, handle in sandboxes if not self._of(sid)._alive(sid, handle)]

        return await asyncio.to_thread(check)

    async def pause(self, sandbox_id: str) -> None:
        await self._forget_connections(sandbox_id)
        await asyncio.to_thread(self.runtime.cgroup(sandbox_id).freeze, True)

    async def resume(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.runtime.cgroup(sandbox_id).freeze, False)

    def guest(self, sandbox_id: str) -> GuestClient:
        return GuestClient(self.runtime.socket_path(sandbox_id), idle=self.idle)

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        return await self.runtime.stats(sandbox_id)

    async def sweep(self, keep: set[str]) -> list[str]:
        stray = sorted((await asyncio.to_thread(self.runtime.present)) - keep)
        for sandbox_id in stray:
            await self._of(sandbox_id).kill(sandbox_id)
        return stray

    # -- volumes -------------------------------------------------------------------------------
    @property
    def volume_limits(self) -> bool:  # type: ignore[override]
        return self.runtime.volumes.can_limit

    def _volume_owner(self) -> tuple[int, int]:
        uid = self.settings.uid_base + 1000  # the base template's `user`: it can write the volume
        return uid, uid

    async def create_volume(self, volume_id: str, size_mb: int | None) -> None:
        await asyncio.to_thread(self.runtime.volumes.create, volume_id, size_mb, self._volume_owner())

    async def clone_volume(self, sealed_id: str, volume_id: str, size_mb: int | None) -> None:
        await asyncio.to_thread(self.runtime.volumes.clone_sealed, sealed_id, volume_id, size_mb)

    async def delete_volume(self, volume_id: str) -> None:
        await asyncio.to_thread(self.runtime.volumes.delete, volume_id)

    async def delete_sealed(self, sealed_ids: list[str]) -> None:
        def drop() -> None:
            for sealed_id in sealed_ids:
                self.runtime.volumes.delete_sealed(sealed_id)

        await asyncio.to_thread(drop)

    async def volume_ids(self) -> tuple[set[str], set[str]]:
        vols = self.runtime.volumes
        return await asyncio.to_thread(lambda: (vols.ids(), vols.sealed_ids()))

    def bucket_mounts_available(self) -> bool:
        return bucket_mounts.available()

    async def bucket_mounts_healthy(self, sandbox_id: str, indices: list[int]) -> list[bool]:
        sdir = self.runtime.sandbox_dir(sandbox_id)

        def check() -> list[bool]:
            bucket_mounts.reap()
            return [bucket_mounts.healthy(sdir, i) for i in indices]

        return await asyncio.to_thread(check)

    def template_storage(self) -> TemplateStorage:
        if self._templates is None:
            s = self.settings
            cache = Path(s.debian_cache) if s.debian_cache else s.home / "debian"
            self._templates = TemplateStorage(self.layers, s.uid_base, cache)
        return self._templates

    async def close(self) -> None:
        await self.runtime.close()
        await asyncio.to_thread(self.runtime.release_parent)
        await asyncio.to_thread(self.gvisor.release_parent)
