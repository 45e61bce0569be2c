"""/v1/pools: warm pools per template or snapshot (docs/pools.md). Changing one needs an admin key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field, ValidationError, model_validator

from cove.controlplane import pools
from cove.controlplane.auth import Caller, admin, caller
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.schemas import CreateSandbox
from cove.controlplane.service import SandboxService
from cove.controlplane.sources import BASE

from .deps import service

router = APIRouter(prefix="/v1/pools", tags=["pools"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]
Admin = Annotated[Caller, Depends(admin)]


class SetPool(BaseModel):
    min: int = Field(ge=0, le=pools.MAX_SIZE, description="members kept ready even when idle")
    max: int = Field(ge=0, le=pools.MAX_SIZE, description="the most it grows to under demand")

    @model_validator(mode="after")
    def _ordered(self) -> SetPool:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class PoolOut(BaseModel):
    name: str = Field(description="the template name or snapshot id whose creates it serves")
    source: str = Field(description="template | snapshot")
    min: int
    max: int
    target: int = Field(description="the size the refill aims for now (grows on misses, shrinks when idle)")
    ready: int = Field(description="members ready to claim")
    starting: int = Field(description="members being started")
    hits: int = Field(description="creates served from the pool since the server started")
    misses: int = Field(description="creates that found it empty and started cold")
    error: str | None = Field(default=None, description="why the last refill failed")


class PoolList(BaseModel):
    items: list[PoolOut]


def _out(pool: pools.Pool) -> PoolOut:
    return PoolOut(source=pool.config.kind, **pool.status())


def _find(who: Caller, svc: SandboxService, name: str) -> pools.Pool | None:
    """The caller's pool of `name`: of its own template or snapshot, else the shared base one."""
    return svc.pools.pools.get(pools.pool_key(who.tenant, name)) or svc.pools.pools.get(name)


@router.get("", response_model=PoolList)
async def list_pools(who: Who, svc: Svc) -> PoolList:
    """The pools serving this tenant's creates: the base template's, and its own templates' and snapshots'."""
    visible = [p for p in svc.pools.pools.values() if p.config.tenant in (None, who.tenant)]
    return PoolList(items=[_out(p) for p in sorted(visible, key=lambda p: p.config.name)])


@router.get("/{name}", response_model=PoolOut)
async def get_pool(name: str, who: Who, svc: Svc) -> PoolOut:
    pool = _find(who, svc, name)
    if pool is None:
        raise not_found("pool", name)
    return _out(pool)


@router.put("/{name}", response_model=PoolOut)
async def set_pool(name: str, body: SetPool, who: Admin, svc: Svc) -> PoolOut:
    """Keep between `min` and `max` sandboxes of a template or snapshot of yours (or of the shared
    base template) ready."""
    snap = await svc.store.get_snapshot(name)
    if snap is not None and snap.tenant == who.tenant and snap.state == "ready":
        if snap.config.get("volumes"):
            raise ApiError(422, "validation_error", f"snapshot {name} carries volumes: it cannot be pooled")
        config = pools.PoolConfig(name, body.min, body.max, who.tenant, "snapshot")
    else:
        try:
            source = CreateSandbox(template=name)
        except ValidationError as e:  # not a template name at all
            raise not_found("template", name) from e
        await svc.sources.of(who, source.template)  # 404 for an unknown template (or another tenant's)
        shared = name == BASE
        config = pools.PoolConfig(name, body.min, body.max, None if shared else who.tenant, "template")
    await pools.save(svc.store, config)
    return _out(svc.pools.configure(config))


@router.delete("/{name}", status_code=204)
async def delete_pool(name: str, who: Admin, svc: Svc) -> Response:
    """Stop pooling this source; its ready members are killed (claimed sandboxes are not touched)."""
    pool = _find(who, svc, name)
    if pool is None:
        raise not_found("pool", name)
    await pools.forget(svc.store, pool.config.key)
    await svc.pools.remove(pool.config.key)
    return Response(status_code=204)
