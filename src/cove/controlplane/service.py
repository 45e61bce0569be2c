"""The sandbox state machine: create, look up, kill, expire, adopt after a restart.

States and the only transitions allowed (persisted in the store, compare-and-set):
    starting -> running | error
    running    -> paused | hibernated | killed | error
    paused     -> running | hibernated | killed | error
    hibernated -> running | killed | error
Every lifecycle change of one sandbox holds its lock. Committed layers are shared by templates,
snapshots and sandboxes, and are deleted (`collect_layers`) once none of them references a layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from cove import faults
from cove.config import Settings
from cove.controlplane import audit
from cove.controlplane.admission import Admission, StartSlot
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.metrics import Metrics
from cove.controlplane.pools import PoolConfig, Pools, pool_key
from cove.controlplane.quotas import Quotas
from cove.controlplane.schemas import CreateSandbox
from cove.controlplane.templates import Templates, start_template_service
from cove.controlplane.volumes import Volumes
from cove.network.egress import Egress, parse_hosts, proxy_env
from cove.network.egress_policy import Policy
from cove.node.base import Limits, NodeAgent, NodeError, SandboxSpec, TemplateSpec
from cove.node.guest_client import GuestClient
from cove.store.base import Page, SandboxRecord, SnapshotRecord, Store

log = logging.getLogger("cove.sandboxes")

TRANSITIONS = {
    "starting": {"running", "error"},
    "running": {"paused", "hibernated", "killed", "error"},
    "paused": {"running", "hibernated", "killed", "error"},
    "hibernated": {"running", "killed", "error"},
    "killed": set(),
    "error": set(),
}
LIVE = ("starting", "running", "paused", "hibernated")  # states that hold resources
ACTIVE = ("running", "paused")  # states with processes
ALIVE_CHECKS = 64  # sandboxes the reaper checks for a death of their own per tick (in turn)
COLLECT_AFTER = 0.5  # seconds from a kill to the layer collection it asks for (see _collect_soon)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


_NO_FUSE_CHECKPOINT = (
    "sandbox {} has bucket mounts: FUSE mounts cannot be checkpointed (no fork or memory snapshot); "
    "take a snapshot without memory, or mount the bucket in a new sandbox"
)


def _buckets(rec: SandboxRecord) -> bool:
    return any(m["type"] != "volume" for m in rec.mounts)


def new_sandbox_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(16))


class SandboxService:
    def __init__(self, settings: Settings, store: Store, node: NodeAgent, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.node = node
        self.metrics = metrics
        self.audit = audit.AuditLog(store, settings.audit_retention_days)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._activity: dict[str, float] = {}  # sandbox id -> monotonic time of its last API call
        self._alive_turn = 0  # where the reaper's next liveness checks start (see _dead_among)
        self._layer_refs = asyncio.Lock()  # held while layer references are read or added
        self._background: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None  # see _collect_soon
        self._collect_wanted = False
        self._stopped = False
        self.volumes = Volumes(settings, store, node)
        self.layer_pins: Counter[str] = Counter()  # layers a template build holds (not yet recorded)
        self.layer_makers = 0  # builds making layers that are not pinned yet: collection waits
        self.templates = Templates(self)
        # Each running sandbox's way out (docs/network.md): a proxy listening in its namespace.
        self.egress = Egress(
            settings.egress_port,
            parse_hosts(settings.egress_hosts),
            settings.port,
            lambda result: metrics.egress.labels(result).inc(),
        )
        self.admission = Admission(settings, metrics.registry)
        self.quotas = Quotas(store)
        # Warm pools (docs/pools.md): they resolve sources and build specs the way create does.
        self.pools = Pools(
            node,
            self._pool_source,
            self._pool_spec,
            lambda sid, handle: self.egress.attach(sid, handle, Policy.of_record({})),
            lambda sid: self.egress.detach(sid, forget=True),
            new_sandbox_id,
            self._may_fill,
            settings.pool_idle,
            metrics.registry,
        )

    # -- state machine ---------------------------------------------------------------------
    async def _transition(self, rec: SandboxRecord, to: str, **fields: Any) -> None:
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
        rec = await self.store.get_sandbox(sandbox_id)
        if rec is None or rec.tenant != who.tenant:
            raise not_found("sandbox", sandbox_id)
        return rec

    async def running(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        """The caller's sandbox, ready for work: a paused or hibernated one is resumed if it allows."""
        rec = await self.get(who, sandbox_id)
        self._activity[rec.id] = time.monotonic()
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

    def guest(self, rec: SandboxRecord) -> GuestClient:
        return self.node.guest(rec.id)

    async def list(
        self, who: Caller, states: list[str] | None, metadata: dict[str, str], limit: int, cursor: str | None
    ) -> Page:
        try:
            return await self.store.list_sandboxes(who.tenant, states, metadata, limit, cursor)
        except ValueError as e:
            raise ApiError(422, "validation_error", f"cursor: {e}") from e

    # -- create --------------------------------------------------------------------------
    async def _source(self, who: Caller, req: CreateSandbox) -> tuple[TemplateSpec, dict[str, Any]]:
        """The layers and defaults a new sandbox starts from; `checkpoint` names a memory image."""
        """The layers and defaults a new sandbox starts from: a template, or a snapshot."""
        base = await self.node.base_template()
        if req.snapshot is None:
            if req.template != base.name:
                built = await self.templates.source(who, req.template)  # docs/templates.md
                if built is None:
                    raise not_found("template", req.template)
                return built
            return base, {"env": {}, "user": base.config.get("user"), "workdir": base.config.get("workdir")}
        snap = await self.get_snapshot(who, req.snapshot)
        template = TemplateSpec(
            name=snap.config.get("template", base.name),
            layers=tuple(snap.layers),
            config=snap.config.get("template_config") or base.config,
        )
        return template, {**snap.config, "checkpoint": snap.id if snap.memory else None}

    async def _pool_source(self, pool: PoolConfig) -> tuple[TemplateSpec, dict[str, Any]]:
        """What a pool's members start from: its snapshot or template, as its tenant sees them."""
        who = Caller("pool", pool.tenant or "", False)
        if pool.kind == "snapshot":
            return await self._source(who, CreateSandbox(snapshot=pool.name))
        return await self._source(who, CreateSandbox(template=pool.name))

    def _pool_spec(self, sid: str, template: TemplateSpec, defaults: dict[str, Any]) -> SandboxSpec:
        dl = defaults.get("limits") or {}
        limits = Limits(
            memory_mb=dl.get("memory_mb") or self.settings.default_memory_mb,
            pids=dl.get("pids") or self.settings.default_pids,
        )
        env = {**proxy_env(self.settings.egress_port), **(defaults.get("env") or {})}
        return SandboxSpec(
            id=sid,
            template=template,
            env=env,
            user=defaults.get("user") or "user",
            workdir=defaults.get("workdir") or "/home/user",
            limits=limits,
        )

    async def _may_fill(self) -> bool:
        if self.admission.starts.queued:  # creates wait for a start slot: they come first
            return False
        return await self.admission.refusal(count=False) is None

    @audit.audited("sandbox.create", audit.created)
    async def create(
        self, who: Caller, req: CreateSandbox, network: dict[str, Any] | None = None
    ) -> SandboxRecord:
        """`network`: the record's whole network settings instead of `req.network` (front ends and
        forks keep keys of their own there); its policy is validated here. A create takes a warm
        sandbox from its source's pool when it can (docs/pools.md), else starts one."""
        started = time.perf_counter()
        network = req.network.record() if network is None else dict(network)
        try:
            Policy.parse(network.get("mode", "none"), network.get("allow"), network.get("deny"))
        except ValueError as e:
            raise ApiError(422, "validation_error", f"network: {e}") from e
        await self.admission.check()
        async with self._layer_refs:  # the source's layers cannot be collected meanwhile
            template, defaults = await self._source(who, req)
            timeout = self.settings.default_timeout if req.timeout is None else req.timeout
            dl = defaults.get("limits", {})
            limits = Limits(
                cpu=req.cpu if req.cpu is not None else dl.get("cpu"),
                memory_mb=req.memory_mb or dl.get("memory_mb") or self.settings.default_memory_mb,
                pids=req.pids or dl.get("pids") or self.settings.default_pids,
                disk_mb=req.disk_mb if req.disk_mb is not None else dl.get("disk_mb"),
            )
            limits = await self.quotas.with_default_cpu(who.tenant, limits)
            runtime = self._runtime(req.runtime or defaults.get("runtime") or "namespaces", network)
            # Pooled sandboxes have no volumes, mounts or disk limit: those start cold.
            poolable = runtime == "namespaces" and not (
                req.volumes or req.mounts or defaults.get("volumes") or limits.disk_mb
            )
            # A tenant's snapshots and templates are its own: so are their pools (the base one is shared).
            owned = req.snapshot is not None or template.name != (await self.node.base_template()).name
            key = pool_key(who.tenant if owned else None, req.snapshot or template.name)
            member = self.pools.take(key) if poolable else None
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
        handle = await self.pools.claim(member, self._node_spec(rec, template))
        if handle is None:
            return False
        self.egress.set_policy(rec.id, Policy.of_record(rec.network))
        rec.state, rec.node = "running", handle
        await self.store.insert_sandbox(rec)
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
                if defaults.get("checkpoint"):  # processes continue from the snapshot's instant
                    handle = await self.node.checkpoints.restore(
                        self._node_spec(rec, template, node_mounts), defaults["checkpoint"], resume=False
                    )
                else:
                    handle = await self.node.create(self._node_spec(rec, template, node_mounts))
                await self._attach_egress(rec, handle)
                if defaults.get("start") and not defaults.get("checkpoint"):  # a cold template's service
                    await start_template_service(self.node.guest(rec.id), rec, defaults["start"])
            except (NodeError, OSError) as e:
                await self._transition(rec, "error", end_reason=str(e)[:2000])
                await self.volumes.drop(made)
                raise ApiError(503, "sandbox_failed", str(e)) from e
            except BaseException:
                # Cancelled (client went away) or a bug: never leave half a sandbox behind.
                with contextlib.suppress(Exception):
                    await self.node.kill(rec.id, None)
                with contextlib.suppress(Exception):
                    await self._transition(rec, "error", end_reason="creation interrupted")
                raise
            faults.point("create.launched")
            await self._transition(rec, "running", node=handle)

    def _runtime(self, runtime: str, network: dict[str, Any]) -> str:
        """`runtime` if this node runs it with these network settings (docs/runtimes.md), else 409."""
        problem = self.node.runtime_problem(runtime)
        if problem:
            raise ApiError(409, "runtime_unavailable", problem)
        if runtime != "namespaces" and network.get("mode", "none") != "none":
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
        limits = Limits(**rec.limits)
        config = rec.template_config or template.config  # a built template's own root (binds)
        chain = TemplateSpec(name=template.name, layers=tuple(rec.layers), config=config)
        env = {**proxy_env(self.settings.egress_port), **rec.env}  # the sandbox's way out: its proxy
        return SandboxSpec(
            id=rec.id,
            template=chain,
            env=env,
            user=rec.user,
            workdir=rec.workdir,
            limits=limits,
            runtime=rec.runtime or "namespaces",
        )

    # -- egress --------------------------------------------------------------------------
    async def _attach_egress(self, rec: SandboxRecord, handle: dict[str, Any]) -> None:
        """Open the egress proxy in the namespace of the processes started with `handle` (after
        create, restore and adoption: a restored namespace is a new one, without the listener)."""
        if rec.runtime not in ("namespaces", ""):  # gVisor's network stack is its own: no way in
            return
        await self.egress.attach(rec.id, handle, Policy.of_record(rec.network))

    async def network_status(self, who: Caller, sandbox_id: str) -> tuple[SandboxRecord, dict[str, Any]]:
        rec = await self.get(who, sandbox_id)
        return rec, self.egress.status(rec.id)

    @audit.audited("sandbox.network", audit.network_set)
    async def set_network(
        self, who: Caller, sandbox_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> SandboxRecord:
        """Replace the sandbox's network settings with `change(current)`; new connections follow
        the new policy at once (a hibernated sandbox gets it when it resumes)."""
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state not in LIVE:
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
            network = change(dict(rec.network))
            self._runtime(rec.runtime or "namespaces", network)
            try:
                policy = Policy.parse(network.get("mode", "none"), network.get("allow"), network.get("deny"))
            except ValueError as e:
                raise ApiError(422, "validation_error", f"network: {e}") from e
            await self.store.update_sandbox(rec.id, network=network)
            rec.network = network
            self.egress.set_policy(rec.id, policy)
        log.info("network policy set", extra={"sandbox": rec.id, **policy.as_dict()})
        return rec

    # -- kill / timeout ------------------------------------------------------------------
    @audit.audited("sandbox.kill")
    async def kill(self, who: Caller, sandbox_id: str) -> None:
        rec = await self.get(who, sandbox_id)
        await self._end(rec, "killed", "killed by request")

    async def _end(self, rec: SandboxRecord, state: str, reason: str, check: str | None = None) -> None:
        """End a sandbox. `check` re-verifies, under its lock, why a background task wanted it ended
        ("dead" or "expired"): its view of the sandbox may be stale by then (it may have been
        hibernated, resumed or given more time meanwhile)."""
        async with self._locks[rec.id]:
            fresh = await self.store.get_sandbox(rec.id)
            if fresh is None or fresh.state not in LIVE:
                return  # already ended: kill is idempotent
            if check == "dead" and (fresh.state not in ACTIVE or await self.node.alive(fresh.id, fresh.node)):
                return
            if check == "expired" and (fresh.expires_at is None or fresh.expires_at > time.time()):
                return
            await self.egress.detach(fresh.id, forget=True)  # its connections pin the namespace
            await self.node.kill(fresh.id, fresh.node)
            faults.point("kill.stopped")
            await self._transition(fresh, state, end_reason=reason)
        self._locks.pop(rec.id, None)
        self._activity.pop(rec.id, None)
        self._collect_soon()

    async def set_timeout(self, who: Caller, sandbox_id: str, timeout: int) -> SandboxRecord:
        rec = await self.get(who, sandbox_id)
        if rec.state not in LIVE:
            raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
        expires = time.time() + timeout if timeout else None
        await self.store.update_sandbox(rec.id, expect_state=rec.state, timeout=timeout, expires_at=expires)
        return await self.get(who, sandbox_id)

    # -- pause / resume ------------------------------------------------------------------
    @audit.audited("sandbox.pause")
    async def pause(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        """Freeze the sandbox: no CPU, memory kept. Pausing a paused sandbox is a no-op."""
        rec = await self.get(who, sandbox_id)
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state == "running":
                await self.node.pause(rec.id)
                faults.point("pause.frozen")
                await self._transition(rec, "paused")
            elif rec.state != "paused":
                raise ApiError(409, "not_running", f"sandbox {sandbox_id} is {rec.state}")
        return rec

    @audit.audited("sandbox.resume")
    async def resume(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        rec = await self.get(who, sandbox_id)
        self._activity[rec.id] = time.monotonic()
        return await self._resume(rec)

    async def _resume(self, rec: SandboxRecord) -> SandboxRecord:
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state == "paused":
                await self.node.resume(rec.id)
                faults.point("resume.thawed")
                await self._transition(rec, "running")
            elif rec.state == "hibernated":
                await self.quotas.check(rec.tenant, Limits(**rec.limits))  # it will hold resources again
                spec = self._node_spec(rec, await self.node.base_template())
                info = dict(rec.checkpoint)
                handle = None
                if info.get("memory"):
                    try:
                        handle = await self.node.checkpoints.restore(spec, rec.id, resume=True)
                        info["restored"] = True
                    except (NodeError, OSError) as e:
                        # Files are intact: start afresh rather than leave the workspace unreachable.
                        log.warning(
                            "restoring processes failed; restarting them",
                            extra={"sandbox": rec.id, "error": str(e)},
                        )
                        info.update(restored=False, error=str(e)[:500])
                if handle is None:
                    try:
                        handle = await self.node.restart(spec)
                    except (NodeError, OSError) as e:
                        raise ApiError(
                            503, "resume_failed", f"sandbox {rec.id} could not be resumed: {e}"
                        ) from e
                faults.point("resume.restored")
                await self._attach_egress(rec, handle)
                remounted = [m if m["type"] == "volume" else {**m, "status": "mounted"} for m in rec.mounts]
                await self._transition(rec, "running", node=handle, checkpoint=info, mounts=remounted)
                # Only once the record no longer needs it: a crash before this leaves an unreferenced
                # checkpoint (collected at start), never a hibernated record without its image.
                await self.node.checkpoints.drop(rec.id)
            elif rec.state != "running":
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            if rec.timeout and rec.expires_at is None:
                # Its clock was stopped while it slept (a timeout that hibernated it): restart it.
                rec.expires_at = time.time() + rec.timeout
                await self.store.update_sandbox(rec.id, expires_at=rec.expires_at)
        return rec

    # -- hibernate -----------------------------------------------------------------------
    @audit.audited("sandbox.hibernate")
    async def hibernate(self, who: Caller, sandbox_id: str) -> SandboxRecord:
        rec = await self.get(who, sandbox_id)
        return await self._hibernate(rec)

    async def _hibernate(self, rec: SandboxRecord) -> SandboxRecord:
        """Release the sandbox's memory and CPU, keeping its files; resume starts it again."""
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state == "hibernated":
                return rec
            if rec.state not in ACTIVE:
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            # The proxy's sockets are not the sandbox's to dump, and they would pin its old namespace.
            await self.egress.detach(rec.id)
            if self.node.checkpoints.available(rec.runtime) and not _buckets(rec):
                try:
                    await self.node.checkpoints.hibernate(rec.id, rec.node)
                except (NodeError, OSError) as e:
                    await self._attach_egress(rec, rec.node)
                    raise ApiError(
                        503, "hibernate_failed", f"hibernating {rec.id} failed, it is still {rec.state}: {e}"
                    ) from e
                faults.point("hibernate.dumped")
                info: dict[str, Any] = {"memory": True}
            else:
                await self.node.stop(rec.id)
                reason = (
                    "bucket mounts (FUSE) cannot be checkpointed: processes restart on resume"
                    if _buckets(rec)
                    else f"the {rec.runtime} runtime cannot checkpoint processes: they restart on resume"
                    if rec.runtime != "namespaces"
                    else "no CRIU >= 4.1 on this node: processes restart on resume"
                )
                info = {"memory": False, "reason": reason}
            await self._transition(rec, "hibernated", node={}, checkpoint=info)
        return rec

    # -- snapshots and forks ---------------------------------------------------------------
    async def get_snapshot(self, who: Caller, snapshot_id: str) -> SnapshotRecord:
        snap = await self.store.get_snapshot(snapshot_id)
        if snap is None or snap.tenant != who.tenant or snap.state != "ready":
            raise not_found("snapshot", snapshot_id)
        return snap

    async def list_snapshots(self, who: Caller) -> list[SnapshotRecord]:
        snaps = await self.store.list_snapshots(who.tenant)
        return [s for s in snaps if s.state == "ready" and not s.config.get("internal")]

    @audit.audited("sandbox.snapshot", audit.snapshotted)
    async def snapshot(
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
        if memory and not self.node.checkpoints.available():
            raise ApiError(
                409, "memory_unavailable", "memory snapshots need CRIU >= 4.1 on the node (see `cove doctor`)"
            )
        rec = await self.get(who, sandbox_id)
        self._activity[rec.id] = time.monotonic()
        snap = SnapshotRecord(
            id="snap" + new_sandbox_id()[:12],
            tenant=who.tenant,
            name=name,
            sandbox_id=rec.id,
            state="creating",  # rolled back at start if the server dies before it is ready
            created_at=time.time(),
        )
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state not in (*ACTIVE, "hibernated"):
                raise ApiError(409, "not_running", f"sandbox {rec.id} is {rec.state}")
            if memory and rec.state not in ACTIVE:
                raise ApiError(
                    409, "not_running", f"a memory snapshot needs running processes; {rec.id} is {rec.state}"
                )
            if memory and not self.node.checkpoints.available(rec.runtime):
                raise ApiError(
                    409,
                    "not_supported",
                    f"memory snapshots are not supported by the {rec.runtime} runtime (see docs/runtimes.md)",
                )
            if memory and _buckets(rec):
                raise ApiError(409, "mounts_not_checkpointable", _NO_FUSE_CHECKPOINT.format(rec.id))
            entries, seal = await self.volumes.for_snapshot(rec, snap.id, volumes)
            await self.store.insert_snapshot(snap)
            faults.point("snapshot.recorded")
            # Until the record names the new layer, nothing else may collect layers (it would
            # see the layer as unused and delete it).
            async with self._layer_refs:
                try:
                    if memory:
                        layer = await self.node.checkpoints.snapshot_with_memory(
                            rec.id, rec.node, snap.id, seal
                        )
                        snap.memory = True
                    else:  # the node freezes the sandbox for the instant of the copy
                        layer = await self.node.snapshots.commit(rec.id, seal)
                except (NodeError, OSError) as e:
                    await self.store.delete_snapshot(snap.id)
                    await self.node.checkpoints.drop(snap.id)
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
        if len(snap.layers) > self.settings.flatten_at:
            task = asyncio.create_task(self._flatten(snap.id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return snap

    async def _flatten(self, snapshot_id: str) -> None:
        """Squash a snapshot's long layer chain into one layer; sandboxes made later mount just that."""
        async with self._layer_refs:  # the new layer must be recorded before anything collects
            snap = await self.store.get_snapshot(snapshot_id)
            if snap is None:
                return
            try:
                flat = await self.node.snapshots.flatten(snap.layers)
            except (NodeError, OSError):
                log.exception("flattening snapshot %s failed", snapshot_id)
                return
            await self.store.update_snapshot(snapshot_id, layers=[flat])
        log.info("snapshot flattened", extra={"snapshot": snapshot_id, "from_layers": len(snap.layers)})
        await self.collect_layers()

    @audit.audited("snapshot.delete", audit.snapshot_deleted)
    async def delete_snapshot(self, who: Caller, snapshot_id: str) -> None:
        """Forget a snapshot; its layers stay while sandboxes started from it still use them."""
        snap = await self.get_snapshot(who, snapshot_id)
        await self.store.delete_snapshot(snap.id)
        await self.node.checkpoints.drop(snap.id)
        await self.volumes.drop_sealed(snap)
        await self.collect_layers()

    @audit.audited("sandbox.fork", audit.forked)
    async def fork(
        self, who: Caller, sandbox_id: str, count: int, metadata: dict[str, str], volumes: str = "exclude"
    ) -> tuple[list[SandboxRecord], bool]:
        """N new sandboxes that continue from this instant of the source, which keeps running.

        With CRIU the children's processes continue too; otherwise they start afresh on the same
        files. Returns the children and whether their memory was kept.
        """
        source = await self.get(who, sandbox_id)
        if _buckets(source):
            raise ApiError(409, "mounts_not_checkpointable", _NO_FUSE_CHECKPOINT.format(source.id))
        memory = self.node.checkpoints.available(source.runtime) and source.state in ACTIVE
        snap = await self.snapshot(who, sandbox_id, memory=memory, internal=True, volumes=volumes)
        try:
            req = CreateSandbox(
                snapshot=snap.id,
                timeout=source.timeout,
                metadata={**source.metadata, **metadata, "forked_from": source.id},
                auto_resume=source.auto_resume,
                idle_timeout=source.idle_timeout,
            )
            results = await asyncio.gather(
                *(self.create(who, req, network=source.network) for _ in range(count)),
                return_exceptions=True,
            )
            faults.point("fork.created")
        finally:
            await self.store.delete_snapshot(snap.id)  # the children keep its layer alive
            await self.node.checkpoints.drop(snap.id)
            await self.volumes.drop_sealed(snap)  # the children have their own copies
        children = [r for r in results if isinstance(r, SandboxRecord)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for child in children:
                await self._end(child, "killed", "fork failed")
            raise failed[0]
        return children, snap.memory

    def _collect_soon(self) -> None:
        """A collection shortly after an end, shared by the ends of that moment: it reads every
        sandbox, snapshot and template, too much to do for each kill (50 a second, 5,000 records)."""
        self._collect_wanted = True
        if self._stopped:
            return  # shutting down: the next start collects
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect_wanted_layers(), name="cove-collect")

    async def _collect_wanted_layers(self) -> None:
        while self._collect_wanted:
            await asyncio.sleep(COLLECT_AFTER)
            self._collect_wanted = False  # an end during this collection asks for the next one
            try:
                await self.collect_layers()
            except Exception:
                log.exception("layer collection failed")

    async def collect_layers(self) -> None:
        """Delete committed layers that no template, snapshot or sandbox references any more."""
        if self.layer_makers:
            return  # a build is importing layers it has not pinned yet; the next collection runs later
        async with self._layer_refs:
            keep = set((await self.node.base_template()).layers) | self.pools.layers()
            for snap in await self.store.list_snapshots(None):
                keep.update(snap.layers)
            for rec in (await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)).items:
                keep.update(rec.layers)
            for tpl in await self.store.list_templates(None):
                keep.update(tpl.layers)
            keep.update(self.layer_pins)  # layers of template builds in progress
            removed = await self.node.snapshots.collect(keep)
        if removed:
            log.info("layers collected", extra={"layers": removed})

    async def _fresh(self, rec: SandboxRecord) -> SandboxRecord:
        fresh = await self.store.get_sandbox(rec.id)
        if fresh is None:
            raise not_found("sandbox", rec.id)
        return fresh

    async def check_alive(self, rec: SandboxRecord) -> bool:
        """After the guest stopped answering: mark a dead sandbox as such (and free it)."""
        if await self.node.alive(rec.id, rec.node):
            return True
        await self._end(rec, "error", "sandbox stopped unexpectedly (its init process exited)", check="dead")
        return await self.node.alive(rec.id, rec.node)

    # -- background work -----------------------------------------------------------------
    async def adopt(self) -> None:
        """At start: keep sandboxes that survived the restart, mark the others, roll back half-made
        snapshots and sweep whatever the store does not know about."""
        page = await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)
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
                await self._attach_egress(rec, rec.node)
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
                await self._transition(rec, "hibernated", node={}, checkpoint=info)
                keep.add(rec.id)
                continue
            await self.node.kill(rec.id, rec.node)
            reason = (
                "creation interrupted by restart"
                if rec.state == "starting"
                else "lost while the server was down"
            )
            await self._transition(rec, "error", end_reason=reason)
        for snap in await self.store.list_snapshots(None):
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
            if rec.id in keep and rec.state in ACTIVE and _buckets(rec):
                await self._check_buckets(rec)
        await self.collect_layers()
        log.info("adopted sandboxes", extra={"adopted": len(keep), "swept": swept})

    async def reap_once(self) -> None:
        """Enforce timeouts and idle policies; notice sandboxes that died on their own."""
        now, mono = time.time(), time.monotonic()
        page = await self.store.list_sandboxes(None, ["running", "paused", "hibernated"], limit=1_000_000)
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
                    if rec.on_timeout == "hibernate" and rec.state in ACTIVE:
                        await self._hibernate(rec)
                        await self.store.update_sandbox(rec.id, expires_at=None)
                    else:
                        await self._end(rec, "killed", "timeout", check="expired")
                elif rec.state == "hibernated":
                    continue
                elif rec.id in dead:
                    await self._end(
                        rec, "error", "sandbox stopped unexpectedly (its init process exited)", check="dead"
                    )
                elif rec.state == "running" and rec.idle_timeout:
                    last = self._activity.setdefault(rec.id, mono)
                    if mono - last >= rec.idle_timeout:
                        await self._idle(rec)
                if rec.state in ACTIVE and _buckets(rec):
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
        return set(await self.node.dead([(r.id, r.node) for r in turn]))

    async def _check_buckets(self, rec: SandboxRecord) -> None:
        """Mark bucket mounts whose rclone is gone as `lost` (the sandbox sees ENOTCONN there);
        hibernate and resume, or a new sandbox, mounts them again."""
        served = [i for i, m in enumerate(rec.mounts) if m["type"] != "volume" and m.get("status") != "lost"]
        if not served or all(await self.node.volumes.buckets_healthy(rec.id, served)):
            return
        async with self._locks[rec.id]:  # checked again: a hibernation may have stopped it meanwhile
            fresh = await self._fresh(rec)
            if fresh.state not in ACTIVE:
                return
            healthy = await self.node.volumes.buckets_healthy(rec.id, served)
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
            await self._hibernate(rec)
            log.info("hibernated idle sandbox", extra={"sandbox": rec.id, "idle_timeout": rec.idle_timeout})
            return
        async with self._locks[rec.id]:
            rec = await self._fresh(rec)
            if rec.state == "running":
                await self.node.pause(rec.id)
                await self._transition(rec, "paused", end_reason=None)
                log.info("paused idle sandbox", extra={"sandbox": rec.id, "idle_timeout": rec.idle_timeout})

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval)
            await self.reap_once()

    def start_reaper(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever(), name="cove-reaper")

    async def stop_reaper(self) -> None:
        self._stopped = True
        for task in (self._reaper, self._collector):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
