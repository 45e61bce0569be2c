"""The SDK's shared core: configuration, request specs and response parsing, with no I/O.

Every operation is written once, here, as a generator that *yields* :class:`Call` objects and
*receives* the decoded JSON reply (or has the :class:`~cove.errors.CoveError` thrown into it). The
async (:mod:`cove.sdk.aio`) and sync (:mod:`cove.sdk.sync`, generated from it by
``scripts/gen_sync.py``) front ends only drive these generators with ``httpx.AsyncClient`` or
``httpx.Client``. Streaming operations (exec output, file transfers)
share the request spec, the error mapping and the event parsing defined here; only the byte
pumping differs between the two front ends.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import certifi
import httpx

from cove.errors import (
    CommandTimeout,
    ConnectionFailed,
    CoveError,
    FileNotFound,
    InvalidArgument,
    error_from_response,
    status_for_code,
)
from cove.sdk.models import (
    ApiKey,
    AuditEntry,
    EntryInfo,
    ExecEvent,
    ExecResult,
    NetworkInfo,
    SandboxInfo,
    SnapshotInfo,
)
from cove.sdk.mounts import mount_bodies, volume_bodies

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:7770"
ENV_URL = "COVE_URL"
ENV_API_KEY = "COVE_API_KEY"
USER_AGENT = "cove-python/0.1.0"
CHUNK_SIZE = 256 * 1024

#: Default timeouts for plain API calls. Long-running calls (exec, transfers) get their own.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=120.0, pool=60.0)
#: Extra time on top of a command's own timeout before the HTTP read gives up.
EXEC_READ_MARGIN = 60.0

ReadFormat = Literal["text", "bytes", "stream"]
Op = Generator["Call", Any, T]
"""An operation: yields calls, is sent each call's decoded JSON reply, returns its result."""


