"""TODO(envd): being written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from .routing import send_error, target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove


def build(cove: Cove) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send_error(send, 501, "not implemented yet", target(scope).sandbox.id)

    return app
