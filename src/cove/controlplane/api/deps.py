"""Shared route dependencies: the service, and guest errors turned into API errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request

from cove.controlplane.service import SandboxService
from cove.controlplane.snapshots import Snapshots
from cove.controlplane.templates import Templates
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord


async def service(request: Request) -> SandboxService:
    # async on purpose: FastAPI runs plain `def` dependencies in a thread pool.
    return request.app.state.cove.service


async def snapshots(request: Request) -> Snapshots:
    return request.app.state.cove.snapshots


async def templates(request: Request) -> Templates:
    return request.app.state.cove.templates


@contextlib.asynccontextmanager
async def guest_errors(svc: SandboxService, rec: SandboxRecord) -> AsyncIterator[None]:
    """Map what the guest agent says to HTTP: its error codes to 4xx, silence to 409/503."""
    try:
        yield
    except (GuestError, GuestUnavailable) as e:
        raise await svc.guest_failure(rec, e) from e
