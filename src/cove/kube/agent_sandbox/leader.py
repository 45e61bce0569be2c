"""Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's leaderelection does it: the
holder renews `renewTime` every `renew_s`; a candidate takes the Lease over once it has seen the same
(holder, renewTime) unchanged for `leaseDurationSeconds` by its own clock (never comparing clocks across
machines). Every write carries the resourceVersion it read, so two candidates never both win.

A leader that cannot renew for `duration_s` stops acting before anyone else may start (it measures from
its last successful renewal, others from when they last saw that renewal, which is later)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from lightkube import ApiError, AsyncClient
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("cove.kube.agent_sandbox")


def _micro_time() -> str:
    # metav1.MicroTime: exactly six fractional digits (written as a string: a datetime that lightkube
    # encodes drops them when the microseconds are 0).
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: AsyncClient,
        name: str,
        namespace: str,
        identity: str,
        duration_s: int = 15,
        renew_s: float = 2.0,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.duration_s = duration_s
        self.renew_s = renew_s
        self.on_change = on_change
        self.leading = False
        self.became_leader = asyncio.Event()
        self._observed: tuple[str | None, str | None] = (None, None)
        self._observed_at = 0.0
        self._renewed_at = 0.0

    async def run(self) -> None:
        while True:
            try:
                ok = await self._try()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("lease %s/%s: %r", self.namespace, self.name, e)
                ok = False
            if ok:
                self._renewed_at = time.monotonic()
                self._set(True)
            elif self.leading and time.monotonic() - self._renewed_at > self.duration_s - self.renew_s:
                # Step down before the others may take over (they wait the full duration from later).
                self._set(False)
            await asyncio.sleep(self.renew_s)

    def _set(self, leading: bool) -> None:
        if leading == self.leading:
            return
        self.leading = leading
        log.info("lease %s/%s: %s", self.namespace, self.name, "leading" if leading else "not leading")
        if leading:
            self.became_leader.set()
        else:
            self.became_leader.clear()
        if self.on_change:
            self.on_change(leading)

    async def _try(self) -> bool:
        """One acquire-or-renew round; whether this instance holds the Lease now."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code != 404:
                raise
            # Created without times (see _micro_time), then stamped by the patch below.
            body = Lease.from_dict({
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s, "leaseTransitions": 0},
            })  # fmt: skip
            try:
                lease = await self.client.create(body)
            except ApiError as e2:
                if e2.status.code == 409:
                    return False  # another candidate made it first
                raise
            return await self._write(lease.metadata.resourceVersion, transitions=0, acquire=True)
        spec = lease.spec
        holder = spec.holderIdentity or None
        renewed = spec.renewTime.isoformat() if spec.renewTime else None
        if (holder, renewed) != self._observed:
            self._observed = (holder, renewed)
            self._observed_at = time.monotonic()
        duration = spec.leaseDurationSeconds or self.duration_s
        if holder and holder != self.identity and time.monotonic() < self._observed_at + duration:
            self._set(False)  # someone else holds it (this one was paused past its lease): stop at once
            return False  # held, and renewed within its duration as far as this instance has seen
        mine = holder == self.identity
        transitions = (spec.leaseTransitions or 0) + (0 if mine else 1)
        return await self._write(lease.metadata.resourceVersion, transitions, acquire=not mine)

    async def _write(self, version: str | None, transitions: int, acquire: bool) -> bool:
        stamp = _micro_time()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "renewTime": stamp,
            "leaseTransitions": transitions,
        }
        if acquire:
            spec["acquireTime"] = stamp
        patch = {"metadata": {"resourceVersion": version}, "spec": spec}
        try:
            await self.client.patch(
                Lease, self.name, patch, namespace=self.namespace, patch_type=PatchType.MERGE
            )
        except ApiError as e:
            if e.status.code == 409:
                return False  # someone wrote it since we read it
            raise
        if acquire:
            log.info("lease %s/%s acquired by %s", self.namespace, self.name, self.identity)
        return True

    async def release(self) -> None:
        """Gives the Lease up at once (a clean stop), so that another instance need not wait it out."""
        if not self.leading:
            return
        self._set(False)
        with contextlib.suppress(Exception):
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
            if lease.spec.holderIdentity == self.identity:
                patch = {
                    "metadata": {"resourceVersion": lease.metadata.resourceVersion},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _micro_time()},
                }
                await self.client.patch(
                    Lease, self.name, patch, namespace=self.namespace, patch_type=PatchType.MERGE
                )
