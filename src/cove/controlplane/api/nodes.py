"""The fleet's nodes (docs/fleet.md), for admin keys: where each node's API is, whether its heartbeat
is fresh, whether this server reaches it, and how many sandboxes it holds. Credentials never leave
the store."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from cove.controlplane.auth import Caller, admin

router = APIRouter(tags=["nodes"])
Admin = Annotated[Caller, Depends(admin)]


@router.get("/v1/nodes")
async def list_nodes(request: Request, who: Admin) -> dict[str, Any]:
    """Every node that ever joined: `state` ready | lost | left, `reachable` from this server."""
    cove = request.app.state.cove
    fleet = cove.fleet
    await fleet.refresh()
    reachable = set(fleet.ready())
    counts = await cove.store.count_by_node(["starting", "running", "paused", "hibernated"])
    now = time.time()
    return {
        "this": fleet.id,
        "nodes": [
            {
                "id": n.id,
                "address": n.address,
                "state": fleet.state(n, now),
                "reachable": n.id in reachable,
                "started_at": n.started_at,
                "seen_at": n.seen_at,
                "sandboxes": counts.get(n.id, 0) + (counts.get("", 0) if n.id == fleet.id else 0),
                "capacity": n.capacity,
            }
            for n in fleet.records()
        ],
    }
