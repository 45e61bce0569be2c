"""/v1/sandboxes/{id}/exec: run commands, buffered or streamed as NDJSON."""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import ExecRequest, ExecResult
from cove.controlplane.service import SandboxService
from cove.store.base import SandboxRecord

from .deps import service

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["commands"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]


def _guest_args(rec: SandboxRecord, body: ExecRequest) -> dict[str, Any]:
    return {
        "cmd": body.cmd,
        "argv": body.argv,
        "cwd": body.cwd,
        "env": body.env,
        "user": body.user or rec.user,
        "timeout": body.timeout,
        "stdin": body.stdin.encode() if body.stdin is not None else None,
    }


@router.post("/exec", response_model=ExecResult)
async def exec_command(sandbox_id: str, body: ExecRequest, who: Who, svc: Svc) -> ExecResult:
    """Run a command to completion. A non-zero exit code is a result; a timeout kills it (`timed_out`)."""
    return await run_exec(svc, who, sandbox_id, body)


async def run_exec(svc: SandboxService, who: Caller, sandbox_id: str, body: ExecRequest) -> ExecResult:
    rec = await svc.running(who, sandbox_id)
    limit = svc.settings.max_output_bytes
    out = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    end: dict[str, Any] = {}
    started = time.perf_counter()
    async with svc.guest_errors(rec):
        async for kind, data in svc.guest(rec).exec(**_guest_args(rec, body)):
            if kind == "exit":
                end = data  # type: ignore[assignment]
                continue
            buf = out[kind]
            room = limit - len(buf)
            if len(data) > room:  # type: ignore[arg-type]
                truncated = True
            buf += data[: max(room, 0)]  # type: ignore[index]
    duration = time.perf_counter() - started
    svc.metrics.exec_seconds.observe(duration)
    return ExecResult(
        stdout=out["stdout"].decode(errors="replace"),
        stderr=out["stderr"].decode(errors="replace"),
        exit_code=end.get("exit_code", -1),
        timed_out=end.get("timed_out", False),
        duration_ms=round(duration * 1000, 3),
        truncated=truncated,
    )


@router.post("/exec/stream", responses={200: {"content": {"application/x-ndjson": {}}}})
async def exec_stream(sandbox_id: str, body: ExecRequest, who: Who, svc: Svc) -> StreamingResponse:
    """Run a command and stream its output as NDJSON events while it runs.

    Events: `{"type": "stdout"|"stderr", "data": TEXT}`, then `{"type": "exit", "exit_code", "timed_out",
    "duration_ms"}`; an `{"type": "error", "code", "message"}` event if the sandbox fails mid-way.
    Closing the connection kills the command.
    """
    rec = await svc.running(who, sandbox_id)
    events = svc.guest(rec).exec(**_guest_args(rec, body))

    async def lines() -> AsyncIterator[bytes]:
        decoders = {k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in ("stdout", "stderr")}
        started = time.perf_counter()
        try:
            async with svc.guest_errors(rec):
                async for kind, data in events:
                    if kind == "exit":
                        for k, dec in decoders.items():
                            tail = dec.decode(b"", final=True)
                            if tail:
                                yield _line({"type": k, "data": tail})
                        duration = round((time.perf_counter() - started) * 1000, 3)
                        yield _line({"type": "exit", **data, "duration_ms": duration})  # type: ignore[dict-item]
                    else:
                        text = decoders[kind].decode(data)  # type: ignore[arg-type]
                        if text:
                            yield _line({"type": kind, "data": text})
        except Exception as e:  # headers are sent already: report in-band
            code = getattr(e, "code", "internal")
            yield _line({"type": "error", "code": code, "message": getattr(e, "message", str(e))})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


_ROUTE = next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is exec_command)
_JSON_TYPES = (b"application/json",)


class FastExec:
    """POST /v1/sandboxes/{id}/exec without FastAPI's request machinery (its routing through every
    router, dependency solving and response re-validation cost about 0.7 ms of the 4-5 ms round
    trip): the same auth, body model, service call and result model, by hand. Anything unusual (a
    body that is not JSON or does not validate) goes to the FastAPI route with the body replayed,
    so that errors keep their one shape; errors raised here (ApiError) reach the same handlers."""

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
        content_type = request.headers.get("content-type", "").split(";")[0].strip().encode()
        try:
            if content_type not in _JSON_TYPES:
                raise ValueError("not JSON")
            body = ExecRequest.model_validate(json.loads(raw))
        except (ValueError, ValidationError):  # the FastAPI route words the error
            await _ROUTE.handle(scope, _replay(raw, receive), send)
            return
        result = await run_exec(request.app.state.cove.service, who, scope["path_params"]["sandbox_id"], body)
        payload = result.model_dump_json().encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
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


# Put before every other route (cove.controlplane.app.install): the exec path's hot route.
fast_routes = [Route("/v1/sandboxes/{sandbox_id}/exec", FastExec(), methods=["POST"])]
