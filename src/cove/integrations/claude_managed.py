"""Claude Managed Agents self-hosted environments, with each session's tools in a cove sandbox.

A self-hosted Managed Agents environment is a work queue: every session the agent runs becomes a
work item that a worker claims, and the worker then executes the session's ``agent.tool_use``
events and posts their results. ``anthropic``'s :class:`EnvironmentWorker` does the queue side;
this module gives it tools that run in cove::

    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import EnvironmentWorker
    from cove.integrations.claude_managed import cove_tool_factory

    worker = EnvironmentWorker(
        AsyncAnthropic(), environment_id="env_...", environment_key="...",
        tools=cove_tool_factory(template="base", on_session_end="hibernate"),
    )
    await worker.run()

Each session gets its own sandbox, made when the session's first tool runs (or woken, when the
session had one hibernated by an earlier work item). Its working directory (``/workspace`` by
default) receives the session agent's skills and memory stores, which the worker downloads on the
host. When the session ends the worker's tool runner calls every tool's ``close`` hook: the
memory stores are copied back to the host (so the worker's final memory sync uploads what the agent
changed) and the sandbox is hibernated (files and processes kept, for the session's next work item)
or killed. ``cove worker`` (the CLI) wraps all of this.

The six tools have the names and input schemas of Anthropic's ``agent_toolset_20260401`` (bash,
read, write, edit, glob, grep); their bodies are :mod:`cove.integrations.toolset`.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import posixpath
import shlex
import tarfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import anyio

from cove.errors import CoveError
from cove.integrations.toolset import DEFAULT_MAX_FILE_BYTES, TOOL_DEFINITIONS, Toolset, ToolsetError
from cove.sdk import AsyncSandbox

if TYPE_CHECKING:
    from anthropic.lib.tools import BetaAsyncFunctionTool
    from anthropic.lib.tools.agent_toolset import AgentToolContext

__all__ = [
    "DEFAULT_WORKDIR",
    "SESSION_METADATA_KEY",
    "OnSessionEnd",
    "SessionSandbox",
    "cove_tool_factory",
    "cove_toolset",
    "require_anthropic",
    "run_worker",
]

log = logging.getLogger(__name__)

OnSessionEnd = Literal["hibernate", "kill"]
# Sandbox metadata naming the Managed Agents session it serves: a later work item of the same
# session (a dormant session that got a new message) finds and wakes it.
SESSION_METADATA_KEY = "anthropic.session"
ENVIRONMENT_METADATA_KEY = "anthropic.environment"
DEFAULT_WORKDIR = "/workspace"
DEFAULT_TIMEOUT = 3600
DEFAULT_KEEP_HIBERNATED = 7 * 86400
_MAX_TIMEOUT = 30 * 86400  # the server's limit
_LIVE = ("running", "paused", "hibernated")
FILES_BETA = "files-api-2025-04-14"


def require_anthropic() -> None:
    """Raise a readable ImportError when the ``anthropic`` package (the ``cove[claude]`` extra) is missing."""
    try:
        import anthropic.lib.environments
        import anthropic.lib.tools.agent_toolset  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the Claude Managed Agents integration needs the anthropic package (>= 2.14): "
            "pip install 'cove[claude]'"
        ) from e


def _max_file_bytes(ctx: AgentToolContext) -> int | None:
    """The context's cap for whole-file reads and edits (its ``not_given`` means the default)."""
    value = getattr(ctx, "max_file_bytes", None)
    return value if value is None or isinstance(value, int) else DEFAULT_MAX_FILE_BYTES


def _session_id(ctx: AgentToolContext) -> str | None:
    session = getattr(ctx, "session", None)
    return getattr(session, "id", None) or getattr(ctx, "session_id", None)


