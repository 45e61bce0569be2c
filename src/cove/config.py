"""Server settings, read once from the environment (every knob has a COVE_* variable)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

# Cold starts at once per CPU by default. Measured on 2 cores: cold creates per second were the same
# (within noise) from 1 at a time to 8 and to no limit, as the CPUs are the bound; 2 per CPU did as
# well as any, and a small bound keeps each start short and the rest waiting in order.
STARTING_PER_CPU = 2


def _default_home() -> Path:
    return Path(os.environ.get("COVE_HOME") or Path.home() / ".cove")


def _max_starting() -> int:
    """COVE_MAX_STARTING, or by default STARTING_PER_CPU per CPU this process may run on."""
    value = os.environ.get("COVE_MAX_STARTING", "").strip()
    if value:
        return int(value)
    return STARTING_PER_CPU * len(os.sched_getaffinity(0))


def _guest_python() -> str:
    # Resolve a real interpreter: a pyenv shim on PATH costs ~44 ms per start (DESIGN.md).
    for candidate in (os.environ.get("COVE_GUEST_PYTHON"), "/usr/bin/python3", shutil.which("python3")):
        if candidate and os.path.isfile(candidate) and "shims" not in candidate:
            return os.path.realpath(candidate)
    raise RuntimeError("no python3 interpreter found for the guest agent (set COVE_GUEST_PYTHON)")


@dataclass
class Settings:
    home: Path = field(default_factory=_default_home)
    host: str = "127.0.0.1"
    port: int = 7770
    # The api key to create at start (scripts and tests drive a fresh server with it).
    api_key: str | None = field(default_factory=lambda: os.environ.get("COVE_API_KEY") or None)
    # Parent cgroup of all sandboxes of this server (several servers on one host need distinct ones).
    cgroup_parent: str = field(default_factory=lambda: os.environ.get("COVE_CGROUP_PARENT", "cove"))
    # Host uid/gid range that uid 0..65535 inside every sandbox maps to.
    uid_base: int = field(default_factory=lambda: int(os.environ.get("COVE_UID_BASE", "100000")))
    guest_python: str = field(default_factory=_guest_python)
    default_timeout: int = 300
    max_upload_bytes: int = field(
        default_factory=lambda: int(os.environ.get("COVE_MAX_UPLOAD_BYTES", str(1 << 30)))
    )
    max_output_bytes: int = 16 << 20  # per stream, for buffered (non-streaming) exec
    reaper_interval: float = 1.0
    default_memory_mb: int = 1024
    default_pids: int = 1024
    # Layer storage: auto (btrfs, in a loop-mounted image if the data dir is not btrfs) | btrfs | dirs.
    storage_backend: str = field(default_factory=lambda: os.environ.get("COVE_STORAGE", "auto"))
    storage_image_size: str = field(default_factory=lambda: os.environ.get("COVE_STORAGE_SIZE", "512G"))
    # Snapshot chains longer than this are squashed into one layer in the background.
    flatten_at: int = field(default_factory=lambda: int(os.environ.get("COVE_FLATTEN_AT", "16")))
    # Where process checkpoints (hibernation, memory snapshots) go; default: $COVE_HOME/checkpoints.
    checkpoint_dir: str | None = field(default_factory=lambda: os.environ.get("COVE_CHECKPOINT_DIR") or None)
    # Where the kernel environment for code contexts is built (once per recipe); COVE_KERNEL=0: none.
    kernel_cache: str | None = field(default_factory=lambda: os.environ.get("COVE_KERNEL_CACHE") or None)
    kernel: bool = field(default_factory=lambda: os.environ.get("COVE_KERNEL", "1") != "0")
    # Where `debian:<suite>` template bases are debootstrapped (once per host); default $COVE_HOME/debian.
    debian_cache: str | None = field(default_factory=lambda: os.environ.get("COVE_DEBIAN_CACHE") or None)
    # Host names `{port}-{sandbox id}.{domain}` reach a port inside a sandbox (default: *.localhost,
    # which browsers and curl resolve to loopback). Set it to a wildcard DNS name that points here.
    domain: str | None = field(default_factory=lambda: os.environ.get("COVE_DOMAIN") or None)
    # Egress (docs/network.md): the port of the proxy inside each sandbox (on its own loopback), and
    # names the proxy resolves itself before DNS ("name=ip,name=ip"; they may reach private addresses).
    egress_port: int = field(default_factory=lambda: int(os.environ.get("COVE_EGRESS_PORT", "17770")))
    egress_hosts: str = field(default_factory=lambda: os.environ.get("COVE_EGRESS_HOSTS", ""))
    # How sandboxes reach out: `proxy` (the HTTP proxy in each sandbox, via proxy variables) or
    # `transparent` (a veth per sandbox, every packet judged by host-side nftables, cove's own DNS);
    # the pool the transparent path's /30s come from, its upstream resolver (ip[:port]; default: the
    # host's resolver), and per-sandbox limits (bytes per second each way, 0: none; open connections).
    egress_mode: str = field(default_factory=lambda: os.environ.get("COVE_EGRESS", "proxy"))
    egress_subnet: str = field(default_factory=lambda: os.environ.get("COVE_EGRESS_SUBNET", "10.200.0.0/16"))
    egress_dns: str = field(default_factory=lambda: os.environ.get("COVE_EGRESS_DNS", ""))
    egress_rate: int = field(default_factory=lambda: int(os.environ.get("COVE_EGRESS_RATE", "0")))
    egress_connections: int = field(
        default_factory=lambda: int(os.environ.get("COVE_EGRESS_CONNECTIONS", "512"))
    )
    # The gvisor runtime (docs/runtimes.md): the runsc binary and its platform (ptrace works everywhere;
    # kvm needs real hardware virtualisation).
    runsc: str = field(default_factory=lambda: os.environ.get("COVE_RUNSC", "runsc"))
    runsc_platform: str = field(default_factory=lambda: os.environ.get("COVE_RUNSC_PLATFORM", "ptrace"))
    # Warm pools (docs/pools.md): "name=min:max,..." by template name or snapshot id, used until a
    # pool is set through the API; "" for none. A pool shrinks toward min after pool_idle seconds
    # without a claim.
    pools: str = field(default_factory=lambda: os.environ.get("COVE_POOLS", "base=2:16"))
    pool_idle: float = field(default_factory=lambda: float(os.environ.get("COVE_POOL_IDLE", "120")))
    # Admission (docs/pools.md): creates are refused (503, Retry-After) while the host has less
    # memory available or fewer free pids than this.
    admit_min_memory_mb: int = field(
        default_factory=lambda: int(os.environ.get("COVE_ADMIT_MIN_MEMORY_MB", "256"))
    )
    admit_min_pids: int = field(default_factory=lambda: int(os.environ.get("COVE_ADMIT_MIN_PIDS", "512")))
    # A node holding this many sandboxes (starting, running, paused) takes no more: placement goes
    # to another node, and a fork's children spill over through the object store; 0: no limit.
    node_max_sandboxes: int = field(
        default_factory=lambda: int(os.environ.get("COVE_NODE_MAX_SANDBOXES", "0"))
    )
    # Creates that start a sandbox (pool claims do not) run at most this many at a time, the rest
    # wait in FIFO order; 0: no limit. With max_queued_creates already waiting, a create gets
    # 503 server_busy with Retry-After (128: 100 concurrent creates all pass, and on 2 cores the
    # last of them waits about 4 s).
    max_starting: int = field(default_factory=_max_starting)
    max_queued_creates: int = field(
        default_factory=lambda: int(os.environ.get("COVE_MAX_QUEUED_CREATES", "128"))
    )
    # Audit log entries older than this many days are deleted (docs/tenants.md); 0: kept forever.
    audit_retention_days: float = field(
        default_factory=lambda: float(os.environ.get("COVE_AUDIT_RETENTION_DAYS", "90"))
    )
    # s3://bucket/prefix: durable copies of snapshots and hibernated sandboxes live in this bucket,
    # the node's disk is their cache (docs/object-storage.md; endpoint and keys: the AWS_* variables).
    object_store: str | None = field(default_factory=lambda: os.environ.get("COVE_OBJECT_STORE") or None)
    # Every this many seconds the reaper's holder deletes the bucket's copies that no record names
    # (those at least object_gc_grace_s old: a push records its copy after writing it), then the
    # chunks no copy references (docs/object-storage.md); 0: never.
    object_gc_every_s: float = field(
        default_factory=lambda: float(os.environ.get("COVE_OBJECT_GC_EVERY", "3600"))
    )
    object_gc_grace_s: float = field(
        default_factory=lambda: float(os.environ.get("COVE_OBJECT_GC_GRACE", "600"))
    )
    # postgresql://user@host:port/db: the store is PostgreSQL, shared by every server given the same
    # URL (docs/architecture.md); unset, SQLite in the data dir (`db_path`).
    database_url: str | None = field(default_factory=lambda: os.environ.get("COVE_DATABASE_URL") or None)
    # The fleet (docs/fleet.md): this server's node id (default: made once, kept in the data dir),
    # and where its node API listens for the other servers sharing the database (it listens only
    # when the store is shared; port 0: any free one). `node_advertise` (host:port) is the address
    # the others use, when it differs from the listening one (a container, NAT).
    node_id: str | None = field(default_factory=lambda: os.environ.get("COVE_NODE_ID") or None)
    node_listen: str = field(default_factory=lambda: os.environ.get("COVE_NODE_LISTEN", "127.0.0.1"))
    node_port: int = field(default_factory=lambda: int(os.environ.get("COVE_NODE_PORT", "0")))
    node_advertise: str | None = field(default_factory=lambda: os.environ.get("COVE_NODE_ADVERTISE") or None)
    # Kubernetes (docs/kubernetes.md): a kubeconfig path, or "in-cluster" (the pod's service account);
    # set, this server is also a Kubernetes node that runs the pods bound to it as sandboxes.
    kubeconfig: str | None = field(default_factory=lambda: os.environ.get("COVE_KUBECONFIG") or None)
    demo: bool = False  # `cove serve --demo`: run the demo once the server is up

    @property
    def public_domain(self) -> str:
        return self.domain or f"localhost:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.home / "cove.db"

    @property
    def store_location(self) -> str | Path:
        """Where the store is: the database URL, or else the SQLite file in the data dir."""
        return self.database_url or self.db_path

    @property
    def sandboxes_dir(self) -> Path:
        return self.home / "sandboxes"

    @property
    def storage_dir(self) -> Path:
        return self.home / "storage"
