"""PostgreSQL implementation of the store (psycopg 3, an async connection pool), for several servers
sharing one database. Same semantics as the SQLite store; the schema is versioned (MIGRATIONS) and
migrated at `open()` under an advisory lock, so servers starting together apply each step once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, fields
from typing import Any

import psycopg
import psycopg.errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg.types.json import Json
from psycopg_pool import AsyncConnectionPool

from cove.store.base import (
    AuditEntry,
    KeyRecord,
    NodeRecord,
    Page,
    SandboxRecord,
    SnapshotRecord,
    Store,
    StoreError,
    TemplateRecord,
    VolumeRecord,
    decode_cursor,
    encode_cursor,
)
from cove.store.url import redact_url

# (version, name, SQL): applied in order, each in its own transaction, recorded in schema_migrations.
# Never edit a released step: add the next one.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
CREATE TABLE sandboxes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    timeout BIGINT NOT NULL,
    metadata JSON NOT NULL,
    env JSON NOT NULL,
    "user" TEXT NOT NULL,
    workdir TEXT NOT NULL,
    limits JSON NOT NULL,
    node JSON NOT NULL,
    end_reason TEXT,
    layers JSON NOT NULL DEFAULT '[]',
    auto_resume BOOLEAN NOT NULL DEFAULT TRUE,
    idle_timeout BIGINT NOT NULL DEFAULT 0,
    on_idle TEXT NOT NULL DEFAULT 'pause',
    on_timeout TEXT NOT NULL DEFAULT 'kill',
    checkpoint JSON NOT NULL DEFAULT '{}',
    network JSON NOT NULL DEFAULT '{}',
    mounts JSON NOT NULL DEFAULT '[]',
    template_config JSON NOT NULL DEFAULT '{}'
);
CREATE INDEX sandboxes_tenant_state ON sandboxes (tenant, state);
CREATE TABLE snapshots (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT,
    sandbox_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    layers JSON NOT NULL,
    memory BOOLEAN NOT NULL,
    config JSON NOT NULL
);
CREATE TABLE volumes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    size_mb BIGINT,
    created_at DOUBLE PRECISION NOT NULL,
    source JSON NOT NULL DEFAULT '{}',
    UNIQUE (tenant, name)
);
CREATE TABLE templates (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    build_id TEXT NOT NULL,
    layers JSON NOT NULL,
    config JSON NOT NULL,
    sizes JSON NOT NULL,
    base TEXT NOT NULL,
    steps JSON NOT NULL
);
CREATE INDEX templates_tenant_name ON templates (tenant, name);
CREATE TABLE audit (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time DOUBLE PRECISION NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    outcome TEXT NOT NULL,
    sandbox TEXT,
    detail JSON NOT NULL
);
CREATE INDEX audit_tenant_seq ON audit (tenant, seq);
CREATE INDEX audit_sandbox ON audit (sandbox);
CREATE INDEX audit_time ON audit (time);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value JSON NOT NULL
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    admin BOOLEAN NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    hash TEXT UNIQUE NOT NULL
);
""",
    ),
    (
        2,
        "fleet: nodes, leases, and which node holds each object",
        """
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    capacity JSON NOT NULL DEFAULT '{}'
);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
ALTER TABLE sandboxes ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
CREATE INDEX sandboxes_node_state ON sandboxes (node_id, state);
ALTER TABLE snapshots ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE volumes ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
ALTER TABLE templates ADD COLUMN node_id TEXT NOT NULL DEFAULT '';
""",
    ),
    (
        3,
        "sandboxes' last use seen by any server",
        "ALTER TABLE sandboxes ADD COLUMN active_at DOUBLE PRECISION;",
    ),
    (
        4,
        "sandboxes' copies in the object store",
        "ALTER TABLE sandboxes ADD COLUMN durable JSON NOT NULL DEFAULT '{}';",
    ),
]

# pg_advisory_lock's key for the migration step ("cove" in ASCII); advisory locks are per database.
MIGRATION_LOCK = 0x636F7665
# How long a server waits for another one's migration before it gives up.
MIGRATION_LOCK_TIMEOUT_S = 120
CONNECT_TIMEOUT_S = 10

