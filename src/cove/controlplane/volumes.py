"""Named volumes of a tenant, and the mounts (volumes, buckets) a sandbox is created with.

A volume is looked up by name within the caller's tenant (another tenant's is a 404, as for
sandboxes). Deleting one that a live sandbox mounts (running, paused or hibernated) is a 409 that
names those sandboxes. A snapshot either records the live volumes (`exclude`: sandboxes made from
it mount the same ones) or seals a copy of each (`include`: each sandbox made from it gets a new
volume, named `<name>-<first 8 characters of its id>`, with that content).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from cove.config import Settings
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.fleet import Fleet
from cove.controlplane.schemas import CreateSandbox
from cove.node.base import NodeError
from cove.store.base import SandboxRecord, SnapshotRecord, Store, VolumeRecord

log = logging.getLogger("cove.volumes")
LIVE = ("starting", "running", "paused", "hibernated")
DEFAULT_SIZE_MB = 1024


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


class Volumes:
    def __init__(self, settings: Settings, store: Store, fleet: Fleet) -> None:
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.node = fleet.local  # volumes live on this server's node until issue 21's object store
        # Held while a volume is checked for users and deleted, and while a new sandbox's
        # references are resolved and recorded: neither can slip between the other's steps.
        self.lock = asyncio.Lock()

    def _here(self, vol: VolumeRecord) -> None:
        """409 unless the volume's content is on this server's node (docs/fleet.md)."""
        if vol.node_id not in ("", self.fleet.id):
            raise ApiError(
                409,
                "not_supported",
                f"volume {vol.name!r} is kept on node {vol.node_id}: "
                "create sandboxes that mount it through that node's server",
            )

    # -- the API ----------------------------------------------------------------------------
    async def create(
        self, who: Caller, name: str, size_mb: int | None, source: dict[str, Any] | None = None
    ) -> VolumeRecord:
        if size_mb is None:
            size_mb = DEFAULT_SIZE_MB if self.node.volumes.limits else None
        elif not self.node.volumes.limits:
            raise ApiError(
                422,
                "validation_error",
                "size_mb needs the btrfs storage backend (this node copies directories)",
            )
        if await self.store.get_volume(who.tenant, name) is not None:
            raise ApiError(409, "exists", f"volume {name!r} exists")
        rec = VolumeRecord(
            id=_new_id("vol"),
            tenant=who.tenant,
            name=name,
            size_mb=size_mb,
            created_at=time.time(),
            node_id=self.fleet.id,
        )
        try:
            await self.node.volumes.create(rec.id, size_mb)
        except (NodeError, OSError) as e:
            raise ApiError(503, "volume_failed", f"creating volume {name!r} failed: {e}") from e
        try:
            await self.store.insert_volume(rec)
        except ValueError as e:  # a concurrent create of the same name won
            await self.node.volumes.delete(rec.id)
            raise ApiError(409, "exists", f"volume {name!r} exists") from e
        log.info("volume created", extra={"volume": rec.id, "volume_name": name, "size_mb": size_mb})
        return rec

    async def get(self, who: Caller, name: str) -> VolumeRecord:
        rec = await self.store.get_volume(who.tenant, name)
        if rec is None:
            raise not_found("volume", name)
        return rec

    async def by_id(self, volume_id: str, who: Caller | None = None) -> VolumeRecord:
        """A volume by its id: the caller's (another tenant's is a 404), or with `who=None` any
        tenant's, for front ends that authorise by the volume itself (its content token)."""
        rec = await self.store.get_volume_by_id(volume_id)
        if rec is None or (who is not None and rec.tenant != who.tenant):
            raise not_found("volume", volume_id)
        return rec

    def content_path(self, rec: VolumeRecord) -> str:
        """The volume's directory on this server's host, for front ends that edit its files;
        409 where another node keeps it."""
        self._here(rec)
        path = self.node.volumes.content_path(rec.id)
        if path is None:
            raise ApiError(409, "not_supported", f"volume {rec.name!r} is not on this server's host")
        return path

    async def list(self, who: Caller) -> list[VolumeRecord]:
        return await self.store.list_volumes(who.tenant)

    async def users(self, volume_id: str) -> list[str]:
        """Ids of the live sandboxes that mount the volume."""
        page = await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)
        return [
            r.id
            for r in page.items
            if any(m.get("volume") == volume_id for m in r.mounts if m["type"] == "volume")
        ]

    async def delete(self, who: Caller, name: str) -> None:
        async with self.lock:
            rec = await self.get(who, name)
            users = await self.users(rec.id)
            if users:
                raise ApiError(
                    409,
                    "in_use",
                    f"volume {name!r} is mounted by sandboxes {', '.join(users)}: kill them first",
                    sandboxes=users,
                )
            await self.store.delete_volume(rec.id)
        try:
            await self.node.volumes.delete(rec.id)
        except (NodeError, OSError):
            log.exception("deleting volume %s failed (swept at the next start)", rec.id)
        log.info("volume deleted", extra={"volume": rec.id, "volume_name": name})

    # -- a new sandbox's mounts ---------------------------------------------------------------
    async def resolve(
        self, who: Caller, rec: SandboxRecord, req: CreateSandbox, inherited: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
        """The mounts of a new sandbox: those of its snapshot (`inherited`), then the request's.

        Returns what its record keeps (no credentials), what the node gets (with them) and the
        ids of volumes made for it (copies of sealed ones), to delete if the sandbox fails.
        Call with `self.lock` held until the record is stored.
        """
        record: list[dict[str, Any]] = []
        made: list[str] = []
        taken = {m.path for m in req.volumes} | {m.path for m in req.mounts}
        try:
            for v in inherited:
                if v["path"] in taken:
                    raise ApiError(
                        422, "validation_error", f"mount path {v['path']} is taken by the snapshot's volume"
                    )
                if v["mode"] == "copy":
                    vol = await self._copy(who, rec.id, v)
                    made.append(vol.id)
                else:
                    found = await self.store.get_volume_by_id(v["volume"])
                    if found is None or found.tenant != who.tenant:
                        raise ApiError(
                            409, "volume_gone", f"volume {v['name']!r} of the snapshot was deleted"
                        )
                    vol = found
                self._here(vol)
                record.append(
                    {
                        "type": "volume",
                        "volume": vol.id,
                        "name": vol.name,
                        "path": v["path"],
                        "read_only": v["read_only"],
                    }
                )
            for m in req.volumes:
                vol = await self.get(who, m.name)
                self._here(vol)
                record.append(
                    {
                        "type": "volume",
                        "volume": vol.id,
                        "name": vol.name,
                        "path": m.path,
                        "read_only": m.read_only,
                    }
                )
        except BaseException:
            await self.drop(made)
            raise
        spec = list(record)
        for b in req.mounts:
            if not self.node.volumes.buckets_available():
                raise ApiError(
                    409, "mounts_unavailable", "bucket mounts need rclone and /dev/fuse on the node"
                )
            public = b.model_dump(exclude={"access_key_id", "secret_access_key"})
            record.append({**public, "status": "mounted"})
            spec.append(b.model_dump())
        return record, spec, made

    async def _copy(self, who: Caller, sandbox_id: str, v: dict[str, Any]) -> VolumeRecord:
        name = f"{v['name']}-{sandbox_id[:8]}"[:63]
        rec = VolumeRecord(
            id=_new_id("vol"),
            tenant=who.tenant,
            name=name,
            size_mb=v.get("size_mb"),
            created_at=time.time(),
            source={"snapshot": v["snapshot"], "volume": v["name"]},
            node_id=self.fleet.id,
        )
        try:
            await self.node.volumes.clone(v["sealed"], rec.id, rec.size_mb)
        except (NodeError, OSError, ValueError) as e:
            raise ApiError(503, "volume_failed", f"copying volume {v['name']!r} failed: {e}") from e
        try:
            await self.store.insert_volume(rec)
        except ValueError as e:
            await self.node.volumes.delete(rec.id)
            raise ApiError(409, "exists", f"volume {name!r} exists: cannot copy the snapshot's volume") from e
        return rec

    async def drop(self, volume_ids: list[str]) -> None:
        """Delete volumes made for a sandbox that did not start."""
        for volume_id in volume_ids:
            await self.store.delete_volume(volume_id)
            try:
                await self.node.volumes.delete(volume_id)
            except (NodeError, OSError):
                log.exception("deleting volume %s failed", volume_id)

    # -- snapshots ----------------------------------------------------------------------------
    async def for_snapshot(
        self, rec: SandboxRecord, snapshot_id: str, mode: str
    ) -> tuple[list[dict[str, Any]], tuple[tuple[str, str], ...]]:
        """What a snapshot records about the sandbox's volumes, and the (volume, sealed copy) pairs
        the node must seal at the snapshot's instant (for `include`)."""
        entries: list[dict[str, Any]] = []
        seal: list[tuple[str, str]] = []
        for m in rec.mounts:
            if m["type"] != "volume":
                continue
            entry = {"name": m["name"], "path": m["path"], "read_only": m["read_only"], "volume": m["volume"]}
            if mode == "include":
                vol = await self.store.get_volume_by_id(m["volume"])
                sealed = f"{snapshot_id}-{len(seal)}"
                seal.append((m["volume"], sealed))
                entry.update(
                    mode="copy", sealed=sealed, snapshot=snapshot_id, size_mb=vol.size_mb if vol else None
                )
            else:
                entry["mode"] = "live"
            entries.append(entry)
        return entries, tuple(seal)

    async def drop_sealed(self, snap: SnapshotRecord) -> None:
        sealed = [v["sealed"] for v in snap.config.get("volumes", []) if v.get("sealed")]
        if sealed:
            try:
                await self.node.volumes.delete_sealed(sealed)
            except (NodeError, OSError):
                log.exception("deleting sealed volumes of %s failed", snap.id)

    async def sweep(self) -> None:
        """At start: delete volumes and sealed copies on the node that nothing records."""
        on_node, sealed_on_node = await self.node.volumes.ids()
        known = {v.id for v in await self.store.list_volumes(None)}
        kept_sealed = {
            v["sealed"]
            for s in await self.store.list_snapshots(None)
            for v in s.config.get("volumes", [])
            if v.get("sealed")
        }
        for volume_id in sorted(on_node - known):
            await self.node.volumes.delete(volume_id)
        stray = sorted(sealed_on_node - kept_sealed)
        if stray:
            await self.node.volumes.delete_sealed(stray)
        if on_node - known or stray:
            log.warning(
                "swept volumes nothing records", extra={"volumes": sorted(on_node - known), "sealed": stray}
            )
