"""Request and response models: the single source of the OpenAPI schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cove.network.egress_policy import Policy, parse_injections, parse_rules
from cove.store.base import AuditEntry, KeyRecord, SandboxRecord, SnapshotRecord, VolumeRecord

UserName = Annotated[str, StringConstraints(pattern=r"^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$")]
AbsPath = Annotated[str, StringConstraints(pattern=r"^/[^\x00]*$", max_length=4096)]
SandboxPath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")]
State = Literal["starting", "running", "paused", "hibernated", "killed", "error", "lost"]


def _check_every(v: int) -> int:
    if 0 < v < 30:  # each copy freezes the sandbox for a checkpoint
        raise ValueError("snapshot_every must be 0 (off) or at least 30 seconds")
    return v


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for k, v in env.items():
        if not k or "=" in k or "\x00" in k or "\x00" in v:
            raise ValueError(f"invalid environment variable name {k!r}")
    return env


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NetworkMode = Literal["none", "allow", "deny", "open"]
Rules = list[Annotated[str, StringConstraints(max_length=300)]]


class NetworkSettings(Strict):
    """A sandbox's egress policy (docs/network.md)."""

    mode: NetworkMode = Field(
        default="none",
        description="none: no egress; allow: only the allow list; deny: all but the deny list; open: all",
    )
    allow: Rules = Field(
        default_factory=list,
        max_length=1024,
        description="HOST[:PORTS] rules: pypi.org, *.pythonhosted.org, 10.0.0.0/8:443, [::1]:8080, *:443",
    )
    deny: Rules = Field(default_factory=list, max_length=1024, description="rules, same form as allow")
    public_traffic: bool | None = Field(
        default=None, description="the sandbox's ports are reachable without a key (default: no)"
    )
    inject: dict[str, dict[str, str]] | None = Field(
        default=None,
        description=(
            "write-only: headers the egress proxy adds to plain-HTTP requests to a host, "
            '{"HOST[:PORT]": {"Authorization": "Bearer ..."}}; kept unless given, {} removes them; '
            "reads show the header names only"
        ),
    )

    @field_validator("allow", "deny")
    @classmethod
    def _rules(cls, rules: list[str], info: ValidationInfo) -> list[str]:
        return [r.text for r in parse_rules(rules, str(info.field_name))]  # a ValueError is a 422

    @field_validator("inject")
    @classmethod
    def _inject(cls, inject: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]] | None:
        if inject is None:
            return None
        return {i.key: dict(i.headers) for i in parse_injections(inject)}  # normalised keys

    def record(self) -> dict[str, Any]:
        """What the sandbox record keeps in `network`."""
        return self.model_dump(exclude_none=True)


class NetworkOut(BaseModel):
    mode: NetworkMode = "none"
    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    public_traffic: bool | None = None
    inject: dict[str, list[str]] = Field(
        default_factory=dict, description="the headers injected per host: names only, never the values"
    )

    @classmethod
    def of(cls, network: dict[str, Any]) -> NetworkOut:
        policy = Policy.of_record(network)
        return cls(
            **policy.as_dict(),
            public_traffic=network.get("public_traffic"),
            inject={i.key: [name for name, _ in i.headers] for i in policy.inject},
        )


class TransparentLink(BaseModel):
    """A sandbox's link under transparent egress (COVE_EGRESS=transparent); nulls while it has none."""

    address: str | None = Field(default=None, description="the sandbox's address on its eth0")
    interface: str | None = Field(default=None, description="the host end of its veth")
    resolver: str | None = Field(default=None, description="cove's DNS server, its only resolver")


class NetworkStatus(NetworkOut):
    proxy: str | None = Field(default=None, description="the proxy's URL inside the sandbox, when it runs")
    transparent: TransparentLink | None = Field(
        default=None, description="its link, where the node gives transparent egress instead of a proxy"
    )
    error: str | None = Field(default=None, description="why the proxy does not run")
    allowed: int = Field(default=0, description="connections let through since the server started")
    denied: int = Field(default=0, description="connections refused since the server started")
    last_denied: dict[str, Any] | None = None


VolumeName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
_Plain = r"^[^\x00-\x1f\x7f]*$"  # no control characters (they would end a line of rclone's config)
_Token = r"^[^\s\x00-\x1f\x7f]+$"
# Where a volume or bucket may be mounted: not over what the sandbox itself is made of.
RESERVED_PATHS = (
    "/proc",
    "/dev",
    "/sys",
    "/run/cove",
    "/usr",
    "/opt/cove",
    "/bin",
    "/lib",
    "/lib64",
    "/sbin",
)


def check_mount_path(path: str) -> str:
    import posixpath

    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise ValueError(f"mount path {path!r} must be absolute and normalized (no '..', '//', trailing '/')")
    for reserved in RESERVED_PATHS:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"mount path {path!r} is reserved ({reserved})")
    return path


