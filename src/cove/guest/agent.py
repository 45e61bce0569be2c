"""cove guest agent: serves docs/guest-protocol.md inside a sandbox, as its pid 1.

Runs as ``/usr/bin/python3 -I -S /run/cove/agent.py`` with ``protocol.py`` beside it, standard
library only. The start path imports C modules (``_socket``, ``_signal``, ``select``) instead of
their Python wrappers, which would pull in ``enum``/``re`` and double the start-up time (for the
same reason it spells out try/except/pass: ``contextlib`` alone costs ~9 ms to import).

Design: the main process only accepts connections, forks one handler child per connection and reaps
every child and orphan (SIGCHLD + wakeup fd). A handler serves its one operation with plain blocking
code and exits, so a slow or crashing operation never stalls the agent, and file operations can
switch to the requested user without affecting anything else.

Test mode (outside a sandbox): ``agent.py --socket PATH [--config FILE]``.
"""

from __future__ import annotations

import _signal
import _socket
import errno
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
LINGER = 10.0  # how long to drain host input we will not use, before closing (see linger())

CONFIG: dict = {"env": {}, "user": None, "workdir": None}
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
    groups = os.getgrouplist(user.name, user.gid) if user.known else [user.gid]
    try:
        os.setgroups(groups)
    except PermissionError:
        # In a user namespace with setgroups denied we cannot change them; that is only safe when
        # we hold no other supplementary group.
        if set(os.getgroups()) - {user.gid}:
            raise
    os.setgid(user.gid)
    os.setuid(user.uid)


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


def make_entry(path: str, st: os.stat_result | None = None) -> dict:
    if st is None:
        st = os.lstat(path)
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
    return {
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


def _field_bool(req: dict, name: str) -> bool:
    value = req.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpError("invalid", f"{name} must be a boolean")
    return value


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        # makedirs reports "exists" when a path component is a file; say what is wrong.
        raise OpError("not_a_directory", f"not a directory: {path}") from None


# --- file operations (the handler has already switched to the user) ---------------------------


def _file_op_start(req: dict, field: str = "path") -> tuple[User, str]:
    user = resolve_user(req.get("user"))
    path = norm_path(req.get(field), user.home)
    become(user)
    return user, path


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
    return {"entry": make_entry(target)}


def op_list(c: Conn, req: dict) -> dict:
    depth = req.get("depth")
    if depth is None:
        depth = 1
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise OpError("invalid", "depth must be an integer >= 1")
    _, top = _file_op_start(req)
    entries: list[dict] = []

    def walk(directory: str, level: int) -> None:
        with os.scandir(directory) as it:
            items = list(it)
        for item in items:
            path = directory.rstrip("/") + "/" + item.name
            try:
                entries.append(make_entry(path, item.stat(follow_symlinks=False)))
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
    _, path = _file_op_start(req)
    return {"entry": make_entry(path)}


def op_mkdir(c: Conn, req: dict) -> dict:
    _, path = _file_op_start(req)
    try:
        os.mkdir(path)
        created = True
    except FileExistsError:
        if not os.path.isdir(path):
            raise OpError("exists", f"exists and is not a directory: {path}") from None
        created = False
    except FileNotFoundError:
        os.makedirs(path)
        created = True
    return {"entry": make_entry(path), "created": created}


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
    return {"entry": make_entry(dst)}


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


def op_exec(c: Conn, req: dict) -> dict | None:
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
    timeout = req.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise OpError("invalid", "timeout must be a number of seconds >= 0, or null")
    want_stdin = _field_bool(req, "stdin")
    user = resolve_user(req.get("user"))
    cwd = req.get("cwd")
    if cwd is None or cwd == "":
        default = CONFIG["workdir"]
        cwd = default if default and user.uid == resolve_user(None).uid else user.home
    cwd = norm_path(cwd, user.home)
    env = build_env(user, req.get("env"))
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


def serve_connection(sock: _socket.socket) -> None:
    c = Conn(sock)
    try:
        frame = protocol.recv_frame(sock)
    except (OSError, protocol.ProtocolError):
        return
    if frame is None:
        return
    kind, payload = frame
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
        c.input_open = op == "write" or (op == "exec" and req.get("stdin") is True)
        result = handler(c, req)
        if result is None:
            return
        reply = {"ok": True, **result}
    except Disconnected:
        return
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
    try:
        sock.sendall(protocol.encode_json(reply))
    except OSError:
        return
    if c.input_open:
        linger(sock)


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
    """Pid 1's loop: keep SPARES handlers waiting in accept(), reap every child and orphan."""
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

    def refill() -> bool:
        while len(idle) < SPARES:
            try:
                pid = os.fork()
            except OSError:
                return False  # e.g. the sandbox's pid limit: retry soon, refuse meanwhile
            if pid == 0:
                _spare(listener, taken_w, (wake_r, wake_w))
            idle.add(pid)
        return True

    refill()
    if ready_fd is not None:
        _signal_ready(ready_fd)
    while True:
        try:
            full = refill()
            # Without any spare (fork failing) pid 1 answers connections itself, with a refusal.
            if not idle and not watching_listener:
                poller.register(listener.fileno(), select.POLLIN)
                watching_listener = True
            elif idle and watching_listener:
                poller.unregister(listener.fileno())
                watching_listener = False
            for fd, _ in poller.poll(None if full else 50):
                if fd == wake_r:
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    for pid in reap():
                        idle.discard(pid)  # a spare that died before it was taken
                elif fd == taken_r:
                    try:
                        while data := os.read(taken_r, 4096):
                            for i in range(0, len(data) - 3, 4):
                                idle.discard(int.from_bytes(data[i : i + 4], "little"))
                    except BlockingIOError:
                        pass
                elif not idle:
                    conn_fd, _ = listener._accept()
                    _refuse(conn_fd, OSError(errno.EAGAIN, "no process can be started (pid limit reached?)"))
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
    try:
        with open(path, "rb") as f:
            data = protocol.decode_json(f.read())
    except FileNotFoundError:
        if required:
            raise
        return
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError("config env must be an object of strings")
    CONFIG["env"] = env
    CONFIG["user"] = data.get("user")
    CONFIG["workdir"] = data.get("workdir")


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
    os.umask(UMASK)
    load_config(config_path or CONFIG_PATH, required=config_path is not None)
    # SIG_DFL, not Python's KeyboardInterrupt handler: as pid 1 the kernel then drops these signals
    # sent from inside the sandbox, and in test mode they simply terminate the agent.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)

    if socket_path is not None:
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
