"""One request's host connection, and the checks of request fields that several operations share."""

from __future__ import annotations

import _socket
import time

from .errors import OpError

LINGER = 10.0  # how long to drain host input we will not use, before closing (see linger())


class Conn:
    """The host connection of one handler; ``input_open`` = the host may still send frames."""

    __slots__ = ("input_open", "sock")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.input_open = False


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


def field_bool(req: dict, name: str) -> bool:
    value = req.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise OpError("invalid", f"{name} must be a boolean")
    return value


def timeout_field(req: dict) -> float | None:
    timeout = req.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0
    ):
        raise OpError("invalid", "timeout must be a number of seconds >= 0, or null")
    return timeout
