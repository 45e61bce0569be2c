"""The fleet: every node this control plane drives (docs/fleet.md).

Each server is a node too: its own sandboxes run in-process (`local`). Servers that share one
database (PostgreSQL) find each other's nodes in the store: a node writes its record (the address
of its node API and the credential that API demands) at start and a heartbeat every HEARTBEAT_S.
Any server reaches any sandbox through the node that holds it (`of`), in-process or over the node
API (`cove.node.remote`). A ready node whose heartbeat is older than LOST_AFTER_S is lost: the
server holding the reaper's lease marks its sandboxes so (`Reaper`); nothing here decides that alone.
On Kubernetes the same records come from the cluster's Node objects and their Leases instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cove import __version__
from cove.config import Settings
from cove.controlplane.admission import Admission, HostPressure, busy
from cove.controlplane.errors import ApiError
from cove.node.base import NodeAgent
from cove.node.remote.client import RemoteNode
from cove.node.remote.server import NodeServer
from cove.store.base import NodeRecord, Store

log = logging.getLogger("cove.fleet")

HEARTBEAT_S = 1.0
LOST_AFTER_S = 10.0  # a node's heartbeat this old: it is lost (its sandboxes are marked so)
CONNECT_TIMEOUT_S = 5.0
DESCRIBE_EVERY_S = 5.0  # how often another node's call-free answers are re-read
HOLDING = ["starting", "running", "paused"]  # the states in which a sandbox takes room on its node


def _kept(path: Path, make: str) -> str:
    """The value kept in `path` (made once, private to root): the node's id and credential must
    survive a restart, since records name the node by id and other servers hold its credential."""
    with contextlib.suppress(FileNotFoundError):
        if value := path.read_text().strip():
            return value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make + "\n")
    return make


class Fleet:
    def __init__(self, settings: Settings, store: Store, local: NodeAgent, admission: Admission) -> None:
        self.settings = settings
        self.store = store
        self.local = local
        self.admission = admission  # judges this host live, and other nodes by their heartbeat's readings
        self.id = ""  # this server's node id, known at start
        self.server: NodeServer | None = None  # this node's API, when the store is shared
        self._records: dict[str, NodeRecord] = {}
        self._remote: dict[str, RemoteNode] = {}
        self._described: dict[str, float] = {}  # node id -> monotonic time of its last description
        self._reached: dict[str, tuple[str, str]] = {}  # node id -> the address and token it was reached with
        self._task: asyncio.Task[None] | None = None
        self._jobs: list[Callable[[], Awaitable[None]]] = []
        self._capacity: dict[str, Any] = {}  # what this node's record says of it, beside its readings

    @property
    def shared(self) -> bool:
        """Do other servers share this store (and so reach this node over its API)?"""
        return self.settings.database_url is not None

    async def start(self, api: bool = True) -> None:
        """Register this node (and serve its API when the store is shared), then keep its heartbeat.
        `api`: this server serves cove's API too (it keeps warm pools)."""
        s = self.settings
        host = socket.gethostname().split(".")[0].lower()
        self.id = s.node_id or _kept(s.home / "node-id", f"{host}-{secrets.token_hex(3)}")
        token = _kept(s.home / "node-token", secrets.token_urlsafe(32))
        address = ""
        if self.shared:
            self.server = NodeServer(self.local, token, s.node_listen, s.node_port)
            await self.server.start()
            address = s.node_advertise or f"{s.node_listen}:{self.server.port}"
        now = time.time()
        self._capacity = {
            "cpus": os.cpu_count() or 1,
            "version": __version__,
            "api": api,
            "max_sandboxes": s.node_max_sandboxes,
        }
        await self.store.put_node(
            NodeRecord(
                id=self.id,
                address=address,
                token=token,
                state="ready",
                started_at=now,
                seen_at=now,
                capacity={**self._capacity, "pressure": await self._pressure()},
            )
        )
        await self.refresh()
        self._task = asyncio.create_task(self._beat(), name="cove-fleet")
        log.info("node registered", extra={"node": self.id, "address": address or "in-process only"})

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):  # a clean stop is not a loss: its sandboxes are kept
            await self.store.update_node(self.id, state="left", seen_at=time.time())
        if self.server:
            await self.server.close()
        for node in self._remote.values():
            await node.close()
        self._remote.clear()

    # -- finding nodes ---------------------------------------------------------------------
    def of(self, node_id: str) -> NodeAgent:
        """The node holding an object whose record names `node_id` ("": this server's, as records
        made before the fleet existed). 503 when it cannot be reached from here."""
        if not node_id or node_id == self.id:
            return self.local
        node = self._remote.get(node_id)
        if node is None:
            rec = self._records.get(node_id)
            why = "is not known" if rec is None else f"is {self.state(rec)}"
            raise ApiError(503, "node_unavailable", f"the node {node_id} holding it {why}")
        return node

    def state(self, rec: NodeRecord, now: float | None = None) -> str:
        """ready, lost (its heartbeat is too old) or left (stopped cleanly)."""
        if rec.state == "ready" and rec.seen_at < (now or time.time()) - LOST_AFTER_S:
            return "lost"
        return rec.state

    def records(self) -> list[NodeRecord]:
        """Every node known, as last read (refreshed each heartbeat)."""
        return list(self._records.values())

    def api_replicas(self) -> int:
        """How many ready servers serve cove's API (and keep warm pools), this one included."""
        ready = set(self.ready())
        return max(1, sum(1 for r in self._records.values() if r.id in ready and r.capacity.get("api", True)))

    def every_beat(self, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` after each heartbeat (its failures are logged, the beat goes on)."""
        self._jobs.append(job)

    def ready(self) -> list[str]:
        """Ids of the nodes that can take new sandboxes: this one, and each one reachable from here."""
        return [self.id, *(n for n in self._remote if self.state(self._records[n]) == "ready")]

    async def place(self, runtime: str, pinned: str | None = None) -> str:
        """The node for a new sandbox: `pinned` (where its source's files are) if given, else the
        ready node that runs `runtime`, has room (`refusal`) and holds the fewest sandboxes (this
        one on a tie). 503 when the node it must go to, or every node, is full."""
        if pinned is not None:
            self.of(pinned)  # 503 if it cannot be reached
            node_id = pinned or self.id
            if err := await self.refusal(node_id, await self._counts()):
                raise err
            return node_id
        candidates = [n for n in self.ready() if self.of(n).runtime_problem(runtime) is None]
        if not candidates:
            return self.id  # the create then says why this node cannot run it
        counts = await self.store.count_by_node(HOLDING)
        refusals = {n: await self.refusal(n, counts, count=False) for n in candidates}
        roomy = [n for n in candidates if refusals[n] is None]
        if not roomy:  # this node's reason first (counted, by its reason), then the others'
            first = self.id if self.id in candidates else candidates[0]
            err = await self.refusal(first, counts) or refusals[first]
            if err is not None and len(candidates) > 1:
                err = busy("fleet_full", f"all {len(candidates)} nodes are full; {err.message}")
            raise err or ApiError(503, "fleet_full", "no node takes new sandboxes now")
        return min(roomy, key=lambda n: (counts.get(n, 0), n != self.id))

    async def spread(self, k: int, runtime: str, exclude: set[str]) -> list[str]:
        """Nodes for `k` new sandboxes (one entry each, a node repeated while it has room), none of
        them in `exclude`, fewest sandboxes first; shorter than `k` when the fleet has no more room."""
        counts = dict(await self.store.count_by_node(HOLDING))
        out: list[str] = []
        nodes = [n for n in self.ready() if n not in exclude and self.of(n).runtime_problem(runtime) is None]
        while len(out) < k:
            roomy = [n for n in nodes if await self.refusal(n, counts, count=False) is None]
            if not roomy:
                break
            best = min(roomy, key=lambda n: (counts.get(n, 0), n != self.id))
            counts[best] = counts.get(best, 0) + 1
            out.append(best)
        return out

    async def has_room(self, node_id: str) -> bool:
        """Does `node_id` take a new sandbox now (`refusal`, not counted as a refused request)?"""
        return await self.refusal(node_id, await self._counts(), count=False) is None

    async def room(self, node_id: str) -> int | None:
        """How many more sandboxes `node_id` takes now: 0 when its host runs low, None for no limit."""
        counts = await self.store.count_by_node(HOLDING)
        if await self.refusal(node_id, counts, count=False) is not None:
            return 0
        most = self._limit(node_id)
        return most - counts.get(node_id, 0) if most else None

    async def refusal(self, node_id: str, counts: dict[str, int], count: bool = True) -> ApiError | None:
        """Why `node_id` takes no new sandbox now (None: it does): it holds its limit of sandboxes
        (COVE_NODE_MAX_SANDBOXES), or its host runs low on memory or pids (this host as read now,
        another by its last heartbeat). `counts`: sandboxes per node, as `count_by_node(HOLDING)`."""
        most = self._limit(node_id)
        if most and counts.get(node_id, 0) >= most:
            if count:
                self.admission.rejected.labels("full").inc()
            return busy(
                "node_full",
                f"node {node_id} holds {counts.get(node_id, 0)} sandboxes, its limit "
                f"(COVE_NODE_MAX_SANDBOXES={most}); retry later or end sandboxes",
            )
        if node_id == self.id:
            return await self.admission.refusal(count)
        reading = (self._records[node_id].capacity if node_id in self._records else {}).get("pressure")
        if not isinstance(reading, dict):
            return None  # a node from before readings were sent: judged by its own admission
        return self.admission.judge(HostPressure(**reading), count, where=f"node {node_id}")

    def _limit(self, node_id: str) -> int:
        if node_id == self.id:
            return self.settings.node_max_sandboxes
        rec = self._records.get(node_id)
        return int((rec.capacity if rec else {}).get("max_sandboxes") or 0)

    async def _counts(self) -> dict[str, int]:
        """Sandboxes per node, read only when some node has a limit (creates stay one query less)."""
        if self.settings.node_max_sandboxes or any(
            r.capacity.get("max_sandboxes") for r in self._records.values()
        ):
            return await self.store.count_by_node(HOLDING)
        return {}

    async def _pressure(self) -> dict[str, int]:
        h = await self.admission.host()
        return {"memory_available_mb": h.memory_available_mb, "free_pids": h.free_pids}

    # -- heartbeat -----------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read the nodes' records; connect to nodes new or changed, forget those gone."""
        now = time.time()
        self._records = {r.id: r for r in await self.store.list_nodes()}
        for node_id, rec in self._records.items():
            if node_id == self.id or not rec.address:
                continue
            known = self._remote.get(node_id)
            if self.state(rec, now) != "ready":
                if known is not None:
                    await self._forget(node_id)
                continue
            if known is not None and self._reached[node_id] == (rec.address, rec.token):
                if time.monotonic() - self._described.get(node_id, 0.0) >= DESCRIBE_EVERY_S:
                    await self._describe(node_id, known)
                continue
            if known is not None:
                await self._forget(node_id)
            node = RemoteNode(node_id, rec.address, rec.token)
            try:
                await asyncio.wait_for(node.start(), CONNECT_TIMEOUT_S)
            except Exception as e:  # it may still be starting: the next heartbeat tries again
                log.info("node not reachable yet", extra={"node": node_id, "error": str(e)})
                await node.close()
                continue
            self._remote[node_id] = node
            self._reached[node_id] = (rec.address, rec.token)
            self._described[node_id] = time.monotonic()
            log.info("node joined", extra={"node": node_id, "address": rec.address})
        for node_id in set(self._remote) - set(self._records):
            await self._forget(node_id)

    async def _describe(self, node_id: str, node: RemoteNode) -> None:
        """Re-read what a node answers without a call (its generation, whether code contexts are
        ready): both change after it starts, e.g. when its kernel environment is built."""
        self._described[node_id] = time.monotonic()
        try:
            await asyncio.wait_for(node.refresh(), CONNECT_TIMEOUT_S)
        except Exception as e:  # still heartbeating maybe, but not answering: try again next time
            log.info("node did not describe itself", extra={"node": node_id, "error": str(e)})

    async def _forget(self, node_id: str) -> None:
        node = self._remote.pop(node_id, None)
        if node is not None:
            await node.close()
            log.info("node left", extra={"node": node_id})

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                capacity = {**self._capacity, "pressure": await self._pressure()}
                await self.store.update_node(self.id, seen_at=time.time(), state="ready", capacity=capacity)
                await self.refresh()
            except Exception:
                log.exception("fleet heartbeat failed")
            for job in self._jobs:
                try:
                    await job()
                except Exception:
                    log.exception("a job after the fleet's heartbeat failed")
