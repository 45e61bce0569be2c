"""The node contract: the interface between the control plane and a node (one host that runs sandboxes).

On one machine the node is in-process (`cove.node.local.LocalNode`); in a fleet the same contract is
served over the network between API replicas and nodes. The control plane never touches namespaces,
cgroups or mounts itself.

Shape (after containerd: a task service, a snapshotter, and capabilities a runtime declares):
- `NodeAgent`: sandbox lifecycle (create, restart, stop, kill, pause, resume, configure), liveness
  (alive, dead, sweep), stats, the guest channel (`guest`), the base template, and four parts:
- `node.volumes` (`Volumes`): persistent volumes, their sealed copies, and bucket mounts;
- `node.snapshots` (`Snapshots`): committed layers: commit a sandbox's files, flatten, collect, and
  template building (`templates`);
- `node.checkpoints` (`Checkpoints`): process checkpoints (CRIU images under a key); `available(runtime)`
  says whether that runtime's sandboxes can be checkpointed at all;
- `node.contexts` (`Contexts`): code contexts' bridges and the environment they run in;
- `node.durable` (`Durable`): copies of committed layers and checkpoints in the object store, so
  that another node can start from them (docs/object-storage.md);
- `node.network` (`Network`): each sandbox's way out (its egress proxy) and the way in to its ports.
  Both live on the node: the proxy listens inside the sandbox's namespace and connects out from the
  node's, and a port is reached by entering the sandbox's namespace.
Behind the node, each runtime implements the small `cove.node.runtimes.Runtime` protocol and declares
its capabilities (a `Checkpointer` or None, egress, ports) instead of refusing at call time.

Made to be served remotely:
- arguments and results are plain data: frozen dataclasses of plain fields (`SandboxSpec`,
  `TemplateSpec`, `Limits`), ids, tuples of id pairs, JSON-able dicts (`Handle`, stats); no live objects;
- streams: `guest` and `contexts.client` return a `GuestClient`, the one channel for exec, files, PTY,
  watch and code (docs/guest-protocol.md); remotely it is the same protocol tunnelled to the node.
  `network.connect` returns a socket connected to a port inside the sandbox (remotely: a tunnel).
  A template build's `log` callback becomes a stream of lines;
- retries: the caller chooses the id of whatever a call creates (sandbox id, volume id, sealed id,
  checkpoint key, layer id: `new_layer_id`), so a retry targets the same object (a commit, flatten or
  memory snapshot that completed returns its layer again), and every removal is idempotent (kill,
  stop, volumes.delete/delete_sealed, checkpoints.drop).
"""

from __future__ import annotations

import secrets
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cove.node.guest_client import GuestClient

if TYPE_CHECKING:
    from cove.node.template_storage import TemplateStorage

# What a node returns for a started sandbox and the control plane persists (JSON): enough to re-adopt
# it later, e.g. {"pid", "start_time", "runtime"}.
Handle = dict[str, Any]
# (volume id, sealed id) pairs: volumes to copy at the same instant as a sandbox's files.
Seal = tuple[tuple[str, str], ...]


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


def new_layer_id(kind: str) -> str:
    """An id for a layer a call is to make (`kind`: snap, flat…), chosen by the caller before the call
    so that a retry makes no second layer."""
    return f"{kind}-{secrets.token_hex(8)}"


class Volumes(Protocol):
    """Named persistent storage mounted into sandboxes (docs/volumes.md)."""

    limits: bool  # can the node enforce a volume's size limit?

    async def create(self, volume_id: str, size_mb: int | None) -> None: ...

    async def clone(self, sealed_id: str, volume_id: str, size_mb: int | None) -> None:
        """A new volume with the content of a sealed copy (taken by a snapshot)."""

    async def delete(self, volume_id: str) -> None: ...

    async def delete_sealed(self, sealed_ids: list[str]) -> None: ...

    async def ids(self) -> tuple[set[str], set[str]]:
        """Ids of the volumes and of the sealed copies on this node."""

    def content_path(self, volume_id: str) -> str | None:
        """The volume's directory on this host, for front ends that read and write its files
        (e2b's volume content API); None where the node keeps it out of this host's reach."""

    def buckets_available(self) -> bool:
        """Can sandboxes mount S3-compatible buckets here?"""

    async def buckets_healthy(self, sandbox_id: str, indices: list[int]) -> list[bool]:
        """Is each bucket mount (by its index in the sandbox's mounts) still served?"""


