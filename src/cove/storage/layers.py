"""Layer storage in the shape of containerd's snapshotter.

*Committed* layers are immutable; *active* layers are a writable volume holding overlayfs's upper and
work dirs, over a chain of committed parents. A sandbox's root is an overlay of its active layer over
its chain. Committing an active layer (a snapshot) makes a read-only copy of its volume, so a fork
or a restore is a new overlay over the same chain plus one layer.

Two backends do the copying:
- `btrfs` (default): volumes are subvolumes and a commit is a read-only subvolume snapshot, constant
  time at any size. When the data dir is not on btrfs, cove keeps its storage in a sparse btrfs image
  loop-mounted at `$COVE_HOME/storage`.
- `dirs` (fallback where btrfs is unavailable): plain directories; a commit copies the upper dir
  (`cp -a --reflink=auto`), which costs time in proportion to its size.

Layout: `layers/<id>/upper` is a committed layer's content; `active/<key>/{upper,work}` a writable one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("cove.storage")
BTRFS_MAGIC = 0x9123683E


@dataclass(frozen=True)
class Active:
    key: str
    upper: Path
    work: Path
    lowerdirs: tuple[str, ...]  # top-most first, as overlayfs expects

    def overlay_options(self) -> str:
        return f"lowerdir={':'.join(self.lowerdirs)},upperdir={self.upper},workdir={self.work}"


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv[:3])} failed: {done.stderr.strip() or done.stdout.strip()}")


# btrfs ioctls (linux/btrfs.h): a subvolume operation costs one syscall instead of a `btrfs`
# process (about 1.5 ms of CPU each, two per sandbox). Both argument structs are 4096 bytes.
_IOW_4096 = (1 << 30) | (4096 << 16) | (0x94 << 8)
BTRFS_IOC_SUBVOL_CREATE = _IOW_4096 | 14  # struct btrfs_ioctl_vol_args {s64 fd; char name[4088]}
BTRFS_IOC_SNAP_DESTROY = _IOW_4096 | 15
BTRFS_IOC_SNAP_CREATE_V2 = _IOW_4096 | 23  # struct btrfs_ioctl_vol_args_v2 (name at offset 56)
BTRFS_SUBVOL_RDONLY = 1 << 1


def _subvol_ioctl(path: Path, request: int, src_fd: int = 0, flags: int = 0) -> None:
    """One subvolume ioctl on `path`'s parent directory, naming `path`'s last component."""
    name = os.fsencode(path.name)
    if not name or b"/" in name or len(name) > 4039:
        raise OSError(f"bad subvolume name {path.name!r}")
    args = bytearray(4096)
    args[0:8] = src_fd.to_bytes(8, "little", signed=True)
    if request == BTRFS_IOC_SNAP_CREATE_V2:
        args[16:24] = flags.to_bytes(8, "little")
        args[56 : 56 + len(name)] = name
    else:
        args[8 : 8 + len(name)] = name
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(parent, request, args)
    except OSError as e:
        raise OSError(e.errno, f"btrfs subvolume operation on {path} failed: {e.strerror}") from None
    finally:
        os.close(parent)


def _snapshot(src: Path, dst: Path, flags: int) -> None:
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _subvol_ioctl(dst, BTRFS_IOC_SNAP_CREATE_V2, fd, flags)
    finally:
        os.close(fd)


class Btrfs:
    name = "btrfs"

    def __init__(self, root: Path) -> None:
        self.root = root
        self._quota = False

    def volume(self, path: Path) -> None:
        _subvol_ioctl(path, BTRFS_IOC_SUBVOL_CREATE)

    def snapshot(self, src: Path, dst: Path) -> None:
        _snapshot(src, dst, BTRFS_SUBVOL_RDONLY)

    def clone(self, src: Path, dst: Path) -> None:
        """A writable copy (a snapshot that shares every extent until written)."""
        _snapshot(src, dst, 0)

    def delete(self, path: Path) -> None:
        if not path.exists():
            return
        if _is_subvolume(path):
            _subvol_ioctl(path, BTRFS_IOC_SNAP_DESTROY)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def limit(self, path: Path, size_mb: int) -> None:
        if not self._quota:
            _run("btrfs", "quota", "enable", str(self.root))
            self._quota = True
        _run("btrfs", "qgroup", "limit", f"{size_mb}M", str(path))


class Dirs:
    name = "dirs"

    def __init__(self, root: Path) -> None:
        self.root = root

    def volume(self, path: Path) -> None:
        path.mkdir()

    def snapshot(self, src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + ".tmp")
        _run("cp", "-a", "--reflink=auto", str(src), str(tmp))
        os.rename(tmp, dst)

    def clone(self, src: Path, dst: Path) -> None:
        self.snapshot(src, dst)

    def delete(self, path: Path) -> None:
        fs = path / "fs"
        if os.path.ismount(fs):
            subprocess.run(["umount", "-l", str(fs)], check=False, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)

    def limit(self, path: Path, size_mb: int) -> None:
        raise OSError("disk limits need the btrfs storage backend")


def _is_subvolume(path: Path) -> bool:
    return os.stat(path).st_ino == 256  # the root inode of every btrfs subvolume


def is_btrfs(path: Path) -> bool:
    import ctypes
    import ctypes.util

    buf = ctypes.create_string_buffer(128)  # struct statfs; f_type is its first field
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.statfs(str(path).encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], "little") == BTRFS_MAGIC


def btrfs_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            known = "btrfs" in f.read()
    except OSError:
        return False
    return known and shutil.which("btrfs") is not None and shutil.which("mkfs.btrfs") is not None


def open_storage(home: Path, backend: str = "auto", image_size: str = "512G") -> LayerStore:
    """The node's layer store under `home/storage`, mounting its btrfs image when needed."""
    root = home / "storage"
    root.mkdir(parents=True, exist_ok=True)
    if backend in ("auto", "btrfs") and not is_btrfs(root):
        if btrfs_available():
            image = home / "storage.btrfs"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(_size_bytes(image_size))  # sparse: costs only what is written
                _run("mkfs.btrfs", "-q", str(image))
            _run("mount", "-o", "loop,noatime", str(image), str(root))
            log.info("mounted the btrfs storage image", extra={"image": str(image), "at": str(root)})
        elif backend == "btrfs":
            raise OSError("COVE_STORAGE=btrfs, but btrfs is not available (apt-get install btrfs-progs)")
    impl: Btrfs | Dirs = Btrfs(root) if is_btrfs(root) else Dirs(root)
    if impl.name == "dirs":
        log.warning("btrfs is unavailable: snapshots copy the writable layer (time grows with its size)")
    return LayerStore(root, impl)


