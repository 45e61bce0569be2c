"""Trees to manifests and back: walking a directory into chunks, and restoring one exactly.

Upload. The walk is depth-first in name order (so two uploads of one tree cut the same chunks).
Regular files of at least MIN_SIZE are cut one by one (through mmap, no copy); smaller ones are
appended to a "small-file stream" that is cut the same way, so that small files share chunks (one
PUT per ≈ MiB instead of one per file) and an edit to one of them changes about one chunk. The main
thread only cuts; hashing, compressing and PUTs run in a thread pool (hashlib and zstd release the
GIL), with at most 2 × workers chunks in flight to bound memory. A chunk is PUT only if it is not
known to be in the bucket: the parent manifest's chunks (plus a HEAD for the others), or, without a
parent, one listing of `chunks/` taken under the upload's lease. Against a parent, a file whose size,
mtime and inode are unchanged is not read at all: its extents are the parent's.

Entries: directories, regular files, symlinks, hardlinks (by inode), character and block devices
(overlayfs whiteouts are 0:0 character devices), FIFOs; mode (with setuid/setgid/sticky), uid, gid,
mtime (nanoseconds) and every xattr (user., trusted. such as overlayfs's opaque flag, security. such as
file capabilities, system. ACLs). Sockets are skipped and named in `manifest.skipped`. atime and
ctime are not kept (ctime cannot be set; atime is noise).

Download. Into a temporary directory beside the destination, renamed onto it at the end (after
syncfs), so a failure (a corrupt or missing chunk, a full disk) leaves no destination at all.
Chunks are fetched in the order files need them by a thread pool, from the node cache first; each
is checked against its sha256 before a byte of it is written. Ownership, devices and trusted./security.
xattrs are restored when running as root (as the node does); otherwise files belong to the caller and
devices are skipped with a warning.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cove.storage.objects.bucket import Bucket
from cove.storage.objects.cache import ChunkCache
from cove.storage.objects.chunks import AVG_SIZE, Codec, chunk_name, chunker, chunking_params, sha256_hex
from cove.storage.objects.errors import CorruptData, NoSpace, ObjectNotFound, ObjectStoreError
from cove.storage.objects.manifests import (
    BLK,
    CHR,
    DIR,
    FIFO,
    FILE,
    HARDLINK,
    SYMLINK,
    Entry,
    Manifest,
    UploadStats,
)

log = logging.getLogger("cove.storage.objects")

STREAM_FLUSH = 16 << 20  # small-file bytes buffered before cutting
Progress = Callable[[str, int], None]  # (chunk sha, stored bytes), after each PUT, from a worker

# An extent before the upload finishes: the chunk's (sha, size) if known, or the future that hashes it.
_Ref = tuple[str, int] | Future
_Extent = tuple[_Ref, int, int]


# -- walking -------------------------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, str] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return None
        raise
    out = {}
    for name in sorted(names):
        with contextlib.suppress(OSError):  # removed meanwhile, or not readable by us
            out[name] = base64.b64encode(os.getxattr(path, name, follow_symlinks=False)).decode()
    return out or None


def walk(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """(relative path, absolute path, lstat) of the root and everything under it, depth-first in name
    order, without following symlinks or crossing into other trees' names."""
    top = os.fspath(root)
    yield ".", top, os.lstat(top)
    stack: list[tuple[str, str]] = [("", top)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        subdirs = []
        for name in names:
            child_rel = f"{rel}{name}"
            child = os.path.join(path, name)
            st = os.lstat(child)
            yield child_rel, child, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append((child_rel + "/", child))
        # Depth-first: push in reverse so that the first name's subtree comes out next.
        for sub in reversed(subdirs):
            stack.append(sub)


# -- upload --------------------------------------------------------------------------------------


class _Pusher:
    """Hashes, dedups, encodes and PUTs chunks in a thread pool."""

    def __init__(
        self,
        bucket: Bucket,
        codec: Codec,
        known: set[str],
        head_unknown: bool,
        workers: int,
        stats: UploadStats,
        progress: Progress | None,
    ) -> None:
        self.bucket, self.codec, self.known, self.head_unknown = bucket, codec, known, head_unknown
        self.stats, self.progress = stats, progress
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="cove-objects-up")
        self.slots = threading.BoundedSemaphore(workers * 2)
        self.lock = threading.Lock()
        self.claimed: set[str] = set()
        self.futures: list[Future] = []
        self.failed: BaseException | None = None

    def submit(self, data: bytes | memoryview) -> Future:
        if self.failed is not None:
            raise self.failed
        self.slots.acquire()
        fut = self.pool.submit(self._push, data)
        fut.add_done_callback(self._done)
        self.futures.append(fut)
        return fut

    def _done(self, fut: Future) -> None:
        self.slots.release()
        exc = fut.exception()
        if exc is not None and self.failed is None:
            self.failed = exc

    def _push(self, data: bytes | memoryview) -> tuple[str, int]:
        sha = sha256_hex(data)
        with self.lock:
            if sha in self.known or sha in self.claimed:
                return sha, len(data)
            self.claimed.add(sha)
        name = chunk_name(sha)
        try:
            if self.head_unknown and self.bucket.head(name) is not None:
                return sha, len(data)
            blob = self.codec.encode(data)
            self.bucket.put(name, blob)
        except BaseException:
            with self.lock:
                self.claimed.discard(sha)
            raise
        with self.lock:
            self.stats.chunks_new += 1
            self.stats.bytes_new += len(data)
            self.stats.bytes_stored += len(blob)
        if self.progress is not None:
            self.progress(sha, len(blob))
        return sha, len(data)

    def wait(self) -> None:
        try:
            for fut in self.futures:
                fut.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _SmallStream:
    """Small files back to back, cut as one stream; each file's extents are the pieces of the chunks
    that cover its range of the stream."""

    def __init__(self, pusher: _Pusher, avg_size: int) -> None:
        self.pusher = pusher
        self.cut = chunker(avg_size)
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.pending: list[tuple[list[_Extent], int, int]] = []  # (extents to fill, start, size)
        self.starts: list[int] = []  # final chunks' stream offsets, ascending
        self.chunks: list[tuple[int, Future]] = []  # (length, future)

    def add(self, extents: list[_Extent], data: bytes) -> None:
        self.pending.append((extents, self.base + len(self.buf), len(data)))
        self.buf += data
        if len(self.buf) >= STREAM_FLUSH:
            self._flush(final=False)

    def finish(self) -> None:
        if self.buf:
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        data = bytes(self.buf)  # immutable: chunk views into it stay valid while workers read them
        cuts = list(self.cut.cut_buf(data))
        if not final:
            cuts = cuts[:-1]  # the last cut may end only because the buffer did; cut it again later
        used = 0
        for c in cuts:
            self.starts.append(self.base + c.offset)
            self.chunks.append((c.length, self.pusher.submit(c.data)))
            used = c.offset + c.length
        self.base += used
        self.buf = bytearray(data[used:])
        keep = []
        for extents, start, size in self.pending:
            if start + size > self.base:
                keep.append((extents, start, size))
                continue
            i = bisect.bisect_right(self.starts, start) - 1
            end = start + size
            while i < len(self.starts) and self.starts[i] < end:
                cs = self.starts[i]
                length, fut = self.chunks[i]
                lo, hi = max(start, cs), min(end, cs + length)
                extents.append((fut, lo - cs, hi - lo))
                i += 1
        self.pending = keep


