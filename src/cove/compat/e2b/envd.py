"""envd, the daemon e2b runs inside each sandbox, served by the cove server on top of its guest agent.

Routes: `/health` (no token), `/files` (the envd token or a signed URL), and Connect RPC under
`/process.Process/*` and `/filesystem.Filesystem/*` (the envd token, `X-Access-Token`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from . import connect, files, filesystem, process
from .connect import ConnectError, Context
from .routing import target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove


async def _authorize(ctx: Context) -> None:
    if not target(ctx.scope).envd_token:
        raise ConnectError(
            "unauthenticated",
            "unauthorized access, please provide a valid access token or method signing if supported",
        )


def build(cove: Cove) -> ASGIApp:
    plain = files.build(cove)
    rpc = connect.app({**filesystem.methods(cove), **process.methods(cove)}, before=_authorize)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in ("/files", "/health"):
            await plain(scope, receive, send)
        else:
            await rpc(scope, receive, send)

    return app
