"""Shared route dependencies: the service, and guest errors turned into API errors."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import Request

from cove.controlplane.errors import GUEST_STATUS, ApiError
from cove.controlplane.service import SandboxService
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord


async def service(request: Request) -> SandboxService:
    # async on purpose: FastAPI runs plain `def` dependencies in a thread pool.
    return request.app.state.cove.service


@contextlib.asynccontextmanager
async def guest_errors(svc: SandboxService, rec: SandboxRecord) -> AsyncIterator[None]:
    """Map what the guest agent says to HTTP: its error codes to 4xx, silence to 409/503."""
    try:
        yield
    except GuestError as e:
        status = GUEST_STATUS.get(e.code, 500)
        raise ApiError(status, e.code, e.message) from e
    except GuestUnavailable as e:
        if not await svc.check_alive(rec):
            raise ApiError(409, "not_running", f"sandbox {rec.id} stopped while the call ran") from e
        raise ApiError(503, "guest_unavailable", f"the sandbox's guest agent did not answer: {e}") from e
