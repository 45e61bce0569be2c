"""The composition root: one application with the control plane and its front ends (cove's API,
e2b's and the web console), and `cove serve`, which runs it (optionally with a demo against it).

Only this module knows every part: the control plane never imports a front end, and the node
never imports the control plane (the import contracts in pyproject.toml hold them to that)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from cove import __version__, console
from cove.compat import e2b
from cove.config import Settings
from cove.controlplane import app as controlplane
from cove.controlplane import logs

# Seconds an idle keep-alive connection stays open. uvicorn's default (5 s) equals httpx's
# keepalive_expiry (5 s): a client reusing a connection just before its own expiry could send on it
# just as the server closed it, and got httpx.ReadError (connection reset), most under load, when
# both event loops lag. Like load balancers, keep idle connections longer than clients do (httpx 5,
# aiohttp 15, Go 90 s), so the client is always the one that closes them.
KEEP_ALIVE_S = 120


def create_app(settings: Settings | None = None) -> FastAPI:
    cove = controlplane.assemble(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await controlplane.start(cove)
        # What startup built (modules, routes, schemas: most of the heap) is never garbage, and
        # each full collection walked all of it, stalling every request for 30-80 ms.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await controlplane.stop(cove)

    app = FastAPI(
        title="cove",
        version=__version__,
        description="Self-hosted sandboxes for AI agents. Authenticate with `Authorization: Bearer KEY`.",
        lifespan=lifespan,
    )
    controlplane.install(app, cove)
    e2b.install(app, cove)
    console.install(app, cove)  # the web console at /console (docs/console.md)
    app.add_middleware(controlplane.AccessLog, traffic=cove.pools.traffic)
    return app


def serve(host: str = "127.0.0.1", port: int = 7770, home: str | None = None, demo: bool = False) -> None:
    if os.geteuid() != 0:
        raise SystemExit("cove serve needs root: it creates namespaces, cgroups and overlay mounts")
    logs.setup(
        os.environ.get("COVE_LOG_LEVEL", "INFO"), os.environ.get("COVE_LOG_FORMAT"), quiet_requests=demo
    )
    settings = Settings(home=Path(home)) if home else Settings()
    settings.host, settings.port, settings.demo = host, port, demo
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    if demo:
        threading.Thread(target=_demo_when_ready, args=(server, app, host, port), daemon=True).start()
    server.run()  # on uvloop (uvicorn's loop 'auto', installed with uvicorn[standard])


def serve_node(home: str | None = None) -> None:
    """`cove node`: this host's node alone, with no public API (docs/fleet.md). It registers in
    the shared store and serves its node API to the servers that share it."""
    if os.geteuid() != 0:
        raise SystemExit("cove node needs root: it creates namespaces, cgroups and overlay mounts")
    logs.setup(os.environ.get("COVE_LOG_LEVEL", "INFO"), os.environ.get("COVE_LOG_FORMAT"))
    settings = Settings(home=Path(home)) if home else Settings()
    if settings.database_url is None:
        raise SystemExit(
            "cove node needs COVE_DATABASE_URL: a node joins the fleet through the store its servers share"
        )
    settings.pools = ""  # warm members are kept by the servers that hand them out

    async def main() -> None:
        cove = controlplane.assemble(settings)
        await controlplane.start(cove, api=False)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        address = cove.fleet.server.address if cove.fleet.server else "?"
        print(f"cove node {cove.fleet.id}: node API on {address}", flush=True)
        try:
            await stopping.wait()
        finally:
            await controlplane.stop(cove)

    asyncio.run(main())


def _demo_when_ready(server: uvicorn.Server, app: object, host: str, port: int) -> None:
    import time

    while not server.started:
        time.sleep(0.05)
    from cove.demo import run_demo

    run_demo(f"http://{host}:{port}", app.state.cove.demo_key)  # type: ignore[attr-defined]
