"""The store interface's behaviour, the same on every backend: each test runs against SQLite and
against a real PostgreSQL 15 (tests/pg.py), each on a fresh database."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cove.store.base import (
    AuditEntry,
    KeyRecord,
    NodeRecord,
    SandboxRecord,
    SnapshotRecord,
    Store,
    StoreError,
    TemplateRecord,
    VolumeRecord,
    encode_cursor,
)
from cove.store.factory import make_store

Body = Callable[[Store], Awaitable[None]]
NOW = 1_700_000_000.123456  # fixed: records built twice compare equal


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "cove.db"
    return request.getfixturevalue("pg_url")


def run(location: str | Path, body: Body) -> None:
    """`body` on an open store at `location`, in an event loop of its own (closed after)."""

    async def main() -> None:
        store = make_store(location)
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def sandbox(sid: str, tenant: str = "t1", state: str = "running", **kw: object) -> SandboxRecord:
    return SandboxRecord(
        id=sid, tenant=tenant, template="base", state=state, runtime="namespaces",
        created_at=NOW, updated_at=NOW + 0.5, expires_at=None, timeout=300, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def full_sandbox(sid: str) -> SandboxRecord:
    """Every field away from its default; JSON documents nested, keys out of alphabetical order."""
    return replace(
        sandbox(sid),
        node_id="node-a",
        active_at=NOW + 42.5,
        expires_at=NOW + 300.25,
        metadata={"zeta": "1", "alpha": "two words", 'quo"te': "x", "dot.ted": "é"},
        env={"PATH": "/usr/bin", "A": ""},
        user="root",
        workdir="/work",
        limits={"memory_mb": 512, "cpus": 1.5, "pids": None},
        node={"pid": 1234, "start": 99.5, "nested": {"list": [1, "two", None, True]}},
        end_reason="killed",
        layers=["l3", "l1", "l2"],
        auto_resume=False,
        idle_timeout=60,
        on_idle="hibernate",
        on_timeout="hibernate",
        checkpoint={"memory": True, "image": "ck-1"},
        network={"public_traffic": True, "allow": ["10.0.0.0/8"]},
        mounts=[{"volume": "v1", "path": "/data", "readonly": False}],
        template_config={"binds": [["/a", "/b"]], "rootfs": "debian"},
    )


# -- sandboxes ---------------------------------------------------------------------------------------
def test_sandbox_round_trip(location: str | Path) -> None:
    async def body(store: Store) -> None:
        rec = full_sandbox("sb-full")
        await store.insert_sandbox(rec)
        await store.insert_sandbox(sandbox("sb-plain"))
        got = await store.get_sandbox("sb-full")
        assert got == rec
        assert list(got.metadata) == list(rec.metadata)  # the order the caller gave
        assert await store.get_sandbox("sb-plain") == sandbox("sb-plain")  # the defaults
        assert await store.get_sandbox("nope") is None

    run(location, body)


def test_sandbox_ids_are_unique(location: str | Path) -> None:
    async def body(store: Store) -> None:
        await store.insert_sandbox(sandbox("sb-1"))
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await store.insert_sandbox(sandbox("sb-1", tenant="t2"))
        got = await store.get_sandbox("sb-1")
        assert got is not None and got.tenant == "t1"
        await store.insert_sandbox(sandbox("sb-2"))  # the store still works after the refusal

    run(location, body)


def test_update_sandbox(location: str | Path) -> None:
    async def body(store: Store) -> None:
        await store.insert_sandbox(sandbox("sb-1"))
        assert await store.update_sandbox(
            "sb-1", state="paused", metadata={"b": "2", "a": "1"}, layers=["x"], expires_at=None,
            auto_resume=False, node={"pid": 7}, end_reason=None, timeout=10,
        )  # fmt: skip
        got = await store.get_sandbox("sb-1")
        assert got is not None
        assert (got.state, got.metadata, got.layers, got.auto_resume, got.node, got.timeout) == (
            "paused", {"b": "2", "a": "1"}, ["x"], False, {"pid": 7}, 10,
        )  # fmt: skip
        assert list(got.metadata) == ["b", "a"]
        assert not await store.update_sandbox("nope", state="paused")
        with pytest.raises(ValueError, match="unknown sandbox fields"):
            await store.update_sandbox("sb-1", colour="red")

    run(location, body)


def test_update_sandbox_compare_and_set(location: str | Path) -> None:
    async def body(store: Store) -> None:
        await store.insert_sandbox(sandbox("sb-1", state="running"))
        assert not await store.update_sandbox("sb-1", expect_state="paused", state="killed")
        got = await store.get_sandbox("sb-1")
        assert got is not None and got.state == "running"
        assert await store.update_sandbox("sb-1", expect_state="running", state="paused", end_reason="x")
        got = await store.get_sandbox("sb-1")
        assert got is not None and (got.state, got.end_reason) == ("paused", "x")
        assert not await store.update_sandbox("nope", expect_state="running", state="paused")

    run(location, body)


def test_concurrent_compare_and_set_has_one_winner(location: str | Path) -> None:
    """Updates racing from the same expected state (a kill and a pause, say): exactly one applies."""

    async def body(store: Store) -> None:
        for round_ in range(10):
            sid = f"sb-{round_}"
            await store.insert_sandbox(sandbox(sid, state="running"))
            won = await asyncio.gather(
                *(store.update_sandbox(sid, expect_state="running", state=f"s{i}") for i in range(8))
            )
            assert sum(won) == 1, won
            got = await store.get_sandbox(sid)
            assert got is not None and got.state == f"s{won.index(True)}"

    run(location, body)


def test_concurrent_compare_and_set_across_two_stores(location: str | Path) -> None:
    """Two stores on one database (two servers): their racing updates have one winner too."""

    async def body(first: Store) -> None:
        second = make_store(location)
        await second.open()
        try:
            for round_ in range(10):
                sid = f"sb-{round_}"
                await first.insert_sandbox(sandbox(sid))
                a, b = await asyncio.gather(
                    first.update_sandbox(sid, expect_state="running", state="killed"),
                    second.update_sandbox(sid, expect_state="running", state="paused"),
                )
                assert a != b
                got = await second.get_sandbox(sid)
                assert got is not None and got.state == ("killed" if a else "paused")
        finally:
            await second.close()

    run(location, body)


def test_list_sandboxes_filters(location: str | Path) -> None:
    async def body(store: Store) -> None:
        await store.insert_sandbox(
            sandbox("a", tenant="t1", state="running", metadata={"app": "x", "v": "1"})
        )
        await store.insert_sandbox(sandbox("b", tenant="t1", state="paused", metadata={"app": "x"}))
        await store.insert_sandbox(sandbox("c", tenant="t2", state="running", metadata={"app": "y"}))
        await store.insert_sandbox(sandbox("d", tenant="t1", state="killed", metadata={'quo"te': "q"}))

        async def ids(*args: object, **kw: object) -> list[str]:
            return [r.id for r in (await store.list_sandboxes(*args, **kw)).items]  # type: ignore[arg-type]

        assert await ids(None) == ["a", "b", "c", "d"]
        assert await ids("t1") == ["a", "b", "d"]
        assert await ids("t3") == []
        assert await ids(None, states=["running"]) == ["a", "c"]
        assert await ids("t1", states=["running", "paused"]) == ["a", "b"]
        assert await ids(None, metadata={"app": "x"}) == ["a", "b"]
        assert await ids(None, metadata={"app": "x", "v": "1"}) == ["a"]
        assert await ids(None, metadata={"app": "z"}) == []
        assert await ids(None, metadata={'quo"te': "q"}) == ["d"]
        assert await ids("t2", states=["running"], metadata={"app": "y"}) == ["c"]
        page = await store.list_sandboxes(None)
        assert page.next_cursor is None and page.items[0] == await store.get_sandbox("a")

    run(location, body)


def test_list_sandboxes_pages(location: str | Path) -> None:
    async def body(store: Store) -> None:
        for i in range(7):
            await store.insert_sandbox(sandbox(f"sb-{i}", state="running" if i % 2 == 0 else "paused"))
        seen, cursor, pages = [], None, 0
        while True:
            page = await store.list_sandboxes(None, limit=3, cursor=cursor)
            seen += [r.id for r in page.items]
            pages += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == [f"sb-{i}" for i in range(7)] and pages == 3
        # Exactly a page's worth: no cursor to an empty page.
        page = await store.list_sandboxes(None, limit=7)
        assert len(page.items) == 7 and page.next_cursor is None
        # Filters and cursors together: the running ones, two at a time.
        first = await store.list_sandboxes(None, states=["running"], limit=2)
        assert [r.id for r in first.items] == ["sb-0", "sb-2"] and first.next_cursor
        second = await store.list_sandboxes(None, states=["running"], limit=2, cursor=first.next_cursor)
        assert [r.id for r in second.items] == ["sb-4", "sb-6"] and second.next_cursor is None
        # A cursor past the end: an empty page.
        past = await store.list_sandboxes(None, cursor=encode_cursor(10**9))
        assert past.items == [] and past.next_cursor is None

    run(location, body)


@pytest.mark.parametrize("bad", ["!!!", "bm90LWEtbnVtYmVy", "////", "\u00e9"])
def test_list_sandboxes_bad_cursor(location: str | Path, bad: str) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(ValueError, match="invalid cursor"):
            await store.list_sandboxes(None, cursor=bad)
        assert (await store.list_sandboxes(None)).items == []  # the store still works

    run(location, body)


def test_count_by_state(location: str | Path) -> None:
    async def body(store: Store) -> None:
        assert await store.count_by_state() == {}
        for i, state in enumerate(["running", "running", "paused", "killed", "running"]):
            await store.insert_sandbox(sandbox(f"sb-{i}", state=state))
        assert await store.count_by_state() == {"running": 3, "paused": 1, "killed": 1}

    run(location, body)


# -- snapshots ---------------------------------------------------------------------------------------
def _snapshot(sid: str, tenant: str = "t1", name: str | None = None, **kw: object) -> SnapshotRecord:
    return SnapshotRecord(
        id=sid, tenant=tenant, name=name, sandbox_id="sb-1", state="creating", created_at=NOW,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_snapshots(location: str | Path) -> None:
    async def body(store: Store) -> None:
        full = _snapshot(
            "sn-1", name="before", layers=["a", "b"], memory=True, config={"env": {"Z": "1", "A": "2"}}
        )
        await store.insert_snapshot(full)
        await store.insert_snapshot(_snapshot("sn-2", tenant="t2"))
        await store.insert_snapshot(_snapshot("sn-3"))
        assert await store.get_snapshot("sn-1") == full
        assert await store.get_snapshot("nope") is None
        assert [s.id for s in await store.list_snapshots(None)] == ["sn-1", "sn-2", "sn-3"]
        assert [s.id for s in await store.list_snapshots("t1")] == ["sn-1", "sn-3"]
        assert await store.list_snapshots("t9") == []

        assert await store.update_snapshot(
            "sn-3", state="ready", layers=["c"], config={"k": [1]}, memory=True
        )
        got = await store.get_snapshot("sn-3")
        assert got is not None and (got.state, got.layers, got.config, got.memory) == (
            "ready",
            ["c"],
            {"k": [1]},
            True,
        )
        assert not await store.update_snapshot("nope", state="ready")
        # The snapshot service writes memory as 0/1 (SQLite's booleans): both stores take it.
        assert await store.update_snapshot("sn-3", memory=0)
        assert (await store.get_snapshot("sn-3")).memory is False  # type: ignore[union-attr]
        assert await store.update_snapshot("sn-3", memory=1)
        assert (await store.get_snapshot("sn-3")).memory is True  # type: ignore[union-attr]

        assert await store.delete_snapshot("sn-1")
        assert not await store.delete_snapshot("sn-1")
        assert [s.id for s in await store.list_snapshots(None)] == ["sn-2", "sn-3"]

    run(location, body)


# -- volumes -----------------------------------------------------------------------------------------
def test_volumes(location: str | Path) -> None:
    async def body(store: Store) -> None:
        v1 = VolumeRecord(id="vol-1", tenant="t1", name="data", size_mb=100, created_at=1.5)
        v2 = VolumeRecord(id="vol-2", tenant="t1", name="copy", size_mb=None, created_at=2.5,
                          source={"snapshot": "sn-1"})  # fmt: skip
        await store.insert_volume(v1)
        await store.insert_volume(v2)
        with pytest.raises(ValueError, match="exists"):
            await store.insert_volume(replace(v1, id="vol-3"))
        v4 = replace(v1, id="vol-4", tenant="t2")  # the same name for another tenant
        await store.insert_volume(v4)
        assert await store.get_volume("t1", "data") == v1
        assert await store.get_volume("t2", "data") == v4
        assert await store.get_volume("t1", "nope") is None
        assert await store.get_volume_by_id("vol-2") == v2
        assert await store.get_volume_by_id("nope") is None
        assert [v.id for v in await store.list_volumes(None)] == ["vol-1", "vol-2", "vol-4"]
        assert [v.id for v in await store.list_volumes("t1")] == ["vol-1", "vol-2"]
        assert await store.delete_volume("vol-1")
        assert not await store.delete_volume("vol-1")
        await store.insert_volume(replace(v1, id="vol-5"))  # the name is free again
        assert [v.id for v in await store.list_volumes("t1")] == ["vol-2", "vol-5"]

    run(location, body)


# -- templates ---------------------------------------------------------------------------------------
def _template(tid: str, name: str, state: str = "ready", tenant: str = "t1", **kw: object) -> TemplateRecord:
    return TemplateRecord(
        id=tid, tenant=tenant, name=name, state=state, created_at=1.0, updated_at=2.0,
        **kw,  # type: ignore[arg-type]
    )  # fmt: skip


def test_templates(location: str | Path) -> None:
    async def body(store: Store) -> None:
        full = _template(
            "tpl-1", "py", build_id="b1", layers=["l1", "l2"], config={"start": "x", "env": {"B": "1", "A": "2"}},
            sizes=[10, 20], base="base", steps=[{"run": "pip install x", "layer": "l2"}],
        )  # fmt: skip
        await store.insert_template(full)
        await store.insert_template(_template("tpl-2", "py", state="building"))
        await store.insert_template(_template("tpl-3", "py", tenant="t2"))
        assert await store.get_template("t1", "py") == full
        assert await store.get_template("t1", "nope") is None
        # The newest ready one of a name wins; a building one is never returned.
        assert await store.update_template("tpl-2", state="ready", layers=["l9"], sizes=[1], steps=[])
        got = await store.get_template("t1", "py")
        assert got is not None and (got.id, got.layers, got.sizes) == ("tpl-2", ["l9"], [1])
        assert not await store.update_template("nope", state="ready")
        assert [t.id for t in await store.list_templates(None)] == ["tpl-1", "tpl-2", "tpl-3"]
        assert [t.id for t in await store.list_templates("t2")] == ["tpl-3"]
        assert await store.delete_template("tpl-2")
        assert not await store.delete_template("tpl-2")
        got = await store.get_template("t1", "py")
        assert got is not None and got.id == "tpl-1"

    run(location, body)


# -- keys --------------------------------------------------------------------------------------------
def test_keys(location: str | Path) -> None:
    async def body(store: Store) -> None:
        assert await store.count_keys() == 0
        k1 = KeyRecord(id="k1", name="admin", tenant="default", admin=True, created_at=1.0, hash="h1")
        k2 = KeyRecord(id="k2", name="ci", tenant="team-a", admin=False, created_at=2.0, hash="h2")
        k3 = KeyRecord(id="k3", name="old", tenant="team-a", admin=False, created_at=0.5, hash="h3")
        for k in (k1, k2, k3):
            await store.insert_key(k)
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            await store.insert_key(replace(k1, id="k4"))  # the same secret twice
        assert await store.count_keys() == 3
        assert await store.key_by_hash("h2") == k2
        assert await store.key_by_hash("nope") is None
        assert [k.id for k in await store.list_keys()] == ["k3", "k1", "k2"]  # oldest first
        assert [k.id for k in await store.list_keys("team-a")] == ["k3", "k2"]

        rotated = await store.update_key_hash("k2", "h2-new")
        assert rotated == replace(k2, hash="h2-new")
        assert await store.key_by_hash("h2") is None and await store.key_by_hash("h2-new") == rotated
        assert await store.update_key_hash("nope", "h9") is None

        assert await store.delete_key("k1")
        assert not await store.delete_key("k1")
        assert await store.count_keys() == 2

    run(location, body)


# -- settings ----------------------------------------------------------------------------------------
def test_settings(location: str | Path) -> None:
    async def body(store: Store) -> None:
        assert await store.get_setting("pool:base") is None
        pool = {"name": "base", "min": 2, "max": 16, "nested": {"z": [1, 2.5, None], "a": True}}
        await store.put_setting("pool:base", pool)
        await store.put_setting("pool:py", {"min": 0})
        await store.put_setting("quota:t1", 5)
        await store.put_setting("poolx", "a string")
        await store.put_setting("p%_:odd", ["list"])  # no LIKE wildcards in prefixes
        assert await store.get_setting("pool:base") == pool
        assert list(await store.get_setting("pool:base")) == list(pool)
        assert await store.get_setting("quota:t1") == 5 and await store.get_setting("poolx") == "a string"
        await store.put_setting("pool:py", {"min": 3})  # overwrite
        assert await store.list_settings("pool:") == {"pool:base": pool, "pool:py": {"min": 3}}
        assert list(await store.list_settings("pool")) == ["pool:base", "pool:py", "poolx"]  # by key
        assert await store.list_settings("p%_") == {"p%_:odd": ["list"]}
        assert len(await store.list_settings("")) == 5
        assert await store.list_settings("nope") == {}
        assert await store.delete_setting("pool:py")
        assert not await store.delete_setting("pool:py")
        assert await store.get_setting("pool:py") is None

    run(location, body)


# -- audit -------------------------------------------------------------------------------------------
def _entry(
    t: float,
    tenant: str = "t1",
    action: str = "sandbox.create",
    sandbox: str | None = "sb-1",
    obj: str = "sandbox/sb-1",
    outcome: str = "ok",
    detail: dict[str, object] | None = None,
) -> AuditEntry:
    return AuditEntry(
        time=t, tenant=tenant, key_id="k1", action=action, object=obj, outcome=outcome, sandbox=sandbox,
        detail=detail or {},
    )  # fmt: skip


def test_audit(location: str | Path) -> None:
    async def body(store: Store) -> None:
        await store.insert_audit([])
        await store.insert_audit(
            [
                _entry(10, detail={"template": "base", "limits": {"b": 1, "a": 2}}),
                _entry(20, action="sandbox.kill"),
                _entry(30, tenant="t2", sandbox="sb-2", obj="sandbox/sb-2"),
            ]
        )
        await store.insert_audit(
            [_entry(40, action="key.rotate", sandbox=None, obj="key/k1", outcome="forbidden")]
        )
        every = await store.list_audit(None)
        assert [e.time for e in every] == [40, 30, 20, 10]  # newest first
        assert all(a.seq > b.seq for a, b in itertools.pairwise(every))
        oldest = every[-1]
        assert (oldest.detail, list(oldest.detail["limits"])) == (
            {"template": "base", "limits": {"b": 1, "a": 2}},
            ["b", "a"],
        )
        assert every[0].sandbox is None and every[0].outcome == "forbidden" and every[0].object == "key/k1"

        async def times(*args: object, **kw: object) -> list[float]:
            return [e.time for e in await store.list_audit(*args, **kw)]  # type: ignore[arg-type]

        assert await times("t1") == [40, 20, 10]
        assert await times(None, actions=["sandbox.kill", "key.rotate"]) == [40, 20]
        assert await times(None, sandbox="sb-2") == [30]
        assert await times(None, obj="key/k1") == [40]
        assert await times(None, since=20) == [40, 30, 20]
        assert await times(None, until=30) == [20, 10]
        assert await times(None, since=15, until=35) == [30, 20]
        # Pages: `before` the last seq seen.
        first = await store.list_audit(None, limit=2)
        assert [e.time for e in first] == [40, 30]
        assert await times(None, limit=2, before=first[-1].seq) == [20, 10]
        assert await times(None, before=every[-1].seq) == []

        assert await store.prune_audit(older_than=25) == 2  # retention: the entries before 25 go
        assert await times(None) == [40, 30]
        assert await store.prune_audit(older_than=25) == 0
        await store.insert_audit([_entry(50)])
        newest = await store.list_audit(None, limit=1)
        assert newest[0].seq > every[0].seq  # seqs are never reused

    run(location, body)


# -- open and close ----------------------------------------------------------------------------------
def test_not_open(location: str | Path) -> None:
    async def main() -> None:
        store = make_store(location)
        with pytest.raises(StoreError, match="not open"):
            await store.get_sandbox("x")
        await store.open()
        await store.insert_sandbox(sandbox("sb-1"))
        await store.close()
        await store.close()  # twice: no harm
        with pytest.raises(StoreError, match="not open"):
            await store.get_sandbox("sb-1")

    asyncio.run(main())


def test_state_outlives_the_store(location: str | Path) -> None:
    """What one store wrote, the next one opened on the same database reads (a server's restart)."""

    async def write(store: Store) -> None:
        await store.insert_sandbox(full_sandbox("sb-1"))
        await store.put_setting("pool:base", {"min": 1})
        await store.insert_key(KeyRecord(id="k1", name="n", tenant="t", admin=True, created_at=1.0, hash="h"))

    async def read(store: Store) -> None:
        assert await store.get_sandbox("sb-1") == full_sandbox("sb-1")
        assert await store.get_setting("pool:base") == {"min": 1}
        assert await store.count_keys() == 1

    run(location, write)
    run(location, read)  # open applies no migration twice and loses nothing


def test_calls_in_flight_at_close_complete(location: str | Path) -> None:
    async def main() -> None:
        store = make_store(location)
        await store.open()
        writes = [asyncio.ensure_future(store.insert_sandbox(sandbox(f"sb-{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # each has started
        await store.close()
        await asyncio.gather(*writes)

    asyncio.run(main())

    async def check(store: Store) -> None:
        assert (await store.count_by_state()) == {"running": 20}

    run(location, check)


# -- nodes and leases (docs/fleet.md) ------------------------------------------------------
def _node(nid: str, **kw: object) -> NodeRecord:
    rec = NodeRecord(
        id=nid, address="127.0.0.1:7771", token="secret", state="ready", started_at=NOW, seen_at=NOW,
        capacity={"cpus": 2, "runtimes": ["namespaces"]},
    )  # fmt: skip
    return replace(rec, **kw)  # type: ignore[arg-type]


def test_nodes(location: str | Path) -> None:
    async def body(store: Store) -> None:
        assert await store.get_node("n1") is None and await store.list_nodes() == []
        await store.put_node(_node("n1"))
        await store.put_node(_node("n2"))
        assert await store.get_node("n1") == _node("n1")
        await store.put_node(_node("n1", address="10.0.0.2:7771"))  # a restarted node replaces its row
        got = await store.get_node("n1")
        assert got is not None and got.address == "10.0.0.2:7771"
        assert await store.update_node("n2", seen_at=NOW + 5, state="left")
        assert not await store.update_node("n9", seen_at=NOW)
        assert [(n.id, n.state, n.seen_at) for n in await store.list_nodes()] == [
            ("n1", "ready", NOW),
            ("n2", "left", NOW + 5),
        ]
        with pytest.raises(ValueError, match="unknown node fields"):
            await store.update_node("n1", colour="red")

    run(location, body)


def test_sandboxes_by_node(location: str | Path) -> None:
    async def body(store: Store) -> None:
        for i, (node, state) in enumerate(
            [("a", "running"), ("a", "paused"), ("b", "running"), ("b", "killed")]
        ):
            await store.insert_sandbox(sandbox(f"sb-{i}", state=state, node_id=node))
        assert await store.count_by_node(["running", "paused"]) == {"a": 2, "b": 1}
        got = await store.get_sandbox("sb-0")
        assert got is not None and got.node_id == "a"
        assert await store.update_sandbox("sb-0", node_id="c")
        got = await store.get_sandbox("sb-0")
        assert got is not None and got.node_id == "c"
        # The other records say where their data lives too.
        await store.insert_snapshot(_snapshot("sn-1", node_id="a"))
        snap = await store.get_snapshot("sn-1")
        assert snap is not None and snap.node_id == "a"
        await store.insert_volume(
            VolumeRecord(id="v1", tenant="t1", name="v", size_mb=None, created_at=NOW, node_id="b")
        )
        vol = await store.get_volume_by_id("v1")
        assert vol is not None and vol.node_id == "b"
        await store.insert_template(_template("tp-1", "web", node_id="a"))
        tpl = await store.get_template("t1", "web")
        assert tpl is not None and tpl.node_id == "a"

    run(location, body)


def test_leases(location: str | Path) -> None:
    async def body(store: Store) -> None:
        assert await store.take_lease("reaper", "r1", ttl=10, now=NOW)
        assert not await store.take_lease("reaper", "r2", ttl=10, now=NOW + 1)  # held
        assert await store.take_lease("reaper", "r1", ttl=10, now=NOW + 5)  # renewed by its holder
        assert not await store.take_lease("reaper", "r2", ttl=10, now=NOW + 14)  # renewal moved the end
        assert await store.take_lease("reaper", "r2", ttl=10, now=NOW + 16)  # expired: taken over
        assert not await store.take_lease("reaper", "r1", ttl=10, now=NOW + 17)
        await store.drop_lease("reaper", "r1")  # not r1's: nothing happens
        assert not await store.take_lease("reaper", "r1", ttl=10, now=NOW + 18)
        await store.drop_lease("reaper", "r2")
        assert await store.take_lease("reaper", "r1", ttl=10, now=NOW + 18)
        assert await store.take_lease("pools", "r2", ttl=10, now=NOW + 18)  # leases are independent

    run(location, body)


def test_one_holder_when_two_servers_race_for_a_lease(location: str | Path) -> None:
    async def body(first: Store) -> None:
        second = make_store(location)
        await second.open()
        try:
            for round_ in range(10):
                a, b = await asyncio.gather(
                    first.take_lease(f"l{round_}", "a", ttl=10, now=NOW),
                    second.take_lease(f"l{round_}", "b", ttl=10, now=NOW),
                )
                assert a != b
        finally:
            await second.close()

    run(location, body)
