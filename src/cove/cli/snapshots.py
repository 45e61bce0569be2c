"""``cove snapshot ID`` and ``cove snapshots ls|rm``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import ago, connection, friendly, out, spinner
from cove.sdk import Sandbox

snapshots_app = typer.Typer(
    help="List and delete snapshots (take one with `cove snapshot ID`).", no_args_is_help=True
)


@friendly
def snapshot(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    name: Annotated[str | None, typer.Option("--name", "-n", help="A name to find it by.")] = None,
    memory: Annotated[
        bool,
        typer.Option("--memory", help="Also checkpoint the running processes (needs CRIU on the server)."),
    ] = False,
    volumes: Annotated[
        str,
        typer.Option(
            "--volumes", help="include: seal a copy of its volumes; exclude: reference the live ones."
        ),
    ] = "exclude",
) -> None:
    """Seal a sandbox's files as they are now and print the snapshot id (the sandbox keeps running).

    [bold]Example:[/]  [cyan]SNAP=$(cove snapshot sb-1234 --name before-upgrade); cove create --snapshot $SNAP[/]
    """
    conn = connection(ctx)
    with spinner(f"snapshotting {sandbox_id}…"):
        snap = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).snapshot(name, memory, volumes)  # type: ignore[arg-type]
    out.print(snap.id)


@snapshots_app.command("ls")
@friendly
def snapshots_ls(ctx: typer.Context) -> None:
    """List your snapshots.

    [bold]Example:[/]  [cyan]cove snapshots ls[/]
    """
    conn = connection(ctx)
    table = Table("ID", "NAME", "FROM", "CREATED", "LAYERS", "MEMORY", box=None)
    for snap in Sandbox.list_snapshots(url=conn.url, api_key=conn.api_key):
        table.add_row(
            snap.id,
            escape(snap.name or ""),
            snap.sandbox_id,
            ago(snap.created_at),
            str(snap.layers),
            "yes" if snap.memory else "no",
        )
    out.print(table)


@snapshots_app.command("rm")
@friendly
def snapshots_rm(
    ctx: typer.Context,
    snapshot_ids: Annotated[list[str], typer.Argument(metavar="SNAPSHOT...", help="Snapshot ids.")],
) -> None:
    """Delete snapshots (sandboxes started from them keep running).

    [bold]Example:[/]  [cyan]cove snapshots rm snapab12cd34ef56[/]
    """
    conn = connection(ctx)
    for snapshot_id in snapshot_ids:
        Sandbox.delete_snapshot(snapshot_id, url=conn.url, api_key=conn.api_key)
        out.print(f"deleted {escape(snapshot_id)}")


def register(app: typer.Typer) -> None:
    app.command("snapshot")(snapshot)
    app.add_typer(snapshots_app, name="snapshots")
