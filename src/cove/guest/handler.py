"""A handler's connection: its requests, each dispatched to its operation, and their replies.

A handler serves its connection's operations one at a time with plain blocking code and exits when
the host closes it. It switches to the requested user for an operation and back to root after it
(its saved ids stay root: see users.become and users.restore_root).
"""

from __future__ import annotations

import _socket
import os
import select

from . import protocol
from .config import CONFIG_FILE, config_replaced, load_config
from .errors import Disconnected, OpError, log_exception, os_error
from .exec import op_exec
from .files import op_list, op_mkdir, op_read, op_remove, op_rename, op_stat, op_write
from .processes import PROC_OPS, op_list_processes, op_process, op_spawn
from .protocol import KIND_JSON
from .request import Conn, linger
from .users import ensure_workdir, restore_root
from .watch import op_watch

MAIN_PID = os.getpid()  # pid 1's; set again by main(), after the launcher's forks
# Operations after which a handler may serve the same connection's next request (see
# "Connections" in docs/guest-protocol.md): each ends with its reply and leaves no state behind.
REUSABLE = frozenset({"ping", "exec", "read", "write", "list", "stat", "mkdir", "remove", "rename"})
IDLE_WAIT = 30.0  # seconds a handler waits for a kept connection's next request (the host's wait is shorter)


def op_ping(c: Conn, req: dict) -> dict:
    return {"pid": MAIN_PID, "version": protocol.VERSION}


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


def refresh_config() -> None:
    """Re-read the config when the host replaced it: a pooled sandbox is started before anyone
    claims it, and the claim brings its env, user and workdir (docs/pools.md). One stat per call."""
    if not config_replaced():
        return
    try:
        load_config(CONFIG_FILE[0], required=False)
    except (OSError, ValueError, protocol.ProtocolError):
        return  # half-written or bad: keep the config we have
    ensure_workdir()


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
        log_exception()
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
