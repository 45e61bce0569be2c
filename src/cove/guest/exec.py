"""`exec`: a command run to its end while the host waits, its output streamed as it comes and the
host's stdin fed to it (docs/guest-protocol.md).

The handler starts the command with posix_spawn (see _spawn) and relays in one poll() loop
(CommandRelay) until the command has exited and its pipes are drained, or stay quiet.
"""

from __future__ import annotations

import _signal
import errno
import os
import select
import time

from . import protocol
from .command import (
    BASE_PATH,
    EXIT_GRACE,
    EXIT_IDLE,
    STDIN_HIGH_WATER,
    command_argv,
    command_context,
    exit_code,
)
from .errors import OpError
from .protocol import CHUNK_SIZE, KIND_STDERR, KIND_STDIN, KIND_STDOUT
from .request import Conn, field_bool, timeout_field
from .users import User, become
from .wakeup import drain, sigchld_pipe

_OOM_RESET: list[bool] = []  # set in a handler once it has reset its oom_score_adj (pid 1 never does)


def _spawn(
    argv: list[str], shell: bool, user: User, cwd: str, env: dict[str, str], fds: tuple[int, int, int]
) -> int:
    """Start the command in its own session with posix_spawn (vfork: no copy of this process).

    The handler process is throwaway, so it switches to the user and cwd itself first; posix_spawn
    cannot. Raises OpError for a bad cwd and SpawnFailed when the program cannot be executed.
    """
    in_r, out_w, err_w = fds
    if not _OOM_RESET:  # user commands should be the OOM killer's choice, not the agent
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
            _OOM_RESET.append(True)  # this handler's own setting, inherited by what it starts
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


