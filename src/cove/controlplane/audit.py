"""The audit log (docs/tenants.md): who did which lifecycle action to what, and how it ended.

Entries are queued by `record` and written by one background task in batches (one transaction
per batch), so an audited call never waits for the database: the request path costs an append to a
list. Only lifecycle actions are audited (create, kill, pause, resume, hibernate, snapshot, fork,
network, keys, volumes, templates, quotas), never exec or file calls. Reads (`GET /v1/audit`) flush
the queue first, so a caller sees its own actions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cove.controlplane.auth import Caller
from cove.controlplane.errors import ApiError
from cove.store.base import AuditEntry, Store

log = logging.getLogger("cove.audit")

PRUNE_EVERY = 3600.0  # seconds between deletions of entries older than the retention
# Set while an audited action runs: the actions it makes on its own behalf (a fork's internal
# snapshot and its children's creates) are part of it, not entries of their own.
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("cove_audit_inside", default=False)

T = TypeVar("T")
_BY_STATE = {
    "killed": "sandbox.kill",
    "paused": "sandbox.pause",
    "hibernated": "sandbox.hibernate",
    "running": "sandbox.resume",
    "error": "sandbox.error",
    "lost": "sandbox.lost",
}


@dataclass
class Note:
    """What an audited block acted on; it may name the object it made once it has."""

    obj: str
    sandbox: str | None
    detail: dict[str, Any]


class AuditLog:
    def __init__(self, store: Store, retention_days: float = 90.0) -> None:
        self.store = store
        self.retention = retention_days * 86400
        self._queue: list[AuditEntry] = []
        self._wake = asyncio.Event()
        self._recorded = 0  # entries ever queued
        self._written = 0  # entries ever handed to the store (written or given up on)
        self._done = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = 0.0

    def record(
        self,
        who: Caller | None,
        action: str,
        obj: str,
        outcome: str = "ok",
        *,
        sandbox: str | None = None,
        tenant: str | None = None,
        **detail: Any,
    ) -> None:
        """Queue an entry. `who` None: the server itself (a timeout, an idle policy)."""
        self._queue.append(
            AuditEntry(
                time=time.time(),
                tenant=tenant if tenant is not None else (who.tenant if who else ""),
                key_id=who.key_id if who else "",
                action=action,
                object=obj,
                outcome=outcome,
                sandbox=sandbox,
                detail={k: v for k, v in detail.items() if v is not None},
            )
        )
        self._recorded += 1
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="cove-audit")

    @contextlib.asynccontextmanager
    async def action(
        self, who: Caller | None, action: str, obj: str, *, sandbox: str | None = None, **detail: Any
    ) -> AsyncIterator[Note]:
        """Record `action` with the outcome of the block: "ok", the ApiError's code, or "error".
        The block may change the yielded note (what it made is known only at the end)."""
        note = Note(obj, sandbox, dict(detail))
        outcome = "ok"
        token = _inside.set(True)
        try:
            yield note
        except ApiError as e:
            outcome = e.code
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as e:
            outcome = "error"
            note.detail["error"] = type(e).__name__
            raise
        finally:
            _inside.reset(token)
            self.record(who, action, note.obj, outcome, sandbox=note.sandbox, **note.detail)

    def transition(self, tenant: str, sandbox_id: str, old: str, new: str, reason: str | None) -> None:
        """A state change the server made on its own (a timeout, an idle policy, a sandbox found
        dead, adoption after a restart); changes made inside an audited action are part of it."""
        if _inside.get() or (new == "running" and old not in ("paused", "hibernated")):
            return
        action = _BY_STATE.get(new)
        if action:
            self.record(
                None, action, f"sandbox/{sandbox_id}", sandbox=sandbox_id, tenant=tenant, reason=reason
            )

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if batch:
                try:
                    await self.store.insert_audit(batch)
                except Exception:
                    # Never let the audit log stop the server; the lines say what was lost.
                    log.exception("writing %d audit entries failed", len(batch))
                    for e in batch:
                        log.warning("audit entry lost", extra={"action": e.action, "object": e.object})
            async with self._done:
                self._written += len(batch)
                self._done.notify_all()
            if time.time() - self._pruned_at > PRUNE_EVERY and self.retention > 0:
                self._pruned_at = time.time()
                with contextlib.suppress(Exception):
                    await self.store.prune_audit(time.time() - self.retention)

    async def flush(self) -> None:
        """Return once every entry recorded before this call is written."""
        target = self._recorded
        if self._written >= target or self._task is None:
            return
        async with self._done:
            await self._done.wait_for(lambda: self._written >= target or self._task is None)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def audited(
    action: str,
    describe: Callable[[Any, Any], tuple[str, str | None, dict[str, Any]]] | None = None,
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Audit a service method `(self, who, sandbox_id, ...)`; `describe(arg, result)` names the
    object, its sandbox and details when they are not simply the sandbox (`arg`: the third
    argument, `result`: None on failure). Nested audited calls are part of the outer action."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def inner(self: Any, who: Caller, arg: Any, *args: Any, **kwargs: Any) -> T:
            if _inside.get():
                return await fn(self, who, arg, *args, **kwargs)
            obj, sandbox, detail = describe(arg, None) if describe else (f"sandbox/{arg}", arg, {})
            async with self.audit.action(who, action, obj, sandbox=sandbox, **detail) as note:
                result = await fn(self, who, arg, *args, **kwargs)
                if describe:
                    note.obj, note.sandbox, more = describe(arg, result)
                    note.detail.update(more)
            return result

        return inner

    return wrap


# -- what the service's audited methods acted on: (object, sandbox, details) ------------------------
def created(req: Any, rec: Any) -> tuple[str, str | None, dict[str, Any]]:
    source = {"snapshot": req.snapshot} if req.snapshot else {"template": req.template}
    if rec is None:
        return "sandbox/", None, source
    return f"sandbox/{rec.id}", rec.id, source


def snapshotted(sandbox_id: str, snap: Any) -> tuple[str, str | None, dict[str, Any]]:
    if snap is None:
        return "snapshot/", sandbox_id, {}
    return f"snapshot/{snap.id}", sandbox_id, {"memory": snap.memory, "name": snap.name}


def snapshot_deleted(snapshot_id: str, _: Any) -> tuple[str, str | None, dict[str, Any]]:
    return f"snapshot/{snapshot_id}", None, {}


def forked(sandbox_id: str, result: Any) -> tuple[str, str | None, dict[str, Any]]:
    if result is None:
        return f"sandbox/{sandbox_id}", sandbox_id, {}
    children, memory = result
    return f"sandbox/{sandbox_id}", sandbox_id, {"children": [c.id for c in children], "memory": memory}


def network_set(sandbox_id: str, rec: Any) -> tuple[str, str | None, dict[str, Any]]:
    mode = rec.network.get("mode", "none") if rec is not None else None
    return f"sandbox/{sandbox_id}", sandbox_id, {"mode": mode}
