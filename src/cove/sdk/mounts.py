"""How a sandbox mounts volumes and buckets: `VolumeMount`, `BucketMount` and their request bodies
(a module of its own, below both SDKs and `volumes`, which all use it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cove.errors import InvalidArgument

__all__ = ["BucketMount", "SnapshotVolumes", "VolumeMount", "mount_bodies", "volume_bodies"]

SnapshotVolumes = Literal["include", "exclude"]


@dataclass(frozen=True, slots=True)
class VolumeMount:
    """A named volume at ``path`` in a new sandbox."""

    name: str
    path: str
    read_only: bool = False

    def body(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class BucketMount:
    """An S3-compatible bucket (or ``prefix`` of it) at ``path``; the keys stay on the server's host."""

    bucket: str
    path: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    read_only: bool = False

    def body(self) -> dict[str, Any]:
        return {"type": "s3", **{k: v for k, v in asdict(self).items() if v is not None}}


def volume_bodies(volumes: Sequence[VolumeMount | Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for v in volumes or ():
        if isinstance(v, VolumeMount):
            out.append(v.body())
        elif isinstance(v, Mapping):
            out.append(dict(v))
        else:
            raise InvalidArgument(f"volumes: expected VolumeMount or dict, got {type(v).__name__}")
    return out


def mount_bodies(mounts: Sequence[BucketMount | Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    out = []
    for m in mounts or ():
        if isinstance(m, BucketMount):
            out.append(m.body())
        elif isinstance(m, Mapping):
            out.append({"type": "s3", **m})
        else:
            raise InvalidArgument(f"mounts: expected BucketMount or dict, got {type(m).__name__}")
    return out
