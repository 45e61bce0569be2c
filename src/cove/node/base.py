"""The interface between the control plane and a node (one host that runs sandboxes).

On one machine the node is in-process (`LocalNode`); in a cluster it is reached through
Kubernetes objects. The control plane never touches namespaces, cgroups or mounts itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from cove.node.guest_client import GuestClient


@dataclass(frozen=True)
class Limits:
    cpu: float | None = None  # cores
    memory_mb: int | None = None
    pids: int | None = None
    disk_mb: int | None = None


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    layers: tuple[str, ...]  # committed layer ids, bottom-most first
    config: dict[str, Any]  # binds, user, workdir, env


@dataclass(frozen=True)
class SandboxSpec:
    id: str
    template: TemplateSpec
    env: dict[str, str] = field(default_factory=dict)
    user: str = "user"
    workdir: str = "/home/user"
    limits: Limits = field(default_factory=Limits)
    # {"type": "volume", "volume": id, "path", "read_only"} or {"type": "s3", bucket…, "path", …};
    # an s3 mount carries its credentials only when the sandbox is created.
    mounts: tuple[dict[str, Any], ...] = ()
    runtime: str = "namespaces"  # cove.node.runtimes.NAMES
    # Started ahead of demand (a pool member): it starts at the lowest CPU weight, so that it
    # yields to sandboxes in use, until `configure` (the claim) gives it the normal one.
    background: bool = False


class NodeError(Exception):
    """A node could not carry out an operation; the message says why."""


class NodeAgent(ABC):
    @abstractmethod
    async def start(self) -> None:
        """Prepare the node (templates, directories); called once at server start."""

    @abstractmethod
    async def create(self, spec: SandboxSpec) -> dict[str, Any]:
        """Start a sandbox; returns the node handle to persist (enough to re-adopt it later)."""

    @abstractmethod
    async def stop(self, sandbox_id: str) -> None:
        """Kill every process and release memory, mounts and cgroups, keeping the sandbox's files."""

    @abstractmethod
    async def restart(self, spec: SandboxSpec) -> dict[str, Any]:
        """Start a stopped sandbox again over its kept files (fresh processes)."""

    @abstractmethod
    def can_checkpoint(self, runtime: str = "namespaces") -> bool:
        """Can this node checkpoint processes of `runtime`'s sandboxes (hibernate and fork with memory)?"""

    def runtime_problem(self, runtime: str) -> str | None:
        """Why this node cannot start sandboxes of `runtime` (None: it can)."""
        return None if runtime == "namespaces" else f"{runtime} runtime unavailable on this node"

    @abstractmethod
    async def hibernate(self, sandbox_id: str, handle: dict[str, Any]) -> None:
        """Checkpoint every process to disk, then release its memory, mounts and cgroups."""

    @abstractmethod
    async def snapshot_with_memory(
        self, sandbox_id: str, handle: dict[str, Any], key: str, seal: tuple[tuple[str, str], ...] = ()
    ) -> str:
        """Checkpoint the processes (under `key`) and seal the files at the same instant; keeps running.
        `seal`: (volume id, sealed id) pairs of volumes to copy at that instant too."""

    @abstractmethod
    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> dict[str, Any]:
        """Start `spec` with the processes checkpointed under `key`; returns its handle."""

    @abstractmethod
    async def has_checkpoint(self, key: str) -> bool:
        """Is there a complete checkpoint under `key`?"""

    @abstractmethod
    async def drop_checkpoint(self, key: str) -> None:
        """Delete the checkpoint stored under `key`."""

    async def checkpoint_keys(self) -> set[str]:
        """Keys of every checkpoint, complete or not, stored on this node."""
        return set()

    @abstractmethod
    async def commit(self, sandbox_id: str, seal: tuple[tuple[str, str], ...] = ()) -> str:
        """Seal a read-only copy of the sandbox's writable layer, frozen for that instant; returns its id.
        `seal`: (volume id, sealed id) pairs of volumes to copy at the same instant."""

    @abstractmethod
    async def flatten(self, layers: list[str]) -> str:
        """A single committed layer with the merged content of `layers` (bottom-most first)."""

    @abstractmethod
    async def collect_layers(self, keep: set[str]) -> list[str]:
        """Delete committed layers that nothing references any more; returns their ids."""

    @abstractmethod
    async def kill(self, sandbox_id: str, handle: dict[str, Any] | None) -> None:
        """Kill every process and release every resource (mounts, cgroups, dirs). Idempotent."""

    @abstractmethod
    async def alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        """Is the sandbox started with `handle` still running (and answering)?"""

    async def dead(self, sandboxes: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """The ids among `(id, handle)` whose sandbox is no longer running."""
        return [sid for sid, handle in sandboxes if not await self.alive(sid, handle)]

    @abstractmethod
    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process (no CPU; memory kept)."""

    @abstractmethod
    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox."""

    kernel_status: str = "unavailable"  # of the environment code contexts run in
    # Changes when sandboxes created from now on would differ (e.g. the kernel environment got
    # built): pooled sandboxes made under an older generation are discarded, not handed out.
    generation: str = ""

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        """Apply `spec`'s env, user, workdir and cpu/memory/pids limits to a running sandbox
        (a pooled one being claimed), then thaw it if asked."""
        raise NodeError("this node cannot reconfigure a running sandbox")

    @abstractmethod
    async def prepare_context(self, sandbox_id: str, context_id: str, user: str) -> str:
        """Make room for a code context's bridge; returns its socket path inside the sandbox."""

    @abstractmethod
    def context_client(self, sandbox_id: str, context_id: str) -> GuestClient:
        """A client for a code context's bridge."""

    @abstractmethod
    def guest(self, sandbox_id: str) -> GuestClient:
        """A client for the sandbox's guest agent."""

    @abstractmethod
    async def base_template(self) -> TemplateSpec:
        """The default template, built on first use."""

    @abstractmethod
    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        """Resource usage (memory bytes, pids, disk bytes)."""

    @abstractmethod
    async def sweep(self, keep: set[str]) -> list[str]:
        """Release resources of sandboxes this node holds that are not in `keep`; returns their ids."""

    # -- volumes (docs/volumes.md); a node without them refuses ------------------------------
    volume_limits: bool = False  # can it enforce a volume's size limit?

    async def create_volume(self, volume_id: str, size_mb: int | None) -> None:
        raise NodeError("this node has no volumes")

    async def clone_volume(self, sealed_id: str, volume_id: str, size_mb: int | None) -> None:
        """A new volume with the content of a sealed copy (taken by a snapshot)."""
        raise NodeError("this node has no volumes")

    async def delete_volume(self, volume_id: str) -> None:
        raise NodeError("this node has no volumes")

    async def delete_sealed(self, sealed_ids: list[str]) -> None:
        raise NodeError("this node has no volumes")

    async def volume_ids(self) -> tuple[set[str], set[str]]:
        """Ids of the volumes and of the sealed copies on this node."""
        return set(), set()

    def bucket_mounts_available(self) -> bool:
        return False

    async def bucket_mounts_healthy(self, sandbox_id: str, indices: list[int]) -> list[bool]:
        """Is each bucket mount (by its index in the sandbox's mounts) still served?"""
        return [False for _ in indices]

    def template_storage(self) -> Any:
        """Layer building for templates (`cove.node.template_storage.TemplateStorage`)."""
        raise NodeError("this node cannot build templates")

    @abstractmethod
    async def close(self) -> None:
        """Called at server shutdown; running sandboxes stay running."""