MountPath = Annotated[str, StringConstraints(min_length=2, max_length=1024, pattern=_Plain)]


class VolumeMount(Strict):
    name: VolumeName
    path: MountPath = Field(description="absolute path inside the sandbox, e.g. /data")
    read_only: bool = False

    _path = field_validator("path")(check_mount_path)


class BucketMount(Strict):
    """An S3-compatible bucket (or a prefix of it) mounted by rclone on the host; the credentials
    stay there and are never returned."""

    type: Literal["s3"] = "s3"
    bucket: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]
    prefix: Annotated[str, StringConstraints(max_length=1024, pattern=_Plain)] = ""
    endpoint: (
        Annotated[str, StringConstraints(max_length=1024, pattern=r"^https?://[^\s\x00-\x1f\x7f]+$")] | None
    ) = None
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{1,64}$")] | None = None
    access_key_id: Annotated[str, StringConstraints(max_length=256, pattern=_Token)] | None = None
    secret_access_key: Annotated[str, StringConstraints(max_length=1024, pattern=_Token)] | None = None
    path: MountPath
    read_only: bool = False

    _path = field_validator("path")(check_mount_path)

    @model_validator(mode="after")
    def _both_keys(self) -> BucketMount:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither (a public bucket)")
        return self


class CreateVolume(Strict):
    name: VolumeName
    size_mb: int | None = Field(
        default=None, ge=16, le=1 << 24, description="size limit; default 1024 where the node can enforce one"
    )


class VolumeOut(BaseModel):
    name: str
    size_mb: int | None
    created_at: datetime
    source: dict[str, Any] = Field(default_factory=dict, description="the snapshot it was copied from")
    sandboxes: list[str] = Field(default_factory=list, description="live sandboxes that mount it")

    @classmethod
    def of(cls, v: VolumeRecord, sandboxes: list[str] | None = None) -> VolumeOut:
        return cls(
            name=v.name,
            size_mb=v.size_mb,
            created_at=_iso(v.created_at),  # type: ignore[arg-type]
            source=v.source,
            sandboxes=sandboxes or [],
        )


class VolumeList(BaseModel):
    items: list[VolumeOut]


class CreateSandbox(Strict):
    template: Annotated[  # a template, or one of its tags (name:tag)
        str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}(:[a-z0-9][a-z0-9._-]{0,63})?$")
    ] = "base"
    env: dict[str, str] = Field(default_factory=dict, max_length=512)
    workdir: AbsPath | None = None
    user: UserName | None = None
    cpu: float | None = Field(default=None, ge=0.05, le=64, description="CPU cores")
    memory_mb: int | None = Field(default=None, ge=16, le=1 << 20)
    pids: int | None = Field(default=None, ge=8, le=1 << 20)
    disk_mb: int | None = Field(default=None, ge=16, le=1 << 24)
    timeout: int | None = Field(default=None, ge=0, le=30 * 86400, description="seconds; 0 = no timeout")
    metadata: dict[
        Annotated[str, StringConstraints(max_length=128)], Annotated[str, StringConstraints(max_length=1024)]
    ] = Field(default_factory=dict, max_length=64)
    auto_resume: bool = Field(default=True, description="calls on a paused sandbox resume it (else 409)")
    idle_timeout: int = Field(
        default=0, ge=0, le=30 * 86400, description="seconds without API calls before on_idle"
    )
    on_idle: Literal["pause", "hibernate"] = "pause"
    # hibernate_files: hibernate keeping only the files (processes restart on resume)
    on_timeout: Literal["kill", "hibernate", "hibernate_files"] = "kill"
    snapshot_every: int = Field(
        default=0,
        ge=0,
        le=30 * 86400,
        description="seconds of use between periodic copies to the object store (at least 30; 0: none; "
        "docs/object-storage.md)",
    )
    snapshot: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,64}$")] | None = Field(
        default=None, description="start from this snapshot instead of a template"
    )
    runtime: Literal["namespaces", "gvisor", "microvm"] | None = Field(
        default=None,
        description="isolation runtime (docs/runtimes.md); default: the snapshot's, else namespaces",
    )
    network: NetworkSettings = Field(
        default_factory=NetworkSettings, description="egress policy (default: mode none, no egress)"
    )

    volumes: list[VolumeMount] = Field(
        default_factory=list, max_length=16, description="named volumes to mount"
    )
    mounts: list[BucketMount] = Field(default_factory=list, max_length=8, description="buckets to mount")

    _every = field_validator("snapshot_every")(_check_every)

    @model_validator(mode="after")
    def _distinct_paths(self) -> CreateSandbox:
        paths = sorted([v.path for v in self.volumes] + [m.path for m in self.mounts])
        for i in range(1, len(paths)):
            a, b = paths[i - 1], paths[i]
            if b == a or b.startswith(a + "/"):
                raise ValueError(f"mount paths {a!r} and {b!r} overlap")
        return self

    _env = field_validator("env")(_check_env)


