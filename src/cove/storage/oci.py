"""Import an OCI image layout or a `docker save` tarball (no registry) as cove layers.

Each image layer (a tar, maybe gzip- or zstd-less: gzip and plain are read) becomes one committed
layer in overlayfs's own format, so the layers stack exactly as the image's do:
- `.wh.NAME` (a whiteout: NAME was deleted) -> a 0/0 character device named NAME;
- `.wh..wh..opq` (an opaque dir: nothing below shows through) -> the `trusted.overlay.opaque` xattr.
Owners are shifted into the sandbox's id range; device nodes, and paths escaping the layer, are
skipped. Only the image's config (Env, WorkingDir, User, Entrypoint, Cmd) is kept besides the files.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


class ImageError(Exception):
    """The file is not an image cove can import; the message says why."""


@dataclass
class Image:
    layers: list[str]  # member names (docker save) or blob paths (OCI), bottom-most first
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    start_cmd: str | None = None


def _json(tar: tarfile.TarFile, name: str) -> Any:
    try:
        member = tar.extractfile(name.lstrip("./") if name.startswith("./") else name)
    except KeyError:
        member = None
    if member is None:
        raise ImageError(f"the image has no {name}")
    try:
        return json.load(member)
    except ValueError as e:
        raise ImageError(f"{name} is not JSON: {e}") from e


def _blob(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or not hexd.isalnum():
        raise ImageError(f"unsupported digest {digest!r}")
    return f"blobs/sha256/{hexd}"


def read_image(tar: tarfile.TarFile) -> Image:
    """The layer list and config of a docker-save tarball or an OCI image layout (as a tar)."""
    names = set(tar.getnames())
    names |= {n[2:] for n in names if n.startswith("./")}
    if "manifest.json" in names:  # docker save
        manifest = _json(tar, "manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ImageError("manifest.json lists no image")
        entry = manifest[0]
        config = _json(tar, entry["Config"])
        layers = list(entry.get("Layers") or [])
    elif "index.json" in names:  # OCI image layout
        index = _json(tar, "index.json")
        manifests = index.get("manifests") or []
        if not manifests:
            raise ImageError("index.json lists no manifest")
        manifest = _json(tar, _blob(manifests[0]["digest"]))
        if "manifests" in manifest:  # an index of platforms: take the first
            manifest = _json(tar, _blob(manifest["manifests"][0]["digest"]))
        config = _json(tar, _blob(manifest["config"]["digest"]))
        layers = [_blob(layer["digest"]) for layer in manifest.get("layers") or []]
    else:
        raise ImageError("not an image: neither manifest.json (docker save) nor index.json (OCI layout)")
    for name in layers:
        if name not in names:
            raise ImageError(f"the image's layer {name} is missing from the file")
    cfg = config.get("config") or {}
    env = {}
    for item in cfg.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    argv = [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
    return Image(
        layers=layers,
        env=env,
        workdir=cfg.get("WorkingDir") or None,
        user=cfg.get("User") or None,
        start_cmd=shlex.join(argv) if argv else None,
    )


def open_layer(tar: tarfile.TarFile, name: str) -> tarfile.TarFile:
    member = tar.extractfile(name)
    if member is None:
        raise ImageError(f"layer {name} is not a file")
    return tarfile.open(fileobj=member, mode="r:*")


def _safe(name: str) -> PurePosixPath | None:
    p = PurePosixPath("/" + name.lstrip("/"))
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return PurePosixPath(*parts)


def unpack_layer(layer: tarfile.TarFile, root: Path, uid_base: int) -> None:
    """Unpack one image layer into `root` in overlayfs's format (see the module's doc)."""
    hardlinks: list[tuple[Path, Path]] = []
    for m in layer:
        rel = _safe(m.name)
        if rel is None:
            continue
        dst = root / rel
        parent = dst.parent
        _mkdirs(root, parent, uid_base)
        if rel.name == OPAQUE:
            os.setxattr(parent, "trusted.overlay.opaque", b"y")
            continue
        if rel.name.startswith(WHITEOUT):
            target = parent / rel.name[len(WHITEOUT) :]
            _remove(target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            os.lchown(target, uid_base, uid_base)
            continue
        if m.isdir():
            if dst.is_dir() and not dst.is_symlink():  # an earlier entry made it
                os.chmod(dst, m.mode & 0o7777)
            else:
                _remove(dst)
                dst.mkdir(mode=m.mode & 0o7777)
                os.chmod(dst, m.mode & 0o7777)
        elif m.isfile():
            _remove(dst)
            src = layer.extractfile(m)
            assert src is not None
            _write(dst, src)
            os.chmod(dst, m.mode & 0o7777)
        elif m.issym():
            _remove(dst)
            os.symlink(m.linkname, dst)
        elif m.islnk():
            link = _safe(m.linkname)
            if link is not None:
                hardlinks.append((dst, root / link))
            continue
        else:
            continue  # devices and fifos: a sandbox gets its own /dev
        os.lchown(dst, uid_base + m.uid, uid_base + m.gid)
        if not m.issym() and m.mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(dst, m.mode & 0o7777)  # chown cleared setuid/setgid
    for dst, target in hardlinks:
        if target.is_file() and not target.is_symlink():
            _remove(dst)
            os.link(target, dst)


def _mkdirs(root: Path, path: Path, uid_base: int) -> None:
    if path == root or (path.is_dir() and not path.is_symlink()):
        return
    _mkdirs(root, path.parent, uid_base)
    _remove(path)  # a symlink or file where the image wants a dir: never follow it out of the layer
    path.mkdir(mode=0o755)
    os.lchown(path, uid_base, uid_base)


def _remove(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()  # a whiteout device


def _write(dst: Path, src: IO[bytes]) -> None:
    with open(dst, "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