def op_exec(c: Conn, req: dict) -> dict | None:
    argv, shell = command_argv(req)
    timeout = timeout_field(req)
    want_stdin = field_bool(req, "stdin")
    user, cwd, env = command_context(req)
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
    """Run the command to its end; its result, or None if the host went away meanwhile."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if want_stdin else (-1, -1)
    wake_r, wake_w = sigchld_pipe()  # SIGCHLD wakes poll() even while the output pipes stay quiet
    try:
        pid = _spawn(argv, shell, user, cwd, env, (in_r, out_w, err_w))
    except (SpawnFailed, OpError) as exc:  # never started: a kept handler must not keep its pipes
        for fd in (out_r, out_w, err_r, err_w, in_r, in_w, wake_r, wake_w):
            if fd >= 0:
                os.close(fd)
        _signal.set_wakeup_fd(-1)
        if isinstance(exc, OpError):
            raise
        protocol.send_frame(c.sock, KIND_STDERR, exc.message.encode("utf-8", "replace"))
        return {"exit_code": exc.code, "timed_out": False}
    for fd in (out_w, err_w, in_r):
        if fd >= 0:
            os.close(fd)
    relay = CommandRelay(c, pid, {out_r: KIND_STDOUT, err_r: KIND_STDERR}, in_w, (wake_r, wake_w), timeout)
    try:
        relay.run()
    finally:
        relay.close()
    if not relay.connected:
        return None
    return {"exit_code": exit_code(relay.status), "timed_out": relay.timed_out}


class CommandRelay:
    """A started command's pipes and the host's connection, relayed both ways: output to the host as
    frames, the host's stdin frames into the command (buffered, with backpressure)."""

    def __init__(
        self,
        c: Conn,
        pid: int,
        outputs: dict[int, bytes],
        in_w: int,
        wake: tuple[int, int],
        timeout: float | None,
    ) -> None:
        self.c = c
        self.sock = c.sock
        self.conn_fd = c.sock.fileno()
        self.pid = pid
        self.outputs = outputs  # output pipe -> the frame kind it is sent as; gone once drained
        self.in_w = in_w  # the command's stdin pipe; -1 without stdin, or once closed
        self.wake_r, self.wake_w = wake
        for fd in outputs:
            os.set_blocking(fd, False)
        if in_w >= 0:
            os.set_blocking(in_w, False)
        self.poller = select.poll()
        for fd in (*outputs, self.wake_r, self.conn_fd):
            self.poller.register(fd, select.POLLIN)
        self.reading_host = True
        self.in_registered = False
        self.inbuf = bytearray()  # unparsed bytes from the host
        self.stdin_buf = bytearray()  # stdin bytes not yet taken by the command
        self.stdin_eof = in_w < 0
        self.connected = True
        self.timed_out = False
        self.status: int | None = None
        self.exited_at = 0.0
        self.deadline = time.monotonic() + timeout if timeout else None

    def run(self) -> None:
        """Relay until the command has exited and its output is in (or its pipes stay quiet)."""
        while True:
            now = time.monotonic()
            if self.status is None:
                self.check_exit(now)
            if self.status is not None and (not self.outputs or now - self.exited_at >= EXIT_GRACE):
                return
            wait = self.wait_time(now)
            self.throttle_host()
            events = self.poller.poll(None if wait is None else wait * 1000)
            if not events and self.status is not None:
                return  # pipes quiet after the exit: whatever holds them is a background process
            for fd, _ in events:
                if fd in self.outputs:
                    self.read_output(fd)
                elif fd == self.wake_r:
                    drain(self.wake_r)
                elif fd == self.conn_fd and self.reading_host:
                    self.read_host()
                elif fd == self.in_w:
                    self.pump_stdin()
            if (
                self.deadline is not None
                and self.status is None
                and not self.timed_out
                and time.monotonic() >= self.deadline
            ):
                self.kill_group()
                self.timed_out = True

    def close(self) -> None:
        _signal.set_wakeup_fd(-1)
        for fd in (*self.outputs, self.in_w, self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        if self.status is None:  # only on an unexpected error: never leave the command running
            self.kill_group()
            os.waitpid(self.pid, 0)

    def check_exit(self, now: float) -> None:
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self.status = status
            self.exited_at = now
            self.stdin_buf.clear()
            self.stdin_eof = True
            self.pump_stdin()

    def wait_time(self, now: float) -> float | None:
        """How long poll() may wait: what is left of the exit's grace, or of the timeout."""
        if self.status is not None:
            return min(EXIT_IDLE, self.exited_at + EXIT_GRACE - now)
        if self.deadline is not None and not self.timed_out:
            return max(0.0, self.deadline - now)
        return None

    def throttle_host(self) -> None:
        """Backpressure: do not buffer unbounded stdin the command does not read."""
        if self.connected and self.reading_host and len(self.stdin_buf) > STDIN_HIGH_WATER:
            self.poller.unregister(self.conn_fd)
            self.reading_host = False
        elif self.connected and not self.reading_host and len(self.stdin_buf) <= STDIN_HIGH_WATER:
            self.poller.register(self.conn_fd, select.POLLIN)
            self.reading_host = True

    def kill_group(self) -> None:
        try:  # noqa: SIM105
            os.killpg(self.pid, _signal.SIGKILL)
        except OSError:
            pass

    def host_gone(self) -> None:
        self.connected = False
        if self.reading_host:
            self.poller.unregister(self.conn_fd)
            self.reading_host = False
        if self.status is None:
            self.kill_group()  # nobody is listening: the command must not run on unattended

    def read_output(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.poller.unregister(fd)
            os.close(fd)
            del self.outputs[fd]
        elif self.connected:
            try:
                protocol.send_frame(self.sock, self.outputs[fd], data)
            except OSError:
                self.host_gone()

    def read_host(self) -> None:
        """Take the host's stdin frames; anything else it sends now is ignored."""
        try:
            chunk = self.sock.recv(256 * 1024)
        except OSError:
            chunk = b""
        if not chunk:
            self.host_gone()
            return
        self.inbuf += chunk
        try:
            frames = protocol.parse_frames(self.inbuf)
        except protocol.ProtocolError:
            self.host_gone()
            return
        for kind, payload in frames:
            if kind == KIND_STDIN and not self.stdin_eof:
                if payload:
                    self.stdin_buf += payload
                else:
                    self.stdin_eof = True
                    self.c.input_open = False
        self.pump_stdin()

    def pump_stdin(self) -> None:
        """Write what the command takes of the buffered stdin; close its pipe at the end of input."""
        while self.in_w >= 0 and self.stdin_buf:
            try:
                n = os.write(self.in_w, self.stdin_buf)
            except BlockingIOError:
                break
            except OSError:  # the command closed its stdin: drop what it will never read
                self.stdin_buf.clear()
                self.stdin_eof = True
                break
            del self.stdin_buf[:n]
        if self.in_w < 0:
            return
        if self.stdin_eof and not self.stdin_buf:
            if self.in_registered:
                self.poller.unregister(self.in_w)
            os.close(self.in_w)
            self.in_w = -1
        elif self.stdin_buf and not self.in_registered:
            self.poller.register(self.in_w, select.POLLOUT)
            self.in_registered = True
        elif not self.stdin_buf and self.in_registered:
            self.poller.unregister(self.in_w)
            self.in_registered = False
