"""Servers inside a sandbox, reached through cove: `/v1/sandboxes/{id}/ports/{port}/…` (HTTP and
WebSocket). Signed URLs for them come from `POST /v1/sandboxes/{id}/urls` (api/urls.py).

The same ports are reachable by host name, `{port}-{id}.{domain}` (see compat/e2b/routing.py, which
routes host names for cove and e2b alike). Who may pass is decided in controlplane/port_access.py.
"""

from __future__ import annotations

from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send

from cove.controlplane import port_access
from cove.controlplane.auth import Caller, hash_key
from cove.controlplane.errors import ApiError
from cove.network import proxy

PREFIX = "/v1/sandboxes/{sandbox_id}/ports/{port:int}"


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
        rec = await cove.service.lookup(sandbox_id)
        live = rec is not None and rec.state in ("running", "paused", "hibernated")
        grant = await port_access.authorize(cove, rec, port, scope, prefix + "/") if live else None
        if grant is None:
            key = port_access.api_key(scope)
            if port_access.TOKEN_PARAM in scope.get("query_string", b"").decode("latin-1"):
                message = "the signed URL is invalid or has expired"
                await proxy.refuse(scope, send, _error, 403, message)
            elif key and await cove.keys.lookup(hash_key(key)) is not None:
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
        await proxy.serve(
            grant.scope,
            receive,
            grant.wrap(send),
            rec,
            port,
            cove.service.port_opener(rec),
            path=rest or b"/",
            error=_error,
        )


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
