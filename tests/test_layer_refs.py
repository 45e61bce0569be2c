"""LayerRefs, the one owner of layer references: what it keeps when it collects, on a real store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from cove.controlplane.layer_refs import LayerRefs
from cove.node.base import TemplateSpec
from cove.store.base import SandboxRecord, SnapshotRecord
from cove.store.sqlite import SQLiteStore


class Layers:
    """The node's side of a collection: layers on disk, and the ones it was told to keep."""

    def __init__(self, on_disk: set[str]) -> None:
        self.on_disk = on_disk
        self.snapshots = self  # the node's layer part: `node.snapshots.collect`

    async def base_template(self) -> TemplateSpec:
        return TemplateSpec("base", ("base0",), {})

    async def collect(self, keep: set[str]) -> list[str]:
        removed = sorted(self.on_disk - keep)
        self.on_disk -= set(removed)
        return removed


def _sandbox(sid: str, state: str, layers: list[str]) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        id=sid, tenant="t", template="base", state=state, runtime="namespaces", created_at=now,
        updated_at=now, expires_at=None, timeout=0, layers=layers,
    )  # fmt: skip


def test_collect_keeps_every_kind_of_reference(tmp_path: Path) -> None:
    async def go() -> dict[str, Any]:
        store = SQLiteStore(tmp_path / "db.sqlite")
        await store.open()
        node = Layers({"base0", "live", "dead", "snap", "pinned", "loose"})
        refs = LayerRefs(store, node)  # type: ignore[arg-type]
        await store.insert_sandbox(_sandbox("a", "running", ["base0", "live"]))
        await store.insert_sandbox(_sandbox("b", "killed", ["base0", "dead"]))
        await store.insert_snapshot(
            SnapshotRecord(id="s", tenant="t", name=None, sandbox_id="a", state="ready",
                           created_at=time.time(), layers=["base0", "snap"])
        )  # fmt: skip
        refs.pin(["pinned", "pinned"])
        refs.unpin(["pinned"])  # pinned twice, unpinned once: still held
        with refs.making():
            await refs.collect()  # a layer being made is on disk unpinned: nothing may go
        during = set(node.on_disk)
        await refs.collect()
        after_first = set(node.on_disk)
        refs.unpin(["pinned"])
        await refs.collect()
        await store.close()
        return {"during": during, "first": after_first, "last": set(node.on_disk)}

    got = asyncio.run(go())
    assert got["during"] == {"base0", "live", "dead", "snap", "pinned", "loose"}
    assert got["first"] == {"base0", "live", "snap", "pinned"}  # a killed sandbox's and a loose one go
    assert got["last"] == {"base0", "live", "snap"}
