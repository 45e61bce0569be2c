"""/v1/sandboxes/{id}/contexts and /code: stateful interpreters (Jupyter kernels, bash) in a sandbox.

A context is a background process of the sandbox: the kernel bridge (`cove/guest/kernel_bridge.py`)
running under the kernel environment's Python, as the sandbox's user, with its socket in a
directory only that user can reach. Contexts survive hibernate/resume and forks like any process.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StringConstraints

from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import SandboxPath, Strict, UserName, _check_env
from cove.controlplane.service import SandboxService
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord

from .deps import guest_errors, service

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["code"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]
Language = Literal["python", "bash"]
ContextId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")]
PYTHON = "/opt/cove/kernel/bin/python"
TAG = "context:"


class CreateContext(Strict):
    language: Language = "python"
    cwd: SandboxPath | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: UserName | None = None


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


async def _contexts(svc: SandboxService, rec: SandboxRecord) -> list[ContextOut]:
    async with guest_errors(svc, rec):
        procs = await svc.guest(rec).processes()
    out = []
    for p in procs:
        tag = p.get("tag") or ""
        if tag.startswith(TAG) and p.get("running"):
            _, ctx, language = tag.split(":", 2)
            out.append(ContextOut(id=ctx, language=language, running=True, process_id=p["id"]))
    return out


async def _find(svc: SandboxService, rec: SandboxRecord, context_id: str) -> ContextOut:
    for ctx in await _contexts(svc, rec):
        if ctx.id == context_id:
            return ctx
    raise ApiError(404, "context_not_found", f"code context {context_id!r} not found in sandbox {rec.id}")


async def _start(
    svc: SandboxService,
    rec: SandboxRecord,
    context_id: str,
    language: str,
    cwd: str | None,
    env: dict[str, str],
    user: str | None,
) -> ContextOut:
    status = svc.node.kernel_status
    if status != "ready":
        raise ApiError(503, "kernel_unavailable", f"code contexts are not available on this node: {status}")
    user = user or rec.user
    try:
        sock = await svc.node.prepare_context(rec.id, context_id, user)
    except (OSError, ValueError) as e:
        raise ApiError(400, "invalid", f"cannot prepare a context for user {user!r}: {e}") from e
    argv = [PYTHON, "/run/cove/kernel_bridge.py", "--socket", sock, "--cwd", cwd or rec.workdir]
    argv += ["--env-json", json.dumps(env), "--language", language]
    async with guest_errors(svc, rec):
        proc = await svc.guest(rec).spawn(argv=argv, user=user, tag=f"{TAG}{context_id}:{language}")
    bridge = svc.node.context_client(rec.id, context_id)
    deadline = time.monotonic() + 60
    while True:  # the interpreter takes a moment to start
        try:
            await bridge.call("ping")
            return ContextOut(id=context_id, language=language, running=True, process_id=proc["id"])
        except (GuestUnavailable, GuestError):
            pass
        info = next((p for p in await svc.guest(rec).processes() if p["id"] == proc["id"]), {})
        if not info.get("running", True) or time.monotonic() > deadline:
            detail = "it exited" if not info.get("running", True) else "it did not answer in 60 s"
            hint = (
                ""
                if info.get("running", True)
                else " (a sandbox started before the kernel environment was ready lacks it: start a new one)"
            )
            raise ApiError(503, "context_failed", f"the {language} context could not start: {detail}{hint}")
        await asyncio.sleep(0.05)


@router.post("/contexts", status_code=201, response_model=ContextOut)
async def create_context(
    sandbox_id: str, who: Who, svc: Svc, body: CreateContext | None = None
) -> ContextOut:
    """Start a new interpreter (python: a Jupyter kernel; bash: a persistent shell), with its own
    working directory and environment."""
    body = body or CreateContext()
    rec = await svc.running(who, sandbox_id)
    for key in body.env:
        _check_env({key: body.env[key]})
    return await _start(svc, rec, secrets.token_hex(6), body.language, body.cwd, body.env, body.user)


@router.get("/contexts", response_model=ContextList)
async def list_contexts(sandbox_id: str, who: Who, svc: Svc) -> ContextList:
    rec = await svc.running(who, sandbox_id)
    return ContextList(items=await _contexts(svc, rec))


@router.delete("/contexts/{context_id}", status_code=204)
async def delete_context(sandbox_id: str, context_id: str, who: Who, svc: Svc) -> Response:
    """Stop the interpreter; its variables are gone."""
    rec = await svc.running(who, sandbox_id)
    ctx = await _find(svc, rec, context_id)
    async with guest_errors(svc, rec):
        await svc.guest(rec).signal(ctx.process_id, "SIGTERM")
    return Response(status_code=204)


@router.post("/contexts/{context_id}/restart", response_model=ContextOut)
async def restart_context(sandbox_id: str, context_id: str, who: Who, svc: Svc) -> ContextOut:
    """A fresh interpreter in the same context (after it died, or to clear its state)."""
    rec = await svc.running(who, sandbox_id)
    ctx = await _find(svc, rec, context_id)
    try:
        await svc.node.context_client(rec.id, context_id).call("restart")
    except (GuestError, GuestUnavailable) as e:
        raise ApiError(503, "context_failed", f"restarting context {context_id} failed: {e}") from e
    return ctx


@router.post("/code", responses={200: {"content": {"application/x-ndjson": {}}}})
async def run_code(sandbox_id: str, body: RunCode, who: Who, svc: Svc) -> StreamingResponse:
    """Run code in a context and stream what it produces (NDJSON):
    `{"type": "stdout"|"stderr", "text"}`, `{"type": "result", "data": {mime: value}}` (text/plain,
    text/html, image/png (base64), image/svg+xml, application/json, text/markdown, text/latex), and last
    `{"type": "end", "error": null | {name, value, traceback}, "execution_count"}`. A dead interpreter
    ends with `{"type": "error", "code": "kernel_died", "message"}`: restart the context."""
    rec = await svc.running(who, sandbox_id)
    context_id = body.context or f"default-{body.language}"
    existing = {c.id: c for c in await _contexts(svc, rec)}
    if context_id not in existing:
        if body.context is not None:
            raise ApiError(
                404, "context_not_found", f"code context {context_id!r} not found in sandbox {rec.id}"
            )
        await _start(svc, rec, context_id, body.language, None, {}, None)
    events = svc.node.context_client(rec.id, context_id).events("run", code=body.code, timeout=body.timeout)

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
