"""The e2b protocol on cove: the unmodified `e2b` and `e2b-code-interpreter` SDKs drive cove.

- `rest`: e2b's control-plane REST API (`/v2/sandboxes`, `/sandboxes/{id}/...`, `/snapshots`),
  authenticated with `X-API-KEY` = a cove API key.
- `templates`: e2b's template builds (`/v3/templates`, file uploads, build status) on cove's builder.
- `volumes`: e2b's volumes (`/volumes`, `/volumecontent`) on cove's volumes.
- `routing`: picks the sandbox and port of sandbox traffic (headers or host name).
- `envd`: the in-sandbox daemon's protocol (Connect RPC `process.Process`, `filesystem.Filesystem`,
  `/files`, `/health`), served by the cove server on top of cove's guest agent.
- `interpreter`: the code interpreter's `/execute` and `/contexts` on cove's code contexts.
- `ports`: traffic to a server listening inside the sandbox.

Point an agent at cove with E2B_API_URL and E2B_SANDBOX_URL (both the cove URL) and E2B_API_KEY.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from . import envd, interpreter, ports, rest, templates, volumes
from .routing import SandboxRouter

if TYPE_CHECKING:
    from cove.controlplane.app import Cove


def install(app: FastAPI, cove: Cove) -> None:
    app.include_router(templates.router)  # first: DELETE /templates/tags before /templates/{id}
    app.include_router(rest.router)
    app.include_router(volumes.router)
    app.include_router(rest.unserved)  # last: e2b's paths that nothing above serves
    app.add_middleware(
        SandboxRouter,
        cove=cove,
        envd=envd.build(cove),
        interpreter=interpreter.build(cove),
        ports=ports.build(cove),
    )
