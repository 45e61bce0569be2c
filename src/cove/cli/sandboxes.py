"""A sandbox's life: ``cove create|ls|info|kill|pause|resume|hibernate|fork``."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import ago, connection, err, friendly, out, pairs, spinner, styled_state, when
from cove.cli.network import network_spec, network_text
from cove.cli.volumes import parse_volume
from cove.errors import CoveError
from cove.sdk import Sandbox, SandboxInfo


def _info_json(info: SandboxInfo) -> dict[str, Any]:
    data = asdict(info)
    for key in ("created_at", "expires_at"):
        value = data.get(key)
        data[key] = value.isoformat() if isinstance(value, datetime) else value
    return data


@friendly
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
    snapshot_every: Annotated[
        int | None,
        typer.Option(
            "--snapshot-every",
            help="Copy it to the server's object store every this many seconds of use (>= 30), so that "
            "losing its node costs at most that much work (docs/object-storage.md).",
        ),
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
                [cyan]cove create --snapshot-every 300[/]   (needs COVE_OBJECT_STORE on the server)
    """
    conn = connection(ctx)
    sandbox = Sandbox.create(
        template,
        volumes=[parse_volume(v) for v in volume or []],
        network=network_spec(network) if network is not None else None,
        snapshot=snapshot,
        idle_timeout=idle_timeout,
        snapshot_every=snapshot_every,
        env=pairs(env, "--env"),
        timeout=timeout,
        metadata=pairs(label, "--label"),
        cpu=cpu,
        memory_mb=memory,
        pids=pids,
        disk_mb=disk,
        url=conn.url,
        api_key=conn.api_key,
    )
    sandbox.close()
    out.print(sandbox.id)


@friendly
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
    conn = connection(ctx)
    items = Sandbox.list(state=state, metadata=pairs(label, "--label"), url=conn.url, api_key=conn.api_key)
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
            styled_state(info.state),
            ago(info.created_at),
            ago(info.expires_at) if info.expires_at else "never",
            escape(labels) or "-",
        )
    out.print(table)


@friendly
def info(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one sandbox.

    [bold]Example:[/]  [cyan]cove info sb-1234 --json[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
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
        ("state", styled_state(data.state) + (f" ({escape(data.end_reason)})" if data.end_reason else "")),
        ("template", escape(data.template)),
        ("runtime", escape(data.runtime) or "-"),
        ("created", f"{when(data.created_at)} UTC ({ago(data.created_at)})"),
        (
            "expires",
            f"{when(data.expires_at)} UTC ({ago(data.expires_at)})" if data.expires_at else "never",
        ),
        ("timeout", f"{data.timeout}s" if data.timeout else "none"),
        ("user", escape(data.user or "-")),
        ("workdir", escape(data.workdir or "-")),
        ("limits", escape(limit_text) or "-"),
        ("network", escape(network_text(data.network.mode, data.network.allow, data.network.deny))),
        ("metadata", escape(", ".join(f"{k}={v}" for k, v in sorted(data.metadata.items()))) or "-"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)


def kill(
    ctx: typer.Context,
    sandbox_ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Sandbox ids.")],
) -> None:
    """Kill one or more sandboxes (killing a dead sandbox is fine).

    [bold]Example:[/]  [cyan]cove kill sb-1234 sb-5678[/]
    """
    conn = connection(ctx)
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


@friendly
def pause(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Freeze a sandbox: its processes stop using CPU; memory and files are kept.

    The next exec or file call resumes it (unless it was created with auto_resume off).

    [bold]Example:[/]  [cyan]cove pause sb-1234[/]
    """
    conn = connection(ctx)
    info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).pause()
    out.print(f"{escape(info.id)} {styled_state(info.state)}")


@friendly
def resume(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Resume a paused sandbox; its processes continue where they stopped.

    [bold]Example:[/]  [cyan]cove resume sb-1234[/]
    """
    conn = connection(ctx)
    info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).resume()
    out.print(f"{escape(info.id)} {styled_state(info.state)}")


@friendly
def hibernate(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
) -> None:
    """Release a sandbox's memory and CPU, keeping its files; the next call resumes it.

    [bold]Example:[/]  [cyan]cove hibernate sb-1234[/]
    """
    conn = connection(ctx)
    with spinner(f"hibernating {sandbox_id}…"):
        info = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).hibernate()
    memory = (info.hibernation or {}).get("memory")
    kept = "processes checkpointed" if memory else "processes will restart on resume"
    out.print(f"{escape(info.id)} {styled_state(info.state)} ({kept})")


@friendly
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
    conn = connection(ctx)
    with spinner(f"forking {sandbox_id} into {count}…"):
        children = Sandbox.connect(sandbox_id, url=conn.url, api_key=conn.api_key).fork(
            count, pairs(label, "--label")
        )
    for child in children:
        child.close()
        out.print(child.id)


def register(app: typer.Typer) -> None:
    for name, command in (
        ("create", create),
        ("ls", ls),
        ("info", info),
        ("kill", kill),
        ("pause", pause),
        ("resume", resume),
        ("hibernate", hibernate),
        ("fork", fork),
    ):
        app.command(name)(command)