class SessionSandbox:
    """The cove sandbox of one Managed Agents session.

    :meth:`get` makes it on first use (or wakes the sandbox an earlier work item of the same session
    hibernated) and keeps extending its timeout while tools run; :meth:`end` copies writable memory
    stores back to the host and hibernates or kills it. Both are safe to call concurrently, and
    ``end`` more than once.
    """

    def __init__(
        self,
        ctx: AgentToolContext,
        *,
        template: str = "base",
        on_session_end: OnSessionEnd = "hibernate",
        workdir: str = DEFAULT_WORKDIR,
        timeout: int = DEFAULT_TIMEOUT,
        keep_hibernated: int = DEFAULT_KEEP_HIBERNATED,
        env: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        if on_session_end not in get_args(OnSessionEnd):
            raise ValueError(f"on_session_end must be 'hibernate' or 'kill', not {on_session_end!r}")
        if not posixpath.isabs(workdir):
            raise ValueError(f"workdir must be an absolute path in the sandbox, not {workdir!r}")
        if not 60 <= timeout <= _MAX_TIMEOUT:
            raise ValueError(f"timeout must be 60 to {_MAX_TIMEOUT} seconds, not {timeout}")
        if not 0 <= keep_hibernated <= _MAX_TIMEOUT:
            raise ValueError(
                f"keep_hibernated must be 0 (forever) to {_MAX_TIMEOUT} seconds, not {keep_hibernated}"
            )
        self.ctx = ctx
        self.session_id = _session_id(ctx)
        self.template = template
        self.on_session_end: OnSessionEnd = on_session_end
        self.workdir = posixpath.normpath(workdir)
        self.timeout = timeout
        self.keep_hibernated = keep_hibernated
        # ctx.env is the reference toolset's bash environment; here it becomes the sandbox's.
        self.env = {**(getattr(ctx, "env", None) or {}), **(env or {})}
        self.metadata = dict(metadata or {})
        self.url = url
        self.api_key = api_key
        self._sandbox: AsyncSandbox | None = None
        self._lock = anyio.Lock()
        self._ended = False
        self._extended_at = 0.0
        self._toolset: Toolset | None = None
        self._user: str | None = None  # the sandbox's user, who owns the workdir

    @property
    def sandbox(self) -> AsyncSandbox | None:
        """The sandbox, once a tool has run (``None`` before)."""
        return self._sandbox

    @property
    def ended(self) -> bool:
        return self._ended

    async def get(self) -> AsyncSandbox:
        """The session's sandbox, made or woken on first use."""
        async with self._lock:
            if self._ended:
                raise RuntimeError("this session has ended; its sandbox is no longer served")
            if self._sandbox is None:
                self._sandbox = await self._open()
                self._extended_at = time.monotonic()
            elif time.monotonic() - self._extended_at > self.timeout / 2:
                # The timeout only reaps sandboxes whose worker vanished: keep a busy one alive.
                try:
                    await self._sandbox.set_timeout(self.timeout)
                except CoveError as e:
                    if e.status not in (404, 409):
                        raise
                    # No tool ran for longer than the timeout and cove reaped it: start afresh.
                    log.warning(
                        "session %s: sandbox %s is gone (%s); making a new one",
                        self.session_id,
                        self._sandbox.id,
                        e,
                    )
                    await self._sandbox.close()
                    self._sandbox = self._toolset = None
                    self._sandbox = await self._open()
                self._extended_at = time.monotonic()
            return self._sandbox

    async def toolset(self) -> Toolset:
        """The six tools over the session's sandbox, with its one persistent bash shell."""
        sb = await self.get()
        if self._toolset is None or self._toolset.sandbox is not sb:
            self._toolset = Toolset(sb, workdir=self.workdir, max_file_bytes=_max_file_bytes(self.ctx))
        return self._toolset

    async def end(self) -> None:
        """Copy writable memory stores back to the host, then hibernate or kill the sandbox."""
        async with self._lock:
            if self._ended:
                return
            self._ended = True
            sb = self._sandbox
        if sb is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                try:
                    if self._toolset is not None:
                        await self._toolset.close()  # the shell: a later work item starts a fresh one
                    await self._pull_memory(sb)
                finally:
                    if self.on_session_end == "kill":
                        await sb.kill()
                    else:
                        # Hibernate first: if that fails the sandbox keeps its short timeout, not the long one.
                        await sb.hibernate()
                        await sb.set_timeout(self.keep_hibernated)
                        log.info("session %s: hibernated sandbox %s", self.session_id, sb.id)
        finally:
            await sb.close()

    # ------------------------------------------------------------------------------- making

    async def _open(self) -> AsyncSandbox:
        conn = {"url": self.url, "api_key": self.api_key}
        sb = None
        fresh = False
        if self.session_id:
            found = await AsyncSandbox.list(
                state=list(_LIVE), metadata={SESSION_METADATA_KEY: self.session_id}, **conn
            )
            if found:
                latest = max(found, key=lambda info: info.created_at or 0)  # type: ignore[arg-type,return-value]
                sb = await AsyncSandbox.connect(latest.id, **conn)
                await sb.set_timeout(self.timeout)
                log.info("session %s: woke sandbox %s (%s)", self.session_id, sb.id, latest.state)
        if sb is None:
            metadata = dict(self.metadata)
            if self.session_id:
                metadata[SESSION_METADATA_KEY] = self.session_id
            session = getattr(self.ctx, "session", None)
            if getattr(session, "environment_id", None):
                metadata[ENVIRONMENT_METADATA_KEY] = session.environment_id  # type: ignore[union-attr]
            sb = await AsyncSandbox.create(
                self.template, env=self.env, timeout=self.timeout, metadata=metadata, **conn
            )
            fresh = True
            log.info("session %s: created sandbox %s", self.session_id, sb.id)
        try:
            await self._root(sb, f"mkdir -p {shlex.quote(self.workdir)}", self.workdir, writable=True)
            await self._push_inputs(sb)
            if fresh:
                await self._push_file_resources(sb)  # a woken sandbox has them, maybe edited
        except BaseException:
            with anyio.CancelScope(shield=True):
                # A new sandbox that could not be prepared is useless; a woken one still holds the session's work.
                await (sb.kill() if fresh else sb.close())
            raise
        return sb

    async def _root(self, sb: AsyncSandbox, script: str, path: str, *, writable: bool) -> None:
        """Run ``script`` as root, then give ``path`` to the sandbox's user (or make it read-only)."""
        if self._user is None:
            self._user = (await sb.info()).user or "user"
        user = self._user
        owner = (
            f"chown -R {shlex.quote(user)}: {shlex.quote(path)}"
            if writable
            else (f"chmod -R a-w {shlex.quote(path)}")
        )
        r = await sb.exec(f"set -e; {script}; {owner}", user="root", timeout=120)
        if r.exit_code != 0:
            raise CoveError(f"preparing {path} in sandbox {sb.id} failed: {r.stderr.strip() or r.stdout}")

    def sandbox_path(self, host_path: str | os.PathLike[str]) -> str:
        """Where a host path of the worker (its workdir, a memory store) lives in the sandbox:
        under the sandbox workdir when it is inside the host workdir, else at the same path."""
        host = Path(host_path).resolve()
        try:
            rel = host.relative_to(Path(self.ctx.workdir).resolve())
        except ValueError:
            return host.as_posix()
        return posixpath.normpath(posixpath.join(self.workdir, rel.as_posix()))

    def _inputs(self) -> list[tuple[Path, bool]]:
        """Host directories to copy in: (path, writable). Skills are read-only for the agent."""
        dirs: list[tuple[Path, bool]] = [(Path(d), False) for d in getattr(self.ctx, "_skill_dirs", [])]
        read_only = {Path(p).resolve() for p in getattr(self.ctx, "read_only_roots", [])}
        for root in getattr(self.ctx, "allowed_roots", []):
            dirs.append((Path(root), Path(root).resolve() not in read_only))
        return [(d, w) for d, w in dirs if d.is_dir()]

    async def _push_inputs(self, sb: AsyncSandbox) -> None:
        for host_dir, writable in self._inputs():
            dest = self.sandbox_path(host_dir)
            data = await anyio.to_thread.run_sync(_tar_dir, host_dir)
            staging = f"/tmp/.cove-in-{uuid.uuid4().hex}.tar"
            await sb.files.write(staging, data)
            await self._root(
                sb,
                f"rm -rf {shlex.quote(dest)}; mkdir -p {shlex.quote(dest)}; "
                f"tar -xf {staging} -C {shlex.quote(dest)} --no-same-owner; rm -f {staging}",
                dest,
                writable=writable,
            )

    async def _push_file_resources(self, sb: AsyncSandbox) -> None:
        """The session's ``file`` resources, downloaded through the worker's client to their mount paths."""
        session = getattr(self.ctx, "session", None)
        client = getattr(self.ctx, "client", None)
        for resource in getattr(session, "resources", None) or []:
            kind = getattr(resource, "type", None)
            if kind == "github_repository":
                log.warning("session %s: github_repository resources are not mounted", self.session_id)
            if kind != "file" or client is None:
                continue
            dest = posixpath.normpath(posixpath.join(self.workdir, resource.mount_path))
            try:
                response = await client.beta.files.download(resource.file_id, betas=[FILES_BETA])
                data = await response.read()
            except Exception as e:  # the agent sees the file missing; the worker's log says why
                log.warning("session %s: could not download %s: %s", self.session_id, resource.file_id, e)
                continue
            await sb.files.write(dest, data, user="root")
            await self._root(sb, "true", dest, writable=True)

    async def _pull_memory(self, sb: AsyncSandbox) -> None:
        """Mirror the writable memory stores from the sandbox back to the host."""
        skills = {Path(d) for d in getattr(self.ctx, "_skill_dirs", [])}
        for host_dir, writable in self._inputs():
            if not writable or host_dir in skills:
                continue
            src = self.sandbox_path(host_dir)
            staging = f"/tmp/.cove-out-{uuid.uuid4().hex}.tar"
            r = await sb.exec(f"tar -cf {staging} -C {shlex.quote(src)} .", user="root", timeout=120)
            if r.exit_code != 0:
                log.warning("could not copy %s back from sandbox %s: %s", src, sb.id, r.stderr.strip())
                continue
            data = await sb.files.read(staging, format="bytes")
            await sb.exec(["rm", "-f", staging], user="root")
            await anyio.to_thread.run_sync(_mirror_tar, data, host_dir)


def _tar_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def _mirror_tar(data: bytes, dest: Path) -> None:
    """Make ``dest`` hold exactly the regular files of the tar, touching only files that differ
    (the worker's memory sync uploads what changed and deletes what is gone)."""
    new: dict[Path, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            rel = Path(posixpath.normpath(member.name))
            # Only regular files at paths inside dest: links and odd names from the sandbox are skipped.
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
                continue
            body = tar.extractfile(member)
            if body is not None:
                new[rel] = body.read()
    for old in [p for p in dest.rglob("*") if p.is_file() or p.is_symlink()]:
        if old.relative_to(dest) not in new:
            old.unlink()
    for rel, body in new.items():
        target = dest / rel
        if target.is_file() and not target.is_symlink() and target.read_bytes() == body:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_bytes(body)


# ---------------------------------------------------------------------------------------- tools


def cove_toolset(
    ctx: AgentToolContext,
    *,
    template: str = "base",
    on_session_end: OnSessionEnd = "hibernate",
    workdir: str = DEFAULT_WORKDIR,
    timeout: int = DEFAULT_TIMEOUT,
    keep_hibernated: int = DEFAULT_KEEP_HIBERNATED,
    env: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> list[BetaAsyncFunctionTool[Any]]:
    """The ``agent_toolset_20260401`` tools for one session, running in its own cove sandbox.

    Pass it (or :func:`cove_tool_factory` with options) as ``EnvironmentWorker(tools=...)``. The
    sandbox is made when the first tool runs; every tool's ``close`` ends it (hibernate or kill),
    which the session tool runner calls when the session is over. ``url``/``api_key`` default to
    ``COVE_URL``/``COVE_API_KEY``.
    """
    require_anthropic()
    session = SessionSandbox(
        ctx,
        template=template,
        on_session_end=on_session_end,
        workdir=workdir,
        timeout=timeout,
        keep_hibernated=keep_hibernated,
        env=env,
        metadata=metadata,
        url=url,
        api_key=api_key,
    )
    return _build_tools(session)


def cove_tool_factory(**options: Any) -> Callable[[AgentToolContext], list[BetaAsyncFunctionTool[Any]]]:
    """``cove_toolset`` with its options bound: ``EnvironmentWorker(tools=cove_tool_factory(template="py"))``."""
    require_anthropic()
    return functools.partial(cove_toolset, **options)


def _build_tools(session: SessionSandbox) -> list[BetaAsyncFunctionTool[Any]]:
    from anthropic.lib.tools import beta_async_tool

    tools = []
    for definition in TOOL_DEFINITIONS:
        tool = beta_async_tool(
            name=definition["name"],
            description=definition["description"],
            input_schema=definition["input_schema"],
        )(_tool_function(session, definition["name"]))
        tool.close = session.end  # the session tool runner calls every tool's close when the session ends
        tool.cove_session = session  # type: ignore[attr-defined]  # e.g. tool.cove_session.sandbox.id
        tools.append(tool)
    return tools


def _tool_function(session: SessionSandbox, name: str) -> Callable[..., Awaitable[Any]]:
    from anthropic.lib.tools import ToolError

    async def run(**arguments: Any) -> Any:
        try:
            toolset = await session.toolset()
            return await toolset.call(name, arguments)
        except ToolsetError as e:
            raise ToolError(str(e)) from e
        except (CoveError, RuntimeError) as e:
            # The sandbox itself failed (gone, unreachable, session over): still the model's answer.
            raise ToolError(f"{name}: sandbox error: {e}") from e

    run.__name__ = name
    return run


# ---------------------------------------------------------------------------------------- worker


async def run_worker(
    *,
    environment_id: str | None,
    environment_key: str | None,
    single_item: bool = False,
    concurrency: int = 1,
    host_workdir: str | os.PathLike[str] | None = None,
    client: Any = None,
    max_idle: float | None = None,
    **toolset_options: Any,
) -> None:
    """Serve a self-hosted environment's sessions with tools in cove sandboxes.

    Polls forever with ``concurrency`` workers (each serves one session at a time), or serves the one
    work item named by the ``ANTHROPIC_*`` variables that ``ant ... worker poll --on-work`` sets
    (``single_item``). ``host_workdir`` is where skills and memory stores are downloaded before they
    are copied into the sandbox (default: the current directory, as the stock worker does).
    """
    require_anthropic()
    from anthropic import AsyncAnthropic
    from anthropic.lib.environments import DEFAULT_MAX_IDLE, EnvironmentWorker

    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    client = client or AsyncAnthropic()
    tools = cove_tool_factory(**toolset_options)
    base = Path(host_workdir) if host_workdir is not None else Path.cwd()

    def make(index: int) -> EnvironmentWorker:
        # Each worker downloads skills into its own directory: two sessions may use same-named skills.
        workdir = base / f"worker-{index}" if concurrency > 1 else base
        workdir.mkdir(parents=True, exist_ok=True)
        return EnvironmentWorker(
            client,
            environment_id=environment_id,
            environment_key=environment_key,
            tools=tools,
            workdir=workdir,
            max_idle=DEFAULT_MAX_IDLE if max_idle is None else max_idle,
        )

    if single_item:
        await make(0).handle_item(environment_id=environment_id, environment_key=environment_key)
        return
    async with anyio.create_task_group() as tg:
        for index in range(concurrency):
            tg.start_soon(make(index).run)