def _size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


class LayerStore:
    def __init__(self, root: Path, backend: Btrfs | Dirs) -> None:
        self.root = root
        self.backend = backend
        self.layers_dir = root / "layers"
        self.active_dir = root / "active"
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        self.active_dir.mkdir(parents=True, exist_ok=True)

    def sweep_scratch(self) -> list[str]:
        """Remove what interrupted builds and flattens left (`.build-*`, `.flatten-*`, `.merge-*`
        mounts, a copy's `.tmp`); only at start, when nothing of this store is in progress."""
        found = []
        for p in [*self.layers_dir.glob(".*"), *self.layers_dir.glob("*.tmp"), *self.root.glob(".merge-*")]:
            found.append(p.name)
            if os.path.ismount(p):
                subprocess.run(["umount", "-l", str(p)], check=False, capture_output=True)
            if p.name.startswith(".merge-"):
                with contextlib.suppress(OSError):
                    p.rmdir()
            else:
                self.backend.delete(p)
        return found

    def path(self, layer_id: str) -> Path:
        """The content of a committed layer (what overlayfs gets as a lowerdir)."""
        return self.layers_dir / layer_id / "upper"

    def exists(self, layer_id: str) -> bool:
        return (self.layers_dir / layer_id).is_dir()

    def layer_ids(self) -> set[str]:
        return {p.name for p in self.layers_dir.iterdir() if not p.name.startswith(".")}

    def build(self, fill: Callable[[Path], None]) -> str:
        """Create a committed layer: `fill` populates a scratch dir, which is then named by its digest."""
        scratch = self.layers_dir / f".build-{os.getpid()}-{secrets.token_hex(4)}"
        self.backend.volume(scratch)
        try:
            (scratch / "upper").mkdir(mode=0o755)
            fill(scratch / "upper")
            layer_id = tree_digest(scratch / "upper")
            if not self.exists(layer_id):
                self.backend.snapshot(scratch, self.layers_dir / layer_id)
            return layer_id
        finally:
            self.backend.delete(scratch)

    def prepare(
        self, key: str, parents: list[str], owner: tuple[int, int], size_mb: int | None = None
    ) -> Active:
        """A new writable layer over `parents` (bottom-most first); its root dir belongs to `owner`.

        With `size_mb`, writes beyond that size fail inside the sandbox (EDQUOT), not on the host.
        """
        base = self.active_dir / key
        self.backend.volume(base)
        try:
            if size_mb is not None:
                self.backend.limit(base, size_mb)
            (base / "upper").mkdir()
            (base / "work").mkdir()
            os.chown(base / "upper", *owner)
        except BaseException:
            self.backend.delete(base)
            raise
        return self.active(key, parents)

    def active(self, key: str, parents: list[str]) -> Active:
        base = self.active_dir / key
        lower = tuple(str(self.path(p)) for p in reversed(parents))
        return Active(key=key, upper=base / "upper", work=base / "work", lowerdirs=lower)

    def has_active(self, key: str) -> bool:
        return (self.active_dir / key).is_dir()

    def flush(self, key: str) -> None:
        """Write back the layer's dirty data (syncfs), so that a following commit has little to flush."""
        import ctypes

        fd = os.open(self.active_dir / key, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ctypes.CDLL(None, use_errno=True).syncfs(fd)
        finally:
            os.close(fd)

    def commit(self, key: str, layer_id: str) -> str:
        """Seal a copy of an active layer as the committed layer `layer_id` (the caller keeps writers
        frozen). The caller chooses the id, so a retried commit finds the layer its first try made."""
        if not self.exists(layer_id):
            self.backend.snapshot(self.active_dir / key, self.layers_dir / layer_id)
        return layer_id

    def flatten(self, chain: list[str], layer_id: str) -> str:
        """The committed layer `layer_id` holding the merged view of `chain` (bottom-most first); a
        retry finds the layer its first try made.

        Mount cost grows with the number of lower layers (and the kernel caps it near 500), so long
        snapshot chains are squashed: an overlay of the chain, read-only, copied into a new layer.
        """
        if self.exists(layer_id):
            return layer_id
        scratch = self.layers_dir / f".flatten-{secrets.token_hex(4)}"
        merged = self.root / f".merge-{secrets.token_hex(4)}"
        self.backend.volume(scratch)
        merged.mkdir()
        try:
            lower = ":".join(str(self.path(p)) for p in reversed(chain))
            if len(chain) == 1:
                _run("mount", "--bind", "-o", "ro", lower, str(merged))
            else:
                _run("mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", str(merged))
            try:
                _run("cp", "-a", "--reflink=auto", f"{merged}/.", str(scratch / "upper"))
            finally:
                _run("umount", str(merged))
            self.backend.snapshot(scratch, self.layers_dir / layer_id)
            return layer_id
        finally:
            merged.rmdir()
            self.backend.delete(scratch)

    def size(self, layer_id: str) -> int:
        """Bytes of a committed layer's files (apparent sizes)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.path(layer_id)):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def remove_active(self, key: str) -> None:
        self.backend.delete(self.active_dir / key)

    def remove_layer(self, layer_id: str) -> None:
        self.backend.delete(self.layers_dir / layer_id)

    def usage(self, key: str) -> int:
        """Bytes written by a sandbox (its upper dir)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.active_dir / key / "upper"):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    continue
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
