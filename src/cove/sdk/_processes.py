"""Background processes, terminals and file watching: requests and replies, without I/O.

`sync.py` and `aio.py` drive these, like the operations in `_core`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cove.errors import InvalidArgument, error_from_response, status_for_code
from cove.sdk._core import Call, Command, Op, _q, command_timeout, sandbox_path

NO_READ_TIMEOUT = command_timeout(None)  # a stream lasts as long as the process or the watch


@dataclass(frozen=True)
class ProcessInfo:
    id: str
    pid: int | None = None
    cmd: str | None = None
    argv: list[str] | None = None
    tag: str | None = None
    pty: bool = False
    running: bool = True
    exit_code: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcessInfo:
        fields = {k: d.get(k) for k in ("id", "pid", "cmd", "argv", "tag", "exit_code")}
        return cls(**fields, pty=bool(d.get("pty")), running=bool(d.get("running", True)))


@dataclass(frozen=True)
class ProcessEvent:
    """One piece of a process's output: type is attached | stdout | stderr | exit."""

    type: str
    data: str = ""
    offset: int | None = None
    truncated: bool = False  # on "attached": output before `offset` was dropped
    exit_code: int | None = None


@dataclass(frozen=True)
class WatchEvent:
    type: str  # watching | create | write | remove | rename
    path: str
    is_dir: bool = False


def _path(sandbox_id: str, process_id: str = "", suffix: str = "") -> str:
    base = sandbox_path(sandbox_id, "/processes")
    return f"{base}/{_q(process_id)}{suffix}" if process_id else base


def start(
    sandbox_id: str,
    cmd: Command,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    stdin: bool = False,
    pty: tuple[int, int] | None = None,
    tag: str | None = None,
) -> Op[ProcessInfo]:
    body: dict[str, Any] = {"cmd": cmd} if isinstance(cmd, str) else {"argv": [str(a) for a in cmd]}
    if not (body.get("cmd") or body.get("argv")):
        raise InvalidArgument("command must not be empty")
    body.update(stdin=stdin, env=dict(env or {}))
    for key, value in (("cwd", cwd), ("user", user), ("tag", tag)):
        if value is not None:
            body[key] = value
    if pty is not None:
        body["pty"] = {"rows": pty[0], "cols": pty[1]}
    data = yield Call("POST", _path(sandbox_id), json=body)
    return ProcessInfo.from_dict(data)


def get(sandbox_id: str, process_id: str) -> Op[ProcessInfo]:
    return ProcessInfo.from_dict((yield Call("GET", _path(sandbox_id, process_id))))


def list_all(sandbox_id: str) -> Op[list[ProcessInfo]]:
    data = yield Call("GET", _path(sandbox_id))
    return [ProcessInfo.from_dict(p) for p in data["items"]]


def send_stdin(sandbox_id: str, process_id: str, data: str | bytes) -> Op[None]:
    text = data.decode() if isinstance(data, bytes) else data
    yield Call("POST", _path(sandbox_id, process_id, "/stdin"), json={"data": text})


def close_stdin(sandbox_id: str, process_id: str) -> Op[None]:
    yield Call("POST", _path(sandbox_id, process_id, "/stdin/close"))


def signal(sandbox_id: str, process_id: str, sig: str | int = "SIGTERM") -> Op[None]:
    yield Call("POST", _path(sandbox_id, process_id, "/signal"), json={"signal": str(sig)})


def kill(sandbox_id: str, process_id: str) -> Op[None]:
    yield Call("DELETE", _path(sandbox_id, process_id))


def resize(sandbox_id: str, process_id: str, rows: int, cols: int) -> Op[None]:
    yield Call("POST", _path(sandbox_id, process_id, "/resize"), json={"rows": rows, "cols": cols})


def wait(sandbox_id: str, process_id: str, timeout: float = 30) -> Op[ProcessInfo]:
    """Wait up to `timeout` seconds for the process to end; `running` tells whether it did not."""
    path = _path(sandbox_id, process_id, "/wait")
    data = yield Call("POST", path, json={"timeout": timeout}, timeout=command_timeout(timeout))
    info = yield Call("GET", _path(sandbox_id, process_id))
    return ProcessInfo.from_dict({**info, "running": data["running"], "exit_code": data.get("exit_code")})


