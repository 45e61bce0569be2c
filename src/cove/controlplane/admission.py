"""Admission control: refuse new sandboxes while the host runs low on memory or pids, and bound
how many start at once.

A refused create gets `503` with a reason (`host_low_memory`, `host_low_pids`) and `Retry-After`,
instead of a sandbox that the OOM killer or a failing fork ends a moment later. The pools' refill
asks the same question and waits. Thresholds: `COVE_ADMIT_MIN_MEMORY_MB`, `COVE_ADMIT_MIN_PIDS`.

Creates that start a sandbox (not pool claims, which cost about a millisecond) take one of
`COVE_MAX_STARTING` slots; the rest wait for one in FIFO order (`StartSlots`). Starting more at once
than the CPUs can serve makes each slower without making more of them per second, and an unbounded
queue under overload only grows: every create then waits minutes and the clients time out. So at
most `COVE_MAX_QUEUED_CREATES` wait, and the next create gets `503 server_busy` with `Retry-After`
at once, which a client can act on (back off, go elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from cove.config import Settings
from cove.controlplane.errors import ApiError

SAMPLE_TTL = 0.25  # seconds a reading of /proc is reused: creates may come hundreds a second
RETRY_AFTER = 5


@dataclass(frozen=True)
class HostPressure:
    memory_available_mb: int
    free_pids: int


def read_host() -> HostPressure:
    """MemAvailable, and how many more tasks the kernel allows (pid_max and threads-max)."""
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                mem = int(line.split()[1]) // 1024
                break
    with open("/proc/loadavg") as f:
        tasks = int(f.read().split()[3].split("/")[1])
    limits = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        with open(path) as f:
            limits.append(int(f.read()))
    return HostPressure(mem, min(limits) - tasks)


class StartSlot:
    """A create's place among the cold starts: running (`wait` returns at once) or queued."""

    def __init__(self, slots: StartSlots, ticket: asyncio.Future[None] | None) -> None:
        self._slots = slots
        self._ticket = ticket  # None: it had a slot at once
        self._released = False

    async def wait(self) -> None:
        """Until this create may start its sandbox (FIFO among the waiting ones)."""
        if self._ticket is not None:
            await self._ticket

    def release(self) -> None:
        """Give the slot to the next waiting create, or leave the queue (idempotent)."""
        if self._released:
            return
        self._released = True
        ticket = self._ticket
        if ticket is not None and not (ticket.done() and not ticket.cancelled()):
            ticket.cancel()  # never got a slot: only its place in the queue goes
            self._slots.leave(ticket)
            return
        self._slots.done()


class StartSlots:
    """At most `limit` sandboxes start at a time (0: no limit); further creates wait in FIFO order,
    at most `max_queued` of them (beyond that: `503 server_busy`)."""

    def __init__(self, limit: int, max_queued: int) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.running = 0
        self._queue: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reserve(self) -> StartSlot:
        """A slot now, or a place in the queue; raises `server_busy` when the queue is full.
        Synchronous, so a create holds its place from the moment it is admitted."""
        if self.limit <= 0 or (self.running < self.limit and not self._queue):
            self.running += 1
            return StartSlot(self, None)
        if len(self._queue) >= self.max_queued:
            raise busy(
                "server_busy",
                f"the server is at capacity: {len(self._queue)} creates are queued for a start slot "
                f"({self.running} of {self.limit} in use, at most {self.max_queued} may wait); retry later",
            )
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        return StartSlot(self, ticket)

    def leave(self, ticket: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already passed over by done()
            self._queue.remove(ticket)

    def done(self) -> None:
        """A start finished: its slot passes to the oldest waiting create, if any."""
        while self._queue:
            ticket = self._queue.popleft()
            if not ticket.done():  # a cancelled waiter leaves its ticket cancelled (done)
                ticket.set_result(None)
                return
        self.running -= 1


class Admission:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._sample: tuple[float, HostPressure] | None = None
        self.rejected = Counter(
            "cove_admission_rejections",
            "Creates refused because the host ran low (reason: memory, pids), the queue of creates "
            "waiting to start was full (busy) or a tenant's quota",
            ["reason"],
            registry=registry,
        )
        self.starts = StartSlots(settings.max_starting, settings.max_queued_creates)
        queued = Gauge(
            "cove_creates_queued", "Creates waiting for a slot to start their sandbox", registry=registry
        )
        queued.set_function(lambda: self.starts.queued)
        starting = Gauge(
            "cove_creates_starting", "Creates starting a sandbox now (holding a slot)", registry=registry
        )
        starting.set_function(lambda: self.starts.running)

    def start_slot(self) -> StartSlot:
        """A place among the creates that start a sandbox, or `503 server_busy` (counted)."""
        try:
            return self.starts.reserve()
        except ApiError:
            self.rejected.labels("busy").inc()
            raise

    async def host(self) -> HostPressure:
        now = time.monotonic()
        if self._sample is None or now - self._sample[0] > SAMPLE_TTL:
            self._sample = (now, await asyncio.to_thread(read_host))
        return self._sample[1]

    async def refusal(self, count: bool = True) -> ApiError | None:
        """Why a new sandbox cannot start on this host now, or None (`count`: as a refused request)."""
        return self.judge(await self.host(), count)

    def judge(self, h: HostPressure, count: bool = True, where: str = "the host") -> ApiError | None:
        """Why a new sandbox cannot start on a host with these readings (another node's come with
        its heartbeat: `where` names it), or None."""
        s = self.settings
        if h.memory_available_mb < s.admit_min_memory_mb:
            if count:
                self.rejected.labels("memory").inc()
            return busy(
                "host_low_memory",
                f"{where} has {h.memory_available_mb} MB of memory available, below the "
                f"{s.admit_min_memory_mb} MB it keeps free; retry later or free sandboxes",
            )
        if h.free_pids < s.admit_min_pids:
            if count:
                self.rejected.labels("pids").inc()
            return busy(
                "host_low_pids",
                f"{where} can start {h.free_pids} more processes, below the {s.admit_min_pids} it "
                "keeps free; retry later or free sandboxes",
            )
        return None


def busy(code: str, message: str) -> ApiError:
    err = ApiError(503, code, message, retry_after=RETRY_AFTER)
    err.headers = {"Retry-After": str(RETRY_AFTER)}
    return err
