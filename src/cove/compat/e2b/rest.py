"""e2b's control-plane REST API on cove: sandboxes, pause/connect, forks, snapshots, metrics.

Paths, field names and status codes are those the `e2b` SDK's generated client uses (2.x), plus
the older paths of the same line (`POST /sandboxes`, `/sandboxes/{id}/connect`, `.../resume`).
Callers authenticate with `X-API-KEY` (or `Authorization: Bearer`) = a cove API key; sandboxes
belong to its tenant and another tenant's are 404. Errors have e2b's shape `{"code", "message"}`;
bad input is a 400, which the SDK raises as its argument error.

How e2b's model maps onto cove's:
- e2b "paused" = cove `paused` or `hibernated`. `pause` hibernates (CRIU keeps the processes'
  memory where the node can checkpoint) and stops the timeout; `connect` resumes and restarts it.
- `autoPause` = `on_timeout="hibernate"` (`"hibernate_files"` with `autoPauseMemory: false`);
  `autoResume.enabled` = cove's `auto_resume` (off unless asked: a paused e2b sandbox does not
  wake on traffic).
- snapshot ids double as template ids, so `Sandbox.create(snapshot_id)` starts from a snapshot.
- network settings are recorded in the sandbox's `network` and returned; `allow_internet_access`,
  `allowOut` and `denyOut` become cove's egress policy, enforced by its proxy (docs/network.md).
"""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cove.controlplane import auth
from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.schemas import CreateSandbox
from cove.store.base import SandboxRecord, SnapshotRecord

from . import rest_models as m
from .routing import ENVD_VERSION, envd_token, traffic_token

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

CLIENT_ID = "cove"  # e2b's node id field; one server here
# e2b's names for what cove's base template provides (user `user`, /home/user, python3, kernels).
# e2b's template names that are cove's base template (which has python, sudo and mcp-gateway).
BASE_ALIASES = frozenset({"base", "code-interpreter-v1", "code-interpreter", "code-interpreter-beta", "mcp-gateway"})
_E2B_STATES = {"running": ("starting", "running"), "paused": ("paused", "hibernated")}
_NEVER = "9999-12-31T23:59:59Z"  # endAt of a sandbox without a timeout (e2b always has one)
_MIB = 1 << 20


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status)


def _describe(errors: Any) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            where, msg = "body", "malformed JSON"
        parts.append(f"{where or 'body'}: {msg}")
    return "; ".join(parts) or "invalid request"


class E2bRoute(APIRoute):
    """Answers errors in e2b's shape (`{"code", "message"}`), whatever the rest of cove does."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                return _error(400, f"Error when parsing request: {_describe(e.errors())}")
            except ValidationError as e:
                return _error(400, _describe(e.errors()))
            except ApiError as e:
                return _error(400 if e.status == 422 else e.status, e.message)
            except StarletteHTTPException as e:
                return _error(e.status_code, str(e.detail))

        return route


router = APIRouter(tags=["e2b"], route_class=E2bRoute)
Who = Annotated[Caller, Depends(auth.caller)]


def _cove(request: Request) -> Cove:
    return request.app.state.cove


# -- shapes ---------------------------------------------------------------------------------
def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _e2b_state(rec: SandboxRecord) -> str:
    return "paused" if rec.state in _E2B_STATES["paused"] else "running"


def _end_at(rec: SandboxRecord) -> str:
    if rec.expires_at is not None:
        return _iso(rec.expires_at)
    if rec.state in _E2B_STATES["paused"]:
        return _iso(rec.updated_at)  # as e2b reports a paused sandbox: when it stopped
    return _NEVER


def _cpus(rec: SandboxRecord) -> int:
    cpu = rec.limits.get("cpu")
    return max(1, math.ceil(cpu)) if cpu else os.cpu_count() or 1


def _disk_mb(cove: Cove, rec: SandboxRecord) -> int:
    if rec.limits.get("disk_mb"):
        return int(rec.limits["disk_mb"])
    # No quota: the sandbox can fill the storage it lives on.
    for path in (cove.settings.storage_dir, cove.settings.home):
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        return st.f_blocks * st.f_frsize // _MIB
    return 0


def _created(cove: Cove, rec: SandboxRecord) -> dict[str, Any]:
    """e2b's `Sandbox`: what create, connect and fork answer."""
    return {
        "sandboxID": rec.id,
        "templateID": rec.template,
        "alias": rec.template,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": envd_token(cove, rec.id),
        "trafficAccessToken": traffic_token(cove, rec.id),
        "domain": cove.settings.public_domain,
    }


