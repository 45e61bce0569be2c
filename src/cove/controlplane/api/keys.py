"""/v1/keys: API keys (admin keys only): create, list, revoke, rotate. Every change is audited."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from cove.controlplane import auth
from cove.controlplane.auth import Caller, admin, create_key
from cove.controlplane.errors import ApiError, not_found
from cove.controlplane.schemas import CreateKey, KeyList, KeyOut, NewKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])
Admin = Annotated[Caller, Depends(admin)]


@router.post("", status_code=201, response_model=NewKey)
async def new_key(body: CreateKey, request: Request, who: Admin) -> NewKey:
    """Create a key for a tenant. The secret is in this response only; cove keeps its hash."""
    cove = request.app.state.cove
    async with cove.service.audit.action(who, "key.create", "key/", for_tenant=body.tenant) as note:
        rec, secret = await create_key(cove.store, body.name, body.tenant, body.admin)
        note.obj, note.detail["admin"] = f"key/{rec.id}", rec.admin
    return NewKey(**KeyOut.of(rec).model_dump(), key=secret)


@router.get("", response_model=KeyList)
async def list_keys(
    request: Request, _: Admin, tenant: Annotated[str | None, Query(max_length=64)] = None
) -> KeyList:
    """Every tenant's keys (never their secrets); `tenant` for one tenant's."""
    return KeyList(items=[KeyOut.of(k) for k in await request.app.state.cove.store.list_keys(tenant)])


@router.delete("/{key_id}", status_code=204)
async def delete_key(key_id: str, request: Request, who: Admin) -> Response:
    """Revoke a key: at once on this server, within a few seconds on others sharing its store.
    The last admin key cannot be revoked (409): nobody could manage keys after it."""
    cove = request.app.state.cove
    async with cove.service.audit.action(who, "key.revoke", f"key/{key_id}"):
        keys = await cove.store.list_keys()
        target = next((k for k in keys if k.id == key_id), None)
        if target is None:
            raise not_found("key", key_id)
        if target.admin and sum(k.admin for k in keys) == 1:
            raise ApiError(409, "last_admin_key", f"{key_id} is the only admin key; create another first")
        await cove.store.delete_key(key_id)
        cove.keys.forget(key_id)
    return Response(status_code=204)


@router.post("/{key_id}/rotate", response_model=NewKey)
async def rotate_key(key_id: str, request: Request, who: Admin) -> NewKey:
    """A new secret for the key (same id, name, tenant and rights); the old secret stops working
    at once on this server and within a few seconds on others sharing its store."""
    cove = request.app.state.cove
    async with cove.service.audit.action(who, "key.rotate", f"key/{key_id}"):
        secret = auth.new_key()
        rec = await cove.store.update_key_hash(key_id, auth.hash_key(secret))
        if rec is None:
            raise not_found("key", key_id)
        cove.keys.forget(key_id)
    return NewKey(**KeyOut.of(rec).model_dump(), key=secret)
