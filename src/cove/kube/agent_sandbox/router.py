"""The router: what agent-sandbox's sandbox-router is to its clients, in front of cove.

A client sends every request to the router with the headers `X-Sandbox-ID` (the Sandbox's name: the
client resolves a claim to it first), `X-Sandbox-Namespace` (default `default`) and `X-Sandbox-Port`.
The router finds the Sandbox's cove sandbox (its Pod's `cove.dev/sandbox` annotation, from a watch cache)
and then:

- on the runtime port (8888 by default, the client's `server_port`), it serves the HTTP API of upstream's
  python runtime by translating each call to cove's REST API: `POST /execute` -> `POST
  /v1/sandboxes/{id}/exec`, `POST /upload` (multipart, the file name is the path) -> `PUT .../files`,
  `GET /download/{path}` -> `GET .../files`, `GET /list/{path}` -> `GET .../files/list`, `GET
  /exists/{path}` -> `GET .../files/stat`, `GET /` -> health. Relative paths start at the sandbox user's
  home (upstream's runtime: /app);
- on any other port, it proxies the request to that port inside the sandbox through cove's port API
  (`/v1/sandboxes/{id}/ports/{port}/...`), streaming both ways.

Answers of its own: 400 without `X-Sandbox-ID` or with a bad port, 404 for an unknown Sandbox, 409 for a
Suspended one (cove would resume it on the next call, which Suspended must not do), 503 while it has no
running cove sandbox yet, 401 without the router's token when one is set (COVE_ROUTER_TOKEN). The router
calls cove with its own API key (COVE_API_KEY); the client's Authorization is never passed on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
from lightkube import ApiError, AsyncClient
from lightkube.operators import exists
from lightkube.resources.core_v1 import Pod
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cove.kube.agent_sandbox.controller import cove_id
from cove.kube.agent_sandbox.cove_api import CoveAPI, CoveError
from cove.kube.agent_sandbox.crds import LABEL_SANDBOX_NAME_HASH, Sandbox, is_true
from cove.kube.agent_sandbox.informer import Informer

log = logging.getLogger("cove.kube.agent_sandbox.router")

RUNTIME_PORT = 8888
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "authorization", "content-length",
}  # fmt: skip
CHUNK = 64 * 1024

# What the router's identity needs (docs/agent-sandbox.md).
RBAC_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["agents.x-k8s.io"], "resources": ["sandboxes"], "verbs": ["get", "list", "watch"]},
]


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Resolver(Protocol):
    async def resolve(self, namespace: str, name: str) -> str:
        """The cove sandbox id of the Sandbox `namespace/name`; raises RouteError."""
        ...


class StaticResolver:
    """Names given up front (tests, and a router without Kubernetes)."""

    def __init__(self, ids: dict[tuple[str, str], str] | None = None) -> None:
        self.ids = ids or {}

    async def resolve(self, namespace: str, name: str) -> str:
        sid = self.ids.get((namespace, name))
        if sid is None:
            raise RouteError(404, f"Sandbox {namespace}/{name} not found")
        return sid


class KubeResolver:
    """Sandboxes and their Pods from watch caches; a miss is looked up once (the watch may lag a write)."""

    def __init__(self, client: AsyncClient, namespace: str = "*") -> None:
        self.client = client
        self.sandboxes = Informer(client, Sandbox, lambda *_: None, namespace=namespace)
        self.pods = Informer(
            client, Pod, lambda *_: None, namespace=namespace, labels={LABEL_SANDBOX_NAME_HASH: exists()}
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(i.run()) for i in (self.sandboxes, self.pods)]
        await asyncio.gather(self.sandboxes.synced.wait(), self.pods.synced.wait())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _get(self, inf: Informer, res: Any, namespace: str, name: str) -> dict[str, Any] | None:
        obj = inf.get(namespace, name)
        if obj is not None:
            return obj
        try:
            return inf.update(await self.client.get(res, name, namespace=namespace))
        except ApiError as e:
            if e.status.code == 404:
                return None
            raise

    async def resolve(self, namespace: str, name: str) -> str:
        sb = await self._get(self.sandboxes, Sandbox, namespace, name)
        if sb is None:
            raise RouteError(404, f"Sandbox {namespace}/{name} not found")
        if (sb.get("spec") or {}).get("operatingMode") == "Suspended":
            raise RouteError(409, f"Sandbox {namespace}/{name} is Suspended: set operatingMode to Running")
        if is_true(sb, "Finished"):
            raise RouteError(404, f"Sandbox {namespace}/{name} has finished")
        pod = await self._get(self.pods, Pod, namespace, name)
        sid = cove_id(pod)
        if sid is None:
            raise RouteError(503, f"Sandbox {namespace}/{name} has no running cove sandbox yet")
        return sid


def _message(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status)


def _legacy_entry(e: dict[str, Any]) -> dict[str, Any] | None:
    kind = {"file": "file", "dir": "directory", "symlink": "file"}.get(e.get("type", ""))
    if kind is None:
        return None  # sockets, devices: not something the client's FileEntry can hold
    return {"name": e["name"], "size": e.get("size", 0), "type": kind, "mod_time": e.get("mtime", 0.0)}


class Router:
    def __init__(
        self, resolver: Resolver, cove: CoveAPI, *, runtime_port: int = RUNTIME_PORT, token: str | None = None
    ) -> None:
        self.resolver = resolver
        self.cove = cove
        self.runtime_port = runtime_port
        self.token = token

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await self._handle(request)
        except RouteError as e:
            response = _message(e.status, e.message)
        except CoveError as e:
            response = _message(e.status if e.status < 500 else 502, f"cove: {e.code}: {e.message}")
        except httpx.HTTPError as e:
            response = _message(502, f"cove is unreachable: {e!r}")
        log.debug(
            "routed",
            extra={"path": request.url.path, "status": response.status_code,
                   "ms": round((time.perf_counter() - started) * 1000, 1)},
        )  # fmt: skip
        return response

    async def _handle(self, request: Request) -> Response:
        name = request.headers.get("x-sandbox-id")
        if not name and request.url.path == "/healthz":  # the router's own probe
            return JSONResponse({"ok": True})
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise RouteError(401, "the router needs its token: Authorization: Bearer <COVE_ROUTER_TOKEN>")
        if not name:
            raise RouteError(400, "X-Sandbox-ID header is required (the Sandbox's name)")
        namespace = request.headers.get("x-sandbox-namespace") or "default"
        port_text = request.headers.get("x-sandbox-port") or str(self.runtime_port)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RouteError(400, f"X-Sandbox-Port {port_text!r} is not a port")
        port = int(port_text)
        sid = await self.resolver.resolve(namespace, name)
        if port == self.runtime_port:
            return await self._runtime(request, sid)
        return await self._proxy(request, sid, port)

    # --- the runtime API, translated ----------------------------------------------------------------------

    async def _runtime(self, request: Request, sid: str) -> Response:
        path, method = request.url.path, request.method
        if method == "GET" and path in ("", "/"):
            return JSONResponse({"status": "ok", "message": "Sandbox Runtime is active."})
        if method == "POST" and path == "/execute":
            return await self._execute(request, sid)
        if method == "POST" and path == "/upload":
            return await self._upload(request, sid)
        for prefix, handler in (
            ("/download/", self._download),
            ("/list/", self._list),
            ("/exists/", self._exists),
        ):
            if method == "GET" and (path.startswith(prefix) or path == prefix.rstrip("/")):
                return await handler(sid, path[len(prefix) :] or ".")
        return _message(404, f"{method} {path} is not part of the sandbox runtime API")

    async def _execute(self, request: Request, sid: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise RouteError(422, 'the body must be JSON: {"command": ...}') from None
        command = body.get("command") if isinstance(body, dict) else None
        if not isinstance(command, str) or not command:
            raise RouteError(422, "command is required")
        timeout = body.get("timeout_seconds")
        result = await self.cove.exec(sid, command, float(timeout) if timeout else None)
        return JSONResponse({
            "stdout": result["stdout"], "stderr": result["stderr"], "exit_code": result["exit_code"],
            "timed_out": bool(result.get("timed_out")),
        })  # fmt: skip

    async def _upload(self, request: Request, sid: str) -> Response:
        form = await request.form()
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str) or not upload.filename:
                raise RouteError(422, "a multipart field 'file' with a filename (the path) is required")

            async def chunks() -> AsyncIterator[bytes]:
                while chunk := await upload.read(CHUNK):
                    yield chunk

            await self.cove.write(sid, upload.filename, chunks())
            return JSONResponse({"message": f"File '{upload.filename}' uploaded successfully."})
        finally:
            await form.close()

    async def _download(self, sid: str, path: str) -> Response:
        try:
            r = await self.cove.open(sid, path)
        except CoveError as e:
            if e.status in (404, 400):
                return _message(404, "File not found")
            raise
        return StreamingResponse(
            r.aiter_raw(CHUNK), media_type="application/octet-stream", background=BackgroundTask(r.aclose)
        )

    async def _list(self, sid: str, path: str) -> Response:
        entries = await self.cove.list(sid, path)
        return JSONResponse([e for e in map(_legacy_entry, entries) if e is not None])

    async def _exists(self, sid: str, path: str) -> Response:
        return JSONResponse({"exists": await self.cove.stat(sid, path) is not None})

    # --- other ports, proxied -----------------------------------------------------------------------------

    async def _proxy(self, request: Request, sid: str, port: int) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        target = f"/v1/sandboxes/{sid}/ports/{port}{raw.decode('latin-1') or '/'}"
        if request.url.query:
            target += f"?{request.url.query}"
        headers = [
            (k, v) for k, v in request.headers.items()
            if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-sandbox-")
        ]  # fmt: skip
        body = request.stream() if request.method not in ("GET", "HEAD") else None
        req = self.cove.http.build_request(request.method, target, headers=headers, content=body)
        # cove's key replaces whatever the client sent (build_request merged the client's default headers).
        r = await self.cove.http.send(req, stream=True)
        out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP - {"content-length"}}
        return StreamingResponse(r.aiter_raw(CHUNK), status_code=r.status_code, headers=out,
                                 background=BackgroundTask(r.aclose))  # fmt: skip


def make_app(router: Router, on_start: Any = None, on_stop: Any = None) -> Starlette:
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if on_start:
            await on_start()
        try:
            yield
        finally:
            if on_stop:
                await on_stop()

    # A bound method, so that Starlette calls it with a Request (an object would be taken for an ASGI app).
    return Starlette(routes=[Route("/{path:path}", router.__call__, methods=methods)], lifespan=lifespan)
