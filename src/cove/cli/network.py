"""``cove network ID`` (a sandbox's egress policy, docs/network.md) and the ``--network`` option of
``cove create``."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cove.cli._ui import connection, fail, friendly, out


def _rules(values: list[str] | None) -> list[str]:
    """Repeatable options whose values may also be comma-separated lists."""
    return [r.strip() for v in values or [] for r in v.split(",") if r.strip()]


def network_text(mode: str, allow: list[str], deny: list[str]) -> str:
    parts = [mode]
    for name, rules in (("allow", allow), ("deny", deny)):
        if rules:
            parts.append(f"{name} {', '.join(rules)}")
    return "; ".join(parts)


def network_spec(text: str) -> dict[str, Any]:
    """``--network none|open|allow:RULE,...|deny:RULE,...`` as the API's network object."""
    mode, _, rules = text.partition(":")
    if mode not in ("none", "open", "allow", "deny"):
        fail(f"--network: expected none, open, allow:RULE,... or deny:RULE,...; got {text!r}")
    if rules and mode not in ("allow", "deny"):
        fail(f"--network: mode {mode} takes no rules")
    return {"mode": mode, mode: _rules([rules])} if rules else {"mode": mode}


@friendly
def network_(
    ctx: typer.Context,
    sandbox_id: Annotated[str, typer.Argument(metavar="ID", help="Sandbox id.")],
    mode: Annotated[str | None, typer.Option("--mode", help="none, allow, deny or open.")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option("--allow", help="Allow rules (repeatable or comma-separated); replaces the list."),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option("--deny", help="Deny rules (repeatable or comma-separated); replaces the list."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show or change a sandbox's egress policy; new connections follow a change at once.

    Modes: [bold]none[/] (nothing leaves), [bold]allow[/] (only the allow list, minus the deny list),
    [bold]deny[/] (everything but the deny list, plus the allow list), [bold]open[/]. A rule is
    HOST[:PORTS]: a domain, *.domain, an IP or CIDR, or *; PORTS is 443 or 8000-8999.
    [cyan]--allow[/] alone on a sandbox in mode none switches it to allow.

    [bold]Examples:[/]  [cyan]cove network sb-1234[/]
                [cyan]cove network sb-1234 --allow pypi.org,*.pythonhosted.org[/]
                [cyan]cove network sb-1234 --mode deny --deny 10.0.0.0/8[/]
    """
    sandbox = connection(ctx).sandbox(sandbox_id)
    try:
        current = sandbox.get_network()
        if mode is not None or allow is not None or deny is not None:
            new_mode = mode or ("allow" if current.mode == "none" and allow else current.mode)
            current = sandbox.set_network(
                new_mode,
                allow=_rules(allow) if allow is not None else current.allow,
                deny=_rules(deny) if deny is not None else current.deny,
            )
    finally:
        sandbox.close()
    if as_json:
        out.print_json(json.dumps(asdict(current)))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    last = current.last_denied
    rows = [
        ("mode", escape(current.mode)),
        ("allow", escape(", ".join(current.allow)) or "-"),
        ("deny", escape(", ".join(current.deny)) or "-"),
        # Names only: the API never returns the values (set them with the SDK or API, not on a command line).
        ("inject", escape("; ".join(f"{h}: {', '.join(n)}" for h, n in current.inject.items())) or "-"),
        ("proxy", escape(current.proxy or current.error or "not running")),
        ("connections", f"{current.allowed} allowed, {current.denied} denied"),
        ("last denied", escape(f"{last['target']}: {last['reason']}") if last else "-"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    out.print(grid)


def register(app: typer.Typer) -> None:
    app.command("network")(network_)
