"""Sandboxes that outlive their node: copies in the object store (docs/object-storage.md).

A sandbox's *copy* is its files as committed layers plus, where its processes were checkpointed, a
CRIU image: everything another node needs to start it again, pushed through `node.durable` (layers
once each, by id; only what changed since the previous copy is read and sent). A copy is recorded
in the sandbox's `durable` field only after the push finished, and the previous one is deleted only
then: a node killed mid-push leaves the previous copy usable and nothing half-made recorded.

Copies are made when a sandbox hibernates (with an object store), and every `every` seconds of use
while it runs (periodic copies, `snapshot_every`). When its node is gone, a hibernated sandbox
resumes from its copy on another node; a running one with a periodic copy becomes hibernated from
that copy (losing at most `every` seconds of work) instead of lost (`Reaper`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.states import LIVE
from cove.node.base import NodeAgent, NodeError, new_layer_id
from cove.store.base import SandboxRecord, Store

log = logging.getLogger("cove.durable")

MIN_EVERY_S = 30  # periodic copies freeze the sandbox for a checkpoint: not more often than this


def why_not(rec: SandboxRecord, node: NodeAgent) -> str | None:
    """Why this sandbox cannot have a copy another node could start (None: it can)."""
    if not node.durable.available():
        return "its node has no object store (COVE_OBJECT_STORE)"
    if rec.mounts:
        return "it has volumes or bucket mounts, which stay on their node"
    return None


def copy_of(rec: SandboxRecord) -> dict[str, Any] | None:
    copy = (rec.durable or {}).get("copy")
    return copy if isinstance(copy, dict) and copy.get("layers") else None


class Durability:
    def __init__(self, store: Store, refs: LayerRefs) -> None:
        self.store = store
        self.refs = refs
        self._running: dict[str, asyncio.Task[None]] = {}  # periodic copies in progress, by sandbox

    async def copy_hibernated(self, rec: SandboxRecord, node: NodeAgent, memory: bool) -> dict[str, Any]:
        """Copy a sandbox just hibernated on `node` (its image, if `memory`, under its own id there)."""
        key, own = f"{rec.id}-{secrets.token_hex(4)}", new_layer_id("hib")
        async with self.refs.held():  # the sealed layer is nobody's until the copy is recorded
            await node.durable.seal(rec.id, own)
            return await self._push(rec, node, own, key if memory else None, local=rec.id)

    async def copy_running(
        self, rec: SandboxRecord, node: NodeAgent, memory: bool, lock: asyncio.Lock
    ) -> dict[str, Any] | None:
        """Copy a running sandbox: frozen under its `lock` for the instant of its checkpoint, then
        pushed while it runs on. None: it was no longer running."""
        key, own = f"{rec.id}-{secrets.token_hex(4)}", new_layer_id("copy")
        async with self.refs.held():
            async with lock:
                fresh = await self.store.get_sandbox(rec.id)
                if fresh is None or fresh.state != "running":
                    return None
                if memory:
                    own = await node.checkpoints.snapshot_with_memory(rec.id, rec.node, key, own)
                else:
                    own = await node.snapshots.commit(rec.id, own)
            try:
                return await self._push(rec, node, own, key if memory else None, local=key)
            finally:
                if memory:
                    await node.checkpoints.drop(key)  # in the bucket now; the node need not keep it

    async def _push(
        self, rec: SandboxRecord, node: NodeAgent, own: str, key: str | None, local: str
    ) -> dict[str, Any]:
        """Push the sandbox's chain with its new layer `own` and, with `key`, the image stored here
        under `local` as `key`, incrementally against its previous copy; returns the new copy."""
        prev = copy_of(rec) or {}
        sent = await node.durable.push(
            [*rec.layers, own],
            checkpoint=local if key else None,
            store_as=key,
            parent_layer=prev.get("own"),
            parent_checkpoint=prev.get("key"),
        )
        return {
            "key": key,
            "layers": [*rec.layers, own],
            "own": own,
            "memory": key is not None,
            "at": time.time(),
            "bytes_stored": sent.get("bytes_stored", 0),
            "seconds": sent.get("seconds", 0.0),
        }

    async def record(self, rec: SandboxRecord, copy: dict[str, Any] | None, node: NodeAgent) -> None:
        """Make `copy` the sandbox's copy (None: it has none), then delete the one it replaces."""
        prev = copy_of(rec)
        rec.durable = {**(rec.durable or {}), "copy": copy}
        await self.store.update_sandbox(rec.id, durable=rec.durable)
        if prev is not None:
            await self.forget(prev, node, keep={*rec.layers, *((copy or {}).get("layers") or [])})

    async def forget(self, copy: dict[str, Any], node: NodeAgent, keep: set[str]) -> None:
        """Delete a copy's own objects (its image, its own layer unless `keep` names it)."""
        own = [copy["own"]] if copy.get("own") and copy["own"] not in keep else []
        try:
            await node.durable.forget(own, [copy["key"]] if copy.get("key") else [])
        except NodeError as e:  # left for the bucket's owner; the record no longer names it
            log.warning("could not delete an old copy", extra={"copy": copy.get("key"), "error": str(e)})

    # -- the bucket's garbage ------------------------------------------------------------------------
    async def collect(self, node: NodeAgent, older_than_s: float) -> dict[str, Any]:
        """Delete the bucket's copies no record names (sandboxes' copies, snapshots, templates, and
        the layers of every sandbox that may still push or pull them), then their unshared chunks."""
        layers: set[str] = set()
        keys: set[str] = set()
        for snap in await self.store.list_snapshots(None):
            layers.update(snap.layers)
            if snap.memory:
                keys.add(snap.id)  # a memory snapshot's image is copied under its id
        page = await self.store.list_sandboxes(None, [*LIVE, "lost"], limit=1_000_000)
        for rec in page.items:
            layers.update(rec.layers)
            if copy := copy_of(rec):
                layers.update(copy["layers"])
                if copy.get("key"):
                    keys.add(copy["key"])
        for tpl in await self.store.list_templates(None):
            layers.update(tpl.layers)
            if tpl.config.get("checkpoint"):
                keys.add(str(tpl.config["checkpoint"]))
        return await node.durable.collect(sorted(layers), sorted(keys), older_than_s)

    # -- periodic copies ----------------------------------------------------------------------------
    def due(self, rec: SandboxRecord, now: float, idle_s: float) -> bool:
        """Is a periodic copy of this running sandbox due: `every` seconds since the last one, and
        used since (an idle sandbox's last copy is still current)?"""
        every = (rec.durable or {}).get("every") or 0
        if not every or rec.id in self._running:
            return False
        last = (copy_of(rec) or {}).get("at") or rec.created_at
        return now - last >= every and idle_s < now - last

    def start_periodic(self, rec: SandboxRecord, make: Callable[[], Awaitable[None]]) -> None:
        """Run `make()` (the copy) in the background, one per sandbox at a time."""
        task = asyncio.create_task(make(), name=f"cove-copy-{rec.id}")
        self._running[rec.id] = task
        task.add_done_callback(lambda _t: self._running.pop(rec.id, None))

    async def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
