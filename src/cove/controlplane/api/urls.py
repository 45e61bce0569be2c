"""Signed URLs: `POST /v1/sandboxes/{id}/urls` makes a URL that works without an API key until it
expires, for a port inside the sandbox (browsers, webhooks) or for downloading or uploading one file
(`curl`, a browser, another service). Each signature names what it opens: the sandbox, the port or the
file, the method and the user, so it cannot be reused for anything else.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, model_validator

from cove.controlplane import port_access
from cove.controlplane.auth import Caller, caller
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.schemas import SandboxPath, Strict, UserName
from cove.controlplane.service import SandboxService

from .deps import service

router = APIRouter(tags=["urls"])
Svc = Annotated[SandboxService, Depends(service)]
Who = Annotated[Caller, Depends(caller)]

MAX_EXPIRY = 30 * 86400
_FILE = "file"


class UrlRequest(Strict):
    port: int | None = Field(default=None, ge=1, le=65535, description="a port inside the sandbox")
    file: SandboxPath | None = Field(default=None, description="a file inside the sandbox")
    method: Literal["GET", "PUT"] = Field(
        default="GET", description="for a file: download (GET) or upload (PUT)"
    )
    user: UserName | None = Field(default=None, description="for a file: the user to act as")
    expires_in: int = Field(default=3600, ge=1, le=MAX_EXPIRY, description="seconds the URL stays valid")
    path: str = Field(default="/", pattern=r"^/", max_length=2048, description="for a port: the path to open")

    @model_validator(mode="after")
    def _one_target(self) -> UrlRequest:
        if (self.port is None) == (self.file is None):
            raise ValueError("give exactly one of 'port' and 'file'")
        return self


class SignedUrl(BaseModel):
    url: str = Field(
        description="for a port: by host name, {port}-{id}.{domain}; for a file: on the cove server"
    )
    path_url: str | None = Field(default=None, description="for a port: by path on the cove server")
    expires_at: int = Field(description="unix time")


def _file_subject(sandbox_id: str, method: str, path: str, user: str | None) -> str:
    return f"{sandbox_id}\0{method}\0{path}\0{user or ''}"


@router.post("/v1/sandboxes/{sandbox_id}/urls", response_model=SignedUrl)
async def signed_url(sandbox_id: str, body: UrlRequest, who: Who, svc: Svc, request: Request) -> SignedUrl:
    """A URL for a port or a file of the sandbox that needs no API key until it expires."""
    rec = await svc.get(who, sandbox_id)
    cove = request.app.state.cove
    expires = int(time.time()) + body.expires_in
    base = str(request.base_url).rstrip("/")
    if body.file is not None:
        params = {"path": body.file, **({"user": body.user} if body.user else {})}
        token = cove.signer.sign(_FILE, _file_subject(rec.id, body.method, body.file, body.user), expires)
        query = urlencode({**params, port_access.TOKEN_PARAM: token, port_access.EXPIRES_PARAM: expires})
        return SignedUrl(url=f"{base}/v1/sandboxes/{rec.id}/files?{query}", expires_at=expires)
    assert body.port is not None
    query = urlencode(port_access.sign(cove, rec.id, body.port, expires))
    path = quote(body.path, safe="/%:@!$&'()*+,;=~-._")
    return SignedUrl(
        url=f"{request.url.scheme}://{body.port}-{rec.id}.{cove.settings.public_domain}{path}?{query}",
        path_url=f"{base}/v1/sandboxes/{rec.id}/ports/{body.port}{path}?{query}",
        expires_at=expires,
    )


async def file_caller(request: Request, sandbox_id: str) -> Caller:
    """The caller of a file download or upload: an API key, or a signature for exactly this sandbox,
    method, path and user (a signed URL)."""
    query = request.query_params
    token = query.get(port_access.TOKEN_PARAM)
    if token is None:
        return await caller(request)
    cove = request.app.state.cove
    expires = query.get(port_access.EXPIRES_PARAM, "")
    subject = _file_subject(sandbox_id, request.method, query.get("path", ""), query.get("user"))
    if not expires.isdigit() or not cove.signer.verify(_FILE, subject, token, int(expires)):
        raise ApiError(403, "forbidden", "the signed URL is invalid or has expired")
    rec = await cove.service.lookup(sandbox_id)
    if rec is None:
        raise not_found("sandbox", sandbox_id)
    return Caller(key_id=f"signed:{sandbox_id}", tenant=rec.tenant, admin=False)
