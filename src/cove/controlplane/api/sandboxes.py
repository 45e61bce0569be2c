"""/v1/sandboxes: lifecycle."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import (
    CreateSandbox,
    CreateSnapshot,
    ForkRequest,
    ForkResult,
    SandboxOut,
    SandboxPage,
    SetDurability,
    SetTimeout,
    SnapshotOut,
    State,
)
from cove.controlplane.service import SandboxService
from cove.controlplane.snapshots import Snapshots

from . import fast
from .deps import service, snapshots

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
Svc = Annotated[SandboxService, Depends(service)]
Snaps = Annotated[Snapshots, Depends(snapshots)]
Who = Annotated[Caller, Depends(caller)]


def _parse_metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ApiError(422, "validation_error", f"metadata: expected key=value, got {pair!r}")
        out[key] = value
    return out


@router.post("", status_code=201, response_model=SandboxOut)
async def create_sandbox(body: CreateSandbox, who: Who, svc: Svc) -> SandboxOut:
    """Start a sandbox from a template, with its env, limits, timeout and metadata labels."""
    return SandboxOut.of(await svc.create(who, body))


async def _fast_create(
    svc: SandboxService, who: Caller, params: dict[str, str], body: CreateSandbox
) -> SandboxOut:
    return SandboxOut.of(await svc.create(who, body))


@router.get("", response_model=SandboxPage)
async def list_sandboxes(
    who: Who,
    svc: Svc,
    state: Annotated[list[State] | None, Query(description="filter by state (repeatable)")] = None,
    metadata: Annotated[list[str], Query(description="filter by label, key=value (repeatable)")] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> SandboxPage:
    """List the caller's sandboxes, newest last, a page at a time."""
    page = await svc.list(who, list(state) if state else None, _parse_metadata(metadata), limit, cursor)
    return SandboxPage(items=[SandboxOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{sandbox_id}", response_model=SandboxOut)
async def get_sandbox(sandbox_id: str, who: Who, svc: Svc) -> SandboxOut:
    return SandboxOut.of(await svc.get(who, sandbox_id))


@router.delete("/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, who: Who, svc: Svc) -> Response:
    """Kill every process of the sandbox and free its resources. Killing a dead sandbox is a no-op."""
    await svc.kill(who, sandbox_id)
    return Response(status_code=204)


@router.post("/{sandbox_id}/timeout", response_model=SandboxOut)
async def set_timeout(sandbox_id: str, body: SetTimeout, who: Who, svc: Svc) -> SandboxOut:
    """Reset the sandbox's timeout to `timeout` seconds from now (0: never expires)."""
    return SandboxOut.of(await svc.set_timeout(who, sandbox_id, body.timeout))


@router.post("/{sandbox_id}/durability", response_model=SandboxOut)
async def set_durability(sandbox_id: str, body: SetDurability, who: Who, svc: Svc) -> SandboxOut:
    """Copy the sandbox to the object store every `snapshot_every` seconds of use (0: stop), so that
    losing its node costs at most that much work (docs/object-storage.md)."""
    return SandboxOut.of(await svc.set_durability(who, sandbox_id, body.snapshot_every))


@router.post("/{sandbox_id}/pause", response_model=SandboxOut)
async def pause(sandbox_id: str, who: Who, svc: Svc) -> SandboxOut:
    """Freeze every process of the sandbox (no CPU; memory and files kept)."""
    return SandboxOut.of(await svc.pause(who, sandbox_id))


@router.post("/{sandbox_id}/resume", response_model=SandboxOut)
async def resume(sandbox_id: str, who: Who, svc: Svc) -> SandboxOut:
    """Thaw a paused sandbox; its processes continue where they stopped."""
    return SandboxOut.of(await svc.resume(who, sandbox_id))


@router.post("/{sandbox_id}/hibernate", response_model=SandboxOut)
async def hibernate(sandbox_id: str, who: Who, svc: Svc) -> SandboxOut:
    """Release the sandbox's memory and CPU; its files stay. `hibernation.memory` says whether its
    processes were checkpointed (they continue on resume) or will be started afresh."""
    return SandboxOut.of(await svc.hibernate(who, sandbox_id))


@router.post("/{sandbox_id}/snapshots", status_code=201, response_model=SnapshotOut)
async def snapshot(
    sandbox_id: str, who: Who, snaps: Snaps, body: CreateSnapshot | None = None
) -> SnapshotOut:
    """Seal the sandbox's files as they are now; start new sandboxes from it with `snapshot`."""
    body = body or CreateSnapshot()
    return SnapshotOut.of(await snaps.take(who, sandbox_id, body.name, body.memory, volumes=body.volumes))


@router.post("/{sandbox_id}/fork", status_code=201, response_model=ForkResult)
async def fork(sandbox_id: str, who: Who, snaps: Snaps, body: ForkRequest | None = None) -> ForkResult:
    """`count` new sandboxes that continue from this instant (files, and processes where the node
    can checkpoint them: `memory`); the source keeps running."""
    body = body or ForkRequest()
    children, memory = await snaps.fork(who, sandbox_id, body.count, body.metadata, body.volumes)
    return ForkResult(items=[SandboxOut.of(c) for c in children], memory=memory)


# Put before every other route (cove.controlplane.app.install): create is on the pool claim's path.
fast_routes = [fast.route(fast.of(router, create_sandbox), CreateSandbox, _fast_create, status=201)]
