"""The in-process node: this host runs the sandboxes itself (the single-machine deployment)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cove.config import Settings
from cove.node import checkpoint
from cove.node.base import NodeAgent, SandboxSpec, TemplateSpec
from cove.node.guest_client import GuestClient
from cove.node.namespaces import cgroups
from cove.node.namespaces.runtime import NamespacesRuntime
from cove.storage import base_template
from cove.storage.layers import LayerStore, open_storage

log = logging.getLogger("cove.node")


class LocalNode(NodeAgent):
    layers: LayerStore
    runtime: NamespacesRuntime

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._base: TemplateSpec | None = None

    async def start(self) -> None:
        s = self.settings
        self.layers = await asyncio.to_thread(open_storage, s.home, s.storage_backend, s.storage_image_size)
        self.runtime = NamespacesRuntime(s, self.layers)
        if await asyncio.to_thread(cgroups.favor_dynmods):
            log.info("cgroup task migrations are cheap (favordynmods)")
        await self.base_template()
        await self.runtime.start()
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

    async def base_template(self) -> TemplateSpec:
        if self._base is None:
            layer = await asyncio.to_thread(
                self.layers.build, lambda root: base_template.fill(root, self.settings.uid_base)
            )
            self._base = TemplateSpec(name="base", layers=(layer,), config=dict(base_template.CONFIG))
        return self._base

    async def create(self, spec: SandboxSpec) -> dict[str, Any]:
        return await self.runtime.create(spec)

    async def stop(self, sandbox_id: str) -> None:
        await self.runtime.stop(sandbox_id)

    async def restart(self, spec: SandboxSpec) -> dict[str, Any]:
        return await self.runtime.create(spec, resume=True)

    def can_checkpoint(self) -> bool:
        return checkpoint.available()

    async def hibernate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        await self.runtime.hibernate(sandbox_id, handle["pid"])

    async def snapshot_with_memory(self, sandbox_id: str, handle: dict[str, Any], key: str) -> str:
        return await self.runtime.snapshot_with_memory(sandbox_id, handle["pid"], key)

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> dict[str, Any]:
        return await self.runtime.restore(spec, key, resume)

    async def has_checkpoint(self, key: str) -> bool:
        return checkpoint.complete(self.runtime.checkpoint_dir(key))

    async def drop_checkpoint(self, key: str) -> None:
        await self.runtime.drop_checkpoint(key)

    async def commit(self, sandbox_id: str) -> str:
        return await self.runtime.commit(sandbox_id)

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
        await self.runtime.kill(sandbox_id)

    async def alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return await self.runtime.alive(sandbox_id, handle)

    async def pause(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.runtime.cgroup(sandbox_id).freeze, True)

    async def resume(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.runtime.cgroup(sandbox_id).freeze, False)

    def guest(self, sandbox_id: str) -> GuestClient:
        return GuestClient(self.runtime.socket_path(sandbox_id))

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        return await self.runtime.stats(sandbox_id)

    async def sweep(self, keep: set[str]) -> list[str]:
        stray = sorted((await asyncio.to_thread(self.runtime.present)) - keep)
        for sandbox_id in stray:
            await self.runtime.kill(sandbox_id)
        return stray

    async def close(self) -> None:
        await self.runtime.close()
        await asyncio.to_thread(self.runtime.release_parent)
