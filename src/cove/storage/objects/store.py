"""`ObjectStore`: the one object the control plane holds. It ties the bucket, the codec, the node's
cache and the lease protocol together, and writes each manifest only after its chunks are durable."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cove.storage.objects.bucket import Bucket
from cove.storage.objects.cache import ChunkCache
from cove.storage.objects.chunks import AVG_SIZE, Codec
from cove.storage.objects.errors import ManifestNotFound, ObjectNotFound
from cove.storage.objects.gc import GcReport, collect_garbage
from cove.storage.objects.leases import Lease, age_s
from cove.storage.objects.manifests import Manifest, check_id, check_kind, manifest_name
from cove.storage.objects.settings import ObjectStoreSettings
from cove.storage.objects.trees import Progress, make_fetch, restore, upload

LAYER = "layer"  # a committed filesystem layer (a snapshot's tree)
CRIU = "criu"  # a CRIU image directory (a hibernation's processes and memory)


class ObjectStore:
    def __init__(
        self, settings: ObjectStoreSettings, *, cache: ChunkCache | None = None, avg_chunk: int = AVG_SIZE
    ) -> None:
        self.settings = settings
        self.bucket = Bucket(settings)
        self.codec = Codec(settings.compression)
        if cache is None and settings.cache_dir is not None:
            cache = ChunkCache(settings.cache_dir, settings.cache_limit)
        self.cache = cache
        self.avg_chunk = avg_chunk

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ObjectStore:
        return cls(ObjectStoreSettings.from_env(env))

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bucket.close()

    def check(self) -> None:
        """Raise a clear error now if the bucket cannot be listed (credentials, name, endpoint)."""
        self.bucket.check()

    # -- manifests --------------------------------------------------------------------------------

    def manifests(self, kind: str = LAYER) -> list[str]:
        """Ids of the complete manifests of `kind`, sorted."""
        prefix = f"manifests/{check_kind(kind)}/"
        infos, _ = self.bucket.list(prefix)
        return sorted(i.name[len(prefix) : -5] for i in infos if i.name.endswith(".json"))

    def manifest(self, mid: str, kind: str = LAYER) -> Manifest:
        name = manifest_name(kind, mid)
        try:
            data = self.bucket.get(name)
        except ObjectNotFound:
            raise ManifestNotFound(f"no manifest {kind}/{mid} in {self.bucket.where(name)}") from None
        return Manifest.from_bytes(data, f"{kind}/{mid} ({self.bucket.where(name)})")

    def unreferenced(self, kind: str, keep: set[str], older_than_s: float) -> list[str]:
        """Ids of the manifests of `kind` not in `keep` and written at least `older_than_s` ago by the
        server's clock (a younger one may belong to a push whose record is not written yet)."""
        prefix = f"manifests/{check_kind(kind)}/"
        infos, now = self.bucket.list(prefix)
        return sorted(
            mid
            for i in infos
            if i.name.endswith(".json")
            and (mid := i.name[len(prefix) : -5]) not in keep
            and age_s(i.last_modified, now) >= older_than_s
        )

    def has(self, mid: str, kind: str = LAYER) -> bool:
        """Is there a complete manifest `kind/mid`? (One HEAD.)"""
        return self.bucket.head(manifest_name(kind, mid)) is not None

    def delete_manifest(self, mid: str, kind: str = LAYER) -> None:
        """Forget a snapshot; its chunks go at the next GC unless another manifest shares them."""
        self.bucket.delete_one(manifest_name(kind, mid))

    # -- trees ------------------------------------------------------------------------------------

    def upload_tree(
        self,
        path: Path | str,
        mid: str,
        *,
        kind: str = LAYER,
        parent: Manifest | str | None = None,
        meta: dict[str, Any] | None = None,
        progress: Progress | None = None,
        flat: bool = False,
    ) -> Manifest:
        """Upload a directory tree as manifest `kind/mid`; with a parent (a manifest or its id, of the
        same kind), only what changed since it is read and only new chunks are PUT."""
        check_kind(kind)
        check_id(mid)
        name = manifest_name(kind, mid)
        lease = Lease(self.bucket, self.settings.lease_ttl, f"{kind}/{mid}")
        lease.acquire()
        try:
            # Read what we build on only under the lease: from now until the manifest is written no
            # GC sweeps, so every chunk seen here stays (leases.py).
            base: Manifest | None = None
            if parent is not None:
                pid = parent if isinstance(parent, str) else parent.id
                try:
                    base = self.manifest(pid, kind)
                except ManifestNotFound:
                    base = None  # deleted meanwhile: upload as if fresh
            if base is not None:
                known, head_unknown = base.chunk_shas(), True
            else:
                infos, _ = self.bucket.list("chunks/")
                known, head_unknown = {i.name.removeprefix("chunks/") for i in infos}, False
            manifest = upload(
                Path(path),
                kind=kind,
                mid=mid,
                bucket=self.bucket,
                codec=self.codec,
                known=known,
                head_unknown=head_unknown,
                workers=self.settings.workers,
                parent=base,
                flat=flat,
                meta=meta,
                progress=progress,
                avg_size=self.avg_chunk,
            )
            lease.assert_fresh()
            body = manifest.to_bytes()
            self.bucket.put(name, body)  # last: the snapshot exists from here on
            if manifest.stats is not None:
                manifest.stats.bytes_stored += len(body)
            return manifest
        finally:
            lease.release()

    def download_tree(
        self, manifest: Manifest | str, dest: Path | str, *, kind: str = LAYER, sync: bool = True
    ) -> Path:
        """Restore a manifest (or the id of one) at `dest`, which must not exist; on any error nothing
        is left at `dest`."""
        m = manifest if isinstance(manifest, Manifest) else self.manifest(manifest, kind)
        fetch = make_fetch(self.bucket, self.codec, self.cache)
        return restore(m, Path(dest), fetch=fetch, workers=self.settings.workers, sync=sync)

    # CRIU image directories: flat (regular files only), kind "criu".

    def upload_images(
        self,
        path: Path | str,
        mid: str,
        *,
        parent: Manifest | str | None = None,
        meta: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> Manifest:
        return self.upload_tree(path, mid, kind=CRIU, parent=parent, meta=meta, progress=progress, flat=True)

    def download_images(self, manifest: Manifest | str, dest: Path | str) -> Path:
        return self.download_tree(manifest, dest, kind=CRIU)

    # -- GC ---------------------------------------------------------------------------------------

    def collect_garbage(self, *, wait_s: float = 60.0) -> GcReport:
        return collect_garbage(self.bucket, ttl=self.settings.lease_ttl, wait_s=wait_s)

    def stored_bytes(self, under: str = "chunks/") -> int:
        """Bytes the bucket holds under `under` (default: every chunk)."""
        infos, _ = self.bucket.list(under)
        return sum(i.size for i in infos)
