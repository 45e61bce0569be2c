"""The control plane's state, behind one interface: SQLite (sqlite.py, the embedded default) and
PostgreSQL (postgres.py, state shared by several servers) implement it with the same semantics."""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class StoreError(RuntimeError):
    """The database cannot be opened, is damaged, or the store is not open."""


@dataclass
class SandboxRecord:
    id: str
    tenant: str
    template: str
    state: str
    runtime: str
    created_at: float
    updated_at: float
    expires_at: float | None
    timeout: int
    metadata: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    user: str = "user"
    workdir: str = "/home/user"
    limits: dict[str, Any] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)  # the node's handle (pid, start time…)
    end_reason: str | None = None
    layers: list[str] = field(default_factory=list)  # committed layers under its writable one
    auto_resume: bool = True  # calls on a paused/hibernated sandbox resume it (else 409)
    idle_timeout: int = 0  # seconds without API activity before `on_idle` (0 = never)
    on_idle: str = "pause"  # pause | hibernate
    on_timeout: str = "kill"  # kill | hibernate
    checkpoint: dict[str, Any] = field(default_factory=dict)  # how it was hibernated
    # Network and traffic settings ({"public_traffic": bool, ...}); the e2b front end keeps its own here.
    network: dict[str, Any] = field(default_factory=dict)
    # Volumes and bucket mounts (docs/volumes.md), without credentials: those stay on the node.
    mounts: list[dict[str, Any]] = field(default_factory=list)
    # Its template's runtime config (binds, rootfs); empty: the `base` template's.
    template_config: dict[str, Any] = field(default_factory=dict)
    node_id: str = ""  # the node that holds it (docs/fleet.md); "" for the server's own node
    # When a server sharing the store last saw it used (idle timeouts across replicas; docs/fleet.md).
    active_at: float | None = None
    # Its copy in the object store (docs/object-storage.md): {"every": seconds between periodic
    # copies (0: none), "copy": {"key", "layers", "own", "memory", "at"} the latest complete one}.
    durable: dict[str, Any] = field(default_factory=dict)


@dataclass
class VolumeRecord:
    """A named volume of one tenant; its content lives on the node (`storage/volumes/<id>`)."""

    id: str
    tenant: str
    name: str  # unique per tenant
    size_mb: int | None  # None: no limit (the dirs backend cannot enforce one)
    created_at: float
    source: dict[str, Any] = field(default_factory=dict)  # {"snapshot", "volume"} for a copied one
    node_id: str = ""  # the node its content lives on


@dataclass
class SnapshotRecord:
    """A sandbox frozen in time: its layer chain and, with `memory`, its processes' checkpoint."""

    id: str
    tenant: str
    name: str | None
    sandbox_id: str  # the sandbox it was taken from
    state: str  # creating | ready (a `creating` one after a crash is rolled back)
    created_at: float
    layers: list[str] = field(default_factory=list)  # bottom-most first, ending with its own layer
    memory: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # template, env, user, workdir, limits
    node_id: str = ""  # the node its layers (and checkpoint) live on


@dataclass
class TemplateRecord:
    """A named template of one tenant (docs/templates.md): a layer chain plus the defaults of the
    sandboxes made from it. Aliases (`name:tag`) are records of their own sharing `build_id`."""

    id: str
    tenant: str
    name: str  # unique per tenant among ready ones; `name:tag` for a tag
    state: str  # building | ready (a failed build is removed; one left building at start, too)
    created_at: float
    updated_at: float
    build_id: str = ""  # shared by a build's tags (and its memory checkpoint)
    layers: list[str] = field(default_factory=list)  # bottom-most first
    config: dict[str, Any] = field(default_factory=dict)  # binds, rootfs, env, user, workdir, start…
    sizes: list[int] = field(default_factory=list)  # bytes per layer
    base: str = ""  # what it was built from
    steps: list[dict[str, Any]] = field(default_factory=list)  # the build's steps with their layers
    node_id: str = ""  # the node its layers live on


@dataclass
class NodeRecord:
    """A node of the fleet (docs/fleet.md): where its node API listens, the credential that API
    demands, and its heartbeat. The store is the control plane's trust domain: whoever can read it
    can already do anything cove can."""

    id: str
    address: str  # host:port of its node API
    token: str  # its credential: every call and tunnel to the node carries it
    state: str  # ready | left (stopped cleanly); a ready node whose heartbeat is old is lost
    started_at: float
    seen_at: float  # its last heartbeat
    capacity: dict[str, Any] = field(default_factory=dict)  # cpus, memory_mb, runtimes, version


@dataclass
class KeyRecord:
    id: str
    name: str
    tenant: str
    admin: bool
    created_at: float
    hash: str = ""


@dataclass
class AuditEntry:
    """One lifecycle action (docs/tenants.md): who (tenant, key; "" for the server itself), what,
    on which object (`kind/id`), and how it ended ("ok" or an error code)."""

    time: float
    tenant: str
    key_id: str
    action: str  # sandbox.create, sandbox.kill, key.rotate, volume.delete, ...
    object: str  # sandbox/ID, snapshot/ID, key/ID, volume/NAME, ...
    outcome: str
    sandbox: str | None = None  # the sandbox concerned, if any (filterable)
    detail: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # set by the store; newer entries have larger ones


