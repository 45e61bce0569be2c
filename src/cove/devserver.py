"""A throwaway cove server in a subprocess, with its own data dir and cgroup parent.

Used by the tests, the benchmarks and anyone who wants a scratch server from Python:
sandboxes survive `restart()`, as they do in production; `close()` kills them and checks that
nothing (mounts, cgroups) was left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

UPLOAD_LIMIT = 32 * 1024 * 1024  # small enough for a test to exceed it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `cove serve` subprocess. Sandboxes survive `restart()`, as they do in production."""

    def __init__(self, tag: str, extra_env: dict[str, str] | None = None, node_only: bool = False) -> None:
        """`node_only`: run `cove node` (a fleet's node with no API; needs COVE_DATABASE_URL)."""
        self.extra_env = extra_env or {}
        self.node_only = node_only
        self.home = Path(tempfile.mkdtemp(prefix=f"cove-test-{tag}-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = "cove_test_" + secrets.token_hex(12)
        self.cgroup_parent = f"cove-test-{tag}-{os.getpid()}"
        self.log = self.home.parent / f"{self.home.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "COVE_HOME": str(self.home),
            "COVE_API_KEY": self.api_key,
            "COVE_CGROUP_PARENT": self.cgroup_parent,
            "COVE_URL": self.url,
            "COVE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            # One kernel environment for every scratch server (built once, on first use).
            "COVE_KERNEL_CACHE": os.environ.get("COVE_KERNEL_CACHE", "/var/cache/cove-test-kernel"),
            # Likewise one debootstrapped Debian base for every test run (docs/templates.md).
            "COVE_DEBIAN_CACHE": os.environ.get("COVE_DEBIAN_CACHE", "/var/cache/cove-test-debian"),
            **self.extra_env,
        }

    def start(self) -> None:
        command = ["node"] if self.node_only else ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cove", *command], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cove {command[0]} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if self.node_only:  # no API to ask: it says when its node API serves
                if b"node API on" in self.log.read_bytes()[offset:]:
                    return
                time.sleep(0.05)
                continue
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"cove serve did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self, api_key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {api_key or self.api_key}"}, timeout=60
        )

    def kill_all(self) -> None:
        with self.client() as c:
            for state in ("running", "starting", "paused", "hibernated"):  # every state holding resources
                for sb in (
                    c.get("/v1/sandboxes", params={"state": state, "limit": 1000}).json().get("items", [])
                ):
                    c.delete(f"/v1/sandboxes/{sb['id']}")

    def close(self) -> None:
        try:
            if self.proc and self.proc.poll() is None and not self.node_only:
                self.kill_all()
        finally:
            self.stop()
            # The server keeps its storage image mounted (sandboxes outlive it); a scratch one goes.
            storage = self.home / "storage"
            if os.path.ismount(storage):
                subprocess.run(["umount", str(storage)], check=False)
            leftovers = leaks(self)
            _drop_network_table(self.home)  # a scratch node's table (a real one keeps it across restarts)
            shutil.rmtree(self.home, ignore_errors=True)
            if leftovers:
                raise AssertionError(f"sandbox resources leaked: {leftovers}")
            self.log.unlink(missing_ok=True)


