"""The supervisor of one background process (`spawn`): a process of its own that owns the command,
keeps its output in a bounded buffer and serves the process's operations (attach, input, signal,
resize, wait, ...) to the handlers that connect to its socket (registry.py)."""

from __future__ import annotations

import _signal
import _socket
import errno
import os
import select
import time

from . import protocol
from .command import BASE_PATH, EXIT_GRACE, STDIN_HIGH_WATER, exit_code
from .errors import OpError, os_error
from .protocol import CHUNK_SIZE, KIND_JSON, KIND_STDERR, KIND_STDIN, KIND_STDOUT
from .registry import proc_path, write_meta
from .request import LINGER, timeout_field
from .users import User, become, restore_root
from .wakeup import drain, sigchld_pipe

OUTPUT_LIMIT = 8 * 1024 * 1024  # output kept per process; older bytes are dropped
HOLD_LIMIT = 10.0  # how long a spawn with `hold` waits for its blocking reader before reading on
PROC_RETAIN = 600.0  # a supervisor keeps an exited process's output this long, then only its metadata
SIGNAL_NAMES = (
    "SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGTERM", "SIGCONT",
    "SIGSTOP", "SIGTSTP", "SIGWINCH",
)  # fmt: skip


def pty_size(value: object) -> tuple[int, int] | None:
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise OpError("invalid", "pty must be an object {rows, cols} or null")
    return dimension(value.get("rows", 24), "rows"), dimension(value.get("cols", 80), "cols")


