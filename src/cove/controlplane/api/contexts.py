"""/v1/sandboxes/{id}/contexts and /code: stateful interpreters (Jupyter kernels, bash) in a sandbox.

The work is in `cove.controlplane.code` (shared with the e2b code interpreter).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StringConstraints, field_validator

from cove.controlplane import code
from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import SandboxPath, Strict, UserName, _check_env
from cove.controlplane.service import SandboxService
from cove.node.guest_client import GuestError, GuestUnavailable

from .deps import service

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["code"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]
Language = Literal["python", "bash", "javascript", "typescript", "r", "java"]
ContextId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]


class CreateContext(Strict):
    language: Language = "python"
    cwd: SandboxPath | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: UserName | None = None

    _env = field_validator("env")(_check_env)  # a bad name is a 422, as everywhere else


class ContextOut(BaseModel):
    id: str
    language: str
    running: bool
    process_id: str


class ContextList(BaseModel):
    items: list[ContextOut]


class RunCode(Strict):
    code: Annotated[str, StringConstraints(max_length=1 << 20)]
    language: Language = "python"
    context: ContextId | None = Field(
        default=None, description="default: the sandbox's default context for `language`"
    )
    timeout: float | None = Field(
        default=None, gt=0, le=86400, description="interrupt the code after this many seconds"
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="variables set for this run only (then restored)"
    )

    _env = field_validator("env")(_check_env)


def _out(ctx: code.Context) -> ContextOut:
    return ContextOut(id=ctx.id, language=ctx.language, running=True, process_id=ctx.process_id)


@router.post("/contexts", status_code=201, response_model=ContextOut)
async def create_context(
    sandbox_id: str, who: Who, svc: Svc, body: CreateContext | None = None
) -> ContextOut:
    """Start a new interpreter (python: a Jupyter kernel; bash: a persistent shell), with its own
    working directory and environment."""
    body = body or CreateContext()
    rec = await svc.running(who, sandbox_id)
    return _out(
        await code.start(svc, rec, secrets.token_hex(6), body.language, body.cwd, body.env, body.user)
    )


@router.get("/contexts", response_model=ContextList)
async def list_contexts(sandbox_id: str, who: Who, svc: Svc) -> ContextList:
    rec = await svc.running(who, sandbox_id)
    return ContextList(items=[_out(c) for c in await code.list_contexts(svc, rec)])


@router.delete("/contexts/{context_id}", status_code=204)
async def delete_context(sandbox_id: str, context_id: str, who: Who, svc: Svc) -> Response:
    """Stop the interpreter; its variables are gone."""
    rec = await svc.running(who, sandbox_id)
    await code.stop(svc, rec, await code.find(svc, rec, context_id))
    return Response(status_code=204)


@router.post("/contexts/{context_id}/restart", response_model=ContextOut)
async def restart_context(sandbox_id: str, context_id: str, who: Who, svc: Svc) -> ContextOut:
    """A fresh interpreter in the same context (after it died, or to clear its state)."""
    rec = await svc.running(who, sandbox_id)
    ctx = await code.find(svc, rec, context_id)
    await code.restart(svc, rec, ctx)
    return _out(ctx)


@router.post("/code", responses={200: {"content": {"application/x-ndjson": {}}}})
async def run_code(sandbox_id: str, body: RunCode, who: Who, svc: Svc) -> StreamingResponse:
    """Run code in a context and stream what it produces (NDJSON):
    `{"type": "stdout"|"stderr", "text"}`, `{"type": "result", "data": {mime: value}}` (text/plain,
    text/html, image/png (base64), image/svg+xml, application/json, text/markdown, text/latex, and a
    figure's or DataFrame's data: application/vnd.cove.chart+json, application/vnd.cove.data+json), and last
    `{"type": "end", "error": null | {name, value, traceback}, "execution_count"}`. A dead interpreter
    ends with `{"type": "error", "code": "kernel_died", "message"}`: restart the context."""
    rec = await svc.running(who, sandbox_id)
    if body.context is not None:
        context_id = (await code.find(svc, rec, body.context)).id
    else:
        context_id = (await code.ensure_default(svc, rec, body.language)).id
    events = code.run(svc, rec, context_id, body.code, body.timeout, body.env or None)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                if "ok" in event:
                    yield _line(
                        {
                            "type": "end",
                            "error": event.get("error"),
                            "execution_count": event.get("execution_count"),
                        }
                    )
                elif event.get("event") in ("stdout", "stderr"):
                    yield _line({"type": event["event"], "text": event.get("text", "")})
                elif event.get("event") == "result":
                    yield _line({"type": "result", "data": event.get("data", {})})
        except GuestError as e:
            yield _line(
                {"type": "error", "code": e.code, "message": f"{e.message}; restart the context to go on"}
            )
        except GuestUnavailable as e:
            yield _line({"type": "error", "code": "context_unavailable", "message": str(e)})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