def _listed(cove: Cove, rec: SandboxRecord) -> dict[str, Any]:
    return {
        "sandboxID": rec.id,
        "templateID": rec.template,
        "alias": rec.template,
        "clientID": CLIENT_ID,
        "startedAt": _iso(rec.created_at),
        "endAt": _end_at(rec),
        "cpuCount": _cpus(rec),
        "memoryMB": int(rec.limits.get("memory_mb") or cove.settings.default_memory_mb),
        "diskSizeMB": _disk_mb(cove, rec),
        "state": _e2b_state(rec),
        "envdVersion": ENVD_VERSION,
        "metadata": rec.metadata,
        "volumeMounts": [{"name": v["name"], "path": v["path"]} for v in rec.mounts if v["type"] == "volume"],
    }


def _detail(cove: Cove, rec: SandboxRecord) -> dict[str, Any]:
    return {
        **_listed(cove, rec),
        "envdAccessToken": envd_token(cove, rec.id),
        "domain": cove.settings.public_domain,
        "allowInternetAccess": rec.network.get("allow_internet_access"),
        "network": m.network_out(rec.network),
        "lifecycle": {
            "autoResume": rec.auto_resume,
            "onTimeout": "kill" if rec.on_timeout == "kill" else "pause",
        },
    }


# -- lookups ---------------------------------------------------------------------------------
async def _live(cove: Cove, who: Caller, sandbox_id: str) -> SandboxRecord:
    """The caller's sandbox while it exists for e2b (running or paused); else 404."""
    rec = await cove.service.get(who, sandbox_id)
    if rec.state not in ("starting", "running", *_E2B_STATES["paused"]):
        raise not_found("sandbox", sandbox_id)
    return rec


def _refs(ref: str) -> list[str]:
    """A template reference without its namespace (`team/name`), then also without its tag."""
    ref = ref.rsplit("/", 1)[-1]
    bare = ref.split(":", 1)[0]
    return [ref] if bare == ref else [ref, bare]


async def _find_snapshot(cove: Cove, who: Caller, ref: str) -> SnapshotRecord | None:
    """A snapshot by id, else the newest one with that name."""
    snaps = await cove.snapshots.list(who)
    for candidate in _refs(ref):
        for snap in snaps:
            if snap.id == candidate:
                return snap
        named = [s for s in snaps if s.name == candidate]
        if named:
            return max(named, key=lambda s: s.created_at)
    return None


async def _source(cove: Cove, who: Caller, template_id: str) -> dict[str, str]:
    """CreateSandbox's fields for an e2b template id: cove's base template, a cove template, or a
    snapshot."""
    if any(r in BASE_ALIASES for r in _refs(template_id)):
        return {}
    for ref in _refs(template_id):  # a template built with cove (docs/templates.md), or its tag
        if await cove.service.sources.template(who, ref) is not None:
            return {"template": ref}
    snap = await _find_snapshot(cove, who, template_id)
    if snap is None:
        raise ApiError(404, "template_not_found", f"template '{template_id}' not found")
    return {"snapshot": snap.id}


def _seconds(timeout: int) -> int:
    # e2b's 0 means "expire now"; cove's 0 means "never", so the shortest cove timeout stands in.
    return timeout or 1


async def _extend(cove: Cove, who: Caller, rec: SandboxRecord, timeout: int) -> SandboxRecord:
    """Move the sandbox's end to `timeout` seconds from now, only if that is later (e2b's keep-alive)."""
    if rec.expires_at is not None and time.time() + timeout > rec.expires_at:
        return await cove.service.set_timeout(who, rec.id, _seconds(timeout))
    return rec


def _running_only(rec: SandboxRecord) -> None:
    if rec.state in _E2B_STATES["paused"]:
        raise ApiError(409, "paused", f"sandbox {rec.id} is paused; connect to it to resume it")


SNAPSHOT_EVERY = "cove:snapshot_every"  # e2b has no field for it: a metadata key (docs/e2b.md)


