"""cove.storage.objects against a real S3 server: moto's standalone server on loopback, in its own
process, with IAM authentication on (so that wrong credentials and read-only keys are refused the way
S3 refuses them), plus a small HTTP proxy in front of it that answers 503 SlowDown on cue.

Every test works under a prefix of its own in one bucket.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from cove.storage.objects import (
    AccessDenied,
    BucketNotFound,
    ChunkCache,
    ConfigError,
    CorruptData,
    NoSpace,
    ObjectStore,
    ServerError,
    Unreachable,
    parse_store_url,
)
from cove.storage.objects.chunks import chunk_name

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "cove-objects-test"
MIB = 1 << 20
IS_ROOT = os.geteuid() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("moto's server exited at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("moto's server did not start")


@dataclass
class S3:
    endpoint: str
    admin: tuple[str, str]
    readonly: tuple[str, str]

    def env(self, prefix: str, *, keys: tuple[str, str] | None = None, **extra: str) -> dict[str, str]:
        key, secret = keys or self.admin
        return {
            "COVE_OBJECT_STORE": f"s3://{BUCKET}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "COVE_OBJECT_CACHE": "off",
            "COVE_OBJECT_STORE_WORKERS": "8",
            **extra,
        }

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.admin[0],
            aws_secret_access_key=self.admin[1],
            region_name="us-east-1",
        )


SETUP_CALLS = 6  # the IAM calls below; moto authenticates every request after these


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_CALLS)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            aws_access_key_id="x",
            aws_secret_access_key="x",
            region_name="us-east-1",
        )

        def user(name: str, actions: list[str]) -> tuple[str, str]:
            iam.create_user(UserName=name)
            policy = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
            }
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
            k = iam.create_access_key(UserName=name)["AccessKey"]
            return k["AccessKeyId"], k["SecretAccessKey"]

        # moto names ListObjectsV2's action s3:ListObjectsV2 where AWS says s3:ListBucket: allow both.
        reader = user("reader", ["s3:GetObject", "s3:ListBucket", "s3:ListObjectsV2"])
        s = S3(endpoint, user("node", ["s3:*"]), reader)
        s.client().create_bucket(Bucket=BUCKET)
        yield s
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def prefix() -> str:
    return "t-" + secrets.token_hex(4)


def _store(s3: S3, prefix: str, **extra: str) -> ObjectStore:
    return ObjectStore.from_env(s3.env(prefix, **extra))


# -- trees to compare ------------------------------------------------------------------------------


def _state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a restore must reproduce, by relative path (hardlinks by group)."""
    out: dict[str, tuple[Any, ...]] = {}
    first: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            p = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(p, root)
            if rel in out:
                continue
            st = os.lstat(p)
            link = (
                first.setdefault(st.st_ino, rel) if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 else None
            )
            try:
                xattrs = sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                )
            except OSError:
                xattrs = []
            content = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            mtime = None if stat.S_ISLNK(st.st_mode) and not IS_ROOT else st.st_mtime_ns
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                mtime,
                st.st_size if content else 0,
                content,
                rdev,
                xattrs,
                link,
            )
    return out


def _every_kind(root: Path) -> None:
    """A tree with every kind of entry and metadata a committed layer can hold."""
    (root / "etc/sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "tmp").mkdir(mode=0o777)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "big.bin").write_bytes(random.Random(1).randbytes(9 * MIB + 12345))  # several chunks
    (root / "mid.bin").write_bytes(random.Random(2).randbytes(300 << 10))  # just over the minimum
    for i in range(40):
        (root / "etc/sub" / f"small-{i}.txt").write_bytes(random.Random(i).randbytes(i * 997))
    (root / "etc/sub/exec").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "etc/sub/exec", 0o4755)  # setuid
    os.chmod(root / "etc/sub/small-3.txt", 0o2640)  # setgid
    os.symlink("../big.bin", root / "etc/link")
    os.symlink("/nowhere/at/all", root / "dangling")
    os.symlink("etc", root / "dirlink")
    os.link(root / "big.bin", root / "etc/sub/big-hardlink")
    os.link(root / "etc/passwd", root / "passwd-hardlink")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"caf\xe9-latin1")).write_bytes(b"not utf-8 name")
    os.setxattr(root / "big.bin", "user.origin", b"test")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "agent.sock"))
    sock.close()
    if IS_ROOT:
        os.mknod(root / "etc/whiteout", 0o600 | stat.S_IFCHR, 0)  # an overlayfs whiteout
        os.mknod(root / "blockdev", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.setxattr(root / "etc/sub", "trusted.overlay.opaque", b"y")
        os.chown(root / "etc/passwd", 1000, 1001)
        os.chown(root / "etc/sub", 33, 33)
        os.chown(root / "etc/link", 1000, 1000, follow_symlinks=False)
    every = [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files]
    for i, p in enumerate(sorted(every, reverse=True)):
        os.utime(
            p, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_123_456_789 + i * 1000), follow_symlinks=False
        )
    os.utime(root, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))


