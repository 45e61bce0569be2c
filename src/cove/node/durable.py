"""The node's side of durable state (`Durable` in cove.node.base): committed layers and CRIU images
copied to and from the object store (cove.storage.objects), the node's disk being their cache.

A layer is uploaded once under its id (ids are never reused: content digests or `new_layer_id`),
so pushing a chain sends only the layers the bucket lacks; a checkpoint goes as `criu/<key>`. A
download lands in a scratch volume beside the layers and is moved into place only when complete
and verified: a corrupt chunk or a full disk leaves nothing a sandbox could start from.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import time
from typing import Any

from cove import faults
from cove.node import checkpoint as criu
from cove.node.base import NodeError
from cove.node.namespaces.host import SandboxHost
from cove.storage.objects import CRIU, LAYER, ObjectStore, ObjectStoreError

log = logging.getLogger("cove.node.durable")


def _uploading(_sha: str, _size: int) -> None:
    faults.point("durable.uploading")  # the fault tests' kill -9 in the middle of a push (docs/faults.md)


class LocalDurable:
    def __init__(self, host: SandboxHost, store: ObjectStore | None) -> None:
        self.host = host
        self.layers = host.layers
        self.store = store
        # One transfer of an object at a time on this node: two pushes of one chain (a snapshot
        # and a hibernation) would otherwise upload its layers twice.
        self._lock = asyncio.Lock()

    def available(self) -> bool:
        return self.store is not None

    def _bucket(self) -> ObjectStore:
        if self.store is None:
            raise NodeError("no object store on this node (set COVE_OBJECT_STORE, docs/object-storage.md)")
        return self.store

    async def seal(self, sandbox_id: str, layer_id: str) -> str:
        if not self.layers.has_active(sandbox_id):
            raise NodeError(f"sandbox {sandbox_id} has no files on this node")
        return await asyncio.to_thread(self.layers.commit, sandbox_id, layer_id)

    async def push(
        self,
        layers: list[str],
        checkpoint: str | None = None,
        store_as: str | None = None,
        parent_layer: str | None = None,
        parent_checkpoint: str | None = None,
    ) -> dict[str, Any]:
        store = self._bucket()
        name = store_as or checkpoint
        async with self._lock:
            return await asyncio.to_thread(
                self._push, store, layers, checkpoint, name, parent_layer, parent_checkpoint
            )

    def _push(
        self,
        store: ObjectStore,
        layers: list[str],
        checkpoint: str | None,
        name: str | None,
        parent_layer: str | None,
        parent_checkpoint: str | None,
    ) -> dict[str, Any]:
        started = time.monotonic()
        sent: dict[str, Any] = {"bytes_read": 0, "bytes_stored": 0, "layers": 0}

        def count(m: Any) -> None:
            if m.stats is not None:
                sent["bytes_read"] += m.stats.bytes_read
                sent["bytes_stored"] += m.stats.bytes_stored

        try:
            for layer_id in layers:
                if store.has(layer_id, LAYER):
                    continue
                if not self.layers.exists(layer_id):
                    raise NodeError(f"layer {layer_id} is neither on this node nor in the object store")
                parent = parent_layer if layer_id == layers[-1] else None
                count(
                    store.upload_tree(
                        self.layers.path(layer_id), layer_id, kind=LAYER, parent=parent, progress=_uploading
                    )
                )
                sent["layers"] += 1
            if checkpoint is not None:
                images = self.host.checkpoint_dir(checkpoint)
                if not criu.complete(images):
                    raise NodeError(f"no complete checkpoint {checkpoint} on this node to copy")
                count(
                    store.upload_tree(  # the images and cove's process records (procs/)
                        images, name or checkpoint, kind=CRIU, parent=parent_checkpoint, progress=_uploading
                    )
                )
        except ObjectStoreError as e:
            raise NodeError(f"copying to the object store failed: {e}") from e
        sent["seconds"] = round(time.monotonic() - started, 3)
        log.info("pushed to the object store", extra={"checkpoint": name, **sent})
        return sent

    async def pull(self, layers: list[str], checkpoint: str | None = None) -> dict[str, Any]:
        store = self._bucket()
        async with self._lock:
            return await asyncio.to_thread(self._pull, store, layers, checkpoint)

    def _pull(self, store: ObjectStore, layers: list[str], checkpoint: str | None) -> dict[str, Any]:
        started = time.monotonic()
        got: dict[str, Any] = {"layers": 0, "checkpoint": False}
        try:
            for layer_id in layers:
                if self.layers.exists(layer_id):
                    continue
                self._pull_layer(store, layer_id)
                got["layers"] += 1
            if checkpoint is not None and not criu.complete(self.host.checkpoint_dir(checkpoint)):
                dest = self.host.checkpoint_dir(checkpoint)
                shutil.rmtree(dest, ignore_errors=True)  # an incomplete one: replaced whole
                dest.parent.mkdir(parents=True, exist_ok=True)
                store.download_tree(checkpoint, dest, kind=CRIU)
                got["checkpoint"] = True
        except ObjectStoreError as e:
            raise NodeError(f"copying from the object store failed: {e}") from e
        got["seconds"] = round(time.monotonic() - started, 3)
        log.info("pulled from the object store", extra={"checkpoint": checkpoint, **got})
        return got

    def _pull_layer(self, store: ObjectStore, layer_id: str) -> None:
        # A scratch volume (swept at start if we die), filled, then snapshotted into place: the same
        # way a template build commits a layer (LayerStore.build).
        scratch = self.layers.layers_dir / f".pull-{os.getpid()}-{secrets.token_hex(4)}"
        self.layers.backend.volume(scratch)
        try:
            store.download_tree(layer_id, scratch / "upper", kind=LAYER)
            if not self.layers.exists(layer_id):
                self.layers.backend.snapshot(scratch, self.layers.layers_dir / layer_id)
        finally:
            self.layers.backend.delete(scratch)

    async def collect(self, layers: list[str], keys: list[str], older_than_s: float) -> dict[str, Any]:
        store = self._bucket()

        def collect() -> dict[str, Any]:
            gone = {
                kind: store.unreferenced(kind, set(keep), older_than_s)
                for kind, keep in ((LAYER, layers), (CRIU, keys))
            }
            for kind, ids in gone.items():
                for mid in ids:
                    store.delete_manifest(mid, kind)
            report = store.collect_garbage()
            return {
                "layers_deleted": len(gone[LAYER]),
                "images_deleted": len(gone[CRIU]),
                "swept": report.swept,
                "reason": report.reason,
                "chunks_deleted": report.chunks_deleted,
                "bytes_deleted": report.bytes_deleted,
            }

        try:
            got = await asyncio.to_thread(collect)
        except ObjectStoreError as e:
            raise NodeError(f"collecting the object store's garbage failed: {e}") from e
        log.info("object store collected", extra=got)
        return got

    async def forget(self, layers: list[str], keys: list[str]) -> None:
        store = self._bucket()

        def forget() -> None:
            for layer_id in layers:
                store.delete_manifest(layer_id, LAYER)
            for key in keys:
                store.delete_manifest(key, CRIU)

        try:
            await asyncio.to_thread(forget)
        except ObjectStoreError as e:
            raise NodeError(f"deleting from the object store failed: {e}") from e
