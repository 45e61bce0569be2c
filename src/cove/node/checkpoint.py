"""Process checkpoint/restore with CRIU (≥ 4.1: Debian bookworm's 3.17 fails on current kernels).

The command lines follow the shape of a cove sandbox (docs/architecture.md):
- host bind mounts (/usr, the /dev nodes, /proc masks) are external mounts, found automatically
  (`mnt[]` at dump, `--ext-mount-map auto` at restore); the run dir at /run/cove is mapped
  explicitly, so a clone gets its own;
- the cgroup2 hierarchy is dumped too (the empty controller name), so restored tasks are back in the
  unified cgroup that cove freezes and kills through;
- the tree is frozen through the unified cgroup (the one cove itself freezes: mixing freezers hangs);
- cgroups are managed `soft` under `--cgroup-root`: cove creates them with their limits first.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CRIU = os.environ.get("COVE_CRIU") or (
    "/usr/local/sbin/criu" if os.path.exists("/usr/local/sbin/criu") else (shutil.which("criu") or "criu")
)
TIMEOUT = 300.0
DONE = "DONE"  # written into an image dir once the dump is complete


class CheckpointError(OSError):
    """CRIU failed; the message carries its own error lines."""


@functools.cache
def criu_version() -> tuple[int, ...] | None:
    try:
        out = subprocess.run([CRIU, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def available() -> bool:
    if os.environ.get("COVE_CHECKPOINT", "1") == "0":
        return False
    v = criu_version()
    return v is not None and v >= (4, 1)


def _errors(log: Path) -> str:
    """The meaningful error lines of a CRIU log (it always prints a few harmless ones)."""
    noise = ("RLIMIT_NOFILE", "iptables", "Address already assigned", "address already assigned")
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errs = [ln.strip() for ln in lines if "Error" in ln and not any(n in ln for n in noise)]
    return "; ".join(errs[-3:]) or (lines[-1].strip() if lines else "no output")


def _run(argv: list[str], log: Path, what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise CheckpointError(f"criu {what} timed out after {TIMEOUT:.0f} s") from e
    if done.returncode != 0:
        detail = _errors(log) if log.exists() else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"criu {what} failed: {detail}")


def dump(
    pid: int,
    images: Path,
    freeze_cgroup: str,
    leave_running: bool,
    externals: Sequence[tuple[str, str]] = (),
) -> None:
    """Checkpoint the tree under `pid` into `images`; without `leave_running` the tree is killed.

    `externals`: (mount path inside, key) of mounts a restore may bind from elsewhere (volumes)."""
    images.mkdir(parents=True, exist_ok=True)
    argv = [
        CRIU, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log",
        "--network-lock", "nftables", "--tcp-established", "--file-locks",
        "--external", "mnt[]", "--external", "mnt[/run/cove]:run",
        "--cgroup-dump-controller", "memory", "--cgroup-dump-controller", "pids",
        "--cgroup-dump-controller", "cpu", "--cgroup-dump-controller", "freezer",
        "--cgroup-dump-controller", "",
        "--freeze-cgroup", freeze_cgroup,
    ]  # fmt: skip
    for path, key in externals:
        argv += ["--external", f"mnt[{path}]:{key}"]
    if leave_running:
        argv.append("--leave-running")
    _run(argv, images / "dump.log", "dump")
    (images / DONE).write_text(str(pid))


def transient(error: Exception) -> bool:
    """A dump that failed on a handler just finishing a request: its socket's host-side peer is
    already gone ("Unix socket … not found"). Let it finish (thaw) and dump again."""
    return "sk-unix" in str(error)


def complete(images: Path) -> bool:
    return (images / DONE).exists()


def restore(
    images: Path, root: str, run_dir: str, cgroup: str, log: Path, externals: Sequence[tuple[str, str]] = ()
) -> int:
    """Restore an image into a prepared root (overlay mounted, cgroups made); returns pid 1's host pid."""
    pidfile = log.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    argv = [
        CRIU, "restore", "-D", str(images), "-o", str(log), "--root", root,
        "--restore-detached", "--pidfile", str(pidfile),
        "--tcp-established", "--file-locks",
        "--ext-mount-map", "auto", "--external", f"mnt[run]:{run_dir}",
        "--manage-cgroups=soft", "--cgroup-root", "/" + cgroup.strip("/"),
    ]  # fmt: skip
    for key, host_path in externals:  # (key, host dir): a volume, or its copy for a new sandbox
        argv += ["--external", f"mnt[{key}]:{host_path}"]
    _run(argv, log, "restore")
    try:
        return int(pidfile.read_text().strip())
    finally:
        pidfile.unlink(missing_ok=True)
