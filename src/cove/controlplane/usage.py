"""A short history of each sandbox's resource use, kept in memory (`GET /v1/sandboxes/{id}/metrics`).

The sampler reads the cgroup stats the node already reports (memory, CPU time, disk;
`NodeAgent.stats`) and appends one point to the sandbox's ring buffer (the last `keep` points):
every `interval` seconds for a sandbox whose history someone asked for here in the last `watch`
seconds (a console page, a script polling it), and every `sweep` seconds for every other running or
paused sandbox on this server's own node (the disk figure walks the sandbox's writable layer, which costs in proportion to the files
it wrote: sampling each of hundreds of idle sandboxes every few seconds would keep a core busy). A
request for a sandbox with no recent point samples it at once, so a page that just opened gets a
point without waiting. The history is this server's: a restart
starts it afresh, and a killed sandbox's goes with it. The shape of a point is e2b's
(`timestamp, cpuUsedPct, cpuCount, memUsed, memTotal, diskUsed, diskTotal`), plus cove's
`netTxBytes`/`netRxBytes`: bytes through the sandbox's egress since it started (a counter: the
rate is the difference between two points).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cove.config import Settings
from cove.controlplane.errors import ApiError
from cove.controlplane.service import SandboxService
from cove.node.base import NodeError
from cove.store.base import SandboxRecord

log = logging.getLogger("cove.usage")
_MIB = 1 << 20
FIRST_CPU_WINDOW_S = 0.2  # a requested first point measures CPU over this long


@dataclass(frozen=True)
class Point:
    time: float  # unix seconds
    cpu_pct: float  # of the sandbox's CPUs, 0-100, since the previous point
    cpu_count: int
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int
    net_out: int = 0  # bytes the sandbox sent out through its egress, since it started (cove's own)
    net_in: int = 0  # and received

    def json(self) -> dict[str, Any]:
        return {
            "timestamp": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "timestampUnix": self.time,
            "cpuUsedPct": self.cpu_pct,
            "cpuCount": self.cpu_count,
            "memUsed": self.mem_used,
            "memTotal": self.mem_total,
            "memCache": self.mem_cache,
            "diskUsed": self.disk_used,
            "diskTotal": self.disk_total,
            "netTxBytes": self.net_out,
            "netRxBytes": self.net_in,
        }


class _History:
    __slots__ = ("cpu", "points", "sampled", "watched")

    def __init__(self, keep: int) -> None:
        self.points: deque[Point] = deque(maxlen=keep)
        self.cpu: tuple[float, int] | None = None  # (monotonic time, cpu usec) of the last sample
        self.watched = 0.0  # monotonic time someone last asked for this history
        self.sampled = 0.0  # monotonic time of the last point


class Usage:
    def __init__(self, settings: Settings, service: SandboxService) -> None:
        self.settings = settings
        self.service = service
        self.interval = float(os.environ.get("COVE_METRICS_INTERVAL", "5"))
        self.keep = int(os.environ.get("COVE_METRICS_KEEP", "120"))  # 10 minutes at 5 s
        self.sweep = float(os.environ.get("COVE_METRICS_SWEEP", "30"))
        self.watch = 600.0
        self._history: dict[str, _History] = {}
        self._task: asyncio.Task[None] | None = None
        self._sampling: dict[str, asyncio.Future[None]] = {}

    def start(self) -> None:
        if self.interval > 0 and self._task is None:
            self._task = asyncio.create_task(self._run(), name="cove-usage")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.sample_all()
            except Exception:  # a store hiccup must not end the history
                log.exception("sampling sandbox usage failed")
            await asyncio.sleep(max(0.1, self.interval - (time.monotonic() - started)))

    async def sample_all(self) -> None:
        live: set[str] = set()
        cursor: str | None = None
        while True:
            page = await self.service.store.list_sandboxes(None, ["running", "paused"], None, 1000, cursor)
            now = time.monotonic()
            here = ("", self.service.fleet.id)
            for rec in page.items:
                live.add(rec.id)
                history = self._history.get(rec.id)
                watched = history is not None and now - history.watched < self.watch
                # A sandbox on another node of the fleet is sampled here only while watched here
                # (its own server sweeps it), so no node is asked by every replica.
                due = rec.node_id in here and (history is None or now - history.sampled >= self.sweep - 0.5)
                if due or watched:
                    await self.sample(rec)
            cursor = page.next_cursor
            if not cursor:
                break
        for gone in set(self._history) - live:  # killed or hibernated: its history goes
            del self._history[gone]

    async def sample(self, rec: SandboxRecord, window: float = 0.0) -> None:
        """One point for the sandbox now (concurrent callers share one reading). `window`: with no
        earlier reading of its CPU time, read it this many seconds before, so that the point has a
        CPU figure (asked by a request; the sweeps' first point of a sandbox has 0)."""
        pending = self._sampling.get(rec.id)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sampling[rec.id] = fut
        try:
            history = self._history.get(rec.id)
            if window > 0 and (history is None or history.cpu is None) and rec.state == "running":
                with contextlib.suppress(ApiError, NodeError, OSError):
                    usage = (await self.service.stats(rec)).get("cpu_usec")
                    if usage is not None:
                        history = self._history.setdefault(rec.id, _History(self.keep))
                        history.cpu = (time.monotonic(), usage)
                        await asyncio.sleep(window)
            await self._sample(rec)
        finally:
            del self._sampling[rec.id]
            fut.set_result(None)

    async def _sample(self, rec: SandboxRecord) -> None:
        try:
            stats = await self.service.stats(rec)
        except (ApiError, NodeError, OSError) as e:  # it ended meanwhile, or its node is out of reach
            log.debug("no usage for %s: %s", rec.id, e)
            return
        history = self._history.get(rec.id)
        if history is None:
            history = self._history[rec.id] = _History(self.keep)
        cpus = self._cpus(rec)
        now, usage = time.monotonic(), stats.get("cpu_usec")
        history.sampled = now
        pct = 0.0
        if usage is not None:
            if history.cpu is not None and now > history.cpu[0]:
                used = (usage - history.cpu[1]) / 1e6 / (now - history.cpu[0])
                pct = round(max(0.0, min(100.0, used / cpus * 100)), 2)
            history.cpu = (now, usage)
        mem_mb = int(rec.limits.get("memory_mb") or self.settings.default_memory_mb)
        history.points.append(
            Point(
                time=round(time.time(), 3),  # as reported: a client's `since` compares equal
                cpu_pct=pct,
                cpu_count=cpus,
                mem_used=int(stats.get("memory_bytes") or 0),
                mem_total=mem_mb * _MIB,
                mem_cache=int(stats.get("memory_cache_bytes") or 0),
                disk_used=int(stats.get("disk_bytes") or 0),
                disk_total=self._disk_mb(rec) * _MIB,
                net_out=int(stats.get("net_out_bytes") or 0),
                net_in=int(stats.get("net_in_bytes") or 0),
            )
        )

    async def points(self, rec: SandboxRecord, since: float | None = None) -> list[dict[str, Any]]:
        """The sandbox's kept points (after `since`, unix seconds), oldest first; a live sandbox
        with no point in the last interval is sampled first."""
        history = self._history.get(rec.id)
        if history is not None:
            history.watched = time.monotonic()
        fresh = (
            history is not None
            and history.points
            and time.time() - history.points[-1].time < min(self.interval, 5.0)
        )
        if rec.state == "running" and not fresh:
            await self.sample(rec, window=FIRST_CPU_WINDOW_S)
            history = self._history.get(rec.id)
            if history is not None:
                history.watched = time.monotonic()
        if history is None:
            return []
        return [p.json() for p in history.points if since is None or p.time > since]

    def latest(self, rec: SandboxRecord) -> dict[str, Any] | None:
        """The sandbox's newest kept point, sampling nothing (None before its first)."""
        history = self._history.get(rec.id)
        return history.points[-1].json() if history is not None and history.points else None

    @staticmethod
    def _cpus(rec: SandboxRecord) -> int:
        cpu = rec.limits.get("cpu")
        return max(1, math.ceil(cpu)) if cpu else os.cpu_count() or 1

    def _disk_mb(self, rec: SandboxRecord) -> int:
        if rec.limits.get("disk_mb"):
            return int(rec.limits["disk_mb"])
        for path in (self.settings.storage_dir, self.settings.home):  # no quota: what it lives on
            try:
                st = os.statvfs(path)
            except OSError:
                continue
            return st.f_blocks * st.f_frsize // _MIB
        return 0