class Snapshots(Protocol):
    """Committed (read-only, immutable) layers, the snapshotter's side of the node."""

    templates: TemplateStorage  # layer building for templates

    async def commit(self, sandbox_id: str, layer_id: str, seal: Seal = ()) -> str:
        """Seal a read-only copy of the sandbox's writable layer as `layer_id`, frozen for that
        instant; returns the id. `seal`: volumes to copy at the same instant."""

    async def flatten(self, layers: list[str], layer_id: str) -> str:
        """The committed layer `layer_id` with the merged content of `layers` (bottom-most first)."""

    async def collect(self, keep: set[str]) -> list[str]:
        """Delete committed layers not in `keep`; returns their ids."""


class Checkpoints(Protocol):
    """Checkpoints of sandboxes' processes, stored on the node under a key."""

    def available(self, runtime: str = "namespaces") -> bool:
        """Can this node checkpoint processes of `runtime`'s sandboxes (hibernate and fork with memory)?"""

    async def hibernate(self, sandbox_id: str, handle: Handle) -> None:
        """Checkpoint every process to disk (under the sandbox's id), then release its memory, mounts
        and cgroups."""

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: Handle, key: str, layer_id: str, seal: Seal = ()
    ) -> str:
        """Checkpoint the processes (under `key`) and seal the files as `layer_id` at the same instant
        (returns it); the sandbox keeps running. `seal`: volumes to copy at that instant too."""

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> Handle:
        """Start `spec` with the processes checkpointed under `key`."""

    async def has(self, key: str) -> bool:
        """Is there a complete checkpoint under `key`?"""

    async def drop(self, key: str) -> None:
        """Delete the checkpoint stored under `key`. Idempotent."""

    async def keys(self) -> set[str]:
        """Keys of every checkpoint, complete or not, stored on this node."""


class Durable(Protocol):
    """Durable copies in the object store (COVE_OBJECT_STORE): committed layers as `layer/<id>` and
    checkpoints as `criu/<key>`, content-addressed and deduplicated (docs/object-storage.md). What
    one node pushes, any node sharing the bucket pulls; the node's own disk is the cache."""

    def available(self) -> bool:
        """Is an object store configured on this node?"""

    async def seal(self, sandbox_id: str, layer_id: str) -> str:
        """Commit the writable layer of a sandbox without processes (hibernated, stopped) as
        `layer_id`; returns it (a retry finds the layer its first try made)."""

    async def push(
        self,
        layers: list[str],
        checkpoint: str | None = None,
        store_as: str | None = None,
        parent_layer: str | None = None,
        parent_checkpoint: str | None = None,
    ) -> dict[str, Any]:
        """Upload the committed `layers` the bucket lacks, then the checkpoint stored under
        `checkpoint` (its key here), as `store_as` (default: the same key).
        `parent_layer`/`parent_checkpoint`: earlier copies of the same sandbox, so that only what changed
        since is read and sent. Returns what was sent ({"layers", "bytes_read", "bytes_stored", "seconds"})."""

    async def pull(self, layers: list[str], checkpoint: str | None = None) -> dict[str, Any]:
        """Download the committed `layers` this node lacks, and the checkpoint `checkpoint` if it is not
        here; every byte is checked, and nothing is left of a download that failed."""

    async def forget(self, layers: list[str], keys: list[str]) -> None:
        """Delete these copies from the bucket (their chunks go at the next collection). Idempotent."""

    async def collect(self, layers: list[str], keys: list[str], older_than_s: float) -> dict[str, Any]:
        """Delete the bucket's layer copies not in `layers` and images not in `keys`, those at least
        `older_than_s` old, then the chunks no copy references (safe while pushes run). Returns
        what went ({"layers_deleted", "images_deleted", "chunks_deleted", "bytes_deleted", ...})."""


