"""SQLite (WAL) implementation of the store. Calls run in a worker thread, one connection, one lock;
point reads on the request path (a sandbox by id, a key by hash) run on the event loop itself, on a
read-only connection of their own: WAL readers never wait for the writer, a read by primary key
takes tens of µs, and the hand-over to the store's thread and back cost about 0.4 ms per exec."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

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

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    runtime TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL,
    timeout INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    env TEXT NOT NULL,
    user TEXT NOT NULL,
    workdir TEXT NOT NULL,
    limits TEXT NOT NULL,
    node TEXT NOT NULL,
    end_reason TEXT,
    layers TEXT NOT NULL DEFAULT '[]',
    auto_resume INTEGER NOT NULL DEFAULT 1,
    idle_timeout INTEGER NOT NULL DEFAULT 0,
    on_idle TEXT NOT NULL DEFAULT 'pause',
    on_timeout TEXT NOT NULL DEFAULT 'kill',
    checkpoint TEXT NOT NULL DEFAULT '{}',
    network TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS sandboxes_tenant_state ON sandboxes (tenant, state);
CREATE TABLE IF NOT EXISTS snapshots (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT,
    sandbox_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    layers TEXT NOT NULL,
    memory INTEGER NOT NULL,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    size_mb INTEGER,
    created_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '{}',
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS templates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    build_id TEXT NOT NULL,
    layers TEXT NOT NULL,
    config TEXT NOT NULL,
    sizes TEXT NOT NULL,
    base TEXT NOT NULL,
    steps TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_tenant_name ON templates (tenant, name);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    tenant TEXT NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL,
    outcome TEXT NOT NULL,
    sandbox TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant_seq ON audit (tenant, seq);
CREATE INDEX IF NOT EXISTS audit_sandbox ON audit (sandbox);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    token TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL,
    capacity TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    admin INTEGER NOT NULL,
    created_at REAL NOT NULL,
    hash TEXT UNIQUE NOT NULL
);
"""


_JSON_FIELDS = {
    "metadata", "env", "limits", "node", "layers", "checkpoint", "network", "mounts", "template_config",
    "durable",
}  # fmt: skip
# Columns added after the first release: (table, column, definition), added to older databases at open.
_ADDED_COLUMNS = [
    ("sandboxes", "network", "TEXT NOT NULL DEFAULT '{}'"),
    ("sandboxes", "mounts", "TEXT NOT NULL DEFAULT '[]'"),
    ("sandboxes", "template_config", "TEXT NOT NULL DEFAULT '{}'"),
    ("sandboxes", "node_id", "TEXT NOT NULL DEFAULT ''"),
    ("sandboxes", "active_at", "REAL"),
    ("sandboxes", "durable", "TEXT NOT NULL DEFAULT '{}'"),
    ("snapshots", "node_id", "TEXT NOT NULL DEFAULT ''"),
    ("volumes", "node_id", "TEXT NOT NULL DEFAULT ''"),
    ("templates", "node_id", "TEXT NOT NULL DEFAULT ''"),
]
_SANDBOX_FIELDS = [f.name for f in fields(SandboxRecord)]


def _to_row(rec: SandboxRecord) -> dict[str, Any]:
    d = asdict(rec)
    for k in _JSON_FIELDS:
        d[k] = json.dumps(d[k])
    return d


def _from_row(row: sqlite3.Row) -> SandboxRecord:
    d = {k: row[k] for k in _SANDBOX_FIELDS}
    for k in _JSON_FIELDS:
        d[k] = json.loads(d[k])
    d["auto_resume"] = bool(d["auto_resume"])
    return SandboxRecord(**d)


