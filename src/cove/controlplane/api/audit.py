"""/v1/audit: the audit log of lifecycle actions (docs/tenants.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import AuditList, AuditOut

router = APIRouter(prefix="/v1/audit", tags=["audit"])
Who = Annotated[Caller, Depends(caller)]


@router.get("", response_model=AuditList)
async def list_audit(
    request: Request,
    who: Who,
    tenant: Annotated[str | None, Query(max_length=64, description="admin keys: one tenant's")] = None,
    action: Annotated[list[str], Query(max_length=64, description="e.g. sandbox.kill (repeatable)")] = [],  # noqa: B006
    sandbox: Annotated[str | None, Query(max_length=64, description="entries about this sandbox")] = None,
    object: Annotated[str | None, Query(max_length=200, description="kind/id, e.g. key/key_ab12")] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=32)] = None,
) -> AuditList:
    """Newest first. A tenant's key sees its tenant's entries; an admin key sees every tenant's
    (or one with `tenant`)."""
    if tenant is not None and not who.admin and tenant != who.tenant:
        raise ApiError(403, "forbidden", "only admin keys read other tenants' audit entries")
    before = None
    if cursor is not None:
        if not cursor.isdigit():
            raise ApiError(422, "validation_error", "cursor: invalid cursor")
        before = int(cursor)
    audit = request.app.state.cove.service.audit
    await audit.flush()  # a caller sees its own actions at once
    entries = await request.app.state.cove.store.list_audit(
        tenant if who.admin else who.tenant,
        action or None,
        sandbox,
        object,
        since.timestamp() if since else None,
        until.timestamp() if until else None,
        limit + 1,
        before,
    )
    more = len(entries) > limit
    entries = entries[:limit]
    return AuditList(
        items=[AuditOut.of(e) for e in entries],
        next_cursor=str(entries[-1].seq) if more and entries else None,
    )
