"""e2b's template builds on cove's template builder (docs/templates.md).

The SDK's `Template.build` calls, in order:
1. `POST /v3/templates {name, tags}`: cove answers a build id (the template id is its name);
2. per COPY step, `GET /templates/{id}/files/{hash}`: whether cove has those files, else a URL to
   PUT their tar to (signed for the caller's tenant and that hash; no API key goes with it);
3. `POST /v2/templates/{id}/builds/{build}` with the steps: they become cove steps (RUN = run,
   COPY = copy of the uploaded files, ENV, WORKDIR, USER; a RUN with its own user switches to it
   and back; `startCmd`/`readyCmd` = the start command and its ready check) and cove builds them;
4. `GET .../builds/{build}/status?logsOffset=N` until `ready` or `error`, streaming the build's
   log lines (cove's step lines and their output).
The built template is a cove template of that name (and tags): `Sandbox.create(name)` from either
API starts it. Bases: `from_template(name)` is a cove template (e2b's `base` and code-interpreter
names are cove's `base`); `from_base_image()` (e2bdev/base) is cove's `base`; `from_debian_image()`
and `debian:*` images are cove's `debian:bookworm`. Other images would need a registry pull,
which cove does not do: a 400 says so. Builds are kept in memory (their status and logs), the
uploaded files under $COVE_HOME/e2b-files by their hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import secrets
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, StringConstraints

from cove.controlplane import auth
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError

from .rest import BASE_ALIASES, E2bRoute, _refs
from .rest_models import E2bBody

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

router = APIRouter(tags=["e2b"], route_class=E2bRoute)
Who = Annotated[Caller, Depends(auth.caller)]
LOG_PAGE = 100  # entries per status answer, as e2b's API pages them
KEPT_BUILDS = 200  # finished builds remembered per server
_HASH = re.compile(r"^[A-Za-z0-9_-]{8,128}$")
_GLOB = re.compile(r"[*?\[]")
_E2B_BASE_IMAGES = ("e2bdev/base", "e2bdev/code-interpreter", "e2bdev/desktop")


def _cove(request: Request) -> Cove:
    return request.app.state.cove


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Build:
    build_id: str
    tenant: str
    name: str
    tags: list[str]
    status: str = "waiting"  # waiting | building | ready | error
    logs: list[dict[str, Any]] = field(default_factory=list)
    reason: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None
    finished: float | None = None

    def log(self, message: str, level: str = "info", step: int | None = None) -> None:
        entry: dict[str, Any] = {"timestamp": _now(), "level": level, "message": message}
        if step is not None:
            entry["step"] = str(step + 1)
        self.logs.append(entry)


_builds: dict[str, _Build] = {}


def _forget_old() -> None:
    done = sorted((b for b in _builds.values() if b.finished), key=lambda b: b.finished or 0)
    for b in done[: max(0, len(done) - KEPT_BUILDS)]:
        _builds.pop(b.build_id, None)


def _build_of(who: Caller, template_id: str, build_id: str) -> _Build:
    b = _builds.get(build_id)
    if b is None or b.tenant != who.tenant or b.name != _name_of(template_id):
        raise ApiError(404, "not_found", f"build '{build_id}' of template '{template_id}' not found")
    return b


def _name_of(ref: str) -> str:
    return _refs(ref)[-1]


# -- the uploaded files ----------------------------------------------------------------------
def _files_dir(cove: Cove, tenant: str) -> Path:
    return cove.settings.home / "e2b-files" / hashlib.sha256(tenant.encode()).hexdigest()[:32]


def _file_token(cove: Cove, tenant: str, files_hash: str) -> str:
    return cove.signer.token("e2b-template-files", f"{tenant}\n{files_hash}")


# -- requests ----------------------------------------------------------------------------------
class BuildRequest(E2bBody):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    alias: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=32
    )
    cpu_count: int | None = Field(default=None, alias="cpuCount")
    memory_mb: int | None = Field(default=None, alias="memoryMB")


class Step(E2bBody):
    type: str
    args: list[str] | None = None
    force: bool | None = None
    files_hash: str | None = Field(default=None, alias="filesHash")


class BuildStart(E2bBody):
    from_image: str | None = Field(default=None, alias="fromImage")
    from_template: str | None = Field(default=None, alias="fromTemplate")
    from_image_registry: dict[str, Any] | None = Field(default=None, alias="fromImageRegistry")
    force: bool | None = None
    steps: list[Step] | None = Field(default=None, max_length=1000)
    start_cmd: str | None = Field(default=None, alias="startCmd")
    ready_cmd: str | None = Field(default=None, alias="readyCmd")


@router.post("/v3/templates", status_code=202)
@router.post("/v2/templates", status_code=202)
async def request_build(body: BuildRequest, request: Request, who: Who) -> JSONResponse:
    ref = body.name or body.alias
    if not ref:
        raise ApiError(400, "invalid", "name: a template needs a name")
    name, _, tag = _name_of(ref).partition(":")
    tags = [*([tag] if tag else []), *(body.tags or [])]
    if any(r in BASE_ALIASES for r in _refs(name)):
        raise ApiError(400, "invalid", f"{name!r} is cove's built-in template: choose another name")
    b = _Build(build_id=str(uuid.uuid4()), tenant=who.tenant, name=name, tags=tags)
    _forget_old()
    _builds[b.build_id] = b
    return JSONResponse(
        {
            "templateID": name,
            "buildID": b.build_id,
            "public": False,
            "names": [name],
            "aliases": [name],
            "tags": tags,
        },
        202,
    )


@router.get("/templates/{template_id}/files/{files_hash}", status_code=201)
async def file_upload_link(template_id: str, files_hash: str, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    name = _name_of(template_id)
    if not any(b.tenant == who.tenant and b.name == name for b in _builds.values()):
        # Only for a template the caller is building (POST /v3/templates made it): another
        # tenant's template id is as unknown here as anywhere.
        raise ApiError(404, "not_found", f"template '{template_id}' not found")
    if not _HASH.match(files_hash):
        raise ApiError(400, "invalid", "hash: expected the SDK's files hash")
    if (_files_dir(cove, who.tenant) / files_hash).exists():
        return JSONResponse({"present": True}, 201)
    base = str(request.base_url).rstrip("/")
    url = f"{base}/e2b/template-files/{files_hash}?tenant={_quote(who.tenant)}&token={_file_token(cove, who.tenant, files_hash)}"
    return JSONResponse({"present": False, "url": url}, 201)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


@router.put("/e2b/template-files/{files_hash}", status_code=200)
async def upload_files(files_hash: str, tenant: str, token: str, request: Request) -> Response:
    """The PUT the SDK sends its COPY files to (a tar, gzipped), at the URL file_upload_link signed."""
    cove = _cove(request)
    if not _HASH.match(files_hash) or not cove.signer.check(
        "e2b-template-files", f"{tenant}\n{files_hash}", token
    ):
        raise ApiError(401, "unauthorized", "invalid upload signature")
    limit = cove.settings.max_upload_bytes
    folder = _files_dir(cove, tenant)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    tmp = folder / f".{files_hash}.{secrets.token_hex(4)}.part"
    size = 0
    try:
        with open(tmp, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "too_large", f"the files exceed cove's limit of {limit} bytes")
                await asyncio.to_thread(f.write, chunk)
        os.replace(tmp, folder / files_hash)
    finally:
        tmp.unlink(missing_ok=True)
    return Response(status_code=200)


# -- the build ---------------------------------------------------------------------------------
def _base(body: BuildStart) -> str:
    if body.from_image_registry:
        raise ApiError(400, "unsupported", "cove does not pull images from registries (fromImageRegistry)")
    if body.from_template:
        refs = _refs(body.from_template)
        return "base" if any(r in BASE_ALIASES for r in refs) else refs[0]
    image = (body.from_image or "e2bdev/base").lower()
    if image.startswith(_E2B_BASE_IMAGES):
        return "base"
    if image in (
        "debian",
        "debian:latest",
        "debian:stable",
        "debian:12",
        "debian:bookworm",
    ) or image.startswith(("debian:bookworm", "debian:12", "debian:stable")):
        return "debian:bookworm"
    raise ApiError(
        400,
        "unsupported",
        f"image {body.from_image!r}: cove builds from its base template (from_base_image, "
        "from_template('base')), debian:bookworm (from_debian_image('bookworm')) or a cove "
        "template (from_template); it does not pull images",
    )


def _steps(body: BuildStart) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """cove's steps for e2b's, and the (hash, folder) of each COPY's files in the context."""
    out: list[dict[str, Any]] = []
    files: list[tuple[str, str]] = []
    user, workdir = "user", "/home/user"  # the base template's (e2b's base image has the same)
    for i, s in enumerate(body.steps or []):
        args = s.args or []
        kind = s.type.upper()
        if kind == "RUN":
            if not args or not args[0].strip():
                raise ApiError(400, "invalid", f"step {i + 1}: RUN needs a command")
            as_user = args[1] if len(args) > 1 and args[1] else None
            native = _native(args[0])
            if native is not None:  # the SDK's pip_install / apt_install / npm_install
                out.append(native)
            elif as_user and as_user != user:
                out += [{"type": "user", "user": as_user}, {"type": "run", "cmd": args[0]}]
                out.append({"type": "user", "user": user})
            else:
                out.append({"type": "run", "cmd": args[0]})
        elif kind == "COPY":
            if len(args) < 2 or not s.files_hash or not _HASH.match(s.files_hash):
                raise ApiError(
                    400, "invalid", f"step {i + 1}: COPY needs a source, a destination and its files"
                )
            src, dst = args[0].strip("/") or ".", args[1]
            owner = args[2] if len(args) > 2 and args[2] else None
            mode = args[3] if len(args) > 3 and args[3] else None
            folder = f"f{len(files)}"
            files.append((s.files_hash, folder))
            if _GLOB.search(src) or src == ".":
                src, dst = folder, dst if dst.endswith("/") else dst + "/"
            else:
                src = f"{folder}/{src}"
            if not dst.startswith("/"):
                dst = f"{workdir.rstrip('/')}/{dst}"  # relative to the build's workdir, as e2b has it
            step: dict[str, Any] = {"type": "copy", "src": src, "dst": dst}
            if owner:
                step["chown"] = owner
            out.append(step)
            if mode:
                if not re.fullmatch(r"[0-7]{3,4}", mode):
                    raise ApiError(400, "invalid", f"step {i + 1}: COPY mode {mode!r} is not octal")
                out += [
                    {"type": "user", "user": "root"},
                    {"type": "run", "cmd": f"chmod {mode} {_sh(dst)}"},
                    {"type": "user", "user": user},
                ]
        elif kind == "ENV":
            if len(args) % 2:
                raise ApiError(400, "invalid", f"step {i + 1}: ENV needs name, value pairs")
            out.append({"type": "env", "env": dict(zip(args[::2], args[1::2], strict=True))})
        elif kind == "WORKDIR":
            if len(args) != 1:
                raise ApiError(400, "invalid", f"step {i + 1}: WORKDIR needs one path")
            workdir = args[0] if args[0].startswith("/") else f"{workdir.rstrip('/')}/{args[0]}"
            out.append({"type": "workdir", "path": workdir})
        elif kind == "USER":
            if len(args) != 1:
                raise ApiError(400, "invalid", f"step {i + 1}: USER needs one user")
            user = args[0]
            out.append({"type": "user", "user": user})
        else:
            raise ApiError(400, "unsupported", f"step {i + 1}: {s.type} steps are not supported by cove")
    return out, files


