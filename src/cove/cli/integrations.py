"""Harness adapters: ``cove worker`` (Claude Managed Agents) and ``cove mcp`` (an MCP server)."""

from __future__ import annotations

import contextlib
import os
import sys
from enum import StrEnum
from typing import Annotated

import typer
from rich.markup import escape

from cove.cli._ui import connection, err, fail

# Shared by `cove worker` and `cove mcp`: how long the sandboxes they hibernate are kept.
KeepHibernated = Annotated[
    int, typer.Option("--keep-hibernated", help="Seconds a hibernated sandbox is kept (0: forever).", min=0)
]


class _SessionEnd(StrEnum):
    hibernate = "hibernate"
    kill = "kill"


def worker(
    ctx: typer.Context,
    environment_id: Annotated[
        str | None,
        typer.Option(
            "--environment-id",
            envvar="ANTHROPIC_ENVIRONMENT_ID",
            help="The self-hosted environment (env_...).",
        ),
    ] = None,
    environment_key: Annotated[
        str | None,
        typer.Option(
            "--environment-key",
            envvar="ANTHROPIC_ENVIRONMENT_KEY",
            help="The environment's key (prefer the variable: options show in `ps`).",
            show_default=False,
        ),
    ] = None,
    template: Annotated[
        str, typer.Option("--template", "-t", help="Template of each session's sandbox.")
    ] = "base",
    on_session_end: Annotated[
        _SessionEnd,
        typer.Option(
            "--on-session-end",
            help="hibernate: keep the session's files and processes on disk; its next work item wakes the "
            "same sandbox. kill: discard it.",
        ),
    ] = _SessionEnd.hibernate,
    workdir: Annotated[
        str, typer.Option("--workdir", help="Working directory in the sandbox (relative tool paths).")
    ] = "/workspace",
    timeout: Annotated[
        int,
        typer.Option(
            "--timeout", help="Seconds a sandbox outlives a worker that stopped serving it.", min=60
        ),
    ] = 3600,
    keep_hibernated: KeepHibernated = 7 * 86400,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-n", help="Sessions served at once (one sandbox each).", min=1)
    ] = 1,
    single_item: Annotated[
        bool,
        typer.Option(
            "--single-item",
            help="Serve the one work item named by ANTHROPIC_WORK_ID, ANTHROPIC_SESSION_ID (and "
            "ANTHROPIC_WORK_SECRET), as `ant ... worker poll --on-work` sets them, then exit.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    """Run a Claude Managed Agents self-hosted environment: each session's tools run in its own sandbox.

    Polls the environment's work queue (with anthropic's EnvironmentWorker) and serves each claimed
    session: the agent's bash, read, write, edit, glob and grep calls run in a cove sandbox made on the
    session's first tool call, with skills and memory stores copied into it. When the session ends,
    memory changes are copied back (the worker uploads them) and the sandbox is hibernated or killed.
    Needs `pip install 'cove\\[claude]'`.

    [bold]Example:[/]  [cyan]ANTHROPIC_ENVIRONMENT_KEY=... cove worker --environment-id env_01... -t base[/]
    """
    import asyncio
    import logging
    import tempfile

    try:
        from cove.integrations.claude_managed import require_anthropic, run_worker

        require_anthropic()
    except ImportError as e:
        fail(str(e))
    import anthropic

    if not environment_id:
        fail("no environment: pass --environment-id or set ANTHROPIC_ENVIRONMENT_ID")
    if not environment_key and not (single_item and os.environ.get("ANTHROPIC_WORK_SECRET")):
        fail("no environment key: set ANTHROPIC_ENVIRONMENT_KEY (or pass --environment-key)")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s")
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    conn = connection(ctx)
    err.print(f"[green]serving[/] {escape(environment_id)} with [bold]{escape(template)}[/] sandboxes")
    try:
        # Skills and memory stores are downloaded here first, then copied into each sandbox.
        with tempfile.TemporaryDirectory(prefix="cove-worker-") as staging:
            asyncio.run(
                run_worker(
                    environment_id=environment_id,
                    environment_key=environment_key,
                    single_item=single_item,
                    concurrency=concurrency,
                    host_workdir=staging,
                    template=template,
                    on_session_end=on_session_end.value,
                    workdir=workdir,
                    timeout=timeout,
                    keep_hibernated=keep_hibernated,
                    url=conn.url,
                    api_key=conn.api_key,
                )
            )
    except (anthropic.APIError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        raise typer.Exit(130) from None


class _McpTransport(StrEnum):
    stdio = "stdio"
    http = "http"


class _McpEnd(StrEnum):
    hibernate = "hibernate"
    keep = "keep"
    kill = "kill"


def mcp(
    ctx: typer.Context,
    transport: Annotated[
        _McpTransport,
        typer.Option(
            "--transport", help="stdio: for a client that starts this command. http: streamable HTTP at /mcp."
        ),
    ] = _McpTransport.stdio,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (http).")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", help="Port to listen on (http).", min=1, max=65535)
    ] = 8000,
    sandbox: Annotated[
        str | None,
        typer.Option(
            "--sandbox",
            "-s",
            help="Bind sessions to this existing sandbox (e.g. one an earlier session left).",
        ),
    ] = None,
    template: Annotated[
        str, typer.Option("--template", "-t", help="Template of the sandbox a session creates.")
    ] = "base",
    on_end: Annotated[
        _McpEnd,
        typer.Option(
            "--on-end",
            help="What a session's sandboxes become when it ends. hibernate: files and processes kept on "
            "disk, the next session continues (sandbox_use or --sandbox). keep: left running. kill: deleted.",
        ),
    ] = _McpEnd.hibernate,
    timeout: Annotated[
        int,
        typer.Option(
            "--timeout", help="Seconds a sandbox it made outlives a client that stopped using it.", min=60
        ),
    ] = 3600,
    keep_hibernated: KeepHibernated = 7 * 86400,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request (to stderr).")] = False,
) -> None:
    """Serve an MCP server whose tools run in a cove sandbox.

    Tools: [bold]bash read write edit glob grep[/] (Claude Managed Agents' agent_toolset_20260401: the same names and input schemas; bash is one persistent shell) and [bold]sandbox_create sandbox_use sandbox_list sandbox_kill sandbox_snapshot sandbox_fork expose_port[/].

    A session works in one current sandbox, made at its first tool call (or given by --sandbox / sandbox_use) and hibernated when the session ends, so a later session continues with its files. Needs `pip install 'cove\\[mcp]'`; reads COVE_URL and COVE_API_KEY.

    [bold]Claude Code:[/]  [cyan]claude mcp add cove -e COVE_URL=$COVE_URL -e COVE_API_KEY=$COVE_API_KEY -- cove mcp[/]

    [bold]Over HTTP:[/]  [cyan]cove mcp --transport http --port 8000[/]  (clients connect to http://127.0.0.1:8000/mcp; one sandbox per MCP session)
    """
    import asyncio
    import logging

    try:
        from cove.integrations.mcp_server import create_server, serve
    except ImportError as e:
        fail(str(e))
    # stdout is the protocol channel on stdio: logs go to stderr only.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    conn = connection(ctx)
    server = create_server(
        url=conn.url,
        api_key=conn.api_key,
        template=template,
        sandbox_id=sandbox,
        on_end=on_end.value,  # type: ignore[arg-type]
        timeout=timeout,
        keep_hibernated=keep_hibernated,
    )
    if transport is _McpTransport.http:
        err.print(f"[green]MCP over streamable HTTP[/] at http://{host}:{port}/mcp")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(server, transport.value, host, port))  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("mcp")(mcp)
