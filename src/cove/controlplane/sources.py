"""What a new sandbox starts from: the base template, a built template or a snapshot, as the
caller's tenant sees them (another tenant's are never found: their names must not leak)."""

from __future__ import annotations

from typing import Any

from cove.controlplane.auth import Caller
from cove.controlplane.errors import not_found
from cove.node.base import NodeAgent, TemplateSpec
from cove.store.base import SnapshotRecord, Store

BASE = "base"  # the base template's name, on every node
RUNTIME_KEYS = ("binds", "rootfs", "host_usr")  # what the node needs to mount a template's root

Source = tuple[TemplateSpec, dict[str, Any]]  # layers, and defaults (env, user, workdir, limits, checkpoint…)


def runtime_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in RUNTIME_KEYS if k in config}


class Sources:
    def __init__(self, store: Store, node: NodeAgent) -> None:
        self.store = store
        self.node = node  # this server's

    async def of(
        self, who: Caller, template: str, snapshot: str | None = None, node: NodeAgent | None = None
    ) -> Source:
        """The layers and defaults of `snapshot` if given, else of `template`; 404 if unknown.
        A memory snapshot's defaults name its image (`checkpoint`). `node`: the node the sandbox
        starts on (default: this server's), whose own base template it gets."""
        base = await (node or self.node).base_template()
        if snapshot is None:
            if template == base.name:
                return base, {
                    "env": {},
                    "user": base.config.get("user"),
                    "workdir": base.config.get("workdir"),
                }
            built = await self.template(who, template)  # docs/templates.md
            if built is None:
                raise not_found("template", template)
            return built
        snap = await self.snapshot(who, snapshot)
        spec = TemplateSpec(
            name=snap.config.get("template", base.name),
            layers=tuple(snap.layers),
            config=snap.config.get("template_config") or base.config,
        )
        return spec, {**snap.config, "checkpoint": snap.id if snap.memory else None, "snapshot": snap.id}

    async def home(self, who: Caller, template: str, snapshot: str | None = None) -> str | None:
        """The node whose disk holds the source's layers (a built template's, a snapshot's), or
        None for the base template, which every node has (docs/fleet.md). 404 if unknown."""
        if snapshot is not None:
            snap = await self.snapshot(who, snapshot)
            # One copied to the object store starts on any node, which fetches it (docs/object-storage.md).
            return None if snap.config.get("durable") is True else snap.node_id
        if template == BASE:
            return None
        rec = await self.store.get_template(who.tenant, template)
        if rec is None:
            raise not_found("template", template)
        return None if rec.config.get("durable") is True else rec.node_id

    async def template(self, who: Caller, name: str) -> Source | None:
        """A built template's layers and defaults (None: no such template)."""
        rec = await self.store.get_template(who.tenant, name)
        if rec is None:
            return None
        rc = runtime_config(rec.config)
        defaults = {
            "env": rec.config.get("env", {}),
            "user": rec.config.get("user"),
            "workdir": rec.config.get("workdir"),
            "template_config": rc,
            "checkpoint": rec.config.get("checkpoint"),
            "start": None if rec.config.get("checkpoint") else rec.config.get("start"),
            "durable": rec.config.get("durable") is True,  # in the object store: any node fetches it
        }
        return TemplateSpec(name=name, layers=tuple(rec.layers), config=rc), defaults

    async def snapshot(self, who: Caller, snapshot_id: str) -> SnapshotRecord:
        snap = await self.store.get_snapshot(snapshot_id)
        if snap is None or snap.tenant != who.tenant or snap.state != "ready":
            raise not_found("snapshot", snapshot_id)
        return snap

    async def snapshots(self, who: Caller) -> list[SnapshotRecord]:
        """The caller's snapshots (not those forks take for themselves)."""
        snaps = await self.store.list_snapshots(who.tenant)
        return [s for s in snaps if s.state == "ready" and not s.config.get("internal")]
