"""Volumes and bucket mounts in the SDK (docs/volumes.md).

::

    from cove import Sandbox, Volume

    vol = Volume.create("data", size_mb=512)
    with Sandbox.create(volumes=[vol.mount("/data")]) as sb:
        sb.exec("echo kept > /data/note")

:class:`Volume` blocks; :class:`AsyncVolume` is the same for asyncio. Mounts are given to
``Sandbox.create(volumes=..., mounts=...)`` as :class:`VolumeMount` / :class:`BucketMount` or as
plain dicts in the REST API's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cove.sdk._core import Call, Op, _q
from cove.sdk.aio import _once as _once_async
from cove.sdk.models import _opt_int, _time
from cove.sdk.mounts import BucketMount, VolumeMount
from cove.sdk.sync import _once

__all__ = ["AsyncVolume", "BucketMount", "Volume", "VolumeInfo", "VolumeMount"]


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    name: str
    size_mb: int | None = None
    created_at: datetime | None = None
    source: dict[str, Any] = field(default_factory=dict)  # {"snapshot", "volume"} for a copy
    sandboxes: list[str] = field(default_factory=list)  # live sandboxes mounting it (from get)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VolumeInfo:
        return cls(
            name=str(data["name"]),
            size_mb=_opt_int(data.get("size_mb")),
            created_at=_time(data.get("created_at")),
            source=dict(data.get("source") or {}),
            sandboxes=[str(s) for s in data.get("sandboxes") or []],
        )


# -- operations (driven by the sync and async front ends) ---------------------------------------


def create_volume(name: str, size_mb: int | None = None) -> Op[VolumeInfo]:
    body: dict[str, Any] = {"name": name}
    if size_mb is not None:
        body["size_mb"] = size_mb
    data = yield Call("POST", "/v1/volumes", json=body)
    return VolumeInfo.from_dict(data)


def get_volume(name: str) -> Op[VolumeInfo]:
    data = yield Call("GET", f"/v1/volumes/{_q(name)}")
    return VolumeInfo.from_dict(data)


def list_volumes() -> Op[list[VolumeInfo]]:
    data = yield Call("GET", "/v1/volumes")
    return [VolumeInfo.from_dict(item) for item in data["items"]]


def delete_volume(name: str) -> Op[None]:
    yield Call("DELETE", f"/v1/volumes/{_q(name)}")


class _Base:
    def __init__(self, info: VolumeInfo, url: str | None, api_key: str | None, transport: Any) -> None:
        self.info = info
        self._conn = (url, api_key, transport)

    @property
    def name(self) -> str:
        return self.info.name

    def mount(self, path: str, read_only: bool = False) -> VolumeMount:
        """This volume at ``path`` in a sandbox: ``Sandbox.create(volumes=[vol.mount("/data")])``."""
        return VolumeMount(self.name, path, read_only)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, size_mb={self.info.size_mb})"


class Volume(_Base):
    """A named volume of your tenant: it outlives sandboxes; several can mount it at once."""

    @classmethod
    def create(
        cls,
        name: str,
        *,
        size_mb: int | None = None,
        url: str | None = None,
        api_key: str | None = None,
        transport: Any = None,
    ) -> Volume:

        return cls(_once(create_volume(name, size_mb), url, api_key, transport), url, api_key, transport)

    @classmethod
    def get(
        cls, name: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> Volume:
        """Raises :class:`~cove.errors.NotFound` for an unknown name (or another tenant's)."""

        return cls(_once(get_volume(name), url, api_key, transport), url, api_key, transport)

    @classmethod
    def list(
        cls, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> list[Volume]:

        return [cls(i, url, api_key, transport) for i in _once(list_volumes(), url, api_key, transport)]

    def refresh(self) -> VolumeInfo:
        """Fetch it again (with the live sandboxes that mount it, in ``info.sandboxes``)."""

        self.info = _once(get_volume(self.name), *self._conn)
        return self.info

    def delete(self) -> None:
        """Delete it and its content; a :class:`~cove.errors.Conflict` while sandboxes mount it."""

        _once(delete_volume(self.name), *self._conn)


class AsyncVolume(_Base):
    """:class:`Volume` for asyncio."""

    @classmethod
    async def create(
        cls,
        name: str,
        *,
        size_mb: int | None = None,
        url: str | None = None,
        api_key: str | None = None,
        transport: Any = None,
    ) -> AsyncVolume:

        return cls(
            await _once_async(create_volume(name, size_mb), url, api_key, transport), url, api_key, transport
        )

    @classmethod
    async def get(
        cls, name: str, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> AsyncVolume:

        return cls(await _once_async(get_volume(name), url, api_key, transport), url, api_key, transport)

    @classmethod
    async def list(
        cls, *, url: str | None = None, api_key: str | None = None, transport: Any = None
    ) -> list[AsyncVolume]:

        return [
            cls(i, url, api_key, transport)
            for i in await _once_async(list_volumes(), url, api_key, transport)
        ]

    async def refresh(self) -> VolumeInfo:

        self.info = await _once_async(get_volume(self.name), *self._conn)
        return self.info

    async def delete(self) -> None:

        await _once_async(delete_volume(self.name), *self._conn)