def _snapshot_every(metadata: dict[str, str]) -> int:
    """Periodic copies to the object store (docs/object-storage.md), asked through metadata."""
    value = metadata.get(SNAPSHOT_EVERY)
    if value is None:
        return 0
    try:
        every = int(value)
    except ValueError:
        raise ApiError(
            400, "invalid_metadata", f"{SNAPSHOT_EVERY}: expected seconds, got {value[:40]!r}"
        ) from None
    if every != 0 and not 30 <= every <= 30 * 86400:
        raise ApiError(
            400, "invalid_metadata", f"{SNAPSHOT_EVERY}: 0 (off) or 30 to 2592000 seconds, got {every}"
        )
    return every


# -- create, list, inspect, kill ---------------------------------------------------------------
@router.post("/v2/sandboxes", status_code=201)
@router.post("/sandboxes", status_code=201)
async def create_sandbox(body: m.NewSandbox, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    if body.iam:
        raise ApiError(400, "unsupported", "iam is not supported by cove yet")
    # `mcp`: the SDK itself starts the gateway in the new sandbox (/opt/cove/bin/mcp-gateway).
    source = await _source(cove, who, body.template_id)
    req = CreateSandbox(
        **source,
        snapshot_every=_snapshot_every(body.metadata or {}),
        volumes=[{"name": v.name, "path": v.path} for v in body.volume_mounts or []],
        env=body.env_vars or {},
        metadata=body.metadata or {},
        timeout=None if body.timeout is None else _seconds(body.timeout),
        auto_resume=bool(body.auto_resume and body.auto_resume.enabled),
        on_timeout=_on_timeout(body.auto_pause, body.auto_pause_memory),
    )
    rec = await cove.service.create(
        who, req, network=m.network_record(body.network, body.allow_internet_access)
    )
    return JSONResponse(_created(cove, rec), 201)


def _on_timeout(auto_pause: bool | None, memory: bool | None) -> str:
    """cove's on_timeout for e2b's autoPause (memory unless autoPauseMemory is false: the SDK's
    `lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}`)."""
    if not auto_pause:
        return "kill"
    return "hibernate_files" if memory is False else "hibernate"


def _parse_metadata(query: str | None) -> dict[str, str]:
    """The SDK's filter: `key=value&...`, each part percent-encoded, the whole encoded again."""
    out: dict[str, str] = {}
    if not query:
        return out
    for pair in unquote_plus(query).split("&"):
        key, sep, value = pair.partition("=")
        if not sep or not key or "=" in value:
            raise ApiError(400, "invalid", f"metadata: invalid key=value pair {pair!r}")
        out[unquote_plus(key)] = unquote_plus(value)
    return out


def _parse_states(state: str | None) -> list[str]:
    wanted = [s for s in (state or "").split(",") if s] or list(_E2B_STATES)
    out: list[str] = []
    for s in wanted:
        if s not in _E2B_STATES:
            raise ApiError(400, "invalid", f"state: expected running or paused, got {s!r}")
        out.extend(_E2B_STATES[s])
    return out


def _encode_token(created_at: float, ident: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at!r}|{ident}".encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        when, _, ident = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
        return float(when), ident
    except (ValueError, UnicodeError) as e:
        raise ApiError(400, "invalid", "nextToken: not a token this server issued") from e


def _page(
    items: list[Any], key: Callable[[Any], tuple[float, str]], limit: int, token: str | None, desc: bool
) -> tuple[list[Any], dict[str, str]]:
    """One page by (time, id), and the `x-next-token` header the SDK's paginator reads."""
    items = sorted(items, key=key, reverse=desc)
    if token:
        after = _decode_token(token)
        items = [i for i in items if (key(i) < after if desc else key(i) > after)]
    page = items[:limit]
    headers = {"x-next-token": _encode_token(*key(page[-1]))} if len(items) > limit else {}
    return page, headers


@router.get("/v2/sandboxes")
async def list_sandboxes(
    request: Request,
    who: Who,
    metadata: str | None = None,
    state: str | None = None,
    order: str | None = None,
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    template: str | None = None,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    cove = _cove(request)
    if order not in (None, "asc", "desc"):
        raise ApiError(400, "invalid", f"order: expected asc or desc, got {order!r}")
    found = await cove.service.list(who, _parse_states(state), _parse_metadata(metadata), 1_000_000, None)
    items = found.items
    if template:
        items = [r for r in items if r.template in _refs(template)]
    if started_after is not None:
        since = (started_after if started_after.tzinfo else started_after.astimezone()).timestamp()
        items = [r for r in items if r.created_at >= since]
    page, headers = _page(items, lambda r: (r.created_at, r.id), limit, next_token, order == "desc")
    return JSONResponse([_listed(cove, r) for r in page], headers=headers)


@router.get("/sandboxes")
async def list_running_sandboxes(request: Request, who: Who, metadata: str | None = None) -> JSONResponse:
    """The v1 list: running sandboxes only, one page."""
    cove = _cove(request)
    found = await cove.service.list(
        who, list(_E2B_STATES["running"]), _parse_metadata(metadata), 1_000_000, None
    )
    return JSONResponse([_listed(cove, r) for r in sorted(found.items, key=lambda r: r.created_at)])


# -- metrics (registered before /sandboxes/{id}) -------------------------------------------
_METRIC_KEYS = ("timestamp", "cpuCount", "cpuUsedPct", "memUsed", "memTotal", "memCache", "diskUsed", "diskTotal")


def _metric(point: dict[str, Any]) -> dict[str, Any]:
    """A point of cove's usage history (`controlplane/usage.py`) in e2b's shape."""
    return {**{k: point[k] for k in _METRIC_KEYS}, "timestampUnix": int(point["timestampUnix"])}


async def _history(cove: Cove, rec: SandboxRecord, since: float | None = None) -> list[dict[str, Any]]:
    """The sandbox's kept usage points (a live one is sampled when it has no recent point)."""
    return [_metric(p) for p in await cove.usage.points(rec, since)]


@router.get("/sandboxes/metrics")
async def many_metrics(
    request: Request, who: Who, sandbox_ids: Annotated[str, Query(max_length=100_000)] = ""
) -> JSONResponse:
    cove = _cove(request)
    ids = [i for i in sandbox_ids.split(",") if i]
    if len(ids) > 100:
        raise ApiError(400, "invalid", "sandbox_ids: at most 100 sandboxes at a time")
    out: dict[str, Any] = {}
    for sandbox_id in ids:
        try:
            rec = await cove.service.get(who, sandbox_id)
        except ApiError:
            continue  # unknown ids (and other tenants') are left out, as e2b does
        points = await _history(cove, rec)
        if points:
            out[sandbox_id] = points[-1]  # e2b's list-metrics gives each sandbox's latest
    return JSONResponse({"sandboxes": out})


@router.get("/sandboxes/{sandbox_id}/metrics")
async def sandbox_metrics(
    sandbox_id: str,
    request: Request,
    who: Who,
    start: Annotated[int | None, Query(ge=0)] = None,
    end: Annotated[int | None, Query(ge=0)] = None,
) -> JSONResponse:
    """The sandbox's usage history (the points this server kept, every 5 s while someone watches,
    docs/console.md), oldest first, those in [start, end] (unix seconds) if given."""
    cove = _cove(request)
    rec = await _live(cove, who, sandbox_id)
    points = await _history(cove, rec, None if start is None else start - 1)
    return JSONResponse([p for p in points if end is None or p["timestampUnix"] <= end])


@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, request: Request, who: Who) -> JSONResponse:
    cove = _cove(request)
    return JSONResponse(_detail(cove, await _live(cove, who, sandbox_id)))


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, request: Request, who: Who) -> Response:
    cove = _cove(request)
    await _live(cove, who, sandbox_id)  # a sandbox that already ended is a 404 (the SDK: False)
    await cove.service.kill(who, sandbox_id)
    return Response(status_code=204)


