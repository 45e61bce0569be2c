"""envd's `filesystem.Filesystem` Connect service on cove's guest agent.

Stat, MakeDir, Move, ListDir and Remove are one guest call each. WatchDir streams the guest's
inotify watch; the polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher, used by the
sync SDK) keep such a watch running in the server and buffer its events (see `Watchers`).
Entries read as envd gives them: Go's permission string, absolute symlink targets, and the file's
`user.e2b.*` extended attributes as `metadata`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cove.node.guest_client import GuestError, GuestUnavailable

from . import connect, fsops
from .connect import ConnectError, Context
from .fsops import EnvdError, Session
from .proto import filesystem_pb2 as pb
from .routing import target

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

SERVICE = "/filesystem.Filesystem/"
_TYPES = {"file": pb.FILE_TYPE_FILE, "dir": pb.FILE_TYPE_DIRECTORY, "symlink": pb.FILE_TYPE_SYMLINK}
# Go's os.FileMode letters for what is not a plain file (envd prints modes with Go).
_GO_KIND = {"d": "d", "l": "L", "p": "p", "s": "S", "c": "Dc", "b": "D"}
# The guest agent writes an upload to `.NAME.cove-XXXXXXXX.tmp` beside it and renames it into place.
_UPLOAD_TMP = re.compile(r"^\.(.+)\.cove-[0-9a-f]{8}\.tmp$")

WATCHERS_PER_SANDBOX = 64
WATCHER_EVENTS = 10_000  # buffered per polling watcher; older events are dropped beyond it
WATCHER_IDLE = 600.0  # a polling watcher nobody asked for events this long is removed


def _go_permissions(entry: dict[str, Any]) -> str:
    mode = entry["mode"]
    letters = _GO_KIND.get(entry["permissions"][:1], "")
    if mode & stat.S_ISUID:
        letters += "u"
    if mode & stat.S_ISGID:
        letters += "g"
    if mode & stat.S_ISVTX:
        letters += "t"
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return (letters or "-") + bits


def entry_info(entry: dict[str, Any]) -> pb.EntryInfo:
    """A guest entry (with `xattrs`) as envd's EntryInfo."""
    info = pb.EntryInfo(
        name=entry["name"],
        type=_TYPES.get(entry["type"], pb.FILE_TYPE_UNSPECIFIED),
        path=entry["path"],
        size=entry["size"],
        mode=entry["mode"] & 0o777,
        permissions=_go_permissions(entry),
        owner=entry["owner"],
        group=entry["group"],
        is_symlink=entry["type"] == "symlink",
    )
    info.modified_time.FromNanoseconds(round(entry["mtime"] * 1e9))
    if entry.get("symlink_target") is not None:
        link = entry["symlink_target"]
        info.symlink_target = os.path.normpath(os.path.join(os.path.dirname(entry["path"]), link))
    info.metadata.update(fsops.metadata_of(entry))
    return info


def _raise(err: EnvdError) -> ConnectError:
    return ConnectError(err.code, err.message)


@dataclass
class _Call:
    """One RPC's sandbox session and acting user."""

    s: Session
    user: str

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        try:
            return await self.s.call(op, owner=self.user, **fields)
        except EnvdError as err:
            raise _raise(err) from err


async def _open(cove: Cove, ctx: Context) -> _Call:
    try:
        user = fsops.basic_user(ctx.headers)
        s = await fsops.session(cove, target(ctx.scope))
    except EnvdError as err:
        raise _raise(err) from err
    return _Call(s, user or s.rec.user)


def _path(value: str) -> str:
    if not value:
        raise ConnectError("invalid_argument", "path must not be empty")
    return fsops.guest_path(value)


# --- watching --------------------------------------------------------------------------------


