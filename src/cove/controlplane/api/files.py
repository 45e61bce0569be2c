"""/v1/sandboxes/{id}/files: the sandbox's filesystem, through its guest agent.

Every path is resolved by the guest agent inside the sandbox's own root and mount namespace, as the
requested user, so `..`, absolute paths and symlinks can only ever reach the sandbox's own files.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import Entry, EntryList, MkdirRequest, RenameRequest, SandboxPath, UserName
from cove.controlplane.service import SandboxService

from .deps import service
from .urls import file_caller

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]
# Downloads and uploads also take a signed URL (POST /v1/sandboxes/{id}/urls) instead of an API key.
FileWho = Annotated[Caller, Depends(file_caller)]
PathQ = Annotated[
    SandboxPath, Query(description="path inside the sandbox; relative paths start at the user's home")
]
UserQ = Annotated[UserName | None, Query(description="user to act as (default: the sandbox's user)")]


@router.get(
    "", response_class=StreamingResponse, responses={200: {"content": {"application/octet-stream": {}}}}
)
async def read_file(
    sandbox_id: str, path: PathQ, who: FileWho, svc: Svc, user: UserQ = None
) -> StreamingResponse:
    """Download a file, streamed."""
    rec = await svc.running(who, sandbox_id)
    chunks = svc.guest(rec).read(path, user=user or rec.user)
    async with svc.guest_errors(rec):
        first = await anext(chunks, b"")  # errors (missing file, a directory) surface before the headers

    async def body() -> AsyncIterator[bytes]:
        try:
            if first:
                yield first
            async with svc.guest_errors(rec):
                async for chunk in chunks:
                    yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.get("/watch", responses={200: {"content": {"application/x-ndjson": {}}}})
async def watch(
    sandbox_id: str, path: PathQ, who: Who, svc: Svc, user: UserQ = None, recursive: bool = False
) -> StreamingResponse:
    """Stream file events under a directory as NDJSON until the client disconnects:
    `{"type": "create"|"write"|"remove"|"rename", "path", "is_dir"}` (a rename also has `old_path`;
    `{"type": "overflow"}` means the kernel dropped events). inotify inside the sandbox, as `user`."""
    rec = await svc.running(who, sandbox_id)
    events = svc.guest(rec).watch(path, recursive=recursive, user=user or rec.user)
    async with svc.guest_errors(rec):
        first = await anext(events)  # a missing or non-directory path fails before the headers

    async def lines() -> AsyncIterator[bytes]:
        try:
            yield json.dumps({"type": "watching", "path": path}).encode() + b"\n"
            async with svc.guest_errors(rec):
                async for event in events:
                    if event.get("event") == "overflow":  # the kernel dropped events: rescan if you care
                        event = {"type": "overflow"}
                    yield json.dumps({k: v for k, v in event.items() if k != "event"}).encode() + b"\n"
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    del first
    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.put("", response_model=Entry)
async def write_file(
    sandbox_id: str,
    path: PathQ,
    request: Request,
    who: FileWho,
    svc: Svc,
    user: UserQ = None,
    mode: Annotated[
        int | None, Query(ge=0, le=0o7777, description="permission bits, e.g. 420 for 0644")
    ] = None,
) -> Entry:
    """Upload a file (the raw request body, streamed). Parents are created; a failed upload leaves nothing."""
    rec = await svc.running(who, sandbox_id)
    limit = svc.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit} bytes")

    async def chunks() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
            if chunk:
                yield chunk

    async with svc.guest_errors(rec):
        reply = await svc.guest(rec).write(path, chunks(), user=user or rec.user, mode=mode)
    return Entry(**reply["entry"])


@router.delete("", status_code=204)
async def remove(
    sandbox_id: str, path: PathQ, who: Who, svc: Svc, user: UserQ = None, recursive: bool = False
) -> Response:
    """Remove a file, a symlink, or a directory (`recursive=true` for a non-empty one)."""
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        await svc.guest(rec).call("remove", path=path, recursive=recursive, user=user or rec.user)
    return Response(status_code=204)


@router.get("/list", response_model=EntryList)
async def list_dir(
    sandbox_id: str,
    path: PathQ,
    who: Who,
    svc: Svc,
    user: UserQ = None,
    depth: Annotated[int, Query(ge=1, le=32)] = 1,
) -> EntryList:
    """List a directory, descending `depth` levels."""
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        reply = await svc.guest(rec).call("list", path=path, depth=depth, user=user or rec.user)
    return EntryList(entries=[Entry(**e) for e in reply["entries"]])


@router.get("/stat", response_model=Entry)
async def stat(sandbox_id: str, path: PathQ, who: Who, svc: Svc, user: UserQ = None) -> Entry:
    """Describe one path (a symlink is described, not followed). 404 if it does not exist."""
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        reply = await svc.guest(rec).call("stat", path=path, user=user or rec.user)
    return Entry(**reply["entry"])


@router.post("/mkdir", response_model=Entry)
async def mkdir(sandbox_id: str, body: MkdirRequest, who: Who, svc: Svc) -> Entry:
    """Create a directory and its parents (no error if it exists)."""
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        reply = await svc.guest(rec).call("mkdir", path=body.path, user=body.user or rec.user)
    return Entry(**reply["entry"])


@router.post("/rename", response_model=Entry)
async def rename(sandbox_id: str, body: RenameRequest, who: Who, svc: Svc) -> Entry:
    """Move or rename a file or directory."""
    rec = await svc.running(who, sandbox_id)
    async with svc.guest_errors(rec):
        reply = await svc.guest(rec).call("rename", src=body.src, dst=body.dst, user=body.user or rec.user)
    return Entry(**reply["entry"])