def _parent_files(parent: Manifest | None) -> dict[str, Entry]:
    if parent is None:
        return {}
    return {e.path: e for e in parent.entries if e.type == FILE and e.ino is not None}


def upload(
    root: Path,
    *,
    kind: str,
    mid: str,
    bucket: Bucket,
    codec: Codec,
    known: set[str],
    head_unknown: bool,
    workers: int,
    parent: Manifest | None = None,
    flat: bool = False,
    meta: dict[str, Any] | None = None,
    progress: Progress | None = None,
    avg_size: int = AVG_SIZE,
) -> Manifest:
    """Walk `root`, PUT the chunks the bucket lacks, and return the manifest (not yet written: the
    caller writes it once this returns, i.e. once every chunk is durable)."""
    t0 = time.monotonic()
    root = Path(root)
    if not root.is_dir():
        raise ObjectStoreError(f"upload of {kind}/{mid}: {root} is not a directory")
    stats = UploadStats()
    pusher = _Pusher(bucket, codec, known, head_unknown, workers, stats, progress)
    small = _SmallStream(pusher, avg_size)
    cut = chunker(avg_size)
    previous = _parent_files(parent)
    parent_chunks = parent.chunks if parent else []
    entries: list[Entry] = []
    raw_extents: dict[int, list[_Extent]] = {}  # entry index → extents in the making
    skipped: list[dict[str, str]] = []
    inodes: dict[tuple[int, int], str] = {}
    try:
        for rel, path, st in walk(root):
            mode = st.st_mode
            if flat and rel != "." and not stat.S_ISREG(mode):
                raise ObjectStoreError(
                    f"upload of {kind}/{mid}: {root} is not a flat image directory ({rel} is not a regular file)"
                )
            if stat.S_ISSOCK(mode):
                skipped.append({"path": rel, "reason": "socket"})
                continue
            entry = Entry(
                path=rel,
                type=DIR,
                mode=stat.S_IMODE(mode),
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                xattrs=_xattrs(path),
            )
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                first = inodes.setdefault((st.st_dev, st.st_ino), rel)
                if first != rel:
                    entries.append(Entry(path=rel, type=HARDLINK, mode=entry.mode, target=first))
                    continue
            if stat.S_ISDIR(mode):
                pass
            elif stat.S_ISLNK(mode):
                entry.type, entry.target = SYMLINK, os.fsdecode(os.readlink(path))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                entry.type, entry.rdev = (CHR if stat.S_ISCHR(mode) else BLK), st.st_rdev
            elif stat.S_ISFIFO(mode):
                entry.type = FIFO
            elif stat.S_ISREG(mode):
                entry.type, entry.ino = FILE, st.st_ino
                extents = raw_extents.setdefault(len(entries), [])
                stats.files += 1
                old = previous.get(rel)
                if old is not None and (old.size, old.mtime_ns, old.ino) == (
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ino,
                ):
                    entry.size = old.size
                    extents.extend((parent_chunks[i], o, n) for i, o, n in old.extents)
                    stats.files_unchanged += 1
                elif st.st_size >= cut.min_size:
                    for c in cut.cut_file(path):
                        extents.append((pusher.submit(c.data), 0, c.length))
                        entry.size += c.length
                    stats.bytes_read += entry.size
                elif st.st_size > 0:
                    with open(path, "rb") as f:
                        data = f.read()
                    entry.size = len(data)
                    stats.bytes_read += entry.size
                    if data:
                        small.add(extents, data)
            entries.append(entry)
        small.finish()
        pusher.wait()
    except BaseException:
        pusher.pool.shutdown(wait=True, cancel_futures=True)
        raise

    # Every chunk is in the bucket now: number them in first-use order and fill in the extents.
    index: dict[str, int] = {}
    chunks: list[tuple[str, int]] = []
    for i, extents in raw_extents.items():
        fixed = []
        for ref, off, n in extents:
            sha, size = ref.result() if isinstance(ref, Future) else ref
            k = index.get(sha)
            if k is None:
                k = index[sha] = len(chunks)
                chunks.append((sha, size))
            fixed.append((k, off, n))
        entries[i].extents = fixed
    stats.chunks = len(chunks)
    stats.bytes_total = sum(e.size for e in entries if e.type == FILE)
    stats.seconds = time.monotonic() - t0
    manifest = Manifest(
        kind=kind,
        id=mid,
        entries=entries,
        chunks=chunks,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        parent=parent.id if parent else None,
        chunking=chunking_params(avg_size),
        skipped=skipped,
        meta=dict(meta or {}),
        stats=stats,
    )
    return manifest