_APT = re.compile(
    r"^apt-get update && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y "
    r"(?:--no-install-recommends )?(?:--fix-missing )?(?P<pkgs>[^&|;<>`$()]+)$"
)
_PIP = re.compile(r"^pip install (?:--user )?(?P<pkgs>[^&|;<>`$()-][^&|;<>`$()]*)$")
_NPM = re.compile(r"^npm install (?P<g>-g )?(?P<pkgs>[^&|;<>`$()-][^&|;<>`$()]*)$")


def _native(cmd: str) -> dict[str, Any] | None:
    """cove's own step for what the SDK's package helpers run, which knows the base template: pip
    installs into the user's site-packages over its read-only /usr, apt says it needs a Debian base."""
    if m := _APT.match(cmd):
        return {"type": "apt", "packages": m["pkgs"].split()}
    if m := _PIP.match(cmd):
        return {"type": "pip", "packages": m["pkgs"].split()}
    if (m := _NPM.match(cmd)) and "--save-dev" not in cmd:
        return {"type": "npm", "packages": m["pkgs"].split(), "global": bool(m["g"])}
    return None


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _context(folder: Path, files: list[tuple[str, str]]) -> bytes | None:
    """One build context: each COPY's uploaded tar under its own folder."""
    if not files:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for files_hash, prefix in files:
            path = folder / files_hash
            if not path.exists():
                raise ApiError(400, "files_missing", f"the files of hash {files_hash} were not uploaded")
            dir_info = tarfile.TarInfo(prefix)
            dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
            out.addfile(dir_info)
            try:
                with tarfile.open(path, mode="r:*") as src:
                    for m in src:
                        data = src.extractfile(m) if m.isfile() else None
                        m.name = f"{prefix}/{m.name.lstrip('/')}"
                        out.addfile(m, data)
            except tarfile.TarError as e:
                raise ApiError(400, "invalid_files", f"the uploaded files of hash {files_hash}: {e}") from e
    return buf.getvalue()