def dimension(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise OpError("invalid", f"{name} must be an integer between 1 and 65535")
    return value


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import _struct
    import fcntl
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, _struct.pack("HHHH", rows, cols, 0, 0))


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
        """In a process forked for it: report the start (or why not) on `report_w`, then serve."""
        self.serve(report_w, None, b"")

    def serve_attached(self, host: _socket.socket, attach: dict) -> None:
        """In the handler itself (spawn with `attach`): the host's connection is the first client,
        attached; a start that fails raises OpError (the handler answers it)."""
        request = protocol.encode_json({"op": "attach", **attach})
        self.serve(-1, host, request)

    def serve(self, report_w: int, host: _socket.socket | None, request: bytes) -> None:
        sock_path = proc_path(self.id, ".sock")
        try:  # noqa: SIM105
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(64)
        listener.setblocking(False)
        wake_r, _ = sigchld_pipe()
        try:
            self.start_command()
        except (OpError, OSError) as exc:
            err = exc if isinstance(exc, OpError) else os_error(exc)
            listener.close()
            os.unlink(sock_path)
            if host is not None:
                raise err from None
            os.write(
                report_w, protocol.dumps({"ok": False, "code": err.code, "message": err.message}).encode()
            )
            os.close(report_w)
            return
        self.meta.update(pid=self.pid, started_at=time.time(), supervisor=os.getpid())
        write_meta(self.meta)
        if host is None:
            os.write(report_w, protocol.dumps({"ok": True, "pid": self.pid}).encode())
            os.close(report_w)
        try:
            if host is not None:
                event = {"event": "spawned", "id": self.id, "pid": self.pid}
                protocol.send_frame(host, KIND_JSON, protocol.dumps(event).encode())
                host.setblocking(False)
                cl = _Client(host)
                self.clients.append(cl)
                self.take(cl, request)
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
                set_winsize(master, *self.size)
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
            # posix_spawn cannot set the child's oom_score_adj: only where ours is already 0 (as the
            # child's must be), else the fork path sets it in the child and leaves ours alone.
            plain = self.size is None and _oom_score_adj() in ("0", None)
            spawned = self._spawn(fds) if plain else None
            if spawned is not None:
                pid = spawned
                for fd in theirs:
                    os.close(fd)
                theirs.clear()
            else:
                pid = self._fork(fds, mine, theirs)
        except BaseException:
            for fd in mine + theirs:
                os.close(fd)
            raise
        self.pid = pid
        for fd in mine:
            os.set_blocking(fd, False)

    def _fork(self, fds: tuple[int, int, int], mine: list[int], theirs: list[int]) -> int:
        """Start the command in a forked child (a terminal's, or one posix_spawn could not start:
        the child then reports as a shell does); OpError for a bad cwd or user."""
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
        return pid

    def _spawn(self, fds: tuple[int, int, int]) -> int | None:
        """Start a command with pipes by posix_spawn (vfork: a fork of this process and the copy-on-
        write faults of its Python code before exec cost ~4 ms): as exec.py does, this process
        switches to the user and cwd around it, then back to root (its own oom_score_adj is 0 here,
        which the child inherits). None when the program cannot be executed: the fork path then
        reports it as before (exit 127/126, the message on stderr)."""
        in_fd, out_fd, err_fd = fds
        stdin = (
            (os.POSIX_SPAWN_DUP2, in_fd, 0)
            if in_fd >= 0
            else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0)
        )
        actions = [stdin, (os.POSIX_SPAWN_DUP2, out_fd, 1), (os.POSIX_SPAWN_DUP2, err_fd, 2)]
        sigdef = (_signal.SIGCHLD, _signal.SIGPIPE, _signal.SIGXFSZ)
        argv = self.meta["argv"]
        try:
            become(self.user)
            self._enter_workdir()
            os.environ["PATH"] = self.env.get("PATH", BASE_PATH)  # posix_spawnp searches ours
            try:
                return os.posix_spawnp(
                    argv[0], argv, self.env, file_actions=actions, setsid=True, setsigdef=sigdef
                )
            except OSError:
                return None
        finally:
            if not restore_root():
                raise OpError("internal", "the supervisor could not return to root after a spawn")

    def _enter_workdir(self) -> None:
        """chdir to the command's working directory, as its user; OpError says why not."""
        try:
            os.chdir(self.cwd)
        except FileNotFoundError:
            raise OpError("not_found", f"working directory does not exist: {self.cwd}") from None
        except NotADirectoryError:
            raise OpError("not_a_directory", f"working directory is not a directory: {self.cwd}") from None
        except PermissionError:
            raise OpError("permission_denied", f"working directory is not accessible: {self.cwd}") from None

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
            self._enter_workdir()
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
        if last is not None and last[1] == kind and len(last[2]) < CHUNK_SIZE:
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
        self.exit_code = exit_code(status)
        self.exited_at = now
        self.stdin_buf.clear()
        if self.master < 0:
            self.close_stdin_fd()
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        self.meta.update(running=False, exit_code=self.exit_code, signal=sig, ended_at=time.time())
        write_meta(self.meta)

    def finish(self, now: float) -> None:
        self.done = True
        self.done_at = now
        for fd in self.outputs:
            os.close(fd)
        self.outputs = {}
        self.close_stdin_fd()
        self.master = -1
        self.meta["end_offset"] = self.end
        write_meta(self.meta)

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
                    piece = bytes(data[cl.pos - offset : cl.pos - offset + CHUNK_SIZE])
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
            sig = _signal.SIGKILL if op == "kill" else signal_number(req.get("signal"))
            self.kill(sig)
            self.reply(cl, {"ok": True})
        elif op == "resize":
            if self.size is None:
                raise OpError("invalid", f"process {self.id} has no terminal")
            rows, cols = dimension(req.get("rows"), "rows"), dimension(req.get("cols"), "cols")
            if self.master < 0 or self.status is not None:
                raise OpError("conflict", f"process {self.id} has exited")
            set_winsize(self.master, rows, cols)
            self.meta["pty"] = {"rows": rows, "cols": cols}
            write_meta(self.meta)
            self.reply(cl, {"ok": True})
        elif op == "wait":
            timeout = timeout_field(req)
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
        self.take(cl, data)

    def take(self, cl: _Client, data: bytes) -> None:
        """Bytes a client sent: its request, or its input."""
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
            held = self.output_held(now)
            if (
                self.status is not None
                and not self.done
                and (not self.outputs or (now - self.exited_at >= EXIT_GRACE and not held))
            ):
                self.finish(now)
            if self.done and not self.clients and now - self.done_at >= PROC_RETAIN:
                return
            masks: dict[int, int] = {listen_fd: select.POLLIN, wake_r: select.POLLIN}
            for fd in () if held else self.outputs:
                masks[fd] = select.POLLIN
            if self.in_fd >= 0 and self.stdin_buf:
                masks[self.in_fd] = masks.get(self.in_fd, 0) | select.POLLOUT
            deadlines = self.own_deadlines(now, held)
            by_fd = self.prepare_clients(now, masks, deadlines)
            poller = select.poll()
            for fd, mask in masks.items():
                poller.register(fd, mask)
            events = poller.poll(max(0.0, min(deadlines) - now) * 1000 + 1 if deadlines else None)
            for fd, ev in events:
                if fd == wake_r:
                    drain(wake_r)
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

    def output_held(self, now: float) -> bool:
        """Whether the output stays unread for now (the process's writes block): until the spawn's
        blocking reader attaches, and while a blocking reader is half the kept window behind, so it
        misses nothing."""
        return now < self.hold_until or any(
            cl.block and cl.state == "attach" and self.end - cl.pos >= OUTPUT_LIMIT // 2
            for cl in self.clients
        )

    def own_deadlines(self, now: float, held: bool) -> list[float]:
        """When the loop must wake by itself: the exit's grace is over, the kept output expires, or a
        hold ends."""
        deadlines = []
        if self.status is not None and not self.done and not held:
            deadlines.append(self.exited_at + EXIT_GRACE)
        elif self.done:
            deadlines.append(self.done_at + PROC_RETAIN)
        if now < self.hold_until:  # read on at its end even if no reader came
            deadlines.append(self.hold_until)
        return deadlines

    def prepare_clients(
        self, now: float, masks: dict[int, int], deadlines: list[float]
    ) -> dict[int, _Client]:
        """Queue what each client is due, drop those done, and add the rest to `masks` (and their
        deadlines); the clients by their socket's fd."""
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
            deadline = cl.close_at if cl.state == "closing" else cl.deadline if cl.state == "wait" else None
            if deadline is not None:
                deadlines.append(deadline)
        return by_fd

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK_SIZE)
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


def _oom_score_adj() -> str | None:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return f.read().strip()
    except OSError:
        return None


def signal_number(value: object) -> int:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in SIGNAL_NAMES:
            return getattr(_signal, name)
    elif isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64:
        return value
    raise OpError("invalid", f"signal must be one of {', '.join(SIGNAL_NAMES)} or a number, not {value!r}")
