"""``cove pool ls|set|rm`` (warm pools) and ``cove quota get|set|rm`` (per-tenant quotas)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import connection, friendly, out
from cove.sdk._core import Call
from cove.sdk.sync import _once

pool_app = typer.Typer(
    help="Warm pools: sandboxes started ahead of time per template or snapshot (docs/pools.md).",
    no_args_is_help=True,
)
quota_app = typer.Typer(help="Per-tenant quotas on live sandboxes, CPU and memory.", no_args_is_help=True)


def _call(ctx: typer.Context, method: str, path: str, body: Any = None) -> Any:
    conn = connection(ctx)

    def op() -> Generator[Call, Any, Any]:
        return (yield Call(method, path, json=body))

    return _once(op(), conn.url, conn.api_key, None)


def _pool_table(items: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("POOL", "SOURCE", "READY", "TARGET", "MIN", "MAX", "HITS", "MISSES", "ERROR"):
        table.add_column(column, no_wrap=column == "POOL")
    for p in items:
        table.add_row(
            escape(p["name"]),
            p["source"],
            f"{p['ready']}" + (f" (+{p['starting']})" if p["starting"] else ""),
            str(p["target"]),
            str(p["min"]),
            str(p["max"]),
            str(p["hits"]),
            str(p["misses"]),
            escape(p.get("error") or ""),
        )
    return table


def _quota_text(q: dict[str, Any]) -> str:
    quota, used = q["quota"] or {}, q["usage"]

    def of(key: str, unit: str = "") -> str:
        cap = quota.get(key)
        return f"{used[key]:g}{unit} of {'∞' if cap is None else f'{cap:g}{unit}'}"

    return (
        f"tenant {q['tenant']}: sandboxes {of('sandboxes')}, cpu {of('cpu')} cores, "
        f"memory {of('memory_mb', ' MB')}"
    )


@pool_app.command("ls")
@friendly
def pool_ls(ctx: typer.Context) -> None:
    """List pools: ready members, the target the refill aims for, hits and misses.

    [bold]Example:[/]  [cyan]cove pool ls[/]
    """
    out.print(_pool_table(_call(ctx, "GET", "/v1/pools")["items"]))


@pool_app.command("set")
@friendly
def pool_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="A template name or a snapshot id.")],
    min_: Annotated[int, typer.Option("--min", help="Members kept ready even when idle.")],
    max_: Annotated[
        int | None, typer.Option("--max", help="The most it grows to under demand \\[default: --min].")
    ] = None,
) -> None:
    """Keep sandboxes of a template or snapshot ready (needs an admin key).

    [bold]Example:[/]  [cyan]cove pool set base --min 4 --max 32[/]
    """
    body = {"min": min_, "max": min_ if max_ is None else max_}
    out.print(_pool_table([_call(ctx, "PUT", f"/v1/pools/{name}", body)]))


@pool_app.command("rm")
@friendly
def pool_rm(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Stop pooling a template or snapshot; its ready members are killed.

    [bold]Example:[/]  [cyan]cove pool rm base[/]
    """
    _call(ctx, "DELETE", f"/v1/pools/{name}")
    out.print(f"removed pool {escape(name)}")


@quota_app.command("get")
@friendly
def quota_get(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Argument(help="A tenant (admin key); default: yours.")] = None,
) -> None:
    """Show a tenant's quota and what it uses.

    [bold]Example:[/]  [cyan]cove quota get team-a[/]
    """
    path = f"/v1/tenants/{tenant}/quota" if tenant else "/v1/quota"
    out.print(escape(_quota_text(_call(ctx, "GET", path))))


@quota_app.command("set")
@friendly
def quota_set(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    sandboxes: Annotated[int | None, typer.Option("--sandboxes", help="Live sandboxes.")] = None,
    cpu: Annotated[float | None, typer.Option("--cpu", help="Sum of CPU limits, cores.")] = None,
    memory_mb: Annotated[int | None, typer.Option("--memory-mb", help="Sum of memory limits.")] = None,
) -> None:
    """Cap a tenant's live sandboxes, CPU and memory (needs an admin key; unset: no cap).

    [bold]Example:[/]  [cyan]cove quota set team-a --sandboxes 20 --memory-mb 16384[/]
    """
    body = {"sandboxes": sandboxes, "cpu": cpu, "memory_mb": memory_mb}
    out.print(escape(_quota_text(_call(ctx, "PUT", f"/v1/tenants/{tenant}/quota", body))))


@quota_app.command("rm")
@friendly
def quota_rm(ctx: typer.Context, tenant: Annotated[str, typer.Argument(help="The tenant.")]) -> None:
    """Remove a tenant's quota.

    [bold]Example:[/]  [cyan]cove quota rm team-a[/]
    """
    _call(ctx, "DELETE", f"/v1/tenants/{tenant}/quota")
    out.print(f"removed the quota of {escape(tenant)}")


def register(app: typer.Typer) -> None:
    app.add_typer(pool_app, name="pool")
    app.add_typer(quota_app, name="quota")
