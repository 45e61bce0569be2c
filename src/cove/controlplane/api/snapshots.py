"""/v1/snapshots: list, inspect and delete snapshots (take them with POST /v1/sandboxes/{id}/snapshots)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import SnapshotList, SnapshotOut
from cove.controlplane.snapshots import Snapshots

from .deps import snapshots

router = APIRouter(prefix="/v1/snapshots", tags=["snapshots"])
Snaps = Annotated[Snapshots, Depends(snapshots)]
Who = Annotated[Caller, Depends(caller)]


@router.get("", response_model=SnapshotList)
async def list_snapshots(who: Who, snaps: Snaps) -> SnapshotList:
    return SnapshotList(items=[SnapshotOut.of(s) for s in await snaps.list(who)])


@router.get("/{snapshot_id}", response_model=SnapshotOut)
async def get_snapshot(snapshot_id: str, who: Who, snaps: Snaps) -> SnapshotOut:
    return SnapshotOut.of(await snaps.get(who, snapshot_id))


@router.delete("/{snapshot_id}", status_code=204)
async def delete_snapshot(snapshot_id: str, who: Who, snaps: Snaps) -> Response:
    """Delete a snapshot. Sandboxes started from it keep working: its layers stay while they use them."""
    await snaps.delete(who, snapshot_id)
    return Response(status_code=204)
