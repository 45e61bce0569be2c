"""``cove keys create|ls|rm|rotate`` and ``cove audit`` (docs/tenants.md)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import connection, err, fail, friendly, out, when
from cove.config import Settings
from cove.sdk.sync import audit_log, create_key, delete_key, list_keys, rotate_key
from cove.store.base import KeyRecord, StoreError
from cove.store.factory import describe, make_store

keys_app = typer.Typer(
    help="Manage API keys (needs an admin key).", no_args_is_help=True, pretty_exceptions_enable=False
)


def _create_in_store(location: str | Path, name: str, tenant: str, admin: bool) -> tuple[KeyRecord, str]:
    """A key written into the server's own database: the server finds it at the next request that
    uses it (its key cache looks up what it has not seen), running or not."""
    # Imported here: auth pulls in FastAPI, which no other command needs.
    from cove.controlplane import auth

    async def insert() -> tuple[KeyRecord, str]:
        store = make_store(location)
        await store.open()
        try:
            return await auth.create_key(store, name, tenant, admin=admin)
        finally:
            await store.close()

    try:
        return asyncio.run(insert())
    except (StoreError, sqlite3.Error) as e:
        fail(f"{describe(location)}: {e}")


@keys_app.command("create")
@friendly
def keys_create(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Option("--name", "-n", help="A name to recognise the key by (default: admin or key)."),
    ] = None,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the key acts for.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="Let the key manage keys.")] = False,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Write the key straight into the server's store (COVE_DATABASE_URL's, or the one under "
            "--home), not through the API (as root on the server's host; needs no API key).",
        ),
    ] = False,
    home: Annotated[
        str | None,
        typer.Option("--home", envvar="COVE_HOME", help="With --local: the server's state directory."),
    ] = None,
) -> None:
    """Create an API key and print it (it is shown only this once).

    A first admin key, as root on the server's host: [cyan]cove keys create --admin[/] with no API key
    set writes it into the store under COVE_HOME (as [cyan]--local[/] does; the server need not be running).

    [bold]Examples:[/]  [cyan]export COVE_API_KEY=$(cove keys create --admin)[/]   (as root, on the server's host)
                [cyan]export COVE_API_KEY=$(cove keys create --name ci --tenant team-a)[/]
    """
    name = name or ("admin" if admin else "key")
    settings = Settings(home=Path(home)) if home else Settings()
    conn = connection(ctx)
    if not local and not conn.api_key and os.geteuid() == 0 and settings.db_path.exists():
        local = True  # root on the server's host with no key yet: the newcomer's first key
    if local:
        # COVE_DATABASE_URL, as the server reads it: the key goes into the PostgreSQL store then.
        rec, secret = _create_in_store(settings.store_location, name, tenant, admin)
        out.print(secret)
        role = "admin key" if rec.admin else "key"
        err.print(
            f"[green]created {role}[/] {escape(rec.id)} ({escape(rec.name)}, tenant {escape(rec.tenant)}) "
            f"in {escape(describe(settings.store_location))}; store it now, it is not shown again"
        )
        return
    if not conn.api_key:
        fail(
            "no API key: set COVE_API_KEY (or pass --api-key); as root on the server's host, "
            "--local writes a key into its store"
        )
    key = create_key(name, tenant=tenant, admin=admin, url=conn.url, api_key=conn.api_key)
    out.print(key.key or "")
    role = "admin key" if key.admin else "key"
    err.print(
        f"[green]created {role}[/] {escape(key.id)} ({escape(key.name)}, tenant {escape(key.tenant)}); "
        "store it now, it is not shown again"
    )


@keys_app.command("ls")
@friendly
def keys_ls(ctx: typer.Context) -> None:
    """List API keys (without their secrets).

    [bold]Example:[/]  [cyan]cove keys ls[/]
    """
    conn = connection(ctx)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "NAME", "TENANT", "ADMIN", "CREATED"):
        table.add_column(column, no_wrap=column == "ID")
    for key in list_keys(url=conn.url, api_key=conn.api_key):
        table.add_row(
            escape(key.id),
            escape(key.name),
            escape(key.tenant),
            "yes" if key.admin else "",
            when(key.created_at),
        )
    out.print(table)


@keys_app.command("rm")
@friendly
def keys_rm(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="Key id (not the secret).")],
) -> None:
    """Revoke an API key.

    [bold]Example:[/]  [cyan]cove keys rm key-1234[/]
    """
    conn = connection(ctx)
    delete_key(key_id, url=conn.url, api_key=conn.api_key)
    out.print(f"revoked {escape(key_id)}")


@keys_app.command("rotate")
@friendly
def keys_rotate(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="Key id (not the secret).")],
) -> None:
    """Give a key a new secret and print it; the old secret stops working at once.

    [bold]Example:[/]  [cyan]export COVE_API_KEY=$(cove keys rotate key_1234abcd)[/]
    """
    conn = connection(ctx)
    key = rotate_key(key_id, url=conn.url, api_key=conn.api_key)
    out.print(key.key or "")
    err.print(f"[green]rotated[/] {escape(key.id)} ({escape(key.name)}, tenant {escape(key.tenant)})")


@friendly
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
    conn = connection(ctx)
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


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
    app.add_typer(keys_app, name="keys")
