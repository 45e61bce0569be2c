"""The FastAPI application: wiring of store, node, service and routers."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cove import __version__
from cove.compat import e2b
from cove.config import Settings
from cove.controlplane import auth, errors
from cove.controlplane.api import (
    audit,
    commands,
    contexts,
    files,
    keys,
    network,
    pools,
    ports,
    processes,
    quotas,
    sandboxes,
    snapshots,
    system,
    templates,
    urls,
    volumes,
)
from cove.controlplane.metrics import Metrics
from cove.controlplane.pools import Traffic
from cove.controlplane.pools import load as load_pools
from cove.controlplane.service import SandboxService
from cove.controlplane.signing import Signer
from cove.node.base import NodeAgent
from cove.node.local import LocalNode
from cove.store.base import Store
from cove.store.sqlite import SQLiteStore

log = logging.getLogger("cove.server")
access = logging.getLogger("cove.access")


@dataclass
class Cove:
    settings: Settings
    store: Store
    node: NodeAgent
    metrics: Metrics
    service: SandboxService
    keys: auth.KeyCache
    signer: Signer  # access tokens and signed URLs, from $COVE_HOME/secret
    # The key printed at first start (None when keys already existed or came from COVE_API_KEY).
    first_key: str | None = None
    demo_key: str | None = None  # a key for `cove serve --demo`, revoked at shutdown


async def _ensure_keys(cove: Cove) -> None:
    s = cove.settings
    if s.api_key:
        if await cove.store.key_by_hash(auth.hash_key(s.api_key)) is None:
            await auth.create_key(cove.store, "COVE_API_KEY", "default", admin=True, key=s.api_key)
    elif await cove.store.count_keys() == 0:
        _, cove.first_key = await auth.create_key(cove.store, "first key", "default", admin=True)
        log.warning(
            "created the first admin API key; it is shown only now", extra={"api_key": cove.first_key}
        )
        print(f"\n  cove: your admin API key (shown once): {cove.first_key}\n", flush=True)
    if s.demo:
        _, cove.demo_key = await auth.create_key(cove.store, "demo", "default", admin=False)


class AccessLog:
    """One structured log line per request (pure ASGI: BaseHTTPMiddleware costs ~1 ms a request),
    and the count of requests in flight that the pools' refill waits on (`traffic`)."""

    def __init__(self, app: ASGIApp, traffic: Traffic) -> None:
        self.app = app
        self.traffic = traffic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.traffic.begin()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.traffic.end()
            access.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = SQLiteStore(settings.db_path)
    node = LocalNode(settings)
    metrics = Metrics()
    service = SandboxService(settings, store, node, metrics)
    cove = Cove(
        settings, store, node, metrics, service, auth.KeyCache(store), Signer(settings.home / "secret")
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.home.mkdir(parents=True, exist_ok=True)
        # Sandbox roots live below the data dir; their (unprivileged) init must be able to traverse it.
        settings.home.chmod(settings.home.stat().st_mode | 0o111)
        await store.open()
        await node.start()
        await _ensure_keys(cove)
        await cove.service.adopt()
        cove.service.start_reaper()
        for config in await load_pools(store, settings.pools):
            cove.service.pools.configure(config)
        cove.service.pools.start()
        log.info("cove ready", extra={"home": str(settings.home), "version": __version__})
        # What startup built (modules, routes, schemas: most of the heap) is never garbage, and
        # each full collection walked all of it, stalling every request for 30-80 ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await cove.service.stop_reaper()
            await cove.service.audit.close()  # entries still queued are written
            await cove.service.pools.close()  # pooled sandboxes are not anyone's: they go
            await cove.service.egress.close()  # sandboxes keep running; a restart re-opens them
            if cove.demo_key:
                rec = await store.key_by_hash(auth.hash_key(cove.demo_key))
                if rec:
                    await store.delete_key(rec.id)
                    cove.keys.forget(rec.id)
            await node.close()
            await store.close()

    app = FastAPI(
        title="cove",
        version=__version__,
        description="Self-hosted sandboxes for AI agents. Authenticate with `Authorization: Bearer KEY`.",
        lifespan=lifespan,
    )
    app.state.cove = cove
    errors.install_handlers(app)
    for module in (
        system,
        sandboxes,
        network,
        snapshots,
        volumes,
        commands,
        processes,
        contexts,
        files,
        keys,
        audit,
        urls,
        pools,
        quotas,
        templates,
    ):
        app.include_router(module.router)
    app.router.routes.extend(ports.routes)  # raw ASGI endpoints: proxied bodies stream through

    e2b.install(app, cove)
    app.add_middleware(AccessLog, traffic=service.pools.traffic)
    return app
