"""e2b's code interpreter (port 49999): `/execute` and `/contexts` on cove's code contexts.

`POST /execute` streams NDJSON the way e2b's interpreter does and its SDK parses
(`e2b_code_interpreter/models.py`): `stdout`/`stderr` (`text`, `timestamp` in ns), `result` (one
field per format: `text`, `html`, `markdown`, `svg`, `png`, `jpeg`, `latex`, `json`, and
`is_main_result`), `error` (`name`, `value`, `traceback` as one string), then
`number_of_executions` and `end_of_execution`; a dead interpreter ends with an `error` and
`unexpected_end_of_execution`. The default context of a language (no `context_id`) keeps its
variables across calls. A client that goes away interrupts its run, as closing the connection does
with e2b's server. Contexts are cove's (python: a Jupyter kernel; bash: a persistent shell).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.types import ASGIApp, Receive, Scope, Send

from cove.controlplane import code
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import SandboxPath, _check_env
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord

from .routing import target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

# e2b's names for languages cove's contexts speak; anything else is refused with a clear message.
_LANGUAGES = {
    **dict.fromkeys(("python", "python3", "py"), "python"),
    **dict.fromkeys(("bash", "sh"), "bash"),
    **dict.fromkeys(("javascript", "js", "node", "nodejs"), "javascript"),
    **dict.fromkeys(("typescript", "ts"), "typescript"),
    "r": "r",
    "java": "java",
}
_CONTEXT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# Jupyter MIME types -> e2b result fields.
_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "application/vnd.cove.chart+json": "chart",  # e2b's `result.chart` (cove/guest/charts.py)
    "application/vnd.cove.data+json": "data",  # e2b's `result.data`: a DataFrame's columns
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer SDKs may send more


class Execute(_Body):
    code: Annotated[str, StringConstraints(max_length=1 << 20)]
    context_id: str | None = None
    language: str | None = None
    env_vars: dict[str, str] | None = Field(default=None, max_length=512)


class CreateContext(_Body):
    language: str | None = None
    cwd: SandboxPath | None = None


class ContextOut(BaseModel):
    id: str
    language: str
    cwd: str


def _language(name: str | None) -> str:
    language = _LANGUAGES.get((name or "python").strip().lower())
    if language is None:
        raise ApiError(
            400,
            "invalid",
            f"language {name!r} is not supported here: cove's code contexts run python, javascript, typescript, r, java and bash",
        )
    return language


def _out(ctx: code.Context, rec: SandboxRecord) -> ContextOut:
    return ContextOut(id=ctx.id, language=ctx.language, cwd=ctx.cwd or rec.workdir)


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _result(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "result"}
    extra = {}
    for mime, value in (event.get("data") or {}).items():
        field = _FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            out[field] = value
    text = out.get("text")
    # e2b's interpreter shows a string result without its repr quotes ('abc' -> abc).
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
        out["text"] = text[1:-1]
    if extra:
        out["extra"] = extra
    out["is_main_result"] = bool(event.get("main"))
    return out


async def _events(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The bridge's events as e2b's NDJSON lines."""
    try:
        async for event in events:
            kind = event.get("event")
            if "ok" in event:
                error = event.get("error")
                if error:
                    tb = error.get("traceback") or []
                    yield _line(
                        {
                            "type": "error",
                            "name": error.get("name", ""),
                            "value": error.get("value", ""),
                            "traceback": "\n".join(tb) if isinstance(tb, list) else str(tb),
                        }
                    )
                if event.get("execution_count") is not None:
                    yield _line({"type": "number_of_executions", "execution_count": event["execution_count"]})
                yield _line({"type": "end_of_execution"})
                return
            if kind in ("stdout", "stderr"):
                yield _line({"type": kind, "text": event.get("text", ""), "timestamp": time.time_ns()})
            elif kind == "result":
                yield _line(_result(event))
    except (GuestError, GuestUnavailable) as e:
        message = e.message if isinstance(e, GuestError) else str(e)
        yield _line(
            {
                "type": "error",
                "name": "DeadKernelError" if isinstance(e, GuestError) else "ContextUnavailable",
                "value": f"{message}; restart the context to go on",
                "traceback": "",
            }
        )
        yield _line({"type": "unexpected_end_of_execution"})


