"""e2b's volumes on cove's: `/volumes` (create, list, get, delete, with `X-API-KEY`) and the
volume content API `/volumecontent/{id}/...` (files and directories, with the volume's token).

An e2b volume is a cove volume of the caller's tenant (docs/volumes.md): its `volumeID` is cove's
volume id, its name cove's name, and `Sandbox.create(volume_mounts={"/data": vol})` mounts it as
cove mounts volumes. The content API's token is an HMAC of the volume id under the server secret
(as the sandboxes' envd tokens are): it grants that one volume, and replacing the secret revokes it.
The SDK sends content requests to E2B_VOLUME_API_URL: set it to the cove URL too.

Content operations act on the volume's directory on the node, never following a symbolic link
(a sandbox that mounts the volume may plant one): every path is walked one component at a time
below the volume's root with O_NOFOLLOW, and a link is reported as an entry, never entered.
Owners are the ids as a sandbox sees them (the host's ids less the node's uid base).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, StringConstraints

from cove.controlplane import auth
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError
from cove.controlplane.schemas import VolumeMount
from cove.store.base import VolumeRecord

from .rest import E2bRoute
from .rest_models import E2bBody

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

router = APIRouter(tags=["e2b"], route_class=E2bRoute)
Who = Annotated[Caller, Depends(auth.caller)]
CHUNK = 256 * 1024
MAX_DEPTH = 16


def _cove(request: Request) -> Cove:
    return request.app.state.cove


def volume_token(cove: Cove, volume_id: str) -> str:
    return cove.signer.token("e2b-volume", volume_id)


class NewVolume(E2bBody):
    name: Annotated[str, StringConstraints(min_length=1, max_length=63)] = Field(
        description="as cove names volumes: lower-case letters, digits, '.', '_' and '-'"
    )


class Ownership(E2bBody):
    uid: Annotated[int, Field(ge=0, lt=65536)] | None = None
    gid: Annotated[int, Field(ge=0, lt=65536)] | None = None
    mode: Annotated[int, Field(ge=0, le=0o7777)] | None = None


def _with_token(cove: Cove, rec: VolumeRecord) -> dict[str, Any]:
    return {
        "volumeID": rec.id,
        "name": rec.name,
        "token": volume_token(cove, rec.id),
        "domain": cove.settings.public_domain,
    }


async def _owned(cove: Cove, who: Caller, volume_id: str) -> VolumeRecord:
    return await cove.volumes.by_id(volume_id, who)


# -- /volumes ----------------------------------------------------------------------------------
@router.post("/volumes", status_code=201)
async def create_volume(body: NewVolume, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    try:
        VolumeMount(name=body.name, path="/x")  # cove's rules for a volume's name
    except ValueError:
        raise ApiError(
            400,
            "invalid",
            f"name {body.name!r}: a volume's name is 1-63 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
        ) from None
    rec = await cove.volumes.create(who, body.name, None)
    return JSONResponse(_with_token(cove, rec), 201)


@router.get("/volumes")
async def list_volumes(request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    vols = sorted(await cove.volumes.list(who), key=lambda v: v.created_at)
    return JSONResponse([{"volumeID": v.id, "name": v.name} for v in vols])


@router.get("/volumes/{volume_id}")
async def get_volume(volume_id: str, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    return JSONResponse(_with_token(cove, await _owned(cove, who, volume_id)))


@router.delete("/volumes/{volume_id}", status_code=204)
async def delete_volume(volume_id: str, request: Request, who: Who) -> Response:
    cove = _cove(request)
    rec = await _owned(cove, who, volume_id)
    await cove.volumes.delete(who, rec.name)
    return Response(status_code=204)


# -- /volumecontent/{id}/... ------------------------------------------------------------------
async def _content(request: Request, volume_id: str) -> tuple[Cove, VolumeRecord, str]:
    """The volume a content request is for, its directory on this node, after its token."""
    cove = _cove(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not cove.signer.check("e2b-volume", volume_id, token.strip()):
        raise ApiError(401, "unauthorized", "invalid or missing volume token (Authorization: Bearer)")
    rec = await cove.volumes.by_id(volume_id)
    return cove, rec, cove.volumes.content_path(rec)


def _parts(path: str) -> list[str]:
    """A volume path's components ('/' or '' is the root); '..' is refused, not resolved."""
    if "\0" in path:
        raise ApiError(400, "invalid", "path must not contain NUL")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ApiError(400, "invalid", f"path {path!r}: '..' is not allowed")
    return parts