def leaks(server: Server) -> list[str]:
    """What a closed server left: mounts under its home, cgroups under its parent, processes in
    them or working on its files (CRIU, rclone), and loop devices backed by its storage image."""
    found = []
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if str(server.home) in line]
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if server.cgroup_parent in dirs:
            found.append(os.path.join(root, server.cgroup_parent))
        if root.count("/") > 4:
            dirs[:] = []
    found += [f"process {pid}: {what}" for pid, what in _processes(server)]
    found += _network_leaks(server.home)
    deadline = (
        time.monotonic() + 30
    )  # the kernel detaches an unmounted image's loop device lazily (slower under load)
    while (loops := _loop_devices(server.home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found + [f"loop device {name}" for name in loops if not _going(name)]


def _going(loop: str) -> bool:
    """A loop device set to detach when unused (autoclear), that nothing mounts any more: the kernel's
    deferred release has not run yet (it lags by minutes under heavy IO). It is detached here, so the
    next test does not inherit it; a device without autoclear, or still mounted, is a real leak."""
    try:
        autoclear = Path(f"/sys/block/{loop}/loop/autoclear").read_text().strip() == "1"
        holders = list(Path(f"/sys/block/{loop}/holders").iterdir())
    except OSError:
        return True  # gone meanwhile
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split(" - ")[-1].split()[1:2] == [f"/dev/{loop}"] for line in f)
    if not autoclear or mounted or holders:
        return False
    subprocess.run(["losetup", "-d", f"/dev/{loop}"], check=False, capture_output=True)
    return True


def _network_leaks(home: Path) -> list[str]:
    """Transparent egress's host state of sandboxes that ended: their interfaces and nft chains."""
    from cove.network.transparent import PREFIX, node_tag, table_name

    tag = node_tag(home)
    found = [f"interface {p.name}" for p in Path("/sys/class/net").glob(f"{PREFIX}{tag}*")]
    nft = shutil.which("nft")
    if nft:
        out = subprocess.run([nft, "list", "table", "inet", table_name(home)], capture_output=True, text=True)
        found += [f"nft {line.split()[1]}" for line in out.stdout.splitlines()
                  if line.strip().startswith(("chain cv", "set cv", "counter cv"))]  # fmt: skip
    return found


def _drop_network_table(home: Path) -> None:
    from cove.network.transparent import table_name

    if nft := shutil.which("nft"):
        subprocess.run([nft, "delete", "table", "inet", table_name(home)], capture_output=True)
        # A scratch node that turned IPv4 forwarding on turns it off again when it was the last one.
        others = subprocess.run([nft, "list", "tables"], capture_output=True, text=True).stdout
        if (home / "network-forwarding-was-off").exists() and " cove_" not in others:
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/ipv4/ip_forward").write_text("0")


def _loop_devices(home: Path) -> list[str]:
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(home)):
                found.append(backing.parent.parent.name)
    return found


