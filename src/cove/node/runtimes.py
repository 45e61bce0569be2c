"""Which sandbox runtimes exist and whether this host can run them (`cove doctor`, create's checks).

Runtimes are siblings behind the node: `namespaces` (the default: Linux namespaces, seccomp, an overlay
root), `gvisor` (the same sandbox under gVisor's application kernel, `runsc`) and `microvm` (a seam:
detected, never started here). docs/runtimes.md compares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cove.config import Settings

DEFAULT = "namespaces"
NAMES = ("namespaces", "gvisor", "microvm")


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    detail: str  # what was found, or why it is unavailable
    features: dict[str, bool | str] = field(default_factory=dict)


def availability(settings: Settings) -> dict[str, Availability]:
    from cove.node import checkpoint
    from cove.node.gvisor.runtime import detect as detect_gvisor
    from cove.node.microvm.runtime import detect as detect_microvm

    criu = checkpoint.available()
    out = {
        "namespaces": Availability(
            "namespaces",
            True,
            "user, pid, mount, net, uts and ipc namespaces; seccomp; no_new_privs",
            {
                "memory_snapshots": criu,
                "hibernate_memory": criu,
                "network_egress": True,
                "ports": True,
            },
        )
    }
    ok, detail = detect_gvisor(settings)
    out["gvisor"] = Availability(
        "gvisor",
        ok,
        detail,
        {
            "memory_snapshots": False,
            "hibernate_memory": False,
            "network_egress": False,
            "ports": False,
        }
        if ok
        else {},
    )
    ok, detail = detect_microvm()
    out["microvm"] = Availability("microvm", ok, detail)
    return out