# -- timeouts ------------------------------------------------------------------------------------
@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, body: m.TimeoutRequest, request: Request, who: Who) -> Response:
    """End the sandbox `timeout` seconds from now (shorter or longer than before)."""
    cove = _cove(request)
    rec = await _live(cove, who, sandbox_id)
    _running_only(rec)
    await cove.service.set_timeout(who, rec.id, _seconds(body.timeout))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
async def refresh(
    sandbox_id: str, request: Request, who: Who, body: m.RefreshRequest | None = None
) -> Response:
    """Keep the sandbox alive `duration` seconds from now (never shortens it)."""
    cove = _cove(request)
    rec = await _live(cove, who, sandbox_id)
    _running_only(rec)
    duration = body.duration if body and body.duration is not None else rec.timeout
    await _extend(cove, who, rec, duration or cove.settings.default_timeout)
    return Response(status_code=204)


# -- pause and connect ---------------------------------------------------------------------------
@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(sandbox_id: str, request: Request, who: Who, body: m.PauseRequest | None = None) -> Response:
    """Pause keeping memory: cove hibernates (CRIU). A paused sandbox has no timeout running."""
    cove = _cove(request)
    rec = await _live(cove, who, sandbox_id)
    if rec.state in _E2B_STATES["paused"]:
        raise ApiError(409, "conflict", f"Error pausing sandbox - sandbox '{sandbox_id}' is already paused")
    if rec.state != "running":
        raise ApiError(
            409, "conflict", f"Sandbox '{sandbox_id}' cannot be paused while in '{rec.state}' state"
        )
    # Paused e2b sandboxes wait for connect: no timeout runs while they sleep. mode=filesystem
    # keeps only the files.
    memory = body is None or body.memory is not False
    await cove.service.hibernate(who, sandbox_id, memory=memory, stop_clock=True)
    return Response(status_code=204)


