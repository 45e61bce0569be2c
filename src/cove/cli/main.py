"""The ``cove`` command line: manage sandboxes on a cove server from a shell.

Every command talks to the server at ``--url`` / ``COVE_URL`` (default ``http://127.0.0.1:7770``)
with the key from ``--api-key`` / ``COVE_API_KEY``. The commands live in one module per resource;
this one holds the root command and registers them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cove.cli import (
    files,
    integrations,
    keys,
    network,
    pools,
    ports,
    processes,
    run,
    sandboxes,
    server,
    snapshots,
    templates,
    volumes,
)
from cove.cli._ui import Conn

app = typer.Typer(
    name="cove",
    help="Self-hosted sandboxes for AI agents.\n\n"
    "Point the CLI at a server with [bold]COVE_URL[/] and [bold]COVE_API_KEY[/] (or --url / --api-key).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="COVE_URL", help="Server URL \\[default: http://127.0.0.1:7770]."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="COVE_API_KEY", help="API key.", show_default=False),
    ] = None,
) -> None:
    ctx.obj = Conn(url, api_key)


# `cove --help` lists groups (`cove keys ...`) after the commands, in the order registered here.
for module in (
    sandboxes,
    network,
    run,
    files,
    processes,
    ports,
    keys,
    snapshots,
    integrations,
    volumes,
    pools,
    templates,
    server,
):
    module.register(app)

# ... and the commands in this order (the most used first), not module by module.
_HELP_ORDER = [
    "create", "network", "ls", "info", "exec", "cp", "kill", "shell", "run-code", "watch", "start", "logs",
    "signal", "ps", "pause", "resume", "port", "file-url", "hibernate", "snapshot", "fork", "audit", "serve", "node",
    "doctor", "worker", "mcp",
]  # fmt: skip
app.registered_commands.sort(
    key=lambda c: _HELP_ORDER.index(c.name) if c.name in _HELP_ORDER else len(_HELP_ORDER)
)

if __name__ == "__main__":  # pragma: no cover
    app()