def _events(root: str, event: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """envd's (name relative to the watched dir, event type) for one guest watch event."""
    kind = event.get("type")

    def rel(path: str) -> str:
        return os.path.relpath(path, root)

    path = event.get("path", "")
    tmp = _UPLOAD_TMP.match(os.path.basename(path))
    if kind == "rename":
        old = event.get("old_path", "")
        if _UPLOAD_TMP.match(os.path.basename(old)):
            # An upload landing: envd writes in place, which it reports as created and written.
            yield rel(path), pb.EVENT_TYPE_CREATE
            yield rel(path), pb.EVENT_TYPE_WRITE
            return
        yield rel(old), pb.EVENT_TYPE_RENAME
        yield rel(path), pb.EVENT_TYPE_CREATE
    elif tmp is None and kind in ("create", "write", "remove"):
        types = {"create": pb.EVENT_TYPE_CREATE, "write": pb.EVENT_TYPE_WRITE, "remove": pb.EVENT_TYPE_REMOVE}
        yield rel(path), types[kind]
        if kind == "create" and event.get("found") and not event.get("is_dir"):
            # Already there when its new directory's watch began: its writes went unseen.
            yield rel(path), pb.EVENT_TYPE_WRITE


async def _watch(c: _Call, path: str, recursive: bool) -> tuple[str, AsyncIterator[dict[str, Any]]]:
    """Start a guest watch; returns the watched directory's absolute path and the event stream
    (already past its "watching" event, so the watch is in place)."""
    root = (await c.call("stat", path=path))["entry"]["path"]  # absolute: events are named relative to it
    stream = c.s.guest.watch(root, recursive=recursive, owner=c.user)
    try:
        await anext(stream)
    except (GuestError, GuestUnavailable) as exc:
        await stream.aclose()  # type: ignore[attr-defined]
        raise _raise(await c.s.failed(exc)) from exc
    except StopAsyncIteration:
        raise ConnectError("not_found", f"the directory {root} went away") from None
    return root, stream


async def _event_message(c: _Call, root: str, name: str, kind: int, include: bool) -> pb.FilesystemEvent:
    ev = pb.FilesystemEvent(name=name, type=kind)
    if include and kind != pb.EVENT_TYPE_REMOVE:
        with contextlib.suppress(GuestError, GuestUnavailable, EnvdError):
            reply = await c.s.guest.call("stat", path=os.path.join(root, name), owner=c.user, xattrs=True)
            ev.entry.CopyFrom(entry_info(reply["entry"]))
    return ev


async def _filesystem_events(
    c: _Call, root: str, stream: AsyncIterator[dict[str, Any]], include: bool
) -> AsyncIterator[pb.FilesystemEvent]:
    try:
        async for event in stream:
            if event.get("event") != "watch":
                continue  # overflow: envd has no event for lost events
            for name, kind in _events(root, event):
                yield await _event_message(c, root, name, kind, include)
    except (GuestError, GuestUnavailable) as exc:
        raise _raise(await c.s.failed(exc)) from exc
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


@dataclass
class _Watcher:
    sandbox_id: str
    task: asyncio.Task[None] | None = None
    events: deque[pb.FilesystemEvent] = field(default_factory=lambda: deque(maxlen=WATCHER_EVENTS))
    polled: float = field(default_factory=time.monotonic)
    error: ConnectError | None = None


class Watchers:
    """Polling watchers in server memory: at most WATCHERS_PER_SANDBOX per sandbox, each removed
    by RemoveWatcher, after WATCHER_IDLE seconds without a poll, or once its sandbox is gone."""

    def __init__(self, cove: Cove) -> None:
        self.cove = cove
        self.all: dict[str, _Watcher] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def create(self, c: _Call, path: str, recursive: bool, include: bool) -> str:
        await self.sweep()
        sid = c.s.rec.id
        if sum(w.sandbox_id == sid for w in self.all.values()) >= WATCHERS_PER_SANDBOX:
            raise ConnectError(
                "failed_precondition", f"too many watchers ({WATCHERS_PER_SANDBOX}); remove some first"
            )
        root, stream = await _watch(c, path, recursive)
        wid = secrets.token_hex(8)
        w = _Watcher(sid)
        w.task = asyncio.create_task(self._run(w, _filesystem_events(c, root, stream, include)))
        self.all[wid] = w
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_forever())
        return wid

    @staticmethod
    async def _run(w: _Watcher, events: AsyncIterator[pb.FilesystemEvent]) -> None:
        try:
            async for ev in events:
                w.events.append(ev)
        except ConnectError as exc:
            w.error = exc

    def _get(self, wid: str, sandbox_id: str) -> _Watcher:
        w = self.all.get(wid)
        if w is None or w.sandbox_id != sandbox_id:
            raise ConnectError("not_found", f"watcher with id {wid} not found")
        return w

    def take(self, wid: str, sandbox_id: str) -> list[pb.FilesystemEvent]:
        w = self._get(wid, sandbox_id)
        w.polled = time.monotonic()
        events = list(w.events)
        w.events.clear()
        if not events and w.error is not None:
            raise w.error
        return events

    async def remove(self, wid: str, sandbox_id: str) -> None:
        w = self._get(wid, sandbox_id)
        del self.all[wid]
        await self._stop(w)

    @staticmethod
    async def _stop(w: _Watcher) -> None:
        if w.task is not None and not w.task.done():
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w.task

    async def sweep(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.all.items()):
            stale = now - w.polled > WATCHER_IDLE
            if stale or (w.task is not None and w.task.done() and not await self._live(w.sandbox_id)):
                self.all.pop(wid, None)
                await self._stop(w)

    async def _live(self, sandbox_id: str) -> bool:
        rec = await self.cove.service.lookup(sandbox_id)
        return rec is not None and rec.state in ("running", "paused", "hibernated")

    async def _sweep_forever(self) -> None:
        while self.all:
            await asyncio.sleep(30)
            await self.sweep()


