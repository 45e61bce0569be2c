"""/v1/sandboxes/{id}/processes: background processes and terminals that outlive a request.

Output is kept by the guest (bounded) and can be read from any offset, as NDJSON or over a
WebSocket (binary frames: what a terminal needs).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from cove.controlplane.auth import Caller, caller, websocket_caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import (
    ProcessList,
    ProcessOut,
    SignalRequest,
    StartProcess,
    StdinData,
    WaitRequest,
    WaitResult,
)
from cove.controlplane.service import SandboxService
from cove.store.base import SandboxRecord

from .deps import service

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/processes", tags=["processes"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]


_ID = re.compile(r"^[0-9a-f]{1,32}$")


def _known(rec: SandboxRecord, process_id: str) -> str:
    """A malformed id is as unknown as a missing one: 404, never a guest error."""
    if not _ID.match(process_id):
        raise ApiError(404, "process_not_found", f"process {process_id!r} not found in sandbox {rec.id}")
    return process_id


async def _process(svc: SandboxService, rec: SandboxRecord, process_id: str) -> dict[str, Any]:
    async with svc.guest_errors(rec):
        procs = await svc.guest(rec).processes()
    for proc in procs:
        if proc.get("id") == process_id:
            return proc
    raise ApiError(404, "process_not_found", f"process {process_id!r} not found in sandbox {rec.id}")


@router.post("", status_code=201, response_model=ProcessOut)
async def start(sandbox_id: str, body: StartProcess, who: Who, svc: Svc) -> ProcessOut:
    """Start a process in the background (optionally in a terminal); it runs on after this call."""
    rec = await svc.running(who, sandbox_id)
    fields: dict[str, Any] = {
        "cmd": body.cmd,
        "argv": body.argv,
        "cwd": body.cwd,
        "env": body.env,
        "user": body.user or rec.user,
        "stdin": body.stdin or body.pty is not None,
        "pty": body.pty.model_dump() if body.pty else None,
        "tag": body.tag,
    }
    async with svc.guest_errors(rec):
        started = await svc.guest(rec).spawn(**fields)
    return ProcessOut(**await _process(svc, rec, started["id"]))


@router.get("", response_model=ProcessList)
async def list_processes(sandbox_id: str, who: Who, svc: Svc) -> ProcessList:
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        procs = await svc.guest(rec).processes()
    return ProcessList(items=[ProcessOut(**p) for p in procs])


@router.get("/{process_id}", response_model=ProcessOut)
async def get_process(sandbox_id: str, process_id: str, who: Who, svc: Svc) -> ProcessOut:
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    return ProcessOut(**await _process(svc, rec, process_id))


@router.get("/{process_id}/output", responses={200: {"content": {"application/x-ndjson": {}}}})
async def output(
    sandbox_id: str,
    process_id: str,
    who: Who,
    svc: Svc,
    offset: Annotated[
        int | None, Query(ge=0, description="first byte to send (default: the oldest kept)")
    ] = None,
) -> StreamingResponse:
    """The process's output from `offset`, history first, then live until it exits (NDJSON).

    Events: `{"type": "attached", "offset", "truncated"}` (truncated: older output was dropped),
    `{"type": "stdout"|"stderr", "data", "offset"}`, `{"type": "truncated", "offset", "dropped"}` if this
    reader fell more than the kept window (8 MiB) behind, finally `{"type": "exit", "exit_code", "end_offset"}`.
    Closing the connection leaves the process running.
    """
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    events = svc.guest(rec).attach(process_id, offset=offset)
    async with svc.guest_errors(rec):
        first = await anext(events)  # unknown ids fail here, before the headers

    async def lines() -> AsyncIterator[bytes]:
        decoders = {k: codecs.getincrementaldecoder("utf-8")(errors="replace") for k in ("stdout", "stderr")}
        position = 0
        try:
            kind, data = first
            position = data.get("offset", 0)  # type: ignore[union-attr]
            yield _line({"type": "attached", **data})  # type: ignore[dict-item]
            async with svc.guest_errors(rec):
                async for kind, data in events:
                    if kind == "exit":
                        yield _line({"type": "exit", **data})  # type: ignore[dict-item]
                    elif kind == "truncated":  # this reader fell more than the kept window behind
                        position = data["offset"]  # type: ignore[index]
                        yield _line({"type": "truncated", **data})  # type: ignore[dict-item]
                    else:
                        text = decoders[kind].decode(data)  # type: ignore[arg-type]
                        yield _line({"type": kind, "data": text, "offset": position})
                        position += len(data)  # type: ignore[arg-type]
        except ApiError as e:
            yield _line({"type": "error", "code": e.code, "message": e.message})
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/{process_id}/stdin", status_code=204)
async def stdin(sandbox_id: str, process_id: str, body: StdinData, who: Who, svc: Svc) -> Response:
    """Write text to the process's stdin (or terminal). 409 once it has exited or stdin is closed."""
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    async with svc.guest_errors(rec):
        await svc.guest(rec).input(process_id, body.data.encode())
    return Response(status_code=204)


@router.post("/{process_id}/stdin/close", status_code=204)
async def close_stdin(sandbox_id: str, process_id: str, who: Who, svc: Svc) -> Response:
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    async with svc.guest_errors(rec):
        await svc.guest(rec).close_stdin(process_id)
    return Response(status_code=204)


