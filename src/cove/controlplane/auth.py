"""API keys: random secrets shown once, stored as sha256 hashes, each belonging to a tenant; and
browser sessions (the web console's): a server-side session id in an HttpOnly, SameSite=Strict
cookie standing for a key, with a CSRF token that every state-changing request must echo."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import Request, WebSocket

from cove.controlplane.errors import ApiError
from cove.store.base import KeyRecord, Store

KEY_PREFIX = "cove_"
SESSION_COOKIE = "cove_session"  # the console's session id (never the key itself)
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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


@dataclass
class Session:
    """A signed-in browser: which key it stands for (by hash: the key itself is not kept), and the
    CSRF token its pages echo in `X-CSRF-Token`."""

    id: str
    key_hash: str
    csrf: str
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)


class Sessions:
    """Console sessions, in this server's memory: a restart signs every browser out (they sign in
    again with their key). A session ends at sign-out, after `idle` seconds unused, after `lifetime`
    seconds, or as soon as its key is revoked (every use looks the key up again)."""

    def __init__(self, keys: KeyCache, idle: float = 8 * 3600, lifetime: float = 7 * 86400) -> None:
        self.keys = keys
        self.idle = idle
        self.lifetime = lifetime
        self._by_id: dict[str, Session] = {}

    def create(self, key_hash: str) -> Session:
        self._expire()
        session = Session(id=secrets.token_urlsafe(32), key_hash=key_hash, csrf=secrets.token_urlsafe(32))
        self._by_id[hash_key(session.id)] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(hash_key(session_id))
        if session is None:
            return None
        if time.monotonic() - session.last_used > self.idle or time.time() - session.created > self.lifetime:
            self._by_id.pop(hash_key(session_id), None)
            return None
        session.last_used = time.monotonic()
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(hash_key(session_id), None)

    def _expire(self) -> None:
        now, wall = time.monotonic(), time.time()
        for k, s in list(self._by_id.items()):
            if now - s.last_used > self.idle or wall - s.created > self.lifetime:
                del self._by_id[k]

    async def caller(self, session: Session) -> Caller | None:
        """The caller a session stands for, or None once its key is gone."""
        rec = await self.keys.lookup(session.key_hash)
        if rec is None:
            self._by_id.pop(hash_key(session.id), None)
            return None
        return Caller(key_id=rec.id, tenant=rec.tenant, admin=rec.admin)


def same_origin(request: Request | WebSocket) -> bool:
    """Does the request's Origin (when the browser sent one) name this server's own host?"""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc.lower() == host.lower()


async def session_caller(request: Request | WebSocket, csrf: str | None) -> Caller:
    """The caller of a request authenticated by the console's session cookie. `csrf`: the token the
    request presented (None on safe methods, which need none); a missing or wrong one is 403."""
    sessions: Sessions = request.app.state.cove.sessions
    session = sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise ApiError(401, "unauthorized", "the console session has ended: sign in again")
    if csrf is not None and not (csrf and hmac.compare_digest(csrf, session.csrf)):
        raise ApiError(403, "csrf_failed", "missing or wrong X-CSRF-Token for this session")
    if not same_origin(request):
        raise ApiError(403, "csrf_failed", "cross-origin request with the console's session refused")
    who = await sessions.caller(session)
    if who is None:
        raise ApiError(401, "unauthorized", "the console session's API key was revoked: sign in again")
    return who


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
    if not key and SESSION_COOKIE in request.cookies:  # the web console (docs/console.md)
        safe = request.method in SAFE_METHODS
        return await session_caller(request, None if safe else request.headers.get(CSRF_HEADER, ""))
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
    headers on a WebSocket), or the console's session cookie with its CSRF token as `?csrf=` (a
    WebSocket is never a safe method: its other end can act)."""
    key = _presented_key(websocket) or websocket.query_params.get("api_key")  # type: ignore[arg-type]
    if not key and SESSION_COOKIE in websocket.cookies:
        return await session_caller(websocket, websocket.query_params.get("csrf", ""))
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
