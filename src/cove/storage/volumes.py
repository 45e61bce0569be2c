"""Named volumes: writable directories that outlive sandboxes, kept beside the layers.

With the btrfs backend a volume is a subvolume with a qgroup limit (writes beyond `size_mb` fail
inside the sandbox with EDQUOT, the host's disk is untouched), and sealing one for a snapshot is a
read-only subvolume snapshot, constant time at any size. The `dirs` fallback copies and cannot
limit sizes.

Layout under the storage root: `volumes/<volume id>` is a volume's content (its root is what a
sandbox sees at the mount path); `volumes/.sealed/<sealed id>` a read-only copy kept by a snapshot.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cove.storage.layers import LayerStore

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")


class VolumeStore:
    def __init__(self, layers: LayerStore) -> None:
        self.backend = layers.backend
        self.dir = layers.root / "volumes"
        self.sealed_dir = self.dir / ".sealed"
        self.sealed_dir.mkdir(parents=True, exist_ok=True)

    @property
    def can_limit(self) -> bool:
        return self.backend.name == "btrfs"

    def path(self, volume_id: str) -> Path:
        if not _ID.match(volume_id):
            raise ValueError(f"bad volume id {volume_id!r}")
        return self.dir / volume_id

    def sealed_path(self, sealed_id: str) -> Path:
        if not _ID.match(sealed_id):
            raise ValueError(f"bad sealed volume id {sealed_id!r}")
        return self.sealed_dir / sealed_id

    def create(self, volume_id: str, size_mb: int | None, owner: tuple[int, int]) -> Path:
        """An empty volume whose root belongs to `owner` (host ids of the sandbox's user)."""
        path = self.path(volume_id)
        self.backend.volume(path)
        try:
            self._finish(path, size_mb)
            os.chown(path, *owner)
            path.chmod(0o755)
        except BaseException:
            self.backend.delete(path)
            raise
        return path

    def _finish(self, path: Path, size_mb: int | None) -> None:
        if size_mb is not None:
            self.backend.limit(path, size_mb)

    def clone_sealed(self, sealed_id: str, volume_id: str, size_mb: int | None) -> Path:
        """A new writable volume with the content of a sealed copy (shares its extents on btrfs)."""
        path = self.path(volume_id)
        self.backend.clone(self.sealed_path(sealed_id), path)
        try:
            self._finish(path, size_mb)
        except BaseException:
            self.backend.delete(path)
            raise
        return path

    def seal(self, volume_id: str, sealed_id: str) -> None:
        """A read-only copy of the volume as it is now (the caller keeps its writers frozen)."""
        self.backend.snapshot(self.path(volume_id), self.sealed_path(sealed_id))

    def flush(self, volume_id: str) -> None:
        """Write back dirty data before a freeze, so that sealing has little left to flush."""
        import ctypes

        fd = os.open(self.path(volume_id), os.O_RDONLY | os.O_DIRECTORY)
        try:
            ctypes.CDLL(None, use_errno=True).syncfs(fd)
        finally:
            os.close(fd)

    def delete(self, volume_id: str) -> None:
        self.backend.delete(self.path(volume_id))

    def delete_sealed(self, sealed_id: str) -> None:
        self.backend.delete(self.sealed_path(sealed_id))

    def ids(self) -> set[str]:
        return {p.name for p in self.dir.iterdir() if not p.name.startswith(".")}

    def sealed_ids(self) -> set[str]:
        return {p.name for p in self.sealed_dir.iterdir() if not p.name.startswith(".")}

    def exists(self, volume_id: str) -> bool:
        return self.path(volume_id).is_dir()