@router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202)
async def start_build(
    template_id: str, build_id: str, body: BuildStart, request: Request, who: Who
) -> Response:
    cove = _cove(request)
    b = _build_of(who, template_id, build_id)
    if b.status != "waiting":
        raise ApiError(409, "conflict", f"build {build_id} was started already")
    base = _base(body)
    steps, files = _steps(body)
    context = await asyncio.to_thread(_context, _files_dir(cove, who.tenant), files)
    start = None
    if body.start_cmd:
        start = {"cmd": body.start_cmd, "ready": body.ready_cmd or None}
    events = await cove.templates.build(who, b.name, base, steps, start, b.tags, context)
    b.status = "building"
    if body.ready_cmd and not body.start_cmd:
        b.log("a ready command without a start command has nothing to wait for: ignored", "warn")
    b.task = asyncio.create_task(_follow(b, events))
    return Response(status_code=202)


async def _follow(b: _Build, events: Any) -> None:
    """Keep the build's log and status from cove's build events (the build runs while read)."""
    try:
        async for ev in events:
            kind = ev.get("type")
            step = ev.get("step")
            if kind == "step":
                cached = " (cached)" if ev.get("cached") else ""
                b.log(f"{ev.get('description', '')}{cached}", step=step)
            elif kind == "log":
                for line in str(ev.get("data", "")).splitlines():
                    b.log(line, step=step)
            elif kind == "error":
                b.status = "error"
                message = str(ev.get("message") or "the build failed")
                b.log(message, "error", step=step)
                b.reason = {"message": message, **({"step": str(step + 1)} if step is not None else {})}
            elif kind == "done":
                b.log(f"template {b.name} built in {ev.get('seconds', 0)} s")
                b.status = "ready"
    except Exception as e:
        b.status = "error"
        b.reason = {"message": f"the build stopped: {e}"}
        b.log(b.reason["message"], "error")
    finally:
        if b.status not in ("ready", "error"):
            b.status = "error"
            b.reason = b.reason or {"message": "the build ended without a result"}
        b.finished = time.monotonic()