def output_call(sandbox_id: str, process_id: str, offset: int | None = None) -> Call:
    params = [("offset", str(offset))] if offset is not None else []
    return Call("GET", _path(sandbox_id, process_id, "/output"), params=params, timeout=NO_READ_TIMEOUT)


def parse_output(line: str | bytes) -> ProcessEvent | None:
    if not line:
        return None
    d = json.loads(line)
    if d.get("type") == "error":
        code = d.get("code", "internal")
        raise error_from_response(
            status_for_code(code), {"error": {"code": code, "message": d.get("message", "")}}
        )
    return ProcessEvent(
        type=d["type"],
        data=d.get("data", ""),
        offset=d.get("offset"),
        truncated=bool(d.get("truncated", False)),
        exit_code=d.get("exit_code"),
    )


def watch_call(sandbox_id: str, path: str, recursive: bool = False, user: str | None = None) -> Call:
    params = [("path", path), ("recursive", "true" if recursive else "false")]
    if user:
        params.append(("user", user))
    return Call("GET", sandbox_path(sandbox_id, "/files/watch"), params=params, timeout=NO_READ_TIMEOUT)


def parse_watch(line: str | bytes) -> WatchEvent | None:
    if not line:
        return None
    d = json.loads(line)
    return WatchEvent(type=d.get("type", ""), path=d.get("path", ""), is_dir=bool(d.get("is_dir", False)))


@dataclass
class Execution:
    """What `run_code` produced: streams, rich results ({mime: value}), and the error if it raised."""

    stdout: str = ""
    stderr: str = ""
    results: list[dict[str, Any]] | None = None
    error: dict[str, Any] | None = None
    execution_count: int | None = None

    @property
    def text(self) -> str | None:
        """The text/plain form of the last result (the value of the cell's last expression)."""
        for result in reversed(self.results or []):
            if "text/plain" in result:
                return str(result["text/plain"])
        return None


@dataclass(frozen=True)
class ContextInfo:
    id: str
    language: str
    running: bool = True


def run_code_call(
    sandbox_id: str,
    code: str,
    language: str = "python",
    context: str | None = None,
    timeout: float | None = None,
) -> Call:
    body: dict[str, Any] = {"code": code, "language": language}
    if context is not None:
        body["context"] = context
    if timeout is not None:
        body["timeout"] = timeout
    return Call(
        "POST",
        sandbox_path(sandbox_id, "/code"),
        json=body,
        timeout=command_timeout(timeout and timeout + 60),
    )


def feed_code_event(execution: Execution, line: str | bytes) -> dict[str, Any] | None:
    """Apply one NDJSON line of /code to `execution`; returns the event (None for blank lines)."""
    if not line:
        return None
    d = json.loads(line)
    kind = d.get("type")
    if kind == "stdout":
        execution.stdout += d.get("text", "")
    elif kind == "stderr":
        execution.stderr += d.get("text", "")
    elif kind == "result":
        execution.results = [*(execution.results or []), d.get("data", {})]
    elif kind == "end":
        execution.error, execution.execution_count = d.get("error"), d.get("execution_count")
    elif kind == "error":
        code = d.get("code", "internal")
        raise error_from_response(
            status_for_code(code), {"error": {"code": code, "message": d.get("message", "")}}
        )
    return d


def create_context(
    sandbox_id: str, language: str = "python", cwd: str | None = None, env: Mapping[str, str] | None = None
) -> Op[ContextInfo]:
    body: dict[str, Any] = {"language": language, "env": dict(env or {})}
    if cwd:
        body["cwd"] = cwd
    d = yield Call("POST", sandbox_path(sandbox_id, "/contexts"), json=body, timeout=command_timeout(120))
    return ContextInfo(id=d["id"], language=d["language"], running=d["running"])


def list_contexts(sandbox_id: str) -> Op[list[ContextInfo]]:
    d = yield Call("GET", sandbox_path(sandbox_id, "/contexts"))
    return [ContextInfo(id=c["id"], language=c["language"], running=c["running"]) for c in d["items"]]


def restart_context(sandbox_id: str, context_id: str) -> Op[None]:
    yield Call(
        "POST", sandbox_path(sandbox_id, f"/contexts/{_q(context_id)}/restart"), timeout=command_timeout(120)
    )


def delete_context(sandbox_id: str, context_id: str) -> Op[None]:
    yield Call("DELETE", sandbox_path(sandbox_id, f"/contexts/{_q(context_id)}"))
