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

from cove import stages
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
    CSRF token its pages echo in `X-CSRF-Token`. Times are unix seconds."""

    key_hash: str
    csrf: str
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    saved_use: float = 0.0  # the last_used the store holds

    def doc(self) -> dict[str, object]:
        return {
            "key_hash": self.key_hash,
            "csrf": self.csrf,
            "created": self.created,
            "last_used": self.last_used,
        }


class Sessions:
    """Console sessions, kept in the store (settings `console_session:<sha256 of the id>`), so they
    survive a restart and every API replica of a shared store knows them; each replica caches one
    for `ttl` seconds (bounding how long a sign-out elsewhere takes to apply here). A session ends at
    sign-out, after `idle` seconds unused, after `lifetime` seconds, or as soon as its key is revoked
    (every use looks the key up again)."""

    PREFIX = "console_session:"

    def __init__(
        self,
        store: Store,
        keys: KeyCache,
        idle: float = 8 * 3600,
        lifetime: float = 7 * 86400,
        ttl: float = 5.0,
    ) -> None:
        self.store = store
        self.keys = keys
        self.idle = idle
        self.lifetime = lifetime
        self.ttl = ttl
        self._cache: dict[str, tuple[float, Session]] = {}
        self._swept = 0.0

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.last_used > self.idle or now - s.created > self.lifetime

    async def create(self, key_hash: str) -> tuple[str, Session]:
        """A new session: its id (for the cookie; stored only hashed) and the session."""
        await self._sweep()
        session_id = secrets.token_urlsafe(32)
        session = Session(key_hash=key_hash, csrf=secrets.token_urlsafe(32))
        session.saved_use = session.last_used
        h = hash_key(session_id)
        await self.store.put_setting(self.PREFIX + h, session.doc())
        self._cache[h] = (time.monotonic(), session)
        return session_id, session

    async def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        h = hash_key(session_id)
        hit = self._cache.get(h)
        mono = time.monotonic()
        if hit and mono - hit[0] < self.ttl:
            session = hit[1]
        else:
            doc = await self.store.get_setting(self.PREFIX + h)
            if not isinstance(doc, dict):
                self._cache.pop(h, None)
                return None
            session = Session(
                key_hash=str(doc["key_hash"]),
                csrf=str(doc["csrf"]),
                created=float(doc["created"]),
                last_used=max(float(doc["last_used"]), hit[1].last_used if hit else 0.0),
                saved_use=float(doc["last_used"]),
            )
            self._cache[h] = (mono, session)
        now = time.time()
        if self._expired(session, now):
            await self.end(session_id)
            return None
        session.last_used = now
        if now - session.saved_use > 300:  # idle time is kept to the nearest 5 minutes
            session.saved_use = now
            await self.store.put_setting(self.PREFIX + h, session.doc())
        return session

    async def end(self, session_id: str | None) -> None:
        if session_id:
            h = hash_key(session_id)
            self._cache.pop(h, None)
            await self.store.delete_setting(self.PREFIX + h)

    async def _sweep(self) -> None:
        """Forget expired sessions (at most hourly, at a sign-in)."""
        now = time.time()
        if now - self._swept < 3600:
            return
        self._swept = now
        for key, doc in (await self.store.list_settings(self.PREFIX)).items():
            try:
                expired = (
                    now - float(doc["last_used"]) > self.idle or now - float(doc["created"]) > self.lifetime
                )
            except (TypeError, KeyError, ValueError):
                expired = True
            if expired:
                await self.store.delete_setting(key)
        for h, (_, s) in list(self._cache.items()):
            if self._expired(s, now):
                del self._cache[h]

    async def caller(self, session: Session) -> Caller | None:
        """The caller a session stands for, or None once its key is gone."""
        rec = await self.keys.lookup(session.key_hash)
        if rec is None:
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
    session = await sessions.get(request.cookies.get(SESSION_COOKIE))
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
    stages.mark("auth")
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
