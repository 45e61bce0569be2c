"""`sudo` in a sandbox, as e2b's base image has it for its user (no password).

No setuid binary works in a sandbox (its processes run with no_new_privs), so the `sudo` command
(/opt/cove/bin/sudo, in templates that ship it: the base template and those built on it) asks the
agent, which runs as the sandbox's root: it connects to SOCKET_NAME beside the agent's socket,
sends one request (argv, user, env, cwd) with its stdin, stdout and stderr attached (SCM_RIGHTS),
and the agent runs the command as that user on those very descriptors (a terminal stays a
terminal). The client then sends the numbers of the signals it receives (one byte each), which
the agent passes on; the agent answers the exit status and closes. A client that goes away takes
its command with it (SIGKILL), as a killed e2b command takes its children.

The boundary is the sandbox: whoever can run code in it could already be root there through the
sandbox's API. The agent serves the socket only where the template ships the command.

Request: one JSON object, `{"argv": [...], "user": name or uid, "env": {...}, "cwd": str}`.
Reply: `{"exit_code": n}` (128 + signal for a command a signal ended) or `{"error": message}`.
"""

from __future__ import annotations

import _signal
import _socket
import array
import errno
import os
import select

from . import protocol
from .errors import OpError
from .users import become, resolve_user

COMMAND = "/opt/cove/bin/sudo"  # the client; its presence turns the service on
SOCKET_NAME = "sudo.sock"
MAX_REQUEST = 1 << 20


def listen(agent_socket: str) -> _socket.socket | None:
    """The sudo socket beside the agent's, open to every user of the sandbox; None where the
    template ships no sudo command (or the socket cannot be made)."""
    if not os.path.exists(COMMAND) or not agent_socket:
        return None
    path = os.path.join(os.path.dirname(agent_socket), SOCKET_NAME)
    try:
        try:  # noqa: SIM105
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(16)
    except OSError:
        return None
    sock.setblocking(False)
    return sock


def _recv_request(conn: _socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, _socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    try:
        req = protocol.decode_json(data)
    except protocol.ProtocolError:
        for fd in fds:
            os.close(fd)
        raise OpError("invalid", "malformed sudo request") from None
    return req, list(fds)


def _reply(conn: _socket.socket, obj: dict) -> None:
    try:  # noqa: SIM105
        conn.sendall(protocol.dumps(obj).encode("utf-8", "replace"))
    except OSError:
        pass


def _exec(req: dict, fds: list[int]) -> None:
    """In the command's process: its descriptors, user, directory and program (never returns)."""
    try:
        _signal.set_wakeup_fd(-1)
        for sig in (_signal.SIGCHLD, _signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGINT, _signal.SIGTERM):
            _signal.signal(sig, _signal.SIG_DFL)
        os.setsid()
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
        os.closerange(3, 65536)
        user = resolve_user(req.get("user") if req.get("user") not in (None, "") else 0)
        become(user)
        try:
            os.chdir(str(req.get("cwd") or user.home))
        except OSError:
            os.chdir(user.home if os.path.isdir(user.home) else "/")
        argv = [str(a) for a in req["argv"]]
        env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        argv0 = str((req.get("argv") or ["?"])[0])
        if exc.errno == errno.ENOENT:
            os.write(2, f"sudo: {argv0}: command not found\n".encode("utf-8", "replace"))
            os._exit(1)
        os.write(2, f"sudo: {argv0}: {exc.strerror}\n".encode("utf-8", "replace"))
        os._exit(1)
    except BaseException as exc:
        os.write(2, f"sudo: {exc}\n".encode("utf-8", "replace"))
    os._exit(1)


def serve(conn: _socket.socket) -> None:
    """In a process of its own (forked by pid 1 per connection): one sudo request, to its end."""
    conn.setblocking(True)
    try:
        req, fds = _recv_request(conn)
        argv = req.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise OpError("invalid", "argv must be a non-empty list of strings")
        if len(fds) != 3:
            raise OpError("invalid", "sudo requests carry stdin, stdout and stderr")
        resolve_user(req.get("user") if req.get("user") not in (None, "") else 0)  # unknown: say so
    except OpError as exc:
        _reply(conn, {"error": exc.message})
        return
    except OSError as exc:
        _reply(conn, {"error": str(exc)})
        return
    pid = os.fork()
    if pid == 0:
        conn.close()
        _exec(req, fds)
    for fd in fds:
        os.close(fd)
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if poller.poll(50):
            try:
                data = conn.recv(64)
            except OSError:
                data = b""
            if not data:  # the client is gone: so is its command
                try:  # noqa: SIM105
                    os.kill(pid, _signal.SIGKILL)
                except OSError:
                    pass
                os.waitpid(pid, 0)
                return
            for sig in data:
                try:  # noqa: SIM105
                    os.kill(pid, sig)
                except OSError:
                    pass
    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    _reply(conn, {"exit_code": code})
