"""The host-side work every runtime shares: a sandbox's directories, its overlay root over the layer
chain, the guest code, the sources of its mounts, its cgroup, code contexts' socket dirs, and the
sealing of its files. A runtime holds one `SandboxHost` (composition) and adds only how it starts,
stops and checks the sandbox's processes (the launcher, runsc).

Everything here blocks (mounts, cgroup writes, directory trees): runtimes call it from worker threads,
so the server's event loop never waits on the kernel.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from cove import stages, syscalls
from cove.config import Settings
from cove.node.base import Handle, NodeError, SandboxSpec, Seal
from cove.node.namespaces import bucket_mounts, cgroups
from cove.storage import kernel_layer
from cove.storage.layers import LayerStore
from cove.storage.volumes import VolumeStore
from cove.syscalls import process_start_time

GUEST_DIR = Path(__file__).resolve().parent.parent.parent / "guest"
# The agent's modules, linked flat into each sandbox's /run/cove as .pyc (agent.py imports them from
# there); the kernel bridge stays source, run by the kernel venv's python.
GUEST_MODULES = sorted(p for p in GUEST_DIR.glob("*.py") if p.name not in ("__init__.py", "kernel_bridge.py"))
GUEST_FILES = (*(p.stem + ".pyc" for p in GUEST_MODULES), "kernel_bridge.py")
RUNTIME_MARKER = "runtime"  # in a sandbox's dir: the runtime it was started with (none: namespaces)


@functools.cache
def guest_loader() -> str:
    """The host's dynamic loader (its real path under /usr), which runs the guest interpreter."""
    for candidate in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib64/ld64.so.2"):
        real = os.path.realpath(candidate)
        if os.path.exists(real) and real.startswith("/usr/"):
            return real
    raise NodeError("cannot find the host's dynamic loader under /usr (needed for full-root templates)")


def config_json(spec: SandboxSpec) -> str:
    env = {**spec.template.config.get("env", {}), **spec.env}
    return json.dumps({"env": env, "user": spec.user, "workdir": spec.workdir})


