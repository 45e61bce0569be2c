"""Per-tenant quotas (docs/pools.md#quotas): set by admin keys, readable by the tenant itself."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field

from cove.controlplane.auth import Caller, admin, caller
from cove.controlplane.errors import not_found
from cove.controlplane.quotas import Quota
from cove.controlplane.service import SandboxService

from .deps import service

router = APIRouter(tags=["quotas"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]
Admin = Annotated[Caller, Depends(admin)]
Tenant = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class QuotaIn(BaseModel):
    sandboxes: int | None = Field(default=None, ge=0, le=1_000_000, description="live sandboxes")
    cpu: float | None = Field(default=None, ge=0, le=100_000, description="sum of `cpu` limits, cores")
    memory_mb: int | None = Field(default=None, ge=0, le=1 << 40, description="sum of `memory_mb` limits")


class UsageOut(BaseModel):
    sandboxes: int
    cpu: float
    memory_mb: int


class QuotaOut(BaseModel):
    tenant: str
    quota: QuotaIn | None = Field(description="null: no quota")
    usage: UsageOut = Field(description="what its starting, running and paused sandboxes hold")


async def _out(svc: SandboxService, tenant: str) -> QuotaOut:
    quota = await svc.quotas.get(tenant)
    usage = await svc.quotas.usage(tenant)
    return QuotaOut(
        tenant=tenant,
        quota=QuotaIn(**asdict(quota)) if quota else None,
        usage=UsageOut(**asdict(usage)),
    )


@router.get("/v1/quota", response_model=QuotaOut)
async def my_quota(who: Who, svc: Svc) -> QuotaOut:
    """The caller's tenant's quota and what it uses now."""
    return await _out(svc, who.tenant)


@router.get("/v1/tenants/{tenant}/quota", response_model=QuotaOut)
async def get_quota(tenant: Tenant, _: Admin, svc: Svc) -> QuotaOut:
    return await _out(svc, tenant)


@router.put("/v1/tenants/{tenant}/quota", response_model=QuotaOut)
async def set_quota(tenant: Tenant, body: QuotaIn, _: Admin, svc: Svc) -> QuotaOut:
    """Cap the tenant's live sandboxes, CPU and memory (a null field: no cap on it). Sandboxes
    already running stay; creates and resumes beyond the quota get 429 `quota_exceeded`."""
    await svc.quotas.set(tenant, Quota(**body.model_dump()))
    return await _out(svc, tenant)


@router.delete("/v1/tenants/{tenant}/quota", status_code=204)
async def delete_quota(tenant: Tenant, _: Admin, svc: Svc) -> Response:
    if not await svc.quotas.delete(tenant):
        raise not_found("quota", tenant)
    return Response(status_code=204)
