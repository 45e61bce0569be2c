"""The one owner of layer references: what keeps a committed layer from being collected.

Committed layers are shared by templates, snapshots, sandboxes, pooled sandboxes and template
builds in progress. Whoever adds a reference (records a layer, pins one, starts making one) holds
`held()` meanwhile, so a collection never sees a layer between its making and its recording;
`collect()` deletes the layers none of them references any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator

from cove.controlplane.states import LIVE
from cove.node.base import NodeAgent
from cove.store.base import Store

log = logging.getLogger("cove.layers")

COLLECT_AFTER = 0.5  # seconds from a kill to the collection it asks for (see collect_soon)


class LayerRefs:
    def __init__(self, store: Store, node: NodeAgent) -> None:
        self.store = store
        self.node = node
        self._lock = asyncio.Lock()  # held while references are read or added
        self._pins: Counter[str] = Counter()  # layers held in memory (builds, pooled sandboxes)
        self._makers = 0  # work making layers that are not pinned yet: collection waits
        self._collector: asyncio.Task[None] | None = None
        self._wanted = False
        self._stopped = False

    def held(self) -> asyncio.Lock:
        """Hold while adding a reference: nothing is collected meanwhile."""
        return self._lock

    def pin(self, layers: Iterable[str]) -> None:
        """Keep `layers` until `unpin` (references the store does not record)."""
        self._pins.update(layers)

    def unpin(self, layers: Iterable[str]) -> None:
        self._pins.subtract(layers)
        for layer in [k for k, n in self._pins.items() if n <= 0]:
            del self._pins[layer]

    def pinned(self) -> set[str]:
        return set(self._pins)

    @contextlib.contextmanager
    def making(self) -> Iterator[None]:
        """Around work that puts layers on disk before it can pin them (an image import)."""
        self._makers += 1
        try:
            yield
        finally:
            self._makers -= 1

    async def collect(self) -> None:
        """Delete committed layers that no template, snapshot, sandbox or pin references any more."""
        if self._makers:
            return  # layers on disk but not pinned yet; the next collection runs later
        async with self._lock:
            keep = set((await self.node.base_template()).layers) | set(self._pins)
            for snap in await self.store.list_snapshots(None):
                keep.update(snap.layers)
            for rec in (await self.store.list_sandboxes(None, list(LIVE), limit=1_000_000)).items:
                keep.update(rec.layers)
            for tpl in await self.store.list_templates(None):
                keep.update(tpl.layers)
            removed = await self.node.snapshots.collect(keep)
        if removed:
            log.info("layers collected", extra={"layers": removed})

    def collect_soon(self) -> None:
        """A collection shortly after an end, shared by the ends of that moment: it reads every
        sandbox, snapshot and template, too much to do for each kill (50 a second, 5,000 records)."""
        self._wanted = True
        if self._stopped:
            return  # shutting down: the next start collects
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect_wanted(), name="cove-collect")

    async def _collect_wanted(self) -> None:
        while self._wanted:
            await asyncio.sleep(COLLECT_AFTER)
            self._wanted = False  # an end during this collection asks for the next one
            try:
                await self.collect()
            except Exception:
                log.exception("layer collection failed")

    async def close(self) -> None:
        self._stopped = True
        if self._collector:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
