"""A SandboxTemplate's `networkPolicy` as cove's egress policy (docs/network.md), where it can be one.

cove enforces egress per sandbox (its proxy in the sandbox's network namespace), not per pod IP, so only
the egress half of a NetworkPolicy maps, and only rules made of ipBlocks and ports:

- no `networkPolicy` (or `Unmanaged`): nothing is applied; cove's default holds (no egress at all, which is
  stricter than upstream's "public internet only" default);
- `egress: []`: no egress (mode none);
- each `to` ipBlock becomes allow rules `CIDR[:PORT]` (mode allow); a rule with no `to` allows any host on
  its ports (`*:PORT`); a rule with neither allows everything (mode open);
- one rule that is `0.0.0.0/0` with `except` CIDRs and no ports becomes mode deny with those CIDRs (the
  shape of upstream's own default policy);
- podSelector/namespaceSelector peers, named ports and non-TCP protocols cannot be expressed:
  `Unmappable` (the controller records a Warning Event and applies no egress, failing closed).

Ingress rules are not applied: sandboxes are reached through the router and cove's port API."""

from __future__ import annotations

from typing import Any


class Unmappable(ValueError):
    pass


def _ports(rule: dict[str, Any]) -> list[str]:
    out = []
    for p in rule.get("ports") or []:
        if (p.get("protocol") or "TCP") != "TCP":
            raise Unmappable(f"protocol {p.get('protocol')}: cove's egress proxy carries TCP only")
        port, end = p.get("port"), p.get("endPort")
        if port is None:
            return []  # any port
        if not isinstance(port, int):
            raise Unmappable(f"named port {port!r}: give a number")
        out.append(f"{port}-{end}" if isinstance(end, int) and end > port else str(port))
    return out


def cove_network(template_spec: dict[str, Any]) -> dict[str, Any] | None:
    """cove's NetworkSettings for the template, or None for nothing to apply. Raises Unmappable."""
    if template_spec.get("networkPolicyManagement", "Managed") == "Unmanaged":
        return None
    policy = template_spec.get("networkPolicy")
    if policy is None:
        return None
    rules = policy.get("egress") or []
    if not rules:
        return {"mode": "none"}
    if len(rules) == 1 and not rules[0].get("ports"):
        peers = rules[0].get("to") or []
        if len(peers) == 1 and set(peers[0]) == {"ipBlock"}:
            block = peers[0]["ipBlock"]
            if block.get("cidr") in ("0.0.0.0/0", "::/0"):
                excepts = block.get("except") or []
                return {"mode": "deny", "deny": list(excepts)} if excepts else {"mode": "open"}
    allow: list[str] = []
    for rule in rules:
        ports = _ports(rule)
        peers = rule.get("to") or []
        if not peers:
            if not ports:
                return {"mode": "open"}
            allow += [f"*:{p}" for p in ports]
            continue
        for peer in peers:
            if set(peer) != {"ipBlock"}:
                raise Unmappable(f"peer {sorted(peer)}: only ipBlock peers map to cove's egress rules")
            block = peer["ipBlock"]
            if block.get("except"):
                raise Unmappable("ipBlock.except is supported only in a single 0.0.0.0/0 rule without ports")
            cidr = block["cidr"]
            host = f"[{cidr}]" if ":" in cidr else cidr
            allow += [f"{host}:{p}" for p in ports] if ports else [cidr]
    return {"mode": "allow", "allow": allow}
