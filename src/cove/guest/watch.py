"""`watch`: a directory's changes (create, write, remove, rename), from inotify, streamed as events
until the host stops watching or the directory is removed."""

from __future__ import annotations

import errno
import os
import select
import stat
import sys

from . import protocol
from .errors import Disconnected, OpError
from .files import file_op_start
from .protocol import KIND_JSON
from .request import Conn, field_bool

IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
WATCH_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
RENAME_PAIR_WAIT = 0.02  # how long a move-out waits for its move-in before it counts as a removal


class Watcher:
    def __init__(self, c: Conn, recursive: bool) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.c = c
        self.recursive = recursive
        self.paths: dict[int, str] = {}
        self.moved: dict[int, tuple[str, bool]] = {}  # cookie -> moved-out path, not yet paired
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise self.error("inotify_init1")

    def error(self, what: str) -> OSError:
        err = self.ctypes.get_errno()
        return OSError(err, os.strerror(err), what)

    def add(self, path: str) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            raise self.error(path)
        self.paths[wd] = path
        return wd

    def add_tree(self, path: str, report: bool) -> None:
        """Watch the subdirectories of `path` (watched already); `report`: announce their entries
        as created (they appeared before their directory's watch could see them)."""
        try:
            with os.scandir(path) as it:
                items = list(it)
        except OSError:
            return
        for item in items:
            full = path.rstrip("/") + "/" + item.name
            is_dir = item.is_dir(follow_symlinks=False)
            if report:  # `found`: it was there when its directory's watch began, maybe written already
                self.send({"event": "watch", "type": "create", "path": full, "is_dir": is_dir, "found": True})
            if is_dir:
                try:
                    self.add(full)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise OpError("too_large", "too many directories to watch (inotify limit)") from None
                    continue
                self.add_tree(full, report)

    def forget_tree(self, path: str) -> None:
        for wd, p in list(self.paths.items()):
            if p == path or p.startswith(path + "/"):
                self.libc.inotify_rm_watch(self.fd, wd)
                del self.paths[wd]

    def send(self, obj: dict) -> None:
        try:
            protocol.send_frame(self.c.sock, KIND_JSON, protocol.dumps(obj).encode("utf-8", "replace"))
        except OSError:
            raise Disconnected() from None

    def flush_moved(self) -> None:
        """Moves out of the watched tree, unpaired: the entry is gone from it."""
        for path, is_dir in self.moved.values():
            self.send({"event": "watch", "type": "remove", "path": path, "is_dir": is_dir})
            if is_dir and self.recursive:
                self.forget_tree(path)
        self.moved.clear()

    def handle(self, buf: bytes, root_wd: int) -> bool:
        """Report the events in `buf`; False once the watched directory itself is gone."""
        pos = 0
        order = sys.byteorder
        while pos + 16 <= len(buf):
            wd = int.from_bytes(buf[pos : pos + 4], order, signed=True)
            mask = int.from_bytes(buf[pos + 4 : pos + 8], order)
            cookie = int.from_bytes(buf[pos + 8 : pos + 12], order)
            length = int.from_bytes(buf[pos + 12 : pos + 16], order)
            name = os.fsdecode(buf[pos + 16 : pos + 16 + length].rstrip(b"\0"))
            pos += 16 + length
            if mask & IN_Q_OVERFLOW:
                self.send({"event": "overflow"})
                continue
            if mask & IN_IGNORED:
                self.paths.pop(wd, None)
                if wd == root_wd:
                    return False
                continue
            base = self.paths.get(wd)
            if base is None or not name:
                continue
            path = base.rstrip("/") + "/" + name
            is_dir = bool(mask & IN_ISDIR)
            if mask & IN_MOVED_FROM:
                self.moved[cookie] = (path, is_dir)
                continue
            if mask & IN_MOVED_TO and cookie in self.moved:
                old, _ = self.moved.pop(cookie)
                self.send(
                    {"event": "watch", "type": "rename", "path": path, "is_dir": is_dir, "old_path": old}
                )
                if is_dir and self.recursive:
                    for w, p in list(self.paths.items()):
                        if p == old or p.startswith(old + "/"):
                            self.paths[w] = path + p[len(old) :]
                continue
            if mask & (IN_CREATE | IN_MOVED_TO):
                self.send({"event": "watch", "type": "create", "path": path, "is_dir": is_dir})
                if is_dir and self.recursive:
                    try:
                        self.add(path)
                    except OSError:
                        continue
                    self.add_tree(path, report=True)
            elif mask & IN_DELETE:
                self.send({"event": "watch", "type": "remove", "path": path, "is_dir": is_dir})
            elif mask & IN_CLOSE_WRITE:
                self.send({"event": "watch", "type": "write", "path": path, "is_dir": is_dir})
        return True


def op_watch(c: Conn, req: dict) -> dict | None:
    recursive = field_bool(req, "recursive")
    _, root = file_op_start(req)
    if not stat.S_ISDIR(os.stat(root).st_mode):
        raise OpError("not_a_directory", f"not a directory: {root}")
    w = Watcher(c, recursive)
    try:
        try:
            root_wd = w.add(root)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OpError("too_large", "too many watches (inotify limit)") from None
            raise
        if recursive:
            w.add_tree(root, report=False)
        w.send({"event": "watching"})
        conn_fd = c.sock.fileno()
        poller = select.poll()
        poller.register(w.fd, select.POLLIN)
        poller.register(conn_fd, select.POLLIN)
        while True:
            events = poller.poll(RENAME_PAIR_WAIT * 1000 if w.moved else None)
            if not events:
                w.flush_moved()
            for fd, _ in events:
                if fd == conn_fd:
                    try:
                        data = c.sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return None  # the host stopped watching
                else:
                    try:
                        buf = os.read(w.fd, 256 * 1024)
                    except BlockingIOError:
                        continue
                    if not w.handle(buf, root_wd):
                        w.flush_moved()
                        return {}  # the watched directory was removed
    finally:
        os.close(w.fd)
