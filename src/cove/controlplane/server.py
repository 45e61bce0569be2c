"""`cove serve`: run the API server (and optionally a demo against it)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import uvicorn

from cove.config import Settings
from cove.controlplane import logs
from cove.controlplane.app import create_app

# Seconds an idle keep-alive connection stays open. uvicorn's default (5 s) equals httpx's
# keepalive_expiry (5 s): a client reusing a connection just before its own expiry could send on it
# just as the server closed it, and got httpx.ReadError (connection reset), most under load, when
# both event loops lag. Like load balancers, keep idle connections longer than clients do (httpx 5,
# aiohttp 15, Go 90 s), so the client is always the one that closes them.
KEEP_ALIVE_S = 120


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


def _demo_when_ready(server: uvicorn.Server, app: object, host: str, port: int) -> None:
    import time

    while not server.started:
        time.sleep(0.05)
    from cove.demo import run_demo

    run_demo(f"http://{host}:{port}", app.state.cove.demo_key)  # type: ignore[attr-defined]