async def _connect(
    cove: Cove, who: Caller, sandbox_id: str, timeout: int | None, memory: bool | None
) -> JSONResponse:
    """Resume a paused sandbox (201) or keep a running one alive (200); both restart its timeout."""
    rec = await _live(cove, who, sandbox_id)
    if rec.state not in _E2B_STATES["paused"]:
        if timeout is not None:
            rec = await _extend(cove, who, rec, timeout)
        return JSONResponse(_created(cove, rec), 200)
    rec = await cove.service.resume(who, sandbox_id, memory=memory is not False)  # False: on_resume=reboot
    seconds = timeout if timeout is not None else rec.timeout or cove.settings.default_timeout
    rec = await cove.service.set_timeout(who, rec.id, _seconds(seconds))
    return JSONResponse(_created(cove, rec), 201)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
async def connect_v2(
    sandbox_id: str, request: Request, who: Who, body: m.ConnectSandbox | None = None
) -> JSONResponse:
    body = body or m.ConnectSandbox()
    return await _connect(_cove(request), who, sandbox_id, body.timeout, body.memory)


@router.post("/sandboxes/{sandbox_id}/connect")
async def connect_v1(
    sandbox_id: str, request: Request, who: Who, body: m.ConnectSandbox | None = None
) -> JSONResponse:
    body = body or m.ConnectSandbox()
    return await _connect(_cove(request), who, sandbox_id, body.timeout, body.memory)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
async def resume(
    sandbox_id: str, request: Request, who: Who, body: m.ResumeSandbox | None = None
) -> JSONResponse:
    """The older resume: only for a paused sandbox (409 when it runs)."""
    cove = _cove(request)
    body = body or m.ResumeSandbox()
    rec = await _live(cove, who, sandbox_id)
    if rec.state not in _E2B_STATES["paused"]:
        raise ApiError(409, "conflict", f"sandbox {sandbox_id} is already running")
    if body.auto_pause is not None:
        await cove.service.set_timeout(who, rec.id, None, _on_timeout(body.auto_pause, None))
    return await _connect(cove, who, sandbox_id, body.timeout, None)


# -- forks and snapshots -------------------------------------------------------------------------
@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
async def fork(
    sandbox_id: str, request: Request, who: Who, body: m.ForkRequest | None = None
) -> JSONResponse:
    """`count` sandboxes that continue from this instant of the source (its memory too, with CRIU)."""
    cove = _cove(request)
    body = body or m.ForkRequest()
    await _live(cove, who, sandbox_id)
    # Children keep the source's network settings and timeout behaviour, as e2b's do.
    children, _memory = await cove.snapshots.fork(who, sandbox_id, body.count, {})
    out = []
    for child in children:
        if body.timeout is not None:
            child = await cove.service.set_timeout(who, child.id, _seconds(body.timeout))
        out.append({"sandbox": _created(cove, child)})
    return JSONResponse(out, 201)


