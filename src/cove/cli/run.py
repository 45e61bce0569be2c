"""Running things in a sandbox from this terminal: ``cove exec``, ``cove shell``, ``cove run-code``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.markup import escape

from cove.cli._ui import connection, err, exit_status, fail, friendly, out, pairs
from cove.errors import CommandTimeout


def _terminal(ctx: typer.Context, sandbox_id: str, command: str | list[str], **kw: Any) -> int:
    # Imported here: the terminal relay (termios, websockets) is only needed by -t and shell.
    from cove.cli.terminal import attach, terminal_size

    conn = connection(ctx)
    sandbox = conn.sandbox(sandbox_id)
    try:
        rows, cols = terminal_size()
        proc = sandbox.pty.create(command, rows=rows, cols=cols, **kw)
    finally:
        sandbox.close()
    return exit_status(attach(conn.url, conn.api_key, sandbox_id, proc.id))


@friendly
def exec_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    cmd: Annotated[
        list[str], typer.Argument(metavar="CMD", help="The command, after --.", show_default=False)
    ],
    user: Annotated[str | None, typer.Option("--user", "-u", help="Run as this user.")] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", "-w", help="Working directory.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="Environment variable KEY=VALUE (repeatable).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Kill the command after SECONDS.")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Send this terminal's stdin to the command.")
    ] = False,
    tty: Annotated[
        bool,
        typer.Option("--tty", "-t", help="Run in a terminal (with -i: interactive, like docker exec -it)."),
    ] = False,
) -> None:
    """Run a command in a sandbox, streaming its output; exits with the command's exit code.

    One argument is run by the shell ([cyan]bash -c[/]); several are run as an argv list.
    A command that times out is killed and [bold]cove exec[/] exits with 124.

    [bold]Examples:[/]  [cyan]cove exec sb-1234 -- ls -la /tmp[/]
               [cyan]cove exec sb-1234 -- 'cd /src && make 2>&1 | tail'[/]
               [cyan]echo hi | cove exec -i sb-1234 -- cat[/]
               [cyan]cove exec -it sb-1234 -- python3[/]
    """
    command: str | list[str] = cmd[0] if len(cmd) == 1 else list(cmd)
    if tty:
        raise typer.Exit(_terminal(ctx, sandbox_id, command, user=user, cwd=cwd, env=pairs(env, "--env")))
    stdin_data = sys.stdin.read() if stdin else None

    def write_out(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    def write_err(data: str) -> None:
        sys.stderr.write(data)
        sys.stderr.flush()

    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        result = sandbox.exec(
            command,
            user=user,
            cwd=cwd,
            env=pairs(env, "--env"),
            timeout=timeout,
            stdin=stdin_data,
            on_stdout=write_out,
            on_stderr=write_err,
        )
    except CommandTimeout as exc:
        fail(exc.message, 124)
    finally:
        sandbox.close()
    raise typer.Exit(exit_status(result.exit_code))


@friendly
def shell(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    user: Annotated[str | None, typer.Option("--user", "-u", help="Log in as this user.")] = None,
) -> None:
    """Open an interactive terminal (bash) in a sandbox; exit the shell to leave.

    [bold]Example:[/]  [cyan]cove shell sb-1234[/]
    """
    raise typer.Exit(_terminal(ctx, sandbox_id, "bash -l", user=user))


@friendly
def run_code(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    code: Annotated[str, typer.Argument(metavar="CODE", help="The code; - reads it from stdin.")],
    language: Annotated[str, typer.Option("--language", "-l", help="python or bash.")] = "python",
    context: Annotated[
        str | None, typer.Option("--context", "-c", help="Context id (default: the default one).")
    ] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Interrupt after SECONDS.")] = None,
) -> None:
    """Run code in a persistent interpreter in the sandbox; variables stay for the next call.

    Prints output as it comes, then the value of the last expression (text/plain); exits 1 if the
    code raised.

    [bold]Example:[/]  [cyan]cove run-code sb-1234 'x = 41'; cove run-code sb-1234 'x + 1'[/]
    """
    source = sys.stdin.read() if code == "-" else code
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        result = sandbox.run_code(
            source,
            language=language,
            context=context,
            timeout=timeout,
            on_stdout=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
            on_stderr=lambda t: (sys.stderr.write(t), sys.stderr.flush()),
        )
    finally:
        sandbox.close()
    if result.text is not None:
        out.print(escape(result.text))
    if result.error:
        err.print(
            f"[red]{escape(result.error.get('name', 'Error'))}: {escape(str(result.error.get('value', '')))}[/]"
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("exec", context_settings={"ignore_unknown_options": False})(exec_)
    app.command("shell")(shell)
    app.command("run-code")(run_code)
