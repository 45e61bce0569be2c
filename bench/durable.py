"""Durable state in object storage (docs/object-storage.md), against moto's S3 server on loopback.

Store: a 1 GB workspace (100 files of 10 MiB, random: nothing compresses) uploaded fresh by cove
and by raw boto3 (`upload_file`, 16 threads, 8 MiB parts) to the same server; ten snapshots of
it with 10 MiB changed between each (what the bucket holds afterwards); restore cold (empty node
cache) and warm.

Resume: a sandbox with a 100 MB process, hibernated and resumed on its own node (local) and
resumed on the other node from the bucket after its own node stopped (`--rounds` of each, the
sandbox moving between two `cove serve` replicas sharing PostgreSQL and the bucket). Printed:
hibernate (with its copy) and time from the resume call to the first exec output.

    .venv/bin/python bench/durable.py              # both
    .venv/bin/python bench/durable.py --only store --gib 0.25
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import pg
import s3
from cove.devserver import Server
from cove.storage.objects import ChunkCache, ObjectStore, ObjectStoreSettings

MIB = 1 << 20
FILE = 10 * MIB


def make_workspace(root: Path, gib: float) -> list[Path]:
    root.mkdir(parents=True)
    files = []
    for i in range(int(gib * 1024 * MIB) // FILE):
        path = root / f"d{i % 10}" / f"f{i:03d}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(FILE))
        files.append(path)
    return files


def change(files: list[Path], step: int) -> None:
    """10 MiB changed: one 1 MiB region rewritten in each of ten files."""
    for k in range(10):
        path = files[(step * 7 + k * 13) % len(files)]
        with open(path, "r+b") as f:
            f.seek(((step + k) % 9) * MIB)
            f.write(os.urandom(MIB))


def store_bench(bucket: s3.Moto, gib: float) -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="cove-bench-durable-"))
    rows: list[tuple[str, str]] = []
    try:
        files = make_workspace(work / "ws", gib)
        total = sum(f.stat().st_size for f in files)
        client = bucket.client()
        config = TransferConfig(max_concurrency=16, multipart_chunksize=8 * MIB, multipart_threshold=8 * MIB)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:  # 4 files at a time × 16 part threads each
            list(
                pool.map(
                    lambda p: client.upload_file(
                        str(p), bucket.bucket, f"raw/{p.relative_to(work)}", Config=config
                    ),
                    files,
                )
            )
        raw_s = time.perf_counter() - t0
        env = {**bucket.env("bench"), "COVE_OBJECT_CACHE": "off"}
        store = ObjectStore(ObjectStoreSettings.from_env(env))
        t0 = time.perf_counter()
        m = store.upload_tree(work / "ws", "snap-0")
        fresh_s = time.perf_counter() - t0
        rows.append(
            (
                f"fresh upload of {total / MIB:.0f} MiB: raw boto3",
                f"{raw_s:.2f} s ({total / MIB / raw_s:.0f} MiB/s)",
            )
        )
        rows.append(
            ("  cove (chunked, hashed, deduplicated)", f"{fresh_s:.2f} s = {fresh_s / raw_s:.2f}× raw")
        )
        times = []
        for step in range(1, 10):
            change(files, step)
            t0 = time.perf_counter()
            m = store.upload_tree(work / "ws", f"snap-{step}", parent=m)
            times.append(time.perf_counter() - t0)
        held = store.stored_bytes()
        rows.append(
            (
                "10 snapshots, 10 MiB changed between each",
                f"bucket holds {held / MIB:.0f} MiB = {held / total:.3f}× one",
            )
        )
        rows.append(("  each incremental upload (p50)", f"{statistics.median(times) * 1000:.0f} ms"))
        cache_dir = work / "cache"
        cached = ObjectStore(store.settings, cache=ChunkCache(cache_dir, 4 << 30))
        for label in ("cold (empty node cache)", "warm (chunks in the node cache)"):
            dest = work / f"restore-{label[:4]}"
            t0 = time.perf_counter()
            cached.download_tree("snap-9", dest, sync=False)
            rows.append((f"restore of the last one, {label}", f"{time.perf_counter() - t0:.2f} s"))
            shutil.rmtree(dest)
        store.close()
        cached.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


HOG = (
    "import os, time\nbuf = bytearray(os.urandom(100 << 20))\nopen('/home/user/up', 'w').write('1')\n"
    "while True: time.sleep(1)\n"
)


def _exec(c: httpx.Client, sid: str, cmd: str) -> str:
    r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}, timeout=120)
    r.raise_for_status()
    return str(r.json()["stdout"])


def resume_bench(bucket: s3.Moto, rounds: int) -> list[tuple[str, str]]:
    postgres = pg.Postgres()
    postgres.start()
    key = "cove_bench_durable_" + "ab" * 8
    env = {
        "COVE_DATABASE_URL": postgres.create_database(),
        "COVE_API_KEY": key,
        "COVE_POOLS": "",
        "COVE_KERNEL": "0",
        **bucket.env("resume"),
    }
    servers = {n: Server(n, {**env, "COVE_NODE_ID": n}) for n in ("bdur-a", "bdur-b")}
    hibernate, local, moved = [], [], []
    try:
        for srv in servers.values():
            srv.api_key = key
            srv.start()
        time.sleep(3)  # each sees the other (heartbeat 1 s)
        a = servers["bdur-a"]
        with a.client() as c:
            sid = c.post("/v1/sandboxes", json={"timeout": 3600}).json()["id"]
            c.put(f"/v1/sandboxes/{sid}/files", params={"path": "/home/user/hog.py"}, content=HOG)
            c.post(f"/v1/sandboxes/{sid}/processes", json={"cmd": "python3 /home/user/hog.py"})
            while _exec(c, sid, "cat /home/user/up 2>/dev/null || true") != "1":
                time.sleep(0.1)
        for _ in range(rounds):
            here = next(s for s in servers.values() if s.proc and _holds(s, sid))
            there = next(s for s in servers.values() if s is not here)
            with here.client() as c:
                t0 = time.perf_counter()
                c.post(f"/v1/sandboxes/{sid}/hibernate", timeout=300).raise_for_status()
                hibernate.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                c.post(f"/v1/sandboxes/{sid}/resume", timeout=300).raise_for_status()
                _exec(c, sid, "cat /home/user/up")
                local.append(time.perf_counter() - t0)
                c.post(f"/v1/sandboxes/{sid}/hibernate", timeout=300).raise_for_status()
            here.stop()  # its node leaves: the sandbox resumes from the bucket on the other
            with there.client() as c:
                t0 = time.perf_counter()
                c.post(f"/v1/sandboxes/{sid}/resume", timeout=300).raise_for_status()
                _exec(c, sid, "cat /home/user/up")
                moved.append(time.perf_counter() - t0)
            here.start()
            time.sleep(2)
    finally:
        for srv in servers.values():
            srv.close()
        postgres.stop()

    def ms(v: list[float]) -> str:
        return f"{statistics.median(v) * 1000:.0f} ms (p50 of {len(v)}; min {min(v) * 1000:.0f}, max {max(v) * 1000:.0f})"

    return [
        ("100 MB process: hibernate, copy included", ms(hibernate)),
        ("  resume → first exec output, same node", ms(local)),
        ("  resume → first exec output, other node (from the bucket)", ms(moved)),
    ]


def _holds(srv: Server, sid: str) -> bool:
    return _node_of(srv, sid) == srv.extra_env["COVE_NODE_ID"]


def _node_of(srv: Server, sid: str) -> str:
    with psycopg.connect(srv.extra_env["COVE_DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT node_id FROM sandboxes WHERE id = %s", (sid,)).fetchone()
    return str(row[0]) if row else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["store", "resume"])
    ap.add_argument("--gib", type=float, default=1.0, help="workspace size for the store part")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bucket = s3.Moto("cove-bench").start()
    rows: list[tuple[str, str]] = []
    try:
        if args.only in (None, "store"):
            rows += store_bench(bucket, args.gib)
        if args.only in (None, "resume"):
            rows += resume_bench(bucket, args.rounds)
    finally:
        bucket.stop()
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