@router.get("/templates/{template_id}/builds/{build_id}/status")
async def build_status(
    template_id: str,
    build_id: str,
    request: Request,
    who: Who,
    logs_offset: Annotated[int, Query(alias="logsOffset", ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=LOG_PAGE)] = LOG_PAGE,
) -> JSONResponse:
    b = _build_of(who, template_id, build_id)
    status = b.status
    page = b.logs[logs_offset : logs_offset + limit]
    out: dict[str, Any] = {
        "templateID": b.name,
        "buildID": b.build_id,
        "status": status,
        "logEntries": page,
        "logs": [e["message"] for e in page],
    }
    if b.reason is not None:
        out["reason"] = b.reason
    return JSONResponse(out)


@router.get("/templates/aliases/{alias}")
async def alias(alias: str, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    ref = _name_of(alias)
    if ref in BASE_ALIASES or await cove.service.sources.template(who, ref) is not None:
        return JSONResponse({"templateID": ref, "public": ref in BASE_ALIASES})
    raise ApiError(404, "template_not_found", f"template '{alias}' not found")


# -- tags --------------------------------------------------------------------------------------
def _build_uuid(build_id: str) -> str:
    """e2b's build ids are UUIDs; cove's (shared by a build's tags) map onto one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cove-build:{build_id}"))


class AssignTags(E2bBody):
    target: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=32
    )


class RemoveTags(E2bBody):
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=32
    )


@router.post("/templates/tags", status_code=201)
async def assign_tags(body: AssignTags, request: Request, who: Who) -> JSONResponse:
    """Tag the build `target` names (`name` or `name:tag`) with more tags."""
    cove = _cove(request)
    target = _name_of(body.target)
    rec = None
    for tag in body.tags:
        rec = await cove.templates.tag(who, target, tag)
    assert rec is not None
    return JSONResponse({"tags": body.tags, "buildID": _build_uuid(rec.build_id)}, 201)


@router.delete("/templates/tags", status_code=204)
async def remove_tags(body: RemoveTags, request: Request, who: Who) -> Response:
    cove = _cove(request)
    name = _name_of(body.name).split(":", 1)[0]
    for tag in body.tags:
        await cove.templates.delete(who, f"{name}:{tag}")
    return Response(status_code=204)


@router.get("/templates/{template_id}/tags")
async def list_tags(template_id: str, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    name = _name_of(template_id).split(":", 1)[0]
    tagged = await cove.templates.tagged(who, name)
    return JSONResponse(
        [
            {
                "tag": t.name.split(":", 1)[1],
                "buildID": _build_uuid(t.build_id),
                "createdAt": datetime.fromtimestamp(t.created_at, UTC).isoformat().replace("+00:00", "Z"),
            }
            for t in tagged
        ]
    )
