"""/v1/templates: build (NDJSON build log), import an image, list, inspect, tag, delete."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError
from cove.controlplane.service import SandboxService
from cove.controlplane.templates import Templates, decode_context
from cove.store.base import TemplateRecord
from cove.templates import dockerfile

from .deps import service, templates

router = APIRouter(prefix="/v1/templates", tags=["templates"])
Svc = Annotated[SandboxService, Depends(service)]
Tpl = Annotated[Templates, Depends(templates)]
Who = Annotated[Caller, Depends(caller)]


class BuildTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="template name (a-z, 0-9, . _ -)")
    from_: str = Field(
        default="base", alias="from", description="base | debian:bookworm | a template | a snapshot"
    )
    steps: list[dict[str, Any]] = Field(default_factory=list, max_length=256, description="build steps")
    dockerfile: str | None = Field(default=None, max_length=1 << 20, description="instead of from/steps")
    build_args: dict[str, str] = Field(default_factory=dict, description="ARG values for the Dockerfile")
    start_cmd: str | None = Field(default=None, description="started in each sandbox (warm: already running)")
    ready: str | None = Field(
        default=None, description="a shell command that exits 0 once the start command is ready"
    )
    warm: bool = Field(default=True, description="seal the running start command's memory (needs CRIU)")
    tags: list[str] = Field(default_factory=list, max_length=16)
    context: str | None = Field(
        default=None, description="base64 of a tar(.gz) holding the files COPY steps take"
    )
    step_timeout: int = Field(default=1800, ge=1, le=6 * 3600)


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str


async def template_out(tpl: Templates, who: Caller, rec: TemplateRecord) -> dict[str, Any]:
    cfg = rec.config
    return {
        "name": rec.name,
        "state": rec.state,
        "base": rec.base,
        "layers": [{"id": lid, "size": size} for lid, size in zip(rec.layers, rec.sizes, strict=False)],
        "size": sum(rec.sizes),
        "env": cfg.get("env", {}),
        "user": cfg.get("user"),
        "workdir": cfg.get("workdir"),
        "start": cfg.get("start"),
        "warm": bool(cfg.get("checkpoint")),
        "root": "own /usr" if cfg.get("rootfs") == "full" else "host /usr (read-only)",
        "tags": await tpl.tags_of(who, rec),
        "steps": rec.steps,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


def _ndjson(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            yield json.dumps(event).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("", responses={200: {"content": {"application/x-ndjson": {}}}})
async def build_template(body: BuildTemplate, who: Who, tpl: Tpl) -> StreamingResponse:
    """Build a template; the response streams the build log as NDJSON while it runs.

    Events: `{"type": "step", "step", "total", "description", "cached"}`, `{"type": "log", "step",
    "data"}`, `{"type": "step_done", "step", "layer", "cached", "seconds"}`, then `{"type": "done",
    "template"}` or `{"type": "error", "code", "message", "step", "output"}` (the failing step's output
    tail); a failed build leaves no template. Bad input (unknown base, a COPY source missing from the
    context, an unsupported Dockerfile instruction) is a 4xx before any event.
    """
    base, steps, start_cmd = body.from_, body.steps, body.start_cmd
    if body.dockerfile is not None:
        if body.steps:
            raise ApiError(422, "validation_error", "give either dockerfile or steps, not both")
        try:
            parsed = dockerfile.parse(body.dockerfile, body.build_args)
        except dockerfile.DockerfileError as e:
            raise ApiError(422, "invalid_dockerfile", str(e)) from e
        base, steps, start_cmd = parsed.base, parsed.steps, start_cmd or parsed.start_cmd
    # A Dockerfile's CMD is sealed running only with a ready check: without one, nothing says when
    # it has finished starting.
    warm = body.warm and (body.ready is not None or body.dockerfile is None or body.start_cmd is not None)
    start = {"cmd": start_cmd, "ready": body.ready, "warm": warm} if start_cmd else None
    events = await tpl.build(
        who,
        body.name,
        base,
        steps,
        start,
        body.tags,
        decode_context(body.context),
        step_timeout=body.step_timeout,
    )
    return _ndjson(events)


@router.post("/import", responses={200: {"content": {"application/x-ndjson": {}}}})
async def import_image(
    request: Request,
    who: Who,
    svc: Svc,
    tpl: Tpl,
    name: Annotated[str, Query(description="template name")],
    tags: Annotated[list[str] | None, Query()] = None,
    start_cmd: Annotated[str | None, Query()] = None,
    ready: Annotated[str | None, Query()] = None,
) -> StreamingResponse:
    """Import an OCI image layout or a `docker save` tarball (the request body; no registry) as a
    template; streams the log like a build. The image's Env, WorkingDir, User and Entrypoint+Cmd
    become the template's defaults (its command starts at each create unless `start_cmd` is given)."""
    limit = svc.settings.max_upload_bytes
    fd, tmp = tempfile.mkstemp(prefix="cove-image-", suffix=".tar", dir=svc.settings.home)
    path = Path(tmp)
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, "too_large", f"the image is larger than {limit} bytes (COVE_MAX_UPLOAD_BYTES)"
                    )
                f.write(chunk)
        if size == 0:
            raise ApiError(422, "validation_error", "the request body (the image tarball) is empty")
        start = {"cmd": start_cmd, "ready": ready, "warm": True} if start_cmd else None
        events = await tpl.build(who, name, f"image:{name}", [], start, tags or [], None, image=path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise

    async def then_remove() -> AsyncIterator[dict[str, Any]]:
        try:
            async for e in events:
                yield e
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    return _ndjson(then_remove())


@router.get("")
async def list_templates(who: Who, tpl: Tpl) -> dict[str, Any]:
    """Your templates (ready ones, and builds in progress as `building`), besides the built-in `base`."""
    return {"items": [await template_out(tpl, who, t) for t in await tpl.list(who)]}


@router.get("/{name}")
async def get_template(name: str, who: Who, tpl: Tpl) -> dict[str, Any]:
    """One template: its layers with their sizes, defaults, start command, tags and build steps."""
    return await template_out(tpl, who, await tpl.get(who, name))


@router.post("/{name}/tags", status_code=201)
async def tag_template(name: str, body: TagBody, who: Who, tpl: Tpl) -> dict[str, Any]:
    """Give the template another name, `name:tag`, that stays on this build when `name` is rebuilt."""
    return await template_out(tpl, who, await tpl.tag(who, name, body.tag))


@router.delete("/{name}", status_code=204)
async def delete_template(name: str, who: Who, tpl: Tpl) -> Response:
    """Delete a template (or one tag of it); 409 while sandboxes made from it are alive."""
    await tpl.delete(who, name)
    return Response(status_code=204)
