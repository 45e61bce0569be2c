"""Raw ASGI routes for the request path's hottest calls (exec, create), ahead of FastAPI's router.

FastAPI's routing through every included router, its dependency solving and its re-validation of
the response cost about 0.5-1 ms a call here (docs/benchmarks.md, the exec breakdown). A fast route
does the same by hand: the same auth (`caller`), body model, service call and response model. A
body that is not JSON or does not validate goes to the FastAPI route, replayed, so that every error
keeps its one shape; errors raised by the call (ApiError) reach the same exception handlers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from cove.controlplane.auth import Caller, caller
from cove.controlplane.service import SandboxService

Call = Callable[[SandboxService, Caller, dict[str, Any], Any], Awaitable[BaseModel]]


class FastJSON:
    """POST `route`'s path: `call(service, caller, path params, body)` → the response model."""

    def __init__(self, route: APIRoute, body: type[BaseModel], call: Call, status: int = 200) -> None:
        self.route = route  # the FastAPI route it stands in for (and falls back to)
        self.body = body
        self.call = call
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        request = Request(scope, receive)
        who = await caller(request)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if content_type != "application/json":
                raise ValueError("not JSON")
            body = self.body.model_validate(json.loads(raw))  # python mode, as FastAPI validates
        except (ValueError, ValidationError):  # the FastAPI route words the error
            await self.route.handle(scope, _replay(raw, receive), send)
            return
        result = await self.call(request.app.state.cove.service, who, scope["path_params"], body)
        payload = result.model_dump_json(by_alias=True).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(raw: bytes, then: Receive) -> Receive:
    """A receive() that hands over a body already read, then the server's own (a disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await then()

    return receive


def route(route: APIRoute, body: type[BaseModel], call: Call, status: int = 200) -> Route:
    """A raw route standing in for the FastAPI `route` (POST only)."""
    return Route(route.path, FastJSON(route, body, call, status), methods=["POST"])


def of(router: Any, endpoint: Callable[..., Any]) -> APIRoute:
    """The FastAPI route of `endpoint` in `router`."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint)