def _os_error(e: OSError, path: str) -> ApiError:
    if e.errno == errno.ENOENT:
        return ApiError(404, "not_found", f"path {path!r} not found")
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return ApiError(400, "invalid", f"path {path!r} goes through a symbolic link or a file")
    if e.errno == errno.EEXIST:
        return ApiError(409, "exists", f"path {path!r} exists")
    if e.errno == errno.EISDIR:
        return ApiError(400, "invalid", f"path {path!r} is a directory")
    if e.errno == errno.ENOTEMPTY:
        return ApiError(409, "not_empty", f"directory {path!r} is not empty")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, "no_space", f"the volume is full writing {path!r}")
    return ApiError(400, "failed", f"{path!r}: {e.strerror}")


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def _parent(
    root: str, parts: list[str], make: bool = False, owner: tuple[int, int] | None = None
) -> Iterator[int]:
    """An fd of the directory holding the last component (the root for the root), walked with
    O_NOFOLLOW; `make`: create missing directories on the way (owned by `owner`)."""
    fd = os.open(root, _DIR)
    try:
        for name in parts[:-1]:
            try:
                nxt = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                    if owner is not None:
                        os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _stat(cove: Cove, st: os.stat_result, name: str, path: str, target: str | None) -> dict[str, Any]:
    base = cove.settings.uid_base
    kinds = {stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink", stat.S_IFREG: "file"}
    kind = kinds.get(stat.S_IFMT(st.st_mode), "unknown")
    out: dict[str, Any] = {
        "name": name,
        "type": kind,
        "path": path,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid - base if base <= st.st_uid < base + 65536 else st.st_uid,
        "gid": st.st_gid - base if base <= st.st_gid < base + 65536 else st.st_gid,
        "atime": _iso(st.st_atime),
        "mtime": _iso(st.st_mtime),
        "ctime": _iso(st.st_ctime),
    }
    if target is not None:
        out["target"] = target
    return out


def _entry(cove: Cove, dir_fd: int, name: str, path: str) -> dict[str, Any]:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False) if name else os.fstat(dir_fd)
    target = os.readlink(name, dir_fd=dir_fd) if name and stat.S_ISLNK(st.st_mode) else None
    return _stat(cove, st, name or "/", path, target)


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


def _owner(cove: Cove, uid: int | None, gid: int | None, root_fd: int) -> tuple[int, int]:
    """Host ids for ids as a sandbox sees them; unset ones: the volume root's owner."""
    st = os.fstat(root_fd)
    base = cove.settings.uid_base
    return (st.st_uid if uid is None else base + uid, st.st_gid if gid is None else base + gid)


def _stat_path(cove: Cove, root: str, path: str) -> dict[str, Any]:
    parts = _parts(path)
    with _parent(root, parts) as fd:
        return _entry(cove, fd, parts[-1] if parts else "", _join(parts))


def _list(cove: Cove, root: str, path: str, depth: int) -> list[dict[str, Any]]:
    parts = _parts(path)
    out: list[dict[str, Any]] = []

    def walk(fd: int, prefix: list[str], left: int) -> None:
        for name in sorted(os.listdir(fd)):
            entry = _entry(cove, fd, name, _join([*prefix, name]))
            out.append(entry)
            if left > 1 and entry["type"] == "directory":
                sub = os.open(name, _DIR, dir_fd=fd)
                try:
                    walk(sub, [*prefix, name], left - 1)
                finally:
                    os.close(sub)

    with _parent(root, parts) as parent:
        fd = os.open(parts[-1], _DIR, dir_fd=parent) if parts else os.dup(parent)
    try:
        walk(fd, parts, depth)
    finally:
        os.close(fd)
    return out


def _make_dir(cove: Cove, root: str, path: str, own: Ownership, force: bool) -> dict[str, Any]:
    parts = _parts(path)
    if not parts:
        raise ApiError(409, "exists", "the volume's root exists")
    with _parent(root, [], make=False) as root_fd:
        owner = _owner(cove, own.uid, own.gid, root_fd)
    with _parent(root, parts, make=force, owner=owner) as fd:
        name = parts[-1]
        try:
            os.mkdir(name, own.mode if own.mode is not None else 0o755, dir_fd=fd)
        except FileExistsError:
            if not force:
                raise
        else:
            os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
        return _entry(cove, fd, name, _join(parts))


def _patch(cove: Cove, root: str, path: str, own: Ownership) -> dict[str, Any]:
    parts = _parts(path)
    with _parent(root, parts) as fd:
        name = parts[-1] if parts else ""
        st = os.stat(name, dir_fd=fd, follow_symlinks=False) if name else os.fstat(fd)
        if stat.S_ISLNK(st.st_mode):
            raise ApiError(400, "invalid", f"path {path!r} is a symbolic link")
        base = cove.settings.uid_base
        uid = st.st_uid if own.uid is None else base + own.uid
        gid = st.st_gid if own.gid is None else base + own.gid
        if name:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            if own.mode is not None:
                target = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    os.chmod(f"/proc/self/fd/{target}", own.mode)
                finally:
                    os.close(target)
        else:
            os.fchown(fd, uid, gid)
            if own.mode is not None:
                os.fchmod(fd, own.mode)
        return _entry(cove, fd, name, _join(parts))


