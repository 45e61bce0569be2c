"""Background processes in a sandbox: ``cove start|logs|signal|ps``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import connection, err, exit_status, friendly, out


@friendly
def start(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    cmd: Annotated[
        list[str], typer.Argument(metavar="CMD", help="The command, after --.", show_default=False)
    ],
    tag: Annotated[str | None, typer.Option("--tag", help="A label to find it by in `cove ps`.")] = None,
) -> None:
    """Start a command in the background and print its process id; it runs on after the CLI exits.

    [bold]Example:[/]  [cyan]P=$(cove start sb-1234 -- python3 -m http.server 8000); cove logs sb-1234 $P[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        proc = sandbox.processes.start(cmd[0] if len(cmd) == 1 else list(cmd), tag=tag)
    finally:
        sandbox.close()
    out.print(proc.id)


@friendly
def logs(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    process_id: Annotated[str, typer.Argument(metavar="PROC", help="Process id (see `cove ps`).")],
    offset: Annotated[int | None, typer.Option("--offset", help="Start at this byte of its output.")] = None,
) -> None:
    """Print a background process's output (what is kept, then live) until it exits or Ctrl-C.

    [bold]Example:[/]  [cyan]cove logs sb-1234 3fa94c21[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    code = 0
    try:
        for event in sandbox.processes.connect(process_id).output(offset):
            if event.type == "stdout":
                sys.stdout.write(event.data)
                sys.stdout.flush()
            elif event.type == "stderr":
                sys.stderr.write(event.data)
                sys.stderr.flush()
            elif event.type in ("attached", "truncated") and event.truncated:
                err.print("[yellow](older output was dropped)[/]")
            elif event.type == "exit":
                code = event.exit_code or 0
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.close()
    raise typer.Exit(exit_status(code))


@friendly
def signal_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    process_id: Annotated[str, typer.Argument(metavar="PROC", help="Process id (see `cove ps`).")],
    sig: Annotated[str, typer.Option("--signal", "-s", help="Signal name or number.")] = "SIGTERM",
) -> None:
    """Send a signal to a background process (its whole process group); SIGKILL to kill it.

    [bold]Example:[/]  [cyan]cove signal sb-1234 3fa94c21 -s SIGINT[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        sandbox.processes.connect(process_id).signal(sig)
    finally:
        sandbox.close()


@friendly
def ps(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """List the background processes and terminals of a sandbox.

    [bold]Example:[/]  [cyan]cove ps sb-1234[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        procs = sandbox.processes.list()
    finally:
        sandbox.close()
    table = Table("ID", "PID", "COMMAND", "TTY", "STATE", box=None)
    for p in procs:
        state = "running" if p.running else f"exited {p.exit_code}"
        command = p.cmd or " ".join(p.argv or [])
        table.add_row(p.id, str(p.pid or ""), escape(command[:60]), "yes" if p.pty else "", state)
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("start")(start)
    app.command("logs")(logs)
    app.command("signal")(signal_)
    app.command("ps")(ps)
