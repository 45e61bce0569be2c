"""cove guest agent: serves docs/guest-protocol.md inside a sandbox, as its pid 1.

In a sandbox it is entered without an exec: the launcher, which has this module imported, clones
itself into the sandbox's namespaces and calls main() (launcher.py). A root with its own /usr runs it
as ``python3 -I -S /run/cove/agent.pyc`` with ``protocol.pyc`` beside it. Standard library only. The
start path imports C modules (``_socket``, ``_signal``, ``select``) instead of
their Python wrappers, which would pull in ``enum``/``re`` and double the start-up time (for the
same reason it spells out try/except/pass: ``contextlib`` alone costs ~9 ms to import).

Design: the main process only accepts connections, forks one handler child per connection and reaps
every child and orphan (SIGCHLD + wakeup fd). A handler serves its connection's operations one at a
time with plain blocking code and exits when the host closes it, so a slow or crashing operation
never stalls the agent. It switches to the requested user for an operation and back to root after
it (its saved ids stay root: see become and restore_root).

Test mode (outside a sandbox): ``agent.py --socket PATH [--config FILE]``.
"""

from __future__ import annotations

import _signal
import _socket
import errno
import gc
import grp
import os
import pwd
import select
import stat
import sys
import time

if __package__:
    from . import protocol
else:  # run as a script: -I leaves the script's directory off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import protocol

KIND_JSON = protocol.KIND_JSON
KIND_STDIN = protocol.KIND_STDIN
KIND_STDOUT = protocol.KIND_STDOUT
KIND_STDERR = protocol.KIND_STDERR
KIND_DATA = protocol.KIND_DATA
CHUNK = protocol.CHUNK_SIZE

CONFIG_PATH = "/run/cove/config.json"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UMASK = 0o022
LIST_LIMIT = 50_000  # keeps a list reply well under protocol.MAX_PAYLOAD
STDIN_HIGH_WATER = 4 * 1024 * 1024  # stop reading the host while this much stdin is unread
EXIT_IDLE = 0.1  # after the command exits: stop once its pipes are quiet this long...
EXIT_GRACE = 1.0  # ...or after this long, if a background process keeps them open
SPARES = 1  # pre-forked handler waiting for the next connection (each costs ~1 MB of private memory)
SPARE_DELAY = 0.25  # a taken spare is replaced this much later (at once if a connection needs one)
LINGER = 10.0  # how long to drain host input we will not use, before closing (see linger())

CONFIG: dict = {"env": {}, "user": None, "workdir": None}
CONFIG_FILE = [CONFIG_PATH, None]  # the file read, and its (inode, mtime, size) when read
MAIN_PID = os.getpid()

_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.ENOTEMPTY: "not_empty",
    errno.EINVAL: "invalid",
    errno.ENAMETOOLONG: "invalid",
    errno.ELOOP: "invalid",
    errno.EFBIG: "too_large",
    errno.ENOSPC: "too_large",
    errno.EDQUOT: "too_large",
}


class OpError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Disconnected(Exception):
    """The host went away mid-operation: there is nobody to reply to."""


def os_error(exc: OSError) -> OpError:
    code = _ERRNO_CODES.get(exc.errno or 0, "internal")
    text = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
    if exc.filename is not None:
        text = f"{text}: {exc.filename}"
        if exc.filename2 is not None:
            text = f"{text} -> {exc.filename2}"
    return OpError(code, text)


class Conn:
    """The host connection of one handler; ``input_open`` = the host may still send frames."""

    __slots__ = ("input_open", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.input_open = False


# --- users and paths ------------------------------------------------------------------------


class User:
    __slots__ = ("gid", "home", "known", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str, known: bool) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home
        self.known = known


def resolve_user(spec: object) -> User:
    """A user by name or uid, looked up in the sandbox's own /etc/passwd."""
    if spec is None or spec == "":
        spec = CONFIG["user"]
        if spec is None or spec == "":
            spec = os.geteuid()
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise OpError("invalid", "user must be a name or a uid")
    if isinstance(spec, int) or spec.isdigit():
        uid = int(spec)
        if not 0 <= uid < 2**32 - 1:  # (uid_t)-1 means "unchanged" to the kernel
            raise OpError("invalid", f"uid {uid} is out of range")
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            # Like `docker exec --user 1234`: an unnamed uid is allowed.
            return User(str(uid), uid, uid, "/", False)
    else:
        try:
            pw = pwd.getpwnam(spec)
        except KeyError:
            raise OpError("invalid", f"unknown user {spec!r}") from None
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/", True)


def become(user: User) -> None:
    """Switch this process to ``user`` (groups, gid, uid), so kernel permission checks apply."""
    euid = os.geteuid()
    if euid != 0:
        if user.uid == euid:
            return
        raise OpError(
            "permission_denied", f"cannot act as user {user.name!r}: the agent does not run as root"
        )
    if not ROOT_GROUPS:
        ROOT_GROUPS.append(os.getgroups())
    groups = os.getgrouplist(user.name, user.gid) if user.known else [user.gid]
    try:
        os.setgroups(groups)
    except PermissionError:
        # In a user namespace with setgroups denied we cannot change them; that is only safe when
        # we hold no other supplementary group.
        if set(os.getgroups()) - {user.gid}:
            raise
    # The saved ids stay root, so a handler can return to root for its connection's next request
    # (restore_root). The kernel clears the effective capabilities meanwhile, and a command the
    # handler starts gets the user's ids as all three (execve copies the effective id to the saved).
    os.setresgid(user.gid, user.gid, 0)
    os.setresuid(user.uid, user.uid, 0)


ROOT_GROUPS: list[list[int]] = []  # a handler's supplementary groups before its first switch


def restore_root() -> bool:
    """Undo become() after an operation, so the handler can serve the next one; False if it cannot."""
    if ROOT_GROUPS:
        try:
            if os.geteuid() != 0:
                os.setresuid(0, 0, 0)  # first: it restores the capabilities the rest needs
            os.setresgid(0, 0, 0)
            if os.getgroups() != ROOT_GROUPS[0]:
                os.setgroups(ROOT_GROUPS[0])
        except OSError:
            return False
    _OWNER.clear()
    try:
        os.chdir("/")
    except OSError:
        return False
    return not ROOT_GROUPS or os.geteuid() == 0


def norm_path(path: object, home: str) -> str:
    if not isinstance(path, str) or not path:
        raise OpError("invalid", "path must be a non-empty string")
    if "\0" in path:
        raise OpError("invalid", "path contains a NUL byte")
    full = os.path.normpath(os.path.join(home, path))
    if full.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it); we do not need it
        full = "/" + full.lstrip("/")
    return full


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def make_entry(path: str, st: os.stat_result | None = None, xattrs: bool = False) -> dict:
    if st is None:
        st = os.lstat(path)
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
    entry = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "permissions": stat.filemode(st.st_mode),
        "owner": _user_name(st.st_uid),
        "group": _group_name(st.st_gid),
        "mtime": st.st_mtime,
        "symlink_target": os.readlink(path) if kind == "symlink" else None,
    }
    if xattrs:
        entry["xattrs"] = user_xattrs(path)
    return entry


def user_xattrs(path: str) -> dict[str, str]:
    """The entry's extended attributes in the `user.` namespace (a symlink's own, not its target's);
    {} where the file system has none."""
    found: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return found
    for name in names:
        if name.startswith("user."):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "replace")
            except OSError:
                continue  # removed meanwhile
    return found


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


