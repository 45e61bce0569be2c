"""The sandbox lifecycle: create, look up, pause, resume, hibernate, kill and expire, through the
state machine (`states`); every lifecycle change of one sandbox holds its lock.

Sandboxes start through the one `Starter` (a cold create here, a pool refill, a template build);
snapshots and forks (`snapshots`), adoption and the reaper (`reaper`) and layer references
(`layer_refs`) are their own modules, acting on sandboxes through the verbs below.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cove import faults, stages
from cove.config import Settings
from cove.controlplane import audit
from cove.controlplane.admission import Admission, StartSlot
from cove.controlplane.auth import Caller
from cove.controlplane.durable import Durability, copy_of, why_not
from cove.controlplane.errors import GUEST_STATUS, ApiError, not_found
from cove.controlplane.fleet import Fleet
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.metrics import Metrics
from cove.controlplane.pools import Pools, pool_key
from cove.controlplane.quotas import Quotas
from cove.controlplane.schemas import CreateSandbox
from cove.controlplane.sources import BASE, Sources
from cove.controlplane.starter import Starter, new_sandbox_id
from cove.controlplane.states import ACTIVE, LIVE, ON_TIMEOUT, TRANSITIONS
from cove.controlplane.templates import start_template_service
from cove.controlplane.volumes import Volumes
from cove.network.egress_policy import Policy
from cove.node.base import Limits, NodeAgent, NodeError, SandboxSpec, TemplateSpec
from cove.node.guest_client import GuestClient, GuestError, GuestUnavailable
from cove.store.base import Page, SandboxRecord, Store

log = logging.getLogger("cove.sandboxes")

ACTIVITY_SHARED_S = 2.0  # a sandbox's use is written to a shared store at most this often


def bucket_mounts(rec: SandboxRecord) -> bool:
    """Has the sandbox S3 bucket mounts (FUSE: they cannot be checkpointed)?"""
    return any(m["type"] != "volume" for m in rec.mounts)


GUEST_SETTLE = 10.0  # seconds a failed guest call waits for a kill or hibernate under way to end


class _UseCopy(Exception):
    """Internal: resume from the sandbox's copy in the object store."""


