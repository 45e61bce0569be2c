"""An MCP server that gives an agent a cove sandbox: Claude Managed Agents' six tools, plus sandbox management.

``cove mcp`` runs it (stdio or streamable HTTP); :func:`create_server` builds it in-process::

    from mcp import Client
    from cove.integrations.mcp_server import create_server

    async with Client(create_server(template="base")) as client:
        await client.call_tool("bash", {"command": "echo hi"})

Tools:

- ``bash``, ``read``, ``write``, ``edit``, ``glob``, ``grep``: names and input schemas identical to
  ``agent_toolset_20260401`` (see :mod:`cove.integrations.toolset`); they act on the session's *current*
  sandbox. Their schemas allow extra properties, so a program may also pass ``sandbox_id`` to aim one call
  at another sandbox; a model uses ``sandbox_use`` instead.
- ``sandbox_create``, ``sandbox_use``, ``sandbox_list``, ``sandbox_kill``, ``sandbox_snapshot``,
  ``sandbox_fork``, ``expose_port``.

Sessions: an MCP session has one current sandbox, bound with ``sandbox_id=`` (``--sandbox``) or created at
its first tool call. When the session ends, every sandbox it worked in is hibernated (``on_end="hibernate"``,
the default: files and processes kept on disk, resumed by the next call), or left running (``"keep"``),
or killed (``"kill"``). A session is the server's lifetime on stdio and for an in-process client, and one
``Mcp-Session-Id`` over streamable HTTP (stateless HTTP requests share one server-wide session).

Errors come back as tool errors (``is_error``) with the toolset's wording; the server never crashes on them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.tools import Tool
    from mcp.types import (
        BlobResourceContents,
        CallToolResult,
        EmbeddedResource,
        ImageContent,
        TextContent,
        ToolAnnotations,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("cove's MCP server needs the mcp package: pip install 'cove[mcp]'") from exc

from cove.errors import CoveError, SandboxNotFound
from cove.integrations.toolset import TOOL_DEFINITIONS, Toolset, ToolsetError
from cove.sdk.aio import AsyncSandbox
from cove.sdk.models import SandboxInfo

__all__ = ["MANAGEMENT_TOOLS", "OnEnd", "SandboxSession", "create_server"]

log = logging.getLogger("cove.mcp")

OnEnd = Literal["hibernate", "keep", "kill"]
MANAGEMENT_TOOLS = (
    "sandbox_create",
    "sandbox_use",
    "sandbox_list",
    "sandbox_kill",
    "sandbox_snapshot",
    "sandbox_fork",
    "expose_port",
)
CREATED_BY = {"created_by": "cove-mcp"}  # metadata on the sandboxes this server creates
INSTRUCTIONS = (
    "Tools run in a cove sandbox (an isolated Linux machine, user 'user', home /home/user). bash keeps one "
    "persistent shell; read/write/edit/glob/grep take sandbox paths (relative ones resolve in the sandbox's "
    "working directory). The session's sandbox is created at the first tool call, or chosen with "
    "sandbox_use / sandbox_create; sandbox_list shows the others. When the session ends the sandbox is "
    "hibernated, not deleted: sandbox_use <id> in a later session continues with its files."
)


@dataclass
class Options:
    url: str | None = None
    api_key: str | None = None
    template: str = "base"
    sandbox_id: str | None = None
    on_end: OnEnd = "hibernate"
    timeout: int = 3600  # seconds a sandbox of this server outlives a client that stopped using it
    keep_hibernated: int = 7 * 86400  # seconds a hibernated one is kept; 0: forever


@dataclass
class SandboxSession:
    """The sandboxes one MCP session works with: the current one, and a shell for each it touched.

    Sandboxes this server made (metadata ``created_by=cove-mcp``) get ``timeout`` renewed while they are
    used and ``keep_hibernated`` once hibernated, so a vanished client leaves nothing forever; the
    timeouts of other sandboxes are left alone.
    """

    options: Options
    current_id: str | None = None
    sandboxes: dict[str, AsyncSandbox] = field(default_factory=dict)
    toolsets: dict[str, Toolset] = field(default_factory=dict)
    managed: set[str] = field(default_factory=set)
    renewed_at: dict[str, float] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False

    def __post_init__(self) -> None:
        if self.current_id is None:
            self.current_id = self.options.sandbox_id

    def _client(self) -> dict[str, Any]:
        return {"url": self.options.url, "api_key": self.options.api_key}

    async def attach(self, sandbox_id: str) -> AsyncSandbox:
        """A handle on ``sandbox_id`` (remembered: the session's end hibernates it)."""
        if sandbox_id not in self.sandboxes:
            sb = await AsyncSandbox.connect(sandbox_id, **self._client())
            if (await sb.info()).metadata.get("created_by") == CREATED_BY["created_by"]:
                self.managed.add(sb.id)
            self.sandboxes[sandbox_id] = sb
        sb = self.sandboxes[sandbox_id]
        await self._renew(sb)
        return sb

    async def _renew(self, sb: AsyncSandbox) -> None:
        if sb.id not in self.managed or not self.options.timeout:
            return
        now = time.monotonic()
        if now - self.renewed_at.get(sb.id, -1e9) > min(60, self.options.timeout / 2):
            self.renewed_at[sb.id] = now
            await sb.set_timeout(self.options.timeout)

    async def create(self, template: str | None = None, **kwargs: Any) -> AsyncSandbox:
        metadata = {**CREATED_BY, **(kwargs.pop("metadata", None) or {})}
        sb = await AsyncSandbox.create(
            template or self.options.template,
            metadata=metadata,
            timeout=self.options.timeout,
            **kwargs,
            **self._client(),
        )
        self.sandboxes[sb.id] = sb
        self.managed.add(sb.id)
        self.renewed_at[sb.id] = time.monotonic()
        return sb

    async def sandbox(self, sandbox_id: str | None = None) -> AsyncSandbox:
        """The sandbox a call acts on: ``sandbox_id``, else the current one (created if there is none)."""
        if self.closed:
            raise ToolsetError("this MCP session has ended")
        if sandbox_id:
            return await self.attach(sandbox_id)
        async with self.lock:  # two first calls at once must not create two sandboxes
            if self.current_id is None:
                self.current_id = (await self.create()).id
        return await self.attach(self.current_id)

    async def toolset(self, sandbox_id: str | None = None) -> Toolset:
        sb = await self.sandbox(sandbox_id)
        if sb.id not in self.toolsets:
            self.toolsets[sb.id] = Toolset(sb)
        return self.toolsets[sb.id]

    async def use(self, sandbox_id: str) -> AsyncSandbox:
        sb = await self.attach(sandbox_id)
        self.current_id = sb.id
        return sb

    async def forget(self, sandbox_id: str) -> None:
        """Drop a sandbox that no longer exists (killed)."""
        toolset = self.toolsets.pop(sandbox_id, None)
        if toolset is not None:
            await toolset.close()
        sb = self.sandboxes.pop(sandbox_id, None)
        if sb is not None:
            await sb.close()
        if self.current_id == sandbox_id:
            self.current_id = None

    async def close(self) -> None:
        """The session ended: stop its shells, then hibernate (or keep, or kill) the sandboxes it used."""
        if self.closed:
            return
        self.closed = True
        for toolset in self.toolsets.values():
            await toolset.close()
        for sb in self.sandboxes.values():
            try:
                if self.options.on_end == "kill":
                    await sb.kill()
                elif self.options.on_end == "hibernate" and (await sb.info()).state in ("running", "paused"):
                    if sb.id in self.managed:
                        await sb.set_timeout(self.options.keep_hibernated)
                    await sb.hibernate()
                    log.info("hibernated sandbox %s", sb.id)
            except CoveError as e:
                log.warning("could not %s sandbox %s at session end: %s", self.options.on_end, sb.id, e)
            finally:
                await sb.close()


@dataclass(eq=False)  # kept in a set
class _ServerState:
    """Lifespan state: the default session, and one per HTTP session id."""

    options: Options
    default: SandboxSession
    by_id: dict[str, SandboxSession] = field(default_factory=dict)

    async def close(self) -> None:
        for session in [self.default, *self.by_id.values()]:
            await session.close()


def _session(ctx: Context) -> SandboxSession:
    state: _ServerState = ctx.request_context.lifespan_context
    # mcp 2.x keeps the per-client Connection on the request's session; over streamable HTTP its
    # session_id names the MCP session, and its exit_stack unwinds when that session ends.
    connection = getattr(ctx.request_context.session, "_connection", None)
    session_id = getattr(connection, "session_id", None)
    if not session_id:
        return state.default
    session = state.by_id.get(session_id)
    if session is None:
        session = state.by_id[session_id] = SandboxSession(state.options)

        async def end() -> None:
            state.by_id.pop(session_id, None)
            await _shielded(session.close())

        connection.exit_stack.push_async_callback(end)  # type: ignore[union-attr]
    return session


async def _shielded(aw: Awaitable[None]) -> None:
    """Finish cleanup even when the surrounding task is being cancelled (a server shutting down)."""
    import anyio

    with anyio.CancelScope(shield=True):
        await aw


# --- results ---------------------------------------------------------------------------------------------


def _text(text: str, is_error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=is_error)


def _content(result: str | list[dict[str, Any]], file_path: str = "") -> CallToolResult:
    if isinstance(result, str):
        return _text(result)
    blocks: list[Any] = []
    for block in result:
        source = block["source"]
        if block["type"] == "image":
            blocks.append(ImageContent(type="image", data=source["data"], mime_type=source["media_type"]))
        else:  # a PDF: MCP has no document block, an embedded resource carries it
            uri = f"file://{file_path}" if file_path.startswith("/") else f"file:///{file_path}"
            resource = BlobResourceContents(uri=uri, mime_type=source["media_type"], blob=source["data"])
            blocks.append(EmbeddedResource(type="resource", resource=resource))
    return CallToolResult(content=blocks)


async def _guarded(action: Callable[[], Awaitable[CallToolResult]]) -> CallToolResult:
    """Run a tool body; every failure becomes a tool error with readable text."""
    try:
        return await action()
    except ToolsetError as e:
        return _text(str(e), is_error=True)
    except SandboxNotFound as e:
        return _text(f"sandbox not found: {e.message}{_HINT}", is_error=True)
    except CoveError as e:
        hint = _HINT if e.code == "not_running" else ""
        return _text(f"cove: {e.message or type(e).__name__}{hint}", is_error=True)
    except Exception as e:
        log.exception("tool failed")
        return _text(f"internal error: {type(e).__name__}: {e}", is_error=True)


_HINT = " (sandbox_create makes a new sandbox; sandbox_list shows the others)"


def _info(sb_info: SandboxInfo, current: str | None) -> dict[str, Any]:
    return {
        "id": sb_info.id,
        "state": sb_info.state,
        "template": sb_info.template,
        "workdir": sb_info.workdir,
        "created_at": sb_info.created_at.isoformat() if sb_info.created_at else None,
        "metadata": sb_info.metadata,
        "current": sb_info.id == current,
    }


def _json(value: Any) -> CallToolResult:
    return _text(json.dumps(value, indent=1))


# --- the six toolset tools -------------------------------------------------------------------------------


async def bash(
    ctx: Context,
    command: str | None = None,
    restart: bool | None = None,
    timeout_ms: int | None = None,
    sandbox_id: str | None = None,
) -> CallToolResult:
    async def body() -> CallToolResult:
        toolset = await _session(ctx).toolset(sandbox_id)
        return _text(await toolset.bash(command, restart, timeout_ms))

    return await _guarded(body)


async def read(
    ctx: Context, file_path: str, view_range: list[int] | None = None, sandbox_id: str | None = None
) -> CallToolResult:
    async def body() -> CallToolResult:
        toolset = await _session(ctx).toolset(sandbox_id)
        result = await toolset.read(file_path, view_range)
        return _content(
            result, file_path if file_path.startswith("/") else f"{await toolset.workdir()}/{file_path}"
        )

    return await _guarded(body)


async def write(ctx: Context, file_path: str, content: str, sandbox_id: str | None = None) -> CallToolResult:
    async def body() -> CallToolResult:
        return _text(await (await _session(ctx).toolset(sandbox_id)).write(file_path, content))

    return await _guarded(body)


async def edit(
    ctx: Context,
    file_path: str,
    old_string: str,
    new_string: str,
    replace_all: bool | None = None,
    sandbox_id: str | None = None,
) -> CallToolResult:
    async def body() -> CallToolResult:
        toolset = await _session(ctx).toolset(sandbox_id)
        return _text(await toolset.edit(file_path, old_string, new_string, replace_all))

    return await _guarded(body)


async def glob(
    ctx: Context, pattern: str, path: str | None = None, sandbox_id: str | None = None
) -> CallToolResult:
    async def body() -> CallToolResult:
        return _text(await (await _session(ctx).toolset(sandbox_id)).glob(pattern, path))

    return await _guarded(body)


async def grep(
    ctx: Context, pattern: str, path: str | None = None, sandbox_id: str | None = None
) -> CallToolResult:
    async def body() -> CallToolResult:
        return _text(await (await _session(ctx).toolset(sandbox_id)).grep(pattern, path))

    return await _guarded(body)


# --- sandbox management ----------------------------------------------------------------------------------


async def sandbox_create(
    ctx: Context,
    template: str | None = None,
    snapshot: str | None = None,
    metadata: dict[str, str] | None = None,
    use: bool = True,
) -> CallToolResult:
    """Create a new sandbox (from a template, default the server's, or from a snapshot id) and, unless
    use=false, make it this session's current sandbox. Returns its id and state."""

    async def body() -> CallToolResult:
        session = _session(ctx)
        sb = await session.create(template, snapshot=snapshot, metadata=metadata)
        if use:
            session.current_id = sb.id
        return _json(_info(await sb.info(), session.current_id))

    return await _guarded(body)


async def sandbox_use(ctx: Context, sandbox_id: str) -> CallToolResult:
    """Make an existing sandbox (e.g. one from an earlier session, see sandbox_list) this session's current
    sandbox: bash, read, write, edit, glob and grep act on it from now on. A hibernated one resumes."""

    async def body() -> CallToolResult:
        session = _session(ctx)
        sb = await session.use(sandbox_id)
        return _json(_info(await sb.info(), session.current_id))

    return await _guarded(body)


async def sandbox_list(ctx: Context, all: bool = False) -> CallToolResult:
    """List sandboxes that are running, paused or hibernated (all=true: those of every creator, not only
    the ones cove's MCP server created). "current" marks this session's sandbox."""

    async def body() -> CallToolResult:
        session = _session(ctx)
        infos = await AsyncSandbox.list(
            state=["running", "paused", "hibernated"],
            metadata=None if all else CREATED_BY,
            url=session.options.url,
            api_key=session.options.api_key,
        )
        return _json([_info(i, session.current_id) for i in infos])

    return await _guarded(body)


async def sandbox_kill(ctx: Context, sandbox_id: str | None = None) -> CallToolResult:
    """Kill a sandbox (default: the current one) and delete its files. The next tool call creates a new
    sandbox if the current one was killed."""

    async def body() -> CallToolResult:
        session = _session(ctx)
        target = sandbox_id or session.current_id
        if target is None:
            return _text("sandbox_kill: this session has no sandbox yet; pass sandbox_id", is_error=True)
        await AsyncSandbox.kill_by_id(target, url=session.options.url, api_key=session.options.api_key)
        await session.forget(target)
        return _text(f"killed {target}")

    return await _guarded(body)


async def sandbox_snapshot(
    ctx: Context, name: str | None = None, sandbox_id: str | None = None
) -> CallToolResult:
    """Save the files of a sandbox (default: the current one) as they are now; sandbox_create with
    snapshot=<id> starts new sandboxes from it."""

    async def body() -> CallToolResult:
        snap = await (await _session(ctx).sandbox(sandbox_id)).snapshot(name)
        return _json({"snapshot_id": snap.id, "name": snap.name, "sandbox_id": snap.sandbox_id})

    return await _guarded(body)


async def sandbox_fork(ctx: Context, count: int = 1, sandbox_id: str | None = None) -> CallToolResult:
    """Fork a sandbox (default: the current one) into `count` new sandboxes that continue from this instant
    (files and running processes); the current sandbox stays current. Returns the new ids."""

    async def body() -> CallToolResult:
        session = _session(ctx)
        children = await (await session.sandbox(sandbox_id)).fork(count, metadata=CREATED_BY)
        for child in children:
            await child.close()
        return _json({"sandbox_ids": [c.id for c in children]})

    return await _guarded(body)


async def expose_port(
    ctx: Context,
    port: int,
    expires_in: int = 3600,
    by: Literal["host", "path"] = "host",
    sandbox_id: str | None = None,
) -> CallToolResult:
    """A URL that reaches a server listening on `port` inside a sandbox (default: the current one), valid
    for expires_in seconds and usable without an API key (e.g. from a browser). by="host" gives
    http://{port}-{id}.{domain}/ (needs wildcard DNS for the domain), by="path" a URL under the cove
    server's own address."""

    async def body() -> CallToolResult:
        if not 1 <= port <= 65535:
            return _text(f"expose_port: port must be 1-65535, not {port}", is_error=True)
        sb = await _session(ctx).sandbox(sandbox_id)
        return _text(await sb.get_url(port, expires_in=expires_in, by=by))

    return await _guarded(body)


# --- the server ------------------------------------------------------------------------------------------

_TOOLSET_FUNCTIONS: dict[str, Callable[..., Awaitable[CallToolResult]]] = {
    "bash": bash,
    "read": read,
    "write": write,
    "edit": edit,
    "glob": glob,
    "grep": grep,
}
_READ_ONLY = {"read", "glob", "grep", "sandbox_list"}


def _tools() -> list[Tool]:
    tools = []
    for definition in TOOL_DEFINITIONS:
        tool = Tool.from_function(
            _TOOLSET_FUNCTIONS[definition["name"]],
            name=definition["name"],
            description=definition["description"],
            annotations=ToolAnnotations(read_only_hint=definition["name"] in _READ_ONLY),
            structured_output=False,
        )
        # Advertise Anthropic's schema exactly; the function also takes sandbox_id (allowed: additionalProperties).
        tools.append(tool.model_copy(update={"parameters": definition["input_schema"]}))
    for fn in (
        sandbox_create,
        sandbox_use,
        sandbox_list,
        sandbox_kill,
        sandbox_snapshot,
        sandbox_fork,
        expose_port,
    ):
        annotations = ToolAnnotations(
            read_only_hint=fn.__name__ in _READ_ONLY, destructive_hint=fn.__name__ == "sandbox_kill"
        )
        tools.append(Tool.from_function(fn, annotations=annotations, structured_output=False))
    return tools


def create_server(
    *,
    url: str | None = None,
    api_key: str | None = None,
    template: str = "base",
    sandbox_id: str | None = None,
    on_end: OnEnd = "hibernate",
    timeout: int = 3600,
    keep_hibernated: int = 7 * 86400,
    name: str = "cove",
) -> MCPServer[Any]:
    """An MCP server whose tools run in cove sandboxes.

    ``url``/``api_key`` default to ``COVE_URL``/``COVE_API_KEY``. ``sandbox_id`` binds each session to an
    existing sandbox (else one is created from ``template`` at the first tool call). ``on_end``: what
    happens to a session's sandboxes when it ends. ``timeout``: seconds a sandbox this server made outlives a
    client that stopped using it (renewed by each call); ``keep_hibernated``: seconds it is kept once
    hibernated (0: forever).
    """
    if on_end not in ("hibernate", "keep", "kill"):
        raise ValueError(f"on_end must be 'hibernate', 'keep' or 'kill', not {on_end!r}")
    options = Options(url, api_key, template, sandbox_id, on_end, timeout, keep_hibernated)

    @asynccontextmanager
    async def lifespan(server: MCPServer[Any]) -> AsyncIterator[_ServerState]:
        state = _ServerState(options, SandboxSession(options))
        _LIVE.setdefault(server, set()).add(state)
        try:
            yield state
        finally:
            _LIVE[server].discard(state)
            await _shielded(state.close())

    return MCPServer(name, instructions=INSTRUCTIONS, tools=_tools(), lifespan=lifespan)


# The lifespans in progress per server: what a signal must end before the process goes.
_LIVE: weakref.WeakKeyDictionary[MCPServer[Any], set[_ServerState]] = weakref.WeakKeyDictionary()


async def serve(
    server: MCPServer[Any],
    transport: Literal["stdio", "http"] = "stdio",
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve until the client goes (stdio) or a signal comes; either way the sessions end cleanly
    (their sandboxes are hibernated) first."""
    import os
    import signal

    import anyio

    if transport == "http":  # uvicorn turns SIGINT/SIGTERM into a graceful shutdown, lifespan included
        await server.run_streamable_http_async(host=host, port=port)
        return
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    for state in list(_LIVE.get(server, ())):
                        await _shielded(state.close())
                    # The stdio transport reads stdin in a worker thread that no cancellation can
                    # interrupt (nor interpreter exit, which joins it): leave now, the sessions are ended.
                    os._exit(0)

        tg.start_soon(stop_on_signal)
        await server.run_stdio_async()
        tg.cancel_scope.cancel()