def _field_bool(req: dict, name: str) -> bool:
    value = req.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpError("invalid", f"{name} must be a boolean")
    return value


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
        _give(created)


# The user whose files an operation with an `owner` creates: it runs with root's permissions and
# hands what it creates to this user (how e2b's envd works). None: entries keep the acting user's ids.
_OWNER: list[User] = []


def _give(path: str, fd: int | None = None) -> None:
    if _OWNER:
        if fd is not None:
            os.fchown(fd, _OWNER[0].uid, _OWNER[0].gid)
        else:
            os.lchown(path, _OWNER[0].uid, _OWNER[0].gid)


# --- file operations (the handler has already switched to the user) ---------------------------


def _file_op_start(req: dict, field: str = "path") -> tuple[User, str]:
    """Resolve the acting user and the path, and switch to that user. With `owner`, act as root
    (relative paths start in the owner's home) and give created entries to the owner."""
    user = resolve_user(req.get("user"))
    if req.get("owner") is not None:
        owner = resolve_user(req["owner"])
        _OWNER[:] = [owner]
        user = resolve_user(0)
        path = norm_path(req.get(field), owner.home)
    else:
        path = norm_path(req.get(field), user.home)
    become(user)
    return (_OWNER[0] if _OWNER else user), path


def op_ping(c: Conn, req: dict) -> dict:
    return {"pid": MAIN_PID, "version": protocol.VERSION}


def op_read(c: Conn, req: dict) -> dict:
    _, path = _file_op_start(req)
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
            data = os.read(fd, CHUNK)
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
    _, path = _file_op_start(req)
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
            _give(tmp, fd)
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
    xattrs = _field_bool(req, "xattrs")
    _, top = _file_op_start(req)
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
    xattrs = _field_bool(req, "xattrs")
    _, path = _file_op_start(req)
    return {"entry": make_entry(path, xattrs=xattrs)}


def op_mkdir(c: Conn, req: dict) -> dict:
    xattrs = _field_bool(req, "xattrs")
    _, path = _file_op_start(req)
    try:
        os.mkdir(path)
        _give(path)
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
    recursive = _field_bool(req, "recursive")
    _, path = _file_op_start(req)
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
    xattrs = _field_bool(req, "xattrs")
    user, src = _file_op_start(req, "src")
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


# --- exec -------------------------------------------------------------------------------------


def _noop_handler(signum: int, frame: object) -> None:
    pass  # the C-level handler already wrote to the wakeup fd; that is all we need


def build_env(user: User, extra: object) -> dict[str, str]:
    env = {
        "PATH": BASE_PATH,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": "/bin/bash",
        "LANG": "C.UTF-8",
    }
    env.update(CONFIG["env"])
    if extra is None:
        return env
    if not isinstance(extra, dict):
        raise OpError("invalid", "env must be an object of strings")
    for key, value in extra.items():
        if not key or "=" in key or "\0" in key:
            raise OpError("invalid", f"invalid environment variable name {key!r}")
        if value is None:  # null unsets a variable from the defaults
            env.pop(key, None)
        elif isinstance(value, str) and "\0" not in value:
            env[key] = value
        else:
            raise OpError("invalid", f"env value for {key} must be a string")
    return env


