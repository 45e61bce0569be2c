"""Code contexts: stateful interpreters (Jupyter kernels, bash) in a sandbox.

The service half of cove's `/contexts` and `/code` API, shared with the e2b code interpreter. A
context is a background process of the sandbox: the kernel bridge (`cove/guest/kernel_bridge.py`)
running under the kernel environment's Python, as the sandbox's user, with its socket in a directory
only that user can reach. Contexts survive hibernate/resume and forks like any process; what cove
knows of them is in the process's tag (`context:{id}:{language}`) and argv.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from cove.controlplane.errors import ApiError
from cove.controlplane.service import SandboxService
from cove.node.guest_client import GuestError, GuestUnavailable
from cove.store.base import SandboxRecord

PYTHON = "/opt/cove/kernel/bin/python"
TAG = "context:"
LANGUAGES = ("python", "bash", "javascript", "typescript", "r", "java")
STOP_GRACE = 5.0  # seconds a stopped context may take to shut its interpreter down

# One start at a time per (sandbox, context): two first calls must not start two default contexts.
_starting: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Context:
    id: str
    language: str
    process_id: str
    cwd: str | None


def default_id(language: str) -> str:
    return f"default-{language}"


def _argument(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[i + 1]
    return None


async def list_contexts(svc: SandboxService, rec: SandboxRecord) -> list[Context]:
    async with svc.guest_errors(rec):
        procs = await svc.guest(rec).processes()
    out = []
    for p in procs:
        tag = p.get("tag") or ""
        if tag.startswith(TAG) and p.get("running"):
            _, ctx, language = tag.split(":", 2)
            out.append(Context(ctx, language, p["id"], _argument(p.get("argv") or [], "--cwd")))
    return out


async def find(svc: SandboxService, rec: SandboxRecord, context_id: str) -> Context:
    for ctx in await list_contexts(svc, rec):
        if ctx.id == context_id:
            return ctx
    raise ApiError(404, "context_not_found", f"code context {context_id!r} not found in sandbox {rec.id}")


async def start(
    svc: SandboxService,
    rec: SandboxRecord,
    context_id: str,
    language: str,
    cwd: str | None,
    env: dict[str, str],
    user: str | None,
) -> Context:
    """Start the bridge for a new context and wait until its interpreter answers."""
    status = svc.node_of(rec).contexts.status
    if status != "ready":
        raise ApiError(503, "kernel_unavailable", f"code contexts are not available on this node: {status}")
    user = user or rec.user
    cwd = cwd or rec.workdir
    try:
        sock = await svc.node_of(rec).contexts.prepare(rec.id, context_id, user)
    except (OSError, ValueError) as e:
        raise ApiError(400, "invalid", f"cannot prepare a context for user {user!r}: {e}") from e
    argv = [PYTHON, "/run/cove/kernel_bridge.py", "--socket", sock, "--cwd", cwd]
    argv += ["--env-json", json.dumps(env), "--language", language]
    async with svc.guest_errors(rec):
        proc = await svc.guest(rec).spawn(argv=argv, user=user, tag=f"{TAG}{context_id}:{language}")
    bridge = svc.node_of(rec).contexts.client(rec.id, context_id)
    deadline = time.monotonic() + 60
    while True:  # the interpreter takes a moment to start
        try:
            await bridge.call("ping")
            return Context(context_id, language, proc["id"], cwd)
        except (GuestUnavailable, GuestError):
            pass
        info = next((p for p in await svc.guest(rec).processes() if p["id"] == proc["id"]), {})
        if not info.get("running", True) or time.monotonic() > deadline:
            detail = "it exited" if not info.get("running", True) else "it did not answer in 60 s"
            hint = (
                ""
                if info.get("running", True)
                else " (a sandbox started before the kernel environment was ready lacks it: start a new one)"
            )
            raise ApiError(503, "context_failed", f"the {language} context could not start: {detail}{hint}")
        await asyncio.sleep(0.05)


async def ensure_default(svc: SandboxService, rec: SandboxRecord, language: str) -> Context:
    """The sandbox's default context for `language`, started on first use."""
    context_id = default_id(language)
    key = (rec.id, context_id)
    lock = _starting.get(key)
    if lock is None:
        lock = _starting[key] = asyncio.Lock()
    async with lock:
        for ctx in await list_contexts(svc, rec):
            if ctx.id == context_id:
                return ctx
        return await start(svc, rec, context_id, language, None, {}, None)


async def stop(svc: SandboxService, rec: SandboxRecord, ctx: Context) -> None:
    """Stop the interpreter; its variables are gone. Returns once it has exited (a context that is
    gone is not listed any more)."""
    guest = svc.guest(rec)
    async with svc.guest_errors(rec):
        await guest.signal(ctx.process_id, "SIGTERM")
        if (await guest.wait(ctx.process_id, timeout=STOP_GRACE)).get("running"):
            await guest.signal(ctx.process_id, "SIGKILL")
            await guest.wait(ctx.process_id, timeout=STOP_GRACE)


async def restart(svc: SandboxService, rec: SandboxRecord, ctx: Context) -> None:
    """A fresh interpreter in the same context (after it died, or to clear its state)."""
    try:
        await svc.node_of(rec).contexts.client(rec.id, ctx.id).call("restart")
    except (GuestError, GuestUnavailable) as e:
        raise ApiError(503, "context_failed", f"restarting context {ctx.id} failed: {e}") from e


def run(
    svc: SandboxService,
    rec: SandboxRecord,
    context_id: str,
    code: str,
    timeout: float | None,
    env: dict[str, str] | None = None,
    run_id: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The bridge's events for one run (see kernel_bridge.py): stdout/stderr/result events, then
    `{"ok": true, "error", "execution_count"}`. A dead interpreter raises GuestError `kernel_died`;
    an unreachable bridge GuestUnavailable. `env` is set for this run only; `run_id` lets
    `interrupt` stop it."""
    fields: dict[str, Any] = {"code": code, "timeout": timeout}
    if env:
        fields["env"] = env
    if run_id:
        fields["id"] = run_id
    return svc.node_of(rec).contexts.client(rec.id, context_id).events("run", **fields)


async def interrupt(svc: SandboxService, rec: SandboxRecord, context_id: str, run_id: str) -> bool:
    """Interrupt run `run_id` if it is still the one running (its client went away)."""
    try:
        reply = await svc.node_of(rec).contexts.client(rec.id, context_id).call("interrupt", id=run_id)
    except (GuestError, GuestUnavailable):
        return False
    return bool(reply.get("interrupted"))