class SetTimeout(Strict):
    timeout: int = Field(ge=0, le=30 * 86400, description="seconds from now; 0 = no timeout")


class LimitsOut(BaseModel):
    cpu: float | None = None
    memory_mb: int | None = None
    pids: int | None = None
    disk_mb: int | None = None


class DurabilityOut(BaseModel):
    snapshot_every: int = Field(default=0, description="seconds of use between periodic copies (0: none)")
    copied_at: datetime | None = Field(default=None, description="when its latest copy was made")
    memory: bool = Field(default=False, description="whether that copy holds its processes")

    @classmethod
    def of(cls, durable: dict[str, Any]) -> DurabilityOut:
        copy = durable.get("copy") or {}
        return cls(
            snapshot_every=durable.get("every") or 0,
            copied_at=_iso(copy.get("at")),
            memory=bool(copy.get("memory")),
        )


class SetDurability(Strict):
    snapshot_every: int = Field(
        ge=0,
        le=30 * 86400,
        description="seconds of use between copies to the object store (at least 30; 0: none)",
    )

    _every = field_validator("snapshot_every")(_check_every)


def _iso(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


class SandboxOut(BaseModel):
    id: str
    template: str
    state: State
    runtime: str
    created_at: datetime
    expires_at: datetime | None
    timeout: int
    metadata: dict[str, str]
    user: str
    workdir: str
    limits: LimitsOut
    end_reason: str | None = None
    auto_resume: bool = True
    idle_timeout: int = 0
    on_idle: str = "pause"
    on_timeout: str = "kill"
    hibernation: dict[str, Any] | None = Field(
        default=None, description="how it was hibernated (memory kept or not)"
    )
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="mounted volumes")
    mounts: list[dict[str, Any]] = Field(default_factory=list, description="mounted buckets (no credentials)")
    network: NetworkOut = Field(default_factory=NetworkOut, description="egress policy")
    durability: DurabilityOut = Field(
        default_factory=lambda: DurabilityOut(), description="its copy in the object store"
    )
    node: str = Field(default="", description="the node that holds it; empty for the server's own")

    @classmethod
    def of(cls, r: SandboxRecord) -> SandboxOut:
        return cls(
            id=r.id,
            template=r.template,
            state=r.state,  # type: ignore[arg-type]
            runtime=r.runtime,
            created_at=_iso(r.created_at),  # type: ignore[arg-type]
            expires_at=_iso(r.expires_at),
            timeout=r.timeout,
            metadata=r.metadata,
            user=r.user,
            workdir=r.workdir,
            limits=LimitsOut(**r.limits),
            end_reason=r.end_reason,
            auto_resume=r.auto_resume,
            idle_timeout=r.idle_timeout,
            on_idle=r.on_idle,
            on_timeout=r.on_timeout,
            hibernation=r.checkpoint or None,
            volumes=[
                {"name": m["name"], "path": m["path"], "read_only": m["read_only"]}
                for m in r.mounts
                if m["type"] == "volume"
            ],
            mounts=[m for m in r.mounts if m["type"] != "volume"],
            network=NetworkOut.of(r.network),
            durability=DurabilityOut.of(r.durable),
            node=r.node_id,
        )


class SandboxPage(BaseModel):
    items: list[SandboxOut]
    next_cursor: str | None


class ExecRequest(Strict):
    cmd: Annotated[str, StringConstraints(min_length=1, max_length=1 << 20)] | None = None
    argv: list[Annotated[str, StringConstraints(max_length=1 << 20)]] | None = Field(
        default=None, min_length=1
    )
    cwd: SandboxPath | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: UserName | None = None
    timeout: float | None = Field(default=None, gt=0, le=30 * 86400, description="seconds")
    stdin: str | None = Field(default=None, max_length=16 << 20)

    _env = field_validator("env")(_check_env)

    @model_validator(mode="after")
    def _one_command(self) -> ExecRequest:
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("give exactly one of cmd (a shell string) or argv (a list)")
        if self.argv is not None and any("\x00" in a for a in self.argv):
            raise ValueError("argv must not contain NUL bytes")
        return self


class ExecResult(BaseModel):
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    duration_ms: float
    truncated: bool = False


