"""Servers inside a sandbox, reached through cove: `/v1/sandboxes/{id}/ports/{port}/…` (HTTP and
WebSocket), and signed URLs for them (`POST /v1/sandboxes/{id}/urls`).

The same ports are reachable by host name, `{port}-{id}.{domain}` (see compat/e2b/routing.py, which
routes host names for cove and e2b alike). Who may pass is decided in controlplane/port_access.py.
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from cove.controlplane import port_access
from cove.controlplane.auth import Caller, caller, hash_key
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import Strict
from cove.controlplane.service import SandboxService
from cove.network import proxy

from .deps import service

router = APIRouter(tags=["ports"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]

PREFIX = "/v1/sandboxes/{sandbox_id}/ports/{port:int}"
MAX_EXPIRY = 30 * 86400


class UrlRequest(Strict):
    port: int = Field(ge=1, le=65535)
    expires_in: int = Field(default=3600, ge=1, le=MAX_EXPIRY, description="seconds the URL stays valid")
    path: str = Field(default="/", pattern=r"^/", max_length=2048)


class SignedUrl(BaseModel):
    url: str = Field(description="by host name: {port}-{id}.{domain}; opens in a browser")
    path_url: str = Field(description="by path on the cove server")
    expires_at: int = Field(description="unix time")


@router.post("/v1/sandboxes/{sandbox_id}/urls", response_model=SignedUrl)
async def signed_url(sandbox_id: str, body: UrlRequest, who: Who, svc: Svc, request: Request) -> SignedUrl:
    """A URL that reaches `port` in the sandbox without an API key, until it expires."""
    rec = await svc.get(who, sandbox_id)
    cove = request.app.state.cove
    expires = int(time.time()) + body.expires_in
    query = urlencode(port_access.sign(cove, rec.id, body.port, expires))
    scheme = request.url.scheme
    path = quote(body.path, safe="/%:@!$&'()*+,;=~-._")
    return SignedUrl(
        url=f"{scheme}://{body.port}-{rec.id}.{cove.settings.public_domain}{path}?{query}",
        path_url=f"{str(request.base_url).rstrip('/')}/v1/sandboxes/{rec.id}/ports/{body.port}{path}?{query}",
        expires_at=expires,
    )


class _PortProxy:
    """The ASGI endpoint behind the path form (a raw endpoint: bodies stream, nothing is buffered)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cove = scope["app"].state.cove
        params = scope["path_params"]
        sandbox_id, port = params["sandbox_id"], params["port"]
        prefix = f"/v1/sandboxes/{sandbox_id}/ports/{port}"
        if not 0 < port < 65536:
            await proxy.refuse(scope, send, _error, 400, f"invalid port {port}")
            return
        if "path" not in params:  # `.../ports/8000`: relative links need the trailing slash
            await _redirect(scope, send, prefix + "/")
            return
        rec = await cove.store.get_sandbox(sandbox_id)
        live = rec is not None and rec.state in ("running", "paused", "hibernated")
        grant = await port_access.authorize(cove, rec, port, scope, prefix + "/") if live else None
        if grant is None:
            key = port_access._api_key(scope)
            if key and await cove.keys.lookup(hash_key(key)) is not None:
                await proxy.refuse(scope, send, _error, 404, f"sandbox {sandbox_id!r} not found")
            else:
                message = (
                    "this port needs an API key of the sandbox's tenant or a signed URL "
                    f"(POST /v1/sandboxes/{sandbox_id}/urls)"
                )
                await proxy.refuse(scope, send, _error, 401, message)
            return
        assert rec is not None
        who = Caller(key_id=f"port:{rec.id}", tenant=rec.tenant, admin=False)
        try:
            rec = await cove.service.running(who, sandbox_id)  # resumes a paused sandbox
        except ApiError as e:
            await proxy.refuse(scope, send, _error, e.status, e.message)
            return
        raw = grant.scope.get("raw_path") or grant.scope["path"].encode()
        rest = raw[len(prefix.encode()) :] if raw.startswith(prefix.encode()) else b"/"
        await proxy.serve(grant.scope, receive, grant.wrap(send), rec, port, path=rest or b"/", error=_error)


async def _error(send: Send, status: int, message: str) -> None:
    await ApiError(status, "port_unavailable" if status >= 500 else "port_refused", message).response()(
        {"type": "http"}, _no_receive, send
    )


async def _no_receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _redirect(scope: Scope, send: Send, location: str) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1008})
        return
    query = scope.get("query_string", b"")
    target = location.encode() + (b"?" + query if query else b"")
    await send({"type": "http.response.start", "status": 307, "headers": [(b"location", target)]})
    await send({"type": "http.response.body", "body": b""})


_endpoint = _PortProxy()
routes = [
    Route(PREFIX, _endpoint, methods=None),
    Route(PREFIX + "/{path:path}", _endpoint, methods=None),
    WebSocketRoute(PREFIX, _endpoint),
    WebSocketRoute(PREFIX + "/{path:path}", _endpoint),
]
