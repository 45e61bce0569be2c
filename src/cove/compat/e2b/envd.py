"""envd, the daemon e2b runs inside each sandbox, served by the cove server on top of its guest agent.

Routes: `/health` (no token), `/files` (the envd token or a signed URL), and Connect RPC under
`/process.Process/*` and `/filesystem.Filesystem/*` (the envd token, `X-Access-Token`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from . import files
from .routing import send_error, target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove


def build(cove: Cove) -> ASGIApp:
    plain = files.build(cove)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = scope["path"]
        if path in ("/files", "/health"):
            await plain(scope, receive, send)
            return
        await send_error(send, 404, f"envd has no route {path}", target(scope).sandbox.id)

    return app
