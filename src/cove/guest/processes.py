"""Background processes as the host's handlers see them: `spawn` forks a supervisor per process (its
own session; re-parented to pid 1 when the handler exits, see supervisor.py), `list_processes` reads
their records, and attach/input/... are relayed to the process's supervisor. The host still talks
only to the agent socket."""

from __future__ import annotations

import _socket
import os
import select

from . import protocol
from .command import command_argv, command_context
from .errors import OpError, log_exception
from .protocol import KIND_JSON
from .registry import PUBLIC_FIELDS, all_meta, new_process_id, proc_id_field, proc_path, read_meta
from .request import Conn, field_bool, linger
from .supervisor import Supervisor, pty_size

PROC_OPS = ("attach", "input", "close_stdin", "signal", "kill", "resize", "wait")


def op_spawn(c: Conn, req: dict) -> dict | None:
    """Start a background process; with `attach` ({offset, block}), attach to it on this same
    connection (one handler and one round trip instead of two: e2b's commands.run)."""
    attach = req.get("attach")
    if attach is not None and not isinstance(attach, dict):
        raise OpError("invalid", "attach must be an object ({offset, block}) or null")
    argv, shell = command_argv(req)
    want_stdin = field_bool(req, "stdin")
    hold = field_bool(req, "hold")
    size = pty_size(req.get("pty"))
    tag = req.get("tag")
    if tag is not None and (not isinstance(tag, str) or len(tag) > 1024):
        raise OpError("invalid", "tag must be a string of at most 1024 characters")
    user, cwd, env = command_context(req)
    if size is not None and "TERM" not in env:
        env["TERM"] = "xterm-256color"
    proc_id = new_process_id()
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
    if attach is not None:
        # This handler becomes the process's supervisor, the host's connection its first client:
        # no fork of a supervisor (~3 ms in a sandbox), no second connection for the attach. In a
        # session of its own, as a forked supervisor is; it serves until the supervisor's end.
        fields = {k: attach[k] for k in ("offset", "block") if k in attach}
        os.setsid()
        Supervisor(meta, shell, user, cwd, env, size, hold).serve_attached(c.sock, fields)
        return None
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        try:
            os.close(report_r)
            c.sock.close()
            os.setsid()
            Supervisor(meta, shell, user, cwd, env, size, hold).run(report_w)
        except BaseException:
            log_exception()
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
    return {"processes": [{k: m.get(k) for k in PUBLIC_FIELDS} for m in all_meta()]}


def op_process(c: Conn, req: dict) -> dict | None:
    """attach/input/close_stdin/signal/kill/resize/wait: relayed to the process's supervisor."""
    proc_id = proc_id_field(req)
    sup = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sup.connect(proc_path(proc_id, ".sock"))
        except (FileNotFoundError, ConnectionRefusedError):
            return _process_gone(c, req, proc_id)
        sup.sendall(protocol.encode_json(req))
        relay(c.sock, sup)
    finally:
        sup.close()
    return None


def _process_gone(c: Conn, req: dict, proc_id: str) -> dict:
    """The supervisor has ended (the output is no longer kept): answer from the metadata."""
    meta = read_meta(proc_id)
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
