"""``cove volume create|ls|rm`` and the ``--volume NAME:/path[:ro]`` option of ``cove create``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import ago, connection, friendly, out
from cove.sdk.volumes import Volume, VolumeMount

volume_app = typer.Typer(
    help="Named volumes: storage that outlives sandboxes (mount with `cove create --volume`).",
    no_args_is_help=True,
)


def parse_volume(text: str) -> VolumeMount:
    """NAME:/path or NAME:/path:ro (or :rw)."""
    name, sep, rest = text.partition(":")
    path, _, mode = rest.partition(":")
    if not sep or not name or not path.startswith("/") or mode not in ("", "ro", "rw"):
        raise typer.BadParameter(f"--volume must look like NAME:/path or NAME:/path:ro, got {text!r}")
    return VolumeMount(name, path, mode == "ro")


@volume_app.command("create")
@friendly
def volume_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Volume name (a-z, 0-9, . _ -).")],
    size: Annotated[
        int | None, typer.Option("--size-mb", "-s", help="Size limit in MB \\[default: 1024].")
    ] = None,
) -> None:
    """Create a volume.

    [bold]Example:[/]  [cyan]cove volume create data --size-mb 2048; cove create --volume data:/data[/]
    """
    conn = connection(ctx)
    vol = Volume.create(name, size_mb=size, **conn.auth())
    out.print(vol.name)


@volume_app.command("ls")
@friendly
def volume_ls(ctx: typer.Context) -> None:
    """List your volumes.

    [bold]Example:[/]  [cyan]cove volume ls[/]
    """
    conn = connection(ctx)
    table = Table("NAME", "SIZE MB", "CREATED", "COPIED FROM", box=None)
    for vol in Volume.list(**conn.auth()):
        src = vol.info.source
        table.add_row(
            escape(vol.name),
            str(vol.info.size_mb or "-"),
            ago(vol.info.created_at),
            escape(f"{src['volume']} ({src['snapshot']})") if src else "",
        )
    out.print(table)


@volume_app.command("rm")
@friendly
def volume_rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Volume names.")],
) -> None:
    """Delete volumes and their content (refused while a sandbox mounts one).

    [bold]Example:[/]  [cyan]cove volume rm data[/]
    """
    conn = connection(ctx)
    for name in names:
        Volume(Volume.get(name, **conn.auth()).info, conn.url, conn.api_key, None).delete()
        out.print(f"deleted {escape(name)}")


def register(app: typer.Typer) -> None:
    app.add_typer(volume_app, name="volume")
