"""/v1/sandboxes/{id}/metrics: the sandbox's recent resource use (controlplane/usage.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from cove.controlplane.auth import Caller, caller
from cove.controlplane.service import SandboxService

from .deps import service

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]


@router.get("/metrics")
async def latest_metrics(request: Request, who: Who, svc: Svc) -> dict[str, dict[str, dict[str, Any]]]:
    """The newest point of each of the caller's running or paused sandboxes, from the kept history
    (nothing is sampled for this call): `{"sandboxes": {id: point}}`; sandboxes without a point yet
    are left out. Registered before `/v1/sandboxes/{id}`."""
    usage = request.app.state.cove.usage
    out: dict[str, dict[str, Any]] = {}
    cursor: str | None = None
    while True:
        page = await svc.list(who, ["running", "paused"], {}, 1000, cursor)
        for rec in page.items:
            point = usage.latest(rec)
            if point is not None:
                out[rec.id] = point
        cursor = page.next_cursor
        if not cursor:
            return {"sandboxes": out}


@router.get("/{sandbox_id}/metrics")
async def sandbox_metrics(
    sandbox_id: str,
    request: Request,
    who: Who,
    svc: Svc,
    since: Annotated[float | None, Query(ge=0, description="only points after this unix time")] = None,
) -> list[dict[str, Any]]:
    """The sandbox's resource use over the last minutes, oldest first: `{timestamp, timestampUnix,
    cpuUsedPct, cpuCount, memUsed, memTotal, diskUsed, diskTotal}` per point (e2b's shape), sampled
    every `COVE_METRICS_INTERVAL` seconds (5) and kept for `COVE_METRICS_KEEP` points (120). Empty
    for a sandbox without processes (hibernated, killed)."""
    rec = await svc.get(who, sandbox_id)
    return await request.app.state.cove.usage.points(rec, since)