class SQLiteStore(Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        # The store's own thread: its calls are serialized anyway, and in the event loop's shared
        # pool a claim's insert could wait behind slow kernel work (a teardown's unmount syncs the
        # filesystem, CRIU dumps).
        self._thread: ThreadPoolExecutor | None = None
        self._reader: sqlite3.Connection | None = None  # the event loop's (see the module's docstring)

    def _run(self, fn: Any, *args: Any) -> Any:
        assert self._db is not None, "store is not open"
        with self._db:  # one transaction per call
            return fn(self._db, *args)

    async def _call(self, fn: Any, *args: Any) -> Any:
        if self._thread is None:
            raise StoreError("the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, fn, *args)

    async def _read(self, fn: Any, *args: Any) -> Any:
        """A point read on the caller's thread (each statement its own read transaction, seeing every
        write committed before it); through the store's thread if SQLite says busy (WAL recovery)."""
        if self._reader is None:
            raise StoreError("the store is not open")
        try:
            return fn(self._reader, *args)
        except sqlite3.OperationalError:
            return await self._call(fn, *args)

    async def open(self) -> None:
        def _open() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA busy_timeout=5000")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                # A damaged file must stop the server: started on it (or on an empty one), adoption
                # would sweep every sandbox the store no longer knows (docs/faults.md).
                problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError("; ".join(problems))
                db.executescript(SCHEMA)
                for table, column, definition in _ADDED_COLUMNS:
                    have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            except sqlite3.DatabaseError as e:
                db.close()
                raise StoreError(
                    f"the database {self.path} cannot be used ({e}); cove will not start on it. "
                    "Restore it from a backup, or move it and its -wal and -shm files aside to start "
                    "empty (that forgets, and removes, every sandbox, snapshot and key of this server)"
                ) from e
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.row_factory = sqlite3.Row
            reader.execute("PRAGMA query_only=ON")
            reader.execute("PRAGMA busy_timeout=0")  # never block the event loop: fall back instead
            self._db, self._reader = db, reader

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cove-store")
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, _open)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        thread, self._thread = self._thread, None
        if self._reader is not None:  # the event loop's own: closed here, on it
            reader, self._reader = self._reader, None
            reader.close()

        def _close() -> None:  # on the store's thread: after the calls queued before it
            if self._db is not None:
                db, self._db = self._db, None
                db.close()

        await asyncio.get_running_loop().run_in_executor(thread, _close)
        thread.shutdown(wait=False)

    # -- sandboxes -----------------------------------------------------------------------
    async def insert_sandbox(self, rec: SandboxRecord) -> None:
        row = _to_row(rec)
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        await self._call(lambda db: db.execute(f"INSERT INTO sandboxes ({cols}) VALUES ({marks})", row))

    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None:
        def q(db: sqlite3.Connection) -> SandboxRecord | None:
            row = db.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            return _from_row(row) if row else None

        return await self._read(q)

    async def update_sandbox(self, sandbox_id: str, expect_state: str | None = None, **changes: Any) -> bool:
        unknown = set(changes) - set(_SANDBOX_FIELDS)
        if unknown:
            raise ValueError(f"unknown sandbox fields: {sorted(unknown)}")
        vals = {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in changes.items()}
        sets = ", ".join(f"{k} = :{k}" for k in vals)
        sql = f"UPDATE sandboxes SET {sets} WHERE id = :_id"
        vals["_id"] = sandbox_id
        if expect_state is not None:
            sql += " AND state = :_expect"
            vals["_expect"] = expect_state
        return bool(await self._call(lambda db: db.execute(sql, vals).rowcount))

    async def list_sandboxes(
        self,
        tenant: str | None,
        states: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        where, args = ["1=1"], []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(states)
        for key, value in (metadata or {}).items():
            # json_each, not json_extract: a JSON path cannot quote a key holding a double quote.
            where.append("EXISTS (SELECT 1 FROM json_each(metadata) AS m WHERE m.key = ? AND m.value = ?)")
            args.extend([key, value])
        if cursor:
            where.append("seq > ?")
            args.append(decode_cursor(cursor))
        sql = f"SELECT * FROM sandboxes WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?"
        args.append(limit + 1)

        def q(db: sqlite3.Connection) -> Page:
            rows = db.execute(sql, args).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            nxt = encode_cursor(rows[-1]["seq"]) if more and rows else None
            return Page(items=[_from_row(r) for r in rows], next_cursor=nxt)

        return await self._call(q)

    async def count_by_state(self) -> dict[str, int]:
        def q(db: sqlite3.Connection) -> dict[str, int]:
            return {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")}

        return await self._call(q)

    # -- snapshots -----------------------------------------------------------------------
    @staticmethod
    def _snapshot(row: sqlite3.Row) -> SnapshotRecord:
        return SnapshotRecord(
            id=row["id"],
            tenant=row["tenant"],
            name=row["name"],
            sandbox_id=row["sandbox_id"],
            state=row["state"],
            created_at=row["created_at"],
            layers=json.loads(row["layers"]),
            memory=bool(row["memory"]),
            config=json.loads(row["config"]),
            node_id=row["node_id"],
        )

    async def insert_snapshot(self, rec: SnapshotRecord) -> None:
        row = asdict(rec)
        row["layers"], row["config"], row["memory"] = (
            json.dumps(rec.layers),
            json.dumps(rec.config),
            int(rec.memory),
        )
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        await self._call(lambda db: db.execute(f"INSERT INTO snapshots ({cols}) VALUES ({marks})", row))

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        def q(db: sqlite3.Connection) -> SnapshotRecord | None:
            row = db.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
            return self._snapshot(row) if row else None

        return await self._call(q)

    async def update_snapshot(self, snapshot_id: str, **changes: Any) -> bool:
        vals = {k: json.dumps(v) if k in ("layers", "config") else v for k, v in changes.items()}
        sets = ", ".join(f"{k} = :{k}" for k in vals)
        vals["_id"] = snapshot_id
        sql = f"UPDATE snapshots SET {sets} WHERE id = :_id"
        return bool(await self._call(lambda db: db.execute(sql, vals).rowcount))

    async def list_snapshots(self, tenant: str | None) -> list[SnapshotRecord]:
        def q(db: sqlite3.Connection) -> list[SnapshotRecord]:
            if tenant is None:
                rows = db.execute("SELECT * FROM snapshots ORDER BY seq").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM snapshots WHERE tenant = ? ORDER BY seq", (tenant,)
                ).fetchall()
            return [self._snapshot(r) for r in rows]

        return await self._call(q)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        sql = "DELETE FROM snapshots WHERE id = ?"
        return bool(await self._call(lambda db: db.execute(sql, (snapshot_id,)).rowcount))

    # -- volumes -------------------------------------------------------------------------
    @staticmethod
    def _volume(row: sqlite3.Row) -> VolumeRecord:
        return VolumeRecord(
            id=row["id"],
            tenant=row["tenant"],
            name=row["name"],
            size_mb=row["size_mb"],
            created_at=row["created_at"],
            source=json.loads(row["source"]),
            node_id=row["node_id"],
        )

    async def insert_volume(self, rec: VolumeRecord) -> None:
        row = asdict(rec)
        row["source"] = json.dumps(rec.source)
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        try:
            await self._call(lambda db: db.execute(f"INSERT INTO volumes ({cols}) VALUES ({marks})", row))
        except sqlite3.IntegrityError as e:
            raise ValueError(f"volume {rec.name!r} exists") from e

    async def get_volume(self, tenant: str, name: str) -> VolumeRecord | None:
        def q(db: sqlite3.Connection) -> VolumeRecord | None:
            sql = "SELECT * FROM volumes WHERE tenant = ? AND name = ?"
            row = db.execute(sql, (tenant, name)).fetchone()
            return self._volume(row) if row else None

        return await self._call(q)

    async def get_volume_by_id(self, volume_id: str) -> VolumeRecord | None:
        def q(db: sqlite3.Connection) -> VolumeRecord | None:
            row = db.execute("SELECT * FROM volumes WHERE id = ?", (volume_id,)).fetchone()
            return self._volume(row) if row else None

        return await self._call(q)

    async def list_volumes(self, tenant: str | None) -> list[VolumeRecord]:
        def q(db: sqlite3.Connection) -> list[VolumeRecord]:
            if tenant is None:
                rows = db.execute("SELECT * FROM volumes ORDER BY seq").fetchall()
            else:
                rows = db.execute("SELECT * FROM volumes WHERE tenant = ? ORDER BY seq", (tenant,)).fetchall()
            return [self._volume(r) for r in rows]

        return await self._call(q)

    async def delete_volume(self, volume_id: str) -> bool:
        sql = "DELETE FROM volumes WHERE id = ?"
        return bool(await self._call(lambda db: db.execute(sql, (volume_id,)).rowcount))

    # -- templates -----------------------------------------------------------------------
    _TEMPLATE_JSON = ("layers", "config", "sizes", "steps")

    @classmethod
    def _template(cls, row: sqlite3.Row) -> TemplateRecord:
        d = {k: row[k] for k in row.keys() if k != "seq"}  # noqa: SIM118 (a Row, not a dict)
        for k in cls._TEMPLATE_JSON:
            d[k] = json.loads(d[k])
        return TemplateRecord(**d)

    async def insert_template(self, rec: TemplateRecord) -> None:
        row = asdict(rec)
        for k in self._TEMPLATE_JSON:
            row[k] = json.dumps(row[k])
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        await self._call(lambda db: db.execute(f"INSERT INTO templates ({cols}) VALUES ({marks})", row))

    async def get_template(self, tenant: str, name: str) -> TemplateRecord | None:
        def q(db: sqlite3.Connection) -> TemplateRecord | None:
            sql = "SELECT * FROM templates WHERE tenant = ? AND name = ? AND state = 'ready'"
            sql += " ORDER BY seq DESC"
            row = db.execute(sql, (tenant, name)).fetchone()
            return self._template(row) if row else None

        return await self._call(q)

    async def list_templates(self, tenant: str | None) -> list[TemplateRecord]:
        def q(db: sqlite3.Connection) -> list[TemplateRecord]:
            if tenant is None:
                rows = db.execute("SELECT * FROM templates ORDER BY seq").fetchall()
            else:
                sql = "SELECT * FROM templates WHERE tenant = ? ORDER BY seq"
                rows = db.execute(sql, (tenant,)).fetchall()
            return [self._template(r) for r in rows]

        return await self._call(q)

    async def update_template(self, template_id: str, **changes: Any) -> bool:
        vals = {k: json.dumps(v) if k in self._TEMPLATE_JSON else v for k, v in changes.items()}
        sets = ", ".join(f"{k} = :{k}" for k in vals)
        vals["_id"] = template_id
        sql = f"UPDATE templates SET {sets} WHERE id = :_id"
        return bool(await self._call(lambda db: db.execute(sql, vals).rowcount))

    async def delete_template(self, template_id: str) -> bool:
        sql = "DELETE FROM templates WHERE id = ?"
        return bool(await self._call(lambda db: db.execute(sql, (template_id,)).rowcount))

    # -- keys ----------------------------------------------------------------------------
    async def insert_key(self, rec: KeyRecord) -> None:
        await self._call(
            lambda db: db.execute(
                "INSERT INTO api_keys (id, name, tenant, admin, created_at, hash) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, rec.name, rec.tenant, int(rec.admin), rec.created_at, rec.hash),
            )
        )

    @staticmethod
    def _key(row: sqlite3.Row) -> KeyRecord:
        return KeyRecord(
            id=row["id"],
            name=row["name"],
            tenant=row["tenant"],
            admin=bool(row["admin"]),
            created_at=row["created_at"],
            hash=row["hash"],
        )

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        def q(db: sqlite3.Connection) -> KeyRecord | None:
            row = db.execute("SELECT * FROM api_keys WHERE hash = ?", (key_hash,)).fetchone()
            return self._key(row) if row else None

        return await self._read(q)

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        def q(db: sqlite3.Connection) -> list[KeyRecord]:
            if tenant is None:
                rows = db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
            else:
                rows = db.execute(
                    "SELECT * FROM api_keys WHERE tenant = ? ORDER BY created_at", (tenant,)
                ).fetchall()
            return [self._key(r) for r in rows]

        return await self._call(q)

    async def delete_key(self, key_id: str) -> bool:
        return bool(
            await self._call(lambda db: db.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount)
        )

    async def update_key_hash(self, key_id: str, key_hash: str) -> KeyRecord | None:
        def q(db: sqlite3.Connection) -> KeyRecord | None:
            db.execute("UPDATE api_keys SET hash = ? WHERE id = ?", (key_hash, key_id))
            row = db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            return self._key(row) if row else None

        return await self._call(q)

    # -- audit ---------------------------------------------------------------------------
    async def insert_audit(self, entries: list[AuditEntry]) -> None:
        rows = [
            (e.time, e.tenant, e.key_id, e.action, e.object, e.outcome, e.sandbox, json.dumps(e.detail))
            for e in entries
        ]
        sql = (
            "INSERT INTO audit (time, tenant, key_id, action, object, outcome, sandbox, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        await self._call(lambda db: db.executemany(sql, rows))

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
        where, args = ["1=1"], []
        for column, value in (("tenant", tenant), ("sandbox", sandbox), ("object", obj)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if actions:
            where.append(f"action IN ({', '.join('?' for _ in actions)})")
            args.extend(actions)
        for cond, value in (("time >= ?", since), ("time < ?", until), ("seq < ?", before)):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"
        args.append(limit)

        def q(db: sqlite3.Connection) -> list[AuditEntry]:
            return [
                AuditEntry(
                    time=r["time"],
                    tenant=r["tenant"],
                    key_id=r["key_id"],
                    action=r["action"],
                    object=r["object"],
                    outcome=r["outcome"],
                    sandbox=r["sandbox"],
                    detail=json.loads(r["detail"]),
                    seq=r["seq"],
                )
                for r in db.execute(sql, args)
            ]

        return await self._call(q)

    async def prune_audit(self, older_than: float) -> int:
        sql = "DELETE FROM audit WHERE time < ?"
        return int(await self._call(lambda db: db.execute(sql, (older_than,)).rowcount))

    async def count_keys(self) -> int:
        return int(await self._call(lambda db: db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]))

    # -- nodes and leases -----------------------------------------------------------------
    @staticmethod
    def _node(row: sqlite3.Row) -> NodeRecord:
        d = {k: row[k] for k in row.keys()}  # noqa: SIM118 (a Row, not a dict)
        d["capacity"] = json.loads(d["capacity"])
        return NodeRecord(**d)

    async def put_node(self, rec: NodeRecord) -> None:
        row = asdict(rec)
        row["capacity"] = json.dumps(rec.capacity)
        cols = ", ".join(row)
        marks = ", ".join(f":{k}" for k in row)
        sets = ", ".join(f"{k} = excluded.{k}" for k in row if k != "id")
        sql = f"INSERT INTO nodes ({cols}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {sets}"
        await self._call(lambda db: db.execute(sql, row))

    async def get_node(self, node_id: str) -> NodeRecord | None:
        def q(db: sqlite3.Connection) -> NodeRecord | None:
            row = db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
            return self._node(row) if row else None

        return await self._call(q)

    async def list_nodes(self) -> list[NodeRecord]:
        return await self._call(
            lambda db: [self._node(r) for r in db.execute("SELECT * FROM nodes ORDER BY id")]
        )

    async def update_node(self, node_id: str, **changes: Any) -> bool:
        unknown = set(changes) - {f.name for f in fields(NodeRecord)} | ({"id"} & set(changes))
        if unknown:
            raise ValueError(f"unknown node fields: {sorted(unknown)}")
        vals = {k: json.dumps(v) if k == "capacity" else v for k, v in changes.items()}
        sets = ", ".join(f"{k} = :{k}" for k in vals)
        vals["_id"] = node_id
        sql = f"UPDATE nodes SET {sets} WHERE id = :_id"
        return bool(await self._call(lambda db: db.execute(sql, vals).rowcount))

    async def count_by_node(self, states: list[str]) -> dict[str, int]:
        sql = (
            f"SELECT node_id, COUNT(*) FROM sandboxes WHERE state IN ({', '.join('?' for _ in states)})"
            " GROUP BY node_id"
        )
        return await self._call(lambda db: {r[0]: r[1] for r in db.execute(sql, states)})

    async def take_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        # One statement: taken if absent, expired or already ours (SQLite serialises writers).
        sql = (
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
            " SET holder = excluded.holder, expires_at = excluded.expires_at"
            " WHERE leases.holder = excluded.holder OR leases.expires_at < ?"
        )
        return bool(await self._call(lambda db: db.execute(sql, (name, holder, now + ttl, now)).rowcount))

    async def drop_lease(self, name: str, holder: str) -> None:
        sql = "DELETE FROM leases WHERE name = ? AND holder = ?"
        await self._call(lambda db: db.execute(sql, (name, holder)))

    # -- settings (pools, quotas: small JSON documents by key) ------------------------------
    async def get_setting(self, key: str) -> Any:
        row = await self._call(
            lambda db: db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        )
        return json.loads(row[0]) if row else None

    async def put_setting(self, key: str, value: Any) -> None:
        sql = "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        await self._call(lambda db: db.execute(sql, (key, json.dumps(value))))

    async def delete_setting(self, key: str) -> bool:
        return bool(
            await self._call(lambda db: db.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount)
        )

    async def list_settings(self, prefix: str) -> dict[str, Any]:
        def q(db: sqlite3.Connection) -> dict[str, Any]:
            rows = db.execute(
                "SELECT key, value FROM settings WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            )
            return {r[0]: json.loads(r[1]) for r in rows}

        return await self._call(q)
