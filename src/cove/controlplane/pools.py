"""Warm pools: sandboxes started ahead of time per template (or snapshot), claimed on create.

A member is a complete sandbox (cgroup, overlay root, namespaces, guest agent serving, egress
listener open) that is frozen until a create claims it. The claim writes the caller's env, user and
workdir into the agent's config (which the agent re-reads when it changes), sets the cgroup limits,
thaws it and records it as the caller's sandbox: about a millisecond instead of a cold start.
Members are never reused: a killed sandbox is gone, and the pool refills with fresh ones, so a
claim carries nothing of anyone before it.

A refill must not slow the requests it exists to speed up: it starts a member only in a gap of the
API's traffic (no request in flight for `QUIET_GAP`, or after `MOST_DEFERRED` of waiting, so steady
traffic cannot starve it), and the member starts at the lowest CPU weight, which the claim raises
to the normal one; foreground work on the host comes first.

Pools are keyed by template name or snapshot id, resolved to layers as a create resolves them
(`Sources`), so templates from any store work. A background task refills one member at a
time, and only while the host admits new sandboxes. Each pool
scales between `min` and `max`: a claim that finds it empty (a miss) doubles its target, and
`COVE_POOL_IDLE` seconds without a claim halve it back toward `min`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from cove import stages
from cove.controlplane.auth import Caller
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.sources import Source, Sources
from cove.controlplane.starter import Starter, new_sandbox_id
from cove.node.base import Limits, NodeError, SandboxSpec, TemplateSpec
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import Store

log = logging.getLogger("cove.pools")

MAX_SIZE = 1000
BACKOFF = (1.0, 2.0, 5.0, 15.0, 30.0)  # seconds between failed fills of one pool
QUIET_GAP = 0.02  # seconds without a request in flight before a refill starts a member
MOST_DEFERRED = 0.5  # ...or this long after it first waited, if the traffic never pauses


class Traffic:
    """API requests in flight (counted by the server's outermost middleware): the refill waits
    for a pause in them, since a client's create is usually followed at once by its first exec."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_end = 0.0

    def begin(self) -> None:
        self.in_flight += 1

    def end(self) -> None:
        self.in_flight -= 1
        self.last_end = time.monotonic()

    def quiet(self) -> bool:
        return not self.in_flight and time.monotonic() - self.last_end >= QUIET_GAP

    async def pause(self) -> None:
        """Return at the next pause in the traffic, or after MOST_DEFERRED."""
        deadline = time.monotonic() + MOST_DEFERRED
        while not self.quiet() and time.monotonic() < deadline:
            await asyncio.sleep(QUIET_GAP / 4)


@dataclass(frozen=True)
class PoolConfig:
    name: str  # a template name, or a snapshot id
    min: int
    max: int
    tenant: str | None = None  # the owner of the template or snapshot; None for the shared base template
    kind: str = "template"  # template | snapshot

    @property
    def key(self) -> str:
        return pool_key(self.tenant, self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "max": self.max, "tenant": self.tenant, "kind": self.kind}


def pool_key(tenant: str | None, name: str) -> str:
    """Pools are found by owner and name: two tenants' templates may share a name, and neither may
    claim the other's sandboxes."""
    return name if tenant is None else f"{tenant}/{name}"


@dataclass
class Member:
    id: str
    handle: dict[str, Any]
    layers: tuple[str, ...]
    generation: str
    made_at: float


@dataclass
class Pool:
    config: PoolConfig
    target: int
    members: deque[Member] = field(default_factory=deque)
    filling: int = 0
    hits: int = 0
    misses: int = 0
    last_claim: float = field(default_factory=time.monotonic)
    last_resize: float = field(default_factory=time.monotonic)
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0

    def status(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "min": self.config.min,
            "max": self.config.max,
            "target": self.target,
            "ready": len(self.members),
            "starting": self.filling,
            "hits": self.hits,
            "misses": self.misses,
            "error": self.error,
        }


class Pools:
    """The pools of one server. Members start the way every sandbox does (`Starter`), from what
    `Sources` resolves a pool's template or snapshot to; their layers are pinned in `LayerRefs`
    until a claim records them in a sandbox, or the member goes."""

    def __init__(
        self,
        starter: Starter,
        sources: Sources,
        refs: LayerRefs,
        idle_after: float,
        registry: CollectorRegistry,
        replicas: Callable[[], int] = lambda: 1,
        here: Callable[[], str] = lambda: "",
    ) -> None:
        """`replicas`: how many servers share the pools' configs (docs/fleet.md): a pool's `min`
        is the fleet's, so each keeps its share of it at rest; growth on misses is each one's own."""
        self.replicas = replicas
        self.here = here  # this server's node id
        self.starter = starter
        self.node = starter.node
        self.sources = sources
        self.refs = refs
        self.idle_after = idle_after
        self.pools: dict[str, Pool] = {}
        self.traffic = Traffic()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.size = Gauge("cove_pool_ready", "Pooled sandboxes ready to claim", ["pool"], registry=registry)
        self.target = Gauge("cove_pool_target", "Pool sizes the refill aims for", ["pool"], registry=registry)
        self.claims = Counter(
            "cove_pool_claims", "Creates that asked a pool, by result (hit, miss)", ["pool", "result"],
            registry=registry,
        )  # fmt: skip

    # -- configuration -----------------------------------------------------------------------
    def configure(self, config: PoolConfig) -> Pool:
        """Add a pool or change its bounds (members beyond the new max are dropped by the loop)."""
        pool = self.pools.get(config.key)
        if pool is None:
            pool = self.pools[config.key] = Pool(config, target=self._floor(config))
        else:
            pool.config = config
            pool.target = min(max(pool.target, self._floor(config)), config.max)
            pool.error, pool.failures, pool.retry_at = None, 0, 0.0
        self._gauges(pool)
        self._wake.set()
        return pool

    def _floor(self, config: PoolConfig) -> int:
        """This server's share of the pool's `min`."""
        return math.ceil(config.min / max(1, self.replicas()))

    async def sync(self, configs: list[PoolConfig]) -> None:
        """Run exactly `configs` (what the store holds now: another server may have changed them)."""
        wanted = {c.key: c for c in configs}
        for key in set(self.pools) - set(wanted):
            await self.remove(key)
        for key, config in wanted.items():
            if key not in self.pools or self.pools[key].config != config:
                self.configure(config)
        for pool in self.pools.values():  # fewer replicas now: a bigger share (more: idle shrinks it)
            if pool.target < (floor := self._floor(pool.config)):
                pool.target = floor
                self._gauges(pool)
                self._wake.set()

    async def remove(self, key: str) -> bool:
        pool = self.pools.pop(key, None)
        if pool is None:
            return False
        await self._discard_all(pool)
        for gauge in (self.size, self.target):
            with contextlib.suppress(KeyError):
                gauge.remove(key)
        return True

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in sorted(self.pools.values(), key=lambda p: p.config.key)]

    # -- claims ------------------------------------------------------------------------------
    def take(self, key: str) -> Member | None:
        """A ready member of the pool `key` (see pool_key), or None (a miss, which grows its target)."""
        name = key
        pool = self.pools.get(key)
        if pool is None:
            return None
        pool.last_claim = time.monotonic()
        generation = self.node.generation
        while pool.members:
            member = pool.members.popleft()
            if member.generation == generation:
                pool.hits += 1
                self.claims.labels(name, "hit").inc()
                self._gauges(pool)
                self._wake.set()
                return member
            self._spawn(self._discard(member))  # made before the node changed (e.g. kernel env)
        pool.misses += 1
        self.claims.labels(name, "miss").inc()
        if pool.target < pool.config.max:
            pool.target = min(pool.config.max, max(pool.target + 1, pool.target * 2))
            pool.last_resize = time.monotonic()
        self._gauges(pool)
        self._wake.set()
        return None

    async def claim(self, member: Member, spec: SandboxSpec) -> dict[str, Any] | None:
        """Give `member` the caller's env, user, workdir and limits, thaw it and check that its
        agent answers; returns its node handle, or None if it could not be (it is then discarded).
        The check also leaves a kept connection for the caller's first operation, which would
        otherwise pay for a new one (docs/guest-protocol.md)."""
        try:
            await self.node.configure(spec, thaw=True)
            stages.mark("configured")
            await self.node.guest(member.id).ping()
            stages.mark("ping")
        except (NodeError, OSError, GuestError, GuestUnavailable) as e:
            log.warning("pooled sandbox could not be claimed", extra={"sandbox": member.id, "error": str(e)})
            await self._discard(member)
            return None
        return member.handle

    def handed_over(self, member: Member) -> None:
        """A claimed member is recorded as a sandbox: the record references its layers now."""
        self.refs.unpin(member.layers)

    async def discard(self, member: Member) -> None:
        await self._discard(member)

    # -- the refill loop -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cove-pools")

    async def close(self) -> None:
        """Stop refilling and kill every member (a restarted server builds new ones)."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in list(self.pools.values()):
            await self._discard_all(pool)

    async def _loop(self) -> None:
        while True:
            try:
                pool = self._next_to_fill()
                if pool is None:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    continue
                await self.traffic.pause()  # requests first: a refill competes with them for the CPU
                if not await self.starter.may_start_background():
                    await asyncio.sleep(1.0)
                    continue
                await self._fill_one(pool)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pool refill failed")
                await asyncio.sleep(1.0)

    def _next_to_fill(self) -> Pool | None:
        """Trim and shrink pools; the pool furthest below its target, if any."""
        now = time.monotonic()
        best, deficit = None, 0
        for pool in self.pools.values():
            floor = self._floor(pool.config)
            if pool.target > floor and now - max(pool.last_claim, pool.last_resize) >= self.idle_after:
                pool.target = max(floor, pool.target // 2)  # idle: shrink toward min
                pool.last_resize = now
                self._gauges(pool)
            while len(pool.members) > pool.target:
                self._spawn(self._discard(pool.members.pop()))
                self._gauges(pool)
            short = pool.target - len(pool.members) - pool.filling
            if short > deficit and now >= pool.retry_at:
                best, deficit = pool, short
        return best

    async def _source(self, config: PoolConfig) -> Source:
        """What a pool's members start from: its snapshot or template, as its tenant sees them.
        Only from files on this server's node (docs/fleet.md): another node's server pools them."""
        who = Caller("pool", config.tenant or "", False)
        snapshot = config.name if config.kind == "snapshot" else None
        home = await self.sources.home(who, "" if snapshot else config.name, snapshot)
        if home not in (None, "", self.here()):
            raise NodeError(f"{config.name} is kept on node {home}: that node's server keeps its pool")
        if snapshot:
            return await self.sources.of(who, "", snapshot=snapshot)
        return await self.sources.of(who, config.name)

    def _spec(self, sid: str, template: TemplateSpec, defaults: dict[str, Any]) -> SandboxSpec:
        """A member's spec: its source's defaults; a claim gives it the caller's (`configure`)."""
        dl = defaults.get("limits") or {}
        s = self.starter.settings
        limits = Limits(
            memory_mb=dl.get("memory_mb") or s.default_memory_mb, pids=dl.get("pids") or s.default_pids
        )
        spec = self.starter.spec(
            sid,
            template,
            defaults.get("env") or {},
            defaults.get("user") or "user",
            defaults.get("workdir") or "/home/user",
            limits,
        )
        return replace(spec, background=True)

    async def _fill_one(self, pool: Pool) -> None:
        sid = new_sandbox_id()
        pool.filling += 1
        layers: tuple[str, ...] = ()
        try:
            template, defaults = await self._source(pool.config)
            if defaults.get("volumes"):
                raise NodeError("a snapshot that carries volumes cannot be pooled")
            spec = self._spec(sid, template, defaults)
            layers = spec.template.layers
            self.refs.pin(layers)
            generation = self.node.generation
            # The egress listener opens now; its policy comes with the claim.
            handle = await self.starter.start(
                spec, {}, checkpoint=defaults.get("checkpoint"), pull=defaults.get("durable") is True
            )
            try:
                await self.node.pause(sid)
            except BaseException:
                await self._kill(sid)
                raise
        except asyncio.CancelledError:
            self.refs.unpin(layers)
            raise
        except Exception as e:
            self.refs.unpin(layers)
            pool.failures += 1
            pool.error = f"{type(e).__name__}: {e}"[:500]
            pool.retry_at = time.monotonic() + BACKOFF[min(pool.failures, len(BACKOFF)) - 1]
            log.warning("pool fill failed", extra={"pool": pool.config.key, "error": pool.error})
            return
        finally:
            pool.filling -= 1
        member = Member(sid, handle, layers, generation, time.time())
        if self.pools.get(pool.config.key) is not pool:  # removed meanwhile
            await self._discard(member)
            return
        pool.error, pool.failures = None, 0
        pool.members.append(member)
        self._gauges(pool)

    # -- helpers -------------------------------------------------------------------------------
    def _gauges(self, pool: Pool) -> None:
        self.size.labels(pool.config.key).set(len(pool.members))
        self.target.labels(pool.config.key).set(pool.target)

    async def _kill(self, sid: str) -> None:
        try:
            await self.starter.stop(sid, None)
        except Exception:
            log.exception("killing pooled sandbox %s failed", sid)

    async def _discard(self, member: Member) -> None:
        await self._kill(member.id)
        self.refs.unpin(member.layers)

    async def _discard_all(self, pool: Pool) -> None:
        while pool.members:
            await self._discard(pool.members.popleft())
        self._gauges(pool)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def load(store: Store, defaults: str) -> list[PoolConfig]:
    """The pools to run: `COVE_POOLS`, overridden per name by what the API stored."""
    configs = {c.key: c for c in parse_pools(defaults)}
    for setting, value in (await store.list_settings("pool:")).items():
        key = setting.removeprefix("pool:")
        if value.get("removed"):
            configs.pop(key, None)
            continue
        tenant = value.get("tenant")
        # Stored before pools had a kind: a pool with a tenant was a snapshot's.
        kind = value.get("kind") or ("snapshot" if tenant else "template")
        name = value.get("name") or key
        configs[key] = PoolConfig(name, int(value["min"]), int(value["max"]), tenant, kind)
    return list(configs.values())


async def save(store: Store, config: PoolConfig) -> None:
    await store.put_setting(f"pool:{config.key}", config.as_dict())


async def forget(store: Store, key: str) -> None:
    """Removed for good (also a pool that `COVE_POOLS` names)."""
    await store.put_setting(f"pool:{key}", {"removed": True})


def parse_pools(text: str) -> list[PoolConfig]:
    """`COVE_POOLS`: "name=min:max,…" ("base=2:16"); "" for none."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, bounds = part.partition("=")
        lo, sep2, hi = bounds.partition(":")
        try:
            if not sep or not name:
                raise ValueError
            lo_n, hi_n = int(lo), int(hi) if sep2 else int(lo)
        except ValueError:
            raise ValueError(f"COVE_POOLS: expected name=min:max, got {part!r}") from None
        check_bounds(lo_n, hi_n)
        out.append(PoolConfig(name.strip(), lo_n, hi_n))
    return out


def check_bounds(lo: int, hi: int) -> None:
    if not 0 <= lo <= hi <= MAX_SIZE:
        raise ValueError(f"pool bounds must satisfy 0 <= min <= max <= {MAX_SIZE} (got {lo}:{hi})")
