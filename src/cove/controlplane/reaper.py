"""Adoption and the reaper: the background work that keeps the store and the nodes agreeing.

At start (`adopt`) this server's node's sandboxes that survived a restart are kept, the others
marked, half-made snapshots rolled back and whatever the store does not know about swept. While the
server runs, the reaper enforces timeouts and idle policies, notices sandboxes that died on their
own, and marks those of lost nodes (docs/fleet.md). Servers sharing a store take turns through
one lease: the reaper runs on exactly one of them at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from cove.config import Settings
from cove.controlplane.durable import copy_of
from cove.controlplane.errors import ApiError
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.service import SandboxService, bucket_mounts
from cove.controlplane.states import ACTIVE, LIVE
from cove.controlplane.templates import Templates
from cove.controlplane.volumes import Volumes
from cove.node.base import NodeError
from cove.store.base import SandboxRecord

log = logging.getLogger("cove.reaper")

ALIVE_CHECKS = 64  # sandboxes the reaper checks for a death of their own per tick (in turn)
# A sandbox found dead is ended as `error` only when still found dead this long after: a kill
# through another server stops the processes before it records `killed` (locks are per server).
DEAD_GRACE_S = 2.0
LEASE = "reaper"
LEASE_TTL_S = 5.0  # a holder that stops renewing is replaced this long after its last tick


class Reaper:
    def __init__(
        self,
        settings: Settings,
        sandboxes: SandboxService,
        templates: Templates,
        volumes: Volumes,
        refs: LayerRefs,
    ) -> None:
        self.settings = settings
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.fleet = sandboxes.fleet
        self.node = sandboxes.fleet.local  # adoption is of this server's node
        self.templates = templates
        self.volumes = volumes
        self.refs = refs
        self._alive_turn = 0  # where the next liveness checks start (see _dead_among)
        self._seen_dead: dict[str, float] = {}  # sandbox id -> monotonic time it was first found dead
        self._task: asyncio.Task[None] | None = None
        self._gc: asyncio.Task[None] | None = None  # the bucket's collection, when one runs
        self._gc_at = time.monotonic()  # the first one runs a period after start

    async def adopt(self) -> None:
        """At start: keep sandboxes that survived the restart, mark the others, roll back half-made
        snapshots and sweep whatever the store does not know about."""
        page = await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)
        page.items = [r for r in page.items if r.node_id in ("", self.fleet.id)]
        page.items += await self._back_from_lost()
        keep: set[str] = set()
        checkpoints = await self.node.checkpoints.keys()
        for rec in page.items:
            if rec.state == "hibernated":
                keep.add(rec.id)
                # A resume the crash interrupted may have started processes the store never heard of.
                await self.node.stop(rec.id)
                if not rec.checkpoint.get("memory"):
                    await self.node.checkpoints.drop(rec.id)
                continue
            if rec.state in ACTIVE and await self.node.alive(rec.id, rec.node):
                keep.add(rec.id)
                # Match the freezer to the record: a crash mid-snapshot or mid-pause/resume leaves
                # it frozen or thawed against its state.
                await (self.node.resume if rec.state == "running" else self.node.pause)(rec.id)
                if rec.id in checkpoints:  # a hibernation that failed or was cut short: they run on
                    await self.node.checkpoints.drop(rec.id)
                await self.sandboxes.open_egress(rec, rec.node)
                continue
            if rec.state in ACTIVE and rec.id in checkpoints:
                # The server died during a hibernation, after its dump ended the processes: with a
                # complete image they are restored on resume; without one their files still are.
                memory = await self.node.checkpoints.has(rec.id)
                await self.node.stop(rec.id)
                if not memory:
                    await self.node.checkpoints.drop(rec.id)
                info: dict[str, Any] = {"memory": memory, "recovered": True}
                if not memory:
                    info["reason"] = "the server stopped during hibernation: processes restart on resume"
                await self.sandboxes.transition(rec, "hibernated", node={}, checkpoint=info)
                keep.add(rec.id)
                continue
            await self.node.kill(rec.id, rec.node)
            reason = (
                "creation interrupted by restart"
                if rec.state == "starting"
                else "lost while the server was down"
            )
            await self.sandboxes.transition(rec, "error", end_reason=reason)
        for snap in await self.store.list_snapshots(None):
            if snap.node_id not in ("", self.fleet.id):  # another node's: maybe being made right now
                continue
            if snap.state != "ready" or snap.config.get("internal"):  # half-made, or a fork's leftover
                await self.store.delete_snapshot(snap.id)
                await self.node.checkpoints.drop(snap.id)
                await self.volumes.drop_sealed(snap)
                log.warning("rolled back an interrupted snapshot", extra={"snapshot": snap.id})
        await self.templates.rollback()
        swept = await self.node.sweep(keep)
        # Checkpoints nothing names any more (a fork or resume cut short between its steps).
        named = {r.id for r in page.items if r.id in keep} | {
            s.id for s in await self.store.list_snapshots(None) if s.memory
        }
        for key in await self.node.checkpoints.keys() - named:
            await self.node.checkpoints.drop(key)
        await self.volumes.sweep()
        for rec in page.items:  # a bucket whose rclone died while the server was down is marked
            if rec.id in keep and rec.state in ACTIVE and bucket_mounts(rec):
                await self._check_buckets(rec)
        await self.refs.collect()
        log.info("adopted sandboxes", extra={"adopted": len(keep), "swept": swept})

    async def _back_from_lost(self) -> list[SandboxRecord]:
        """This node's sandboxes marked lost while it was away, that it still has: running again
        (processes alive), or hibernated (an image or files kept); adoption then treats them as
        any other. The rest stay lost, and are swept."""
        back = []
        for rec in (await self.store.list_sandboxes(None, ["lost"], limit=1_000_000)).items:
            if rec.node_id != self.fleet.id:
                continue
            if rec.node and await self.node.alive(rec.id, rec.node):
                await self.sandboxes.transition(rec, "running", end_reason=None)
            elif not rec.node and rec.checkpoint:
                await self.sandboxes.transition(rec, "hibernated", end_reason=None)
            else:
                continue
            log.info("sandbox back with its node", extra={"sandbox": rec.id, "state": rec.state})
            back.append(rec)
        return back

    async def reap_once(self) -> None:
        """Enforce timeouts and idle policies; notice sandboxes that died on their own, and mark
        those of lost nodes."""
        await self._lost_nodes()
        now, mono = time.time(), time.monotonic()
        page = await self.store.list_sandboxes(None, ["running", "paused", "hibernated"], limit=1_000_000)
        reachable = set(self.fleet.ready())
        page.items = [r for r in page.items if (r.node_id or self.fleet.id) in reachable]
        live = {r.id for r in page.items}
        self._seen_dead = {k: t for k, t in self._seen_dead.items() if k in live}  # ended meanwhile
        dead = await self._dead_among(
            [
                r
                for r in page.items
                if r.state in ACTIVE and not (r.expires_at is not None and r.expires_at <= now)
            ]
        )
        for rec in page.items:
            try:
                if rec.expires_at is not None and rec.expires_at <= now:
                    if rec.on_timeout in ("hibernate", "hibernate_files") and rec.state in ACTIVE:
                        memory = rec.on_timeout == "hibernate"
                        await self.sandboxes.hibernate_record(rec, memory, stop_clock=True)
                    else:
                        await self.sandboxes.end(rec, "killed", "timeout", check="expired")
                elif rec.state == "hibernated":
                    continue
                elif rec.id in dead:
                    if mono - self._seen_dead.setdefault(rec.id, mono) >= DEAD_GRACE_S:
                        await self.sandboxes.end(
                            rec,
                            "error",
                            "sandbox stopped unexpectedly (its init process exited)",
                            check="dead",
                        )
                elif rec.state == "running" and self.sandboxes.durability.due(
                    rec, now, self.sandboxes.idle_for(rec, now, mono)
                ):
                    self.sandboxes.durability.start_periodic(rec, lambda r=rec: self.sandboxes.copy_now(r))
                elif (
                    rec.state == "running"
                    and rec.idle_timeout
                    and self.sandboxes.idle_for(rec, now, mono) >= rec.idle_timeout
                ):
                    await self._idle(rec)
                if rec.state in ACTIVE and bucket_mounts(rec):
                    await self._check_buckets(rec)
            except Exception:
                log.exception("reaper failed on sandbox %s", rec.id)

    async def _dead_among(self, active: list[SandboxRecord]) -> set[str]:
        """Which of the active sandboxes died on their own. At most ALIVE_CHECKS of them are
        checked per tick, in turn, in one pass off the event loop: with hundreds idle, checking
        every one each second cost the server more than their requests did."""
        if not active:
            return set()
        start = self._alive_turn % len(active)
        turn = (active[start:] + active[:start])[:ALIVE_CHECKS]
        self._alive_turn = start + len(turn)
        by_node: dict[str, list[SandboxRecord]] = {}
        for r in turn:
            by_node.setdefault(r.node_id, []).append(r)
        dead: set[str] = set()
        for node_id, group in by_node.items():  # one call per node
            try:
                dead |= set(await self.fleet.of(node_id).dead([(r.id, r.node) for r in group]))
            except (ApiError, NodeError) as e:  # out of reach: not dead; lost if it stays away
                log.info("cannot ask a node about its sandboxes", extra={"node": node_id, "error": str(e)})
        return dead

    async def _lost_nodes(self) -> None:
        """Mark the sandboxes of nodes whose heartbeat stopped as lost (not silently missing): what
        they held is out of reach. The node's own record says lost too, until it starts again."""
        now = time.time()
        for node in self.fleet.records():
            if node.id == self.fleet.id or node.state != "ready" or self.fleet.state(node, now) != "lost":
                continue
            await self.store.update_node(node.id, state="lost")
            page = await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)
            lost = [r for r in page.items if r.node_id == node.id]
            why = f"its node {node.id} stopped heartbeating at {time.strftime('%H:%M:%S', time.gmtime(node.seen_at))} UTC"
            for rec in lost:
                async with self.sandboxes.lock(rec.id):
                    fresh = await self.sandboxes.fresh(rec)
                    copy = copy_of(fresh)
                    if fresh.state not in LIVE or (fresh.state == "hibernated" and copy is not None):
                        continue  # a hibernated sandbox with a copy resumes from it, on any node
                    if copy is not None and fresh.state != "starting":
                        # Its last copy is its state now: at most `every` seconds of work are lost.
                        at = time.strftime("%H:%M:%S", time.gmtime(copy["at"]))
                        info = {
                            "memory": bool(copy.get("memory")),
                            "from_copy": True,
                            "reason": f"{why}; it resumes from its copy taken at {at} UTC",
                        }
                        await self.sandboxes.transition(fresh, "hibernated", node={}, checkpoint=info)
                    else:
                        await self.sandboxes.transition(fresh, "lost", end_reason=why)
            log.warning("node lost", extra={"node": node.id, "sandboxes": len(lost)})

    async def _check_buckets(self, rec: SandboxRecord) -> None:
        """Mark bucket mounts whose rclone is gone as `lost` (the sandbox sees ENOTCONN there);
        hibernate and resume, or a new sandbox, mounts them again."""
        served = [i for i, m in enumerate(rec.mounts) if m["type"] != "volume" and m.get("status") != "lost"]
        node = self.fleet.of(rec.node_id)
        if not served or all(await node.volumes.buckets_healthy(rec.id, served)):
            return
        async with self.sandboxes.lock(rec.id):  # checked again: a hibernation may have stopped it meanwhile
            fresh = await self.sandboxes.fresh(rec)
            if fresh.state not in ACTIVE:
                return
            healthy = await node.volumes.buckets_healthy(rec.id, served)
            lost = [i for i, ok in zip(served, healthy, strict=True) if not ok]
            if not lost:
                return
            mounts = [dict(m) for m in fresh.mounts]
            for i in lost:
                mounts[i]["status"] = "lost"
            await self.store.update_sandbox(rec.id, mounts=mounts)
            rec.mounts = mounts
        log.warning("bucket mount lost (its rclone exited)", extra={"sandbox": rec.id, "mounts": lost})

    async def _idle(self, rec: SandboxRecord) -> None:
        if rec.on_idle == "hibernate":
            await self.sandboxes.hibernate_record(rec)
            log.info("hibernated idle sandbox", extra={"sandbox": rec.id, "idle_timeout": rec.idle_timeout})
            return
        async with self.sandboxes.lock(rec.id):
            rec = await self.sandboxes.fresh(rec)
            if rec.state == "running":
                await self.fleet.of(rec.node_id).pause(rec.id)
                await self.sandboxes.transition(rec, "paused", end_reason=None)
                log.info("paused idle sandbox", extra={"sandbox": rec.id, "idle_timeout": rec.idle_timeout})

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval)
            try:
                if not await self.store.take_lease(LEASE, self.fleet.id, LEASE_TTL_S, time.time()):
                    continue  # another server reaps now
            except Exception:
                log.exception("taking the reaper's lease failed")
                continue
            try:
                await self.reap_once()
            except Exception:  # the next tick tries again: a failure must not end the reaper
                log.exception("reaper tick failed")
            self._collect_bucket_when_due()

    def _collect_bucket_when_due(self) -> None:
        """Every COVE_OBJECT_GC_EVERY s, in the background (it may wait for uploads to finish)."""
        s, node = self.settings, self.node
        if not s.object_gc_every_s or not node.durable.available() or (self._gc and not self._gc.done()):
            return
        if time.monotonic() - self._gc_at < s.object_gc_every_s:
            return
        self._gc_at = time.monotonic()

        async def collect() -> None:
            try:
                await self.sandboxes.durability.collect(node, s.object_gc_grace_s)
            except Exception:
                log.exception("collecting the object store's garbage failed")

        self._gc = asyncio.create_task(collect(), name="cove-object-gc")

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name="cove-reaper")

    async def stop(self) -> None:
        for task in (self._task, self._gc):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._task:
            with contextlib.suppress(Exception):  # the next server need not wait for it to expire
                await self.store.drop_lease(LEASE, self.fleet.id)