# --------------------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class Config:
    """Where the server is and how to authenticate. Built by :meth:`resolve` from args and env."""

    url: str = DEFAULT_URL
    api_key: str | None = None
    #: An ``httpx`` transport to use instead of the network (tests use ``httpx.MockTransport``).
    transport: Any = None

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None, transport: Any = None) -> Config:
        """Explicit arguments win, then ``COVE_URL`` / ``COVE_API_KEY``, then the defaults."""
        resolved_url = (url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")
        if "://" not in resolved_url:
            resolved_url = "http://" + resolved_url
        resolved_key = api_key if api_key is not None else os.environ.get(ENV_API_KEY) or None
        return cls(url=resolved_url, api_key=resolved_key, transport=transport)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``httpx.Client`` / ``httpx.AsyncClient``."""
        kwargs: dict[str, Any] = {
            "base_url": self.url,
            "headers": self.headers(),
            "timeout": DEFAULT_TIMEOUT,
            "follow_redirects": False,
        }
        if self.transport is not None:
            kwargs["transport"] = self.transport
        else:
            kwargs["verify"] = _tls_context()
        return kwargs


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (~40 ms), which httpx would
    otherwise do for every client, i.e. every ``Sandbox.create`` and ``connect``."""
    return ssl.create_default_context(cafile=certifi.where())


# ----------------------------------------------------------------------------------------- calls


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request, described without doing it."""

    method: str
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    json: Any = None
    timeout: httpx.Timeout | None = None  # None: the client's default

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": self.params or None}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.timeout is not None:
            kwargs["timeout"] = self.timeout
        return kwargs


def command_timeout(seconds: float | None) -> httpx.Timeout:
    """HTTP timeouts for a call that lasts as long as a command: never shorter than the command."""
    read = None if not seconds else float(seconds) + EXEC_READ_MARGIN
    return httpx.Timeout(connect=DEFAULT_TIMEOUT.connect, read=read, write=DEFAULT_TIMEOUT.write, pool=60.0)


#: Transfers: the read timeout is per chunk, so it only has to cover a stalled connection.
TRANSFER_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=60.0)


def _q(value: str) -> str:
    return quote(value, safe="")


def sandbox_path(sandbox_id: str, suffix: str = "") -> str:
    if not sandbox_id:
        raise InvalidArgument("sandbox id must not be empty")
    return f"/v1/sandboxes/{_q(sandbox_id)}{suffix}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _user_param(user: str | None) -> list[tuple[str, str]]:
    return [("user", user)] if user else []


# ------------------------------------------------------------------------------------- responses


def check_response(status: int, content: bytes, call: Call, config: Config) -> None:
    """Raise the matching :class:`CoveError` if ``status`` is an error."""
    if status < 400:
        return
    err = error_from_response(status, content, path=call.path)
    if status == 401 and not config.api_key:
        err.message = f"{err.message} (no API key given: set {ENV_API_KEY} or pass api_key=)"
        err.args = (err.message,)
    raise err


def decode_reply(status: int, content: bytes, call: Call, config: Config) -> Any:
    """Check ``status`` and return the decoded JSON body (``None`` when there is none)."""
    check_response(status, content, call, config)
    if status == 204 or not content.strip():
        return None
    try:
        return json.loads(content)
    except ValueError as exc:
        snippet = content[:200].decode("utf-8", "replace")
        raise CoveError(
            f"{call.method} {call.path}: the server sent a body that is not JSON: {snippet!r}",
            status=status,
            code="bad_response",
        ) from exc


def transport_error(exc: Exception, call: Call, config: Config) -> CoveError:
    """Turn an ``httpx`` transport failure into a readable :class:`ConnectionFailed`."""
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "could not connect"
    else:
        what = f"failed ({type(exc).__name__}: {exc})" if str(exc) else f"failed ({type(exc).__name__})"
    return ConnectionFailed(
        f"{call.method} {config.url}{call.path} {what}; is the cove server running at {config.url}?"
        if isinstance(exc, httpx.ConnectError)
        else f"{call.method} {config.url}{call.path} {what}",
        code="connection_failed",
    )


# -------------------------------------------------------------------------------------- sandboxes


# The keywords of ``create`` that configure the client rather than the sandbox (``cls`` is there because
# ``create`` is a classmethod and passes its ``locals()``).
CLIENT_ARGS = frozenset({"cls", "url", "api_key", "transport"})


# How the create options that are not sent as they are become JSON (``None``: leave it out).
_CREATE_ENCODERS: dict[str, Callable[[Any], Any]] = {
    "env": lambda env: dict(env or {}),
    "metadata": lambda metadata: dict(metadata or {}),
    "network": lambda network: None if network is None else network_body(network),
    "volumes": lambda volumes: volume_bodies(volumes) or None,
    "mounts": lambda mounts: mount_bodies(mounts) or None,
}


def create_body(args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/sandboxes`` body from the arguments of ``create`` (its ``locals()``).

    The signature of ``AsyncSandbox.create`` in :mod:`cove.sdk.aio` is the one list of create options
    (:mod:`cove.sdk.sync` is generated from it): every keyword but :data:`CLIENT_ARGS` is sent under
    its own name, ``None`` meaning the server's default, after the encoder of
    `_CREATE_ENCODERS` where it has one. Adding an option is adding a keyword there.
    """
    encoders = _CREATE_ENCODERS
    body: dict[str, Any] = {}
    for name, value in args.items():
        if name in CLIENT_ARGS:
            continue
        encoded = encoders[name](value) if name in encoders else value
        if encoded is not None:
            body[name] = encoded
    return body


def create_sandbox(body: Mapping[str, Any]) -> Op[SandboxInfo]:
    """Start a sandbox from a :func:`create_body`."""
    data = yield Call("POST", "/v1/sandboxes", json=dict(body), timeout=TRANSFER_TIMEOUT)
    return SandboxInfo.from_dict(data)


def get_sandbox(sandbox_id: str) -> Op[SandboxInfo]:
    data = yield Call("GET", sandbox_path(sandbox_id))
    return SandboxInfo.from_dict(data)


def list_sandboxes(
    *,
    state: str | Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    page_size: int | None = None,
) -> Op[list[SandboxInfo]]:
    """All matching sandboxes, following ``next_cursor`` until the last page.

    ``state`` is one state or several (any may match); every ``metadata`` pair must match.
    """
    params: list[tuple[str, str]] = []
    states = [state] if isinstance(state, str) else list(state or [])
    params.extend(("state", s) for s in states if s)
    for key, value in (metadata or {}).items():
        params.append(("metadata", f"{key}={value}"))
    if page_size:
        params.append(("limit", str(page_size)))
    items: list[SandboxInfo] = []
    cursor: str | None = None
    seen: set[str] = set()
    while True:
        page = params + ([("cursor", cursor)] if cursor else [])
        data = yield Call("GET", "/v1/sandboxes", params=page)
        data = data or {}
        items.extend(SandboxInfo.from_dict(item) for item in data.get("items") or [])
        cursor = data.get("next_cursor")
        if not cursor or cursor in seen:
            return items
        seen.add(cursor)


def kill_sandbox(sandbox_id: str) -> Op[None]:
    yield Call("DELETE", sandbox_path(sandbox_id))


def pause_sandbox(sandbox_id: str) -> Op[SandboxInfo]:
    data = yield Call("POST", sandbox_path(sandbox_id, "/pause"))
    return SandboxInfo.from_dict(data)


def resume_sandbox(sandbox_id: str) -> Op[SandboxInfo]:
    data = yield Call("POST", sandbox_path(sandbox_id, "/resume"))
    return SandboxInfo.from_dict(data)


def hibernate_sandbox(sandbox_id: str) -> Op[SandboxInfo]:
    data = yield Call("POST", sandbox_path(sandbox_id, "/hibernate"), timeout=TRANSFER_TIMEOUT)
    return SandboxInfo.from_dict(data)


def snapshot_sandbox(
    sandbox_id: str, name: str | None = None, memory: bool = False, volumes: str = "exclude"
) -> Op[SnapshotInfo]:
    body: dict[str, Any] = {"memory": memory, "volumes": volumes}
    if name:
        body["name"] = name
    data = yield Call("POST", sandbox_path(sandbox_id, "/snapshots"), json=body, timeout=TRANSFER_TIMEOUT)
    return SnapshotInfo.from_dict(data)


def fork_sandbox(
    sandbox_id: str, count: int = 1, metadata: Mapping[str, str] | None = None, volumes: str = "exclude"
) -> Op[list[SandboxInfo]]:
    body = {"count": count, "metadata": dict(metadata or {}), "volumes": volumes}
    data = yield Call("POST", sandbox_path(sandbox_id, "/fork"), json=body, timeout=TRANSFER_TIMEOUT)
    return [SandboxInfo.from_dict(item) for item in data["items"]]


def list_snapshots() -> Op[list[SnapshotInfo]]:
    data = yield Call("GET", "/v1/snapshots")
    return [SnapshotInfo.from_dict(item) for item in data["items"]]


def get_snapshot(snapshot_id: str) -> Op[SnapshotInfo]:
    data = yield Call("GET", f"/v1/snapshots/{_q(snapshot_id)}")
    return SnapshotInfo.from_dict(data)


def delete_snapshot(snapshot_id: str) -> Op[None]:
    yield Call("DELETE", f"/v1/snapshots/{_q(snapshot_id)}")


def port_url(
    sandbox_id: str, port: int, expires_in: int = 3600, path: str = "/", by: Literal["host", "path"] = "host"
) -> Op[str]:
    if by not in ("host", "path"):
        raise InvalidArgument(f"by must be 'host' or 'path', not {by!r}")
    body = {"port": port, "expires_in": expires_in, "path": path}
    data = yield Call("POST", sandbox_path(sandbox_id, "/urls"), json=body)
    return str(data["url"] if by == "host" else data["path_url"])


def file_url(
    sandbox_id: str, path: str, method: Literal["GET", "PUT"], expires_in: int = 3600, user: str | None = None
) -> Op[str]:
    body: dict[str, Any] = {"file": path, "method": method, "expires_in": expires_in}
    if user is not None:
        body["user"] = user
    data = yield Call("POST", sandbox_path(sandbox_id, "/urls"), json=body)
    return str(data["url"])


Network = str | Mapping[str, Any]


def network_body(network: Network) -> dict[str, Any]:
    """``"open"`` is ``{"mode": "open"}``; a mapping is sent as it is (mode, allow, deny, inject)."""
    return {"mode": network} if isinstance(network, str) else dict(network)


def get_network(sandbox_id: str) -> Op[NetworkInfo]:
    data = yield Call("GET", sandbox_path(sandbox_id, "/network"))
    return NetworkInfo.from_dict(data)


def set_network(
    sandbox_id: str,
    mode: str,
    allow: Sequence[str] = (),
    deny: Sequence[str] = (),
    inject: Mapping[str, Mapping[str, str]] | None = None,
) -> Op[NetworkInfo]:
    body: dict[str, Any] = {"mode": mode, "allow": list(allow), "deny": list(deny)}
    if inject is not None:  # left out: the server keeps the current ones
        body["inject"] = {host: dict(headers) for host, headers in inject.items()}
    data = yield Call("PUT", sandbox_path(sandbox_id, "/network"), json=body)
    return NetworkInfo.from_dict(data)


def set_timeout(sandbox_id: str, seconds: int) -> Op[SandboxInfo]:
    data = yield Call("POST", sandbox_path(sandbox_id, "/timeout"), json={"timeout": seconds})
    return SandboxInfo.from_dict(data)


def set_durability(sandbox_id: str, snapshot_every: int) -> Op[SandboxInfo]:
    data = yield Call(
        "POST", sandbox_path(sandbox_id, "/durability"), json={"snapshot_every": snapshot_every}
    )
    return SandboxInfo.from_dict(data)


# -------------------------------------------------------------------------------------- commands


Command = str | Sequence[str]


def exec_call(
    sandbox_id: str,
    cmd: Command,
    *,
    stream: bool,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    timeout: float | None = None,
    stdin: str | bytes | None = None,
) -> Call:
    """The request for ``/exec`` (``stream=False``) or ``/exec/stream`` (``stream=True``)."""
    body: dict[str, Any]
    if isinstance(cmd, str):
        if not cmd.strip():
            raise InvalidArgument("command must not be empty")
        body = {"cmd": cmd}
    else:
        argv = [str(a) for a in cmd]
        if not argv:
            raise InvalidArgument("argv must not be empty")
        body = {"argv": argv}
    if cwd is not None:
        body["cwd"] = cwd
    if env:
        body["env"] = {str(k): str(v) for k, v in env.items()}
    if user is not None:
        body["user"] = user
    if timeout is not None:
        body["timeout"] = timeout
    if stdin is not None:
        body["stdin"] = stdin.decode("utf-8") if isinstance(stdin, bytes) else stdin
    suffix = "/exec/stream" if stream else "/exec"
    return Call("POST", sandbox_path(sandbox_id, suffix), json=body, timeout=command_timeout(timeout))


def _timeout_error(result: ExecResult) -> CommandTimeout:
    took = f" after {result.duration_ms / 1000:.1f}s" if result.duration_ms is not None else ""
    return CommandTimeout(
        f"command timed out{took} and was killed",
        stdout=result.stdout,
        stderr=result.stderr,
        exit_code=result.exit_code,
        duration_ms=result.duration_ms,
    )


def finish_exec(result: ExecResult) -> ExecResult:
    """A command's result, or :class:`CommandTimeout` if it ran past its timeout."""
    if result.timed_out:
        raise _timeout_error(result)
    return result


def exec_command(sandbox_id: str, cmd: Command, **kwargs: Any) -> Op[ExecResult]:
    data = yield exec_call(sandbox_id, cmd, stream=False, **kwargs)
    return finish_exec(ExecResult.from_dict(data or {}))


def parse_event(line: str | bytes) -> ExecEvent | None:
    """One NDJSON line of ``/exec/stream``; blank lines give ``None``; error lines raise."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise CoveError(f"malformed line in exec stream: {line[:200]!r}", code="bad_response") from exc
    if not isinstance(data, dict):
        raise CoveError(f"malformed line in exec stream: {line[:200]!r}", code="bad_response")
    if data.get("type") == "error" or isinstance(data.get("error"), dict):
        err = data["error"] if isinstance(data.get("error"), dict) else data
        code = err.get("code")
        message = err.get("message") or "the command failed"
        raise error_from_response(status_for_code(code), {"error": {"code": code, "message": message}})
    return ExecEvent.from_dict(data)


class ExecCollector:
    """Accumulates streamed events into an :class:`ExecResult`."""

    def __init__(self) -> None:
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self.exit: ExecEvent | None = None

    def feed(self, event: ExecEvent) -> None:
        if event.type == "stdout":
            self._stdout.append(event.data)
        elif event.type == "stderr":
            self._stderr.append(event.data)
        elif event.type == "exit":
            self.exit = event

    def result(self) -> ExecResult:
        """The finished result; raises :class:`CommandTimeout` on a timeout."""
        if self.exit is None:
            raise CoveError("the exec stream ended before the command finished", code="stream_ended")
        return finish_exec(
            ExecResult(
                stdout="".join(self._stdout),
                stderr="".join(self._stderr),
                exit_code=-1 if self.exit.exit_code is None else self.exit.exit_code,
                timed_out=self.exit.timed_out,
                duration_ms=self.exit.duration_ms,
            )
        )


# ----------------------------------------------------------------------------------------- files


def _files_params(path: str, user: str | None, **extra: str) -> list[tuple[str, str]]:
    if not path:
        raise InvalidArgument("path must not be empty")
    return [("path", path), *_user_param(user), *extra.items()]


def read_call(sandbox_id: str, path: str, user: str | None = None) -> Call:
    return Call(
        "GET", sandbox_path(sandbox_id, "/files"), params=_files_params(path, user), timeout=TRANSFER_TIMEOUT
    )


def write_call(sandbox_id: str, path: str, user: str | None = None, mode: int | None = None) -> Call:
    extra = {"mode": str(mode)} if mode is not None else {}
    return Call(
        "PUT",
        sandbox_path(sandbox_id, "/files"),
        params=_files_params(path, user, **extra),
        timeout=TRANSFER_TIMEOUT,
    )


def parse_entry(data: Any) -> EntryInfo:
    if isinstance(data, dict) and isinstance(data.get("entry"), dict):
        data = data["entry"]
    return EntryInfo.from_dict(data or {})


def decode_text(content: bytes, path: str) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not UTF-8 text; read it with format='bytes'") from exc


def check_format(fmt: str) -> ReadFormat:
    if fmt not in ("text", "bytes", "stream"):
        raise InvalidArgument(f"format must be 'text', 'bytes' or 'stream', not {fmt!r}")
    return fmt  # type: ignore[return-value]


def list_files(sandbox_id: str, path: str, depth: int = 1, user: str | None = None) -> Op[list[EntryInfo]]:
    if depth < 1:
        raise InvalidArgument("depth must be at least 1")
    params = _files_params(path, user, depth=str(depth))
    data = yield Call("GET", sandbox_path(sandbox_id, "/files/list"), params=params)
    return [EntryInfo.from_dict(e) for e in (data or {}).get("entries") or []]


def stat_file(sandbox_id: str, path: str, user: str | None = None) -> Op[EntryInfo]:
    data = yield Call("GET", sandbox_path(sandbox_id, "/files/stat"), params=_files_params(path, user))
    return parse_entry(data)


def file_exists(sandbox_id: str, path: str, user: str | None = None) -> Op[bool]:
    try:
        yield from stat_file(sandbox_id, path, user)
    except FileNotFound:
        return False
    return True


def make_dir(sandbox_id: str, path: str, user: str | None = None) -> Op[EntryInfo]:
    if not path:
        raise InvalidArgument("path must not be empty")
    body: dict[str, Any] = {"path": path}
    if user:
        body["user"] = user
    data = yield Call("POST", sandbox_path(sandbox_id, "/files/mkdir"), json=body)
    return parse_entry(data)


def remove_file(sandbox_id: str, path: str, recursive: bool = False, user: str | None = None) -> Op[None]:
    params = _files_params(path, user, recursive=_bool(recursive))
    yield Call("DELETE", sandbox_path(sandbox_id, "/files"), params=params)


def rename_file(sandbox_id: str, src: str, dst: str, user: str | None = None) -> Op[EntryInfo]:
    if not src or not dst:
        raise InvalidArgument("src and dst must not be empty")
    body: dict[str, Any] = {"src": src, "dst": dst}
    if user:
        body["user"] = user
    data = yield Call("POST", sandbox_path(sandbox_id, "/files/rename"), json=body)
    return parse_entry(data)


def chunk_bytes(chunk: Any) -> bytes:
    """One chunk of upload data as bytes (str chunks are UTF-8 encoded)."""
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise InvalidArgument(f"upload data must be str, bytes or chunks of them, not {type(chunk).__name__}")


def whole_body(data: Any) -> bytes | None:
    """The upload body when it is already in memory (str/bytes), else ``None`` (stream it)."""
    if isinstance(data, str | bytes | bytearray | memoryview):
        return chunk_bytes(data)
    return None


def iter_file(fileobj: Any, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Read a (sync) file-like object in chunks."""
    while True:
        chunk = fileobj.read(chunk_size)
        if not chunk:
            return
        yield chunk_bytes(chunk)


def iter_upload(data: Any) -> Iterator[bytes]:
    """A sync upload body: a file-like object or an iterable of bytes/str chunks, as bytes chunks."""
    if hasattr(data, "read"):
        yield from iter_file(data)
        return
    if not isinstance(data, Iterable):
        raise InvalidArgument(
            f"upload data must be str, bytes, a file-like object or an iterable of bytes, "
            f"not {type(data).__name__}"
        )
    for chunk in data:
        if chunk:
            yield chunk_bytes(chunk)


# ------------------------------------------------------------------------------------------ keys


def create_key(name: str, tenant: str = "default", admin: bool = False) -> Op[ApiKey]:
    data = yield Call("POST", "/v1/keys", json={"name": name, "tenant": tenant, "admin": admin})
    return ApiKey.from_dict(data)


def list_keys() -> Op[list[ApiKey]]:
    data = yield Call("GET", "/v1/keys")
    return [ApiKey.from_dict(k) for k in (data or {}).get("items") or []]


def delete_key(key_id: str) -> Op[None]:
    yield Call("DELETE", f"/v1/keys/{_q(key_id)}")


def rotate_key(key_id: str) -> Op[ApiKey]:
    data = yield Call("POST", f"/v1/keys/{_q(key_id)}/rotate")
    return ApiKey.from_dict(data)


def audit_log(
    tenant: str | None = None,
    action: str | list[str] | None = None,
    sandbox: str | None = None,
    since: str | float | None = None,
    limit: int = 100,
) -> Op[list[AuditEntry]]:
    params = [("limit", str(limit))]
    actions = [action] if isinstance(action, str) else action or []
    params += [("action", a) for a in actions]
    for name, value in (("tenant", tenant), ("sandbox", sandbox), ("since", since)):
        if value is not None:
            params.append((name, str(value)))
    data = yield Call("GET", "/v1/audit", params=params)
    return [AuditEntry.from_dict(e) for e in (data or {}).get("items") or []]