def _random_tree(root: Path, seed: int, big: int, big_size: int, small: int) -> None:
    rng = random.Random(seed)
    (root / "data").mkdir(parents=True)
    (root / "src").mkdir()
    for i in range(big):
        (root / "data" / f"blob-{i}").write_bytes(rng.randbytes(big_size))
    for i in range(small):
        (root / "src" / f"mod_{i}.py").write_bytes(rng.randbytes(rng.randrange(100, 40_000)))


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- settings --------------------------------------------------------------------------------------


def test_store_url_parsing() -> None:
    assert parse_store_url("s3://bucket") == parse_store_url("s3://bucket/")
    u = parse_store_url("s3://my-bucket.v2//cove/prod/")
    assert (u.bucket, u.prefix, u.key("chunks/x")) == ("my-bucket.v2", "cove/prod", "cove/prod/chunks/x")
    for bad, says in [
        ("", "empty"),
        ("http://bucket/x", "scheme s3"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://bucket:9000/x", "without a port"),
        ("s3://bucket/a/../b", "not allowed"),
        ("s3://bucket/x?versioning=1", "query"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_store_url(bad)
    with pytest.raises(ConfigError) as e:
        parse_store_url("s3://AKIAEXAMPLE:hunter2secret@bucket/x")
    assert "hunter2secret" not in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)
    with pytest.raises(ConfigError, match="COVE_OBJECT_STORE is not set"):
        ObjectStore.from_env({})


# -- round trip, dedup, incremental ---------------------------------------------------------------


def test_round_trip_every_kind_of_entry(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "layer"
    src.mkdir()
    _every_kind(src)
    with _store(s3, prefix) as store:
        m = store.upload_tree(src, "snap-1", meta={"sandbox": "sb-1"})
        assert store.manifests() == ["snap-1"]
        assert m.skipped == [{"path": "agent.sock", "reason": "socket"}]
        dest = tmp_path / "restored"
        store.download_tree("snap-1", dest)
    expected = _state(src)
    del expected["agent.sock"]
    assert _state(dest) == expected
    again = store.manifest("snap-1")
    assert again.meta == {"sandbox": "sb-1"} and again.checksum == m.checksum


def test_dedup_small_change_stores_little(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=7, big=10, big_size=4 * MIB, small=300)  # ≈ 46 MB, incompressible
    with _store(s3, prefix) as store:
        first = store.upload_tree(src, "v1")
        size1 = store.stored_bytes()
        assert size1 >= first.size  # random data: stored raw
        # Change 1 MB: half a MiB inside one big file, half spread over small files.
        _overwrite(src / "data/blob-3", 1_234_567, random.randbytes(MIB // 2))
        for i in range(0, 300, 30):
            _overwrite(src / f"src/mod_{i}.py", 10, random.randbytes(50))
        (src / "src/new.py").write_bytes(random.randbytes(MIB // 2))
        second = store.upload_tree(src, "v2", parent=first)
        grown = store.stored_bytes() - size1
        assert second.stats is not None and second.stats.files_unchanged == second.stats.files - 12
        assert MIB <= grown < 6 * MIB, f"a 1 MB change grew the bucket by {grown / MIB:.1f} MiB"
        # Without a parent, chunks are found by content alone: a copy of the tree (new inodes, new
        # mtimes, so every byte is read again) adds no chunk of a large file; only the small-file
        # stream, cut now over all small files rather than the changed ones, may be new.
        copy = tmp_path / "copy"
        shutil.copytree(src, copy)
        third = store.upload_tree(copy, "v3")
        assert third.stats is not None and third.stats.bytes_read == third.size
        small_total = sum(p.stat().st_size for p in (src / "src").iterdir() if p.stat().st_size < 256 << 10)
        assert third.stats.bytes_new <= small_total
        for mid in ("v1", "v2"):
            dest = tmp_path / f"out-{mid}"
            store.download_tree(mid, dest)
        assert _state(tmp_path / "out-v2") == _state(src)


def test_incremental_upload_puts_only_new_chunks(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=8, big=6, big_size=3 * MIB, small=50)
    with _store(s3, prefix) as store:
        base = store.upload_tree(src, "v1")
        _overwrite(src / "data/blob-2", MIB, random.randbytes(MIB))
        puts: list[str] = []
        before = store.bucket.stats.snapshot()
        child = store.upload_tree(src, "v2", parent=base, progress=lambda sha, n: puts.append(sha))
        after = store.bucket.stats.snapshot()
        assert child.stats is not None
        new = child.chunk_shas() - base.chunk_shas()
        assert set(puts) == new and child.stats.chunks_new == len(new) <= 4
        # Chunk PUTs, the lease, the manifest: nothing else went up.
        assert after["puts"] - before["puts"] == len(new) + 2
        assert child.stats.files_unchanged == child.stats.files - 1  # only blob-2 was read
        assert child.stats.bytes_read == 3 * MIB
        store.download_tree(child, tmp_path / "out")
    assert _state(tmp_path / "out") == _state(src)


def test_criu_image_directory(s3: S3, prefix: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = random.Random(3)
    pages = rng.randbytes(12 * MIB)
    (images / "pages-1.img").write_bytes(pages)
    for name in ("core-1.img", "mm-1.img", "pstree.img", "inventory.img", "files.img"):
        (images / name).write_bytes(rng.randbytes(rng.randrange(50, 5000)))
    with _store(s3, prefix) as store:
        first = store.upload_images(images, "hib-1", meta={"sandbox": "sb-9"})
        # The next hibernation: 1 MiB of pages changed in place, metadata rewritten.
        (images / "pages-1.img").write_bytes(pages[: 5 * MIB] + rng.randbytes(MIB) + pages[6 * MIB :])
        (images / "core-1.img").write_bytes(rng.randbytes(3000))
        second = store.upload_images(images, "hib-2", parent=first)
        assert second.stats is not None and second.stats.bytes_new < 6 * MIB
        store.download_images("hib-2", tmp_path / "restored")
        assert _state(tmp_path / "restored") == _state(images)
        assert store.manifests("criu") == ["hib-1", "hib-2"] and store.manifests("layer") == []
        (images / "sub").mkdir()
        with pytest.raises(Exception, match="not a flat image directory"):
            store.upload_images(images, "hib-3")
        assert store.manifests("criu") == ["hib-1", "hib-2"]


# -- corruption and crashes ------------------------------------------------------------------------


def test_corrupt_chunk_names_the_snapshot_and_file(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    src.mkdir()
    (src / "model.bin").write_bytes(random.randbytes(2 * MIB))
    (src / "notes.txt").write_text("fine\n")
    with _store(s3, prefix) as store:
        m = store.upload_tree(src, "snap-bad")
        sha = m.chunks[m.entries[1].extents[0][0]][0] if m.entries[1].path == "model.bin" else None
        assert sha is not None
        raw = s3.client()
        key = f"{prefix}/{chunk_name(sha)}"
        blob = bytearray(raw.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        blob[1000] ^= 0xFF  # one flipped bit's worth of rot
        raw.put_object(Bucket=BUCKET, Key=key, Body=bytes(blob))
        dest = tmp_path / "restored"
        with pytest.raises(CorruptData) as e:
            store.download_tree("snap-bad", dest)
        assert e.value.manifest == "layer/snap-bad" and e.value.path == "model.bin" and e.value.chunk == sha
        assert "snap-bad" in str(e.value) and "model.bin" in str(e.value)
        assert not dest.exists() and [p.name for p in tmp_path.iterdir()] == ["ws"]  # no temp dir left

        raw.delete_object(Bucket=BUCKET, Key=key)  # a chunk that is gone is as clear
        with pytest.raises(CorruptData, match="missing from the bucket"):
            store.download_tree("snap-bad", dest)
        assert not dest.exists()

        mkey = f"{prefix}/manifests/layer/snap-bad.json"
        body = raw.get_object(Bucket=BUCKET, Key=mkey)["Body"].read()
        raw.put_object(Bucket=BUCKET, Key=mkey, Body=body.replace(b"notes.txt", b"NOTES.txt"))
        with pytest.raises(CorruptData, match=r"snap-bad.*fails its checksum"):
            store.manifest("snap-bad")


KILLS = 50  # the acceptance: kill -9 at random points of 50 uploads

_CHILD = """
import sys
from cove.storage.objects import ObjectStore
store = ObjectStore.from_env()
def progress(sha, n):
    print("put", sha, flush=True)
m = store.upload_tree(sys.argv[1], sys.argv[2], parent=sys.argv[3], progress=progress)
print("done", flush=True)
"""


def test_kill_9_at_random_points_of_50_uploads_lists_only_whole_snapshots(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=9, big=4, big_size=2 * MIB, small=20)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **s3.env(prefix, COVE_OBJECT_STORE_LEASE_TTL="2")}
    store = ObjectStore.from_env(s3.env(prefix, COVE_OBJECT_STORE_LEASE_TTL="2"))
    store.upload_tree(src, "base")
    expected = {"base": _state(src)}
    rng = random.Random(21)
    killed: list[str] = []
    finished: set[str] = set()
    trees: dict[str, Path] = {}
    held: set[str] = set()  # killed after a chunk PUT: these hold a lease
    for attempt in range(KILLS):
        work = tmp_path / f"ws-{attempt}"
        _random_tree(work, seed=100 + attempt, big=3, big_size=MIB + attempt * 4096, small=10)
        mid = f"try-{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(work), mid, "base"], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        # Kill at a random point: while it starts or hashes (0), or after that many chunk PUTs;
        # an upload that finishes first must be listed and restore like the others.
        target = rng.randrange(0, 6)
        done = False
        if target == 0:
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            seen = 0
            for line in proc.stdout:
                seen += line.startswith("put")
                done = line.startswith("done")
                if seen >= target or done:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        trees[mid] = work
        if done or (target == 0 and proc.stdout.read().rstrip().endswith("done")):
            finished.add(mid)
        else:
            killed.append(mid)
            if target > 0:  # one killed while starting may hold no lease yet
                held.add(mid)
    listed = set(store.manifests())
    interrupted = set(killed) - listed  # a kill just after the manifest's PUT leaves it complete
    assert finished <= listed and len(interrupted) >= KILLS // 2, (finished, killed, listed)
    for mid in sorted(listed):  # every listed snapshot restores whole, the earlier ones included
        dest = tmp_path / f"restored-{mid}"
        store.download_tree(mid, dest)
        assert _state(dest) == (expected["base"] if mid == "base" else _state(trees[mid])), mid
    # The killed uploads left chunks (and leases) behind; once their leases lapse, GC takes them.
    time.sleep(3)
    report = store.collect_garbage(wait_s=5)
    assert report.swept and report.chunks_deleted > 0 and report.leases_removed >= len(held - listed)
    referenced = set().union(*(store.manifest(mid).chunk_shas() for mid in listed))
    infos, _ = store.bucket.list("chunks/")
    assert {i.name.removeprefix("chunks/") for i in infos} == referenced
    store.close()


# -- refusals --------------------------------------------------------------------------------------


def test_wrong_credentials_are_a_clear_error(s3: S3, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    for keys in [(s3.admin[0], "wrong-secret-123456"), ("AKIAIOSFODNN7EXAMPLE", "wrong-secret-123456")]:
        with ObjectStore.from_env(s3.env(prefix, keys=keys, COVE_OBJECT_STORE_ATTEMPTS="1")) as store:
            for call in (store.check, lambda: store.upload_tree(tmp_path, "x")):
                with pytest.raises(AccessDenied) as e:
                    call()
                msg = str(e.value)
                assert f"s3://{BUCKET}" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "rejected" in msg
                assert "wrong-secret-123456" not in msg and keys[0][-4:] in msg


def test_refused_writes_and_missing_bucket(s3: S3, prefix: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with ObjectStore.from_env(s3.env(prefix, keys=s3.readonly)) as store:
        store.check()  # it may list
        with pytest.raises(AccessDenied) as e:
            store.upload_tree(tmp_path, "x")
        assert f"PUT s3://{BUCKET}/{prefix}/" in str(e.value) and "may not write" in str(e.value)
        assert s3.readonly[1] not in str(e.value)
        assert store.manifests() == []
    env = s3.env(prefix)
    env["COVE_OBJECT_STORE"] = "s3://no-such-bucket-here/x"
    with ObjectStore.from_env(env) as store:
        with pytest.raises(BucketNotFound, match=r"no-such-bucket-here.*does not exist"):
            store.check()
        with pytest.raises(BucketNotFound):
            store.upload_tree(tmp_path, "x")


def test_unreachable_endpoint(prefix: str, tmp_path: Path) -> None:
    env = {
        "COVE_OBJECT_STORE": f"s3://{BUCKET}/{prefix}",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret-value",
        "COVE_OBJECT_STORE_ATTEMPTS": "2",
        "COVE_OBJECT_CACHE": "off",
    }
    t0 = time.monotonic()
    with ObjectStore.from_env(env) as store, pytest.raises(Unreachable) as e:
        store.upload_tree(tmp_path, "x")
    assert env["AWS_ENDPOINT_URL"] in str(e.value) and BUCKET in str(e.value)
    assert "very-secret-value" not in str(e.value)
    assert time.monotonic() - t0 < 20


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to moto, answering 503 SlowDown to every `every`-th request (every=1: to all)."""

    def __init__(self, upstream: int, every: int) -> None:
        self.upstream, self.every, self.count, self.failed = upstream, every, 0, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: _FlakyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.count += 1
            fail = self.server.count % self.server.every == 0
            self.server.failed += fail
        if fail:
            err = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(err)))
            self.end_headers()
            self.wfile.write(err)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=60)
        headers = {
            k: v for k, v in self.headers.items() if k.lower() != "expect"
        }  # Host kept: signatures hold
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any


def test_retries_on_503_then_a_clear_error(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=4, big=1, big_size=MIB, small=5)
    upstream = int(s3.endpoint.rsplit(":", 1)[1])
    for every, ok in ((3, True), (1, False)):
        proxy = _FlakyProxy(upstream, every)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        env = s3.env(prefix, COVE_OBJECT_STORE_ATTEMPTS="3")
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.server_address[1]}"
        try:
            with ObjectStore.from_env(env) as store:
                if ok:
                    store.upload_tree(src, f"flaky-{every}")
                    store.download_tree(f"flaky-{every}", tmp_path / "out")
                    assert proxy.failed >= 2 and _state(tmp_path / "out") == _state(src)
                else:
                    with pytest.raises(ServerError, match=f"{BUCKET}.*503 SlowDown.*after 3 attempts"):
                        store.upload_tree(src, "never")
        finally:
            proxy.shutdown()
            proxy.server_close()


# -- the node cache --------------------------------------------------------------------------------


def test_cache_evicts_and_serves_downloads(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=5, big=3, big_size=3 * MIB, small=10)
    cache = ChunkCache(tmp_path / "cache", limit=4 * MIB)
    with ObjectStore(_store(s3, prefix).settings, cache=cache) as store:
        m = store.upload_tree(src, "v1")
        store.download_tree("v1", tmp_path / "a")
        assert cache.used <= 4 * MIB and cache.evictions > 0 and 0 < len(cache) < len(m.chunks)
        on_disk = sum(f.stat().st_size for f in (tmp_path / "cache").glob("??/*"))
        assert on_disk == cache.used
        # A tree that fits in the cache is served from it the second time: no GET at all. (The first
        # one is larger than the limit: an LRU cache read in order keeps nothing useful for a re-read.)
        small = tmp_path / "small"
        _random_tree(small, seed=6, big=1, big_size=1 * MIB, small=5)
        m2 = store.upload_tree(small, "v2")
        store.download_tree(m2, tmp_path / "s1")
        gets, hits = store.bucket.stats.gets, cache.hits
        store.download_tree(m2, tmp_path / "s2")
        assert store.bucket.stats.gets == gets and cache.hits - hits == len({sha for sha, _ in m2.chunks})
        assert _state(tmp_path / "s2") == _state(small)
        # A cache entry gone bad is dropped and fetched again, never restored.
        victim = next((tmp_path / "cache").glob("??/*"))
        victim.write_bytes(b"rotten")
        store.download_tree("v1", tmp_path / "c")
        assert _state(tmp_path / "c") == _state(src)
    # A restart keeps what is cached and within the limit.
    again = ChunkCache(tmp_path / "cache", limit=2 * MIB)
    assert again.used <= 2 * MIB and again.used == sum(
        f.stat().st_size for f in (tmp_path / "cache").glob("??/*")
    )


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Any]:
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(name: str, options: str) -> Path:
        p = tmp_path / name
        p.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(p)], check=True)
        mounts.append(p)
        return p

    yield mount
    for p in mounts:
        subprocess.run(["umount", "-l", str(p)], check=False)


def test_full_disks(s3: S3, prefix: str, tmp_path: Path, tiny_fs: Any) -> None:
    src = tmp_path / "ws"
    _random_tree(src, seed=6, big=3, big_size=2 * MIB, small=30)
    # The cache's disk is smaller than its limit: it evicts, then gives up caching, never fails.
    cache_fs = tiny_fs("cachefs", "size=3m")
    cache = ChunkCache(cache_fs, limit=100 * MIB)
    with ObjectStore(_store(s3, prefix).settings, cache=cache) as store:
        store.upload_tree(src, "v1")
        store.download_tree("v1", tmp_path / "ok")
        assert _state(tmp_path / "ok") == _state(src)
        assert list((cache_fs / "tmp").iterdir()) == []
        for f in cache_fs.glob("??/*"):  # whatever is cached is whole
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
        # A destination without room: refused up front, or on ENOSPC midway; nothing left behind.
        small = tiny_fs("small", "size=2m")
        with pytest.raises(NoSpace, match=r"v1.*needs"):
            store.download_tree("v1", small / "dest")
        few_inodes = tiny_fs("inodes", "size=64m,nr_inodes=20")
        with pytest.raises(NoSpace, match=r"v1.*no space left"):
            store.download_tree("v1", few_inodes / "dest")
        assert list(small.iterdir()) == [] and list(few_inodes.iterdir()) == []


# -- GC --------------------------------------------------------------------------------------------


def test_gc_spares_chunks_of_running_uploads(s3: S3, prefix: str, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _random_tree(a, seed=11, big=3, big_size=MIB, small=5)
    _random_tree(b, seed=12, big=3, big_size=MIB, small=5)
    _random_tree(c, seed=13, big=3, big_size=MIB, small=5)
    with _store(s3, prefix, COVE_OBJECT_STORE_LEASE_TTL="30") as store:
        ma = store.upload_tree(a, "a")
        mb = store.upload_tree(b, "b")
        store.delete_manifest("a")  # a's chunks are garbage now
        first_put = threading.Event()
        go_on = threading.Event()

        def progress(sha: str, n: int) -> None:
            first_put.set()
            go_on.wait(30)

        result: dict[str, Any] = {}
        uploader = threading.Thread(
            target=lambda: result.setdefault("m", store.upload_tree(c, "c", progress=progress))
        )
        uploader.start()
        assert first_put.wait(30)
        # While c is mid-upload (chunks in the bucket, no manifest yet), GC will not sweep ...
        report = store.collect_garbage(wait_s=1)
        assert not report.swept and len(report.waiting_for) == 1
        assert len(store.bucket.list("chunks/")[0]) > len(ma.chunks) + len(mb.chunks)
        # ... and a GC that starts now waits for c to commit, then spares c's chunks.
        threading.Timer(1.0, go_on.set).start()
        report = store.collect_garbage(wait_s=20)
        uploader.join()
        mc = result["m"]
        assert report.swept and report.chunks_deleted == len(ma.chunks)
        assert (
            ma.stored_size <= report.bytes_deleted <= ma.stored_size + len(ma.chunks)
        )  # + a header byte each
        left = {i.name.removeprefix("chunks/") for i in store.bucket.list("chunks/")[0]}
        assert left == mb.chunk_shas() | mc.chunk_shas()
        store.download_tree("c", tmp_path / "c-out")
        assert _state(tmp_path / "c-out") == _state(c)
        # An upload that starts while a GC's marker is up waits for it rather than racing it.
        store.bucket.put("gc/running.json", b"{}")
        threading.Timer(1.5, lambda: store.bucket.delete_one("gc/running.json")).start()
        t0 = time.monotonic()
        store.upload_tree(a, "a2")
        assert time.monotonic() - t0 >= 1.0


def test_manifest_records_xattrs_as_base64(s3: S3, prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "x"
    src.mkdir()
    (src / "f").write_bytes(b"hi")
    os.setxattr(src / "f", "user.bin", b"\x00\xff")
    with _store(s3, prefix) as store:
        m = store.upload_tree(src, "x")
    f = next(e for e in m.entries if e.path == "f")
    assert f.xattrs == {"user.bin": base64.b64encode(b"\x00\xff").decode()}
