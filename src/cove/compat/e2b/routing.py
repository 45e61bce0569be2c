"""Sandbox traffic as e2b routes it: one URL, the target picked per request.

e2b's single-host deployment (and `E2B_SANDBOX_URL`) sends every envd, code-interpreter and port
request to one address with `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers; its hosted form uses host
names `{port}-{sandbox id}.{domain}`. Both select a sandbox and a port here. Port 49983 is envd
(process and filesystem RPC, /files), 49999 the code interpreter, any other port a server listening
inside the sandbox. Requests with neither pass through to cove's own API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from cove import stages
from cove.controlplane.auth import Caller
from cove.store.base import SandboxRecord

if TYPE_CHECKING:
    from cove.controlplane.app import Cove

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
ENVD_VERSION = "0.6.4"  # the envd release whose features cove serves (the SDK gates calls on it)

# `{port}-{sandbox id}.` at the start of a Host header.
_HOST = re.compile(r"^(\d{1,5})-([a-z0-9]{1,64})\.")
_LIVE = ("running", "paused", "hibernated")


@dataclass(frozen=True)
class Target:
    """The sandbox and port one request is for, and which of the sandbox's tokens it presented."""

    sandbox: SandboxRecord  # as looked up when the request arrived (it may be paused)
    port: int
    caller: Caller  # acts as the sandbox's tenant: the token proved access to this sandbox only
    envd_token: bool  # a valid X-Access-Token
    traffic_token: bool  # a valid E2B-Traffic-Access-Token

    @property
    def authorized(self) -> bool:
        return self.envd_token or self.traffic_token


def target(scope: Scope) -> Target:
    """The Target the router resolved for this request (apps below the router only)."""
    return scope["cove.e2b"]


def envd_token(cove: Cove, sandbox_id: str) -> str:
    return cove.signer.token("e2b-envd", sandbox_id)


def traffic_token(cove: Cove, sandbox_id: str) -> str:
    return cove.signer.token("e2b-traffic", sandbox_id)


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """e2b's v1 file URL signature: sha256 over path, operation, user and the envd token."""
    parts = [path, operation, user, token] + ([str(expiration)] if expiration is not None else [])
    digest = hashlib.sha256(":".join(parts).encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def _files_query(scope: Scope) -> dict[str, str] | None:
    """The query of a `/files` request (envd's; cove's own API has no such path), else None."""
    if scope["type"] != "http" or scope["path"] != "/files":
        return None
    return {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}


async def signed_sandbox(cove: Cove, query: dict[str, str], operation: str) -> SandboxRecord | None:
    """The live sandbox whose envd token made this signature, found without its id: with
    E2B_SANDBOX_URL the SDK's signed URLs name no sandbox (no header can go with a URL). The
    signature covers path, operation, user and expiry, so only its sandbox's token reproduces it."""
    exp = query.get("signature_expiration") or None
    try:
        expiration = int(exp) if exp is not None else None
    except ValueError:
        return None
    sig = query["signature"]
    path, user = query.get("path", ""), query.get("username", "")
    for rec in await cove.service.lookup_any(list(_LIVE)):
        if hmac.compare_digest(signature(path, operation, user, envd_token(cove, rec.id), expiration), sig):
            return rec
    return None


async def send_error(send: Send, status: int, message: str, sandbox_id: str | None = None) -> None:
    """An error in the shape e2b's proxy answers with (the SDK matches on its message)."""
    body = json.dumps({"code": status, "message": message, "sandboxId": sandbox_id}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _selector(scope: Scope) -> tuple[str, str] | None:
    sandbox_id = port = None
    host = b""
    for name, value in scope["headers"]:
        if name == b"e2b-sandbox-id":
            sandbox_id = value.decode("latin-1")
        elif name == b"e2b-sandbox-port":
            port = value.decode("latin-1")
        elif name == b"host":
            host = value
    if sandbox_id is not None:
        return sandbox_id, port or str(ENVD_PORT)
    m = _HOST.match(host.decode("latin-1"))
    return (m.group(2), m.group(1)) if m else None


class SandboxRouter:
    """ASGI middleware in front of cove's app: sends sandbox traffic to the app for its port."""

    def __init__(self, app: ASGIApp, cove: Cove, envd: ASGIApp, interpreter: ASGIApp, ports: ASGIApp) -> None:
        self.app = app
        self.cove = cove
        self.envd = envd
        self.interpreter = interpreter
        self.ports = ports

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        selected = _selector(scope) if scope["type"] in ("http", "websocket") else None
        if selected is None and (query := _files_query(scope)) is not None:
            # A file URL without the sandbox's headers: e2b's signed download_url / upload_url.
            if "signature" not in query:
                msg = "unauthorized access: name the sandbox (E2b-Sandbox-Id) or use a signed file URL"
                await send_error(send, 401, msg)
                return
            operation = "write" if scope["method"] == "POST" else "read"
            found = await signed_sandbox(self.cove, query, operation)
            if found is None:
                await send_error(send, 401, "invalid signature: it is for no sandbox of this server")
                return
            selected = (found.id, str(ENVD_PORT))
        if selected is None:
            await self.app(scope, receive, send)
            return
        sandbox_id, port_text = selected
        if scope["type"] == "websocket" and not port_text.isdigit():
            await send({"type": "websocket.close", "code": 1008})
            return
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            await send_error(send, 400, f"invalid sandbox port {port_text!r}", sandbox_id)
            return
        rec = await self.cove.service.lookup(sandbox_id)
        if rec is None or rec.state not in _LIVE:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await send_error(send, 502, f"The sandbox {sandbox_id} was not found", sandbox_id)
            return
        if rec.state in ("paused", "hibernated") and not rec.auto_resume:
            # As e2b's proxy: traffic does not wake a paused sandbox unless it asked for auto-resume.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                msg = f"The sandbox {sandbox_id} was not found: it is paused (connect to resume it)"
                await send_error(send, 502, msg, sandbox_id)
            return
        stages.mark("e2b lookup")
        headers = dict(scope["headers"])
        tgt = Target(
            sandbox=rec,
            port=int(port_text),
            caller=Caller(key_id=f"sandbox:{rec.id}", tenant=rec.tenant, admin=False),
            envd_token=self.cove.signer.check(
                "e2b-envd", rec.id, headers.get(b"x-access-token", b"").decode("latin-1")
            ),
            traffic_token=self.cove.signer.check(
                "e2b-traffic", rec.id, headers.get(b"e2b-traffic-access-token", b"").decode("latin-1")
            ),
        )
        scope = {**scope, "cove.e2b": tgt}
        if tgt.port == ENVD_PORT:
            app = self.envd
        elif tgt.port == INTERPRETER_PORT:
            app = self.interpreter
        else:
            app = self.ports
        await app(scope, receive, send)
