"""The runtime contract and which runtimes exist (whether this host can run them: `availability`).

Runtimes are siblings behind the node: `namespaces` (the default: Linux namespaces, seccomp, an overlay
root), `gvisor` (the same sandbox under gVisor's application kernel, `runsc`) and `microvm` (a seam:
detected, never started here). docs/runtimes.md compares them.

Shaped like containerd's runtime v2: a small core every runtime has (`Runtime`), and capabilities a
runtime declares rather than refuses at call time: `checkpointer` (a `Checkpointer`, or None),
`egress` and `ports`. The host-side work they share (rootfs, run dir, mount sources, cgroup, commit) is
a `cove.node.namespaces.host.SandboxHost` each one holds, not a base class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from cove.node.base import Handle, SandboxSpec, Seal

DEFAULT = "namespaces"
NAMES = ("namespaces", "gvisor", "microvm")


class Checkpointer(Protocol):
    """Checkpoints a runtime's sandboxes with their processes' memory (images under a key, on the node)."""

    async def hibernate(self, sandbox_id: str, handle: Handle) -> None:
        """Checkpoint every process under the sandbox's own id, then release memory, mounts and cgroups."""

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: Handle, key: str, layer_id: str, seal: Seal = ()
    ) -> str:
        """Checkpoint under `key` and seal the files as `layer_id` (and the `seal` volumes) at that
        instant; returns the layer. The sandbox keeps running."""

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> Handle:
        """Start `spec` with the processes checkpointed under `key`. On failure a `resume` keeps the
        sandbox's files (it stays hibernated); otherwise everything goes."""


class Runtime(Protocol):
    """Starts, stops and checks sandboxes on this host. Blocking work runs in worker threads."""

    name: ClassVar[str]
    egress: ClassVar[bool]  # can a sandbox reach out through the egress proxy (network mode other than none)?
    ports: ClassVar[bool]  # can the host reach ports a sandbox listens on?
    available: bool
    detail: str  # what was found, or why it is unavailable
    checkpointer: Checkpointer | None

    async def start(self) -> None:
        """Prepare the runtime (binaries, state dirs); called once at server start if available."""

    async def create(self, spec: SandboxSpec, resume: bool = False) -> Handle:
        """Start a sandbox; with `resume`, over the files it kept when stopped. On failure nothing is left
        (a resume keeps its files)."""

    async def stop(self, sandbox_id: str) -> None:
        """Kill every process; release memory, mounts and cgroups; keep the files."""

    async def kill(self, sandbox_id: str) -> None:
        """Stop, then delete the sandbox's files. Idempotent."""

    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        """The ids among `(id, handle)` whose sandbox no longer runs (one pass for many)."""

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process (no CPU; memory kept)."""

    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox."""

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        """Apply `spec`'s env, user, workdir and limits to a running sandbox, then thaw it if asked."""

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        """Resource usage (memory bytes, cpu usec, pids, disk bytes)."""

    async def close(self) -> None:
        """Called at server shutdown; running sandboxes stay running."""