class SandboxHost:
    kernel_env: Path | None = None  # set by the node once the code contexts' environment is built

    def __init__(self, settings: Settings, layers: LayerStore) -> None:
        self.settings = settings
        self.layers = layers
        self.volumes = VolumeStore(layers)
        settings.sandboxes_dir.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def guest_code(self) -> Path:
        """The guest agent, byte-compiled once by the guest's own interpreter.

        A script run as __main__ is never cached by Python, so compiling here saves every sandbox
        start ≈7 ms; unchecked-hash .pyc files stay valid when linked into each sandbox.
        """
        sources = [*GUEST_MODULES, GUEST_DIR / "kernel_bridge.py"]
        digest = hashlib.sha256(self.settings.guest_python.encode())
        for src in sources:
            digest.update(src.read_bytes())
        out = self.settings.home / "guest" / digest.hexdigest()[:16]
        if not (out / "agent.pyc").exists():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            script = (
                "import py_compile, sys\n"
                "for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):\n"
                "    py_compile.compile(src, cfile=dst, doraise=True,\n"
                "        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)\n"
            )
            args = [a for src in sources[:-1] for a in (str(src), str(tmp / (src.stem + ".pyc")))]
            subprocess.run([self.settings.guest_python, "-I", "-c", script, *args], check=True)
            shutil.copyfile(sources[-1], tmp / sources[-1].name)  # run by the kernel venv's python
            for f in tmp.iterdir():
                f.chmod(0o444)
            shutil.rmtree(out, ignore_errors=True)
            os.rename(tmp, out)
        return out

    # -- paths ---------------------------------------------------------------------------
    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.settings.sandboxes_dir / sandbox_id

    def socket_path(self, sandbox_id: str) -> str:
        return str(self.sandbox_dir(sandbox_id) / "run" / "sock" / "agent.sock")

    def context_socket(self, sandbox_id: str, context_id: str) -> str:
        return str(self.sandbox_dir(sandbox_id) / "run" / "sock" / "kernels" / context_id / "bridge.sock")

    def checkpoint_dir(self, key: str) -> Path:
        root = (
            Path(self.settings.checkpoint_dir)
            if self.settings.checkpoint_dir
            else self.settings.home / "checkpoints"
        )
        return root / key

    def cgroup(self, sandbox_id: str) -> cgroups.Cgroup:
        return cgroups.Cgroup(f"{self.settings.cgroup_parent}/{sandbox_id}")

    def runtime_of(self, sandbox_id: str) -> str:
        try:
            return (self.sandbox_dir(sandbox_id) / RUNTIME_MARKER).read_text().strip() or "namespaces"
        except OSError:
            return "namespaces"

    def exists(self, sandbox_id: str) -> bool:
        return os.path.exists(self.sandbox_dir(sandbox_id)) or self.layers.has_active(sandbox_id)

    # -- prepare -------------------------------------------------------------------------
    def prepare(self, spec: SandboxSpec) -> dict[str, Any]:
        """Directories, guest files and the writable layer (kept if it exists: a resume); returns the
        launch spec (plain data) a runtime starts the sandbox from."""
        base = self.settings.uid_base
        sdir = self.sandbox_dir(spec.id)
        run = sdir / "run"
        rootfs = sdir / "rootfs"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True, mode=0o755)
        rootfs.mkdir(mode=0o755, exist_ok=True)
        (run / "sock").mkdir(mode=0o711)  # traversable, so code contexts reach their own dirs
        os.chown(run / "sock", base, base)  # the sandbox's root binds the agent socket here
        for name in GUEST_FILES:
            os.link(self.guest_code / name, run / name)  # shared, read-only inside
        (run / "config.json").write_text(config_json(spec))
        layers = list(spec.template.layers)
        if self.layers.has_active(spec.id):
            active = self.layers.active(spec.id, layers)
        else:
            active = self.layers.prepare(spec.id, layers, (base, base), spec.limits.disk_mb)
        limits = spec.limits
        host_binds = self._mount_sources(spec)
        return {
            "host_binds": host_binds,
            "rootfs": str(rootfs),
            "run_dir": str(run),
            "upper": str(active.upper),
            "work": str(active.work),
            "lowerdirs": list(active.lowerdirs),
            "binds": [*spec.template.config.get("binds", []), *self._kernel_binds()],
            "cgroup": f"{self.settings.cgroup_parent}/{spec.id}",
            "limits": {
                "memory_bytes": limits.memory_mb * 1024 * 1024 if limits.memory_mb else None,
                "cpu": limits.cpu,
                "pids": limits.pids,
                "cpu_weight": cgroups.BACKGROUND_WEIGHT if spec.background else None,
            },
            "uid_map": [0, base, 65536],
            "hostname": "sandbox",
            "python": self.settings.guest_python,
            "agent": "/run/cove/agent.pyc",
            **self._guest_interpreter(spec),
        }

    def mount_root(self, launch: dict[str, Any]) -> None:
        """The overlay root on the host (runtimes that do not mount it inside the sandbox)."""
        if not os.path.ismount(launch["rootfs"]):
            opts = f"lowerdir={':'.join(launch['lowerdirs'])},upperdir={launch['upper']},workdir={launch['work']}"
            syscalls.mount("overlay", launch["rootfs"], "overlay", 0, opts)

    def _guest_interpreter(self, spec: SandboxSpec) -> dict[str, Any]:
        """A template with its own /usr (`rootfs: full`, docs/templates.md) has the host's /usr bound
        at `host_usr`: the agent runs from there, through the host's loader and libraries."""
        if spec.template.config.get("rootfs") != "full":
            return {}
        prefix = spec.template.config.get("host_usr", "/.cove/usr")
        loader = guest_loader()
        inside = lambda p: prefix + p[len("/usr") :]  # noqa: E731
        return {
            "python": inside(self.settings.guest_python),
            "loader": [inside(loader), "--library-path", inside(os.path.dirname(loader))],
        }

    def _kernel_binds(self) -> list[dict[str, Any]]:
        """The kernel environment for code contexts, read-only at /opt/cove/kernel once it is built."""
        env = self.kernel_env
        return [{"src": str(env), "dst": kernel_layer.MOUNT_PATH, "ro": True}] if env else []

    def _mount_sources(self, spec: SandboxSpec) -> list[dict[str, Any]]:
        """Host dirs for the sandbox's volumes and buckets (a bucket's rclone is started here).

        Also records, in the sandbox's dir, which mount paths are volumes: a checkpoint names each
        one as an external mount (`vol<n>`), so a restore can bind another volume there (a copy)."""
        sdir = self.sandbox_dir(spec.id)
        user = (self.settings.uid_base + 1000, self.settings.uid_base + 1000)
        binds: list[dict[str, Any]] = []
        for i, m in enumerate(spec.mounts):
            if m["type"] == "volume":
                src = self.volumes.path(m["volume"])
                if not src.is_dir():
                    raise NodeError(f"volume {m.get('name') or m['volume']} is gone from this node")
            else:
                if "access_key_id" in m or not (bucket_mounts.mount_dir(sdir, i) / "rclone.conf").exists():
                    bucket_mounts.write_config(sdir, i, m)
                try:
                    src = bucket_mounts.start(sdir, i, user)
                except OSError as e:
                    raise NodeError(str(e)) from e
            binds.append(
                {"src": str(src), "dst": m["path"], "ro": bool(m.get("read_only")), "type": m["type"]}
            )
        keys = [
            {"key": f"vol{n}", "dst": b["dst"], "src": b["src"]}
            for n, b in enumerate(binds)
            if b["type"] == "volume"
        ]
        (sdir / "volumes.json").write_text(json.dumps(keys))
        return binds

    def volume_externals(self, sandbox_id: str) -> list[dict[str, str]]:
        """The volume mounts `prepare` recorded: {"key": "vol<n>", "dst", "src"} each."""
        try:
            return json.loads((self.sandbox_dir(sandbox_id) / "volumes.json").read_text())
        except (OSError, ValueError):
            return []

    # -- a running sandbox -----------------------------------------------------------------
    def configure(self, spec: SandboxSpec, thaw: bool, pids: int | None) -> None:
        """Give a running (pooled) sandbox its owner's env, user, workdir and limits: the guest
        agent re-reads its config when the file changes, so the replacement is atomic (rename)."""
        run = self.sandbox_dir(spec.id) / "run"
        tmp = run / "config.json.new"
        stages.mark("to thread")
        tmp.write_text(config_json(spec))
        os.rename(tmp, run / "config.json")
        stages.mark("config")
        limits = spec.limits
        memory = limits.memory_mb * 1024 * 1024 if limits.memory_mb else None
        cg = self.cgroup(spec.id)
        cg.set_limits(memory, limits.cpu, pids)
        cg.set_weight(cgroups.NORMAL_WEIGHT)  # a pool member started in the background
        stages.mark("limits")
        if thaw:
            cg.freeze(False)
            stages.mark("thaw")

    def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        """The ids among `(id, handle)` whose sandbox no longer runs."""
        return [sid for sid, handle in sandboxes if not self._running(sid, handle)]

    def _running(self, sandbox_id: str, handle: Handle) -> bool:
        """Is the process `handle` names still the sandbox's, in its cgroup, with its agent's socket?"""
        try:
            if process_start_time(handle["pid"]) != handle["start_time"]:
                return False
        except (OSError, KeyError, ValueError):
            return False
        return handle["pid"] in self.cgroup(sandbox_id).pids() and os.path.exists(
            self.socket_path(sandbox_id)
        )

    def stats(self, sandbox_id: str) -> dict[str, Any]:
        cg = self.cgroup(sandbox_id)
        return {
            "memory_bytes": cg.memory_usage(),
            "memory_cache_bytes": cg.memory_cache(),
            "cpu_usec": cg.cpu_usage_usec(),
            "pids": len(cg.pids()),
            "disk_bytes": self.layers.usage(sandbox_id),
        }

    def prepare_context(self, sandbox_id: str, context_id: str, user: str) -> str:
        """A directory for a context's socket, owned by the user its interpreter runs as."""
        uid = 0
        passwd = self.sandbox_dir(sandbox_id) / "rootfs" / "etc" / "passwd"
        for line in passwd.read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 3 and (fields[0] == user or fields[2] == user):
                uid = int(fields[2])
                break
        else:
            if not user.isdigit():
                raise NodeError(f"unknown user {user!r}")
            uid = int(user)
        d = self.sandbox_dir(sandbox_id) / "run" / "sock" / "kernels" / context_id
        d.parent.mkdir(mode=0o711, exist_ok=True)
        os.chown(d.parent, self.settings.uid_base, self.settings.uid_base)
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, self.settings.uid_base + uid, self.settings.uid_base + uid)
        return f"/run/cove/sock/kernels/{context_id}/bridge.sock"

    # -- seal ----------------------------------------------------------------------------
    def commit(self, sandbox_id: str, layer_id: str, seal: Seal = ()) -> str:
        """Seal a copy of the writable layer as `layer_id` (and of the volumes in `seal`: (volume id,
        sealed id)) at one instant: flush first (the sandbox runs on while the bulk of its dirty data
        is written back), then freeze only for the snapshots themselves. A retry of a commit that
        completed finds its layer (a failed one removed it)."""
        if self.layers.exists(layer_id):
            return layer_id
        self.layers.flush(sandbox_id)
        for volume_id, _ in seal:
            self.volumes.flush(volume_id)
        cg = self.cgroup(sandbox_id)
        running = cg.exists() and not cg.frozen()
        if running:
            cg.freeze(True)
        try:
            layer = self.layers.commit(sandbox_id, layer_id)
            try:
                self.seal_volumes(seal)
            except BaseException:
                self.layers.remove_layer(layer)
                raise
            return layer
        finally:
            if running:
                cg.freeze(False)

    def seal_volumes(self, seal: Seal) -> None:
        done: list[str] = []
        try:
            for volume_id, sealed_id in seal:
                self.volumes.seal(volume_id, sealed_id)
                done.append(sealed_id)
        except BaseException:
            for sealed_id in done:
                self.volumes.delete_sealed(sealed_id)
            raise

    # -- teardown ------------------------------------------------------------------------
    def release(self, sandbox_id: str) -> None:
        """Kill every process and release mounts and cgroups; the writable layer stays."""
        cg = self.cgroup(sandbox_id)
        if cg.exists():
            cg.kill()
        rootfs = self.sandbox_dir(sandbox_id) / "rootfs"
        if os.path.ismount(rootfs):
            syscalls.umount(str(rootfs), syscalls.MNT_DETACH)  # volumes and buckets bound below go too
        bucket_mounts.stop_all(self.sandbox_dir(sandbox_id))
        if cg.exists():
            cg.remove()

    def remove(self, sandbox_id: str) -> None:
        """Delete a released sandbox's files: its dir, its hibernation images, its writable layer."""
        sdir = self.sandbox_dir(sandbox_id)
        if bucket_mounts.mounted(sdir):  # never walk into a bucket: rmtree would delete its objects
            raise NodeError(f"a bucket of sandbox {sandbox_id} is still mounted at {sdir / 'fuse'}")
        shutil.rmtree(sdir, ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir(sandbox_id), ignore_errors=True)
        self.layers.remove_active(sandbox_id)

    def present(self) -> set[str]:
        """Ids of every sandbox with files or a cgroup on this host."""
        ids = (
            {p.name for p in self.settings.sandboxes_dir.iterdir()}
            if self.settings.sandboxes_dir.exists()
            else set()
        )
        ids |= {p.name for p in self.layers.active_dir.iterdir()}
        lay = cgroups.layout()
        for mnt in [*lay.v1.values(), *([lay.v2] if lay.v2 else [])]:
            parent = Path(mnt) / self.settings.cgroup_parent
            if parent.is_dir():
                ids |= {p.name for p in parent.iterdir() if p.is_dir()}
        return ids
