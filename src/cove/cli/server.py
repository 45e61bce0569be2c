"""The host side: ``cove serve``, ``cove doctor`` and ``cove kernel build``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import fail, out, spinner
from cove.config import Settings

kernel_app = typer.Typer(
    help="The Python environment of code contexts (run_code's Jupyter kernels).", no_args_is_help=True
)


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 7770,
    home: Annotated[
        str | None, typer.Option("--home", envvar="COVE_HOME", help="State directory (database, sandboxes).")
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Run a short demo against the server once it is up.")
    ] = False,
) -> None:
    """Run the cove server (as root: it creates namespaces, cgroups and mounts).

    Sandboxes are owned by their own init process, not by the server: stopping or restarting the
    server leaves them running, and the next start re-adopts them. Without COVE_API_KEY, the first
    start prints an admin key once.

    [bold]Example:[/]  [cyan]COVE_HOME=/var/lib/cove cove serve --port 7770[/]  (as root)
    """
    from cove.server import serve as run_server

    run_server(host=host, port=port, home=home, demo=demo)


def node(
    home: Annotated[
        str | None, typer.Option("--home", envvar="COVE_HOME", help="State directory (sandboxes, layers).")
    ] = None,
) -> None:
    """Run this host as a node of a fleet, with no public API of its own (as root).

    The node joins through the database its API servers share (COVE_DATABASE_URL), serves its node
    API on COVE_NODE_LISTEN:COVE_NODE_PORT (advertised as COVE_NODE_ADVERTISE) to them alone (each
    call carries the node's own credential), and runs the sandboxes they place here. With
    COVE_KUBECONFIG it is a Kubernetes node too (docs/kubernetes.md). See docs/fleet.md.

    [bold]Example:[/]  [cyan]COVE_DATABASE_URL=postgresql://cove@db/cove COVE_NODE_LISTEN=0.0.0.0 COVE_NODE_PORT=7771 cove node[/]
    """
    from cove.server import serve_node

    serve_node(home)


def doctor() -> None:
    """Check what this host supports: namespaces, cgroups, overlayfs, seccomp, the guest interpreter.

    Exits non-zero when something cove needs is missing, and says what to do about it.

    [bold]Example:[/]  [cyan]cove doctor[/]  (as root, for the full report)
    """
    from cove.doctor import checks

    table = Table(box=None, show_header=False)
    failed = False
    for check in checks():
        mark = "[green]ok[/]" if check.ok else ("[red]missing[/]" if check.required else "[yellow]no[/]")
        failed |= check.required and not check.ok
        table.add_row(mark, check.name, escape(check.detail))
    out.print(table)
    if failed:
        raise typer.Exit(1)


@kernel_app.command("build")
def kernel_build(
    home: Annotated[
        str | None,
        typer.Option("--home", envvar="COVE_HOME", help="The server's state directory (the cache is in it)."),
    ] = None,
) -> None:
    """Build the kernel environment (ipykernel, with pip) where the server looks for it, and print its path.

    The cache is COVE_KERNEL_CACHE, or kernel/ under the state directory; once built, this returns at
    once. Without it, the server builds it in the background at its first start and code contexts
    wait for it. Needs root (it builds in a private mount namespace) and a reachable package index.

    [bold]Example:[/]  [cyan]COVE_HOME=/var/lib/cove cove kernel build[/]
    """
    from cove.storage import kernel_layer

    settings = Settings(home=Path(home)) if home else Settings()
    # The same place LocalNode._start_kernel_env looks.
    cache = Path(settings.kernel_cache) if settings.kernel_cache else settings.home / "kernel"
    try:
        with spinner(f"building the kernel environment in {cache} (pip, the first time)…"):
            root = kernel_layer.build_cached(cache)
    except (kernel_layer.KernelLayerError, subprocess.SubprocessError, OSError) as e:
        fail(f"building the kernel environment failed: {e}")
    out.print(str(root / kernel_layer.LAYER_SUBDIR))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("node")(node)
    app.command("doctor")(doctor)
    app.add_typer(kernel_app, name="kernel")