def _processes(server: Server) -> list[tuple[int, str]]:
    """Processes in the server's cgroups or whose command line names its home (not the server)."""
    own = server.proc.pid if server.proc else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (own, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                cgroup = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv == [""]:  # a zombie (its parent reaps it): it holds nothing but its pid
            continue
        if f"/{server.cgroup_parent}/" in cgroup or any(str(server.home) in a for a in argv):
            found.append((int(entry), " ".join(argv)[:200]))
    return found


def _alive(pid: int | None, start_time: int | None) -> bool:
    """Is `pid` a live process (not a zombie) started at `start_time`, as the node checks it?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return False
    return fields[0] not in ("Z", "X") and (start_time is None or int(fields[19]) == start_time)


def inconsistencies(server: Server) -> list[str]:
    """Where the store and the host disagree, for a quiet server (no operation in flight; running
    or stopped): every sandbox is what its record says, and nothing exists that no record explains.

    Checks: running/paused sandboxes have their pid 1 alive in their cgroup, frozen exactly when
    paused, their root mounted; hibernated ones have files but no processes, mounts or cgroups;
    ended ones have nothing. No cgroup, sandbox dir, writable layer, checkpoint, snapshot layer or
    scratch subvolume without a record; no half-made snapshot; no process outside live sandboxes."""
    from cove.node.namespaces.cgroups import Cgroup

    db = sqlite3.connect(f"file:{server.home / 'cove.db'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        sandboxes = {r["id"]: r for r in db.execute("SELECT * FROM sandboxes")}
        snapshots = list(db.execute("SELECT * FROM snapshots"))
        templates = list(db.execute("SELECT layers FROM templates"))
    finally:
        db.close()
    storage = server.home / "storage"
    sdir, active, layers = server.home / "sandboxes", storage / "active", storage / "layers"
    ckpt = Path(server.env.get("COVE_CHECKPOINT_DIR") or server.home / "checkpoints")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    cgroup_dirs: set[str] = set()
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        if server.cgroup_parent in dirs:
            cgroup_dirs |= {d.name for d in Path(root, server.cgroup_parent).iterdir() if d.is_dir()}
        if root.count("/") > 4:
            dirs[:] = []
    found: list[str] = []
    live: set[str] = set()
    referenced: set[str] = set()
    for sid, r in sandboxes.items():
        state = r["state"]
        has_files = active.joinpath(sid).is_dir()
        if state in ("starting", "running", "paused", "hibernated"):
            live.add(sid)
            referenced.update(json.loads(r["layers"]))
        if state in ("running", "paused"):
            node = json.loads(r["node"])
            cg = Cgroup(f"{server.cgroup_parent}/{sid}")
            if not cg.exists() or node.get("pid") not in cg.pids():
                found.append(f"sandbox {sid} is {state} but its pid 1 is not in its cgroup")
            elif not _alive(node.get("pid"), node.get("start_time")):
                # What the node calls alive (a zombie is not): until the reaper notices, not settled.
                found.append(f"sandbox {sid} is {state} but its pid 1 has exited")
            elif cg.frozen() != (state == "paused"):
                found.append(
                    f"sandbox {sid} is {state} but its cgroup is {'' if cg.frozen() else 'not '}frozen"
                )
            if str(sdir / sid / "rootfs") not in mounts:
                found.append(f"sandbox {sid} is {state} but its root is not mounted")
            if not has_files:
                found.append(f"sandbox {sid} is {state} but has no writable layer")
            if ckpt.joinpath(sid).exists():
                found.append(f"sandbox {sid} is {state} but a checkpoint of it is left")
        elif state == "hibernated":
            if not has_files:
                found.append(f"sandbox {sid} is hibernated but its files are gone")
            if sid in cgroup_dirs or any(m.startswith(str(sdir / sid) + "/") for m in mounts):
                found.append(f"sandbox {sid} is hibernated but still has a cgroup or mounts")
            memory = json.loads(r["checkpoint"]).get("memory")
            if memory and not ckpt.joinpath(sid, "inventory.img").exists():
                found.append(f"sandbox {sid} is hibernated with memory but its checkpoint is gone")
        elif state == "starting":
            found.append(f"sandbox {sid} is still starting")
        elif has_files or sdir.joinpath(sid).exists() or sid in cgroup_dirs or ckpt.joinpath(sid).exists():
            found.append(f"sandbox {sid} is {state} but its files, cgroup or checkpoint remain")
    memory_snaps = set()
    for snap in snapshots:
        if snap["state"] != "ready":
            found.append(f"snapshot {snap['id']} is {snap['state']}")
        referenced.update(json.loads(snap["layers"]))
        if snap["memory"]:
            memory_snaps.add(snap["id"])
    for tpl in templates:
        referenced.update(json.loads(tpl["layers"]))
    for sid in sorted(cgroup_dirs - live):
        found.append(f"cgroup of {sid} without a live sandbox")
    for where in (sdir, active):
        for p in sorted(where.iterdir()) if where.is_dir() else []:
            if p.name not in live:
                found.append(f"{p} without a live sandbox")
    for p in sorted(ckpt.iterdir()) if ckpt.is_dir() else []:
        ok = p.name in memory_snaps or (p.name in sandboxes and sandboxes[p.name]["state"] == "hibernated")
        if not ok:
            found.append(f"checkpoint {p.name} without a hibernated sandbox or memory snapshot")
    for p in sorted(layers.iterdir()) if layers.is_dir() else []:
        # content-addressed layers (the base, template steps) are shared caches; others need a record
        if p.name.startswith(".") or (not p.name.startswith("sha256-") and p.name not in referenced):
            found.append(f"layer {p.name} that nothing references")
    for m in mounts:
        if m.startswith(str(sdir) + "/") and m[len(str(sdir)) + 1 :].split("/")[0] not in live:
            found.append(f"mount {m} of no live sandbox")
        elif m.startswith(str(storage) + "/"):
            found.append(f"mount {m} inside the storage")
    own = server.proc.pid if server.proc and server.proc.poll() is None else None
    for pid, what in _processes(server):
        group = _cgroup_of(pid, server.cgroup_parent)
        if group is not None:
            ok = group in live
        else:  # the server's helpers (its fork server), a live sandbox's rclone
            ok = _parent_of(pid) == own or any(f"{sdir}/{sid}/" in what for sid in live)
        if not ok:
            found.append(f"process {pid} outside any live sandbox: {what}")
    return found


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_of(pid: int, parent: str) -> str | None:
    """The sandbox id of the cgroup (under `parent`) that `pid` is in, if any."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                path = line.rstrip("\n").split(":", 2)[2]
                if f"/{parent}/" in path:
                    return path.split(f"/{parent}/", 1)[1].split("/")[0]
    except OSError:
        pass
    return None