class Contexts(Protocol):
    """Code contexts: interpreters inside a sandbox, each reached through its own bridge."""

    status: str  # of the environment code contexts run in ("ready", or why not)

    async def prepare(self, sandbox_id: str, context_id: str, user: str) -> str:
        """Make room for a context's bridge; returns its socket path inside the sandbox."""

    def client(self, sandbox_id: str, context_id: str) -> GuestClient:
        """A client for a context's bridge."""


class Network(Protocol):
    """Egress and ports of the sandboxes on this node (docs/network.md). `network` is a sandbox
    record's network settings (mode, allow, deny), as stored."""

    async def attach(self, sandbox_id: str, handle: Handle, network: dict[str, Any]) -> None:
        """(Re)open the egress proxy in the namespace of the processes started with `handle`."""

    async def detach(self, sandbox_id: str, forget: bool = False) -> None:
        """Close the proxy and its connections (they pin the namespace); `forget`: its counters too."""

    async def set_policy(self, sandbox_id: str, network: dict[str, Any]) -> None:
        """New connections follow `network`'s policy from now on."""

    async def status(self, sandbox_id: str) -> dict[str, Any]:
        """The proxy's address (or why there is none) and its allowed/denied counters."""

    async def connect(self, sandbox_id: str, handle: Handle, port: int) -> socket.socket:
        """A non-blocking socket connected to `port` on the sandbox's loopback. Raises
        `cove.network.sandbox_socket.PortNotOpen`, `SandboxGone` or TimeoutError."""


class NodeAgent(ABC):
    volumes: Volumes
    snapshots: Snapshots
    checkpoints: Checkpoints
    contexts: Contexts
    network: Network
    durable: Durable
    # Changes when sandboxes created from now on would differ (e.g. the kernel environment got
    # built): pooled sandboxes made under an older generation are discarded, not handed out.
    generation: str = ""

    @abstractmethod
    async def start(self) -> None:
        """Prepare the node (templates, directories); called once at server start."""

    @abstractmethod
    def runtime_problem(self, runtime: str) -> str | None:
        """Why this node cannot start sandboxes of `runtime` (None: it can)."""

    @abstractmethod
    def egress(self, runtime: str) -> bool:
        """Can sandboxes of `runtime` reach out through the egress proxy (a network mode other than
        none)? What the runtime declares."""

    @abstractmethod
    async def create(self, spec: SandboxSpec) -> Handle:
        """Start a sandbox; returns its handle."""

    @abstractmethod
    async def restart(self, spec: SandboxSpec) -> Handle:
        """Start a stopped sandbox again over its kept files (fresh processes)."""

    @abstractmethod
    async def stop(self, sandbox_id: str) -> None:
        """Kill every process and release memory, mounts and cgroups, keeping the sandbox's files."""

    @abstractmethod
    async def kill(self, sandbox_id: str, handle: Handle | None) -> None:
        """Kill every process and release every resource (mounts, cgroups, dirs). Idempotent."""

    @abstractmethod
    async def alive(self, sandbox_id: str, handle: Handle) -> bool:
        """Is the sandbox started with `handle` still running (and answering)?"""

    @abstractmethod
    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        """The ids among `(id, handle)` whose sandbox is no longer running."""

    @abstractmethod
    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process (no CPU; memory kept)."""

    @abstractmethod
    async def resume(self, sandbox_id: str) -> None:
        """Thaw a paused sandbox."""

    @abstractmethod
    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        """Apply `spec`'s env, user, workdir and cpu/memory/pids limits to a running sandbox
        (a pooled one being claimed), then thaw it if asked."""

    @abstractmethod
    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        """Resource usage (memory bytes, cpu usec, pids, disk bytes, and bytes out and in through
        its egress: net_out_bytes, net_in_bytes)."""

    @abstractmethod
    async def sweep(self, keep: set[str]) -> list[str]:
        """Release resources of sandboxes this node holds that are not in `keep`; returns their ids."""

    @abstractmethod
    def guest(self, sandbox_id: str) -> GuestClient:
        """A client for the sandbox's guest agent."""

    @abstractmethod
    async def base_template(self) -> TemplateSpec:
        """The default template, built on first use."""

    @abstractmethod
    async def close(self) -> None:
        """Called at server shutdown; running sandboxes stay running."""
