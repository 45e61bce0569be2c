"""Manifests: what a snapshot is made of, stored as `manifests/<kind>/<id>.json`.

A manifest lists every entry of a tree (path, type, mode, owner, mtime, xattrs, and for a regular
file its extents), the table of chunks those extents read (sha256 and size of each) and a checksum:
the sha256 of the manifest's canonical JSON (sorted keys, no spaces) without the checksum itself.

It is written last, with one PUT, after every chunk it names is durable (S3 acknowledges a PUT once
the object is stored; a PUT is atomic, never visible half-written). So listing `manifests/<kind>/`
shows complete snapshots only, and a kill -9 during an upload leaves chunks without a manifest,
which GC removes later (gc.py). Reads verify the checksum, so a damaged manifest is a clear error
rather than a tree restored from bad instructions.

Paths are relative to the tree's root ("." is the root itself) and stored as `os.fsdecode` gives them
(surrogate escapes keep non-UTF-8 names exact); xattr values are base64.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cove.storage.objects.errors import ConfigError, CorruptData

FORMAT = "cove-objects/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_KIND = re.compile(r"^[a-z][a-z0-9-]{0,39}$")

# Entry types. Sockets are not recorded (a socket file means nothing without its process; CRIU
# restores a process's sockets from its own images): manifest.skipped names each one.
DIR, FILE, SYMLINK, HARDLINK, CHR, BLK, FIFO = "dir", "file", "symlink", "hardlink", "chr", "blk", "fifo"


def check_kind(kind: str) -> str:
    if not _KIND.match(kind):
        raise ConfigError(f"manifest kind {kind!r}: expected lowercase letters, digits and '-'")
    return kind


def check_id(mid: str) -> str:
    if not _NAME.match(mid):
        raise ConfigError(f"manifest id {mid!r}: expected letters, digits, '.', '_' and '-' (≤ 200)")
    return mid


def manifest_name(kind: str, mid: str) -> str:
    return f"manifests/{check_kind(kind)}/{check_id(mid)}.json"


@dataclass
class Entry:
    path: str
    type: str
    mode: int  # permission bits with setuid/setgid/sticky (stat.S_IMODE)
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    # Regular files: (chunk index, offset in the chunk, length), in file order.
    extents: list[tuple[int, int, int]] = field(default_factory=list)
    target: str | None = None  # a symlink's target, or the path a hardlink shares its inode with
    rdev: int | None = None  # device numbers of chr/blk (overlayfs whiteouts are chr 0:0)
    xattrs: dict[str, str] | None = None  # name → base64 value
    ino: int | None = None  # the source inode, to skip unchanged files against a parent

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "type": self.type, "mode": self.mode}
        if self.uid or self.gid:
            d["uid"], d["gid"] = self.uid, self.gid
        if self.type != HARDLINK:
            d["mtime_ns"] = self.mtime_ns
        if self.type == FILE:
            d["size"] = self.size
            d["extents"] = [list(x) for x in self.extents]
        for k in ("target", "rdev", "xattrs", "ino"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        return cls(
            path=d["path"],
            type=d["type"],
            mode=d["mode"],
            uid=d.get("uid", 0),
            gid=d.get("gid", 0),
            mtime_ns=d.get("mtime_ns", 0),
            size=d.get("size", 0),
            extents=[(int(i), int(o), int(n)) for i, o, n in d.get("extents", ())],
            target=d.get("target"),
            rdev=d.get("rdev"),
            xattrs=d.get("xattrs"),
            ino=d.get("ino"),
        )


@dataclass
class UploadStats:
    """What one upload did (not stored in the manifest)."""

    files: int = 0
    bytes_total: int = 0  # file bytes the manifest describes
    bytes_read: int = 0  # file bytes read (unchanged files skipped against the parent are not)
    files_unchanged: int = 0
    chunks: int = 0  # distinct chunks the manifest names
    chunks_new: int = 0  # chunks this upload PUT
    bytes_new: int = 0  # their raw size
    bytes_stored: int = 0  # their encoded size (what the bucket grew by, manifest aside)
    seconds: float = 0.0


@dataclass
class Manifest:
    kind: str
    id: str
    entries: list[Entry]
    chunks: list[tuple[str, int]]  # (sha256, size)
    created: str = ""
    parent: str | None = None
    chunking: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # free for the caller (sandbox id, node, …)
    checksum: str = ""
    stats: UploadStats | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.id}"

    @property
    def size(self) -> int:
        """Bytes of file content the tree holds."""
        return sum(e.size for e in self.entries if e.type == FILE)

    @property
    def stored_size(self) -> int:
        """Raw bytes of the distinct chunks it names."""
        return sum(n for _, n in self.chunks)

    def chunk_shas(self) -> set[str]:
        return {sha for sha, _ in self.chunks}

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "id": self.id,
            "created": self.created,
            "parent": self.parent,
            "chunking": self.chunking,
            "meta": self.meta,
            "chunks": [[s, n] for s, n in self.chunks],
            "entries": [e.to_json() for e in self.entries],
            "skipped": self.skipped,
        }

    def to_bytes(self) -> bytes:
        body = self._body()
        self.checksum = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
        body["checksum"] = self.checksum
        return _canonical(body)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """Parse and verify; `where` (kind/id and key) goes into every error."""
        try:
            body = json.loads(data)
            stored = body.pop("checksum")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise CorruptData(
                f"manifest {where} is not a cove manifest (unreadable JSON)", manifest=where
            ) from None
        if body.get("format") != FORMAT:
            raise CorruptData(
                f"manifest {where} has format {body.get('format')!r}, expected {FORMAT}", manifest=where
            )
        actual = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
        if actual != stored:
            raise CorruptData(f"manifest {where} fails its checksum (stored data is corrupt)", manifest=where)
        try:
            return cls(
                kind=body["kind"],
                id=body["id"],
                created=body["created"],
                parent=body["parent"],
                chunking=body["chunking"],
                meta=body["meta"],
                chunks=[(str(s), int(n)) for s, n in body["chunks"]],
                entries=[Entry.from_json(e) for e in body["entries"]],
                skipped=body["skipped"],
                checksum=stored,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptData(f"manifest {where} is malformed ({exc!r})", manifest=where) from None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
