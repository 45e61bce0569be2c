"""Shared route dependencies: the parts of the control plane a route works with."""

from __future__ import annotations

from fastapi import Request

from cove.controlplane.service import SandboxService
from cove.controlplane.snapshots import Snapshots
from cove.controlplane.templates import Templates


async def service(request: Request) -> SandboxService:
    # async on purpose: FastAPI runs plain `def` dependencies in a thread pool.
    return request.app.state.cove.service


async def snapshots(request: Request) -> Snapshots:
    return request.app.state.cove.snapshots


async def templates(request: Request) -> Templates:
    return request.app.state.cove.templates