def _snapshot_info(snap: SnapshotRecord) -> dict[str, Any]:
    return {"snapshotID": snap.id, "names": [snap.name] if snap.name else []}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def create_snapshot(
    sandbox_id: str, request: Request, who: Who, body: m.SnapshotRequest | None = None
) -> JSONResponse:
    """A snapshot that new sandboxes start from (`templateID` = its id); with memory by default
    where the node can checkpoint and the sandbox has processes, as e2b's default is a full one."""
    cove = _cove(request)
    body = body or m.SnapshotRequest()
    rec = await _live(cove, who, sandbox_id)
    if body.memory and not cove.service.can_checkpoint(rec):
        raise ApiError(
            400, "memory_unavailable", "memory snapshots need CRIU >= 4.1 on the node; use mode='filesystem'"
        )
    memory = body.memory
    if memory is None:
        memory = cove.service.can_checkpoint(rec) and rec.state in ("running", "paused")
    snap = await cove.snapshots.take(who, sandbox_id, body.name, memory)
    return JSONResponse(_snapshot_info(snap), 201)


@router.get("/snapshots")
async def list_snapshots(
    request: Request,
    who: Who,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> JSONResponse:
    cove = _cove(request)
    if sandbox_id and name:
        raise ApiError(400, "invalid", "filter by sandboxID or by name, not both")
    snaps = await cove.snapshots.list(who)
    if sandbox_id:
        snaps = [s for s in snaps if s.sandbox_id == sandbox_id]
    if name:
        refs = _refs(name)
        snaps = [s for s in snaps if s.name in refs or s.id in refs]
    page, headers = _page(snaps, lambda s: (s.created_at, s.id), limit, next_token, desc=False)
    return JSONResponse([_snapshot_info(s) for s in page], headers=headers)


@router.delete("/templates/{template_id:path}", status_code=204)
async def delete_template(template_id: str, request: Request, who: Who) -> Response:
    """Delete a cove template or a snapshot (e2b names snapshots as templates). Sandboxes started
    from it keep running."""
    cove = _cove(request)
    if any(r in BASE_ALIASES for r in _refs(template_id)):
        raise ApiError(400, "invalid", f"'{template_id}' is cove's built-in template; it cannot be deleted")
    for ref in _refs(template_id):  # a template built with cove (or through e2b's Template.build)
        if await cove.service.sources.template(who, ref) is not None:
            await cove.templates.delete(who, ref)
            return Response(status_code=204)
    snap = await _find_snapshot(cove, who, template_id)
    if snap is None:
        raise ApiError(404, "template_not_found", f"template '{template_id}' not found")
    await cove.snapshots.delete(who, snap.id)
    return Response(status_code=204)


# -- network ---------------------------------------------------------------------------------------
_EGRESS = (
    *("allow_out", "deny_out", "dns_servers", "egress_proxy", "rules", "allow_internet_access"),
    *("mode", "allow", "deny"),  # cove's policy, derived from the ones above
)


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(sandbox_id: str, body: m.NetworkUpdate, request: Request, who: Who) -> Response:
    """Replace the sandbox's egress settings (omitted ones are cleared, as e2b does); new
    connections follow them at once."""
    cove = _cove(request)
    rec = await _live(cove, who, sandbox_id)

    def change(current: dict[str, Any]) -> dict[str, Any]:
        kept = {k: v for k, v in current.items() if k not in _EGRESS}
        return m.network_record(body, body.allow_internet_access, base=kept)

    await cove.service.set_network(who, rec.id, change)
    return Response(status_code=204)


# -- what cove does not serve ------------------------------------------------------------------
# e2b's API paths (its OpenAPI spec) that no route above serves: answered in e2b's error shape with
# a message that says so, never a bare 404. Registered after every e2b router (__init__.py).
unserved = APIRouter(tags=["e2b"], route_class=E2bRoute)
_E2B_PREFIXES = (
    "sandboxes", "v2/sandboxes", "templates", "v2/templates", "v3/templates", "default-templates",
    "secrets", "snapshots", "volumes", "volumecontent", "teams", "api-keys", "access-tokens",
)  # fmt: skip


async def not_served(request: Request) -> JSONResponse:
    return _error(
        501,
        f"cove does not serve e2b's {request.method} {request.url.path} (docs/e2b.md lists what it serves)",
    )


for _prefix in _E2B_PREFIXES:
    for _path in (f"/{_prefix}", f"/{_prefix}/{{rest:path}}"):
        unserved.add_api_route(
            _path, not_served, methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
        )
