"""The file operations: read, write, list, stat, mkdir, remove and rename.

Each resolves its path as the acting user, whom the handler switches to first (file_op_start), so
the kernel's permission checks apply; with `owner`, it acts as root and gives what it creates to
the owner.
"""

from __future__ import annotations

import errno
import os
import stat

from . import protocol
from .entries import make_entry
from .errors import Disconnected, OpError
from .protocol import CHUNK_SIZE, KIND_DATA, KIND_STDIN
from .request import Conn, field_bool
from .users import OWNER, User, become, give, norm_path, resolve_user

UMASK = 0o022
LIST_LIMIT = 50_000  # keeps a list reply well under protocol.MAX_PAYLOAD


def _xattrs_field(req: dict) -> dict[str, str] | None:
    """A write's `xattrs`: names under `user.` to their values (strings)."""
    value = req.get("xattrs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise OpError("invalid", "xattrs must be an object of names to strings")
    for name, text in value.items():
        if not name.startswith("user.") or len(name) <= 5 or len(name.encode()) > 255 or "\0" in name:
            raise OpError("invalid", f"xattr name {name!r} must be user.NAME (at most 255 bytes)")
        if not isinstance(text, str) or len(text.encode()) > 65536:
            raise OpError("invalid", f"xattr {name!r} must be a string of at most 64 KiB")
    return value


def _set_xattrs(fd: int, xattrs: dict[str, str]) -> None:
    for name, text in xattrs.items():
        try:
            os.setxattr(fd, name, text.encode())
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return  # a file system without user xattrs (e.g. proc): the file is written without them
            raise


def _makedirs(path: str) -> None:
    missing = []
    head = path
    while head not in ("", "/") and not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        # makedirs reports "exists" when a path component is a file; say what is wrong.
        raise OpError("not_a_directory", f"not a directory: {path}") from None
    for created in missing:
        give(created)


def file_op_start(req: dict, field: str = "path") -> tuple[User, str]:
    """Resolve the acting user and the path, and switch to that user. With `owner`, act as root
    (relative paths start in the owner's home) and give created entries to the owner."""
    user = resolve_user(req.get("user"))
    if req.get("owner") is not None:
        owner = resolve_user(req["owner"])
        OWNER[:] = [owner]
        user = resolve_user(0)
        path = norm_path(req.get(field), owner.home)
    else:
        path = norm_path(req.get(field), user.home)
    become(user)
    return (OWNER[0] if OWNER else user), path


def op_read(c: Conn, req: dict) -> dict:
    _, path = file_op_start(req)
    # O_NONBLOCK: opening a FIFO must not hang; it is refused below anyway.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OpError("is_a_directory", f"is a directory: {path}")
        if not stat.S_ISREG(st.st_mode):
            raise OpError("invalid", f"not a regular file: {path}")
        size = 0
        while True:
            data = os.read(fd, CHUNK_SIZE)
            if not data:
                break
            try:
                protocol.send_frame(c.sock, KIND_DATA, data)
            except OSError:
                raise Disconnected() from None
            size += len(data)
    finally:
        os.close(fd)
    return {"size": size}


def op_write(c: Conn, req: dict) -> dict:
    mode = req.get("mode")
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise OpError("invalid", "mode must be an integer between 0 and 0o7777")
    xattrs = _xattrs_field(req)
    _, path = file_op_start(req)
    target = path
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        # Write through a symlink, as a shell redirection would.
        target = os.path.realpath(path)
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OpError("is_a_directory", f"is a directory: {target}")
    parent = os.path.dirname(target)
    _makedirs(parent)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.cove-{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    done = False
    try:
        if st is None:
            give(tmp, fd)
        else:
            # Replacing keeps the file's owner, as writing in place would.
            try:  # noqa: SIM105 (contextlib costs the agent an import)
                os.fchown(fd, st.st_uid, st.st_gid)
            except PermissionError:
                pass
        while True:
            try:
                frame = protocol.recv_frame(c.sock)
            except (OSError, protocol.ProtocolError):
                frame = None
            if frame is None:
                raise Disconnected()
            kind, payload = frame
            if kind != KIND_STDIN:
                raise OpError("invalid", f"unexpected frame {kind!r} during write")
            if not payload:
                c.input_open = False
                break
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        if xattrs:
            _set_xattrs(fd, xattrs)  # before fchmod: setting them needs write permission
        if mode is None:
            mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~UMASK
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        done = True
    finally:
        if fd >= 0:
            os.close(fd)
        if not done:
            try:  # noqa: SIM105
                os.unlink(tmp)
            except OSError:
                pass
    return {"entry": make_entry(target, xattrs=xattrs is not None)}


def op_list(c: Conn, req: dict) -> dict:
    depth = req.get("depth")
    if depth is None:
        depth = 1
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise OpError("invalid", "depth must be an integer >= 1")
    xattrs = field_bool(req, "xattrs")
    _, top = file_op_start(req)
    entries: list[dict] = []

    def walk(directory: str, level: int) -> None:
        with os.scandir(directory) as it:
            items = list(it)
        for item in items:
            path = directory.rstrip("/") + "/" + item.name
            try:
                entries.append(make_entry(path, item.stat(follow_symlinks=False), xattrs))
            except FileNotFoundError:  # removed while we list
                continue
            if len(entries) > LIST_LIMIT:
                raise OpError("too_large", f"more than {LIST_LIMIT} entries; list with a smaller depth")
            if level < depth and item.is_dir(follow_symlinks=False):
                try:  # noqa: SIM105
                    walk(path, level + 1)
                except OSError:
                    pass  # an unreadable subdirectory is listed but not descended into

    walk(top, 1)
    entries.sort(key=lambda e: e["path"])
    return {"entries": entries}


def op_stat(c: Conn, req: dict) -> dict:
    xattrs = field_bool(req, "xattrs")
    _, path = file_op_start(req)
    return {"entry": make_entry(path, xattrs=xattrs)}


def op_mkdir(c: Conn, req: dict) -> dict:
    xattrs = field_bool(req, "xattrs")
    _, path = file_op_start(req)
    try:
        os.mkdir(path)
        give(path)
        created = True
    except FileExistsError:
        if not os.path.isdir(path):
            raise OpError("exists", f"exists and is not a directory: {path}") from None
        created = False
    except FileNotFoundError:
        _makedirs(path)
        created = True
    return {"entry": make_entry(path, xattrs=xattrs), "created": created}


def _rmtree(path: str) -> None:
    with os.scandir(path) as it:
        items = list(it)
    for item in items:
        if item.is_dir(follow_symlinks=False):
            _rmtree(item.path)
        else:
            os.unlink(item.path)
    os.rmdir(path)


def op_remove(c: Conn, req: dict) -> dict:
    recursive = field_bool(req, "recursive")
    _, path = file_op_start(req)
    if path == "/":
        raise OpError("invalid", "refusing to remove /")
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        if recursive:
            _rmtree(path)
        else:
            try:
                os.rmdir(path)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OpError("not_empty", f"directory not empty: {path} (use recursive)") from None
                raise
    else:
        os.unlink(path)  # a symlink is removed, not followed
    return {}


def op_rename(c: Conn, req: dict) -> dict:
    xattrs = field_bool(req, "xattrs")
    user, src = file_op_start(req, "src")
    dst = norm_path(req.get("dst"), user.home)
    st = os.lstat(src)
    _makedirs(os.path.dirname(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Across file systems (e.g. into a tmpfs): copy, then remove. Rare, so shutil loads here.
        import shutil

        if stat.S_ISDIR(st.st_mode):
            if os.path.lexists(dst):
                raise OpError("exists", f"destination exists: {dst}") from None
            shutil.copytree(src, dst, symlinks=True)
            _rmtree(src)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
            os.unlink(src)
    return {"entry": make_entry(dst, xattrs=xattrs)}
