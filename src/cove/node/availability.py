"""Which runtimes this host can run and what each can do here (`cove doctor`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cove.config import Settings
from cove.node import checkpoint
from cove.node.gvisor.runtime import GvisorRuntime
from cove.node.gvisor.runtime import detect as detect_gvisor
from cove.node.microvm.runtime import detect as detect_microvm
from cove.node.namespaces.runtime import NamespacesRuntime


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    detail: str  # what was found, or why it is unavailable
    features: dict[str, bool | str] = field(default_factory=dict)


def availability(settings: Settings) -> dict[str, Availability]:
    """Each runtime: can this host run it, and what it can do here (`cove doctor`)."""
    criu = checkpoint.available()
    out = {
        "namespaces": Availability(
            "namespaces",
            NamespacesRuntime.available,
            NamespacesRuntime.detail,
            {
                "memory_snapshots": criu,
                "hibernate_memory": criu,
                "network_egress": NamespacesRuntime.egress,
                "ports": NamespacesRuntime.ports,
            },
        )
    }
    ok, detail = detect_gvisor(settings)
    out["gvisor"] = Availability(
        "gvisor",
        ok,
        detail,
        {
            "memory_snapshots": GvisorRuntime.checkpointer is not None,
            "hibernate_memory": GvisorRuntime.checkpointer is not None,
            "network_egress": GvisorRuntime.egress,
            "ports": GvisorRuntime.ports,
        }
        if ok
        else {},
    )
    ok, detail = detect_microvm()
    out["microvm"] = Availability("microvm", ok, detail)
    return out
