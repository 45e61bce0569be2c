"""/v1/sandboxes/{id}/exec: run commands, buffered or streamed as NDJSON."""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from cove.controlplane.auth import Caller, caller
from cove.controlplane.schemas import ExecRequest, ExecResult
from cove.controlplane.service import SandboxService
from cove.store.base import SandboxRecord

from . import fast
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


async def _fast_exec(
    svc: SandboxService, who: Caller, params: dict[str, Any], body: ExecRequest
) -> ExecResult:
    return await run_exec(svc, who, params["sandbox_id"], body)


# Put before every other route (cove.controlplane.app.install): the exec path's hot route.
fast_routes = [fast.route(fast.of(router, exec_command), ExecRequest, _fast_exec)]