# -- download ------------------------------------------------------------------------------------

Fetch = Callable[[str, int], bytes]  # (sha, size) → verified content; raises CorruptData/ObjectNotFound


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` (one syscall, not a per-file fsync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class _Chunks:
    """Chunks of one download: prefetched in first-use order, a bounded window ahead of the writer,
    each kept until its last extent is written."""

    def __init__(self, manifest: Manifest, fetch: Fetch, workers: int) -> None:
        self.manifest, self.fetch = manifest, fetch
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="cove-objects-down")
        self.window = workers * 2
        self.order: list[int] = []
        self.uses: dict[int, int] = {}
        for e in manifest.entries:
            if e.type == FILE:
                for k, _, _ in e.extents:
                    if k not in self.uses:
                        self.order.append(k)
                        self.uses[k] = 0
                    self.uses[k] += 1
        self.next = 0
        self.live: dict[int, Future] = {}

    def _submit(self, k: int) -> None:
        sha, size = self.manifest.chunks[k]
        self.live[k] = self.pool.submit(self.fetch, sha, size)

    def _pump(self) -> None:
        while self.next < len(self.order) and len(self.live) < self.window:
            k = self.order[self.next]
            self.next += 1
            if k not in self.live and self.uses[k] > 0:
                self._submit(k)

    def get(self, k: int, path: str) -> bytes:
        if k not in self.live:
            self._submit(k)
        self._pump()
        sha = self.manifest.chunks[k][0]
        try:
            data: bytes = self.live[k].result()
        except CorruptData as exc:
            raise CorruptData(
                f"snapshot {self.manifest.name}: file {path!r}: {exc}",
                manifest=self.manifest.name,
                path=path,
                chunk=sha,
            ) from None
        except ObjectNotFound as exc:
            raise CorruptData(
                f"snapshot {self.manifest.name}: file {path!r}: chunk {sha} is missing from the bucket ({exc})",
                manifest=self.manifest.name,
                path=path,
                chunk=sha,
            ) from None
        self.uses[k] -= 1
        if self.uses[k] == 0 or len(self.live) > 4 * self.window:
            del self.live[k]  # done with it (or keeping too much: fetch it again, from the cache, later)
        return data

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _apply(path: str, e: Entry, as_root: bool) -> None:
    """Owner, then mode (chown clears setuid), then xattrs (chown clears security.capability), then
    mtime (last: nothing after it touches the inode's contents)."""
    link = e.type == SYMLINK
    if as_root:
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
    if not link:
        os.chmod(path, e.mode)
    for name, value in (e.xattrs or {}).items():
        if not as_root and not name.startswith("user."):
            continue
        os.setxattr(path, name, base64.b64decode(value), follow_symlinks=False)
    os.utime(path, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def restore(manifest: Manifest, dest: Path, *, fetch: Fetch, workers: int, sync: bool = True) -> Path:
    """Recreate `manifest`'s tree at `dest` (which must not exist), or leave nothing there."""
    dest = Path(dest)
    if os.path.lexists(dest):
        raise ObjectStoreError(f"restoring {manifest.name}: {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    vfs = os.statvfs(dest.parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < manifest.size:
        raise NoSpace(
            f"restoring {manifest.name} into {dest}: it needs {manifest.size} bytes and "
            f"{dest.parent} has {free} free"
        )
    as_root = os.geteuid() == 0
    tmp = dest.parent / f".{dest.name}.restore-{secrets.token_hex(4)}"
    os.mkdir(tmp, 0o700)
    chunks = _Chunks(manifest, fetch, workers)
    dirs: list[tuple[str, Entry]] = []
    try:
        for e in manifest.entries:
            path = os.path.join(tmp, e.path) if e.path != "." else str(tmp)
            try:
                if e.type == DIR:
                    if e.path != ".":
                        os.mkdir(path, 0o700)
                    dirs.append((path, e))
                    continue
                if e.type == FILE:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    with open(fd, "wb", buffering=0) as f:
                        written = 0
                        for k, off, n in e.extents:
                            view = memoryview(chunks.get(k, e.path))[off : off + n]
                            while view:
                                view = view[f.write(view) :]
                            written += n
                    if written != e.size:
                        raise CorruptData(
                            f"snapshot {manifest.name}: file {e.path!r} has {written} bytes of extents, "
                            f"expected {e.size}",
                            manifest=manifest.name,
                            path=e.path,
                        )
                elif e.type == SYMLINK:
                    os.symlink(e.target or "", path)
                elif e.type == HARDLINK:
                    os.link(os.path.join(tmp, e.target or ""), path, follow_symlinks=False)
                    continue  # the inode's metadata came with its first name
                elif e.type in (CHR, BLK, FIFO):
                    if e.type == FIFO:
                        os.mkfifo(path, 0o600)
                    elif as_root:
                        os.mknod(path, 0o600 | (stat.S_IFCHR if e.type == CHR else stat.S_IFBLK), e.rdev or 0)
                    else:
                        log.warning("restoring %s: skipping device %s (not root)", manifest.name, e.path)
                        continue
                else:
                    raise CorruptData(
                        f"snapshot {manifest.name}: entry {e.path!r} has unknown type {e.type!r}",
                        manifest=manifest.name,
                        path=e.path,
                    )
                _apply(path, e, as_root)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(
                        f"restoring {manifest.name} into {dest}: no space left writing {e.path!r} ({exc.strerror})"
                    ) from None
                raise ObjectStoreError(f"restoring {manifest.name}: {e.path!r}: {exc}") from exc
        for path, e in reversed(dirs):  # children before parents: their mtimes stay as set
            _apply(path, e, as_root)
        if sync:
            _syncfs(tmp)
        os.rename(tmp, dest)
    except BaseException:
        chunks.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    chunks.close()
    return dest


def make_fetch(bucket: Bucket, codec: Codec, cache: ChunkCache | None) -> Fetch:
    def fetch(sha: str, size: int) -> bytes:
        if cache is not None:
            data = cache.get(sha, size)
            if data is not None:
                return data
        data = codec.decode(bucket.get(chunk_name(sha)), sha, size)
        if cache is not None:
            cache.put(sha, data)
        return data

    return fetch
