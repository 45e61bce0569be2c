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

    def prepare(self, key: str, parents: list[str], owner: tuple[int, int]) -> Active:
        """A new writable layer over `parents` (bottom-most first); its root dir belongs to `owner`."""
        base = self.active_dir / key
        upper, work = base / "upper", base / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        os.chown(upper, *owner)
        return self.active(key, parents)

    def active(self, key: str, parents: list[str]) -> Active:
        base = self.active_dir / key
        lower = tuple(str(self.path(p)) for p in reversed(parents))
        return Active(key=key, upper=base / "upper", work=base / "work", lowerdirs=lower)

    def remove_active(self, key: str) -> None:
        shutil.rmtree(self.active_dir / key, ignore_errors=True)

    def usage(self, key: str) -> int:
        """Bytes written by a sandbox (its upper dir)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.active_dir / key / "upper"):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total


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
