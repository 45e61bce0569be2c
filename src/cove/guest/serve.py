"""Pid 1's loop, and the agent's start (main).

The main process only accepts connections, forks one handler per connection (handler.py) and reaps
every child and orphan (SIGCHLD + wakeup fd), so a slow or crashing operation never stalls the agent.
"""

from __future__ import annotations

import _signal
import _socket
import errno
import gc
import os
import select
import sys
import time

from . import handler, protocol, registry, sudo
from .config import CONFIG_PATH, load_config
from .errors import log_exception
from .files import UMASK
from .handler import refresh_config, serve_connection
from .users import ensure_workdir, group_list, resolve_user
from .wakeup import drain, sigchld_pipe

SPARES = 1  # pre-forked handler waiting for the next connection (each costs ~1 MB of private memory)
SPARE_DELAY = 0.25  # a taken spare is replaced this much later (at once if a connection needs one)


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


def _serve_sudo(sudo_listener: _socket.socket, wake: tuple[int, int], taken_w: int) -> None:
    """A `sudo` request: a process of its own serves it (sudo.py), pid 1 only forks it."""
    try:
        fd, _ = sudo_listener._accept()
    except OSError:
        return  # taken meanwhile, or the client gave up
    try:
        pid = os.fork()
    except OSError:
        os.close(fd)
        return
    if pid:
        os.close(fd)
        return
    try:
        _signal.set_wakeup_fd(-1)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        for own in (*wake, taken_w, sudo_listener.fileno()):
            os.close(own)
        sudo.serve(_socket.socket(fileno=fd))
    except BaseException:
        pass
    finally:
        os._exit(0)


def serve(
    listener: _socket.socket, ready_fd: int | None, sudo_listener: _socket.socket | None = None
) -> None:
    """Pid 1's loop: keep SPARES handlers waiting in accept(), reap every child and orphan.

    A taken spare is replaced SPARE_DELAY later, or at once when a connection finds none: a fork
    and its copy-on-write faults are most of what a short-lived sandbox's agent costs."""
    listener.setblocking(True)  # shared by the spares, which block in accept()
    wake_r, wake_w = sigchld_pipe()
    taken_r, taken_w = os.pipe()
    os.set_blocking(taken_r, False)
    _warm_up()  # before forking, so every handler inherits what it loads
    idle: set[int] = set()
    poller = select.poll()
    poller.register(wake_r, select.POLLIN)
    poller.register(taken_r, select.POLLIN)
    if sudo_listener is not None:
        poller.register(sudo_listener.fileno(), select.POLLIN)
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
                    drain(wake_r)
                    for pid in reap():
                        idle.discard(pid)  # a spare that died before it was taken
                    replace_after(SPARE_DELAY)
                elif sudo_listener is not None and fd == sudo_listener.fileno():
                    _serve_sudo(sudo_listener, (wake_r, wake_w), taken_w)
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
            log_exception()
            time.sleep(0.01)


def _warm_up() -> None:
    """Load glibc's NSS modules now, so that handlers inherit them instead of each loading them.

    getgrouplist() (every user switch) consults every source in nsswitch.conf; loading e.g.
    libnss_systemd in each forked handler cost about a millisecond per operation.
    """
    try:
        user = resolve_user(None)
        if user.known:
            group_list(user)  # loads the modules, and primes the handlers' cache
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
    handler.MAIN_PID = os.getpid()  # the module may have been imported by the launcher, before its forks
    os.umask(UMASK)
    load_config(config_path or CONFIG_PATH, required=config_path is not None)
    ensure_workdir()
    # SIG_DFL, not Python's KeyboardInterrupt handler: as pid 1 the kernel then drops these signals
    # sent from inside the sandbox, and in test mode they simply terminate the agent.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)

    if socket_path is not None:
        registry.PROCS_DIR = os.path.join(os.path.dirname(os.path.abspath(socket_path)), "procs")
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
    try:
        sudo_listener = sudo.listen(listener.getsockname())
    except Exception:
        sudo_listener = None
    serve(listener, ready_fd, sudo_listener)