# `json` rather than `jsonb`: it keeps a document as written (key order included), as SQLite's text does.
_SANDBOX_JSON = {
    "metadata", "env", "limits", "node", "layers", "checkpoint", "network", "mounts", "template_config",
    "durable",
}  # fmt: skip
_SANDBOX_FIELDS = [f.name for f in fields(SandboxRecord)]
_SNAPSHOT_JSON = {"layers", "config"}
_SNAPSHOT_FIELDS = {f.name for f in fields(SnapshotRecord)}
_TEMPLATE_JSON = {"layers", "config", "sizes", "steps"}
_TEMPLATE_FIELDS = {f.name for f in fields(TemplateRecord)}
_VOLUME_FIELDS = [f.name for f in fields(VolumeRecord)]
_NODE_FIELDS = {f.name for f in fields(NodeRecord)}


def _values(row: dict[str, Any], json_fields: set[str]) -> dict[str, Any]:
    return {k: Json(v) if k in json_fields else v for k, v in row.items()}


def _insert_sql(table: str, row: dict[str, Any]) -> str:
    # Column names come from the records' dataclass fields, never from input; quoted: `user` is reserved.
    cols = ", ".join(f'"{k}"' for k in row)
    marks = ", ".join(f"%({k})s" for k in row)
    return f"INSERT INTO {table} ({cols}) VALUES ({marks})"


def _update_sql(table: str, what: str, changes: dict[str, Any], known: set[str] | list[str]) -> str:
    unknown = set(changes) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} fields: {sorted(unknown)}")
    sets = ", ".join(f'"{k}" = %({k})s' for k in changes)
    return f"UPDATE {table} SET {sets} WHERE id = %(_id)s"


def _sandbox(row: dict[str, Any]) -> SandboxRecord:
    return SandboxRecord(**{k: row[k] for k in _SANDBOX_FIELDS})


def _snapshot(row: dict[str, Any]) -> SnapshotRecord:
    return SnapshotRecord(**{k: row[k] for k in _SNAPSHOT_FIELDS})


def _template(row: dict[str, Any]) -> TemplateRecord:
    return TemplateRecord(**{k: row[k] for k in _TEMPLATE_FIELDS})


def _volume(row: dict[str, Any]) -> VolumeRecord:
    return VolumeRecord(**{k: row[k] for k in _VOLUME_FIELDS})


def _key(row: dict[str, Any]) -> KeyRecord:
    return KeyRecord(**{k: row[k] for k in ("id", "name", "tenant", "admin", "created_at", "hash")})