def _remove(root: str, path: str) -> None:
    parts = _parts(path)
    if not parts:
        raise ApiError(400, "invalid", "the volume's root cannot be removed (delete the volume)")

    def rmtree(parent: int, name: str) -> None:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
            return
        fd = os.open(name, _DIR, dir_fd=parent)
        try:
            for child in os.listdir(fd):
                rmtree(fd, child)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent)

    with _parent(root, parts) as fd:
        rmtree(fd, parts[-1])


def _open_file(root: str, path: str) -> int:
    parts = _parts(path)
    if not parts:
        raise ApiError(400, "invalid", "path is the volume's root, a directory")
    with _parent(root, parts) as fd:
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(400, "invalid", f"path {path!r} is not a regular file")
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)


async def _run(fn: Any, path: str, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except OSError as e:
        raise _os_error(e, path) from e


@router.get("/volumecontent/{volume_id}/path")
async def stat_path(volume_id: str, path: str, request: Request) -> JSONResponse:
    cove, _rec, root = await _content(request, volume_id)
    return JSONResponse(await _run(_stat_path, path, cove, root, path))


@router.get("/volumecontent/{volume_id}/dir")
async def list_dir(
    volume_id: str, path: str, request: Request, depth: Annotated[int, Query(ge=1, le=MAX_DEPTH)] = 1
) -> JSONResponse:
    cove, _rec, root = await _content(request, volume_id)
    return JSONResponse(await _run(_list, path, cove, root, path, depth))


@router.post("/volumecontent/{volume_id}/dir", status_code=201)
async def make_dir(
    volume_id: str,
    path: str,
    request: Request,
    uid: Annotated[int | None, Query(ge=0, lt=65536)] = None,
    gid: Annotated[int | None, Query(ge=0, lt=65536)] = None,
    mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None,
    force: bool = False,
) -> JSONResponse:
    cove, _rec, root = await _content(request, volume_id)
    own = Ownership(uid=uid, gid=gid, mode=mode)
    return JSONResponse(await _run(_make_dir, path, cove, root, path, own, force), 201)


@router.patch("/volumecontent/{volume_id}/path")
async def patch_path(volume_id: str, path: str, body: Ownership, request: Request) -> JSONResponse:
    cove, _rec, root = await _content(request, volume_id)
    return JSONResponse(await _run(_patch, path, cove, root, path, body))


@router.delete("/volumecontent/{volume_id}/path", status_code=204)
async def remove_path(volume_id: str, path: str, request: Request) -> Response:
    _, _rec, root = await _content(request, volume_id)
    await _run(_remove, path, root, path)
    return Response(status_code=204)


@router.get("/volumecontent/{volume_id}/file")
async def read_file(volume_id: str, path: str, request: Request) -> StreamingResponse:
    _, _rec, root = await _content(request, volume_id)
    fd = await _run(_open_file, path, root, path)

    async def chunks() -> Any:
        try:
            while data := await asyncio.to_thread(os.read, fd, CHUNK):
                yield data
        finally:
            os.close(fd)

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@router.put("/volumecontent/{volume_id}/file", status_code=201)
async def write_file(
    volume_id: str,
    path: str,
    request: Request,
    uid: Annotated[int | None, Query(ge=0, lt=65536)] = None,
    gid: Annotated[int | None, Query(ge=0, lt=65536)] = None,
    mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None,
    force: bool = False,
) -> JSONResponse:
    """Write a file (replacing one there), atomically: a temporary beside it, renamed into place.
    `force`: make missing parent directories."""
    cove, _rec, root = await _content(request, volume_id)
    parts = _parts(path)
    if not parts:
        raise ApiError(400, "invalid", "path is the volume's root, a directory")
    limit = cove.settings.max_upload_bytes
    tmp = f".{parts[-1][:200]}.e2b-{os.urandom(4).hex()}.tmp"

    def open_tmp() -> tuple[int, int, tuple[int, int]]:
        with _parent(root, [], make=False) as root_fd:
            owner = _owner(cove, uid, gid, root_fd)
        with _parent(root, parts, make=force, owner=owner) as parent:
            dup = os.dup(parent)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dup
        )
        return dup, fd, owner

    parent, fd, owner = await _run(open_tmp, path)
    done = False
    try:
        written = 0
        async for chunk in request.stream():
            written += len(chunk)
            if written > limit:
                raise ApiError(
                    413, "too_large", f"the upload exceeds cove's limit of {limit} bytes per request"
                )
            await _run(_write_all, path, fd, chunk)

        def finish() -> dict[str, Any]:
            os.fchown(fd, *owner)
            os.fchmod(fd, mode if mode is not None else 0o644)
            os.fsync(fd)
            st = (
                os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if _exists(parent, parts[-1])
                else None
            )
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EISDIR, "is a directory")
            os.rename(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            return _entry(cove, parent, parts[-1], _join(parts))

        entry = await _run(finish, path)
        done = True
        return JSONResponse(entry, 201)
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
        os.close(parent)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
