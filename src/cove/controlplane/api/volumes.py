"""/v1/volumes: named volumes that outlive sandboxes (mount them with `volumes` at create)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import CreateVolume, VolumeList, VolumeOut
from cove.controlplane.service import SandboxService

from .deps import service

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]


@router.post("", status_code=201, response_model=VolumeOut)
async def create_volume(body: CreateVolume, who: Who, svc: Svc) -> VolumeOut:
    """A new empty volume; `size_mb` limits it (writes beyond fail with EDQUOT inside sandboxes)."""
    async with svc.audit.action(who, "volume.create", f"volume/{body.name}", size_mb=body.size_mb):
        return VolumeOut.of(await svc.volumes.create(who, body.name, body.size_mb))


@router.get("", response_model=VolumeList)
async def list_volumes(who: Who, svc: Svc) -> VolumeList:
    return VolumeList(items=[VolumeOut.of(v) for v in await svc.volumes.list(who)])


@router.get("/{name}", response_model=VolumeOut)
async def get_volume(name: str, who: Who, svc: Svc) -> VolumeOut:
    """The volume and the live sandboxes that mount it."""
    vol = await svc.volumes.get(who, name)
    return VolumeOut.of(vol, await svc.volumes.users(vol.id))


@router.delete("/{name}", status_code=204)
async def delete_volume(name: str, who: Who, svc: Svc) -> Response:
    """Delete a volume and its content; 409 (naming them) while sandboxes mount it."""
    async with svc.audit.action(who, "volume.delete", f"volume/{name}"):
        await svc.volumes.delete(who, name)
    return Response(status_code=204)
