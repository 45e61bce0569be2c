"""`cove doctor`: what this host supports, and why not where it doesn't."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

from cove.node.checkpoint import CRIU, criu_version, stray_tables
from cove.node.namespaces import cgroups, seccomp


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def checks() -> list[Check]:
    out = [
        Check(
            "root",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else "cove serve must run as root",
        ),
        Check("kernel", True, f"{platform.system()} {platform.release()} ({platform.machine()})"),
    ]
    userns = _read("/proc/sys/user/max_user_namespaces")
    out.append(
        Check("user namespaces", userns not in ("", "0"), f"max_user_namespaces={userns or 'unknown'}")
    )
    fs = _read("/proc/filesystems")
    out.append(
        Check(
            "overlayfs",
            "overlay" in fs,
            "overlay listed in /proc/filesystems" if "overlay" in fs else "modprobe overlay",
        )
    )
    lay = cgroups.layout()
    have = sorted(set(lay.v1) | (set(lay.v2_controllers) & {"memory", "pids", "cpu"}))
    missing = {"memory", "pids", "cpu"} - set(have)
    out.append(
        Check(
            "cgroups",
            not missing,
            f"{lay.kind} layout; controllers {', '.join(have) or 'none'}"
            + (f"; missing {', '.join(sorted(missing))}" if missing else ""),
        )
    )
    release = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2] if x.isdigit())
    v2kill = bool(lay.v2) and release >= (5, 14)  # cgroup.kill exists in non-root v2 groups since 5.14
    fdm = False
    if lay.v2:
        with open("/proc/self/mountinfo") as f:
            fdm = any("favordynmods" in line and f" {lay.v2} " in line for line in f)
    out.append(
        Check(
            "cheap cgroup moves",
            fdm,
            "favordynmods is set"
            if fdm
            else "cove serve sets favordynmods at start (saves ≈15 ms per create)",
            False,
        )
    )
    out.append(
        Check("cgroup.kill", v2kill, "whole-tree kill" if v2kill else "falls back to freeze + SIGKILL", False)
    )
    out.append(
        Check(
            "seccomp",
            seccomp.supported(),
            f"filter for {platform.machine()}"
            if seccomp.supported()
            else "no syscall table for this architecture",
            False,
        )
    )
    from cove.storage.layers import btrfs_available

    bt = btrfs_available()
    out.append(
        Check(
            "btrfs storage",
            bt,
            "constant-time snapshots (btrfs subvolumes)"
            if bt
            else "snapshots will copy files (apt-get install btrfs-progs)",
            False,
        )
    )
    criu = criu_version()
    out.append(
        Check(
            "CRIU >= 4.1",
            criu is not None and criu >= (4, 1),
            f"criu {'.'.join(map(str, criu))} at {CRIU}: hibernate and fork keep memory"
            if criu and criu >= (4, 1)
            else "missing or too old: hibernate and fork restart processes instead (scripts/install-criu.sh)",
            False,
        )
    )
    left = stray_tables()
    out.append(
        Check(
            "host nftables",
            not left,
            "no tables left by CRIU"
            if not left
            else f"{len(left)} left by killed CRIU dumps (of older cove), on every host packet's path: "
            f"`nft delete table inet NAME` for {', '.join(left[:3])}{' …' if len(left) > 3 else ''}",
            False,
        )
    )
    from cove.network.transparent import problem

    why = problem()
    mode = os.environ.get("COVE_EGRESS", "proxy")
    out.append(
        Check(
            "transparent egress",
            why is None,
            (
                f"veth + nftables per sandbox, cove's DNS (COVE_EGRESS={mode}; gvisor sandboxes stay on mode none)"
            )
            if why is None
            else f"unavailable ({why}): COVE_EGRESS=proxy only",
            mode == "transparent",
        )
    )
    py = shutil.which("python3", path="/usr/bin")
    out.append(
        Check("guest python", py is not None, py or "/usr/bin/python3 missing: the base template needs it")
    )
    out.extend(runtime_checks())
    for tool, why in (("bwrap", "benchmark floor"), ("runc", "benchmark floor")):
        path = shutil.which(tool)
        out.append(Check(tool, path is not None, path or f"not installed ({why} only)", False))
    return out


def runtime_checks() -> list[Check]:
    """One line per sandbox runtime (docs/runtimes.md): available or why not, and its features."""
    from cove.config import Settings
    from cove.node.availability import availability

    out = []
    for rt in availability(Settings()).values():
        feats = ", ".join(f"{k.replace('_', ' ')} {'yes' if v else 'no'}" for k, v in rt.features.items())
        out.append(
            Check(f"runtime {rt.name}", rt.available, rt.detail + (f" ({feats})" if feats else ""), False)
        )
    return out
