"""`python -m cove.kube.agent_sandbox controller|router|install-crds` (docs/agent-sandbox.md).

Each is its own process (a Deployment each in a cluster): the controller under a Lease, so that two or more
replicas are safe; the router stateless behind a Service. cove is reached at COVE_URL with COVE_API_KEY;
the cluster through --kubeconfig (a path, or `in-cluster` for the pod's service account)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from lightkube import AsyncClient, KubeConfig

from cove.controlplane import logs
from cove.kube.agent_sandbox.controller import COMPONENT, Controller
from cove.kube.agent_sandbox.cove_api import CoveAPI
from cove.kube.agent_sandbox.crds import crd_dir, install_crds

log = logging.getLogger("cove.kube.agent_sandbox")


def _client(kubeconfig: str) -> AsyncClient:
    config = (
        KubeConfig.from_service_account() if kubeconfig == "in-cluster" else KubeConfig.from_file(kubeconfig)
    )
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # lightkube's client logs each request at INFO
    return AsyncClient(config, field_manager=COMPONENT, namespace="default")


def _cove(args: argparse.Namespace) -> CoveAPI:
    key = os.environ.get("COVE_API_KEY")
    if not key:
        sys.exit("COVE_API_KEY is not set: the controller and the router call cove with it")
    return CoveAPI(args.cove_url, key)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _controller(args: argparse.Namespace) -> None:
    client = _client(args.kubeconfig)
    cove = _cove(args)
    if args.install_crds:
        await install_crds(client, args.crds)
    controller = Controller(
        client, cove, identity=args.identity, namespace=args.namespace, lease_namespace=args.lease_namespace,
        lease_name=args.lease_name, lease_duration_s=args.lease_duration, renew_s=args.renew,
    )  # fmt: skip
    await controller.start()
    try:
        await _until_signal()
    finally:
        await controller.close(release=True)  # a clean stop hands the Lease over at once
        await cove.close()
        await client.close()


async def _router(args: argparse.Namespace) -> None:
    import uvicorn

    from cove.kube.agent_sandbox.router import KubeResolver, Router, make_app

    client = _client(args.kubeconfig)
    cove = _cove(args)
    resolver = KubeResolver(client, args.namespace)
    router = Router(resolver, cove, runtime_port=args.runtime_port, token=os.environ.get("COVE_ROUTER_TOKEN"))

    async def stop() -> None:
        await resolver.close()
        await cove.close()
        await client.close()

    app = make_app(router, on_start=resolver.start, on_stop=stop)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, access_log=False)
    await uvicorn.Server(config).serve()


async def _install(args: argparse.Namespace) -> None:
    client = _client(args.kubeconfig)
    try:
        for name in await install_crds(client, args.crds):
            print(name)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cove.kube.agent_sandbox", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", "in-cluster"))
    common.add_argument("--cove-url", default=os.environ.get("COVE_URL", "http://127.0.0.1:8000"))
    common.add_argument("--namespace", default="*", help="watch one namespace (default: all)")
    common.add_argument("--crds", type=Path, default=None,
                        help=f"CRD directory (default: {crd_dir()})")  # fmt: skip
    c = sub.add_parser("controller", parents=[common], help="reconcile the kinds (under a Lease)")
    c.add_argument(
        "--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    )
    c.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    c.add_argument("--lease-name", default="cove-agent-sandbox-controller")
    c.add_argument("--lease-duration", type=int, default=15, help="seconds")
    c.add_argument("--renew", type=float, default=2.0, help="seconds between renewals")
    c.add_argument("--install-crds", action="store_true", help="create or update the CRDs first")
    r = sub.add_parser("router", parents=[common], help="serve sandbox-router's API")
    r.add_argument("--host", default="0.0.0.0")
    r.add_argument("--port", type=int, default=8080)
    r.add_argument("--runtime-port", type=int, default=8888, help="the port clients send for the runtime API")
    sub.add_parser("install-crds", parents=[common], help="create or update the CRDs and exit")
    args = p.parse_args(argv)
    logs.setup(os.environ.get("COVE_LOG_LEVEL", "INFO"), os.environ.get("COVE_LOG_FORMAT"))
    run = {"controller": _controller, "router": _router, "install-crds": _install}[args.command]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
