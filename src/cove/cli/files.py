"""A sandbox's files: ``cove cp`` (streamed, with a progress bar), ``cove watch``, ``cove file-url``."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.markup import escape

from cove.cli._ui import connection, err, friendly, human, out, progress
from cove.errors import FileNotFound, InvalidArgument
from cove.sdk import Sandbox

_REMOTE = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")
_CHUNK = 256 * 1024


def _split_remote(arg: str) -> tuple[str, str] | None:
    """``ID:/path`` → ``(ID, /path)``; a local path (use ``./a:b`` for odd names) → ``None``."""
    if arg in ("-",) or arg.startswith(("/", "./", "../", "~")):
        return None
    match = _REMOTE.match(arg)
    if not match:
        return None
    return match["id"], match["path"] or "."


def _upload(sandbox: Sandbox, local: str, remote: str) -> None:
    if local == "-":
        source: IO[bytes] = sys.stdin.buffer
        total: int | None = None
        name = "stdin"
    else:
        path = Path(local).expanduser()
        if path.is_dir():
            raise InvalidArgument(f"{local} is a directory; cove cp copies single files")
        source = path.open("rb")
        total = path.stat().st_size
        name = path.name
    try:
        if remote.endswith("/"):
            remote += name
        else:
            try:
                if sandbox.files.stat(remote).is_dir:
                    remote = remote.rstrip("/") + "/" + name
            except FileNotFound:
                pass
        sent = 0
        with progress() as bar:
            task = bar.add_task(f"↑ {name}", total=total)

            def chunks() -> Iterator[bytes]:
                nonlocal sent
                while chunk := source.read(_CHUNK):
                    sent += len(chunk)
                    bar.advance(task, len(chunk))
                    yield chunk

            entry = sandbox.files.write(remote, chunks())
        err.print(f"[green]uploaded[/] {human(sent)} to {escape(sandbox.id)}:{escape(entry.path or remote)}")
    finally:
        if source is not sys.stdin.buffer:
            source.close()


def _download(sandbox: Sandbox, remote: str, local: str) -> None:
    entry = sandbox.files.stat(remote)
    if entry.is_dir:
        raise InvalidArgument(f"{sandbox.id}:{remote} is a directory; cove cp copies single files")
    name = entry.name or os.path.basename(remote.rstrip("/")) or "download"
    if local == "-":
        sink: IO[bytes] = sys.stdout.buffer
        target = "stdout"
    else:
        path = Path(local).expanduser()
        if path.is_dir() or local.endswith("/"):
            path = path / name
        target = str(path)
        sink = path.open("wb")
    received = 0
    try:
        with progress() as bar:
            task = bar.add_task(f"↓ {name}", total=entry.size or None)
            for chunk in sandbox.files.read(remote, format="stream"):
                sink.write(chunk)
                received += len(chunk)
                bar.advance(task, len(chunk))
        sink.flush()
    finally:
        if sink is not sys.stdout.buffer:
            sink.close()
    if local != "-":
        err.print(f"[green]downloaded[/] {human(received)} to {escape(target)}")


@friendly
def cp(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="Source: a local path, ID:/path, or - for stdin.")],
    dst: Annotated[str, typer.Argument(help="Destination: a local path, ID:/path, or - for stdout.")],
) -> None:
    """Copy a file into or out of a sandbox (exactly one side is [cyan]ID:/path[/]); streamed.

    A destination that is a directory (or ends with /) gets the source's file name.
    Relative sandbox paths start at the user's home. Write [cyan]./a:b[/] for a local name with a colon.

    [bold]Examples:[/]  [cyan]cove cp data.csv sb-1234:/home/user/[/]
               [cyan]cove cp sb-1234:/home/user/out.tar.gz .[/]
    """
    src_remote, dst_remote = _split_remote(src), _split_remote(dst)
    if (src_remote is None) == (dst_remote is None):
        raise InvalidArgument(
            "exactly one of SRC and DST must be a sandbox path like ID:/path "
            f"(got {src!r} and {dst!r}; write ./name for a local file with a colon)"
        )
    remote = src_remote or dst_remote
    assert remote is not None
    sandbox = connection(ctx).sandbox(remote[0])
    try:
        if dst_remote is not None:
            _upload(sandbox, src, dst_remote[1])
        else:
            _download(sandbox, remote[1], dst)
    finally:
        sandbox.close()


@friendly
def watch(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    path: Annotated[str, typer.Argument(metavar="PATH", help="Directory inside the sandbox.")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also watch subdirectories.")] = False,
) -> None:
    """Print file events (create, write, remove, rename) under a directory until Ctrl-C.

    [bold]Example:[/]  [cyan]cove watch sb-1234 /home/user -r[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        for event in sandbox.files.watch(path, recursive=recursive):
            if event.type != "watching":
                out.print(f"{event.type:7} {escape(event.path)}{'/' if event.is_dir else ''}")
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.close()


@friendly
def file_url(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    path: Annotated[str, typer.Argument(metavar="PATH", help="File inside the sandbox.")],
    upload: Annotated[
        bool, typer.Option("--upload", help="A URL to PUT the file to (default: GET it).")
    ] = False,
    expires: Annotated[int, typer.Option(help="Seconds the URL stays valid (at most 30 days).")] = 3600,
) -> None:
    """Print a URL that downloads (or, with --upload, writes) one file, without an API key.

    [bold]Example:[/]  [cyan]curl -o report.csv "$(cove file-url sb-1234 /home/user/report.csv)"[/]
              [cyan]curl -T data.bin "$(cove file-url sb-1234 /home/user/data.bin --upload)"[/]
    """
    files = connection(ctx).sandbox(sandbox_id).files
    url = (
        files.upload_url(path, expires_in=expires) if upload else files.download_url(path, expires_in=expires)
    )
    out.print(url)


def register(app: typer.Typer) -> None:
    app.command("cp")(cp)
    app.command("watch")(watch)
    app.command("file-url")(file_url)
