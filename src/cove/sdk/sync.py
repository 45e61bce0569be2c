# Generated from aio.py by scripts/gen_sync.py; do not edit: edit aio.py and run the script.
"""The blocking SDK: :class:`Sandbox`. All logic lives in :mod:`cove.sdk._core`; this is the I/O edge.

Generated from :mod:`cove.sdk.aio` by ``scripts/gen_sync.py``; edit that module, not this one.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from types import TracebackType
from typing import Any, Literal, Self, TypeVar, overload

import httpx

from cove.errors import CoveError
from cove.sdk import _core, _processes
from cove.sdk import _sync_io as _io
from cove.sdk._core import Call, Command, Config, Op
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
from cove.sdk.mounts import BucketMount, SnapshotVolumes, VolumeMount

__all__ = ["Files", "Sandbox", "audit_log", "create_key", "delete_key", "list_keys", "rotate_key"]

T = TypeVar("T")
OutputCallback = Callable[[str], Any]


class _HTTP:
    """Runs core operations over one lazily created ``httpx.Client``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._client: httpx.Client | None = None

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(**self.config.client_kwargs())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def request(self, call: Call, content: Any = None) -> Any:
        kwargs = call.request_kwargs()
        if content is not None:
            kwargs["content"] = content
        try:
            response = self.client.request(call.method, call.path, **kwargs)
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, call, self.config) from exc
        return _core.decode_reply(response.status_code, response.content, call, self.config)

    def run(self, op: Op[T]) -> T:
        """Drive a core operation: send each call it yields, feed back the reply (or the error)."""
        reply: Any = None
        error: CoveError | None = None
        while True:
            try:
                call = op.throw(error) if error is not None else op.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            try:
                reply = self.request(call)
            except CoveError as exc:
                error = exc

    def open_stream(self, call: Call) -> httpx.Response:
        """Send ``call`` and return the response with its body unread; errors are raised here."""
        request = self.client.build_request(call.method, call.path, **call.request_kwargs())
        try:
            response = self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, call, self.config) from exc
        if response.status_code >= 400:
            try:
                content = response.read()
            finally:
                response.close()
            _core.check_response(response.status_code, content, call, self.config)
        return response

    @contextmanager
    def stream(self, call: Call) -> Iterator[httpx.Response]:
        response = self.open_stream(call)
        try:
            yield response
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, call, self.config) from exc
        finally:
            response.close()

    def iter_bytes(self, call: Call, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise _core.transport_error(exc, call, self.config) from exc
        finally:
            response.close()


def _once(op: Op[T], url: str | None, api_key: str | None, transport: Any) -> T:
    """Run one operation on a short-lived client (for calls that need no sandbox object)."""
    http = _HTTP(Config.resolve(url, api_key, transport))
    try:
        return http.run(op)
    finally:
        http.close()


class Files:
    """File operations inside one sandbox: ``sandbox.files``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    @property
    def _http(self) -> _HTTP:
        return self._sandbox._http

    @property
    def _id(self) -> str:
        return self._sandbox.id

    def watch(
        self, path: str, recursive: bool = False, user: str | None = None
    ) -> Iterator[_processes.WatchEvent]:
        """Yield file events under directory ``path`` (create, write, remove, rename) until you stop."""
        call = _processes.watch_call(self._id, path, recursive, user)
        with self._http.stream(call) as response:
            for line in response.iter_lines():
                event = _processes.parse_watch(line)
                if event is not None:
                    yield event

    def write(self, path: str, data: Any, *, user: str | None = None, mode: int | None = None) -> EntryInfo:
        """Write a file (parents are created), streaming the upload.

        ``data`` is ``str``, ``bytes``, a binary file-like object or an iterable of ``bytes`` chunks::

            sb.files.write("/home/user/a.txt", "hello")
            with open("big.tar", "rb") as f:
                sb.files.write("big.tar", f)
        """
        call = _core.write_call(self._id, path, user, mode)
        body = _core.whole_body(data)
        content: Any = body if body is not None else _io.upload_body(data)
        return _core.parse_entry(self._http.request(call, content=content))

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text", user: str | None = None) -> str: ...
    @overload
    def read(self, path: str, *, format: Literal["bytes"], user: str | None = None) -> bytes: ...
    @overload
    def read(self, path: str, *, format: Literal["stream"], user: str | None = None) -> Iterator[bytes]: ...

    def read(
        self, path: str, *, format: _core.ReadFormat = "text", user: str | None = None
    ) -> str | bytes | Iterator[bytes]:
        """Read a file as ``str`` (UTF-8), ``bytes``, or an iterator of ``bytes`` chunks (``"stream"``).

        A missing file raises :class:`~cove.errors.FileNotFound` right away, also for ``"stream"``.
        """
        fmt = _core.check_format(format)
        call = _core.read_call(self._id, path, user)
        response = self._http.open_stream(call)
        chunks = self._http.iter_bytes(call, response)
        if fmt == "stream":
            return chunks
        content = b"".join([chunk for chunk in chunks])
        return content if fmt == "bytes" else _core.decode_text(content, path)

    def download_url(self, path: str, *, expires_in: int = 3600, user: str | None = None) -> str:
        """A URL that downloads ``path`` with a plain GET and no API key, until it expires."""
        return self._http.run(_core.file_url(self._id, path, "GET", expires_in, user))

    def upload_url(self, path: str, *, expires_in: int = 3600, user: str | None = None) -> str:
        """A URL that writes ``path`` from the body of a plain PUT, no API key, until it expires."""
        return self._http.run(_core.file_url(self._id, path, "PUT", expires_in, user))

    def list(self, path: str = ".", *, depth: int = 1, user: str | None = None) -> builtins.list[EntryInfo]:
        """The entries of a directory (``depth`` > 1 descends into subdirectories)."""
        return self._http.run(_core.list_files(self._id, path, depth, user))

    def stat(self, path: str, *, user: str | None = None) -> EntryInfo:
        """Describe one path (a symlink is described, not followed)."""
        return self._http.run(_core.stat_file(self._id, path, user))

    def exists(self, path: str, *, user: str | None = None) -> bool:
        return self._http.run(_core.file_exists(self._id, path, user))

    def mkdir(self, path: str, *, user: str | None = None) -> EntryInfo:
        """Create a directory and its parents; an existing directory is fine."""
        return self._http.run(_core.make_dir(self._id, path, user))

    def remove(self, path: str, *, recursive: bool = False, user: str | None = None) -> None:
        """Remove a file, or a directory (non-empty ones need ``recursive=True``)."""
        self._http.run(_core.remove_file(self._id, path, recursive, user))

    def rename(self, src: str, dst: str, *, user: str | None = None) -> EntryInfo:
        """Move ``src`` to ``dst``."""
        return self._http.run(_core.rename_file(self._id, src, dst, user))


class Sandbox:
    """A sandbox on a cove server.

    ::

        with Sandbox.create(template="base") as sb:
            print(sb.exec("python3 -c 'print(6*7)'").stdout)

    ``Sandbox(id)`` binds to an existing sandbox without any request; :meth:`connect` also checks it
    exists. Each object holds one HTTP client, opened on first use and closed by :meth:`close` or
    :meth:`kill`. Leaving the ``with`` block kills the sandbox.
    """

    def __init__(
        self, sandbox_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> None:
        self._id = sandbox_id
        self._http = _HTTP(Config.resolve(url, api_key, transport))
        self._info: SandboxInfo | None = None
        self.files = Files(self)
        self.processes = Processes(self)
        self.pty = Pty(self)
        self.contexts = Contexts(self)

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = "base",
        *,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
        metadata: Mapping[str, str] | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        pids: int | None = None,
        disk_mb: int | None = None,
        workdir: str | None = None,
        user: str | None = None,
        auto_resume: bool | None = None,
        idle_timeout: int | None = None,
        snapshot_every: int | None = None,
        snapshot: str | None = None,
        network: _core.Network | None = None,
        runtime: str | None = None,
        volumes: Sequence[VolumeMount | Mapping[str, Any]] | None = None,
        mounts: Sequence[BucketMount | Mapping[str, Any]] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        transport: Any = None,
    ) -> Sandbox:
        """Start a new sandbox. ``timeout`` is its lifetime in seconds (0 = none; server default 300)."""
        # The keywords above are the one list of create options: all but url, api_key and transport go
        # into the request body by name (see _core.create_body), for both SDKs.
        body = _core.create_body(locals())

        def make() -> Sandbox:
            http = _HTTP(Config.resolve(url, api_key, transport))
            try:
                info = http.run(_core.create_sandbox(body))
            except BaseException:
                http.close()
                raise
            return cls._adopt(info, http)

        return _io.creating(make)

    @classmethod
    def _adopt(cls, info: SandboxInfo, http: _HTTP) -> Sandbox:
        sandbox = cls.__new__(cls)
        sandbox._id = info.id
        sandbox._http = http
        sandbox._info = info
        sandbox.files = Files(sandbox)
        sandbox.processes = Processes(sandbox)
        sandbox.pty = Pty(sandbox)
        sandbox.contexts = Contexts(sandbox)
        return sandbox

    @classmethod
    def connect(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> Sandbox:
        """Attach to an existing sandbox; raises :class:`~cove.errors.SandboxNotFound` if there is none."""
        http = _HTTP(Config.resolve(url, api_key, transport))
        try:
            info = http.run(_core.get_sandbox(sandbox_id))
        except BaseException:
            http.close()
            raise
        return cls._adopt(info, http)

    @classmethod
    def list(
        cls,
        *,
        state: str | Sequence[str] | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
        transport: Any = None,
    ) -> builtins.list[SandboxInfo]:
        """All sandboxes of this key's tenant, filtered by state (one or several) and metadata (all must match)."""
        return _once(_core.list_sandboxes(state=state, metadata=metadata), url, api_key, transport)

    @classmethod
    def kill_by_id(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> None:
        """Kill a sandbox by id (idempotent on a dead sandbox)."""
        _once(_core.kill_sandbox(sandbox_id), url, api_key, transport)

    @classmethod
    def list_snapshots(
        cls, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> builtins.list[SnapshotInfo]:
        """Every snapshot of the caller's tenant."""
        return _once(_core.list_snapshots(), url, api_key, transport)

    @classmethod
    def delete_snapshot(
        cls, snapshot_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> None:
        """Delete a snapshot; sandboxes started from it keep running (their layers stay)."""
        _once(_core.delete_snapshot(snapshot_id), url, api_key, transport)

    @property
    def id(self) -> str:
        return self._id

    def info(self) -> SandboxInfo:
        """Fresh information about this sandbox from the server."""
        self._info = self._http.run(_core.get_sandbox(self._id))
        return self._info

    def pause(self) -> SandboxInfo:
        """Freeze the sandbox: no CPU, memory and files kept. Calls resume it unless auto_resume=False."""
        self._info = self._http.run(_core.pause_sandbox(self._id))
        return self._info

    def resume(self) -> SandboxInfo:
        """Thaw a paused sandbox."""
        self._info = self._http.run(_core.resume_sandbox(self._id))
        return self._info

    def run_code(
        self,
        code: str,
        language: str = "python",
        context: str | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        on_result: Callable[[dict[str, Any]], Any] | None = None,
    ) -> _processes.Execution:
        """Run code in a persistent interpreter (a Jupyter kernel for python; bash keeps its shell):
        variables stay between calls; streams and rich results (``{mime: value}``) arrive as produced::

            sb.run_code("x = 41"); print(sb.run_code("x + 1").text)   # 42
        """
        execution = _processes.Execution()
        call = _processes.run_code_call(self._id, code, language, context, timeout)
        with self._http.stream(call) as response:
            for line in response.iter_lines():
                event = _processes.feed_code_event(execution, line)
                if not event:
                    continue
                kind = str(event.get("type"))
                cb = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result}.get(kind)
                if cb is not None:
                    data = event.get("text") if kind != "result" else event.get("data")
                    _io.call_back(cb, data)
        return execution

    def hibernate(self) -> SandboxInfo:
        """Release the sandbox's memory and CPU, keeping its files; the next call resumes it.

        ``info.hibernation["memory"]`` says whether its processes will continue where they were.
        """
        self._info = self._http.run(_core.hibernate_sandbox(self._id))
        return self._info

    def snapshot(
        self, name: str | None = None, memory: bool = False, volumes: SnapshotVolumes = "exclude"
    ) -> SnapshotInfo:
        """Seal the sandbox's files as they are now (and with ``memory``, its running processes);
        ``Sandbox.create(snapshot=snap.id)`` starts new sandboxes from it."""
        return self._http.run(_core.snapshot_sandbox(self._id, name, memory, volumes))

    def fork(
        self, count: int = 1, metadata: Mapping[str, str] | None = None, volumes: SnapshotVolumes = "exclude"
    ) -> builtins.list[Sandbox]:
        """``count`` new sandboxes that continue from this instant; this one keeps running.
        ``volumes="include"`` gives each its own copy of this sandbox's volumes."""
        infos = self._http.run(_core.fork_sandbox(self._id, count, metadata, volumes))
        config = self._http.config
        return [type(self)._adopt(info, _HTTP(config)) for info in infos]

    def get_url(
        self, port: int, *, expires_in: int = 3600, path: str = "/", by: Literal["host", "path"] = "host"
    ) -> str:
        """A URL that reaches a server listening on ``port`` inside the sandbox, with no API key,
        until ``expires_in`` seconds from now (a browser keeps access through a cookie). ``by="host"``
        gives ``http://{port}-{id}.{domain}/…`` (the server's ``COVE_DOMAIN``; ``*.localhost`` by
        default), ``by="path"`` gives ``{server}/v1/sandboxes/{id}/ports/{port}/…``."""
        return self._http.run(_core.port_url(self._id, port, expires_in, path, by))

    def get_network(self) -> NetworkInfo:
        """The sandbox's egress policy and its proxy's counters (docs/network.md)."""
        return self._http.run(_core.get_network(self._id))

    def set_network(
        self,
        mode: str,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        inject: Mapping[str, Mapping[str, str]] | None = None,
    ) -> NetworkInfo:
        """Replace the egress policy; new connections follow it at once. ``mode`` is ``none``,
        ``allow`` (only ``allow``, minus ``deny``), ``deny`` (all but ``deny``, plus ``allow``) or
        ``open``; rules are ``HOST[:PORTS]``: ``pypi.org``, ``*.pythonhosted.org``, ``10.0.0.0/8:443``.
        ``inject``: ``{"HOST[:PORT]": {"Header": "value"}}`` the proxy adds to plain-HTTP requests
        there (write-only; ``None`` keeps the current ones, ``{}`` removes them)."""
        return self._http.run(_core.set_network(self._id, mode, allow, deny, inject))

    def set_timeout(self, seconds: int) -> SandboxInfo:
        """Make the sandbox expire ``seconds`` from now (0 = never)."""
        self._info = self._http.run(_core.set_timeout(self._id, seconds))
        return self._info

    def set_durability(self, snapshot_every: int) -> SandboxInfo:
        """Copy the sandbox to the server's object store every ``snapshot_every`` seconds of use
        (at least 30; 0 = stop), so that losing its node costs at most that much work."""
        self._info = self._http.run(_core.set_durability(self._id, snapshot_every))
        return self._info

    def kill(self) -> None:
        """Kill the sandbox and close this object's HTTP client."""
        try:
            self._http.run(_core.kill_sandbox(self._id))
        finally:
            self.close()

    def close(self) -> None:
        """Close the HTTP client; the sandbox keeps running."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def __repr__(self) -> str:
        state = f" state={self._info.state!r}" if self._info else ""
        return f"<Sandbox id={self._id!r}{state} url={self._http.config.url!r}>"

    # -- commands -------------------------------------------------------------------------------

    def exec(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> ExecResult:
        """Run a command and wait for it. ``cmd`` is a shell string (``bash -c``) or an argv list.

        A non-zero exit code is a normal result; running past ``timeout`` seconds raises
        :class:`~cove.errors.CommandTimeout` (with the output so far). With ``on_stdout`` /
        ``on_stderr`` the output is streamed and the callbacks get each piece as it arrives::

            r = sb.exec(["ls", "-la"], cwd="/tmp")
            sb.exec("make", on_stdout=print, timeout=600)
        """
        kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "user": user, "timeout": timeout, "stdin": stdin}
        if on_stdout is None and on_stderr is None:
            return self._http.run(_core.exec_command(self._id, cmd, **kwargs))
        collector = _core.ExecCollector()
        with closing(self.exec_stream(cmd, **kwargs)) as events:
            for event in events:
                collector.feed(event)
                if event.type == "stdout":
                    _io.call_back(on_stdout, event.data)
                elif event.type == "stderr":
                    _io.call_back(on_stderr, event.data)
        return collector.result()

    def exec_stream(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        timeout: float | None = None,
        stdin: str | bytes | None = None,
    ) -> Generator[ExecEvent, None, None]:
        """Run a command and yield its :class:`ExecEvent` s as they happen; the last has type ``"exit"``.

        A timeout does not raise here: the exit event has ``timed_out=True``::

            for ev in sb.exec_stream("for i in 1 2 3; do echo $i; sleep 1; done"):
                print(ev.type, ev.data or ev.exit_code)
        """
        call = _core.exec_call(
            self._id, cmd, stream=True, cwd=cwd, env=env, user=user, timeout=timeout, stdin=stdin
        )
        with self._http.stream(call) as response:
            for line in response.iter_lines():
                event = _core.parse_event(line)
                if event is not None:
                    yield event


# ---------------------------------------------------------------------------------------- keys


def create_key(
    name: str,
    *,
    tenant: str = "default",
    admin: bool = False,
    url: str | None = None,
    api_key: str | None = None,
    transport: Any = None,
) -> ApiKey:
    """Create an API key (needs an admin key); the returned ``.key`` is shown only this once."""
    return _once(_core.create_key(name, tenant, admin), url, api_key, transport)


def list_keys(*, url: str | None = None, api_key: str | None = None, transport: Any = None) -> list[ApiKey]:
    """All API keys (needs an admin key); secrets are not included."""
    return _once(_core.list_keys(), url, api_key, transport)


def delete_key(
    key_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
) -> None:
    """Revoke an API key (needs an admin key)."""
    _once(_core.delete_key(key_id), url, api_key, transport)


def rotate_key(
    key_id: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
) -> ApiKey:
    """Give a key a new secret (needs an admin key); the old one stops working. ``.key`` is the new secret."""
    return _once(_core.rotate_key(key_id), url, api_key, transport)


def audit_log(
    *,
    tenant: str | None = None,
    action: str | list[str] | None = None,
    sandbox: str | None = None,
    since: str | float | None = None,
    limit: int = 100,
    url: str | None = None,
    api_key: str | None = None,
    transport: Any = None,
) -> list[AuditEntry]:
    """The audit log, newest first: your tenant's entries (an admin key: every tenant's, or `tenant`'s)."""
    return _once(_core.audit_log(tenant, action, sandbox, since, limit), url, api_key, transport)


class Process:
    """A process started in the background (``sandbox.processes.start``) or a terminal (``sandbox.pty``)."""

    def __init__(self, http: _HTTP, sandbox_id: str, info: _processes.ProcessInfo) -> None:
        self._http = http
        self._sandbox_id = sandbox_id
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def pid(self) -> int | None:
        return self.info.pid

    def output(self, offset: int | None = None) -> Iterator[_processes.ProcessEvent]:
        """Its output from ``offset`` (default: the oldest kept byte), history then live, until it exits."""
        call = _processes.output_call(self._sandbox_id, self.id, offset)
        with self._http.stream(call) as response:
            for line in response.iter_lines():
                event = _processes.parse_output(line)
                if event is not None:
                    yield event

    def send_stdin(self, data: str | bytes) -> None:
        self._http.run(_processes.send_stdin(self._sandbox_id, self.id, data))

    def close_stdin(self) -> None:
        self._http.run(_processes.close_stdin(self._sandbox_id, self.id))

    def signal(self, sig: str | int = "SIGTERM") -> None:
        self._http.run(_processes.signal(self._sandbox_id, self.id, sig))

    def kill(self) -> None:
        self._http.run(_processes.kill(self._sandbox_id, self.id))

    def resize(self, rows: int, cols: int) -> None:
        self._http.run(_processes.resize(self._sandbox_id, self.id, rows, cols))

    def wait(self, timeout: float = 30) -> _processes.ProcessInfo:
        """Wait up to ``timeout`` seconds; the result's ``running`` says whether it is still running."""
        self.info = self._http.run(_processes.wait(self._sandbox_id, self.id, timeout))
        return self.info


class Processes:
    """Background processes of one sandbox: ``sandbox.processes``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def start(
        self,
        cmd: Command,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stdin: bool = False,
        pty: tuple[int, int] | None = None,
        tag: str | None = None,
    ) -> Process:
        """Start ``cmd`` in the background and return at once; it outlives this call and this client."""
        op = _processes.start(
            self._sandbox.id, cmd, cwd=cwd, env=env, user=user, stdin=stdin, pty=pty, tag=tag
        )
        info = self._sandbox._http.run(op)
        return Process(self._sandbox._http, self._sandbox.id, info)

    def list(self) -> list[_processes.ProcessInfo]:
        return self._sandbox._http.run(_processes.list_all(self._sandbox.id))

    def connect(self, process_id: str) -> Process:
        """A handle on a process started earlier (by anyone), to read its output or send it input."""
        info = self._sandbox._http.run(_processes.get(self._sandbox.id, process_id))
        return Process(self._sandbox._http, self._sandbox.id, info)


class Pty:
    """Terminals: ``sandbox.pty.create()`` runs a shell (or ``cmd``) in a pseudo-terminal."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(
        self,
        cmd: Command = "bash -l",
        *,
        rows: int = 24,
        cols: int = 80,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> Process:
        return self._sandbox.processes.start(cmd, cwd=cwd, env=env, user=user, pty=(rows, cols))


class Contexts:
    """Code contexts of one sandbox: ``sandbox.contexts``."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(
        self, language: str = "python", cwd: str | None = None, env: Mapping[str, str] | None = None
    ) -> _processes.ContextInfo:
        return self._sandbox._http.run(_processes.create_context(self._sandbox.id, language, cwd, env))

    def list(self) -> list[_processes.ContextInfo]:
        return self._sandbox._http.run(_processes.list_contexts(self._sandbox.id))

    def restart(self, context_id: str) -> None:
        self._sandbox._http.run(_processes.restart_context(self._sandbox.id, context_id))

    def delete(self, context_id: str) -> None:
        self._sandbox._http.run(_processes.delete_context(self._sandbox.id, context_id))
