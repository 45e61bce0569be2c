"""Who may reach a port inside a sandbox, and signed URLs that let a browser in.

A request to a sandbox's port (by path, `/v1/sandboxes/{id}/ports/{port}/…`, or by host name,
`{port}-{id}.{domain}`) is let through when
- the sandbox's ports are public (`network.public_traffic`, e2b's default; cove's is off),
- it carries an API key of the sandbox's tenant (`Authorization: Bearer` or `X-API-Key`),
- its query has a valid signature for this sandbox and port (`cove_token`, `cove_expires`), made by
  `POST /v1/sandboxes/{id}/urls`; the answer then sets a cookie, so the page's own links and
  requests (which do not repeat the query) keep working until the signature expires,
- or it carries that cookie.
Cove's credentials are removed before the request reaches the sandbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from starlette.types import Message, Scope, Send

from cove.controlplane.auth import SESSION_COOKIE, hash_key
from cove.store.base import SandboxRecord

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

TOKEN_PARAM = "cove_token"
EXPIRES_PARAM = "cove_expires"
COOKIE = "cove_port"
_PURPOSE = "port"
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def sign(cove: Cove, sandbox_id: str, port: int, expires: int) -> dict[str, str]:
    """The query parameters that open `port` of the sandbox until the unix time `expires`."""
    token = cove.signer.sign(_PURPOSE, f"{sandbox_id}:{port}", expires)
    return {TOKEN_PARAM: token, EXPIRES_PARAM: str(expires)}


@dataclass(frozen=True)
class Grant:
    """A request allowed through, and how to pass it on: the scope without cove's credentials, and
    a cookie to set on the response (after a signed URL)."""

    scope: Scope
    cookie: str | None = None

    def wrap(self, send: Send) -> Send:
        if self.cookie is None:
            return send
        cookie = self.cookie.encode()

        async def send_with_cookie(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return send_with_cookie


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def api_key(scope: Scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return _header(scope, b"x-api-key")


def _without_cookie(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The headers without cove's cookies (its port grant and the console's session)."""
    headers = []
    for k, v in scope["headers"]:
        if k.lower() == b"cookie":
            kept = [
                c
                for c in v.decode("latin-1").split(";")
                if c.strip().split("=", 1)[0] not in (COOKIE, SESSION_COOKIE)
            ]
            if not any(c.strip() for c in kept):
                continue
            v = ";".join(kept).strip().encode("latin-1")
        headers.append((k, v))
    return headers


def _valid(cove: Cove, rec: SandboxRecord, port: int, token: str | None, expires: str | None) -> int | None:
    """The expiry of a valid signature, else None."""
    if not token or not expires or not expires.isdigit():
        return None
    exp = int(expires)
    return exp if cove.signer.verify(_PURPOSE, f"{rec.id}:{port}", token, exp) else None


async def authorize(
    cove: Cove, rec: SandboxRecord, port: int, scope: Scope, cookie_path: str = "/"
) -> Grant | None:
    """A Grant if this request may reach `port` of the sandbox `rec`, else None."""
    headers = _without_cookie(scope)
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    signed = dict(query)
    expiry = _valid(cove, rec, port, signed.get(TOKEN_PARAM), signed.get(EXPIRES_PARAM))
    if expiry is not None:
        rest = [(k, v) for k, v in query if k not in (TOKEN_PARAM, EXPIRES_PARAM)]
        max_age = max(expiry - int(time.time()), 0)
        value = f"{signed[TOKEN_PARAM]}.{expiry}"
        cookie = f"{COOKIE}={value}; Path={cookie_path}; Max-Age={max_age}; HttpOnly; SameSite=Lax"
        stripped = {**scope, "headers": headers, "query_string": urlencode(rest).encode()}
        return Grant(stripped, cookie)
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(_header(scope, b"cookie") or "")
    except Exception:  # a malformed Cookie header is no credential
        jar = SimpleCookie()
    if COOKIE in jar:
        token, _, expires = jar[COOKIE].value.rpartition(".")
        if _valid(cove, rec, port, token, expires) is not None:
            return Grant({**scope, "headers": headers})
    key = api_key(scope)
    if key:
        found = await cove.keys.lookup(hash_key(key))
        if found is not None and found.tenant == rec.tenant:
            kept = [(k, v) for k, v in headers if k.lower() not in CREDENTIAL_HEADERS]
            return Grant({**scope, "headers": kept})
    if rec.network.get("public_traffic") is True:
        return Grant({**scope, "headers": headers})
    return None