@dataclass
class Page:
    items: list[SandboxRecord]
    next_cursor: str | None


class Store(ABC):
    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    # sandboxes
    @abstractmethod
    async def insert_sandbox(self, rec: SandboxRecord) -> None: ...

    @abstractmethod
    async def get_sandbox(self, sandbox_id: str) -> SandboxRecord | None: ...

    @abstractmethod
    async def update_sandbox(self, sandbox_id: str, expect_state: str | None = None, **fields: Any) -> bool:
        """Update fields; with `expect_state`, only if the current state matches (compare-and-set)."""

    @abstractmethod
    async def list_sandboxes(
        self,
        tenant: str | None,
        states: list[str] | None = None,
        metadata: dict[str, str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page: ...

    @abstractmethod
    async def count_by_state(self) -> dict[str, int]: ...

    # snapshots
    @abstractmethod
    async def insert_snapshot(self, rec: SnapshotRecord) -> None: ...

    @abstractmethod
    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None: ...

    @abstractmethod
    async def update_snapshot(self, snapshot_id: str, **fields: Any) -> bool: ...

    @abstractmethod
    async def list_snapshots(self, tenant: str | None) -> list[SnapshotRecord]: ...

    @abstractmethod
    async def delete_snapshot(self, snapshot_id: str) -> bool: ...

    # volumes
    async def insert_volume(self, rec: VolumeRecord) -> None:
        """Raises ValueError when the tenant already has a volume of that name."""
        raise NotImplementedError

    async def get_volume(self, tenant: str, name: str) -> VolumeRecord | None:
        raise NotImplementedError

    async def get_volume_by_id(self, volume_id: str) -> VolumeRecord | None:
        raise NotImplementedError

    async def list_volumes(self, tenant: str | None) -> list[VolumeRecord]:
        raise NotImplementedError

    async def delete_volume(self, volume_id: str) -> bool:
        raise NotImplementedError

    # templates
    async def insert_template(self, rec: TemplateRecord) -> None:
        raise NotImplementedError

    async def get_template(self, tenant: str, name: str) -> TemplateRecord | None:
        """The tenant's ready template of that name."""
        raise NotImplementedError

    async def list_templates(self, tenant: str | None) -> list[TemplateRecord]:
        raise NotImplementedError

    async def update_template(self, template_id: str, **fields: Any) -> bool:
        raise NotImplementedError

    async def delete_template(self, template_id: str) -> bool:
        raise NotImplementedError

    # settings: small JSON documents by key ("pool:<name>", "quota:<tenant>")
    async def get_setting(self, key: str) -> Any:
        raise NotImplementedError

    async def put_setting(self, key: str, value: Any) -> None:
        raise NotImplementedError

    async def delete_setting(self, key: str) -> bool:
        raise NotImplementedError

    async def list_settings(self, prefix: str) -> dict[str, Any]:
        """Every setting whose key starts with `prefix`, by key."""
        raise NotImplementedError

    # audit log
    async def insert_audit(self, entries: list[AuditEntry]) -> None:
        raise NotImplementedError

    async def list_audit(
        self,
        tenant: str | None,
        actions: list[str] | None = None,
        sandbox: str | None = None,
        obj: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[AuditEntry]:
        """Newest first; `before`: only entries with a smaller seq (the next page)."""
        raise NotImplementedError

    async def prune_audit(self, older_than: float) -> int:
        raise NotImplementedError

    # api keys
    @abstractmethod
    async def insert_key(self, rec: KeyRecord) -> None: ...

    @abstractmethod
    async def key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    @abstractmethod
    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]: ...

    @abstractmethod
    async def delete_key(self, key_id: str) -> bool: ...

    async def update_key_hash(self, key_id: str, key_hash: str) -> KeyRecord | None:
        """Give a key a new secret (rotation); None if there is no such key."""
        raise NotImplementedError

    @abstractmethod
    async def count_keys(self) -> int: ...

    # -- nodes and leases (docs/fleet.md) ----------------------------------------------
    @abstractmethod
    async def put_node(self, rec: NodeRecord) -> None:
        """Insert the node, or replace what is stored under its id (a restarted node)."""

    @abstractmethod
    async def get_node(self, node_id: str) -> NodeRecord | None: ...

    @abstractmethod
    async def list_nodes(self) -> list[NodeRecord]: ...

    @abstractmethod
    async def update_node(self, node_id: str, **changes: Any) -> bool: ...

    @abstractmethod
    async def count_by_node(self, states: list[str]) -> dict[str, int]:
        """How many sandboxes in `states` each node holds."""

    @abstractmethod
    async def take_lease(self, name: str, holder: str, ttl: float, now: float) -> bool:
        """Hold the lease `name` until `now + ttl`: True if it was free, expired or already
        `holder`'s (a renewal), atomically across every server sharing the store."""

    @abstractmethod
    async def drop_lease(self, name: str, holder: str) -> None:
        """Give the lease up, if `holder` holds it."""


def encode_cursor(seq: int) -> str:
    """A `list_sandboxes` page's cursor: the last seq it returned, opaque to clients."""
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError("invalid cursor") from e