class Entry(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    mtime: float
    symlink_target: str | None = None


class EntryList(BaseModel):
    entries: list[Entry]


class MkdirRequest(Strict):
    path: SandboxPath
    user: UserName | None = None


class RenameRequest(Strict):
    src: SandboxPath
    dst: SandboxPath
    user: UserName | None = None


class CreateSnapshot(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    memory: bool = Field(default=False, description="also checkpoint the processes (needs CRIU on the node)")
    volumes: Literal["include", "exclude"] = Field(
        default="exclude",
        description="include: seal a copy of each mounted volume (sandboxes made from the snapshot get a "
        "new volume with it); exclude: they mount the same live volumes",
    )


class SnapshotOut(BaseModel):
    id: str
    name: str | None
    sandbox_id: str
    created_at: datetime
    layers: int = Field(description="length of its layer chain")
    memory: bool
    durable: bool = Field(
        default=False,
        description="copied to the object store: it starts on any node (docs/object-storage.md)",
    )
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="volumes it mounts or carries")

    @classmethod
    def of(cls, s: SnapshotRecord) -> SnapshotOut:
        return cls(
            id=s.id,
            name=s.name,
            sandbox_id=s.sandbox_id,
            created_at=_iso(s.created_at),  # type: ignore[arg-type]
            layers=len(s.layers),
            memory=s.memory,
            durable=s.config.get("durable") is True,
            volumes=[
                {"name": v["name"], "path": v["path"], "read_only": v["read_only"], "mode": v["mode"]}
                for v in s.config.get("volumes", [])
            ],
        )


class SnapshotList(BaseModel):
    items: list[SnapshotOut]


class ForkRequest(Strict):
    count: int = Field(default=1, ge=1, le=20)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    volumes: Literal["include", "exclude"] = Field(
        default="exclude", description="include: each child gets its own copy of each volume"
    )


class SandboxList(BaseModel):
    items: list[SandboxOut]


class ForkResult(SandboxList):
    memory: bool = Field(description="whether the children's processes continue from the source's (CRIU)")


class PtySize(Strict):
    rows: int = Field(default=24, ge=1, le=1000)
    cols: int = Field(default=80, ge=1, le=1000)


class StartProcess(Strict):
    cmd: Annotated[str, StringConstraints(min_length=1, max_length=1 << 20)] | None = None
    argv: list[Annotated[str, StringConstraints(max_length=1 << 20)]] | None = Field(
        default=None, min_length=1
    )
    cwd: SandboxPath | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: UserName | None = None
    stdin: bool = Field(default=False, description="keep stdin open for POST …/stdin")
    pty: PtySize | None = Field(default=None, description="run in a terminal of this size")
    tag: Annotated[str, StringConstraints(max_length=128)] | None = None

    _env = field_validator("env")(_check_env)

    @model_validator(mode="after")
    def _one_command(self) -> StartProcess:
        if (self.cmd is None) == (self.argv is None):
            raise ValueError("give exactly one of cmd (a shell string) or argv (a list)")
        return self


class ProcessOut(BaseModel):
    id: str
    pid: int | None = None
    cmd: str | None = None
    argv: list[str] | None = None
    tag: str | None = None
    pty: dict[str, int] | None = Field(default=None, description="terminal size, for a process in a PTY")
    running: bool = True
    exit_code: int | None = None
    started_at: float | None = None
    ended_at: float | None = None


class ProcessList(BaseModel):
    items: list[ProcessOut]


class StdinData(Strict):
    data: str = Field(max_length=16 << 20, description="text to write to the process's stdin")


class SignalRequest(Strict):
    signal: Annotated[str, StringConstraints(pattern=r"^(SIG[A-Z0-9]+|[0-9]{1,2})$")] = "SIGTERM"


class WaitRequest(Strict):
    timeout: float = Field(default=30, ge=0, le=3600)


class WaitResult(BaseModel):
    running: bool
    exit_code: int | None = None


class CreateKey(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    tenant: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")] = "default"
    admin: bool = False


class KeyOut(BaseModel):
    id: str
    name: str
    tenant: str
    admin: bool
    created_at: datetime

    @classmethod
    def of(cls, k: KeyRecord) -> KeyOut:
        return cls(id=k.id, name=k.name, tenant=k.tenant, admin=k.admin, created_at=_iso(k.created_at))  # type: ignore[arg-type]


class NewKey(KeyOut):
    key: str = Field(description="the secret; shown only once")


class KeyList(BaseModel):
    items: list[KeyOut]


class AuditOut(BaseModel):
    seq: int
    time: datetime
    tenant: str
    key_id: str = Field(description='the key that acted; "" for the server itself (timeouts, idle policies)')
    action: str
    object: str = Field(description="kind/id of what was acted on")
    sandbox: str | None
    outcome: str = Field(description='"ok", or the error code the action ended with')
    detail: dict[str, Any]

    @classmethod
    def of(cls, e: AuditEntry) -> AuditOut:
        return cls(
            seq=e.seq,
            time=_iso(e.time),  # type: ignore[arg-type]
            tenant=e.tenant,
            key_id=e.key_id,
            action=e.action,
            object=e.object,
            sandbox=e.sandbox,
            outcome=e.outcome,
            detail=e.detail,
        )


class AuditList(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None
