"""What only the PostgreSQL store has: versioned migrations under an advisory lock, database URLs
(never shown with their password), and `cove serve` and `cove keys create --local` on COVE_DATABASE_URL.
The behaviour it shares with SQLite is in test_store_conformance.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import pg
from cove.cli.main import app
from cove.controlplane import auth
from cove.devserver import Server, free_port
from cove.sdk import Sandbox
from cove.store import postgres as postgres_store
from cove.store.base import StoreError
from cove.store.factory import describe, make_store
from cove.store.postgres import MIGRATION_LOCK, MIGRATIONS, PostgresStore
from cove.store.sqlite import SQLiteStore
from cove.store.url import redact_url


def _rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def test_migrations_are_numbered_in_order() -> None:
    versions = [v for v, _, _ in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_servers_starting_together_migrate_once(pg_url: str) -> None:
    """Stores opening at once on a fresh database: every one opens, each step is applied once."""

    async def main() -> None:
        stores = [PostgresStore(pg_url) for _ in range(4)]
        await asyncio.gather(*(s.open() for s in stores))
        try:
            await stores[0].put_setting("k", 1)
            assert [await s.get_setting("k") for s in stores] == [1, 1, 1, 1]
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    asyncio.run(main())
    applied = _rows(pg_url, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert applied == [(v, name) for v, name, _ in MIGRATIONS]
    asyncio.run(main())  # a restart: nothing is applied again
    assert len(_rows(pg_url, "SELECT version FROM schema_migrations")) == len(MIGRATIONS)


def test_migration_waits_for_the_advisory_lock(pg_url: str) -> None:
    """While another server holds the migration lock, open() waits; it migrates once that is released."""

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
            await other.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            store = PostgresStore(pg_url)
            opening = asyncio.create_task(store.open())
            await asyncio.sleep(1)
            assert not opening.done()
            cur = await other.execute("SELECT to_regclass('sandboxes')")
            assert (await cur.fetchone()) == (None,)  # nothing applied meanwhile
            await other.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            await asyncio.wait_for(opening, 10)
        try:
            assert await store.count_keys() == 0
        finally:
            await store.close()

    asyncio.run(main())


def test_a_stuck_migration_lock_fails_the_start(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres_store, "MIGRATION_LOCK_TIMEOUT_S", 1)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
            await other.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            with pytest.raises(StoreError, match="another server has held its migration lock for 1 s"):
                await asyncio.wait_for(PostgresStore(pg_url).open(), 10)

    asyncio.run(main())


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    """A database migrated by a newer cove: an older one does not start on it (it would misread it)."""

    async def main() -> None:
        store = PostgresStore(pg_url)
        await store.open()
        await store.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, 'later')", (len(MIGRATIONS) + 1,)
            )
        with pytest.raises(StoreError, match=rf"schema version {len(MIGRATIONS) + 1}, newer .* upgrade cove"):
            await PostgresStore(pg_url).open()

    asyncio.run(main())


def test_unreachable_database_fails_fast_without_the_password() -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://cove:s3cret@127.0.0.1:{port}/cove"

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            await make_store(url).open()
        assert time.monotonic() - started < 15
        assert f"postgresql://cove:***@127.0.0.1:{port}/cove cannot be used" in str(err.value)
        assert "s3cret" not in str(err.value)

    asyncio.run(main())


def test_missing_database_is_named(postgres: pg.Postgres) -> None:
    url = postgres.url("no_such_db")

    async def main() -> None:
        with pytest.raises(StoreError, match=r"no_such_db cannot be used: .*does not exist"):
            await make_store(url).open()

    asyncio.run(main())


def test_store_locations(tmp_path: Path) -> None:
    assert isinstance(make_store(tmp_path / "cove.db"), SQLiteStore)
    assert isinstance(make_store(str(tmp_path / "cove.db")), SQLiteStore)
    assert isinstance(make_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(make_store("postgres://u@h/db"), PostgresStore)
    with pytest.raises(StoreError, match=r"mysql://u:\*\*\*@h/db: not a database URL cove knows"):
        make_store("mysql://u:pw@h/db")
    assert redact_url("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("postgresql://h/db?password=x&sslmode=require") == (
        "postgresql://h/db?password=***&sslmode=require"
    )
    assert describe(tmp_path / "cove.db") == str(tmp_path / "cove.db")
    assert describe("postgresql://u:p@h/db") == "postgresql://u:***@h/db"


def test_keys_create_local_writes_into_postgres(pg_url: str, tmp_path: Path) -> None:
    env = {"COVE_HOME": str(tmp_path), "COVE_DATABASE_URL": pg_url}
    args = ["keys", "create", "--local", "--admin", "-n", "pg-first"]
    made = CliRunner().invoke(app, args, env=env, catch_exceptions=False)
    assert made.exit_code == 0, made.output
    assert pg_url in made.stderr and not (tmp_path / "cove.db").exists()

    async def lookup() -> None:
        store = make_store(pg_url)
        await store.open()
        try:
            rec = await store.key_by_hash(auth.hash_key(made.stdout.strip()))
            assert rec is not None and rec.admin and rec.name == "pg-first"
        finally:
            await store.close()

    asyncio.run(lookup())

    bad = CliRunner().invoke(app, args, env={**env, "COVE_DATABASE_URL": "postgresql://u:pw@127.0.0.1:1/x"})
    assert bad.exit_code == 1 and "postgresql://u:***@127.0.0.1:1/x" in bad.stderr and "pw@" not in bad.output


def test_serve_refuses_an_unreachable_database() -> None:
    port = free_port()
    srv = Server(
        "pg-down", extra_env={"COVE_DATABASE_URL": f"postgresql://cove:s3cret@127.0.0.1:{port}/cove"}
    )
    try:
        with pytest.raises(RuntimeError, match=r"cove serve exited") as err:
            srv.start()
        assert f"postgresql://cove:***@127.0.0.1:{port}/cove cannot be used" in str(err.value)
        assert "s3cret" not in str(err.value)
    finally:
        srv.close()


def test_serve_on_postgres(pg_url: str) -> None:
    """`cove serve` with COVE_DATABASE_URL: its sandboxes are records in PostgreSQL, and outlive a restart."""
    srv = Server("pg", extra_env={"COVE_DATABASE_URL": pg_url})
    srv.start()
    try:
        assert not (srv.home / "cove.db").exists()
        sb = Sandbox.create(url=srv.url, api_key=srv.api_key, timeout=300, metadata={"via": "pg"})
        assert sb.exec("echo hello > /tmp/x; cat /tmp/x").stdout == "hello\n"
        row = _rows(pg_url, f"SELECT state, tenant, metadata::text FROM sandboxes WHERE id = '{sb.id}'")
        assert row == [("running", "default", '{"via": "pg"}')]

        srv.restart()  # the server re-adopts it from the database
        again = Sandbox.connect(sb.id, url=srv.url, api_key=srv.api_key)
        assert again.exec("cat /tmp/x").stdout == "hello\n"
        again.kill()
        (state,) = _rows(pg_url, f"SELECT state FROM sandboxes WHERE id = '{sb.id}'")[0]
        assert state not in ("running", "starting", "paused")
        assert _rows(pg_url, "SELECT count(*) FROM audit WHERE action = 'sandbox.create'")[0][0] >= 1
    finally:
        srv.close()
