"""The control plane assembled: its parts wired to one store and one node (`assemble`), started
and stopped in order (`start`, `stop`), and cove's own API routes (`install`). The composition
root (`cove.server`) puts this and the front ends (e2b's API) into one application."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cove import __version__, stages
from cove.config import Settings
from cove.controlplane import auth, errors
from cove.controlplane.admission import Admission
from cove.controlplane.api import (
    audit,
    commands,
    contexts,
    files,
    keys,
    network,
    nodes,
    pools,
    ports,
    processes,
    quotas,
    sandboxes,
    snapshots,
    system,
    templates,
    urls,
    usage,
    volumes,
)
from cove.controlplane.audit import AuditLog
from cove.controlplane.fleet import Fleet
from cove.controlplane.layer_refs import LayerRefs
from cove.controlplane.metrics import Metrics
from cove.controlplane.pools import Pools, Traffic
from cove.controlplane.pools import load as load_pools
from cove.controlplane.quotas import Quotas
from cove.controlplane.reaper import Reaper
from cove.controlplane.service import SandboxService
from cove.controlplane.signing import Signer
from cove.controlplane.snapshots import Snapshots
from cove.controlplane.sources import Sources
from cove.controlplane.starter import Starter
from cove.controlplane.templates import Templates
from cove.controlplane.usage import Usage
from cove.controlplane.volumes import Volumes
from cove.node.base import NodeAgent
from cove.node.local import LocalNode
from cove.store.base import Store
from cove.store.factory import make_store

log = logging.getLogger("cove.server")
access = logging.getLogger("cove.access")


@dataclass
class Cove:
    settings: Settings
    store: Store
    node: NodeAgent  # this server's own
    fleet: Fleet  # every node, this one included (docs/fleet.md)
    metrics: Metrics
    service: SandboxService  # the sandbox lifecycle
    snapshots: Snapshots
    templates: Templates
    pools: Pools
    volumes: Volumes
    refs: LayerRefs
    reaper: Reaper
    keys: auth.KeyCache
    sessions: auth.Sessions  # the web console's sign-ins (docs/console.md)
    usage: Usage  # a short history of each sandbox's resource use (GET /v1/sandboxes/{id}/metrics)
    signer: Signer  # access tokens and signed URLs, from $COVE_HOME/secret
    # The key printed at first start (None when keys already existed or came from COVE_API_KEY).
    first_key: str | None = None
    demo_key: str | None = None  # a key for `cove serve --demo`, revoked at shutdown
    kubelet: Any = None  # cove.kube.kubelet.Kubelet, when COVE_KUBECONFIG makes this a Kubernetes node


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
        stamps = stages.begin()  # None unless COVE_TRACE_STAGES=1

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if stamps is not None:
                    stamps.append(("output", time.perf_counter()))
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (stages.HEADER, stages.header(stamps))],
                    }
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
                    # every stage, those after the headers too (a stream's): COVE_TRACE_STAGES=1 only
                    **({"stages": stages.header(stamps).decode()} if stamps is not None else {}),
                },
            )


def assemble(settings: Settings) -> Cove:
    """Every part of the control plane, each given the parts it works with (no part builds another)."""
    store = make_store(settings.store_location)
    metrics = Metrics()
    node = LocalNode(settings, lambda result: metrics.egress.labels(result).inc())
    admission = Admission(settings, metrics.registry)
    fleet = Fleet(settings, store, node, admission)
    volumes = Volumes(settings, store, fleet)
    refs = LayerRefs(store, node)
    starter = Starter(settings, node, admission)
    sources = Sources(store, node)
    pools = Pools(  # docs/pools.md
        starter, sources, refs, settings.pool_idle, metrics.registry, fleet.api_replicas, lambda: fleet.id
    )
    templates = Templates(store, fleet, starter, sources, refs)
    service = SandboxService(
        settings, store, fleet, metrics, starter, sources, refs, pools, volumes, Quotas(store), admission,
        AuditLog(store, settings.audit_retention_days),
    )  # fmt: skip
    keys = auth.KeyCache(store)
    return Cove(
        settings=settings,
        store=store,
        node=node,
        fleet=fleet,
        metrics=metrics,
        service=service,
        snapshots=Snapshots(settings, service, sources, refs, volumes),
        templates=templates,
        pools=pools,
        volumes=volumes,
        refs=refs,
        reaper=Reaper(settings, service, templates, volumes, refs),
        keys=keys,
        sessions=auth.Sessions(store, keys),
        usage=Usage(settings, service),
        signer=Signer(settings.home / "secret"),  # access tokens and signed URLs
    )


async def _sync_pools(cove: Cove) -> None:
    await cove.pools.sync(await load_pools(cove.store, cove.settings.pools))


async def start(cove: Cove, api: bool = True) -> None:
    """`api`: this process serves cove's API (False for `cove node`: then it makes no keys)."""
    s = cove.settings
    s.home.mkdir(parents=True, exist_ok=True)
    # Sandbox roots live below the data dir; their (unprivileged) init must be able to traverse it.
    s.home.chmod(s.home.stat().st_mode | 0o111)
    await cove.store.open()
    await cove.node.start()
    await cove.fleet.start(api)
    if api:
        await _ensure_keys(cove)
    await cove.reaper.adopt()
    cove.reaper.start()
    if s.kubeconfig:  # imported here: the control plane needs no Kubernetes client unless asked to be a node
        from cove.kube.kubelet import Kubelet

        cove.kubelet = Kubelet(cove, s.kubeconfig)
        await cove.kubelet.start()
    for config in await load_pools(cove.store, s.pools):
        cove.pools.configure(config)
    cove.pools.start()
    if api:
        cove.usage.start()
    if cove.fleet.shared and api:  # other servers may change the pools' configs
        cove.fleet.every_beat(lambda: _sync_pools(cove))
    log.info("cove ready", extra={"home": str(s.home), "version": __version__})


async def stop(cove: Cove) -> None:
    if cove.kubelet:
        await cove.kubelet.close()
    await cove.usage.close()
    await cove.reaper.stop()
    await cove.service.durability.close()  # a periodic copy cut short is never recorded
    await cove.refs.close()
    await cove.service.audit.close()  # entries still queued are written
    await cove.pools.close()  # pooled sandboxes are not anyone's: they go
    if cove.demo_key:
        rec = await cove.store.key_by_hash(auth.hash_key(cove.demo_key))
        if rec:
            await cove.store.delete_key(rec.id)
            cove.keys.forget(rec.id)
    await cove.fleet.close()
    await cove.node.close()
    await cove.store.close()


def install(app: FastAPI, cove: Cove) -> None:
    """cove's own API (/v1) and its error handlers."""
    app.state.cove = cove
    errors.install_handlers(app)
    for module in (
        system,
        usage,  # before sandboxes: /v1/sandboxes/metrics is no sandbox id
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
        nodes,
        urls,
        pools,
        quotas,
        templates,
    ):
        app.include_router(module.router)
    app.router.routes.extend(ports.routes)  # raw ASGI endpoints: proxied bodies stream through
    # raw ASGI too, ahead of the rest: the exec round trip's and the pool claim's hot paths
    app.router.routes[:0] = [*commands.fast_routes, *sandboxes.fast_routes]
