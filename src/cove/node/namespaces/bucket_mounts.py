"""S3-compatible buckets as directories in a sandbox: rclone's FUSE mount, run on the host.

The credentials never enter the sandbox: rclone runs as a host process (its own session, so it
outlives a server restart as the sandbox does) with its config in a host-only file (0600, in a 0700
directory outside the sandbox's root and run dir); it mounts the bucket at
`<sandbox dir>/fuse/<n>/mnt`, which the launcher then binds into the sandbox like a volume. The
sandbox sees files only: no process, environment, command line or config of rclone.

Layout per mount: `fuse/<n>/{rclone.conf, mnt/, cache/, rclone.log, daemon.json}`; daemon.json
records rclone's pid and start time, so a restarted server finds it again (a reused pid is told
apart by its start time).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from cove import syscalls
from cove.syscalls import process_start_time

log = logging.getLogger("cove.node")
RCLONE = os.environ.get("COVE_RCLONE") or shutil.which("rclone") or "/usr/bin/rclone"
MOUNT_TIMEOUT = 20.0


class BucketMountError(OSError):
    """rclone could not mount the bucket; the message carries its last log lines."""


def available() -> bool:
    return os.path.exists(RCLONE) and os.path.exists("/dev/fuse")


def _config(spec: dict[str, Any]) -> str:
    lines = ["[bucket]", "type = s3", f"provider = {'Other' if spec.get('endpoint') else 'AWS'}"]
    if spec.get("access_key_id"):
        lines += [
            "env_auth = false",
            f"access_key_id = {spec['access_key_id']}",
            f"secret_access_key = {spec['secret_access_key']}",
        ]
    if spec.get("endpoint"):
        lines += [f"endpoint = {spec['endpoint']}", "force_path_style = true"]
    lines.append(f"region = {spec.get('region') or 'us-east-1'}")
    return "\n".join(lines) + "\n"


def _remote(spec: dict[str, Any]) -> str:
    prefix = (spec.get("prefix") or "").strip("/")
    return f"bucket:{spec['bucket']}" + (f"/{prefix}" if prefix else "")


def _is_mount(path: Path) -> bool:
    """From the mount table: os.path.ismount stats the path, which fails on a FUSE mount whose
    daemon died (ENOTCONN), and such a mount must still be found and unmounted."""
    want = str(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if "\\" in point:  # octal escapes of spaces and the like
                point = point.encode().decode("unicode_escape")
            if point == want:
                return True
    return False


def mount_dir(sandbox_dir: Path, index: int) -> Path:
    return sandbox_dir / "fuse" / str(index)


def write_config(sandbox_dir: Path, index: int, spec: dict[str, Any]) -> None:
    """The credentials, host-only: written once at create, reused when the sandbox restarts."""
    d = mount_dir(sandbox_dir, index)
    d.parent.mkdir(mode=0o700, exist_ok=True)
    d.mkdir(mode=0o700, exist_ok=True)
    conf = d / "rclone.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_config(spec))
    settings = {k: spec.get(k) for k in ("bucket", "prefix", "read_only")}
    (d / "mount.json").write_text(json.dumps(settings))


def start(sandbox_dir: Path, index: int, owner: tuple[int, int]) -> Path:
    """Start rclone for a mount whose config is written; returns the host dir it is mounted at."""
    d = mount_dir(sandbox_dir, index)
    settings = json.loads((d / "mount.json").read_text())
    mnt = d / "mnt"
    if _daemon_alive(d) and _is_mount(mnt):
        return mnt
    stop(d)
    mnt.mkdir(mode=0o700, exist_ok=True)
    argv = [
        RCLONE, "mount", _remote(settings), str(mnt),
        "--config", str(d / "rclone.conf"), "--cache-dir", str(d / "cache"),
        "--log-file", str(d / "rclone.log"), "--log-level", "NOTICE",
        "--allow-other", "--uid", str(owner[0]), "--gid", str(owner[1]), "--umask", "022",
        "--vfs-cache-mode", "writes", "--vfs-write-back", "1s", "--dir-cache-time", "5s",
        "--attr-timeout", "1s", "--no-modtime",
    ]  # fmt: skip
    if settings.get("read_only"):
        argv.append("--read-only")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not in the server's process group: it outlives a server restart
        env={"PATH": "/usr/bin:/bin", "HOME": str(d)},
    )
    (d / "daemon.json").write_text(json.dumps({"pid": proc.pid, "start_time": process_start_time(proc.pid)}))
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not _is_mount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(d)
            raise BucketMountError(f"mounting bucket {settings['bucket']!r} failed: {_log_tail(d)}")
        time.sleep(0.02)
    _children.append(proc)  # reaped by reap() while this server runs
    return mnt


_children: list[subprocess.Popen[bytes]] = []


def reap() -> None:
    """Collect exited rclone children of this server (they would stay zombies otherwise)."""
    for proc in list(_children):
        if proc.poll() is not None:
            _children.remove(proc)


def _log_tail(d: Path) -> str:
    try:
        lines = [ln for ln in (d / "rclone.log").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "rclone left no log"
    return " | ".join(lines[-3:])[-1000:] or "rclone exited without a message"


def _daemon(d: Path) -> dict[str, int] | None:
    try:
        info = json.loads((d / "daemon.json").read_text())
        if process_start_time(info["pid"]) == info["start_time"]:
            return info
    except (OSError, ValueError, KeyError):
        pass
    return None


def _daemon_alive(d: Path) -> bool:
    return _daemon(d) is not None


def stop(d: Path) -> None:
    """Unmount and end rclone. The mount goes first (lazily: the sandbox's detached copy may still
    be referenced for a moment), so nothing below `mnt` can be reached by a later rmtree."""
    mnt = d / "mnt"
    while _is_mount(mnt):  # stacked mounts are possible after a crash: take them all
        syscalls.umount(str(mnt), syscalls.MNT_DETACH)
    info = _daemon(d)
    if info is not None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(info["pid"], sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _daemon(d) is not None and time.monotonic() < deadline:
                reap()
                time.sleep(0.02)
            if _daemon(d) is None:
                break
    (d / "daemon.json").unlink(missing_ok=True)
    shutil.rmtree(d / "cache", ignore_errors=True)
    reap()


def indices(sandbox_dir: Path) -> list[int]:
    root = sandbox_dir / "fuse"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def stop_all(sandbox_dir: Path) -> None:
    for i in indices(sandbox_dir):
        stop(mount_dir(sandbox_dir, i))


def mounted(sandbox_dir: Path) -> bool:
    """Is any bucket of this sandbox still mounted on the host? (Then its dir must not be removed.)"""
    return any(_is_mount(mount_dir(sandbox_dir, i) / "mnt") for i in indices(sandbox_dir))


def healthy(sandbox_dir: Path, index: int) -> bool:
    d = mount_dir(sandbox_dir, index)
    return _daemon_alive(d) and _is_mount(d / "mnt") and _answers(d / "mnt")


def _answers(mnt: Path) -> bool:
    try:
        os.stat(mnt)
        return True
    except OSError:  # ENOTCONN: the daemon is gone (or hangs up)
        return False
