"""Small typed records returned by the SDK (parsed from the REST API's JSON, see docs/api.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["ApiKey", "EntryInfo", "ExecEvent", "ExecResult", "Limits", "NetworkInfo", "SandboxInfo"]


def _time(value: Any) -> datetime | None:
    """ISO 8601 strings and epoch seconds both become aware UTC datetimes; anything else is None."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _mode(value: Any) -> int:
    """File modes arrive as ints; an octal string ("0644", "0o644") is accepted too."""
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            return 0
    return int(value or 0)


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of a sandbox; ``None`` means unlimited / not set."""

    cpu: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    disk_mb: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Limits:
        data = data or {}
        return cls(
            cpu=_opt_float(data.get("cpu")),
            memory_mb=_opt_int(data.get("memory_mb")),
            pids=_opt_int(data.get("pids")),
            disk_mb=_opt_int(data.get("disk_mb")),
        )


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A sandbox's egress policy (see docs/network.md); ``get_network()`` adds the proxy's counters."""

    mode: str = "none"
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    public_traffic: bool | None = None
    proxy: str | None = None  # its URL inside the sandbox, while it runs
    allowed: int = 0  # connections let through / refused since the server started
    denied: int = 0
    last_denied: dict[str, Any] | None = None
    error: str | None = None
    inject: dict[str, list[str]] = field(default_factory=dict)  # host -> injected header names (no values)
    # Under transparent egress (COVE_EGRESS=transparent): its link's address, interface, resolver.
    transparent: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> NetworkInfo:
        data = data or {}
        return cls(
            mode=str(data.get("mode") or "none"),
            allow=[str(r) for r in data.get("allow") or []],
            deny=[str(r) for r in data.get("deny") or []],
            public_traffic=data.get("public_traffic"),
            proxy=data.get("proxy"),
            allowed=int(data.get("allowed") or 0),
            denied=int(data.get("denied") or 0),
            last_denied=data.get("last_denied"),
            error=data.get("error"),
            inject={str(k): [str(n) for n in v] for k, v in (data.get("inject") or {}).items()},
            transparent=data.get("transparent"),
        )


@dataclass(frozen=True, slots=True)
class SandboxInfo:
    """What the server knows about one sandbox."""

    id: str
    template: str = ""
    state: str = ""
    runtime: str = ""
    created_at: datetime | None = None
    expires_at: datetime | None = None
    timeout: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    limits: Limits = field(default_factory=Limits)
    end_reason: str | None = None
    hibernation: dict[str, Any] | None = None  # after hibernate: {"memory": bool, ...}
    network: NetworkInfo = field(default_factory=NetworkInfo)
    volumes: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "path", "read_only"}]
    mounts: list[dict[str, Any]] = field(default_factory=list)  # buckets, without their keys
    # {"snapshot_every", "copied_at", "memory"}: its copy in the object store (docs/object-storage.md)
    durability: dict[str, Any] = field(default_factory=dict)
    node: str = ""  # the node that holds it (docs/fleet.md)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SandboxInfo:
        return cls(
            id=str(data["id"]),
            template=str(data.get("template") or ""),
            state=str(data.get("state") or ""),
            runtime=str(data.get("runtime") or ""),
            created_at=_time(data.get("created_at")),
            expires_at=_time(data.get("expires_at")),
            timeout=_opt_int(data.get("timeout")),
            metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
            user=data.get("user"),
            workdir=data.get("workdir"),
            limits=Limits.from_dict(data.get("limits")),
            end_reason=data.get("end_reason"),
            hibernation=data.get("hibernation"),
            network=NetworkInfo.from_dict(data.get("network")),
            volumes=list(data.get("volumes") or []),
            mounts=list(data.get("mounts") or []),
            durability=dict(data.get("durability") or {}),
            node=str(data.get("node") or ""),
        )

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of a finished command. A non-zero ``exit_code`` is a normal result."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    duration_ms: float | None = None
    #: True when the server cut the output at its size limit (``/exec`` only; streaming never truncates)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecResult:
        exit_code = data.get("exit_code")
        return cls(
            stdout=str(data.get("stdout") or ""),
            stderr=str(data.get("stderr") or ""),
            exit_code=-1 if exit_code is None else int(exit_code),
            timed_out=bool(data.get("timed_out", False)),
            duration_ms=_opt_float(data.get("duration_ms")),
            truncated=bool(data.get("truncated", False)),
        )


@dataclass(frozen=True, slots=True)
class ExecEvent:
    """One event of a streamed command: ``stdout``/``stderr`` carry ``data``; ``exit`` is last."""

    type: Literal["stdout", "stderr", "exit"] | str
    data: str = ""
    exit_code: int | None = None
    timed_out: bool = False
    duration_ms: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecEvent:
        return cls(
            type=str(data.get("type", "")),
            data=str(data.get("data") or ""),
            exit_code=_opt_int(data.get("exit_code")),
            timed_out=bool(data.get("timed_out", False)),
            duration_ms=_opt_float(data.get("duration_ms")),
        )


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """A file, directory or symlink inside a sandbox."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"] | str
    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    mtime: datetime | None = None
    symlink_target: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntryInfo:
        return cls(
            name=str(data.get("name") or ""),
            path=str(data.get("path") or ""),
            type=str(data.get("type") or "other"),
            size=int(data.get("size") or 0),
            mode=_mode(data.get("mode")),
            permissions=str(data.get("permissions") or ""),
            owner=str(data.get("owner") or ""),
            group=str(data.get("group") or ""),
            mtime=_time(data.get("mtime")),
            symlink_target=data.get("symlink_target"),
        )


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One lifecycle action from the audit log (``cove.audit_log``); ``key_id`` is "" for the server."""

    seq: int
    time: datetime | None
    tenant: str
    key_id: str
    action: str
    object: str
    sandbox: str | None
    outcome: str
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(
            seq=int(data["seq"]),
            time=_time(data.get("time")),
            tenant=str(data.get("tenant") or ""),
            key_id=str(data.get("key_id") or ""),
            action=str(data["action"]),
            object=str(data.get("object") or ""),
            sandbox=data.get("sandbox"),
            outcome=str(data.get("outcome") or ""),
            detail=dict(data.get("detail") or {}),
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key record. ``key`` (the secret) is only set right after creation."""

    id: str
    name: str
    tenant: str = "default"
    admin: bool = False
    created_at: datetime | None = None
    key: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApiKey:
        return cls(
            id=str(data["id"]),
            name=str(data.get("name") or ""),
            tenant=str(data.get("tenant") or "default"),
            admin=bool(data.get("admin", False)),
            created_at=_time(data.get("created_at")),
            key=data.get("key"),
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A sealed instant of a sandbox; ``Sandbox.create(snapshot=info.id)`` starts from it."""

    id: str
    name: str | None = None
    sandbox_id: str = ""
    created_at: datetime | None = None
    layers: int = 0
    memory: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SnapshotInfo:
        return cls(
            id=str(data["id"]),
            name=data.get("name"),
            sandbox_id=str(data.get("sandbox_id") or ""),
            created_at=_time(data.get("created_at")),
            layers=int(data.get("layers") or 0),
            memory=bool(data.get("memory", False)),
        )
