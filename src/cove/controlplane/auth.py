"""API keys: random secrets shown once, stored as sha256 hashes, each belonging to a tenant."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from fastapi import Request, WebSocket

from cove.controlplane.errors import ApiError
from cove.store.base import KeyRecord, Store

KEY_PREFIX = "cove_"


@dataclass(frozen=True)
class Caller:
    key_id: str
    tenant: str
    admin: bool


def hash_key(key: str) -> str:
    # Keys are 192-bit random secrets, so a fast hash is as good as a slow one here.
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


async def create_key(
    store: Store, name: str, tenant: str, admin: bool, key: str | None = None
) -> tuple[KeyRecord, str]:
    key = key or new_key()
    rec = KeyRecord(
        id="key_" + secrets.token_hex(6),
        name=name,
        tenant=tenant,
        admin=admin,
        created_at=time.time(),
        hash=hash_key(key),
    )
    await store.insert_key(rec)
    return rec, key


class KeyCache:
    """Known keys by hash, so that authenticating a request costs no database round trip.

    Entries live `ttl` seconds (bounding how long another replica's revocation takes to apply);
    a revocation through this server applies at once.
    """

    def __init__(self, store: Store, ttl: float = 5.0) -> None:
        self.store = store
        self.ttl = ttl
        self._entries: dict[str, tuple[float, KeyRecord]] = {}

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        hit = self._entries.get(key_hash)
        now = time.monotonic()
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        rec = await self.store.key_by_hash(key_hash)
        if rec is None:
            self._entries.pop(key_hash, None)
        else:
            self._entries[key_hash] = (now, rec)
        return rec

    def forget(self, key_id: str) -> None:
        for h, (_, rec) in list(self._entries.items()):
            if rec.id == key_id:
                del self._entries[h]


def _presented_key(request: Request | WebSocket) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key")


async def caller(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller, or 401."""
    key = _presented_key(request)
    if not key:
        raise ApiError(
            401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        )
    rec = await request.app.state.cove.keys.lookup(hash_key(key))
    if rec is None:
        raise ApiError(401, "unauthorized", "invalid API key")
    return Caller(key_id=rec.id, tenant=rec.tenant, admin=rec.admin)


async def websocket_caller(websocket: WebSocket) -> Caller:
    """The caller of a WebSocket: the same keys, also accepted as `?api_key=` (browsers cannot set
    headers on a WebSocket)."""
    key = _presented_key(websocket) or websocket.query_params.get("api_key")  # type: ignore[arg-type]
    if not key:
        raise ApiError(401, "unauthorized", "missing API key")
    rec = await websocket.app.state.cove.keys.lookup(hash_key(key))
    if rec is None:
        raise ApiError(401, "unauthorized", "invalid API key")
    return Caller(key_id=rec.id, tenant=rec.tenant, admin=rec.admin)


async def admin(request: Request) -> Caller:
    who = await caller(request)
    if not who.admin:
        raise ApiError(403, "forbidden", "this call needs an admin API key")
    return who