# --- the service -----------------------------------------------------------------------------


def methods(cove: Cove) -> dict[str, connect.Method]:
    watchers = Watchers(cove)

    async def stat_(req: pb.StatRequest, ctx: Context) -> pb.StatResponse:
        c = await _open(cove, ctx)
        reply = await c.call("stat", path=_path(req.path), xattrs=True)
        return pb.StatResponse(entry=entry_info(reply["entry"]))

    async def make_dir(req: pb.MakeDirRequest, ctx: Context) -> pb.MakeDirResponse:
        c = await _open(cove, ctx)
        try:
            reply = await c.call("mkdir", path=_path(req.path), xattrs=True)
        except ConnectError as exc:
            if exc.code == "already_exists":  # the guest's "exists": a file is in the way
                raise ConnectError(
                    "invalid_argument", f"path already exists but is not a directory: {exc.message}"
                ) from None
            raise
        if not reply["created"]:
            raise ConnectError("already_exists", f"directory already exists: {reply['entry']['path']}")
        return pb.MakeDirResponse(entry=entry_info(reply["entry"]))

    async def move(req: pb.MoveRequest, ctx: Context) -> pb.MoveResponse:
        c = await _open(cove, ctx)
        reply = await c.call("rename", src=_path(req.source), dst=_path(req.destination), xattrs=True)
        return pb.MoveResponse(entry=entry_info(reply["entry"]))

    async def list_dir(req: pb.ListDirRequest, ctx: Context) -> pb.ListDirResponse:
        c = await _open(cove, ctx)
        reply = await c.call("list", path=_path(req.path), depth=req.depth or 1, xattrs=True)
        return pb.ListDirResponse(entries=[entry_info(e) for e in reply["entries"]])

    async def remove(req: pb.RemoveRequest, ctx: Context) -> pb.RemoveResponse:
        c = await _open(cove, ctx)
        try:
            await c.call("remove", path=_path(req.path), recursive=True)
        except ConnectError as exc:
            if exc.code != "not_found":  # envd removes like `rm -rf`: nothing there is fine
                raise
        return pb.RemoveResponse()

    async def watch_dir(req: pb.WatchDirRequest, ctx: Context) -> AsyncIterator[pb.WatchDirResponse]:
        c = await _open(cove, ctx)
        root, stream = await _watch(c, _path(req.path), req.recursive)
        yield pb.WatchDirResponse(start=pb.WatchDirResponse.StartEvent())
        async for ev in _filesystem_events(c, root, stream, req.include_entry):
            yield pb.WatchDirResponse(filesystem=ev)

    async def create_watcher(req: pb.CreateWatcherRequest, ctx: Context) -> pb.CreateWatcherResponse:
        c = await _open(cove, ctx)
        wid = await watchers.create(c, _path(req.path), req.recursive, req.include_entry)
        return pb.CreateWatcherResponse(watcher_id=wid)

    async def get_watcher_events(
        req: pb.GetWatcherEventsRequest, ctx: Context
    ) -> pb.GetWatcherEventsResponse:
        events = watchers.take(req.watcher_id, target(ctx.scope).sandbox.id)
        return pb.GetWatcherEventsResponse(events=events)

    async def remove_watcher(req: pb.RemoveWatcherRequest, ctx: Context) -> pb.RemoveWatcherResponse:
        await watchers.remove(req.watcher_id, target(ctx.scope).sandbox.id)
        return pb.RemoveWatcherResponse()

    keepalive = lambda: pb.WatchDirResponse(keepalive=pb.WatchDirResponse.KeepAlive())  # noqa: E731
    return {
        SERVICE + "Stat": connect.unary(pb.StatRequest, pb.StatResponse, stat_),
        SERVICE + "MakeDir": connect.unary(pb.MakeDirRequest, pb.MakeDirResponse, make_dir),
        SERVICE + "Move": connect.unary(pb.MoveRequest, pb.MoveResponse, move),
        SERVICE + "ListDir": connect.unary(pb.ListDirRequest, pb.ListDirResponse, list_dir),
        SERVICE + "Remove": connect.unary(pb.RemoveRequest, pb.RemoveResponse, remove),
        SERVICE + "WatchDir": connect.server_stream(
            pb.WatchDirRequest, pb.WatchDirResponse, watch_dir, keepalive=keepalive
        ),
        SERVICE + "CreateWatcher": connect.unary(
            pb.CreateWatcherRequest, pb.CreateWatcherResponse, create_watcher
        ),
        SERVICE + "GetWatcherEvents": connect.unary(
            pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse, get_watcher_events
        ),
        SERVICE + "RemoveWatcher": connect.unary(
            pb.RemoveWatcherRequest, pb.RemoveWatcherResponse, remove_watcher
        ),
    }
