"""Layer storage in the shape of containerd's snapshotter.

*Committed* layers are immutable directories named by the digest of their content; *active* layers
are a writable upper dir (plus overlayfs's work dir) over a chain of committed parents. A sandbox's
root is an overlay of its active layer over its template's chain. Snapshots (a later issue) commit
an active layer into a new committed one, so a fork is a new overlay over the same chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Active:
    key: str
    upper: Path
    work: Path
    lowerdirs: tuple[str, ...]  # top-most first, as overlayfs expects

    def overlay_options(self) -> str:
        return f"lowerdir={':'.join(self.lowerdirs)},upperdir={self.upper},workdir={self.work}"


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.active_dir = root / "active"
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.active_dir.mkdir(parents=True, exist_ok=True)

    def path(self, layer_id: str) -> Path:
        return self.layers_dir / layer_id

    def exists(self, layer_id: str) -> bool:
        return self.path(layer_id).is_dir()

    def build(self, fill: Callable[[Path], None]) -> str:
        """Create a committed layer: `fill` populates a scratch dir, which is then named by its digest."""
        scratch = self.layers_dir / f".build-{os.getpid()}-{os.urandom(4).hex()}"
        scratch.mkdir(mode=0o755)
        try:
            fill(scratch)
            layer_id = tree_digest(scratch)
            target = self.path(layer_id)
            if target.exists():
                shutil.rmtree(scratch)
            else:
                os.rename(scratch, target)
            return layer_id
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def prepare(
        self, key: str, parents: list[str], owner: tuple[int, int], size_mb: int | None = None
    ) -> Active:
        """A new writable layer over `parents` (bottom-most first); its root dir belongs to `owner`.

        With `size_mb`, the layer lives in its own ext4 image of that size (sparse, loop-mounted), so
        a sandbox that fills its disk gets ENOSPC and the host's disk is untouched.
        """
        base = self.active_dir / key
        base.mkdir(parents=True)
        if size_mb is not None:
            _make_disk(base, size_mb)
        root = self._root(key)
        upper, work = root / "upper", root / "work"
        upper.mkdir()
        work.mkdir()
        os.chown(upper, *owner)
        return self.active(key, parents)

    def _root(self, key: str) -> Path:
        base = self.active_dir / key
        return base / "fs" if (base / DISK_IMAGE).exists() else base

    def active(self, key: str, parents: list[str]) -> Active:
        root = self._root(key)
        lower = tuple(str(self.path(p)) for p in reversed(parents))
        return Active(key=key, upper=root / "upper", work=root / "work", lowerdirs=lower)

    def remove_active(self, key: str) -> None:
        fs = self.active_dir / key / "fs"
        if os.path.ismount(fs):
            subprocess.run(["umount", "-l", str(fs)], check=False, capture_output=True)
        shutil.rmtree(self.active_dir / key, ignore_errors=True)

    def usage(self, key: str) -> int:
        """Bytes written by a sandbox (its upper dir)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self._root(key) / "upper"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total


DISK_IMAGE = "disk.img"


def _make_disk(base: Path, size_mb: int) -> None:
    """A sparse ext4 image for one writable layer (≈20 ms), mounted at base/fs."""
    image, mnt = base / DISK_IMAGE, base / "fs"
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    mnt.mkdir()
    mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard", str(image)]
    for argv in (mkfs, ["mount", "-o", "loop,nosuid,nodev", str(image), str(mnt)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{argv[0]} failed: {done.stderr.strip()}")


def tree_digest(root: Path) -> str:
    """sha256 over paths, types, modes, owners and contents: equal trees get equal ids."""
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            h.update(f"{rel}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            h.update(b"\0")
    return "sha256-" + h.hexdigest()[:32]