class PostgresStore(Store):
    def __init__(self, url: str, max_connections: int = 10) -> None:
        self.url = url
        self.max_connections = max_connections
        self._where = redact_url(url)  # for messages: never the password
        self._pool: AsyncConnectionPool | None = None
        self._busy = 0  # calls in flight: close() lets them finish, as SQLite's queued calls do
        self._idle = asyncio.Event()

    def _conninfo(self) -> str:
        try:
            params = conninfo_to_dict(self.url)
        except psycopg.ProgrammingError as e:
            raise StoreError(f"{self._where} is not a valid PostgreSQL URL: {e}") from e
        # Unless the URL says otherwise: an unreachable host fails the start instead of hanging it.
        params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        params.setdefault("application_name", "cove")
        return make_conninfo("", **params)

    async def open(self) -> None:
        conninfo = self._conninfo()
        try:
            # One connection of its own for the migrations: its session holds the advisory lock.
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await self._migrate(conn)
            pool = AsyncConnectionPool(
                conninfo,
                min_size=1,
                max_size=self.max_connections,
                open=False,
                kwargs={"autocommit": True, "row_factory": dict_row},
                # A connection broken by a database restart is replaced before a call gets it.
                check=AsyncConnectionPool.check_connection,
                timeout=CONNECT_TIMEOUT_S,
                name="cove-store",
            )
            try:
                await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            except BaseException:
                await pool.close()
                raise
        except psycopg.Error as e:
            raise StoreError(f"the database {self._where} cannot be used: {e}") from e
        self._pool = pool

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Apply the steps this database lacks. The lock is the session's: closing `conn` releases it,
        whatever happened here."""
        await conn.execute(f"SET lock_timeout = '{MIGRATION_LOCK_TIMEOUT_S}s'")
        try:
            await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        except psycopg.errors.LockNotAvailable as e:
            raise StoreError(
                f"the database {self._where}: another server has held its migration lock for "
                f"{MIGRATION_LOCK_TIMEOUT_S} s (is one stuck migrating?)"
            ) from e
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM schema_migrations")
        applied = {row[0] for row in await cur.fetchall()}
        known = MIGRATIONS[-1][0]
        if applied and max(applied) > known:
            raise StoreError(
                f"the database {self._where} has schema version {max(applied)}, newer than this "
                f"cove's {known}: upgrade cove"
            )
        for version, name, sql in MIGRATIONS:
            if version in applied:
                continue
            async with conn.transaction():
                await conn.execute(sql)  # several statements: allowed without parameters
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                )

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        while self._busy:
            self._idle.clear()
            await self._idle.wait()
        await pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        self._busy += 1
        try:
            async with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as e:  # unreachable, restarted, a pool timeout
            raise StoreError(f"the database {self._where}: {e}") from e
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _fetchall(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        async with self._conn() as conn:
            return await (await conn.execute(sql, args)).fetchall()

    async def _fetchone(self, sql: str, args: Any = None) -> dict[str, Any] | None:
        async with self._conn() as conn:
            return await (await conn.execute(sql, args)).fetchone()

    async def _rowcount(self, sql: str, args: Any = None) -> int:
        async with self._conn() as conn:
            return (await conn.execute(sql, args)).rowcount

    # -- sandboxes -----------------------------------------------------------------------
    async def insert_sandbox(self, rec: SandboxRecord) -> None:
        row = asdict(rec)
        await self._rowcount(_insert_sql("sandboxes", row), _values(row, _SANDBOX_JSON))

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        row = await self._fetchone("SELECT * FROM sandboxes WHERE id = %s", (sandbox_id,))
        return _sandbox(row) if row else None

    async def update_sandbox(self, sandbox_id: str, expect_state: str | None = None, **changes: Any) -> bool:
        sql = _update_sql("sandboxes", "sandbox", changes, _SANDBOX_FIELDS)
        vals = {**_values(changes, _SANDBOX_JSON), "_id": sandbox_id}
        if expect_state is not None:
            # Under READ COMMITTED a racing update waits for the row and re-checks the state on the
            # committed version: of two updates expecting the same state, one matches.
            sql += " AND state = %(_expect)s"
            vals["_expect"] = expect_state
        return bool(await self._rowcount(sql, vals))

    async def list_sandboxes(
        self,
        tenant: str | None,
        states: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        where, args = ["TRUE"], []
        if tenant is not None:
            where.append("tenant = %s")
            args.append(tenant)
        if states:
            where.append("state = ANY(%s)")
            args.append(list(states))
        for key, value in (metadata or {}).items():
            where.append("metadata ->> %s = %s")
            args.extend([key, value])
        if cursor:
            where.append("seq > %s")
            args.append(decode_cursor(cursor))
        args.append(limit + 1)
        rows = await self._fetchall(
            f"SELECT * FROM sandboxes WHERE {' AND '.join(where)} ORDER BY seq LIMIT %s", args
        )
        more = len(rows) > limit
        rows = rows[:limit]
        nxt = encode_cursor(rows[-1]["seq"]) if more and rows else None
        return Page(items=[_sandbox(r) for r in rows], next_cursor=nxt)

    async def count_by_state(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT state, COUNT(*) AS n FROM sandboxes GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # -- snapshots -----------------------------------------------------------------------
    async def insert_snapshot(self, rec: SnapshotRecord) -> None:
        row = asdict(rec)
        await self._rowcount(_insert_sql("snapshots", row), _values(row, _SNAPSHOT_JSON))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        row = await self._fetchone("SELECT * FROM snapshots WHERE id = %s", (snapshot_id,))
        return _snapshot(row) if row else None

    async def update_snapshot(self, snapshot_id: str, **changes: Any) -> bool:
        if "memory" in changes:  # callers may pass SQLite's 0/1; the column is a boolean here
            changes["memory"] = bool(changes["memory"])
        sql = _update_sql("snapshots", "snapshot", changes, _SNAPSHOT_FIELDS)
        return bool(await self._rowcount(sql, {**_values(changes, _SNAPSHOT_JSON), "_id": snapshot_id}))

    async def list_snapshots(self, tenant: str | None) -> list[SnapshotRecord]:
        if tenant is None:
            rows = await self._fetchall("SELECT * FROM snapshots ORDER BY seq")
        else:
            rows = await self._fetchall("SELECT * FROM snapshots WHERE tenant = %s ORDER BY seq", (tenant,))
        return [_snapshot(r) for r in rows]

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        return bool(await self._rowcount("DELETE FROM snapshots WHERE id = %s", (snapshot_id,)))

    # -- volumes -------------------------------------------------------------------------
    async def insert_volume(self, rec: VolumeRecord) -> None:
        row = asdict(rec)
        try:
            await self._rowcount(_insert_sql("volumes", row), _values(row, {"source"}))
        except psycopg.IntegrityError as e:
            raise ValueError(f"volume {rec.name!r} exists") from e

    async def get_volume(self, tenant: str, name: str) -> VolumeRecord | None:
        row = await self._fetchone("SELECT * FROM volumes WHERE tenant = %s AND name = %s", (tenant, name))
        return _volume(row) if row else None

    async def get_volume_by_id(self, volume_id: str) -> VolumeRecord | None:
        row = await self._fetchone("SELECT * FROM volumes WHERE id = %s", (volume_id,))
        return _volume(row) if row else None

    async def list_volumes(self, tenant: str | None) -> list[VolumeRecord]:
        if tenant is None:
            rows = await self._fetchall("SELECT * FROM volumes ORDER BY seq")
        else:
            rows = await self._fetchall("SELECT * FROM volumes WHERE tenant = %s ORDER BY seq", (tenant,))
        return [_volume(r) for r in rows]

    async def delete_volume(self, volume_id: str) -> bool:
        return bool(await self._rowcount("DELETE FROM volumes WHERE id = %s", (volume_id,)))

    # -- templates -----------------------------------------------------------------------
    async def insert_template(self, rec: TemplateRecord) -> None:
        row = asdict(rec)
        await self._rowcount(_insert_sql("templates", row), _values(row, _TEMPLATE_JSON))

    async def get_template(self, tenant: str, name: str) -> TemplateRecord | None:
        row = await self._fetchone(
            "SELECT * FROM templates WHERE tenant = %s AND name = %s AND state = 'ready'"
            " ORDER BY seq DESC LIMIT 1",
            (tenant, name),
        )
        return _template(row) if row else None

    async def list_templates(self, tenant: str | None) -> list[TemplateRecord]:
        if tenant is None:
            rows = await self._fetchall("SELECT * FROM templates ORDER BY seq")
        else:
            rows = await self._fetchall("SELECT * FROM templates WHERE tenant = %s ORDER BY seq", (tenant,))
        return [_template(r) for r in rows]

    async def update_template(self, template_id: str, **changes: Any) -> bool:
        sql = _update_sql("templates", "template", changes, _TEMPLATE_FIELDS)
        return bool(await self._rowcount(sql, {**_values(changes, _TEMPLATE_JSON), "_id": template_id}))

    async def delete_template(self, template_id: str) -> bool:
        return bool(await self._rowcount("DELETE FROM templates WHERE id = %s", (template_id,)))

    # -- keys ----------------------------------------------------------------------------
    async def insert_key(self, rec: KeyRecord) -> None:
        row = asdict(rec)
        await self._rowcount(_insert_sql("api_keys", row), row)

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        row = await self._fetchone("SELECT * FROM api_keys WHERE hash = %s", (key_hash,))
        return _key(row) if row else None

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        if tenant is None:
            rows = await self._fetchall("SELECT * FROM api_keys ORDER BY created_at")
        else:
            rows = await self._fetchall(
                "SELECT * FROM api_keys WHERE tenant = %s ORDER BY created_at", (tenant,)
            )
        return [_key(r) for r in rows]

    async def delete_key(self, key_id: str) -> bool:
        return bool(await self._rowcount("DELETE FROM api_keys WHERE id = %s", (key_id,)))

    async def update_key_hash(self, key_id: str, key_hash: str) -> KeyRecord | None:
        row = await self._fetchone(
            "UPDATE api_keys SET hash = %s WHERE id = %s RETURNING *", (key_hash, key_id)
        )
        return _key(row) if row else None

    async def count_keys(self) -> int:
        row = await self._fetchone("SELECT COUNT(*) AS n FROM api_keys")
        return int(row["n"]) if row else 0

    # -- audit ---------------------------------------------------------------------------
    async def insert_audit(self, entries: list[AuditEntry]) -> None:
        rows = [
            (e.time, e.tenant, e.key_id, e.action, e.object, e.outcome, e.sandbox, Json(e.detail))
            for e in entries
        ]
        sql = (
            "INSERT INTO audit (time, tenant, key_id, action, object, outcome, sandbox, detail)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        )
        async with self._conn() as conn, conn.transaction(), conn.cursor() as cur:  # all or none
            await cur.executemany(sql, rows)

    async def list_audit(
        self,
        tenant: str | None,
        actions: list[str] | None = None,
        sandbox: str | None = None,
        obj: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[AuditEntry]:
        where, args = ["TRUE"], []
        for column, value in (("tenant", tenant), ("sandbox", sandbox), ("object", obj)):
            if value is not None:
                where.append(f"{column} = %s")
                args.append(value)
        if actions:
            where.append("action = ANY(%s)")
            args.append(list(actions))
        for cond, value in (("time >= %s", since), ("time < %s", until), ("seq < %s", before)):
            if value is not None:
                where.append(cond)
                args.append(value)
        args.append(limit)
        rows = await self._fetchall(
            f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT %s", args
        )
        return [AuditEntry(**{f.name: r[f.name] for f in fields(AuditEntry)}) for r in rows]

    async def prune_audit(self, older_than: float) -> int:
        return await self._rowcount("DELETE FROM audit WHERE time < %s", (older_than,))

    # -- nodes and leases -----------------------------------------------------------------
    async def put_node(self, rec: NodeRecord) -> None:
        row = asdict(rec)
        sets = ", ".join(f"{k} = excluded.{k}" for k in row if k != "id")
        await self._rowcount(
            _insert_sql("nodes", row) + f" ON CONFLICT (id) DO UPDATE SET {sets}", _values(row, {"capacity"})
        )

    async def get_node(self, node_id: str) -> NodeRecord | None:
        row = await self._fetchone("SELECT * FROM nodes WHERE id = %s", (node_id,))
        return NodeRecord(**row) if row else None

    async def list_nodes(self) -> list[NodeRecord]:
        return [NodeRecord(**r) for r in await self._fetchall('SELECT * FROM nodes ORDER BY id COLLATE "C"')]

    async def update_node(self, node_id: str, **changes: Any) -> bool:
        sql = _update_sql("nodes", "node", changes, _NODE_FIELDS - {"id"})
        return bool(await self._rowcount(sql, {**_values(changes, {"capacity"}), "_id": node_id}))

    async def count_by_node(self, states: list[str]) -> dict[str, int]:
        rows = await self._fetchall(
            "SELECT node_id, COUNT(*) AS n FROM sandboxes WHERE state = ANY(%s) GROUP BY node_id", (states,)
        )
        return {r["node_id"]: int(r["n"]) for r in rows}

    async def take_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        # One statement: the row lock of ON CONFLICT makes concurrent takers wait and re-check.
        return bool(
            await self._rowcount(
                "INSERT INTO leases (name, holder, expires_at) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, expires_at = excluded.expires_at"
                " WHERE leases.holder = excluded.holder OR leases.expires_at < %s",
                (name, holder, now + ttl, now),
            )
        )

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._rowcount("DELETE FROM leases WHERE name = %s AND holder = %s", (name, holder))

    # -- settings (pools, quotas: small JSON documents by key) ------------------------------
    async def get_setting(self, key: str) -> Any:
        row = await self._fetchone("SELECT value FROM settings WHERE key = %s", (key,))
        return row["value"] if row else None

    async def put_setting(self, key: str, value: Any) -> None:
        await self._rowcount(
            "INSERT INTO settings (key, value) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, Json(value)),
        )

    async def delete_setting(self, key: str) -> bool:
        return bool(await self._rowcount("DELETE FROM settings WHERE key = %s", (key,)))

    async def list_settings(self, prefix: str) -> dict[str, Any]:
        # COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
        rows = await self._fetchall(
            'SELECT key, value FROM settings WHERE starts_with(key, %s) ORDER BY key COLLATE "C"', (prefix,)
        )
        return {r["key"]: r["value"] for r in rows}
