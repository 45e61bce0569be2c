"""Snapshots, forks and flattening: a sandbox's files (and with CRIU its processes) sealed at an
instant, new sandboxes started from that instant, and long layer chains squashed into one.

A snapshot's new layer is recorded while `LayerRefs.held()` is held: a collection in between
would see it unreferenced and delete it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cove import faults
from cove.config import Settings
from cove.controlplane import audit
from cove.controlplane.admission import busy
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError
from cove.controlplane.fleet import HOLDING
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.schemas import CreateSandbox
from cove.controlplane.service import SandboxService, bucket_mounts
from cove.controlplane.sources import Sources
from cove.controlplane.starter import new_sandbox_id
from cove.controlplane.states import ACTIVE
from cove.controlplane.volumes import Volumes
from cove.node.base import NodeError, new_layer_id
from cove.store.base import SandboxRecord, SnapshotRecord

log = logging.getLogger("cove.snapshots")

NO_FUSE_CHECKPOINT = (
    "sandbox {} has bucket mounts: FUSE mounts cannot be checkpointed (no fork or memory snapshot); "
    "take a snapshot without memory, or mount the bucket in a new sandbox"
)


class Snapshots:
    def __init__(
        self,
        settings: Settings,
        sandboxes: SandboxService,
        sources: Sources,
        refs: LayerRefs,
        volumes: Volumes,
    ) -> None:
        self.settings = settings
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.fleet = sandboxes.fleet
        self.audit = sandboxes.audit
        self.sources = sources
        self.refs = refs
        self.volumes = volumes
        self._background: set[asyncio.Task[None]] = set()

    async def get(self, who: Caller, snapshot_id: str) -> SnapshotRecord:
        return await self.sources.snapshot(who, snapshot_id)

    async def list(self, who: Caller) -> list[SnapshotRecord]:
        return await self.sources.snapshots(who)

    @audit.audited("sandbox.snapshot", audit.snapshotted)
    async def take(
        self,
        who: Caller,
        sandbox_id: str,
        name: str | None = None,
        memory: bool = False,
        internal: bool = False,
        volumes: str = "exclude",
    ) -> SnapshotRecord:
        """Seal the sandbox's files as they are now (constant time), and with `memory` its processes
        too (CRIU); the sandbox keeps running."""
        rec = await self.sandboxes.get(who, sandbox_id)
        node = self.sandboxes.node_of(rec)  # its layers stay on the sandbox's node (docs/fleet.md)
        if memory and not node.checkpoints.available():
            raise ApiError(
                409, "memory_unavailable", "memory snapshots need CRIU >= 4.1 on the node (see `cove doctor`)"
            )
        self.sandboxes.touch(rec.id)
        snap = SnapshotRecord(
            id="snap" + new_sandbox_id()[:12],
            tenant=who.tenant,
            name=name,
            sandbox_id=rec.id,
            state="creating",  # rolled back at start if the server dies before it is ready
            created_at=time.time(),
            node_id=rec.node_id,
        )
        async with self.sandboxes.lock(rec.id):
            rec = await self.sandboxes.fresh(rec)
            if rec.state not in (*ACTIVE, "hibernated"):
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            if memory and rec.state not in ACTIVE:
                raise ApiError(
                    409, "not_running", f"a memory snapshot needs running processes; {rec.id} is {rec.state}"
                )
            if memory and not node.checkpoints.available(rec.runtime):
                raise ApiError(
                    409,
                    "not_supported",
                    f"memory snapshots are not supported by the {rec.runtime} runtime (see docs/runtimes.md)",
                )
            if memory and bucket_mounts(rec):
                raise ApiError(409, "mounts_not_checkpointable", NO_FUSE_CHECKPOINT.format(rec.id))
            entries, seal = await self.volumes.for_snapshot(rec, snap.id, volumes)
            await self.store.insert_snapshot(snap)
            faults.point("snapshot.recorded")
            # Until the record names the new layer, nothing else may collect layers (it would
            # see the layer as unused and delete it).
            async with self.refs.held():
                try:
                    if memory:
                        layer = await node.checkpoints.snapshot_with_memory(
                            rec.id, rec.node, snap.id, new_layer_id("snap"), seal
                        )
                        snap.memory = True
                    else:  # the node freezes the sandbox for the instant of the copy
                        layer = await node.snapshots.commit(rec.id, new_layer_id("snap"), seal)
                except (NodeError, OSError) as e:
                    await self.store.delete_snapshot(snap.id)
                    await node.checkpoints.drop(snap.id)
                    raise ApiError(503, "snapshot_failed", f"snapshot of {rec.id} failed: {e}") from e
                faults.point("snapshot.committed")
                snap.layers = [*rec.layers, layer]
                snap.config = {
                    "template": rec.template,
                    "env": rec.env,
                    "user": rec.user,
                    "workdir": rec.workdir,
                    "runtime": rec.runtime,  # sandboxes started from it run on the same runtime
                    "limits": rec.limits,
                    "volumes": entries,  # live ones, or sealed copies (docs/volumes.md)
                    "internal": internal,  # a fork's own snapshot: never listed, removed at start if left over
                    "template_config": rec.template_config,  # a built template's root (binds)
                }
                snap.state = "ready"
                await self.store.update_snapshot(
                    snap.id, layers=snap.layers, config=snap.config, state="ready", memory=int(snap.memory)
                )
        log.info("snapshot taken", extra={"snapshot": snap.id, "sandbox": rec.id, "layers": len(snap.layers)})
        flatten = len(snap.layers) > self.settings.flatten_at
        copy = bool(self.settings.object_store) and not internal and not entries and node.durable.available()
        if flatten or copy:
            task = asyncio.create_task(self._after_take(snap.id, flatten, copy))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return snap

    async def _after_take(self, snapshot_id: str, flatten: bool, copy: bool) -> None:
        """In turn (a copy sends the flattened chain): squash a long chain, then copy the snapshot to
        the object store, after which it starts on any node (Sources.home)."""
        if flatten:
            await self._flatten(snapshot_id)
        if copy:
            await self._copy(snapshot_id)

    async def _copy(self, snapshot_id: str) -> None:
        snap = await self.store.get_snapshot(snapshot_id)
        if snap is None:
            return
        try:
            sent = await self.fleet.of(snap.node_id).durable.push(
                snap.layers, checkpoint=snap.id if snap.memory else None
            )
        except (ApiError, NodeError) as e:
            log.warning(
                "copying a snapshot to the object store failed", extra={"snapshot": snap.id, "error": str(e)}
            )
            await self.store.update_snapshot(snap.id, config={**snap.config, "durable": f"failed: {e}"[:500]})
            return
        faults.point("snapshot.copied")
        fresh = await self.store.get_snapshot(snapshot_id)
        if fresh is not None:
            await self.store.update_snapshot(snap.id, config={**fresh.config, "durable": True})
        log.info("snapshot copied to the object store", extra={"snapshot": snap.id, **sent})

    async def _flatten(self, snapshot_id: str) -> None:
        """Squash a snapshot's long layer chain into one layer; sandboxes made later mount just that."""
        async with self.refs.held():  # the new layer must be recorded before anything collects
            snap = await self.store.get_snapshot(snapshot_id)
            if snap is None:
                return
            try:
                flat = await self.fleet.of(snap.node_id).snapshots.flatten(snap.layers, new_layer_id("flat"))
            except (NodeError, OSError):
                log.exception("flattening snapshot %s failed", snapshot_id)
                return
            await self.store.update_snapshot(snapshot_id, layers=[flat])
        log.info("snapshot flattened", extra={"snapshot": snapshot_id, "from_layers": len(snap.layers)})
        await self.refs.collect()

    @audit.audited("snapshot.delete", audit.snapshot_deleted)
    async def delete(self, who: Caller, snapshot_id: str) -> None:
        """Forget a snapshot; its layers stay while sandboxes started from it still use them."""
        snap = await self.get(who, snapshot_id)
        await self.store.delete_snapshot(snap.id)
        await self._drop_checkpoint(snap)
        await self.volumes.drop_sealed(snap)
        await self.refs.collect()

    async def _spill_targets(self, source: SandboxRecord, home: str, spill: int, count: int) -> list[str]:
        """Nodes for the `spill` children of a fork that the source's node has no room for; 503
        when there is no object store to carry them there, or not enough room in the fleet."""
        full = await self.fleet.refusal(home, await self.store.count_by_node(HOLDING), count=False)
        why = full.message if full else f"node {home} has room for {count - spill} of {count} children"
        if not self.fleet.of(home).durable.available():
            raise busy("node_full", f"{why}, and without an object store (COVE_OBJECT_STORE) a fork's "
                       "children start only on their source's node")  # fmt: skip
        targets = await self.fleet.spread(spill, source.runtime or "namespaces", exclude={home})
        if len(targets) < spill:
            raise busy(
                "fleet_full", f"{why}, and the other nodes have room for {len(targets)} of the {spill} others"
            )
        return targets

    async def _copy_for_fork(self, snap: SnapshotRecord) -> None:
        """Copy a fork's own snapshot to the object store, so that other nodes can start its children."""
        try:
            await self.fleet.of(snap.node_id).durable.push(
                snap.layers, checkpoint=snap.id if snap.memory else None
            )
        except NodeError as e:
            raise ApiError(
                503, "fork_failed", f"copying the fork's snapshot for other nodes failed: {e}"
            ) from e
        snap.config = {**snap.config, "durable": True}
        await self.store.update_snapshot(snap.id, config=snap.config)

    async def _drop_checkpoint(self, snap: SnapshotRecord) -> None:
        """Its memory image goes; from a node out of reach now, when that node next starts (its
        adoption drops every image no record names)."""
        try:
            await self.fleet.of(snap.node_id).checkpoints.drop(snap.id)
        except ApiError:
            log.info(
                "checkpoint left for its node to drop", extra={"snapshot": snap.id, "node": snap.node_id}
            )

    @audit.audited("sandbox.fork", audit.forked)
    async def fork(
        self, who: Caller, sandbox_id: str, count: int, metadata: dict[str, str], volumes: str = "exclude"
    ) -> tuple[list[SandboxRecord], bool]:
        """N new sandboxes that continue from this instant of the source, which keeps running.

        With CRIU the children's processes continue too; otherwise they start afresh on the same
        files. Returns the children and whether their memory was kept.
        """
        source = await self.sandboxes.get(who, sandbox_id)
        if bucket_mounts(source):
            raise ApiError(409, "mounts_not_checkpointable", NO_FUSE_CHECKPOINT.format(source.id))
        memory = self.sandboxes.can_checkpoint(source) and source.state in ACTIVE
        # The children start on the source's node, where its image is; those it has no room for
        # start on other nodes from a copy in the object store (made only then).
        home = source.node_id or self.fleet.id
        room = await self.fleet.room(home)
        spill = max(0, count - room) if room is not None else 0
        elsewhere: list[str] = []
        if spill:
            elsewhere = await self._spill_targets(source, home, spill, count)
        snap = await self.take(who, sandbox_id, memory=memory, internal=True, volumes=volumes)
        try:
            if elsewhere:
                await self._copy_for_fork(snap)
            targets = [home] * (count - len(elsewhere)) + elsewhere
            req = CreateSandbox(
                snapshot=snap.id,
                timeout=source.timeout,
                metadata={**source.metadata, **metadata, "forked_from": source.id},
                auto_resume=source.auto_resume,
                idle_timeout=source.idle_timeout,
                on_idle=source.on_idle,  # the children end the way their source does
                on_timeout=source.on_timeout,
            )
            results = await asyncio.gather(
                *(self.sandboxes.create(who, req, network=source.network, on=node) for node in targets),
                return_exceptions=True,
            )
            faults.point("fork.created")
        finally:
            await self.store.delete_snapshot(snap.id)  # the children keep its layer alive
            await self._drop_checkpoint(snap)
            if elsewhere and snap.memory:  # the children elsewhere have fetched the image
                with contextlib.suppress(ApiError, NodeError):
                    await self.fleet.of(snap.node_id).durable.forget([], [snap.id])
            await self.volumes.drop_sealed(snap)  # the children have their own copies
        children = [r for r in results if isinstance(r, SandboxRecord)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for child in children:
                await self.sandboxes.end(child, "killed", "fork failed")
            raise failed[0]
        return children, snap.memory
