"""``cove port ID PORT``: a signed URL to a server inside a sandbox (docs/ports.md)."""

from __future__ import annotations

from typing import Annotated

import typer

from cove.cli._ui import connection, fail, friendly, out


@friendly
def port(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    port_number: Annotated[int, typer.Argument(metavar="PORT", help="Port a server listens on inside.")],
    path: Annotated[str, typer.Option(help="Path to open.")] = "/",
    expires: Annotated[int, typer.Option(help="Seconds the URL stays valid (at most 30 days).")] = 3600,
    by: Annotated[
        str, typer.Option(help="host: {port}-{id}.{domain} (COVE_DOMAIN); path: under /v1.")
    ] = "host",
) -> None:
    """Print a URL that opens a server running in a sandbox, without an API key, until it expires.

    A browser keeps access through a cookie, so the page's own links work. With an API key instead,
    the same server answers at [cyan]/v1/sandboxes/ID/ports/PORT/[/].

    [bold]Example:[/]  [cyan]cove exec sb-1234 -- sh -c 'python3 -m http.server 8000 &'[/]
              [cyan]cove port sb-1234 8000[/]
    """
    if by not in ("host", "path"):
        fail("--by must be 'host' or 'path'")
    conn = connection(ctx)
    out.print(conn.sandbox(sandbox_id).get_url(port_number, expires_in=expires, path=path, by=by))  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    app.command("port")(port)