class SandboxService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        fleet: Fleet,
        metrics: Metrics,
        starter: Starter,
        sources: Sources,
        refs: LayerRefs,
        pools: Pools,
        volumes: Volumes,
        quotas: Quotas,
        admission: Admission,
        audit_log: audit.AuditLog,
    ) -> None:
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.node = fleet.local  # this server's own node
        self.metrics = metrics
        self.starter = starter
        self.sources = sources
        self.refs = refs
        self.pools = pools
        self.volumes = volumes
        self.quotas = quotas
        self.admission = admission
        self.audit = audit_log
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.durability = Durability(store, refs)  # copies in the object store (docs/object-storage.md)
        self._activity: dict[str, float] = {}  # sandbox id -> monotonic time of its last API call
        self._shared: dict[str, float] = {}  # ...and of the last one written to the store
        self._writes: set[asyncio.Task[None]] = set()

    # -- what snapshots and the reaper act through ------------------------------------------
    def lock(self, sandbox_id: str) -> asyncio.Lock:
        """Held by every lifecycle change of the sandbox."""
        return self._locks[sandbox_id]

    def touch(self, sandbox_id: str) -> None:
        """Note an API call on the sandbox (its idle timeout restarts). With a shared store the
        other servers learn of it too (their reaper may be the one running), at most every
        ACTIVITY_SHARED_S per sandbox so that the exec path stays free of store writes."""
        mono = time.monotonic()
        self._activity[sandbox_id] = mono
        if self.fleet.shared and mono - self._shared.get(sandbox_id, -ACTIVITY_SHARED_S) >= ACTIVITY_SHARED_S:
            self._shared[sandbox_id] = mono
            task = asyncio.create_task(self._share_activity(sandbox_id))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _share_activity(self, sandbox_id: str) -> None:
        try:
            await self.store.update_sandbox(sandbox_id, active_at=time.time())
        except Exception:  # a missed note costs at most an early idle pause, which resumes on use
            log.warning("could not record a sandbox's activity", extra={"sandbox": sandbox_id}, exc_info=True)

    def idle_for(self, rec: SandboxRecord, now: float, mono: float) -> float:
        """Seconds since the sandbox was last used through any server (from `now`: wall clock,
        `mono`: monotonic; never noted here: from now on)."""
        idle = mono - self._activity.setdefault(rec.id, mono)
        if rec.active_at is not None:
            idle = min(idle, now - rec.active_at)
        return idle

    def node_of(self, rec: SandboxRecord) -> NodeAgent:
        """The node holding the sandbox (503 node_unavailable when it cannot be reached)."""
        return self.fleet.of(rec.node_id)

    # -- state machine ---------------------------------------------------------------------
    async def transition(self, rec: SandboxRecord, to: str, **fields: Any) -> None:
        if to not in TRANSITIONS[rec.state]:
            raise ApiError(409, "conflict", f"sandbox {rec.id} cannot go from {rec.state} to {to}")
        now = time.time()
        if not await self.store.update_sandbox(
            rec.id, expect_state=rec.state, state=to, updated_at=now, **fields
        ):
            raise ApiError(409, "conflict", f"sandbox {rec.id} changed state concurrently")
        log.info("sandbox %s", to, extra={"sandbox": rec.id, "from": rec.state, **fields})
        self.audit.transition(rec.tenant, rec.id, rec.state, to, fields.get("end_reason"))
        rec.state, rec.updated_at = to, now
        for k, v in fields.items():
            setattr(rec, k, v)

    # -- lookups -------------------------------------------------------------------------
    async def get(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        """The caller's sandbox, or 404 (also for another tenant's: ids must not leak)."""
        stages.mark("route")  # dependencies and the body's validation, since auth
        rec = await self.store.get_sandbox(sandbox_id)
        if rec is None or rec.tenant != who.tenant:
            raise not_found("sandbox", sandbox_id)
        stages.mark("store")
        return rec

    async def running(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        """The caller's sandbox, ready for work: a paused or hibernated one is resumed if it allows."""
        rec = await self.get(who, sandbox_id)
        self.touch(rec.id)
        if rec.state in ("paused", "hibernated"):
            if not rec.auto_resume:
                raise ApiError(
                    409,
                    rec.state,
                    f"sandbox {sandbox_id} is {rec.state}; resume it first (auto_resume is off)",
                )
            async with self.audit.action(
                who, "sandbox.resume", f"sandbox/{rec.id}", sandbox=rec.id, auto=True
            ):
                rec = await self._resume(rec)
        if rec.state != "running":
            why = f" ({rec.end_reason})" if rec.end_reason else ""
            raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}{why}")
        return rec

    async def lookup(self, sandbox_id: str) -> SandboxRecord | None:
        """Any tenant's sandbox: for front ends that authorise by the sandbox itself (its port
        URLs and their tokens), never for a caller's request."""
        return await self.store.get_sandbox(sandbox_id)

    async def lookup_any(self, states: list[str]) -> list[SandboxRecord]:
        """Every tenant's sandboxes in `states`: for front ends that find a sandbox by a secret only
        it can have made (a signed URL naming no sandbox), never for a caller's request."""
        out: list[SandboxRecord] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_sandboxes(None, states, None, 1000, cursor)
            out.extend(page.items)
            if not page.next_cursor:
                return out
            cursor = page.next_cursor

    async def stats(self, rec: SandboxRecord) -> dict[str, Any]:
        """Resource use of a sandbox with processes (memory, cpu, pids, disk)."""
        return await self.node_of(rec).stats(rec.id)

    def can_checkpoint(self, rec: SandboxRecord) -> bool:
        """Can the sandbox keep its processes (memory snapshots, hibernation, forks) on its node?"""
        return self.node_of(rec).checkpoints.available(rec.runtime or "namespaces")

    def guest(self, rec: SandboxRecord) -> GuestClient:
        client = self.node_of(rec).guest(rec.id)
        stages.mark("node")
        return client

    def port_opener(self, rec: SandboxRecord) -> Callable[[int], Awaitable[socket.socket]]:
        """Connects to a port on the running sandbox's loopback, on the node that holds it; a
        node out of reach raises ConnectionError (the proxy answers 502 naming it)."""
        handle = dict(rec.node)

        async def connect(port: int) -> socket.socket:
            try:
                return await self.node_of(rec).network.connect(rec.id, handle, port)
            except (ApiError, NodeError) as e:
                raise ConnectionError(str(e)) from e

        return connect

    async def list(
        self, who: Caller, states: list[str] | None, metadata: dict[str, str], limit: int, cursor: str | None
    ) -> Page:
        try:
            return await self.store.list_sandboxes(who.tenant, states, metadata, limit, cursor)
        except ValueError as e:
            raise ApiError(422, "validation_error", f"cursor: {e}") from e

    @audit.audited("sandbox.create", audit.created)
    async def create(
        self,
        who: Caller,
        req: CreateSandbox,
        network: dict[str, Any] | None = None,
        here: bool = False,
        on: str | None = None,
    ) -> SandboxRecord:
        """`network`: the record's whole network settings instead of `req.network` (front ends and
        forks keep keys of their own there); its policy is validated here. A create takes a warm
        sandbox from its source's pool when it can (docs/pools.md), else starts one. `here`: on
        this server's node, not where the fleet would place it (the kubelet: the scheduler chose).
        `on`: on that node (a fork's choice); its source must be there or in the object store.
        A node that is full or low on memory or pids refuses: 503 with Retry-After (`Fleet.refusal`)."""
        started = time.perf_counter()
        network = req.network.record() if network is None else dict(network)
        try:
            Policy.of_record(network, strict=True)
        except ValueError as e:
            raise ApiError(422, "validation_error", f"network: {e}") from e
        if req.snapshot_every:
            self._check_durable()
        async with self.refs.held():  # the source's layers cannot be collected meanwhile
            home = await self.sources.home(who, req.template, req.snapshot)  # where its files are
            template, defaults = await self.sources.of(who, req.template, req.snapshot)
            stages.mark("template")
            timeout = self.settings.default_timeout if req.timeout is None else req.timeout
            dl = defaults.get("limits", {})
            limits = Limits(
                cpu=req.cpu if req.cpu is not None else dl.get("cpu"),
                memory_mb=req.memory_mb or dl.get("memory_mb") or self.settings.default_memory_mb,
                pids=req.pids or dl.get("pids") or self.settings.default_pids,
                disk_mb=req.disk_mb if req.disk_mb is not None else dl.get("disk_mb"),
            )
            limits = await self.quotas.with_default_cpu(who.tenant, limits)
            stages.mark("quota defaults")
            runtime = req.runtime or defaults.get("runtime") or "namespaces"
            # Pooled sandboxes have no volumes, mounts or disk limit: those start cold.
            mounts = bool(req.volumes or req.mounts or defaults.get("volumes"))
            poolable = runtime == "namespaces" and not (mounts or limits.disk_mb)
            # A tenant's snapshots and templates are its own: so are their pools (the base one is shared).
            owned = req.snapshot is not None or template.name != BASE
            key = pool_key(who.tenant if owned else None, req.snapshot or template.name)
            # Warm members and volumes are this server's node's (docs/fleet.md).
            local = home in (None, "", self.fleet.id)
            # A warm member is this node's sandbox: none while this node is full (placement then
            # finds another node, or says why none).
            warm = (
                poolable
                and local
                and on in (None, self.fleet.id)
                and await self.fleet.has_room(self.fleet.id)
            )
            member = self.pools.take(key) if warm else None
            if member is not None:
                node_id = self.fleet.id
            elif mounts or here:
                if not local:
                    what = "volumes are" if mounts else "this sandbox is"
                    raise ApiError(
                        409,
                        "not_supported",
                        f"{what} kept on this server's node, and {req.snapshot or template.name!r} lives "
                        f"on node {home}: create it through that node's server",
                    )
                node_id = await self.fleet.place(runtime, self.fleet.id)  # 503 if this node is full
            else:
                if on is not None and home not in (None, on):
                    raise ApiError(
                        409, "not_supported", f"{req.snapshot or template.name!r} is not on node {on}"
                    )
                node_id = await self.fleet.place(runtime, on or home)
                if home is None and node_id != self.fleet.id:  # that node's own base layers
                    template, defaults = await self.sources.of(
                        who, req.template, req.snapshot, self.fleet.of(node_id)
                    )
            try:
                self._runtime(self.fleet.of(node_id), runtime, network)
            except ApiError:
                if member is not None:
                    await self.pools.discard(member)
                raise
            now = time.time()
            rec = SandboxRecord(
                id=member.id if member else new_sandbox_id(),
                tenant=who.tenant,
                template=template.name,
                state="starting",
                runtime=runtime,
                created_at=now,
                updated_at=now,
                expires_at=now + timeout if timeout else None,
                timeout=timeout,
                metadata=dict(req.metadata),
                env={**defaults.get("env", {}), **req.env},
                user=req.user or defaults.get("user") or "user",
                workdir=req.workdir or defaults.get("workdir") or "/home/user",
                limits={
                    "cpu": limits.cpu,
                    "memory_mb": limits.memory_mb,
                    "pids": limits.pids,
                    "disk_mb": limits.disk_mb,
                },
                layers=list(member.layers if member else template.layers),
                auto_resume=req.auto_resume,
                idle_timeout=req.idle_timeout,
                on_idle=req.on_idle,
                on_timeout=req.on_timeout,
                network=network,
                template_config=defaults.get("template_config") or {},
                node_id=node_id,
                durable={"every": req.snapshot_every} if req.snapshot_every else {},
            )
            if member is not None:
                try:
                    async with self.quotas.admit(who.tenant, limits):
                        claimed = await self._claim(rec, template, member)
                except BaseException:  # over quota, or interrupted: never leave it half-claimed
                    await asyncio.shield(self.pools.discard(member))
                    raise
                if claimed:
                    self.metrics.create_seconds.observe(time.perf_counter() - started)
                    return rec
                rec.id, rec.layers = new_sandbox_id(), list(template.layers)
            if defaults.get("checkpoint") and (req.volumes or req.mounts):
                raise ApiError(
                    422,
                    "validation_error",
                    "a sandbox restored with its processes has its snapshot's mounts: volumes and mounts "
                    "cannot be added",
                )
            # A cold start takes a start slot, or waits for one; 503 server_busy if too many wait.
            slot = self.admission.start_slot()
            try:
                async with self.volumes.lock, self.quotas.admit(who.tenant, limits):
                    # its volumes cannot be deleted until it is recorded
                    rec.mounts, node_mounts, made = await self.volumes.resolve(
                        who, rec, req, defaults.get("volumes", [])
                    )
                    try:
                        await self.store.insert_sandbox(rec)
                    except BaseException:
                        await self.volumes.drop(made)
                        raise
            except BaseException:
                slot.release()
                raise
        try:
            await self._create_cold(rec, template, defaults, node_mounts, made, slot)
        finally:
            slot.release()
        self.metrics.create_seconds.observe(time.perf_counter() - started)
        return rec

    async def _claim(self, rec: SandboxRecord, template: TemplateSpec, member: Any) -> bool:
        """Make a pooled sandbox `rec`'s (env, user, workdir, limits, egress policy) and record it
        as running; False if the member could not be used (the create then starts one cold)."""
        stages.mark("quota admit")
        handle = await self.pools.claim(member, self._node_spec(rec, template))
        stages.mark("claim")
        if handle is None:
            return False
        await self.node_of(rec).network.set_policy(rec.id, rec.network)
        stages.mark("egress policy")
        rec.state, rec.node = "running", handle
        await self.store.insert_sandbox(rec)
        stages.mark("store insert")
        self.pools.handed_over(member)
        log.info("sandbox running", extra={"sandbox": rec.id, "from": "pool", "pool": member.id})
        return True

    async def _create_cold(
        self,
        rec: SandboxRecord,
        template: TemplateSpec,
        defaults: dict[str, Any],
        node_mounts: list[dict[str, Any]],
        made: Any,
        slot: StartSlot,
    ) -> None:
        async with self._locks[rec.id]:
            faults.point("create.recorded")
            try:
                await slot.wait()  # recorded as starting meanwhile: it counts against the tenant's quota
                # With a checkpoint, processes continue from the snapshot's instant.
                handle = await self.starter.start(
                    self._node_spec(rec, template, node_mounts),
                    rec.network,
                    pull=defaults.get("durable") is True,
                    checkpoint=defaults.get("checkpoint"),
                    node=self.node_of(rec),
                )
                if defaults.get("start") and not defaults.get("checkpoint"):  # a cold template's service
                    await start_template_service(self.guest(rec), rec, defaults["start"])
            except (NodeError, OSError) as e:
                why = f"snapshot {defaults['snapshot']}: {e}" if defaults.get("snapshot") else str(e)
                await self.transition(rec, "error", end_reason=why[:2000])
                await self.volumes.drop(made)
                raise ApiError(503, "sandbox_failed", why) from e
            except BaseException:
                # Cancelled (client went away) or a bug: never leave half a sandbox behind.
                with contextlib.suppress(Exception):
                    await self.node_of(rec).kill(rec.id, None)
                with contextlib.suppress(Exception):
                    await self.transition(rec, "error", end_reason="creation interrupted")
                raise
            faults.point("create.launched")
            await self.transition(rec, "running", node=handle)

    def _runtime(self, node: NodeAgent, runtime: str, network: dict[str, Any]) -> str:
        """`runtime` if `node` runs it with these network settings (docs/runtimes.md), else 409."""
        problem = node.runtime_problem(runtime)
        if problem:
            raise ApiError(409, "runtime_unavailable", problem)
        if network.get("mode", "none") != "none" and not node.egress(runtime):
            raise ApiError(
                409,
                "not_supported",
                f"network egress is not supported by the {runtime} runtime (mode none only)",
            )
        return runtime

    def _node_spec(
        self, rec: SandboxRecord, template: TemplateSpec, mounts: list[dict[str, Any]] | None = None
    ) -> SandboxSpec:
        """The spec with its mounts (`mounts`: with a bucket's credentials, at create only)."""
        return dataclasses.replace(
            self._spec(rec, template), mounts=tuple(rec.mounts if mounts is None else mounts)
        )

    def _spec(self, rec: SandboxRecord, template: TemplateSpec) -> SandboxSpec:
        config = rec.template_config or template.config  # a built template's own root (binds)
        chain = TemplateSpec(name=template.name, layers=tuple(rec.layers), config=config)
        return self.starter.spec(
            rec.id, chain, rec.env, rec.user, rec.workdir, Limits(**rec.limits), rec.runtime or "namespaces"
        )

    # -- egress --------------------------------------------------------------------------
    async def open_egress(self, rec: SandboxRecord, handle: dict[str, Any]) -> None:
        """Open the egress proxy in the namespace of the processes started with `handle`."""
        await self.starter.open_egress(rec.id, rec.runtime, handle, rec.network, self.node_of(rec))

    async def network_status(self, who: Caller, sandbox_id: str) -> tuple[SandboxRecord, dict[str, Any]]:
        rec = await self.get(who, sandbox_id)
        return rec, await self.node_of(rec).network.status(rec.id)

    @audit.audited("sandbox.network", audit.network_set)
    async def set_network(
        self, who: Caller, sandbox_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> SandboxRecord:
        """Replace the sandbox's network settings with `change(current)`; new connections follow
        the new policy at once (a hibernated sandbox gets it when it resumes)."""
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state not in LIVE:
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
            network = change(dict(rec.network))
            self._runtime(self.node_of(rec), rec.runtime or "namespaces", network)
            try:
                policy = Policy.of_record(network, strict=True)
            except ValueError as e:
                raise ApiError(422, "validation_error", f"network: {e}") from e
            await self.store.update_sandbox(rec.id, network=network)
            rec.network = network
            await self.node_of(rec).network.set_policy(rec.id, network)
        log.info("network policy set", extra={"sandbox": rec.id, **policy.as_dict()})
        return rec

    # -- kill / timeout ------------------------------------------------------------------
    @audit.audited("sandbox.kill")
    async def kill(self, who: Caller, sandbox_id: str) -> None:
        rec = await self.get(who, sandbox_id)
        await self.end(rec, "killed", "killed by request")

    async def end(self, rec: SandboxRecord, state: str, reason: str, check: str | None = None) -> None:
        """End a sandbox. `check` re-verifies, under its lock, why a background task wanted it ended
        ("dead" or "expired"): its view of the sandbox may be stale by then (it may have been
        hibernated, resumed or given more time meanwhile)."""
        async with self._locks[rec.id]:
            fresh = await self.store.get_sandbox(rec.id)
            if fresh is not None and fresh.state == "lost" and check is None:
                # Out of reach: recorded now; its node removes it when it returns (adoption).
                await self.transition(fresh, state, end_reason=reason)
                return
            if fresh is None or fresh.state not in LIVE:
                return  # already ended: kill is idempotent
            node = self._reachable(fresh)
            if node is None and check is None:
                await self._end_unreachable(fresh, state, reason, "its node is not reachable")
                return
            node = node or self.node_of(fresh)  # a background check: 503 and it tries again later
            if check == "dead" and (fresh.state not in ACTIVE or await node.alive(fresh.id, fresh.node)):
                return
            if check == "expired" and (fresh.expires_at is None or fresh.expires_at > time.time()):
                return
            try:
                await self.starter.stop(fresh.id, fresh.node, node)
            except NodeError as e:
                if check is not None:
                    raise
                await self._end_unreachable(fresh, state, reason, str(e))
                return
            faults.point("kill.stopped")
            try:
                await self.transition(fresh, state, end_reason=reason)
            except ApiError as e:
                # Another server ended it meanwhile (its reaper saw the processes gone while this kill
                # stopped them: the sandbox lock is per server). Ended is what was asked: done.
                now = await self.store.get_sandbox(rec.id)
                if e.status != 409 or (now is not None and now.state in LIVE):
                    raise
            await self._forget_copy(fresh, node)
        self._locks.pop(rec.id, None)
        self._activity.pop(rec.id, None)
        self._shared.pop(rec.id, None)
        self.refs.collect_soon()

    async def _end_unreachable(self, rec: SandboxRecord, state: str, reason: str, why: str) -> None:
        """A kill of a sandbox whose node does not answer: recorded now, as for a lost node; the node
        removes the sandbox when it is back (adoption sweeps what no live record names)."""
        log.warning("sandbox ended while its node is out of reach", extra={"sandbox": rec.id, "error": why})
        await self.transition(
            rec, state, end_reason=f"{reason} (its node {rec.node_id} did not answer: {why})"[:2000]
        )
        await self._forget_copy(rec, self.node)

    async def _forget_copy(self, rec: SandboxRecord, node: NodeAgent) -> None:
        """An ended sandbox's copy goes from the bucket (any node with the store can delete it)."""
        if (copy := copy_of(rec)) is not None:
            await self.durability.forget(copy, node, keep=set(rec.layers))

    async def set_timeout(
        self, who: Caller, sandbox_id: str, timeout: int | None, on_timeout: str | None = None
    ) -> SandboxRecord:
        """End the sandbox `timeout` seconds from now (0: never; None: keep its end), and with
        `on_timeout` change what its end does (kill | hibernate | hibernate_files)."""
        if on_timeout not in (None, *ON_TIMEOUT):
            raise ApiError(
                422,
                "validation_error",
                f"on_timeout: expected kill, hibernate or hibernate_files, got {on_timeout!r}",
            )
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state not in LIVE:
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
            fields: dict[str, Any] = {}
            if timeout is not None:
                fields.update(timeout=timeout, expires_at=time.time() + timeout if timeout else None)
            if on_timeout is not None:
                fields["on_timeout"] = on_timeout
            if fields and not await self.store.update_sandbox(rec.id, expect_state=rec.state, **fields):
                raise ApiError(409, "conflict", f"sandbox {rec.id} changed state concurrently")
            for k, v in fields.items():
                setattr(rec, k, v)
        return rec

    def _check_durable(self) -> None:
        if not self.settings.object_store:
            raise ApiError(
                409,
                "no_object_store",
                "periodic copies need an object store: start the server with COVE_OBJECT_STORE "
                "(docs/object-storage.md)",
            )

    @audit.audited("sandbox.durability")
    async def set_durability(self, who: Caller, sandbox_id: str, every: int) -> SandboxRecord:
        """Copy the sandbox to the object store every `every` seconds of use (0: stop)."""
        if every:
            self._check_durable()
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state not in LIVE:
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
            if every and (why := why_not(rec, self.node_of(rec))):
                raise ApiError(409, "not_supported", f"sandbox {rec.id} cannot be copied: {why}")
            rec.durable = {**(rec.durable or {}), "every": every}
            await self.store.update_sandbox(rec.id, durable=rec.durable)
        return rec

    # -- pause / resume ------------------------------------------------------------------
    @audit.audited("sandbox.pause")
    async def pause(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        """Freeze the sandbox: no CPU, memory kept. Pausing a paused sandbox is a no-op."""
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state == "running":
                await self.node_of(rec).pause(rec.id)
                faults.point("pause.frozen")
                await self.transition(rec, "paused")
            elif rec.state != "paused":
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
        return rec

    @audit.audited("sandbox.resume")
    async def resume(self, who: Caller, sandbox_id: str, memory: bool = True) -> SandboxRecord:
        """`memory=False`: a hibernated sandbox's processes start afresh on its files, even where
        its memory was kept."""
        rec = await self.get(who, sandbox_id)
        self.touch(rec.id)
        if not memory:
            await self._forget_memory(rec)
        return await self._resume(rec)

    async def _forget_memory(self, rec: SandboxRecord) -> None:
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state != "hibernated" or not rec.checkpoint.get("memory"):
                return
            info = {"memory": False, "reason": "resumed without memory: processes started afresh"}
            await self.store.update_sandbox(rec.id, expect_state="hibernated", checkpoint=info)
            await self.node_of(rec).checkpoints.drop(rec.id)

    def _reachable(self, rec: SandboxRecord) -> NodeAgent | None:
        """The node holding the sandbox, or None when it cannot be reached now (lost, gone)."""
        try:
            return self.node_of(rec)
        except ApiError:
            return None

    async def _resume_on(self, rec: SandboxRecord, node: NodeAgent) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start a hibernated sandbox again on the node that kept its files (and image)."""
        spec = self._node_spec(rec, await node.base_template())
        info = dict(rec.checkpoint)
        handle = None
        policy = rec.network
        if info.get("memory"):
            try:
                handle = await self.starter.start(spec, policy, checkpoint=rec.id, resume=True, node=node)
                info["restored"] = True
            except (NodeError, OSError) as e:
                # Files are intact: start afresh rather than leave the workspace unreachable.
                log.warning(
                    "restoring processes failed; restarting them", extra={"sandbox": rec.id, "error": str(e)}
                )
                info.update(restored=False, error=str(e)[:500])
        if handle is None:
            try:
                handle = await self.starter.start(spec, policy, kept_files=True, node=node)
            except (NodeError, OSError) as e:
                raise ApiError(503, "resume_failed", f"sandbox {rec.id} could not be resumed: {e}") from e
        return handle, info

    async def _resume_from_copy(
        self, rec: SandboxRecord, copy: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Start a hibernated sandbox from its copy in the object store, on whichever node the fleet
        places it (its own node is gone, or lost its files). Returns the handle, the checkpoint info
        and the record's new fields (node_id, layers)."""
        node_id = await self.fleet.place(rec.runtime or "namespaces")
        node = self.fleet.of(node_id)
        layers = list(copy["layers"])
        moved = dataclasses.replace(rec, layers=layers)
        spec = self._node_spec(moved, await node.base_template())
        key = copy.get("key") if copy.get("memory") else None
        info: dict[str, Any] = {**rec.checkpoint, "from_copy": True, "copied_at": copy.get("at")}
        try:
            await node.kill(rec.id, None)  # whatever an earlier life left there (idempotent)
            got = await node.durable.pull(layers, key)
            info["pulled_s"] = got.get("seconds")
            if key:
                handle = await self.starter.start(spec, rec.network, checkpoint=key, node=node)
                info["restored"] = True
            else:
                handle = await self.starter.start(spec, rec.network, node=node)
                info["restored"] = False
        except (NodeError, OSError) as e:
            raise ApiError(
                503, "resume_failed", f"sandbox {rec.id} could not be resumed from its copy on {node_id}: {e}"
            ) from e
        log.info("resumed from its copy", extra={"sandbox": rec.id, "node": node_id, "from": rec.node_id})
        return handle, info, {"node_id": node_id, "layers": layers}

    async def _resume(self, rec: SandboxRecord) -> SandboxRecord:
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state == "paused":
                await self.node_of(rec).resume(rec.id)
                faults.point("resume.thawed")
                await self.transition(rec, "running")
            elif rec.state == "hibernated":
                await self.quotas.check(rec.tenant, Limits(**rec.limits))  # it will hold resources again
                copy = copy_of(rec)
                home = None if rec.checkpoint.get("from_copy") else self._reachable(rec)
                if home is None and copy is None:
                    self.node_of(rec)  # raises: why its node cannot be reached
                fields: dict[str, Any] = {}
                try:
                    if home is None:
                        raise _UseCopy
                    node = home
                    handle, info = await self._resume_on(rec, home)
                except (_UseCopy, ApiError, NodeError) as e:
                    # Its node gone, unreachable, or without its files: from the copy, on any node.
                    if copy is None:
                        raise
                    if not isinstance(e, _UseCopy):
                        log.warning(
                            "resuming on its node failed; resuming from its copy",
                            extra={"sandbox": rec.id, "error": str(e)},
                        )
                    handle, info, fields = await self._resume_from_copy(rec, copy)
                    node = self.fleet.of(fields["node_id"])
                faults.point("resume.restored")
                remounted = [m if m["type"] == "volume" else {**m, "status": "mounted"} for m in rec.mounts]
                await self.transition(
                    rec, "running", node=handle, checkpoint=info, mounts=remounted, **fields
                )
                for k, v in fields.items():
                    setattr(rec, k, v)
                # Only once the record no longer needs it: a crash before this leaves an unreferenced
                # checkpoint (collected at start), never a hibernated record without its image.
                await node.checkpoints.drop(rec.id)
                if copy is not None:  # a copy is of one sleep: the next hibernate or periodic copy makes anew
                    if copy.get("key"):
                        await node.checkpoints.drop(copy["key"])
                    await self.durability.record(rec, None, node)
            elif rec.state != "running":
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            if rec.timeout and rec.expires_at is None:
                # Its clock was stopped while it slept (a timeout that hibernated it): restart it.
                rec.expires_at = time.time() + rec.timeout
                await self.store.update_sandbox(rec.id, expires_at=rec.expires_at)
        return rec

    # -- hibernate -----------------------------------------------------------------------
    @audit.audited("sandbox.hibernate")
    async def hibernate(
        self, who: Caller, sandbox_id: str, memory: bool = True, stop_clock: bool = False
    ) -> SandboxRecord:
        """`memory=False`: keep only the files (processes start afresh on resume). `stop_clock`:
        no timeout runs while it sleeps; resume restarts it (e2b's paused sandboxes)."""
        rec = await self.get(who, sandbox_id)
        return await self.hibernate_record(rec, memory, stop_clock)

    async def hibernate_record(
        self, rec: SandboxRecord, memory: bool = True, stop_clock: bool = False
    ) -> SandboxRecord:
        """Release the sandbox's memory and CPU, keeping its files; resume starts it again."""
        async with self._locks[rec.id]:
            rec = await self.fresh(rec)
            if rec.state == "hibernated":
                return rec
            if rec.state not in ACTIVE:
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            # The proxy's sockets are not the sandbox's to dump, and they would pin its old namespace.
            await self.node_of(rec).network.detach(rec.id)
            clock = {"expires_at": None} if stop_clock else {}
            node = self.node_of(rec)
            if memory and node.checkpoints.available(rec.runtime) and not bucket_mounts(rec):
                try:
                    await node.checkpoints.hibernate(rec.id, rec.node)
                except (NodeError, OSError) as e:
                    await self.open_egress(rec, rec.node)
                    raise ApiError(
                        503, "hibernate_failed", f"hibernating {rec.id} failed, it is still {rec.state}: {e}"
                    ) from e
                faults.point("hibernate.dumped")
                info: dict[str, Any] = {"memory": True}
            else:
                await node.stop(rec.id)
                reason = (
                    "hibernated without memory (filesystem only): processes restart on resume"
                    if not memory
                    else "bucket mounts (FUSE) cannot be checkpointed: processes restart on resume"
                    if bucket_mounts(rec)
                    else f"the {rec.runtime} runtime cannot checkpoint processes: they restart on resume"
                    if rec.runtime != "namespaces"
                    else "no CRIU >= 4.1 on this node: processes restart on resume"
                )
                info = {"memory": False, "reason": reason}
            await self._copy_hibernated(rec, node, info)
            await self.transition(rec, "hibernated", node={}, checkpoint=info, **clock)
        return rec

    async def _copy_hibernated(self, rec: SandboxRecord, node: NodeAgent, info: dict[str, Any]) -> None:
        """With an object store, a hibernated sandbox's copy goes there before the call returns: from
        then on losing its node loses nothing of it. A failed copy keeps the sandbox hibernated
        here (`info` says why there is no copy)."""
        if not self.settings.object_store or why_not(rec, node) is not None:
            return
        try:
            copy = await self.durability.copy_hibernated(rec, node, bool(info.get("memory")))
        except (NodeError, OSError) as e:
            log.warning("copying a hibernated sandbox failed", extra={"sandbox": rec.id, "error": str(e)})
            info["copy_error"] = str(e)[:500]
            return
        faults.point("hibernate.copied")
        await self.durability.record(rec, copy, node)

    async def copy_now(self, rec: SandboxRecord) -> None:
        """A periodic copy of a running sandbox (docs/object-storage.md); failures are logged (the
        previous copy stays its copy)."""
        try:
            node = self.node_of(rec)
            if why_not(rec, node) is not None:
                return
            memory = self.can_checkpoint(rec) and not bucket_mounts(rec)
            copy = await self.durability.copy_running(rec, node, memory, self._locks[rec.id])
            if copy is None:
                return
            async with self._locks[rec.id]:
                fresh = await self.fresh(rec)
                if fresh.state not in ACTIVE:  # killed or hibernated meanwhile: it has its own now
                    await self.durability.forget(copy, node, keep=set(fresh.layers))
                    return
                await self.durability.record(fresh, copy, node)
            log.info("periodic copy made", extra={"sandbox": rec.id, "seconds": copy["seconds"]})
        except (ApiError, NodeError, OSError) as e:
            log.warning("a periodic copy failed", extra={"sandbox": rec.id, "error": str(e)})

    async def fresh(self, rec: SandboxRecord) -> SandboxRecord:
        fresh = await self.store.get_sandbox(rec.id)
        if fresh is None:
            raise not_found("sandbox", rec.id)
        return fresh

    async def guest_failure(self, rec: SandboxRecord, exc: GuestError | GuestUnavailable) -> ApiError:
        """What a failed guest call means to the caller, for every front end to word its own way:
        the guest's error code as a 4xx; silence as 409 `not_running` when the sandbox died (it is
        marked so) or 503 `guest_unavailable` when it lives but did not answer."""
        if isinstance(exc, GuestError):
            return ApiError(GUEST_STATUS.get(exc.code, 500), exc.code, exc.message)
        if not await self.check_alive(rec):
            return ApiError(409, "not_running", f"sandbox {rec.id} stopped while the call ran")
        lock = self._locks.get(rec.id)
        if lock is not None and lock.locked():
            # A kill, hibernate or pause under way cut the call: say what it made of the sandbox.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GUEST_SETTLE):
                    async with lock:
                        pass
            fresh = await self.store.get_sandbox(rec.id)
            if fresh is None or fresh.state not in ACTIVE:
                state = fresh.state if fresh is not None else "gone"
                return ApiError(
                    409, "not_running", f"sandbox {rec.id} is {state}: it stopped while the call ran"
                )
        return ApiError(503, "guest_unavailable", f"the sandbox's guest agent did not answer: {exc}")

    @contextlib.asynccontextmanager
    async def guest_errors(self, rec: SandboxRecord) -> AsyncIterator[None]:
        """Around calls to the sandbox's guest: their failures raised as `guest_failure`'s ApiError."""
        try:
            yield
        except (GuestError, GuestUnavailable) as e:
            raise await self.guest_failure(rec, e) from e

    async def check_alive(self, rec: SandboxRecord) -> bool:
        """After the guest stopped answering: mark a dead sandbox as such (and free it)."""
        if await self.node_of(rec).alive(rec.id, rec.node):
            return True
        await self.end(rec, "error", "sandbox stopped unexpectedly (its init process exited)", check="dead")
        return await self.node_of(rec).alive(rec.id, rec.node)

    # -- background work -----------------------------------------------------------------