@router.post("/{process_id}/signal", status_code=204)
async def signal(sandbox_id: str, process_id: str, body: SignalRequest, who: Who, svc: Svc) -> Response:
    """Send a signal (name or number) to the process's whole process group."""
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    sig: str | int = int(body.signal) if body.signal.isdigit() else body.signal
    async with svc.guest_errors(rec):
        await svc.guest(rec).signal(process_id, sig)
    return Response(status_code=204)


@router.delete("/{process_id}", status_code=204)
async def kill(sandbox_id: str, process_id: str, who: Who, svc: Svc) -> Response:
    """Kill the process (SIGKILL to its process group)."""
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    async with svc.guest_errors(rec):
        await svc.guest(rec).signal(process_id, "SIGKILL")
    return Response(status_code=204)


@router.post("/{process_id}/resize", status_code=204)
async def resize(sandbox_id: str, process_id: str, body: dict[str, int], who: Who, svc: Svc) -> Response:
    """Resize the process's terminal: `{"rows": R, "cols": C}`."""
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    rows, cols = body.get("rows"), body.get("cols")
    if not isinstance(rows, int) or not isinstance(cols, int) or not (0 < rows <= 1000 and 0 < cols <= 1000):
        raise ApiError(422, "validation_error", "rows and cols: integers from 1 to 1000")
    async with svc.guest_errors(rec):
        await svc.guest(rec).resize(process_id, rows, cols)
    return Response(status_code=204)


@router.post("/{process_id}/wait", response_model=WaitResult)
async def wait(
    sandbox_id: str, process_id: str, who: Who, svc: Svc, body: WaitRequest | None = None
) -> WaitResult:
    """Wait up to `timeout` seconds for the process to exit; `running` says whether it still runs."""
    rec = await svc.running(who, sandbox_id)
    _known(rec, process_id)
    timeout = (body or WaitRequest()).timeout
    async with svc.guest_errors(rec):
        result = await svc.guest(rec).wait(process_id, timeout)
    return WaitResult(**result)


@router.websocket("/{process_id}/ws")
async def terminal(websocket: WebSocket, sandbox_id: str, process_id: str, offset: int | None = None) -> None:
    """A live connection to a process: binary frames out are its output (from `offset`); binary frames
    in are its input; text frames in are JSON commands: `{"resize": [rows, cols]}`, `{"signal": "SIGINT"}`,
    `{"close_stdin": true}`. A final text frame `{"exit_code": N}` precedes the close.
    Authenticate with the Authorization header, or `?api_key=` where a client cannot set headers."""
    svc: SandboxService = websocket.app.state.cove.service
    try:
        who = await websocket_caller(websocket)
        rec = await svc.running(who, sandbox_id)
        _known(rec, process_id)
        events = svc.guest(rec).attach(process_id, offset=offset)
        async with svc.guest_errors(rec):
            await anext(events)
    except ApiError as e:
        await websocket.close(code=4000 + min(e.status, 999), reason=e.message[:120])
        return
    await websocket.accept()
    guest = svc.guest(rec)

    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=256)

    async def read_guest() -> None:
        async for item in events:
            await queue.put(item)
        await queue.put(("end", {}))

    async def pump_out() -> None:
        # A terminal writes in small pieces (≈4 KiB): coalesce what is already there into one
        # WebSocket message, or per-message costs cap the throughput at a few MB/s.
        reader = asyncio.create_task(read_guest())
        pending: tuple[str, Any] | None = None
        try:
            while True:
                kind, data = pending or await queue.get()
                pending = None
                if kind in ("stdout", "stderr"):
                    buf = bytearray(data)
                    while len(buf) < (1 << 20):
                        try:
                            nxt = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            break
                        if nxt[0] not in ("stdout", "stderr"):
                            pending = nxt
                            break
                        buf += nxt[1]
                    await websocket.send_bytes(bytes(buf))
                elif kind == "truncated":
                    await websocket.send_text(json.dumps({"truncated": data}))
                elif kind == "exit":
                    await websocket.send_text(json.dumps(data))
                    return
                else:
                    return
        finally:
            reader.cancel()

    out = asyncio.create_task(pump_out())
    try:
        while not out.done():
            receive = asyncio.create_task(websocket.receive())
            done, _ = await asyncio.wait({receive, out}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            msg = receive.result()
            if msg["type"] == "websocket.disconnect":
                break
            with contextlib.suppress(ApiError):
                async with svc.guest_errors(rec):
                    if msg.get("bytes"):
                        await guest.input(process_id, msg["bytes"])
                    elif msg.get("text"):
                        await _command(guest, process_id, json.loads(msg["text"]))
    except (WebSocketDisconnect, ValueError):
        pass
    finally:
        out.cancel()
        with contextlib.suppress(BaseException):
            await out
        await events.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(RuntimeError):
            await websocket.close()


async def _command(guest: Any, process_id: str, cmd: dict[str, Any]) -> None:
    if "resize" in cmd:
        rows, cols = cmd["resize"]
        await guest.resize(process_id, int(rows), int(cols))
    if "signal" in cmd:
        await guest.signal(process_id, cmd["signal"])
    if cmd.get("close_stdin"):
        await guest.close_stdin(process_id)
    if "data_b64" in cmd:
        await guest.input(process_id, base64.b64decode(cmd["data_b64"]))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"
