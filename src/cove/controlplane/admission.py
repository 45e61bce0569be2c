"""Admission control: refuse new sandboxes while the host runs low on memory or pids.

A refused create gets `503` with a reason (`host_low_memory`, `host_low_pids`) and `Retry-After`,
instead of a sandbox that the OOM killer or a failing fork ends a moment later. The pools' refill
asks the same question and waits. Thresholds: `COVE_ADMIT_MIN_MEMORY_MB`, `COVE_ADMIT_MIN_PIDS`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

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


class Admission:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._sample: tuple[float, HostPressure] | None = None
        self.rejected = Counter(
            "cove_admission_rejections",
            "Creates refused because the host ran low (reason: memory, pids) or a tenant's quota",
            ["reason"],
            registry=registry,
        )

    async def host(self) -> HostPressure:
        now = time.monotonic()
        if self._sample is None or now - self._sample[0] > SAMPLE_TTL:
            self._sample = (now, await asyncio.to_thread(read_host))
        return self._sample[1]

    async def refusal(self, count: bool = True) -> ApiError | None:
        """Why a new sandbox cannot start now, or None (`count`: as a refused request)."""
        h = await self.host()
        s = self.settings
        if h.memory_available_mb < s.admit_min_memory_mb:
            if count:
                self.rejected.labels("memory").inc()
            return busy(
                "host_low_memory",
                f"the host has {h.memory_available_mb} MB of memory available, below the "
                f"{s.admit_min_memory_mb} MB it keeps free; retry later or free sandboxes",
            )
        if h.free_pids < s.admit_min_pids:
            if count:
                self.rejected.labels("pids").inc()
            return busy(
                "host_low_pids",
                f"the host can start {h.free_pids} more processes, below the {s.admit_min_pids} it "
                "keeps free; retry later or free sandboxes",
            )
        return None

    async def check(self) -> None:
        err = await self.refusal()
        if err is not None:
            raise err


def busy(code: str, message: str) -> ApiError:
    err = ApiError(503, code, message, retry_after=RETRY_AFTER)
    err.headers = {"Retry-After": str(RETRY_AFTER)}
    return err
