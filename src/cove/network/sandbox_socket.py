"""Connections to a port inside a sandbox, made from the server without moving it into the sandbox.

A sandbox has its own network namespace with only loopback, so a server listening in it on 127.0.0.1
cannot be reached from the host by any address. A socket belongs to the namespace it was created in,
whichever thread uses it later: a short-lived thread enters the sandbox's namespace through a pidfd of
its init (a recycled pid cannot redirect it), creates the sockets, and goes back; connect and all I/O
then run on the event loop like any other socket. The thread is new for each call and ends with it, so
even a failed return to the server's namespace cannot leak into other work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cove.syscalls import CLONE_NEWNET, process_start_time, setns

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0

_home_lock = threading.Lock()
_home_fd: int | None = None


class SandboxGone(Exception):
    """The sandbox's init is not the process the record names (it ended, or the pid was reused)."""


class PortNotOpen(ConnectionRefusedError):
    """Nothing listens on the port on the sandbox's loopback (IPv4 or IPv6)."""


class NamespaceStuck(RuntimeError):
    """The thread could not return to the server's network namespace (it is ended, not reused)."""


def home_netns() -> int:
    """An fd of the server's own network namespace, opened once (the main thread never leaves it)."""
    global _home_fd
    with _home_lock:
        if _home_fd is None:
            _home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        return _home_fd


def open_sockets(pid: int, start_time: int, families: tuple[int, ...]) -> list[socket.socket]:
    """TCP sockets in the network namespace of sandbox init `pid` (started at `start_time`), one per
    family it supports. Runs in the calling thread and leaves it in the namespace it found it in."""
    home = home_netns()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise SandboxGone(f"process {pid} has ended") from None
    socks: list[socket.socket] = []
    try:
        # The pidfd pins whatever process held the pid when it was opened; a start time that still
        # matches afterwards proves that process is the sandbox's init.
        try:
            same = process_start_time(pid) == start_time
        except (OSError, ValueError, IndexError):
            same = False
        if not same:
            raise SandboxGone(f"process {pid} is not the sandbox's init any more")
        try:
            setns(pidfd, CLONE_NEWNET)
        except OSError as e:
            raise SandboxGone(f"cannot enter the network of process {pid}: {e}") from e
        try:
            for family in families:
                try:
                    socks.append(socket.socket(family, socket.SOCK_STREAM))
                except OSError:
                    if family == families[0]:
                        raise
                    # a namespace without IPv6 still serves IPv4
        finally:
            try:
                setns(home, CLONE_NEWNET)
            except OSError as e:
                raise NamespaceStuck(f"cannot return to the server's network namespace: {e}") from e
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        os.close(pidfd)
    return socks


async def in_new_thread(fn: Callable[[], T], discard: Callable[[T], Any] | None = None) -> T:
    """fn() in a thread of its own; if the caller is cancelled first, `discard` gets the late result."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=run, name="cove-netns", daemon=True).start()
    try:
        return await asyncio.wrap_future(fut)
    except asyncio.CancelledError:
        if discard is not None:

            def late(f: concurrent.futures.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    discard(f.result())

            fut.add_done_callback(late)
        raise


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


async def connect(handle: dict[str, Any], port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A non-blocking socket connected to `port` on the sandbox's loopback (127.0.0.1, then ::1).

    `handle` is the sandbox record's node handle (`pid`, `start_time`). Raises PortNotOpen, SandboxGone
    or TimeoutError."""
    try:
        pid, start_time = int(handle["pid"]), int(handle["start_time"])
    except (KeyError, TypeError, ValueError):
        raise SandboxGone("the sandbox has no running init") from None
    socks = await in_new_thread(
        lambda: open_sockets(pid, start_time, (socket.AF_INET, socket.AF_INET6)), _close_all
    )
    loop = asyncio.get_running_loop()
    try:
        while socks:
            sock = socks.pop(0)
            sock.setblocking(False)
            address = ("127.0.0.1", port) if sock.family == socket.AF_INET else ("::1", port)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, address)
            except (ConnectionRefusedError, OSError) as e:
                sock.close()
                if isinstance(e, ConnectionRefusedError) or e.errno == 99:  # EADDRNOTAVAIL: no ::1
                    continue
                raise
            except BaseException:
                sock.close()
                raise
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise PortNotOpen(f"nothing listens on port {port} in the sandbox")
    finally:
        _close_all(socks)


async def open_connection(
    handle: dict[str, Any], port: int, timeout: float = CONNECT_TIMEOUT, limit: int = 1 << 16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await connect(handle, port, timeout)
    try:
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise
