"""The SQLite store: its calls run on a thread of their own, never behind the event loop's shared pool."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from cove.store.base import SandboxRecord
from cove.store.sqlite import SQLiteStore, StoreError


def _record(sid: str) -> SandboxRecord:
    now = time.time()
    return SandboxRecord(
        id=sid,
        tenant="t1",
        template="base",
        state="running",
        runtime="namespaces",
        created_at=now,
        updated_at=now,
        expires_at=None,
        timeout=0,
    )


def test_store_calls_do_not_wait_behind_blocked_kernel_work(tmp_path: Path) -> None:
    """The server runs slow kernel calls (unmounts that sync the filesystem, CRIU) in the loop's
    default pool; with all of its threads busy, a create's insert and an exec's lookup still run."""

    async def main() -> None:
        store = SQLiteStore(tmp_path / "cove.db")
        await store.open()
        release = threading.Event()
        loop = asyncio.get_running_loop()
        blocked = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # more than its threads
        try:
            await asyncio.wait_for(store.insert_sandbox(_record("sb-1")), 10)
            got = await asyncio.wait_for(store.get_sandbox("sb-1"), 10)
            assert got is not None and got.tenant == "t1" and got.state == "running"
            assert not any(f.done() for f in blocked)  # they were all still blocked meanwhile
        finally:
            release.set()
            await asyncio.gather(*blocked)
            await store.close()
        with pytest.raises(StoreError, match="not open"):
            await store.get_sandbox("sb-1")

    asyncio.run(main())


def test_calls_queued_before_close_complete(tmp_path: Path) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "cove.db")
        await store.open()
        writes = [asyncio.ensure_future(store.insert_sandbox(_record(f"sb-{i}"))) for i in range(20)]
        await asyncio.sleep(0)  # submitted to the store's thread
        await store.close()
        await asyncio.gather(*writes)
        store2 = SQLiteStore(tmp_path / "cove.db")
        await store2.open()
        try:
            assert all([await store2.get_sandbox(f"sb-{i}") for i in range(20)])
        finally:
            await store2.close()

    asyncio.run(main())


def test_point_reads_see_every_committed_write_without_the_stores_thread(tmp_path: Path) -> None:
    """get_sandbox and key_by_hash run on the event loop (the exec path's reads): they answer while
    the store's thread is busy, and see each write committed before them."""

    async def main() -> None:
        store = SQLiteStore(tmp_path / "cove.db")
        await store.open()
        try:
            await store.insert_sandbox(_record("sb-1"))
            assert await store.update_sandbox("sb-1", state="paused")
            got = await store.get_sandbox("sb-1")
            assert got is not None and got.state == "paused"
            release = threading.Event()
            busy = asyncio.ensure_future(store._call(lambda db: release.wait(10)))
            await asyncio.sleep(0.05)  # the store's thread is now in that call
            got = await asyncio.wait_for(store.get_sandbox("sb-1"), 5)
            assert got is not None and got.state == "paused" and not busy.done()
            assert await store.key_by_hash("no such hash") is None
            release.set()
            await busy
        finally:
            await store.close()

    asyncio.run(main())
