"""The node's side of template builds: layers by content-addressed id, the Debian base, image imports.

Blocking work (debootstrap, copying trees, unpacking tars) runs in worker threads; the server's
event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cove.storage import debian_base, oci
from cove.storage.layers import LayerStore

Log = Callable[[str], None]


def _threadsafe(log: Log) -> Log:
    loop = asyncio.get_running_loop()
    return lambda line: loop.call_soon_threadsafe(log, line)


class TemplateStorage:
    def __init__(self, layers: LayerStore, uid_base: int, debian_cache: Path) -> None:
        self.layers = layers
        self.uid_base = uid_base
        self.debian_cache = debian_cache
        self._debian: dict[str, str] = {}
        self._debian_lock = asyncio.Lock()

    async def has_layer(self, layer_id: str) -> bool:
        return await asyncio.to_thread(self.layers.exists, layer_id)

    async def sizes(self, layer_ids: list[str]) -> list[int]:
        return await asyncio.to_thread(lambda: [self.layers.size(i) for i in layer_ids])

    async def debian(self, suite: str, log: Log) -> str:
        """The layer of `debian:<suite>` (debootstrapped once per host, turned into a layer once
        per server)."""
        async with self._debian_lock:
            if suite in self._debian and self.layers.exists(self._debian[suite]):
                return self._debian[suite]
            tlog = _threadsafe(log)

            def build() -> str:
                tree = debian_base.cached_root(self.debian_cache, suite, tlog)
                marker = self.debian_cache / f"{tree.parent.name}.layer-{self.uid_base}"
                known = marker.read_text().strip() if marker.exists() else ""
                # The same tree gives the same layer id: skip the copy when this store has it.
                if known and self.layers.exists(known):
                    return known
                tlog(f"turning the Debian {suite} tree into a layer")
                layer = self.layers.build(lambda root: debian_base.fill(root, tree, self.uid_base))
                with contextlib.suppress(OSError):  # a read-only cache: only the shortcut is lost
                    marker.write_text(layer)
                return layer

            layer = await asyncio.to_thread(build)
            self._debian[suite] = layer
            return layer

    async def import_image(self, path: Path, log: Log) -> tuple[list[str], oci.Image]:
        """Committed layers for each of the image's layers (bottom-most first) and its config."""
        tlog = _threadsafe(log)

        def unpack() -> tuple[list[str], oci.Image]:
            try:
                outer = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
            except (tarfile.TarError, OSError) as e:
                raise oci.ImageError(f"not a tar file: {e}") from e
            with outer:
                image = oci.read_image(outer)
                ids = []
                for n, name in enumerate(image.layers, 1):
                    tlog(f"unpacking layer {n}/{len(image.layers)} ({os.path.basename(name)[:19]})")

                    def fill(root: Path, name: str = name) -> None:
                        with oci.open_layer(outer, name) as layer:
                            oci.unpack_layer(layer, root, self.uid_base)
                        os.chown(root, self.uid_base, self.uid_base)

                    try:
                        ids.append(self.layers.build(fill))
                    except tarfile.TarError as e:
                        raise oci.ImageError(f"layer {name} is not a readable tar: {e}") from e
                ids.append(self.layers.build(lambda root: mount_points(root, self.uid_base)))
                return ids, image

        return await asyncio.to_thread(unpack)


def mount_points(root: Path, uid_base: int) -> None:
    """What the runtime needs in any root (an image may have none of it): mount points, a /tmp,
    and a passwd with root and `user` where the image has none."""
    for d in ("proc", "dev", "sys", "tmp", "run/cove", debian_base.HOST_USR.lstrip("/"), "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(dirpath, name), uid_base, uid_base)
    os.chown(root, uid_base, uid_base)


def image_config(image: oci.Image) -> dict[str, Any]:
    return {
        "binds": [{"src": "/usr", "dst": debian_base.HOST_USR, "ro": True}],
        "rootfs": "full",
        "env": image.env,
        "user": image.user or "0",  # by uid: an image may have no /etc/passwd
        "workdir": image.workdir or "/",
    }
