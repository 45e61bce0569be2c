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

import contextlib
import functools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

CRIU = os.environ.get("COVE_CRIU") or (
    "/usr/local/sbin/criu" if os.path.exists("/usr/local/sbin/criu") else (shutil.which("criu") or "criu")
)
# A dump runs in a network namespace of its own: `--tcp-established` makes CRIU add an nftables table
# ("CRIU-<run id>") to its own namespace for the run, and a CRIU that is killed (a timeout, a server
# that died) leaves it behind, where every packet of the host would pass through it from then on.
# Its loopback is brought up first: CRIU probes TCP repair over it.
UNSHARE, IP = shutil.which("unshare"), shutil.which("ip")
OWN_NETNS = (
    [UNSHARE, "--net", "--", "sh", "-c", f'{IP} link set lo up && exec "$0" "$@"'] if UNSHARE and IP else []
)
TIMEOUT = 300.0
GONE_GRACE = 5.0  # seconds CRIU may run on after the tree is gone (see _run)
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


def _run(
    argv: list[str], log: Path, what: str, images: Path, alive: Callable[[], bool] | None = None
) -> None:
    """Run CRIU; with `alive`, stop it once the tree it works on has been gone for GONE_GRACE
    seconds (a dump whose sandbox was killed meanwhile waits on its dead tasks until the timeout
    otherwise). The grace matters: a successful dump kills the tree itself and then finishes."""
    with subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + TIMEOUT
        gone_since: float | None = None
        while True:
            try:
                proc.wait(0.1 if alive else TIMEOUT)
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if alive is not None and gone_since is None and not alive():
                    gone_since = now
                gone = gone_since is not None and now - gone_since > GONE_GRACE
                if gone or now > deadline:
                    proc.kill()
                    proc.wait()
                    release(images)
                    why = "the sandbox's processes exited" if gone else f"timed out after {TIMEOUT:.0f} s"
                    raise CheckpointError(f"criu {what} stopped: {why}") from None
        stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        detail = _errors(log) if log.exists() else (stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"criu {what} failed: {detail}")


def dump(
    pid: int,
    images: Path,
    freeze_cgroup: str,
    leave_running: bool,
    externals: Sequence[tuple[str, str]] = (),
    alive: Callable[[], bool] | None = None,
) -> None:
    """Checkpoint the tree under `pid` into `images`; without `leave_running` the tree is killed.

    `externals`: (mount path inside, key) of mounts a restore may bind from elsewhere (volumes);
    `alive`: whether the tree is still there (the dump stops when it is not)."""
    images.mkdir(parents=True, exist_ok=True)
    argv = [
        *OWN_NETNS, CRIU, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log",
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
    _run(argv, images / "dump.log", "dump", images, alive)
    (images / DONE).write_text(str(pid))


def stray_tables() -> list[str]:
    """nftables tables CRIU made in the host's network namespace (`inet CRIU-…`): only a CRIU that was
    killed mid-run leaves one, and cove's dumps no longer run here (see OWN_NETNS)."""
    nft = shutil.which("nft")
    if not nft:
        return []
    out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.startswith("table inet CRIU")]


# Dump failures that a moment of running resolves: a handler just finishing a request (its socket's
# host-side peer is already gone, "Unix socket … not found"), a task caught in uninterruptible I/O
# ("Unseizable non-zombie … state D"), a TCP connection mid-handshake ("In-flight connections").
TRANSIENT = ("sk-unix", "Unseizable non-zombie", "In-flight connections")


def transient(error: Exception) -> bool:
    """A dump that failed on a passing state of the sandbox: let it run (thaw) and dump again."""
    return any(mark in str(error) for mark in TRANSIENT)


def complete(images: Path) -> bool:
    """A finished dump: marked DONE, or CRIU logged success (the server died before marking it)."""
    if (images / DONE).exists():
        return True
    try:
        with open(images / "dump.log", "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 512))
            return b"Dumping finished successfully" in f.read()
    except OSError:
        return False


def stray(root: Path) -> list[int]:
    """CRIU processes working on images under `root` (left running by a server that died)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and os.path.basename(argv[0]) == b"criu"
            and any(a.startswith(os.fsencode(root) + b"/") for a in argv)
        ):
            found.append(int(entry))
    return found


def wait_stray(root: Path, timeout: float = 60.0) -> list[int]:
    """Let dumps and restores a dead server started finish (a dump ends its sandbox's processes;
    what it leaves is adopted), then kill any still running after `timeout`. Returns their pids."""
    import signal

    seen = stray(root)
    deadline = time.monotonic() + timeout
    while (left := stray(root)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if seen:
        release(root)
    return seen


def release(images: Path) -> None:
    """Unmount what a killed CRIU left mounted under `images` (its cgroup yard): deleting the
    directory with a cgroup hierarchy mounted in it would walk into the host's cgroups."""
    prefix = str(images).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def restore(
    images: Path,
    root: str,
    run_dir: str,
    cgroup: str,
    log: Path,
    externals: Sequence[tuple[str, str]] = (),
    alive: Callable[[], bool] | None = None,
) -> int:
    """Restore an image into a prepared root (overlay mounted, cgroups made); returns pid 1's host pid.

    `alive`: whether the restored tree is still there (the restore stops when it is not)."""
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
    _run(argv, log, "restore", images, alive)
    try:
        return int(pidfile.read_text().strip())
    finally:
        pidfile.unlink(missing_ok=True)
