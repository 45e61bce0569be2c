"""The one way a sandbox starts: cold creates, pool refills and template builds all come here.

Starting is: build the node's spec (with the sandbox's way out, its egress proxy, in its env),
have the node create it (or restore it from a memory checkpoint, or start it again over its kept
files), then open its egress listener in the new network namespace. A start that fails after the
node made the sandbox kills it: nothing half-started is left behind.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from cove.config import Settings
from cove.controlplane.admission import Admission
from cove.network.egress import proxy_env
from cove.node.base import Limits, NodeAgent, SandboxSpec, TemplateSpec

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_sandbox_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(16))


class Starter:
    def __init__(self, settings: Settings, node: NodeAgent, admission: Admission) -> None:
        self.settings = settings
        self.node = node
        self.admission = admission

    def spec(
        self,
        sid: str,
        template: TemplateSpec,
        env: Mapping[str, str],
        user: str,
        workdir: str,
        limits: Limits,
        runtime: str = "namespaces",
        egress: bool = True,
    ) -> SandboxSpec:
        """The node's spec; `egress`: the sandbox reaches out through its proxy (its env says where)."""
        return SandboxSpec(
            id=sid,
            template=template,
            # Transparent egress needs no variables: every program's packets are judged host-side.
            env={
                **(
                    proxy_env(self.settings.egress_port)
                    if egress and self.settings.egress_mode == "proxy"
                    else {}
                ),
                **env,
            },
            user=user,
            workdir=workdir,
            limits=limits,
            runtime=runtime,
        )

    async def start(
        self,
        spec: SandboxSpec,
        network: dict[str, Any] | None,
        checkpoint: str | None = None,
        resume: bool = False,
        kept_files: bool = False,
        node: NodeAgent | None = None,
        pull: bool = False,
    ) -> dict[str, Any]:
        """Start `spec` on `node` (default: this server's) and open its egress under `network`'s
        policy (None: no way out); returns the node's handle. `checkpoint`: restore the processes
        saved under that key (`resume`: a hibernated sandbox's own); `kept_files`: start fresh
        processes over the files a stop kept. `pull`: its layers (and checkpoint) may be only in
        the object store (a snapshot copied there, docs/object-storage.md): fetch what is missing."""
        node = node or self.node
        if pull:
            await node.durable.pull(list(spec.template.layers), checkpoint)
        if checkpoint:
            handle = await node.checkpoints.restore(spec, checkpoint, resume=resume)
        elif kept_files:
            handle = await node.restart(spec)
        else:
            handle = await node.create(spec)
        try:
            await self.open_egress(spec.id, spec.runtime, handle, network, node)
        except BaseException:
            await node.kill(spec.id, handle)
            raise
        return handle

    async def open_egress(
        self,
        sid: str,
        runtime: str,
        handle: dict[str, Any],
        network: dict[str, Any] | None,
        node: NodeAgent | None = None,
    ) -> None:
        """The egress listener in the namespace of the processes started with `handle` (after a
        start, and at adoption: a restored namespace is a new one, without the listener)."""
        node = node or self.node
        if network is None or not node.egress(runtime or "namespaces"):  # gVisor's network is its own
            return
        await node.network.attach(sid, handle, network)

    async def close_egress(self, sid: str, node: NodeAgent | None = None) -> None:
        """Close the sandbox's way out (before a commit, a kill: its connections pin the namespace)."""
        await (node or self.node).network.detach(sid, forget=True)

    async def stop(self, sid: str, handle: dict[str, Any] | None, node: NodeAgent | None = None) -> None:
        """Kill a sandbox and close its egress."""
        node = node or self.node
        await self.close_egress(sid, node)
        await node.kill(sid, handle)

    async def may_start_background(self) -> bool:
        """May work nobody waits for (a pool refill) start a sandbox now?"""
        if self.admission.starts.queued:  # creates wait for a start slot: they come first
            return False
        return await self.admission.refusal(count=False) is None
