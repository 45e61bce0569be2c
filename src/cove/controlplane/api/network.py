"""/v1/sandboxes/{id}/network: a sandbox's egress policy, read and changed while it runs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import NetworkOut, NetworkSettings, NetworkStatus
from cove.controlplane.service import SandboxService

from .deps import service

router = APIRouter(prefix="/v1/sandboxes", tags=["network"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]

_POLICY = ("mode", "allow", "deny", "public_traffic")


@router.get("/{sandbox_id}/network", response_model=NetworkStatus)
async def get_network(sandbox_id: str, who: Who, svc: Svc) -> NetworkStatus:
    """The sandbox's egress policy, its proxy, and how many connections it allowed and refused."""
    rec, status = await svc.network_status(who, sandbox_id)
    return NetworkStatus(**NetworkOut.of(rec.network).model_dump(), **status)


@router.put("/{sandbox_id}/network", response_model=NetworkStatus)
async def set_network(sandbox_id: str, body: NetworkSettings, who: Who, svc: Svc) -> NetworkStatus:
    """Replace the egress policy (`mode`, `allow`, `deny`; omitted ones are reset). New connections
    follow it at once; `public_traffic` and `inject` (write-only: it cannot be read back to resend)
    are kept unless given."""

    def change(current: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in current.items() if k not in _POLICY or k == "public_traffic"}
        return {**kept, **body.record()}

    await svc.set_network(who, sandbox_id, change)
    return await get_network(sandbox_id, who, svc)
