"""Traffic to a server listening inside a sandbox (e2b's `get_host(port)`), relayed by cove's proxy.

Host names `{port}-{id}.{domain}` are cove's too. Access is decided by controlplane/port_access.py
(public ports, an API key, a signed URL or its cookie), plus e2b's traffic token in
`E2B-Traffic-Access-Token`. Sandboxes created through e2b's API have public ports unless created
with public traffic off, as on e2b; cove's own sandboxes do not. `network.mask_request_host` replaces the Host header the
server sees (`${PORT}` in it becomes the port).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

from cove.controlplane import port_access
from cove.controlplane.errors import ApiError
from cove.network import proxy

from .routing import send_error, target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

# Routing and credentials meant for cove, not for the server in the sandbox.
DROP_HEADERS = (b"e2b-sandbox-id", b"e2b-sandbox-port", b"x-access-token", b"e2b-traffic-access-token")


def build(cove: Cove) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        tgt = target(scope)
        sandbox_id = tgt.sandbox.id

        async def error(send: Send, status: int, message: str) -> None:
            await send_error(send, status, message, sandbox_id)

        grant = await port_access.authorize(cove, tgt.sandbox, tgt.port, scope)
        if grant is None and tgt.traffic_token:
            grant = port_access.Grant(scope)
        if grant is None:
            message = (
                f"sandbox {sandbox_id} does not allow public traffic: send its traffic access token, "
                "an API key of its tenant, or use a signed URL"
            )
            await proxy.refuse(scope, send, error, 403, message)
            return
        try:
            rec = await cove.service.running(tgt.caller, sandbox_id)  # resumes a paused sandbox
        except ApiError as e:
            status, message = (
                (502, f"The sandbox {sandbox_id} was not found") if e.status == 404 else (e.status, e.message)
            )
            await proxy.refuse(scope, send, error, status, message)
            return
        mask = rec.network.get("mask_request_host")
        host = mask.replace("${PORT}", str(tgt.port)) if isinstance(mask, str) and mask else None
        await proxy.serve(
            grant.scope,
            receive,
            grant.wrap(send),
            rec,
            tgt.port,
            cove.service.port_opener(rec),
            host=host,
            drop_headers=DROP_HEADERS,
            error=error,
        )

    return app