def _spawn(
    argv: list[str], shell: bool, user: User, cwd: str, env: dict[str, str], fds: tuple[int, int, int]
) -> int:
    """Start the command in its own session with posix_spawn (vfork: no copy of this process).

    The handler process is throwaway, so it switches to the user and cwd itself first; posix_spawn
    cannot. Raises OpError for a bad cwd and SpawnFailed when the program cannot be executed.
    """
    in_r, out_w, err_w = fds
    try:  # user commands should be the OOM killer's choice, not the agent
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("0")
    except OSError:
        pass
    become(user)
    try:
        os.chdir(cwd)
    except FileNotFoundError:
        raise OpError("not_found", f"working directory does not exist: {cwd}") from None
    except NotADirectoryError:
        raise OpError("not_a_directory", f"working directory is not a directory: {cwd}") from None
    except PermissionError:
        raise OpError("permission_denied", f"working directory is not accessible: {cwd}") from None
    # posix_spawnp searches the caller's PATH, not the one in `env`.
    os.environ["PATH"] = env.get("PATH", BASE_PATH)
    stdin = (
        (os.POSIX_SPAWN_DUP2, in_r, 0) if in_r >= 0 else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)
    )
    actions = [stdin, (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    # Python ignores SIGPIPE/SIGXFSZ; ignored dispositions survive exec, so restore them.
    sigdef = (_signal.SIGCHLD, _signal.SIGPIPE, _signal.SIGXFSZ)
    try:
        return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=sigdef)
    except OSError as exc:
        if shell and exc.errno == errno.ENOENT:  # a template without bash still has sh
            try:
                return os.posix_spawn(
                    "/bin/sh",
                    ["/bin/sh", *argv[1:]],
                    env,
                    file_actions=actions,
                    setsid=True,
                    setsigdef=sigdef,
                )
            except OSError:
                pass
        if exc.errno == errno.ENOENT and "/" not in argv[0]:
            raise SpawnFailed(127, f"{argv[0]}: command not found\n") from None
        raise SpawnFailed(127 if exc.errno == errno.ENOENT else 126, f"{argv[0]}: {exc.strerror}\n") from None


class SpawnFailed(Exception):
    """The program could not be executed: reported like a shell does (exit 126/127 + stderr)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)  # like a shell reports it
    return os.WEXITSTATUS(status)


def _command_argv(req: dict) -> tuple[list[str], bool]:
    """The argv of an exec/spawn request (``cmd`` runs through bash) and whether it is a shell string."""
    argv = req.get("argv")
    cmd = req.get("cmd")
    if (argv is None) == (cmd is None):
        raise OpError("invalid", "exactly one of cmd and argv is required")
    shell = cmd is not None
    if shell:
        if not isinstance(cmd, str):
            raise OpError("invalid", "cmd must be a string")
        argv = ["/bin/bash", "-c", cmd]
    elif not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise OpError("invalid", "argv must be a non-empty list of strings")
    if any("\0" in a for a in argv):
        raise OpError("invalid", "argv contains a NUL byte")
    return argv, shell


def _command_context(req: dict) -> tuple[User, str, dict[str, str]]:
    """The user, working directory and environment of an exec/spawn request."""
    user = resolve_user(req.get("user"))
    cwd = req.get("cwd")
    if cwd is None or cwd == "":
        default = CONFIG["workdir"]
        cwd = default if default and user.uid == resolve_user(None).uid else user.home
    cwd = norm_path(cwd, user.home)
    env = build_env(user, req.get("env"))
    return user, cwd, env


def _timeout_field(req: dict) -> float | None:
    timeout = req.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise OpError("invalid", "timeout must be a number of seconds >= 0, or null")
    return timeout


def op_exec(c: Conn, req: dict) -> dict | None:
    argv, shell = _command_argv(req)
    timeout = _timeout_field(req)
    want_stdin = _field_bool(req, "stdin")
    user, cwd, env = _command_context(req)
    return run_command(c, argv, shell, user, cwd, env, timeout or None, want_stdin)


def run_command(
    c: Conn,
    argv: list[str],
    shell: bool,
    user: User,
    cwd: str,
    env: dict[str, str],
    timeout: float | None,
    want_stdin: bool,
) -> dict | None:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if want_stdin else (-1, -1)
    wake_r, wake_w = os.pipe()  # SIGCHLD wakes poll() even while the output pipes stay quiet
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    _signal.signal(_signal.SIGCHLD, _noop_handler)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    try:
        pid = _spawn(argv, shell, user, cwd, env, (in_r, out_w, err_w))
    except SpawnFailed as exc:
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w, wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        _signal.set_wakeup_fd(-1)
        protocol.send_frame(c.sock, KIND_STDERR, exc.message.encode("utf-8", "replace"))
        return {"exit_code": exc.code, "timed_out": False}
    for fd in (out_w, err_w, in_r):
        if fd >= 0:
            os.close(fd)

    sock = c.sock
    conn_fd = sock.fileno()
    outputs = {out_r: KIND_STDOUT, err_r: KIND_STDERR}
    for fd in outputs:
        os.set_blocking(fd, False)
    if in_w >= 0:
        os.set_blocking(in_w, False)
    poller = select.poll()
    for fd in (out_r, err_r, wake_r, conn_fd):
        poller.register(fd, select.POLLIN)
    reading_host = True
    in_registered = False
    inbuf = bytearray()  # unparsed bytes from the host
    stdin_buf = bytearray()  # stdin bytes not yet taken by the command
    stdin_eof = not want_stdin
    connected = True
    timed_out = False
    status: int | None = None
    exited_at = 0.0
    deadline = time.monotonic() + timeout if timeout else None

    def kill_group() -> None:
        try:  # noqa: SIM105
            os.killpg(pid, _signal.SIGKILL)
        except OSError:
            pass

    def host_gone() -> None:
        nonlocal connected, reading_host
        connected = False
        if reading_host:
            poller.unregister(conn_fd)
            reading_host = False
        if status is None:
            kill_group()  # nobody is listening: the command must not run on unattended

    def pump_stdin() -> None:
        nonlocal in_w, in_registered, stdin_eof
        while in_w >= 0 and stdin_buf:
            try:
                n = os.write(in_w, stdin_buf)
            except BlockingIOError:
                break
            except OSError:  # the command closed its stdin: drop what it will never read
                stdin_buf.clear()
                stdin_eof = True
                break
            del stdin_buf[:n]
        if in_w < 0:
            return
        if stdin_eof and not stdin_buf:
            if in_registered:
                poller.unregister(in_w)
            os.close(in_w)
            in_w = -1
        elif stdin_buf and not in_registered:
            poller.register(in_w, select.POLLOUT)
            in_registered = True
        elif not stdin_buf and in_registered:
            poller.unregister(in_w)
            in_registered = False

    try:
        while True:
            now = time.monotonic()
            if status is None:
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    exited_at = now
                    stdin_buf.clear()
                    stdin_eof = True
                    pump_stdin()
            if status is not None and (not outputs or now - exited_at >= EXIT_GRACE):
                break
            if status is not None:
                wait: float | None = min(EXIT_IDLE, exited_at + EXIT_GRACE - now)
            elif deadline is not None and not timed_out:
                wait = max(0.0, deadline - now)
            else:
                wait = None
            # Backpressure: do not buffer unbounded stdin the command does not read.
            if connected and reading_host and len(stdin_buf) > STDIN_HIGH_WATER:
                poller.unregister(conn_fd)
                reading_host = False
            elif connected and not reading_host and len(stdin_buf) <= STDIN_HIGH_WATER:
                poller.register(conn_fd, select.POLLIN)
                reading_host = True
            events = poller.poll(None if wait is None else wait * 1000)
            if not events and status is not None:
                break  # pipes quiet after the exit: whatever holds them is a background process
            for fd, _ in events:
                if fd in outputs:
                    try:
                        data = os.read(fd, CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        poller.unregister(fd)
                        os.close(fd)
                        del outputs[fd]
                    elif connected:
                        try:
                            protocol.send_frame(sock, outputs[fd], data)
                        except OSError:
                            host_gone()
                elif fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif fd == conn_fd and reading_host:
                    try:
                        chunk = sock.recv(256 * 1024)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        host_gone()
                        continue
                    inbuf += chunk
                    try:
                        frames = protocol.parse_frames(inbuf)
                    except protocol.ProtocolError:
                        host_gone()
                        continue
                    for kind, payload in frames:
                        if kind == KIND_STDIN and not stdin_eof:
                            if payload:
                                stdin_buf += payload
                            else:
                                stdin_eof = True
                                c.input_open = False
                    pump_stdin()
                elif fd == in_w:
                    pump_stdin()
            if deadline is not None and status is None and not timed_out and time.monotonic() >= deadline:
                kill_group()
                timed_out = True
    finally:
        _signal.set_wakeup_fd(-1)
        for fd in (*outputs, in_w, wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        if status is None:  # only on an unexpected error: never leave the command running
            kill_group()
            os.waitpid(pid, 0)
    if not connected:
        return None
    return {"exit_code": _exit_code(status), "timed_out": timed_out}


# --- background processes ---------------------------------------------------------------------
# `spawn` forks a supervisor per process (its own session; re-parented to pid 1 when the handler
# exits). The supervisor owns the command, keeps its output in a bounded buffer and serves the
# process's operations on PROCS_DIR/<id>.sock, with <id>.json (the metadata) beside it. The host
# still talks only to the agent socket: the handler of attach/input/... relays to that socket.

PROCS_DIR = "/run/cove/sock/procs"  # test mode: a procs/ directory beside the agent's socket
OUTPUT_LIMIT = 8 * 1024 * 1024  # output kept per process; older bytes are dropped
PROCS_KEEP = 100  # exited processes kept listed (older ones are forgotten on the next spawn)
HOLD_LIMIT = 10.0  # how long a spawn with `hold` waits for its blocking reader before reading on
PROC_RETAIN = 600.0  # a supervisor keeps an exited process's output this long, then only its metadata
PROC_OPS = ("attach", "input", "close_stdin", "signal", "kill", "resize", "wait")
SIGNAL_NAMES = (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGCONT",
    "SIGSTOP", "SIGTSTP", "SIGWINCH",
)  # fmt: skip


def _proc_id(req: dict) -> str:
    proc_id = req.get("id")
    if (
        not isinstance(proc_id, str)
        or not 1 <= len(proc_id) <= 32
        or not all(ch in "0123456789abcdef" for ch in proc_id)
    ):
        raise OpError("invalid", "id must be a process id as returned by spawn")
    return proc_id


def _proc_path(proc_id: str, suffix: str) -> str:
    return f"{PROCS_DIR}/{proc_id}{suffix}"


def _write_meta(meta: dict) -> None:
    path = _proc_path(meta["id"], ".json")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, protocol.dumps(meta).encode("utf-8", "replace"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_meta(proc_id: str) -> dict | None:
    """A process's metadata; a supervisor that died without saying so (killed) means not running."""
    try:
        with open(_proc_path(proc_id, ".json"), "rb") as f:
            meta = protocol.decode_json(f.read())
    except (OSError, protocol.ProtocolError):
        return None
    if meta.get("running"):
        try:
            os.kill(meta.get("supervisor") or 0, 0)
        except ProcessLookupError:
            meta["running"] = False
        except (OSError, TypeError):
            pass
    return meta


_PUBLIC_FIELDS = (
    "id",
    "pid",
    "cmd",
    "argv",
    "tag",
    "pty",
    "running",
    "exit_code",
    "started_at",
    "ended_at",
    "cwd",
    "env",
    "signal",
)


def _all_meta() -> list[dict]:
    try:
        names = os.listdir(PROCS_DIR)
    except FileNotFoundError:
        return []
    metas = []
    for name in names:
        if name.endswith(".json"):
            meta = _read_meta(name[:-5])
            if meta is not None:
                metas.append(meta)
    metas.sort(key=lambda m: m.get("started_at") or 0)
    return metas


def _supervisor_request(proc_id: str, req: dict, timeout: float = 1.0) -> dict | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(_proc_path(proc_id, ".sock"))
        sock.sendall(protocol.encode_json(req))
        frame = protocol.recv_frame(sock)
        return protocol.decode_json(frame[1]) if frame is not None else None
    except (OSError, protocol.ProtocolError):
        return None
    finally:
        sock.close()


def _forget_old_processes() -> None:
    """Keep the newest PROCS_KEEP exited processes; stop the supervisors of older ones."""
    exited = [m for m in _all_meta() if not m.get("running")]
    if len(exited) <= PROCS_KEEP:
        return
    exited.sort(key=lambda m: m.get("ended_at") or 0)
    for meta in exited[: len(exited) - PROCS_KEEP]:
        proc_id = str(meta.get("id"))
        _supervisor_request(proc_id, {"op": "shutdown"})
        for suffix in (".json", ".sock"):
            try:  # noqa: SIM105
                os.unlink(_proc_path(proc_id, suffix))
            except OSError:
                pass


def _pty_size(value: object) -> tuple[int, int] | None:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise OpError("invalid", "pty must be an object {rows, cols} or null")
    return _dimension(value.get("rows", 24), "rows"), _dimension(value.get("cols", 80), "cols")


def _dimension(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise OpError("invalid", f"{name} must be an integer between 1 and 65535")
    return value


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    import _struct
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, _struct.pack("HHHH", rows, cols, 0, 0))


def op_spawn(c: Conn, req: dict) -> dict:
    argv, shell = _command_argv(req)
    want_stdin = _field_bool(req, "stdin")
    hold = _field_bool(req, "hold")
    size = _pty_size(req.get("pty"))
    tag = req.get("tag")
    if tag is not None and (not isinstance(tag, str) or len(tag) > 1024):
        raise OpError("invalid", "tag must be a string of at most 1024 characters")
    user, cwd, env = _command_context(req)
    if size is not None and "TERM" not in env:
        env["TERM"] = "xterm-256color"
    os.makedirs(PROCS_DIR, mode=0o700, exist_ok=True)
    _forget_old_processes()
    while True:
        proc_id = os.urandom(4).hex()
        if not os.path.lexists(_proc_path(proc_id, ".json")):
            break
    meta = {
        "id": proc_id,
        "pid": None,
        "cmd": req.get("cmd"),
        "argv": argv,
        "tag": tag,
        "cwd": req.get("cwd"),  # as requested (e2b lists a process's config as it was given)
        "env": req.get("env") or {},
        "signal": None,  # the signal that ended it, if one did
        "pty": None if size is None else {"rows": size[0], "cols": size[1]},
        "stdin": want_stdin or size is not None,
        "running": True,
        "exit_code": None,
        "started_at": None,
        "ended_at": None,
        "end_offset": None,
        "supervisor": None,
    }
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        try:
            os.close(report_r)
            c.sock.close()
            os.setsid()
            Supervisor(meta, shell, user, cwd, env, size, hold).run(report_w)
        except BaseException:
            _log_exception()
        finally:
            os._exit(0)
    os.close(report_w)
    data = b""
    while chunk := os.read(report_r, 65536):
        data += chunk
    os.close(report_r)
    try:
        report = protocol.decode_json(data)
    except protocol.ProtocolError:
        raise OpError("internal", "the process supervisor failed to start") from None
    if not report.get("ok"):
        raise OpError(str(report.get("code")), str(report.get("message")))
    return {"id": proc_id, "pid": report["pid"]}


def op_list_processes(c: Conn, req: dict) -> dict:
    return {"processes": [{k: m.get(k) for k in _PUBLIC_FIELDS} for m in _all_meta()]}


def op_process(c: Conn, req: dict) -> dict | None:
    """attach/input/close_stdin/signal/kill/resize/wait: relayed to the process's supervisor."""
    proc_id = _proc_id(req)
    sup = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sup.connect(_proc_path(proc_id, ".sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            return _process_gone(c, req, proc_id)
        sup.sendall(protocol.encode_json(req))
        relay(c.sock, sup)
    finally:
        sup.close()
    return None


def _process_gone(c: Conn, req: dict, proc_id: str) -> dict:
    """The supervisor has ended (the output is no longer kept): answer from the metadata."""
    meta = _read_meta(proc_id)
    if meta is None:
        raise OpError("not_found", f"no process {proc_id}")
    op = req["op"]
    end = meta.get("end_offset") or 0
    if op == "wait":
        return {"running": False, "exit_code": meta.get("exit_code")}
    if op == "attach":
        offset = req.get("offset")
        event = {"event": "attached", "offset": end, "truncated": offset is None or 0 <= offset < end}
        protocol.send_frame(c.sock, KIND_JSON, protocol.dumps(event).encode())
        return {"exit_code": meta.get("exit_code"), "end_offset": end}
    if op == "close_stdin":
        return {}
    raise OpError("conflict", f"process {proc_id} has exited")


def relay(host: _socket.socket, sup: _socket.socket) -> None:
    """Copy bytes both ways until the supervisor ends its answer (or the host goes away)."""
    poller = select.poll()
    poller.register(host.fileno(), select.POLLIN)
    poller.register(sup.fileno(), select.POLLIN)
    host_fd = host.fileno()
    while True:
        for fd, _ in poller.poll():
            src, dst = (host, sup) if fd == host_fd else (sup, host)
            try:
                data = src.recv(256 * 1024)
            except OSError:
                data = b""
            if not data:
                if src is host:
                    return  # the host is gone (e.g. it detached): the process is not touched
                sup.close()
                linger(host)
                return
            try:
                dst.sendall(data)
            except OSError:
                if dst is host:
                    return
                # The supervisor stopped reading (its answer is on the way): drop host input.
                poller.unregister(host_fd)


class _Client:
    """One connection to a supervisor (a relaying handler)."""

    __slots__ = ("block", "close_at", "deadline", "inbuf", "out", "pos", "shut", "sock", "state")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.state = "request"  # request | attach | input | wait | closing
        self.inbuf = bytearray()
        self.out = bytearray()
        self.pos = 0  # attach: offset of the next output byte to send
        self.block = False  # attach: hold the process's output back rather than drop what this reader missed
        self.deadline: float | None = None  # wait: when to give up
        self.close_at = 0.0  # closing: when to stop waiting for the peer to close
        self.shut = False


class Supervisor:
    """Owns one background process: its output buffer, stdin, and the clients of its socket."""

    def __init__(
        self,
        meta: dict,
        shell: bool,
        user: User,
        cwd: str,
        env: dict[str, str],
        size: tuple[int, int] | None,
        hold: bool = False,
    ) -> None:
        self.meta = meta
        # Until the first blocking reader attaches (at most HOLD_LIMIT): output is not read, so a
        # reader that attaches right after the spawn misses none of it.
        self.hold_until = time.monotonic() + HOLD_LIMIT if hold else 0.0
        self.id: str = meta["id"]
        self.shell = shell
        self.user = user
        self.cwd = cwd
        self.env = env
        self.size = size
        self.pid = 0
        self.status: int | None = None
        self.exit_code: int | None = None
        self.exited_at = 0.0
        self.done = False  # exited and all output read
        self.done_at = 0.0
        self.chunks: list[list] = []  # [offset, kind, bytearray], merged while the kind repeats
        self.start = 0  # offset of the oldest kept byte
        self.end = 0  # offset after the newest byte
        self.outputs: dict[int, bytes] = {}
        self.in_fd = -1  # stdin pipe or PTY master
        self.master = -1
        self.stdin_buf = bytearray()
        self.stdin_closing = False
        self.clients: list[_Client] = []
        self.shutdown = False

    # -- start

    def run(self, report_w: int) -> None:
        sock_path = _proc_path(self.id, ".sock")
        try:  # noqa: SIM105
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(64)
        listener.setblocking(False)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        _signal.signal(_signal.SIGCHLD, _noop_handler)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self.start_command()
        except (OpError, OSError) as exc:
            err = exc if isinstance(exc, OpError) else os_error(exc)
            os.write(
                report_w, protocol.dumps({"ok": False, "code": err.code, "message": err.message}).encode()
            )
            os.close(report_w)
            listener.close()
            os.unlink(sock_path)
            return
        self.meta.update(pid=self.pid, started_at=time.time(), supervisor=os.getpid())
        _write_meta(self.meta)
        os.write(report_w, protocol.dumps({"ok": True, "pid": self.pid}).encode())
        os.close(report_w)
        try:
            self.loop(listener, wake_r)
        finally:
            try:  # noqa: SIM105
                os.unlink(sock_path)
            except OSError:
                pass
            if self.status is None:
                self.kill(_signal.SIGKILL)

    def start_command(self) -> None:
        mine: list[int] = []  # our ends
        theirs: list[int] = []  # the child's ends, closed here after the fork
        try:
            if self.size is not None:
                master, slave = os.openpty()
                mine.append(master)
                theirs.append(slave)
                _set_winsize(master, *self.size)
                fds = (slave, slave, slave)
                self.master = self.in_fd = master
                self.outputs = {master: KIND_STDOUT}
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                mine += (out_r, err_r)
                theirs += (out_w, err_w)
                in_r = -1
                if self.meta["stdin"]:
                    in_r, self.in_fd = os.pipe()
                    mine.append(self.in_fd)
                    theirs.append(in_r)
                fds = (in_r, out_w, err_w)
                self.outputs = {out_r: KIND_STDOUT, err_r: KIND_STDERR}
            status_r, status_w = os.pipe()
            theirs.append(status_w)
            mine.append(status_r)
            pid = os.fork()
            if pid == 0:
                self._child(fds, status_w)
            for fd in theirs:
                os.close(fd)
            theirs.clear()
            data = b""
            while chunk := os.read(status_r, 4096):
                data += chunk
            os.close(status_r)
            mine.remove(status_r)
            if data:
                os.waitpid(pid, 0)
                code, _, message = data.decode("utf-8", "replace").partition("\n")
                raise OpError(code, message)
        except BaseException:
            for fd in mine + theirs:
                os.close(fd)
            raise
        self.pid = pid
        for fd in mine:
            os.set_blocking(fd, False)

    def _child(self, fds: tuple[int, int, int], status_w: int) -> None:
        """In the forked child: become the command (never returns)."""
        try:
            _signal.set_wakeup_fd(-1)
            # Python ignores SIGPIPE/SIGXFSZ; ignored dispositions survive exec, so restore them.
            for sig in (_signal.SIGCHLD, _signal.SIGPIPE, _signal.SIGXFSZ):
                _signal.signal(sig, _signal.SIG_DFL)
            os.setsid()
            in_fd, out_fd, err_fd = fds
            if self.size is not None:
                import fcntl
                import termios

                fcntl.ioctl(in_fd, termios.TIOCSCTTY, 0)
            if in_fd < 0:
                in_fd = os.open("/dev/null", os.O_RDONLY)
            os.dup2(in_fd, 0)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            try:  # user commands should be the OOM killer's choice, not the agent
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("0")
            except OSError:
                pass
            become(self.user)
            try:
                os.chdir(self.cwd)
            except FileNotFoundError:
                raise OpError("not_found", f"working directory does not exist: {self.cwd}") from None
            except NotADirectoryError:
                raise OpError(
                    "not_a_directory", f"working directory is not a directory: {self.cwd}"
                ) from None
            except PermissionError:
                raise OpError(
                    "permission_denied", f"working directory is not accessible: {self.cwd}"
                ) from None
            argv = self.meta["argv"]
            try:
                os.execvpe(argv[0], argv, self.env)
            except OSError as exc:
                if self.shell and exc.errno == errno.ENOENT:  # a template without bash still has sh
                    try:  # noqa: SIM105
                        os.execve("/bin/sh", ["/bin/sh", *argv[1:]], self.env)
                    except OSError:
                        pass
                if exc.errno == errno.ENOENT and "/" not in argv[0]:
                    message, code = f"{argv[0]}: command not found\n", 127
                else:
                    message, code = f"{argv[0]}: {exc.strerror}\n", 127 if exc.errno == errno.ENOENT else 126
                os.write(2, message.encode("utf-8", "replace"))
                os._exit(code)
        except OpError as exc:
            os.write(status_w, f"{exc.code}\n{exc.message}".encode("utf-8", "replace"))
        except OSError as exc:
            err = os_error(exc)
            os.write(status_w, f"{err.code}\n{err.message}".encode("utf-8", "replace"))
        except BaseException as exc:
            os.write(status_w, f"internal\n{type(exc).__name__}: {exc}".encode("utf-8", "replace"))
        os._exit(127)

    # -- state

    def kill(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            raise OpError("conflict", f"process {self.id} has exited") from None

    def append(self, kind: bytes, data: bytes) -> None:
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last[1] == kind and len(last[2]) < CHUNK:
            last[2] += data
        else:
            self.chunks.append([self.end, kind, bytearray(data)])
        self.end += len(data)
        excess = self.end - self.start - OUTPUT_LIMIT
        while excess > 0:
            first = self.chunks[0]
            size = len(first[2])
            if size <= excess:
                self.chunks.pop(0)
                self.start += size
                excess -= size
            else:
                del first[2][:excess]
                first[0] += excess
                self.start += excess
                excess = 0

    def close_stdin_fd(self) -> None:
        if self.in_fd >= 0 and self.in_fd != self.master:
            os.close(self.in_fd)
        self.in_fd = -1
        self.stdin_buf.clear()

    def pump_stdin(self) -> None:
        while self.in_fd >= 0 and self.stdin_buf:
            try:
                n = os.write(self.in_fd, self.stdin_buf)
            except BlockingIOError:
                break
            except OSError:  # the command closed its stdin: drop what it will never read
                self.close_stdin_fd()
                break
            del self.stdin_buf[:n]
        if self.stdin_closing and not self.stdin_buf and self.in_fd >= 0 and self.in_fd != self.master:
            self.close_stdin_fd()

    def stdin_open(self) -> bool:
        return self.in_fd >= 0 and (self.master >= 0 or not self.stdin_closing)

    def check_exit(self, now: float) -> None:
        if self.status is not None:
            return
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if not pid:
            return
        self.status = status
        self.exit_code = _exit_code(status)
        self.exited_at = now
        self.stdin_buf.clear()
        if self.master < 0:
            self.close_stdin_fd()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        self.meta.update(running=False, exit_code=self.exit_code, signal=sig, ended_at=time.time())
        _write_meta(self.meta)

    def finish(self, now: float) -> None:
        self.done = True
        self.done_at = now
        for fd in self.outputs:
            os.close(fd)
        self.outputs = {}
        self.close_stdin_fd()
        self.master = -1
        self.meta["end_offset"] = self.end
        _write_meta(self.meta)

    # -- clients

    def reply(self, cl: _Client, obj: dict) -> None:
        cl.out += protocol.encode_json(obj)
        cl.state = "closing"
        cl.close_at = time.monotonic() + LINGER

    def drop(self, cl: _Client) -> None:
        cl.sock.close()
        self.clients.remove(cl)

    def fill(self, cl: _Client) -> None:
        """Queue the next frame for an attached client that has sent everything queued so far."""
        if cl.pos < self.start:  # it fell more than OUTPUT_LIMIT behind
            event = {"event": "truncated", "offset": self.start, "dropped": self.start - cl.pos}
            cl.out += protocol.encode_json(event)
            cl.pos = self.start
        elif cl.pos < self.end:
            for offset, kind, data in self.chunks:
                if offset + len(data) > cl.pos:
                    piece = bytes(data[cl.pos - offset : cl.pos - offset + CHUNK])
                    cl.out += protocol.encode_frame(kind, piece)
                    cl.pos += len(piece)
                    break
        elif self.done:
            self.reply(cl, {"ok": True, "exit_code": self.exit_code, "end_offset": self.end})

    def on_request(self, cl: _Client, payload: bytes) -> None:
        try:
            req = protocol.decode_json(payload)
        except protocol.ProtocolError as exc:
            raise OpError("invalid", str(exc)) from None
        op = req.get("op")
        if op == "attach":
            offset = req.get("offset")
            if offset is None:
                offset = self.start
                truncated = self.start > 0
            elif offset == -1:  # live output only, from now on
                offset, truncated = self.end, False
            elif isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise OpError("invalid", "offset must be an integer >= 0, -1 (live output only) or null")
            elif offset > self.end:
                raise OpError("invalid", f"offset {offset} is beyond the end of the output ({self.end})")
            else:
                truncated = offset < self.start
                offset = max(offset, self.start)
            cl.out += protocol.encode_json({"event": "attached", "offset": offset, "truncated": truncated})
            cl.pos = offset
            cl.block = req.get("block") is True
            if cl.block:
                self.hold_until = 0.0  # the reader the spawn waited for
            cl.state = "attach"
        elif op == "input":
            if self.status is not None:
                raise OpError("conflict", f"process {self.id} has exited")
            if not self.stdin_open():
                raise OpError("conflict", f"the stdin of process {self.id} is not open")
            cl.state = "input"
        elif op == "close_stdin":
            if self.master >= 0 and self.status is None:
                self.stdin_buf += b"\x04"  # a terminal has no end of input: send its EOF character
            else:
                self.stdin_closing = True
            self.pump_stdin()
            self.reply(cl, {"ok": True})
        elif op in ("signal", "kill"):
            sig = _signal.SIGKILL if op == "kill" else _signal_number(req.get("signal"))
            self.kill(sig)
            self.reply(cl, {"ok": True})
        elif op == "resize":
            if self.size is None:
                raise OpError("invalid", f"process {self.id} has no terminal")
            rows, cols = _dimension(req.get("rows"), "rows"), _dimension(req.get("cols"), "cols")
            if self.master < 0 or self.status is not None:
                raise OpError("conflict", f"process {self.id} has exited")
            _set_winsize(self.master, rows, cols)
            self.meta["pty"] = {"rows": rows, "cols": cols}
            _write_meta(self.meta)
            self.reply(cl, {"ok": True})
        elif op == "wait":
            timeout = _timeout_field(req)
            cl.state = "wait"
            cl.deadline = None if timeout is None else time.monotonic() + timeout
        elif op == "shutdown":
            self.shutdown = True
            self.reply(cl, {"ok": True})
        else:
            raise OpError("invalid", f"unknown op {op!r}")

    def on_readable(self, cl: _Client) -> None:
        try:
            data = cl.sock.recv(256 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.drop(cl)  # the handler went away: an attach ends, the process is not touched
            return
        if cl.state not in ("request", "input"):
            return  # nothing more is expected: drop it
        cl.inbuf += data
        try:
            try:
                frames = protocol.parse_frames(cl.inbuf)
            except protocol.ProtocolError as exc:
                raise OpError("invalid", str(exc)) from None
            for kind, payload in frames:
                if cl.state == "request":
                    if kind != KIND_JSON:
                        raise OpError("invalid", "expected a J request frame")
                    self.on_request(cl, payload)
                elif cl.state == "input":
                    if kind != KIND_STDIN:
                        raise OpError("invalid", f"unexpected frame {kind!r} during input")
                    if payload:
                        if self.status is None and self.in_fd >= 0:
                            self.stdin_buf += payload
                    elif self.status is not None:
                        raise OpError("conflict", f"process {self.id} has exited")
                    else:
                        self.reply(cl, {"ok": True})
                else:
                    break
        except OpError as exc:
            cl.out.clear()
            self.reply(cl, {"ok": False, "error": {"code": exc.code, "message": exc.message}})
        except OSError as exc:
            err = os_error(exc)
            cl.out.clear()
            self.reply(cl, {"ok": False, "error": {"code": err.code, "message": err.message}})
        self.pump_stdin()

    def on_writable(self, cl: _Client) -> None:
        try:
            n = cl.sock.send(cl.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(cl)
            return
        del cl.out[:n]

    # -- loop

    def loop(self, listener: _socket.socket, wake_r: int) -> None:
        listen_fd = listener.fileno()
        while not self.shutdown:
            now = time.monotonic()
            self.check_exit(now)
            # A blocking reader half the kept window behind: stop reading output (the process's writes
            # block) until it catches up, so it misses nothing.
            held = now < self.hold_until or any(
                cl.block and cl.state == "attach" and self.end - cl.pos >= OUTPUT_LIMIT // 2
                for cl in self.clients
            )
            if (
                self.status is not None
                and not self.done
                and (not self.outputs or (now - self.exited_at >= EXIT_GRACE and not held))
            ):
                self.finish(now)
            if self.done and not self.clients and now - self.done_at >= PROC_RETAIN:
                return
            timeout: float | None = None
            if self.status is not None and not self.done and not held:
                timeout = max(0.0, self.exited_at + EXIT_GRACE - now)
            elif self.done:
                timeout = max(0.0, self.done_at + PROC_RETAIN - now)
            if now < self.hold_until:  # read on at its end even if no reader came
                timeout = self.hold_until - now if timeout is None else min(timeout, self.hold_until - now)
            masks: dict[int, int] = {listen_fd: select.POLLIN, wake_r: select.POLLIN}
            for fd in () if held else self.outputs:
                masks[fd] = select.POLLIN
            if self.in_fd >= 0 and self.stdin_buf:
                masks[self.in_fd] = masks.get(self.in_fd, 0) | select.POLLOUT
            by_fd: dict[int, _Client] = {}
            for cl in list(self.clients):
                if cl.state == "attach" and not cl.out:
                    self.fill(cl)
                elif cl.state == "wait" and (  # done: exited, and its output is all in (or given up on)
                    self.done or (cl.deadline is not None and now >= cl.deadline)
                ):
                    self.reply(cl, {"ok": True, "running": self.status is None, "exit_code": self.exit_code})
                if cl.state == "closing" and not cl.out:
                    if not cl.shut:
                        cl.shut = True
                        try:
                            cl.sock.shutdown(_socket.SHUT_WR)
                        except OSError:
                            self.drop(cl)
                            continue
                    if now >= cl.close_at:
                        self.drop(cl)
                        continue
                mask = select.POLLOUT if cl.out else 0
                if not (cl.state == "input" and len(self.stdin_buf) > STDIN_HIGH_WATER):
                    mask |= select.POLLIN
                fd = cl.sock.fileno()
                masks[fd] = mask
                by_fd[fd] = cl
                deadline = (
                    cl.close_at if cl.state == "closing" else cl.deadline if cl.state == "wait" else None
                )
                if deadline is not None:
                    timeout = max(0.0, deadline - now) if timeout is None else min(timeout, deadline - now)
            poller = select.poll()
            for fd, mask in masks.items():
                poller.register(fd, mask)
            events = poller.poll(None if timeout is None else max(0.0, timeout) * 1000 + 1)
            for fd, ev in events:
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                elif fd == listen_fd:
                    try:
                        conn_fd, _ = listener._accept()
                    except OSError:
                        continue
                    sock = _socket.socket(fileno=conn_fd)
                    sock.setblocking(False)
                    self.clients.append(_Client(sock))
                elif fd in by_fd:
                    cl = by_fd[fd]
                    if ev & select.POLLOUT and cl in self.clients:
                        self.on_writable(cl)
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and cl in self.clients:
                        self.on_readable(cl)
                else:
                    if fd in self.outputs and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self.read_output(fd)
                    if fd == self.in_fd and ev & (select.POLLOUT | select.POLLERR):
                        self.pump_stdin()

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO from a PTY master once no process holds the terminal
            data = b""
        if data:
            self.append(self.outputs[fd], data)
            return
        del self.outputs[fd]
        if fd == self.master:
            self.master = -1
            self.in_fd = -1
            self.stdin_buf.clear()
        os.close(fd)


def _signal_number(value: object) -> int:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in SIGNAL_NAMES:
            return getattr(_signal, name)
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
        return value
    raise OpError("invalid", f"signal must be one of {', '.join(SIGNAL_NAMES)} or a number, not {value!r}")


# --- watch ------------------------------------------------------------------------------------

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
    recursive = _field_bool(req, "recursive")
    _, root = _file_op_start(req)
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


# --- connection handling ----------------------------------------------------------------------

OPS = {
    "ping": op_ping,
    "exec": op_exec,
    "read": op_read,
    "write": op_write,
    "list": op_list,
    "stat": op_stat,
    "mkdir": op_mkdir,
    "remove": op_remove,
    "rename": op_rename,
    "spawn": op_spawn,
    "list_processes": op_list_processes,
    **dict.fromkeys(PROC_OPS, op_process),
    "watch": op_watch,
}


def linger(sock: _socket.socket) -> None:
    """Read and drop host input until it closes, before closing ourselves.

    Closing a unix socket with unread data makes the kernel reset the peer, and an asyncio client
    then loses even the reply it has not read yet; the host closes as soon as it has our reply.
    """
    try:
        sock.shutdown(_socket.SHUT_WR)
        end = time.monotonic() + LINGER
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(256 * 1024):
                break
    except OSError:
        pass


# Operations after which a handler may serve the same connection's next request (see
# "Connections" in docs/guest-protocol.md): each ends with its reply and leaves no state behind.
REUSABLE = frozenset({"ping", "exec", "read", "write", "list", "stat", "mkdir", "remove", "rename"})
IDLE_WAIT = 30.0  # seconds a handler waits for a kept connection's next request (the host's wait is shorter)


def serve_connection(sock: _socket.socket) -> None:
    """Serve the connection's requests: one, or more while each says `reuse` in its reply."""
    while serve_request(sock):
        try:
            if not select.select([sock], [], [], IDLE_WAIT)[0]:
                return
        except OSError:
            return


def serve_request(sock: _socket.socket) -> bool:
    """One request and its reply; True if the handler may serve the connection's next one."""
    c = Conn(sock)
    try:
        frame = protocol.recv_frame(sock)
    except (OSError, protocol.ProtocolError):
        return False
    if frame is None:
        return False
    kind, payload = frame
    op = None
    try:
        if kind != KIND_JSON:
            raise OpError("invalid", "expected a J request frame")
        try:
            req = protocol.decode_json(payload)
        except protocol.ProtocolError as exc:
            raise OpError("invalid", str(exc)) from None
        op = req.get("op")
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            raise OpError("invalid", f"unknown op {op!r}")
        refresh_config()
        c.input_open = op in ("write", "input") or (op == "exec" and req.get("stdin") is True)
        result = handler(c, req)
        if result is None:
            return False
        reply = {"ok": True, **result}
    except Disconnected:
        return False
    except OpError as exc:
        reply = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
    except OSError as exc:
        err = os_error(exc)
        reply = {"ok": False, "error": {"code": err.code, "message": err.message}}
    except (ValueError, TypeError) as exc:  # e.g. an argument the OS refuses
        reply = {"ok": False, "error": {"code": "invalid", "message": str(exc)}}
    except Exception as exc:
        _log_exception()
        reply = {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
    reuse = op in REUSABLE and not c.input_open and restore_root()
    if reuse:
        reply["reuse"] = True
    try:
        sock.sendall(protocol.encode_json(reply))
    except OSError:
        return False
    if c.input_open:
        linger(sock)
    return reuse


def _log_exception() -> None:
    # Tracebacks go to the agent's stderr (the sandbox log), never into a reply.
    import traceback

    traceback.print_exc()


# --- main process -----------------------------------------------------------------------------


def _spare(listener: _socket.socket, taken_w: int, wake: tuple[int, int]) -> None:
    """A pre-forked handler: waits in accept(), tells the main process it was taken, serves, exits.

    Forking before the connection arrives takes the fork off every operation's latency.
    """
    try:
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        os.close(wake[0])
        os.close(wake[1])
        fd, _ = listener._accept()
        os.write(taken_w, os.getpid().to_bytes(4, "little"))
        os.close(taken_w)
        listener.close()
        sock = _socket.socket(fileno=fd)
        sock.setblocking(True)
        serve_connection(sock)
        sock.close()
    except BaseException:
        pass
    finally:
        os._exit(0)


def _refuse(fd: int, exc: OSError) -> None:
    """Tell the host why an operation cannot start (e.g. the sandbox's pid limit is reached)."""
    try:
        sock = _socket.socket(fileno=fd)
        sock.settimeout(1.0)
        message = f"cannot start a handler: {exc.strerror or exc}"
        sock.sendall(protocol.encode_json({"ok": False, "error": {"code": "busy", "message": message}}))
        sock.close()
    except OSError:
        os.close(fd)


def reap() -> list[int]:
    """Collect every exited child (our handlers and orphans re-parented to pid 1)."""
    done = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append(pid)


def serve(listener: _socket.socket, ready_fd: int | None) -> None:
    """Pid 1's loop: keep SPARES handlers waiting in accept(), reap every child and orphan.

    A taken spare is replaced SPARE_DELAY later, or at once when a connection finds none: a fork
    and its copy-on-write faults are most of what a short-lived sandbox's agent costs."""
    listener.setblocking(True)  # shared by the spares, which block in accept()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    taken_r, taken_w = os.pipe()
    os.set_blocking(taken_r, False)
    _signal.signal(_signal.SIGCHLD, _noop_handler)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    _warm_up()  # before forking, so every handler inherits what it loads
    idle: set[int] = set()
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    poller.register(taken_r, select.POLLIN)
    watching_listener = False
    due: float | None = 0.0  # when to fork the next spare; None while there are enough

    def fork_spare() -> bool:
        gc.freeze()  # the collector in a handler then leaves pid 1's objects (and their pages) alone
        try:
            pid = os.fork()
        except OSError:
            gc.unfreeze()
            return False  # e.g. the sandbox's pid limit: retry soon, refuse meanwhile
        if pid == 0:
            _spare(listener, taken_w, (wake_r, wake_w))
        gc.unfreeze()  # pid 1 itself lives on: its garbage must stay collectable
        idle.add(pid)
        return True

    def replace_after(delay: float) -> None:
        """Fork the missing spare `delay` from now, unless one is due sooner."""
        nonlocal due
        if len(idle) < SPARES and due is None:
            due = time.monotonic() + delay

    fork_spare()
    if ready_fd is not None:
        _signal_ready(ready_fd)
    while True:
        try:
            now = time.monotonic()
            if due is not None and now >= due:
                due = None
                if len(idle) < SPARES and not fork_spare():
                    due = now + 0.05
                replace_after(0.0)
            # While no spare waits, pid 1 watches the listener: a connection gets one at once (or,
            # with forks failing, a refusal).
            if not idle and not watching_listener:
                poller.register(listener.fileno(), select.POLLIN)
                watching_listener = True
            elif idle and watching_listener:
                poller.unregister(listener.fileno())
                watching_listener = False
            timeout = None if due is None else max(0, int((due - time.monotonic()) * 1000) + 1)
            for fd, _ in poller.poll(timeout):
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    for pid in reap():
                        idle.discard(pid)  # a spare that died before it was taken
                    replace_after(SPARE_DELAY)
                elif fd == taken_r:
                    refresh_config()  # so the next spare forks with the current config
                    try:
                        while data := os.read(taken_r, 4096):
                            for i in range(0, len(data) - 3, 4):
                                idle.discard(int.from_bytes(data[i : i + 4], "little"))
                    except BlockingIOError:
                        pass
                    replace_after(SPARE_DELAY)
                elif not idle:
                    refresh_config()
                    if not fork_spare():
                        conn_fd, _ = listener._accept()
                        _refuse(
                            conn_fd, OSError(errno.EAGAIN, "no process can be started (pid limit reached?)")
                        )
                        replace_after(0.05)
        except Exception:
            # As pid 1 our exit would end the sandbox: log, and serve on.
            _log_exception()
            time.sleep(0.01)


def _warm_up() -> None:
    """Load glibc's NSS modules now, so that handlers inherit them instead of each loading them.

    getgrouplist() (every user switch) consults every source in nsswitch.conf; loading e.g.
    libnss_systemd in each forked handler cost about a millisecond per operation.
    """
    try:
        user = resolve_user(None)
        if user.known:
            os.getgrouplist(user.name, user.gid)
    except Exception:
        pass


def _signal_ready(fd: int) -> None:
    try:
        os.write(fd, b"ok")
        os.close(fd)
    except OSError:
        pass


def _set_subreaper() -> None:
    """Outside a sandbox we are not pid 1: adopt our commands' orphans ourselves, to reap them."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def load_config(path: str, required: bool) -> None:
    CONFIG_FILE[0] = path
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = protocol.decode_json(f.read())
    except FileNotFoundError:
        if required:
            raise
        return
    CONFIG_FILE[1] = (st.st_ino, st.st_mtime_ns, st.st_size)
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("config env must be an object of strings")
    CONFIG["env"] = env
    CONFIG["user"] = data.get("user")
    CONFIG["workdir"] = data.get("workdir")


def refresh_config() -> None:
    """Re-read the config when the host replaced it: a pooled sandbox is started before anyone
    claims it, and the claim brings its env, user and workdir (docs/pools.md). One stat per call."""
    try:
        st = os.stat(CONFIG_FILE[0])
    except OSError:
        return
    if (st.st_ino, st.st_mtime_ns, st.st_size) == CONFIG_FILE[1]:
        return
    try:
        load_config(CONFIG_FILE[0], required=False)
    except (OSError, ValueError, protocol.ProtocolError):
        return  # half-written or bad: keep the config we have
    ensure_workdir()


def ensure_workdir() -> None:
    """Create the sandbox's working directory if the template lacks it (as Docker's WORKDIR does),
    owned by the sandbox's user, so a sandbox created with a new workdir can run commands at once."""
    workdir = CONFIG["workdir"]
    if not workdir or os.path.isdir(workdir) or os.geteuid() != 0:
        return
    try:
        owner = resolve_user(CONFIG["user"])
        missing = []
        head = os.path.normpath(workdir)
        while head != "/" and not os.path.lexists(head):
            missing.append(head)
            head = os.path.dirname(head)
        os.makedirs(workdir, 0o755, exist_ok=True)
        for created in missing:
            os.chown(created, owner.uid, owner.gid)
    except (OSError, OpError):
        pass  # then commands report the missing directory themselves


def _usage() -> None:
    sys.stderr.write("usage: agent.py [--socket PATH] [--config FILE]\n")
    sys.exit(2)


def main(args: list[str]) -> None:
    socket_path = None
    config_path = None
    i = 0
    while i < len(args):
        if args[i] in ("--socket", "--config") and i + 1 < len(args):
            if args[i] == "--socket":
                socket_path = args[i + 1]
            else:
                config_path = args[i + 1]
            i += 2
        else:
            _usage()
    # fds 0-2 must be taken, or our pipes could land there and be clobbered by dup2 in children.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open("/dev/null", os.O_RDWR)
    global MAIN_PID
    MAIN_PID = os.getpid()  # the module may have been imported by the launcher, before its forks
    os.umask(UMASK)
    load_config(config_path or CONFIG_PATH, required=config_path is not None)
    ensure_workdir()
    # SIG_DFL, not Python's KeyboardInterrupt handler: as pid 1 the kernel then drops these signals
    # sent from inside the sandbox, and in test mode they simply terminate the agent.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)

    if socket_path is not None:
        global PROCS_DIR
        PROCS_DIR = os.path.join(os.path.dirname(os.path.abspath(socket_path)), "procs")
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:  # noqa: SIM105
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        listener.bind(socket_path)
        listener.listen(512)
        if os.getpid() != 1:
            _set_subreaper()
    else:
        fd = os.environ.get("COVE_AGENT_FD")
        if fd is None:
            sys.stderr.write("agent: COVE_AGENT_FD is not set (use --socket PATH outside a sandbox)\n")
            sys.exit(2)
        listener = _socket.socket(fileno=int(fd))
        os.set_inheritable(listener.fileno(), False)
    ready = os.environ.get("COVE_READY_FD")
    ready_fd = int(ready) if ready else None
    if ready_fd is not None:
        os.set_inheritable(ready_fd, False)
    # Our own variables never reach a command (commands get a fresh env anyway, see build_env).
    for key in [k for k in os.environ if k.startswith("COVE_")]:
        del os.environ[key]
    serve(listener, ready_fd)


if __name__ == "__main__":
    main(sys.argv[1:])
