"""The gvisor runtime: the same sandbox (overlay root, guest agent as pid 1, cgroup limits, no network)
run under gVisor's application kernel (`runsc`), so the sandbox's syscalls never reach the host kernel.

How it fits (measured here, docs/runtimes.md):
- the host prepares the sandbox exactly as for the namespaces runtime (`SandboxHost`: layers, overlay
  root, run dir with the guest code) and writes an OCI bundle over that root;
- `runsc run --detach` starts it inside cove's own cgroup for the sandbox (a small `sh` joins it first,
  so the sentry, the gofer and the ptrace stubs are all in it: freeze, kill and stats work unchanged);
- the agent binds its socket itself in the bind-mounted run dir; `--host-uds=create` makes that a real
  host socket, so the host connects to it like to a namespaces sandbox's;
- `--file-access=shared`: writes go through to the host upper dir at once (disk quota errors surface
  at write time, and a files-only snapshot sees every completed write).
runsc cannot checkpoint a sandbox holding a bound host socket ("Cannot save endpoint with bound host
socket"), so the runtime declares no checkpointer: hibernation and forks keep files only, and memory
snapshots are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import time
from typing import Any

from cove.config import Settings
from cove.node.base import Handle, NodeError, SandboxSpec
from cove.node.guest_client import GuestClient, GuestUnavailable
from cove.node.namespaces.host import RUNTIME_MARKER, SandboxHost
from cove.node.namespaces.launcher import AGENT_SOCKET
from cove.node.runtimes import Checkpointer
from cove.syscalls import process_start_time

log = logging.getLogger("cove.node")

# Docker's default capability set without CAP_NET_RAW (as the namespaces runtime keeps).
CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP",
]  # fmt: skip
# The sentry's Go threads, the gofer and one ptrace stub thread per sandbox thread are host tasks in
# the sandbox's pids cgroup: the sandbox's own limit plus this.
PIDS_SLACK = 512
NOFILE = 65536
# Joins every cgroup dir named in $COVE_CGROUP_PROCS, then becomes runsc (whose children inherit them).
_JOIN_AND_EXEC = 'for f in $COVE_CGROUP_PROCS; do echo $$ > "$f" || exit 125; done; exec "$@"'


@functools.lru_cache(maxsize=8)
def _probe(runsc: str, platform: str) -> tuple[bool, str]:
    path = shutil.which(runsc)
    if path is None:
        return False, f"runsc not found ({runsc!r}; apt-get install runsc, or set COVE_RUNSC)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{path} does not run: {e}"
    if out.returncode != 0:
        return False, f"{path} --version failed: {out.stderr.strip()[:200]}"
    version = out.stdout.splitlines()[0] if out.stdout else "unknown version"
    if platform == "kvm":
        from cove.node.microvm.runtime import detect

        ok, why = detect()
        if not ok and "no hardware virtualisation" in why:
            return False, f"{version} at {path}: platform kvm needs VT-x/AMD-V ({why}); use ptrace"
    return True, f"{version} at {path}, platform {platform}"


def detect(settings: Settings) -> tuple[bool, str]:
    """(usable, what was found or why not)."""
    return _probe(settings.runsc, settings.runsc_platform)


class GvisorRuntime:
    """Holds the same `SandboxHost` as the namespaces runtime (layers, run dir, guest code, cgroups,
    contexts); starts, stops and checks the sandbox through runsc instead of the launcher."""

    name = "gvisor"
    egress = False
    ports = False
    checkpointer: Checkpointer | None = None

    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.settings = host.settings
        self.state_root = host.settings.home / "runsc"
        self.available, self.detail = detect(host.settings)
        self.runsc = shutil.which(host.settings.runsc) or host.settings.runsc

    async def start(self) -> None:
        await asyncio.to_thread(
            lambda: (self.host.guest_code, self.state_root.mkdir(mode=0o700, exist_ok=True))
        )

    def _runsc(self, *args: str) -> list[str]:
        return [
            self.runsc, "--root", str(self.state_root), f"--platform={self.settings.runsc_platform}",
            "--network=none", "--host-uds=create", "--overlay2=none", "--file-access=shared", *args,
        ]  # fmt: skip

    # -- create --------------------------------------------------------------------------
    def _oci_spec(self, spec: SandboxSpec, launch: dict[str, Any]) -> dict[str, Any]:
        rootfs = launch["rootfs"]
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/run/cove",
                "type": "bind",
                "source": launch["run_dir"],
                "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
            },
        ]
        if os.path.isdir(f"{rootfs}/tmp"):  # else runsc puts a tmpfs (sentry memory) on /tmp
            mounts.append(
                {"destination": "/tmp", "type": "bind", "source": f"{rootfs}/tmp", "options": ["rbind"]}
            )
        for b in [*launch["binds"], *launch["host_binds"]]:
            ro = b.get("ro", True) if "type" not in b else bool(b.get("ro"))
            opts = ["rbind", "nosuid", "nodev", "ro" if ro else "rw"]
            mounts.append({"destination": b["dst"], "type": "bind", "source": b["src"], "options": opts})
        limits = launch["limits"]
        resources: dict[str, Any] = {"pids": {"limit": (spec.limits.pids or 1024) + PIDS_SLACK}}
        if limits["memory_bytes"]:
            resources["memory"] = {"limit": limits["memory_bytes"]}  # the sentry's total memory too
        if limits["cpu"]:
            resources["cpu"] = {"quota": int(limits["cpu"] * 100_000), "period": 100_000}
        base = launch["uid_map"][1]
        idmap = [{"containerID": 0, "hostID": base, "size": launch["uid_map"][2]}]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": [
                    *launch.get("loader", []),
                    launch["python"],
                    "-I",
                    "-S",
                    launch["agent"],
                    "--socket",
                    AGENT_SOCKET,
                ],
                "env": ["PATH=/usr/bin:/bin"],
                "cwd": "/",
                "capabilities": {k: CAPS for k in ("bounding", "effective", "permitted")},
                "noNewPrivileges": True,
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE}],
            },
            "root": {"path": rootfs, "readonly": False},
            "hostname": launch["hostname"],
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user")],
                "uidMappings": idmap,
                "gidMappings": idmap,
                "cgroupsPath": "/" + launch["cgroup"],
                "resources": resources,
            },
        }

    def _start(self, spec: SandboxSpec) -> Handle:
        sdir = self.host.sandbox_dir(spec.id)
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / RUNTIME_MARKER).write_text(self.name)  # how the node tells its sandboxes apart
        launch = self.host.prepare(spec)
        bundle = sdir / "bundle"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(self._oci_spec(spec, launch)))
        cg = self.host.cgroup(spec.id)
        cg.create()
        limits = launch["limits"]
        cg.set_limits(limits["memory_bytes"], limits["cpu"], _pids(spec))
        self.host.mount_root(launch)
        self._runsc_delete(spec.id)  # a stale container of that name (a crash) would block the id
        procs = " ".join(os.path.join(d, "cgroup.procs") for d in cg.dirs())
        with open(sdir / "runsc.log", "ab") as logf:
            res = subprocess.run(
                ["/bin/sh", "-c", _JOIN_AND_EXEC, "sh", *self._runsc("run", "--detach", "--bundle", str(bundle), spec.id)],
                env={"COVE_CGROUP_PROCS": procs, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, timeout=60,
            )  # fmt: skip
        if res.returncode != 0:
            raise NodeError(f"runsc failed to start the sandbox: {self._log_tail(spec.id)}")
        pid = self._sandbox_pid(spec.id)
        return {"pid": pid, "start_time": process_start_time(pid), "runtime": self.name}

    def _log_tail(self, sandbox_id: str) -> str:
        try:
            text = (self.host.sandbox_dir(sandbox_id) / "runsc.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-5:])[-1500:] or "(empty log)"

    def _sandbox_pid(self, sandbox_id: str) -> int:
        out = subprocess.run(self._runsc("state", sandbox_id), capture_output=True, text=True, timeout=20)
        try:
            pid = int(json.loads(out.stdout)["pid"])
        except (ValueError, KeyError, TypeError):
            raise NodeError(f"runsc state failed: {out.stderr.strip()[:500]}") from None
        if pid <= 0:
            raise NodeError(f"the sandbox exited at start: {self._log_tail(sandbox_id)}")
        return pid

    async def _wait_ready(self, sandbox_id: str, timeout: float = 20.0) -> None:
        """The agent binds its own socket (there is no ready pipe through runsc): wait for it to answer."""
        socket = self.host.socket_path(sandbox_id)
        guest = GuestClient(socket, connect_timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            if os.path.exists(socket):
                try:
                    await guest.ping()
                    return
                except GuestUnavailable:
                    pass
            if time.monotonic() > deadline:
                raise NodeError(f"the guest agent did not become ready in time: {self._log_tail(sandbox_id)}")
            await asyncio.sleep(0.005)

    async def create(self, spec: SandboxSpec, resume: bool = False) -> Handle:
        if not self.available:
            raise NodeError(f"gvisor runtime unavailable on this host: {self.detail}")
        if not resume and self.host.exists(spec.id):
            raise NodeError(f"sandbox {spec.id} already exists on this node")
        try:
            handle = await asyncio.to_thread(self._start, spec)
            await self._wait_ready(spec.id)
            return handle
        except BaseException:
            if resume:
                await self.stop(spec.id)
            else:
                await self.kill(spec.id)
            raise

    # -- a running sandbox -----------------------------------------------------------------
    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        return await asyncio.to_thread(self.host.dead, sandboxes)

    async def pause(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.host.cgroup(sandbox_id).freeze, True)  # sentry, gofer and stubs

    async def resume(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.host.cgroup(sandbox_id).freeze, False)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await asyncio.to_thread(self.host.configure, spec, thaw, _pids(spec))

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.host.stats, sandbox_id)

    # -- teardown ------------------------------------------------------------------------
    def _runsc_delete(self, sandbox_id: str) -> None:
        if not (self.state_root / sandbox_id).exists() and not any(self.state_root.glob(f"{sandbox_id}*")):
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                self._runsc("delete", "--force", sandbox_id),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
            )  # fmt: skip

    def _stop(self, sandbox_id: str) -> None:
        self.host.release(sandbox_id)  # the cgroup's kill ends the sentry, gofer and stubs at once
        self._runsc_delete(sandbox_id)  # then runsc forgets the container
        for d in _hierarchies(f"{self.settings.cgroup_parent}/{sandbox_id}"):
            with contextlib.suppress(OSError):  # runsc also joins controllers cove leaves alone
                os.rmdir(d)

    async def stop(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._stop, sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        def kill() -> None:
            self._stop(sandbox_id)
            self.host.remove(sandbox_id)

        await asyncio.to_thread(kill)

    async def close(self) -> None:
        def release_parent() -> None:
            for d in _hierarchies(self.settings.cgroup_parent):
                with contextlib.suppress(OSError):  # not empty: sandboxes outlive the server
                    os.rmdir(d)

        await asyncio.to_thread(release_parent)


def _pids(spec: SandboxSpec) -> int:
    """The pids limit of the sandbox's cgroup: its own limit plus runsc's tasks."""
    return (spec.limits.pids or 1024) + PIDS_SLACK


def _hierarchies(name: str) -> list[str]:
    """`name` in every cgroup v1 hierarchy that has it."""
    try:
        roots = os.listdir("/sys/fs/cgroup")
    except OSError:
        return []
    return [d for r in roots if os.path.isdir(d := os.path.join("/sys/fs/cgroup", r, name))]
