"""``cove volume create|ls|rm`` and the ``--volume NAME:/path[:ro]`` option of ``cove create``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

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


def _conn(ctx: typer.Context) -> tuple[str | None, str | None]:
    obj = ctx.find_root().obj
    return getattr(obj, "url", None), getattr(obj, "api_key", None)


def _commands() -> None:
    # Imported late: main.py imports this module, and these reuse its error handling and output.
    from cove.cli.main import _ago, _friendly, out

    @volume_app.command("create")
    @_friendly
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
        url, key = _conn(ctx)
        vol = Volume.create(name, size_mb=size, url=url, api_key=key)
        out.print(vol.name)

    @volume_app.command("ls")
    @_friendly
    def volume_ls(ctx: typer.Context) -> None:
        """List your volumes.

        [bold]Example:[/]  [cyan]cove volume ls[/]
        """
        url, key = _conn(ctx)
        table = Table("NAME", "SIZE MB", "CREATED", "COPIED FROM", box=None)
        for vol in Volume.list(url=url, api_key=key):
            src = vol.info.source
            table.add_row(
                escape(vol.name),
                str(vol.info.size_mb or "-"),
                _ago(vol.info.created_at),
                escape(f"{src['volume']} ({src['snapshot']})") if src else "",
            )
        out.print(table)

    @volume_app.command("rm")
    @_friendly
    def volume_rm(
        ctx: typer.Context,
        names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Volume names.")],
    ) -> None:
        """Delete volumes and their content (refused while a sandbox mounts one).

        [bold]Example:[/]  [cyan]cove volume rm data[/]
        """
        url, key = _conn(ctx)
        for name in names:
            Volume(Volume.get(name, url=url, api_key=key).info, url, key, None).delete()
            out.print(f"deleted {escape(name)}")


def register(app: typer.Typer) -> None:
    _commands()
    app.add_typer(volume_app, name="volume")
