"""A list-then-watch cache of one kind (what client-go calls an informer), as plain dicts.

The controller and the router read objects from these caches, never from the API server on their hot paths:
a claim is answered from what the watches already delivered. Every change is handed to `on_event`, which
only enqueues work (it must not block). Writes the controller makes are put into the cache at once
(`update`), so a reconcile that follows its own write never acts on the state before it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from lightkube import ApiError, AsyncClient

log = logging.getLogger("cove.kube.agent_sandbox")

Key = tuple[str, str]  # (namespace, name)
OnEvent = Callable[[str, dict[str, Any]], None]
BACKOFF_MAX_S = 10.0


def as_dict(obj: Any) -> dict[str, Any]:
    """A lightkube object as the JSON dict the API server sent (generic resources already are dicts)."""
    if isinstance(obj, dict):
        d = dict(obj)
        meta = d.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            d["metadata"] = meta.to_dict()
        return d
    return obj.to_dict()


def key_of(obj: dict[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]


def _version(obj: dict[str, Any]) -> int:
    """resourceVersion as a number: opaque by contract, an etcd revision in practice (used only to keep a
    newer object in the cache when an older watch event arrives after it)."""
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class Informer:
    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        on_event: OnEvent,
        *,
        namespace: str = "*",
        labels: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.resource = resource
        self.on_event = on_event
        self.namespace = namespace
        self.labels = labels
        self.objects: dict[Key, dict[str, Any]] = {}
        # The last version of each object deleted: a write's answer that arrives after the deletion's event
        # must not bring the object back into the cache.
        self._tombstones: dict[Key, int] = {}
        self.synced = asyncio.Event()  # the first list is in
        self.kind = getattr(resource, "__name__", str(resource))

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((namespace, name))

    def in_namespace(self, namespace: str) -> list[dict[str, Any]]:
        return [o for (ns, _), o in self.objects.items() if ns == namespace]

    def all(self) -> list[dict[str, Any]]:
        return list(self.objects.values())

    def update(self, obj: Any) -> dict[str, Any]:
        """Puts an object the caller got back from a write into the cache (unless a newer one is there)."""
        d = as_dict(obj)
        key = key_of(d)
        if _version(d) <= self._tombstones.get(key, -1):
            return d  # deleted since: not cached again
        old = self.objects.get(key)
        if old is None or _version(d) >= _version(old):
            self.objects[key] = d
        return self.objects[key]

    def forget(self, namespace: str, name: str) -> None:
        self.objects.pop((namespace, name), None)

    async def run(self) -> None:
        """List, then watch from that version; on 410 Gone list again; on other failures back off and watch
        again from the last version seen (the API server replays what was missed)."""
        version: str | None = None
        delay = 0.5
        while True:
            try:
                if version is None:
                    version = await self._relist()
                async for kind, obj in self.client.watch(
                    self.resource,
                    namespace=self.namespace,
                    labels=self.labels,
                    resource_version=version,
                    server_timeout=300,
                ):
                    d = as_dict(obj)
                    version = d["metadata"].get("resourceVersion") or version
                    delay = 0.5
                    self._apply(kind, d)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                if e.status.code == 410:
                    version = None
                    continue
                log.warning("%s watch failed: %s", self.kind, e)
            except Exception as e:
                log.warning("%s watch failed: %r", self.kind, e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _relist(self) -> str:
        listing = self.client.list(self.resource, namespace=self.namespace, labels=self.labels)
        items = [as_dict(o) async for o in listing]
        seen = {key_of(d) for d in items}
        for key in [k for k in self.objects if k not in seen]:
            gone = self.objects.pop(key)
            self._tombstones[key] = _version(gone)
            self._notify("DELETED", gone)
        for d in items:
            self.objects[key_of(d)] = d
            self._notify("ADDED", d)
        self.synced.set()
        return listing.resourceVersion

    def _apply(self, kind: str, d: dict[str, Any]) -> None:
        key = key_of(d)
        if kind == "DELETED":
            self.objects.pop(key, None)
            if len(self._tombstones) > 10_000:
                self._tombstones.clear()
            self._tombstones[key] = _version(d)
        else:
            old = self.objects.get(key)
            if old is not None and _version(old) > _version(d):
                return  # our own write is already here, newer than this event
            self.objects[key] = d
        self._notify(kind, d)

    def _notify(self, kind: str, d: dict[str, Any]) -> None:
        try:
            self.on_event(kind, d)
        except Exception:  # a bug in a handler must not stop the watch
            log.exception("%s event handler failed", self.kind)
