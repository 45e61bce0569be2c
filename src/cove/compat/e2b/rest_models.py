"""e2b's control-plane request bodies (camelCase, as the SDK's generated client sends them) and
the network settings cove records from them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cove.network.egress_policy import from_e2b

MAX_TIMEOUT = 30 * 86400  # cove's own bound (e2b's plans stop at 24 h)

Timeout = Annotated[int, Field(ge=0, le=MAX_TIMEOUT, description="seconds")]
Hosts = Annotated[list[Annotated[str, StringConstraints(max_length=512)]], Field(max_length=1024)]


class E2bBody(BaseModel):
    # Newer SDKs send fields this server does not know yet; e2b's API ignores those too.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class AutoResume(E2bBody):
    enabled: bool


class EgressProxy(E2bBody):
    address: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    username: str | None = None
    password: str | None = None
    tls: dict[str, Any] | None = None  # {enabled, serverName, caCert}


class NetworkConfig(E2bBody):
    allow_public_traffic: bool | None = Field(default=None, alias="allowPublicTraffic")
    allow_out: Hosts | None = Field(default=None, alias="allowOut")
    deny_out: Hosts | None = Field(default=None, alias="denyOut")
    dns_servers: Hosts | None = Field(default=None, alias="dnsServers")
    egress_proxy: EgressProxy | None = Field(default=None, alias="egressProxy")
    mask_request_host: Annotated[str, StringConstraints(max_length=512)] | None = Field(
        default=None, alias="maskRequestHost"
    )
    https_ports: list[Annotated[int, Field(ge=1, le=65535)]] | None = Field(default=None, alias="httpsPorts")
    rules: dict[str, list[dict[str, Any]]] | None = None


class NetworkUpdate(NetworkConfig):
    # The SDK sends this one in snake case (its OpenAPI spec names it so).
    allow_internet_access: bool | None = Field(default=None, alias="allow_internet_access")


class VolumeMount(E2bBody):
    name: Annotated[str, StringConstraints(min_length=1, max_length=63)]
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class NewSandbox(E2bBody):
    template_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(alias="templateID")
    timeout: Timeout | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")
    auto_pause_memory: bool | None = Field(default=None, alias="autoPauseMemory")
    auto_resume: AutoResume | None = Field(default=None, alias="autoResume")
    secure: bool | None = None  # every cove sandbox has an envd token; accepted and ignored
    allow_internet_access: bool | None = Field(default=None, alias="allow_internet_access")
    network: NetworkConfig | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[VolumeMount] | None = Field(default=None, alias="volumeMounts", max_length=16)


class ConnectSandbox(E2bBody):
    timeout: Timeout | None = None
    memory: bool | None = None  # False: cold boot from the files (on_resume="reboot")


class ResumeSandbox(E2bBody):
    timeout: Timeout | None = None
    auto_pause: bool | None = Field(default=None, alias="autoPause")


class TimeoutRequest(E2bBody):
    timeout: Timeout


class RefreshRequest(E2bBody):
    duration: Annotated[int, Field(ge=0, le=MAX_TIMEOUT)] | None = None


class PauseRequest(E2bBody):
    memory: bool | None = None
    require_healthy_guest: bool | None = Field(default=None, alias="requireHealthyGuest")


class SnapshotRequest(E2bBody):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    memory: bool | None = None


class ForkRequest(E2bBody):
    timeout: Timeout | None = None
    count: Annotated[int, Field(ge=1, le=20)] = 1


# -- what cove records in SandboxRecord.network ------------------------------------------------
_STORED = (
    "allow_out",
    "deny_out",
    "dns_servers",
    "mask_request_host",
    "https_ports",
    "rules",
)


def network_record(
    cfg: NetworkConfig | None, allow_internet_access: bool | None, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The settings as cove records them (snake case), with the cove egress policy they mean
    (`mode`, `allow`, `deny`: what the proxy enforces). DNS servers, egress proxies and transform
    rules are recorded only."""
    out = dict(base or {})
    out.setdefault("public_traffic", True)
    if cfg is not None:
        for name in _STORED:
            value = getattr(cfg, name)
            if value is not None:
                out[name] = value
        if cfg.allow_public_traffic is not None:
            out["public_traffic"] = cfg.allow_public_traffic
        if cfg.egress_proxy is not None:
            # Secrets are not kept while nothing uses them.
            proxy = cfg.egress_proxy.model_dump(exclude_none=True, exclude={"password"})
            if isinstance(proxy.get("tls"), dict):
                proxy["tls"] = {k: v for k, v in proxy["tls"].items() if k != "caCert"}
            out["egress_proxy"] = proxy
    if allow_internet_access is not None:
        out["allow_internet_access"] = allow_internet_access
        if not allow_internet_access:  # e2b: the same as denying 0.0.0.0/0
            out["deny_out"] = sorted({*out.get("deny_out", []), "0.0.0.0/0"})
    out.update(from_e2b(out.get("allow_out"), out.get("deny_out")))
    return out


def network_out(network: dict[str, Any]) -> dict[str, Any]:
    """The recorded settings in e2b's SandboxNetworkConfig shape."""
    names = {
        "allow_out": "allowOut",
        "deny_out": "denyOut",
        "dns_servers": "dnsServers",
        "mask_request_host": "maskRequestHost",
        "https_ports": "httpsPorts",
        "rules": "rules",
    }
    out: dict[str, Any] = {"allowPublicTraffic": network.get("public_traffic", True)}
    for name, wire in names.items():
        if name in network:
            out[wire] = network[name]
    if network.get("egress_proxy"):
        out["egressProxy"] = network["egress_proxy"]
    return out
