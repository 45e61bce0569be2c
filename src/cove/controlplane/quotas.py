"""Per-tenant quotas on live sandboxes, CPU and memory, set by admin keys.

A quota caps what a tenant's sandboxes that hold resources (starting, running, paused) add up to:
their count, their `cpu` limits and their `memory_mb` limits. A create or a resume beyond it is
`429 quota_exceeded`, naming the dimension. With a CPU quota, a sandbox created without `cpu` gets
one core (so the quota means something). Stored in the store's settings as `quota:<tenant>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from cove.controlplane.errors import ApiError
from cove.node.base import Limits
from cove.store.base import Store

HOLDING = ["starting", "running", "paused"]  # states whose limits count against a quota
CACHE_TTL = 5.0  # seconds; another replica's change applies within this (as API keys do)


@dataclass(frozen=True)
class Quota:
    sandboxes: int | None = None
    cpu: float | None = None
    memory_mb: int | None = None


@dataclass
class Usage:
    sandboxes: int = 0
    cpu: float = 0.0
    memory_mb: int = 0

    def add(self, limits: Limits) -> None:
        self.sandboxes += 1
        self.cpu += limits.cpu or 0.0
        self.memory_mb += limits.memory_mb or 0


class Quotas:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, Quota | None]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pending: dict[str, list[Limits]] = defaultdict(list)  # admitted, not yet recorded

    async def get(self, tenant: str) -> Quota | None:
        hit = self._cache.get(tenant)
        now = time.monotonic()
        if hit and now - hit[0] < CACHE_TTL:
            return hit[1]
        raw = await self.store.get_setting(f"quota:{tenant}")
        quota = Quota(**raw) if raw else None
        self._cache[tenant] = (now, quota)
        return quota

    def cached(self, tenant: str) -> Quota | None:
        hit = self._cache.get(tenant)
        return hit[1] if hit else None

    async def set(self, tenant: str, quota: Quota) -> None:
        await self.store.put_setting(f"quota:{tenant}", asdict(quota))
        self._cache[tenant] = (time.monotonic(), quota)

    async def delete(self, tenant: str) -> bool:
        self._cache[tenant] = (time.monotonic(), None)
        return await self.store.delete_setting(f"quota:{tenant}")

    async def usage(self, tenant: str) -> Usage:
        page = await self.store.list_sandboxes(tenant, HOLDING, limit=1_000_000)
        used = Usage()
        for rec in page.items:
            used.add(Limits(**rec.limits))
        for limits in self._pending[tenant]:
            used.add(limits)
        return used

    async def with_default_cpu(self, tenant: str, limits: Limits) -> Limits:
        quota = await self.get(tenant)
        if quota is None or quota.cpu is None or limits.cpu is not None:
            return limits
        return Limits(min(1.0, quota.cpu), limits.memory_mb, limits.pids, limits.disk_mb)

    @contextlib.asynccontextmanager
    async def admit(self, tenant: str, limits: Limits) -> AsyncIterator[None]:
        """Hold a place for a sandbox with `limits` until the block has recorded it (or failed);
        429 if it would exceed the tenant's quota. Free without a quota."""
        quota = await self.get(tenant)
        if quota is None:
            yield
            return
        async with self._locks[tenant]:  # concurrent creates see each other's places
            used = await self.usage(tenant)
            refusal = _exceeds(quota, used, limits)
            if refusal:
                raise ApiError(429, "quota_exceeded", f"tenant {tenant!r}: {refusal}")
            self._pending[tenant].append(limits)
        try:
            yield
        finally:
            self._pending[tenant].remove(limits)

    async def check(self, tenant: str, limits: Limits) -> None:
        """429 if a sandbox with `limits` would exceed the tenant's quota (nothing held)."""
        async with self.admit(tenant, limits):
            pass


def _exceeds(quota: Quota, used: Usage, limits: Limits) -> str | None:
    if quota.sandboxes is not None and used.sandboxes + 1 > quota.sandboxes:
        return f"{used.sandboxes} of {quota.sandboxes} sandboxes in use; kill or hibernate one first"
    if quota.cpu is not None and used.cpu + (limits.cpu or 0) > quota.cpu + 1e-9:
        return f"{used.cpu:g} of {quota.cpu:g} CPU cores in use; this sandbox asks for {limits.cpu:g}"
    if quota.memory_mb is not None and used.memory_mb + (limits.memory_mb or 0) > quota.memory_mb:
        return (
            f"{used.memory_mb} of {quota.memory_mb} MB of memory in use; this sandbox asks for "
            f"{limits.memory_mb} MB"
        )
    return None