class _RunStream(StreamingResponse):
    """NDJSON of one run that notices the client leaving even while the code prints nothing, and
    then interrupts the run (a plain streaming response notices only at its next write)."""

    def __init__(self, lines: AsyncIterator[bytes], on_disconnect: Callable[[], Awaitable[None]]) -> None:
        super().__init__(lines, media_type="application/x-ndjson")
        self.lines = lines
        self.on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for line in self.lines:
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.create_task(stream())
        watching = asyncio.create_task(disconnected())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            gone = not streaming.done()
            if gone:
                streaming.cancel()
                with contextlib.suppress(BaseException):
                    await streaming
            with contextlib.suppress(Exception):
                await self.lines.aclose()  # type: ignore[attr-defined]
        error = streaming.exception() if not streaming.cancelled() else None
        if gone or isinstance(error, OSError):  # the client left (uvicorn's ClientDisconnected is one)
            await self.on_disconnect()
        elif error is not None:
            raise error


async def _sandbox(request: Request) -> SandboxRecord:
    """The request's sandbox, running (resumed if paused), for a caller holding one of its tokens."""
    tgt = target(request.scope)
    if not tgt.authorized:
        raise ApiError(401, "unauthorized", "send the sandbox's X-Access-Token or E2B-Traffic-Access-Token")
    svc = request.app.state.cove.service
    try:
        return await svc.running(tgt.caller, tgt.sandbox.id)
    except ApiError as e:
        if e.status == 404:
            raise ApiError(502, "not_found", f"The sandbox {tgt.sandbox.id} was not found") from e
        raise


Sandbox = Annotated[SandboxRecord, Depends(_sandbox)]


def build(cove: Cove) -> ASGIApp:
    svc = cove.service
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.cove = cove

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"code": exc.status, "message": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"code": 400, "message": f"invalid request: {problems}"}, 400)

    async def context(rec: SandboxRecord, context_id: str) -> code.Context:
        if not _CONTEXT_ID.match(context_id):
            raise ApiError(404, "context_not_found", f"Context {context_id} not found")
        try:
            return await code.find(svc, rec, context_id)
        except ApiError as e:
            if e.status == 404:
                raise ApiError(404, "context_not_found", f"Context {context_id} not found") from e
            raise

    @app.get("/health")
    async def health() -> Response:
        return Response("OK", media_type="text/plain")

    @app.post("/execute")
    async def execute(body: Execute, rec: Sandbox) -> Response:
        if body.context_id and body.language:
            raise ApiError(400, "invalid", "Only one of context_id or language can be provided")
        env = body.env_vars or {}
        try:
            _check_env(env)
        except ValueError as e:
            raise ApiError(400, "invalid", str(e)) from e
        if body.context_id:
            ctx = await context(rec, body.context_id)
        else:
            ctx = await code.ensure_default(svc, rec, _language(body.language))
        run_id = secrets.token_hex(8)
        events = code.run(svc, rec, ctx.id, body.code, None, env, run_id)

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for line in _events(events):
                    yield line
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        async def interrupt() -> None:
            await code.interrupt(svc, rec, ctx.id, run_id)

        return _RunStream(lines(), interrupt)

    @app.post("/contexts", response_model=ContextOut)
    async def create_context(rec: Sandbox, body: CreateContext | None = None) -> ContextOut:
        body = body or CreateContext()
        language = _language(body.language)
        ctx = await code.start(svc, rec, secrets.token_hex(6), language, body.cwd, {}, None)
        return _out(ctx, rec)

    @app.get("/contexts", response_model=list[ContextOut])
    async def list_contexts(rec: Sandbox) -> list[ContextOut]:
        return [_out(c, rec) for c in await code.list_contexts(svc, rec)]

    @app.delete("/contexts/{context_id}")
    async def remove_context(context_id: str, rec: Sandbox) -> Response:
        await code.stop(svc, rec, await context(rec, context_id))
        return Response(status_code=204)

    @app.post("/contexts/{context_id}/restart")
    async def restart_context(context_id: str, rec: Sandbox) -> Response:
        await code.restart(svc, rec, await context(rec, context_id))
        return Response(status_code=204)

    return app
