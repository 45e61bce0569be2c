"""The ``cove`` command line: manage sandboxes on a cove server from a shell.

Every command talks to the server at ``--url`` / ``COVE_URL`` (default ``http://127.0.0.1:7770``)
with the key from ``--api-key`` / ``COVE_API_KEY``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cove.cli import pools as pools_cli
from cove.cli import templates as templates_cli
from cove.cli import volumes as volumes_cli
from cove.cli.volumes import parse_volume
from cove.errors import CommandTimeout, CoveError, FileNotFound, InvalidArgument
from cove.sdk import Sandbox, SandboxInfo
from cove.sdk.sync import audit_log, create_key, delete_key, list_keys, rotate_key

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="cove",
    help="Self-hosted sandboxes for AI agents.\n\n"
    "Point the CLI at a server with [bold]COVE_URL[/] and [bold]COVE_API_KEY[/] (or --url / --api-key).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
keys_app = typer.Typer(
    help="Manage API keys (needs an admin key).", no_args_is_help=True, pretty_exceptions_enable=False
)
app.add_typer(keys_app, name="keys")
snapshots_app = typer.Typer(
    help="List and delete snapshots (take one with `cove snapshot ID`).", no_args_is_help=True
)
app.add_typer(snapshots_app, name="snapshots")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_REMOTE = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")
_CHUNK = 256 * 1024


# ------------------------------------------------------------------------------------- plumbing


class _Conn:
    def __init__(self, url: str | None, api_key: str | None) -> None:
        self.url = url
        self.api_key = api_key

    def sandbox(self, sandbox_id: str) -> Sandbox:
        return Sandbox(sandbox_id, url=self.url, api_key=self.api_key)


def _conn(ctx: typer.Context) -> _Conn:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, _Conn) else _Conn(None, None)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] [red]{escape(message)}[/]")
    raise typer.Exit(code)


def _friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn SDK and OS errors into one red line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CoveError as exc:
            _fail(exc.message or type(exc).__name__)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")
        except KeyboardInterrupt:
            err.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = int((datetime.now(UTC) - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if future else f"{text} ago"


_STATE_STYLE = {
    "running": "green",
    "starting": "yellow",
    "paused": "cyan",
    "hibernated": "blue",
    "killed": "dim",
    "error": "red",
}


def _state(state: str) -> str:
    return f"[{_STATE_STYLE.get(state, 'white')}]{escape(state)}[/]"


def _info_json(info: SandboxInfo) -> dict[str, Any]:
    data = asdict(info)
    for key in ("created_at", "expires_at"):
        value = data.get(key)
        data[key] = value.isoformat() if isinstance(value, datetime) else value
    return data


# -------------------------------------------------------------------------------------- options


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
    ctx.obj = _Conn(url, api_key)


# ------------------------------------------------------------------------------------- commands


@app.command()
@_friendly
def create(
    ctx: typer.Context,
    template: Annotated[str, typer.Option("--template", "-t", help="Template to start from.")] = "base",
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="Environment variable KEY=VALUE (repeatable).")
    ] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", help="Lifetime in seconds (0 = none) \\[default: 300].")
    ] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="CPU cores (0.05-64).")] = None,
    memory: Annotated[int | None, typer.Option("--memory", "-m", help="Memory limit in MB.")] = None,
    pids: Annotated[int | None, typer.Option("--pids", help="Maximum number of processes.")] = None,
    disk: Annotated[int | None, typer.Option("--disk", help="Disk limit in MB.")] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Metadata KEY=VALUE (repeatable).")
    ] = None,
    snapshot: Annotated[
        str | None, typer.Option("--snapshot", "-s", help="Start from this snapshot instead of a template.")
    ] = None,
    idle_timeout: Annotated[
        int | None, typer.Option("--idle-timeout", help="Pause after this many idle seconds (0 = never).")
    ] = None,
    network: Annotated[
        str | None,
        typer.Option(
            "--network",
            help="Egress: none (default), open, allow:RULE,... or deny:RULE,... (see cove network).",
        ),
    ] = None,
    volume: Annotated[
        list[str] | None,
        typer.Option("--volume", "-v", help="Mount a volume: NAME:/path or NAME:/path:ro (repeatable)."),
    ] = None,
) -> None:
    """Start a sandbox and print its id.

    [bold]Examples:[/]  [cyan]cove create -t base -e DEBUG=1 -l project=demo --memory 512[/]
                [cyan]cove create --snapshot snapab12cd34ef56[/]
                [cyan]cove create --network allow:pypi.org,*.pythonhosted.org[/]
                [cyan]cove create --volume data:/data --volume models:/models:ro[/]
    """
    conn = _conn(ctx)
    sandbox = Sandbox.create(
        template,
        volumes=[parse_volume(v) for v in volume or []],
        network=_network_spec(network) if network is not None else None,
        snapshot=snapshot,
        idle_timeout=idle_timeout,
        env=_pairs(env, "--env"),
        timeout=timeout,
        metadata=_pairs(label, "--label"),
        cpu=cpu,
        memory_mb=memory,
        pids=pids,
        disk_mb=disk,
        url=conn.url,
        api_key=conn.api_key,
    )
    sandbox.close()
    out.print(sandbox.id)


def _rules(values: list[str] | None) -> list[str]:
    """Repeatable options whose values may also be comma-separated lists."""
    return [r.strip() for v in values or [] for r in v.split(",") if r.strip()]


def _network_text(mode: str, allow: list[str], deny: list[str]) -> str:
    parts = [mode]
    for name, rules in (("allow", allow), ("deny", deny)):
        if rules:
            parts.append(f"{name} {', '.join(rules)}")
    return "; ".join(parts)


def _network_spec(text: str) -> dict[str, Any]:
    mode, _, rules = text.partition(":")
    if mode not in ("none", "open", "allow", "deny"):
        _fail(f"--network: expected none, open, allow:RULE,... or deny:RULE,...; got {text!r}")
    if rules and mode not in ("allow", "deny"):
        _fail(f"--network: mode {mode} takes no rules")
    return {"mode": mode, mode: _rules([rules])} if rules else {"mode": mode}


@app.command("network")
@_friendly
def network_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    mode: Annotated[str | None, typer.Option("--mode", help="none, allow, deny or open.")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="Allow rules (repeatable or comma-separated); replaces the list."),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option("--deny", help="Deny rules (repeatable or comma-separated); replaces the list."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show or change a sandbox's egress policy; new connections follow a change at once.

    Modes: [bold]none[/] (nothing leaves), [bold]allow[/] (only the allow list, minus the deny list),
    [bold]deny[/] (everything but the deny list, plus the allow list), [bold]open[/]. A rule is
    HOST[:PORTS]: a domain, *.domain, an IP or CIDR, or *; PORTS is 443 or 8000-8999.
    [cyan]--allow[/] alone on a sandbox in mode none switches it to allow.

    [bold]Examples:[/]  [cyan]cove network sb-1234[/]
                [cyan]cove network sb-1234 --allow pypi.org,*.pythonhosted.org[/]
                [cyan]cove network sb-1234 --mode deny --deny 10.0.0.0/8[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        current = sandbox.get_network()
        if mode is not None or allow is not None or deny is not None:
            new_mode = mode or ("allow" if current.mode == "none" and allow else current.mode)
            current = sandbox.set_network(
                new_mode,
                allow=_rules(allow) if allow is not None else current.allow,
                deny=_rules(deny) if deny is not None else current.deny,
            )
    finally:
        sandbox.close()
    if as_json:
        out.print_json(json.dumps(asdict(current)))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    last = current.last_denied
    rows = [
        ("mode", escape(current.mode)),
        ("allow", escape(", ".join(current.allow)) or "-"),
        ("deny", escape(", ".join(current.deny)) or "-"),
        ("proxy", escape(current.proxy or current.error or "not running")),
        ("connections", f"{current.allowed} allowed, {current.denied} denied"),
        ("last denied", escape(f"{last['target']}: {last['reason']}") if last else "-"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)


@app.command("ls")
@_friendly
def ls(
    ctx: typer.Context,
    state: Annotated[
        str | None, typer.Option("--state", "-s", help="Only this state (running, killed, ...).")
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Only with metadata KEY=VALUE (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the ids.")] = False,
) -> None:
    """List sandboxes.

    [bold]Example:[/]  [cyan]cove ls --state running -l project=demo[/]   ([cyan]cove kill $(cove ls -q)[/] kills them all)
    """
    conn = _conn(ctx)
    items = Sandbox.list(state=state, metadata=_pairs(label, "--label"), url=conn.url, api_key=conn.api_key)
    if as_json:
        out.print_json(json.dumps([_info_json(i) for i in items]))
        return
    if quiet:
        for info in items:
            out.print(info.id)
        return
    if not items:
        err.print("[dim]no sandboxes[/]")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=max(len(i.id) for i in items))
    table.add_column("TEMPLATE")
    table.add_column("STATE")
    table.add_column("CREATED")
    table.add_column("EXPIRES")
    table.add_column("LABELS")
    for info in items:
        labels = ",".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
        table.add_row(
            escape(info.id),
            escape(info.template),
            _state(info.state),
            _ago(info.created_at),
            _ago(info.expires_at) if info.expires_at else "never",
            escape(labels) or "-",
        )
    out.print(table)


@app.command()
@_friendly
def info(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one sandbox.

    [bold]Example:[/]  [cyan]cove info sb-1234 --json[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        data = sandbox.info()
    finally:
        sandbox.close()
    if as_json:
        out.print_json(json.dumps(_info_json(data)))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    limits = data.limits
    limit_text = ", ".join(
        f"{name}={value}"
        for name, value in (
            ("cpu", limits.cpu),
            ("memory_mb", limits.memory_mb),
            ("pids", limits.pids),
            ("disk_mb", limits.disk_mb),
        )
        if value is not None
    )
    rows = [
        ("id", escape(data.id)),
        ("state", _state(data.state) + (f" ({escape(data.end_reason)})" if data.end_reason else "")),
        ("template", escape(data.template)),
        ("runtime", escape(data.runtime) or "-"),
        ("created", f"{_when(data.created_at)} UTC ({_ago(data.created_at)})"),
        (
            "expires",
            f"{_when(data.expires_at)} UTC ({_ago(data.expires_at)})" if data.expires_at else "never",
        ),
        ("timeout", f"{data.timeout}s" if data.timeout else "none"),
        ("user", escape(data.user or "-")),
        ("workdir", escape(data.workdir or "-")),
        ("limits", escape(limit_text) or "-"),
        ("network", escape(_network_text(data.network.mode, data.network.allow, data.network.deny))),
        ("metadata", escape(", ".join(f"{k}={v}" for k, v in sorted(data.metadata.items()))) or "-"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)


def _exit_status(code: int) -> int:
    if code < 0:  # killed by a signal
        return 128 + min(-code, 127)
    return code if code <= 255 else 255


@app.command("exec", context_settings={"ignore_unknown_options": False})
@_friendly
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
        raise typer.Exit(_terminal(ctx, sandbox_id, command, user=user, cwd=cwd, env=_pairs(env, "--env")))
    stdin_data = sys.stdin.read() if stdin else None

    def write_out(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    def write_err(data: str) -> None:
        sys.stderr.write(data)
        sys.stderr.flush()

    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        result = sandbox.exec(
            command,
            user=user,
            cwd=cwd,
            env=_pairs(env, "--env"),
            timeout=timeout,
            stdin=stdin_data,
            on_stdout=write_out,
            on_stderr=write_err,
        )
    except CommandTimeout as exc:
        _fail(exc.message, 124)
    finally:
        sandbox.close()
    raise typer.Exit(_exit_status(result.exit_code))


def _progress(description: str) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )


def _split_remote(arg: str) -> tuple[str, str] | None:
    """``ID:/path`` → ``(ID, /path)``; a local path (use ``./a:b`` for odd names) → ``None``."""
    if arg in ("-",) or arg.startswith(("/", "./", "../", "~")):
        return None
    match = _REMOTE.match(arg)
    if not match:
        return None
    return match["id"], match["path"] or "."


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


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
        with _progress(f"↑ {name}") as progress:
            task = progress.add_task(f"↑ {name}", total=total)

            def chunks() -> Iterator[bytes]:
                nonlocal sent
                while chunk := source.read(_CHUNK):
                    sent += len(chunk)
                    progress.advance(task, len(chunk))
                    yield chunk

            entry = sandbox.files.write(remote, chunks())
        err.print(f"[green]uploaded[/] {_human(sent)} to {escape(sandbox.id)}:{escape(entry.path or remote)}")
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
        with _progress(f"↓ {name}") as progress:
            task = progress.add_task(f"↓ {name}", total=entry.size or None)
            for chunk in sandbox.files.read(remote, format="stream"):
                sink.write(chunk)
                received += len(chunk)
                progress.advance(task, len(chunk))
        sink.flush()
    finally:
        if sink is not sys.stdout.buffer:
            sink.close()
    if local != "-":
        err.print(f"[green]downloaded[/] {_human(received)} to {escape(target)}")


@app.command()
@_friendly
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
    sandbox = _conn(ctx).sandbox(remote[0])
    try:
        if dst_remote is not None:
            _upload(sandbox, src, dst_remote[1])
        else:
            _download(sandbox, remote[1], dst)
    finally:
        sandbox.close()


@app.command()
def kill(
    ctx: typer.Context,
    sandbox_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Sandbox ids.")],
) -> None:
    """Kill one or more sandboxes (killing a dead sandbox is fine).

    [bold]Example:[/]  [cyan]cove kill sb-1234 sb-5678[/]
    """
    conn = _conn(ctx)
    failed = 0
    for sandbox_id in sandbox_ids:
        try:
            Sandbox.kill_by_id(sandbox_id, url=conn.url, api_key=conn.api_key)
        except CoveError as exc:
            failed += 1
            err.print(f"[bold red]error:[/] [red]{escape(sandbox_id)}: {escape(exc.message)}[/]")
        else:
            out.print(f"killed {escape(sandbox_id)}")
    if failed:
        raise typer.Exit(1)


def _terminal(ctx: typer.Context, sandbox_id: str, command: str | list[str], **kw: Any) -> int:
    from cove.cli.terminal import attach, terminal_size

    conn = _conn(ctx)
    sandbox = conn.sandbox(sandbox_id)
    try:
        rows, cols = terminal_size()
        proc = sandbox.pty.create(command, rows=rows, cols=cols, **kw)
    finally:
        sandbox.close()
    return _exit_status(attach(conn.url, conn.api_key, sandbox_id, proc.id))


@app.command()
@_friendly
def shell(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    user: Annotated[str | None, typer.Option("--user", "-u", help="Log in as this user.")] = None,
) -> None:
    """Open an interactive terminal (bash) in a sandbox; exit the shell to leave.

    [bold]Example:[/]  [cyan]cove shell sb-1234[/]
    """
    raise typer.Exit(_terminal(ctx, sandbox_id, "bash -l", user=user))


@app.command("run-code")
@_friendly
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
    sandbox = _conn(ctx).sandbox(sandbox_id)
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


@app.command()
@_friendly
def watch(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    path: Annotated[str, typer.Argument(metavar="PATH", help="Directory inside the sandbox.")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also watch subdirectories.")] = False,
) -> None:
    """Print file events (create, write, remove, rename) under a directory until Ctrl-C.

    [bold]Example:[/]  [cyan]cove watch sb-1234 /home/user -r[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        for event in sandbox.files.watch(path, recursive=recursive):
            if event.type != "watching":
                out.print(f"{event.type:7} {escape(event.path)}{'/' if event.is_dir else ''}")
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.close()


@app.command()
@_friendly
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
    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        proc = sandbox.processes.start(cmd[0] if len(cmd) == 1 else list(cmd), tag=tag)
    finally:
        sandbox.close()
    out.print(proc.id)


@app.command()
@_friendly
def logs(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    process_id: Annotated[str, typer.Argument(metavar="PROC", help="Process id (see `cove ps`).")],
    offset: Annotated[int | None, typer.Option("--offset", help="Start at this byte of its output.")] = None,
) -> None:
    """Print a background process's output (what is kept, then live) until it exits or Ctrl-C.

    [bold]Example:[/]  [cyan]cove logs sb-1234 3fa94c21[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
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
    raise typer.Exit(_exit_status(code))


@app.command("signal")
@_friendly
def signal_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    process_id: Annotated[str, typer.Argument(metavar="PROC", help="Process id (see `cove ps`).")],
    sig: Annotated[str, typer.Option("--signal", "-s", help="Signal name or number.")] = "SIGTERM",
) -> None:
    """Send a signal to a background process (its whole process group); SIGKILL to kill it.

    [bold]Example:[/]  [cyan]cove signal sb-1234 3fa94c21 -s SIGINT[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
    try:
        sandbox.processes.connect(process_id).signal(sig)
    finally:
        sandbox.close()


@app.command("ps")
@_friendly
def ps(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """List the background processes and terminals of a sandbox.

    [bold]Example:[/]  [cyan]cove ps sb-1234[/]
    """
    sandbox = _conn(ctx).sandbox(sandbox_id)
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


@app.command()
@_friendly
def pause(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Freeze a sandbox: its processes stop using CPU; memory and files are kept.

    The next exec or file call resumes it (unless it was created with auto_resume off).

    [bold]Example:[/]  [cyan]cove pause sb-1234[/]
    """
    conn = _conn(ctx)
    info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).pause()
    out.print(f"{escape(info.id)} {_state(info.state)}")


@app.command()
@_friendly
def resume(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Resume a paused sandbox; its processes continue where they stopped.

    [bold]Example:[/]  [cyan]cove resume sb-1234[/]
    """
    conn = _conn(ctx)
    info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).resume()
    out.print(f"{escape(info.id)} {_state(info.state)}")


@app.command()
@_friendly
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
        _fail("--by must be 'host' or 'path'")
    conn = _conn(ctx)
    out.print(conn.sandbox(sandbox_id).get_url(port_number, expires_in=expires, path=path, by=by))  # type: ignore[arg-type]


@app.command("file-url")
@_friendly
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
    files = _conn(ctx).sandbox(sandbox_id).files
    url = (
        files.upload_url(path, expires_in=expires) if upload else files.download_url(path, expires_in=expires)
    )
    out.print(url)


def _spinner(description: str) -> Any:
    return err.status(description) if err.is_terminal else contextlib.nullcontext()


@app.command()
@_friendly
def hibernate(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Release a sandbox's memory and CPU, keeping its files; the next call resumes it.

    [bold]Example:[/]  [cyan]cove hibernate sb-1234[/]
    """
    conn = _conn(ctx)
    with _spinner(f"hibernating {sandbox_id}…"):
        info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).hibernate()
    memory = (info.hibernation or {}).get("memory")
    kept = "processes checkpointed" if memory else "processes will restart on resume"
    out.print(f"{escape(info.id)} {_state(info.state)} ({kept})")


@app.command()
@_friendly
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
    conn = _conn(ctx)
    with _spinner(f"snapshotting {sandbox_id}…"):
        snap = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).snapshot(name, memory, volumes)  # type: ignore[arg-type]
    out.print(snap.id)


@snapshots_app.command("ls")
@_friendly
def snapshots_ls(ctx: typer.Context) -> None:
    """List your snapshots.

    [bold]Example:[/]  [cyan]cove snapshots ls[/]
    """
    conn = _conn(ctx)
    table = Table("ID", "NAME", "FROM", "CREATED", "LAYERS", "MEMORY", box=None)
    for snap in Sandbox.list_snapshots(url=conn.url, api_key=conn.api_key):
        table.add_row(
            snap.id,
            escape(snap.name or ""),
            snap.sandbox_id,
            _ago(snap.created_at),
            str(snap.layers),
            "yes" if snap.memory else "no",
        )
    out.print(table)


@snapshots_app.command("rm")
@_friendly
def snapshots_rm(
    ctx: typer.Context,
    snapshot_ids: Annotated[list[str], typer.Argument(metavar="SNAPSHOT...", help="Snapshot ids.")],
) -> None:
    """Delete snapshots (sandboxes started from them keep running).

    [bold]Example:[/]  [cyan]cove snapshots rm snapab12cd34ef56[/]
    """
    conn = _conn(ctx)
    for snapshot_id in snapshot_ids:
        Sandbox.delete_snapshot(snapshot_id, url=conn.url, api_key=conn.api_key)
        out.print(f"deleted {escape(snapshot_id)}")


@app.command()
@_friendly
def fork(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox to fork (it keeps running).")],
    count: Annotated[int, typer.Option("--count", "-n", help="How many children (1-20).")] = 1,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", "-l", help="Metadata KEY=VALUE for the children (repeatable)."),
    ] = None,
) -> None:
    """Fork a sandbox into N children that continue from this instant; prints their ids.

    [bold]Example:[/]  [cyan]cove fork sb-1234 -n 3 -l experiment=a[/]
    """
    conn = _conn(ctx)
    with _spinner(f"forking {sandbox_id} into {count}…"):
        children = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).fork(
            count, _pairs(label, "--label")
        )
    for child in children:
        child.close()
        out.print(child.id)


@keys_app.command("create")
@_friendly
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", "-n", help="A name to recognise the key by.")],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the key acts for.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="Let the key manage keys.")] = False,
) -> None:
    """Create an API key and print it (it is shown only this once).

    [bold]Example:[/]  [cyan]export COVE_API_KEY=$(cove keys create --name ci --tenant team-a)[/]
    """
    conn = _conn(ctx)
    key = create_key(name, tenant=tenant, admin=admin, url=conn.url, api_key=conn.api_key)
    out.print(key.key or "")
    role = "admin key" if key.admin else "key"
    err.print(
        f"[green]created {role}[/] {escape(key.id)} ({escape(key.name)}, tenant {escape(key.tenant)}); "
        "store it now, it is not shown again"
    )


@keys_app.command("ls")
@_friendly
def keys_ls(ctx: typer.Context) -> None:
    """List API keys (without their secrets).

    [bold]Example:[/]  [cyan]cove keys ls[/]
    """
    conn = _conn(ctx)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "TENANT", "ADMIN", "CREATED"):
        table.add_column(column, no_wrap=column == "ID")
    for key in list_keys(url=conn.url, api_key=conn.api_key):
        table.add_row(
            escape(key.id),
            escape(key.name),
            escape(key.tenant),
            "yes" if key.admin else "",
            _when(key.created_at),
        )
    out.print(table)


@keys_app.command("rm")
@_friendly
def keys_rm(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="Key id (not the secret).")],
) -> None:
    """Revoke an API key.

    [bold]Example:[/]  [cyan]cove keys rm key-1234[/]
    """
    conn = _conn(ctx)
    delete_key(key_id, url=conn.url, api_key=conn.api_key)
    out.print(f"revoked {escape(key_id)}")


@keys_app.command("rotate")
@_friendly
def keys_rotate(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="Key id (not the secret).")],
) -> None:
    """Give a key a new secret and print it; the old secret stops working at once.

    [bold]Example:[/]  [cyan]export COVE_API_KEY=$(cove keys rotate key_1234abcd)[/]
    """
    conn = _conn(ctx)
    key = rotate_key(key_id, url=conn.url, api_key=conn.api_key)
    out.print(key.key or "")
    err.print(f"[green]rotated[/] {escape(key.id)} ({escape(key.name)}, tenant {escape(key.tenant)})")


@app.command("audit")
@_friendly
def audit(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="One tenant's (admin keys).")] = None,
    action: Annotated[
        list[str] | None, typer.Option("--action", "-a", help="e.g. sandbox.kill (repeatable).")
    ] = None,
    sandbox: Annotated[
        str | None, typer.Option("--sandbox", "-s", help="Entries about this sandbox.")
    ] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO time or Unix seconds.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show the audit log: who created, killed, paused, hibernated, snapshotted, forked... what.

    [bold]Example:[/]  [cyan]cove audit --sandbox $ID[/], [cyan]cove audit -a key.rotate --tenant team-a[/]
    """
    conn = _conn(ctx)
    entries = audit_log(
        tenant=tenant,
        action=action,
        sandbox=sandbox,
        since=since,
        limit=limit,
        url=conn.url,
        api_key=conn.api_key,
    )
    if as_json:
        for e in entries:
            typer.echo(json.dumps({**asdict(e), "time": e.time.isoformat() if e.time else None}))
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TIME", "TENANT", "KEY", "ACTION", "OBJECT", "OUTCOME", "DETAIL"):
        table.add_column(column, no_wrap=column != "DETAIL")
    for e in entries:
        table.add_row(
            e.time.astimezone().strftime("%Y-%m-%d %H:%M:%S") if e.time else "",
            escape(e.tenant),
            escape(e.key_id or "(server)"),
            escape(e.action),
            escape(e.object),
            escape(e.outcome) if e.outcome == "ok" else f"[red]{escape(e.outcome)}[/]",
            escape(" ".join(f"{k}={v}" for k, v in e.detail.items())),
        )
    out.print(table)


@app.command()
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 7770,
    home: Annotated[
        str | None, typer.Option("--home", envvar="COVE_HOME", help="State directory (database, sandboxes).")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Run a short demo against the server once it is up.")
    ] = False,
) -> None:
    """Run the cove server (as root: it creates namespaces, cgroups and mounts).

    Sandboxes are owned by their own init process, not by the server: stopping or restarting the
    server leaves them running, and the next start re-adopts them. Without COVE_API_KEY, the first
    start prints an admin key once.

    [bold]Example:[/]  [cyan]sudo COVE_HOME=/var/lib/cove cove serve --port 7770[/]
    """
    from cove.server import serve as run_server

    run_server(host=host, port=port, home=home, demo=demo)


@app.command()
def doctor() -> None:
    """Check what this host supports: namespaces, cgroups, overlayfs, seccomp, the guest interpreter.

    Exits non-zero when something cove needs is missing, and says what to do about it.

    [bold]Example:[/]  [cyan]sudo cove doctor[/]
    """
    from cove.doctor import checks

    table = Table(box=None, show_header=False)
    failed = False
    for check in checks():
        mark = "[green]ok[/]" if check.ok else ("[red]missing[/]" if check.required else "[yellow]no[/]")
        failed |= check.required and not check.ok
        table.add_row(mark, check.name, escape(check.detail))
    out.print(table)
    if failed:
        raise typer.Exit(1)


# Shared by `cove worker` and `cove mcp`: how long the sandboxes they hibernate are kept.
KeepHibernated = Annotated[
    int, typer.Option("--keep-hibernated", help="Seconds a hibernated sandbox is kept (0: forever).", min=0)
]


class _SessionEnd(StrEnum):
    hibernate = "hibernate"
    kill = "kill"


@app.command()
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
        _fail(str(e))
    import anthropic

    if not environment_id:
        _fail("no environment: pass --environment-id or set ANTHROPIC_ENVIRONMENT_ID")
    if not environment_key and not (single_item and os.environ.get("ANTHROPIC_WORK_SECRET")):
        _fail("no environment key: set ANTHROPIC_ENVIRONMENT_KEY (or pass --environment-key)")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s")
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    conn = _conn(ctx)
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
        _fail(str(e))
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


@app.command()
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
        _fail(str(e))
    # stdout is the protocol channel on stdio: logs go to stderr only.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    conn = _conn(ctx)
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


volumes_cli.register(app)  # after the helpers it reuses are defined
pools_cli.register(app)
templates_cli.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
