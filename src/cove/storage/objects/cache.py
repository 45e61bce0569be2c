"""The node's chunk cache: decoded chunks on local disk, bounded in size, least recently used out first.

Layout: `<dir>/<sha[:2]>/<sha>` holds a chunk's raw content; `<dir>/tmp/` holds writes in progress.
A chunk is written to tmp/ and renamed into place, so a crash, a kill -9 or a full disk leaves at
worst a temporary file (removed at the next open), never a short chunk under a real name; and every
read is checked against its sha256 anyway (a bad entry is dropped and fetched again), so a disk that
corrupts a file costs a download, not a bad restore.

A full cache evicts; a full disk (ENOSPC) evicts half of what the cache holds and tries once more,
then gives up on caching that chunk with a warning. The cache is an optimisation: it never fails a
download. Recency is kept in memory and mirrored in file mtimes, so the order survives a restart.
One process (the node) owns a cache directory; others may read it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("cove.storage.objects")


class ChunkCache:
    def __init__(self, root: Path, limit: int) -> None:
        self.root = Path(root)
        self.limit = limit
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, int] = OrderedDict()  # sha → size, oldest first
        self._used = 0
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # writes a crash interrupted
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, str, int]] = []
        for sub in self.root.iterdir():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for f in sub.iterdir():
                with contextlib.suppress(OSError):
                    st = f.stat()
                    found.append((st.st_mtime, f.name, st.st_size))
        for _, sha, size in sorted(found):
            self._lru[sha] = size
            self._used += size
        with self._lock:
            self._evict_to(self.limit)

    @property
    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, sha: str) -> bool:
        return sha in self._lru

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def get(self, sha: str, size: int) -> bytes | None:
        """The chunk's content if cached and intact, else None."""
        with self._lock:
            if sha not in self._lru:
                self.misses += 1
                return None
            self._lru.move_to_end(sha)
        path = self._path(sha)
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            log.warning("object cache: dropping bad entry %s", path)
            self._forget(sha)
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for the next start's ordering
        self.hits += 1
        return data

    def put(self, sha: str, data: bytes) -> bool:
        """Cache a (verified) chunk; False if it was not cached (too big, or no room on the disk)."""
        size = len(data)
        if size > self.limit:
            return False
        with self._lock:
            if sha in self._lru:
                self._lru.move_to_end(sha)
                return True
            self._evict_to(self.limit - size)
        for attempt in (1, 2):
            try:
                self._write(sha, data)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or attempt == 2:
                    log.warning("object cache: not caching %s: %s", sha, exc)
                    return False
                with self._lock:
                    self._evict_to(self._used // 2)  # the disk is fuller than our limit assumed
        with self._lock:
            if sha not in self._lru:
                self._lru[sha] = size
                self._used += size
            # Puts on other threads may have filled the room this one made: evict again (oldest first,
            # so never the chunk just written).
            self._evict_to(self.limit)
        return True

    def _write(self, sha: str, data: bytes) -> None:
        tmp = self._tmp / f"{sha}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            final = self._path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _forget(self, sha: str) -> None:
        with self._lock:
            size = self._lru.pop(sha, None)
            if size is not None:
                self._used -= size
        self._path(sha).unlink(missing_ok=True)

    def _evict_to(self, target: int) -> None:
        # Called with the lock held.
        while self._lru and self._used > max(target, 0):
            sha, size = self._lru.popitem(last=False)
            self._used -= size
            self.evictions += 1
            self._path(sha).unlink(missing_ok=True)

    def clear(self) -> None:
        with self._lock:
            self._evict_to(0)
