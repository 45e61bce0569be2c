"""/v1/keys: API keys (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from cove.controlplane.auth import Caller, admin, create_key
from cove.controlplane.errors import not_found
from cove.controlplane.schemas import CreateKey, KeyList, KeyOut, NewKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Admin = Annotated[Caller, Depends(admin)]


@router.post("", status_code=201, response_model=NewKey)
async def new_key(body: CreateKey, request: Request, _: Admin) -> NewKey:
    """Create a key for a tenant. The secret is in this response only; cove keeps its hash."""
    rec, secret = await create_key(request.app.state.cove.store, body.name, body.tenant, body.admin)
    return NewKey(**KeyOut.of(rec).model_dump(), key=secret)


@router.get("", response_model=KeyList)
async def list_keys(request: Request, _: Admin) -> KeyList:
    return KeyList(items=[KeyOut.of(k) for k in await request.app.state.cove.store.list_keys()])


@router.delete("/{key_id}", status_code=204)
async def delete_key(key_id: str, request: Request, _: Admin) -> Response:
    """Revoke a key at once."""
    if not await request.app.state.cove.store.delete_key(key_id):
        raise not_found("key", key_id)
    request.app.state.cove.keys.forget(key_id)
    return Response(status_code=204)
