"""Host side of the namespaces runtime: prepares a sandbox's files, runs the launcher, tears down.

Everything here that blocks (mounts, cgroup writes, directory trees) runs in a worker thread, so the
server's event loop never waits on the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cove.config import Settings
from cove.node import bucket_mounts, checkpoint
from cove.node.base import NodeError, SandboxSpec
from cove.node.namespaces import cgroups, syscalls
from cove.node.namespaces.launcher import process_start_time
from cove.storage import kernel_layer
from cove.storage.layers import LayerStore
from cove.storage.volumes import VolumeStore

T = TypeVar("T")
log = logging.getLogger("cove.node")
GUEST_DIR = Path(__file__).resolve().parent.parent.parent / "guest"
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
# The agent's modules, linked flat into each sandbox's /run/cove as .pyc (agent.py imports them from
# there); the kernel bridge stays source, run by the kernel venv's python.
GUEST_MODULES = sorted(p for p in GUEST_DIR.glob("*.py") if p.name not in ("__init__.py", "kernel_bridge.py"))
GUEST_FILES = (*(p.stem + ".pyc" for p in GUEST_MODULES), "kernel_bridge.py")


@functools.cache
def guest_loader() -> str:
    """The host's dynamic loader (its real path under /usr), which runs the guest interpreter."""
    for candidate in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1", "/lib64/ld64.so.2"):
        real = os.path.realpath(candidate)
        if os.path.exists(real) and real.startswith("/usr/"):
            return real
    raise NodeError("cannot find the host's dynamic loader under /usr (needed for full-root templates)")


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Await `work`; if the caller is cancelled meanwhile, let `work` finish first and then raise
    the cancellation. A worker thread and the launcher go on making a sandbox regardless, so a
    cleanup that ran before they finished would leave their cgroup and mounts behind."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller gets
        raise


def _running(pid: int, started: int | None = None) -> bool:
    """Is `pid` a live process (not a zombie), and the one started at `started` if given?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X") and (started is None or int(fields[19]) == started)


class NamespacesRuntime:
    name = "namespaces"

    def __init__(self, settings: Settings, layers: LayerStore) -> None:
        self.settings = settings
        self.layers = layers
        self.volumes = VolumeStore(layers)
        self.settings.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self._forkserver: asyncio.subprocess.Process | None = None
        self._forkserver_lock = asyncio.Lock()

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

    async def start(self) -> None:
        await asyncio.to_thread(lambda: self.guest_code)
        await self._ensure_forkserver()

    @property
    def forkserver_socket(self) -> str:
        return str(self.settings.home / "launcher.sock")

    async def _ensure_forkserver(self) -> None:
        """Start the launcher's fork server (once, and again if it died)."""
        async with self._forkserver_lock:
            if self._forkserver and self._forkserver.returncode is None:
                return
            # The guest's interpreter: each sandbox's agent is a fork of this process (launcher.py).
            proc = await asyncio.create_subprocess_exec(
                self.settings.guest_python,
                "-I",
                "-S",
                str(LAUNCHER),
                "--serve",
                self.forkserver_socket,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                # None of the server's environment: every sandbox's pid 1 has a copy of this one.
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise NodeError("the sandbox launcher failed to start")
            self._forkserver = proc

    async def _launch(self, launch_spec: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_forkserver()
        try:
            reader, writer = await asyncio.open_unix_connection(self.forkserver_socket)
        except OSError as e:
            raise NodeError(f"cannot reach the sandbox launcher: {e}") from e
        try:
            writer.write(json.dumps(launch_spec).encode())
            await writer.drain()
            writer.write_eof()
            line = await reader.readline()
        finally:
            writer.close()
        try:
            return json.loads(line)
        except ValueError:
            return {"error": "the sandbox launcher exited without an answer"}

    async def close(self) -> None:
        if self._forkserver and self._forkserver.returncode is None:
            self._forkserver.kill()
            await self._forkserver.wait()
        self._forkserver = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.forkserver_socket)

    # -- paths ---------------------------------------------------------------------------
    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.settings.sandboxes_dir / sandbox_id

    def socket_path(self, sandbox_id: str) -> str:
        return str(self.sandbox_dir(sandbox_id) / "run" / "sock" / "agent.sock")

    def cgroup(self, sandbox_id: str) -> cgroups.Cgroup:
        return cgroups.Cgroup(f"{self.settings.cgroup_parent}/{sandbox_id}")

    # -- create --------------------------------------------------------------------------
    def _prepare(self, spec: SandboxSpec) -> dict[str, Any]:
        """Directories, guest files and the writable layer (kept if it exists: a resume)."""
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
        (run / "config.json").write_text(self._config_json(spec))
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
            "binds": [*spec.template.config.get("binds", []), *self.extra_binds()],
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

    @staticmethod
    def _config_json(spec: SandboxSpec) -> str:
        env = {**spec.template.config.get("env", {}), **spec.env}
        return json.dumps({"env": env, "user": spec.user, "workdir": spec.workdir})

    def _configure(self, spec: SandboxSpec, thaw: bool) -> None:
        """Give a running (pooled) sandbox its owner's env, user, workdir and limits: the guest
        agent re-reads its config when the file changes, so the replacement is atomic (rename)."""
        run = self.sandbox_dir(spec.id) / "run"
        tmp = run / "config.json.new"
        tmp.write_text(self._config_json(spec))
        os.rename(tmp, run / "config.json")
        limits = spec.limits
        memory = limits.memory_mb * 1024 * 1024 if limits.memory_mb else None
        cg = self.cgroup(spec.id)
        cg.set_limits(memory, limits.cpu, limits.pids)
        cg.set_weight(cgroups.NORMAL_WEIGHT)  # a pool member started in the background
        if thaw:
            cg.freeze(False)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await asyncio.to_thread(self._configure, spec, thaw)

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

    def _volume_externals(self, sandbox_id: str) -> list[dict[str, str]]:
        try:
            return json.loads((self.sandbox_dir(sandbox_id) / "volumes.json").read_text())
        except (OSError, ValueError):
            return []

    async def create(self, spec: SandboxSpec, resume: bool = False) -> dict[str, Any]:
        """Start a sandbox; with `resume`, over the writable layer it already has (after a stop)."""
        if not resume and (os.path.exists(self.sandbox_dir(spec.id)) or self.layers.has_active(spec.id)):
            raise NodeError(f"sandbox {spec.id} already exists on this node")
        try:
            result = await _to_the_end(self._start(spec))
            if "pid" not in result:
                raise NodeError(f"sandbox failed to start: {result['error']}")
            return {"pid": result["pid"], "start_time": result["start_time"], "runtime": self.name}
        except BaseException:
            if resume:
                await self.stop(spec.id)  # keep its files: the sandbox stays hibernated
            else:
                await self.kill(spec.id)
            raise

    async def _start(self, spec: SandboxSpec) -> dict[str, Any]:
        t0 = time.perf_counter()
        launch_spec = await asyncio.to_thread(self._prepare, spec)
        t1 = time.perf_counter()
        result = await self._launch(launch_spec)
        log.debug(
            "sandbox launched",
            extra={
                "sandbox": spec.id,
                "prepare_ms": round((t1 - t0) * 1000, 2),
                "launch_ms": round((time.perf_counter() - t1) * 1000, 2),
            },
        )
        return result

    # -- inspect -------------------------------------------------------------------------
    def _alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        try:
            if process_start_time(handle["pid"]) != handle["start_time"]:
                return False
        except (OSError, KeyError, ValueError):
            return False
        return handle["pid"] in self.cgroup(sandbox_id).pids() and os.path.exists(
            self.socket_path(sandbox_id)
        )

    async def alive(self, sandbox_id: str, handle: dict[str, Any]) -> bool:
        return await asyncio.to_thread(self._alive, sandbox_id, handle)

    def _stats(self, sandbox_id: str) -> dict[str, Any]:
        cg = self.cgroup(sandbox_id)
        return {
            "memory_bytes": cg.memory_usage(),
            "memory_cache_bytes": cg.memory_cache(),
            "cpu_usec": cg.cpu_usage_usec(),
            "pids": len(cg.pids()),
            "disk_bytes": self.layers.usage(sandbox_id),
        }

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._stats, sandbox_id)

    # -- teardown ------------------------------------------------------------------------
    def _stop(self, sandbox_id: str) -> None:
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

    def _kill(self, sandbox_id: str) -> None:
        self._stop(sandbox_id)
        sdir = self.sandbox_dir(sandbox_id)
        if bucket_mounts.mounted(sdir):  # never walk into a bucket: rmtree would delete its objects
            raise NodeError(f"a bucket of sandbox {sandbox_id} is still mounted at {sdir / 'fuse'}")
        shutil.rmtree(sdir, ignore_errors=True)
        shutil.rmtree(self.checkpoint_dir(sandbox_id), ignore_errors=True)
        self.layers.remove_active(sandbox_id)

    async def stop(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._stop, sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self._kill, sandbox_id)

    # -- code contexts -----------------------------------------------------------------------
    def extra_binds(self) -> list[dict[str, Any]]:
        """The kernel environment for code contexts, read-only at /opt/cove/kernel once it is built."""
        env = self.kernel_env
        return [{"src": str(env), "dst": kernel_layer.MOUNT_PATH, "ro": True}] if env else []

    kernel_env: Path | None = None  # set by the node once the environment is built

    def _prepare_context(self, sandbox_id: str, context_id: str, user: str) -> str:
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

    async def prepare_context(self, sandbox_id: str, context_id: str, user: str) -> str:
        return await asyncio.to_thread(self._prepare_context, sandbox_id, context_id, user)

    def context_socket(self, sandbox_id: str, context_id: str) -> str:
        return str(self.sandbox_dir(sandbox_id) / "run" / "sock" / "kernels" / context_id / "bridge.sock")

    # -- checkpoints (CRIU) ----------------------------------------------------------------
    def checkpoint_dir(self, key: str) -> Path:
        root = (
            Path(self.settings.checkpoint_dir)
            if self.settings.checkpoint_dir
            else self.settings.home / "checkpoints"
        )
        return root / key

    def _checkpoint(
        self,
        sandbox_id: str,
        pid: int,
        images: Path,
        leave_running: bool,
        seal: tuple[tuple[str, str], ...] = (),
    ) -> str | None:
        """Dump the sandbox's processes into `images`, frozen through cove's own freezer.

        leave_running: also seal its files while still frozen (a snapshot: memory and files from one
        instant) and thaw; returns the new layer. Otherwise the processes end and their mounts and
        cgroups are released (a hibernation). On failure the sandbox runs on as before.
        """
        cg = self.cgroup(sandbox_id)
        freezer = cg.freezer_dir
        if freezer is None:
            raise NodeError("this host has no cgroup freezer")
        shutil.rmtree(images, ignore_errors=True)
        if leave_running:
            self.layers.flush(sandbox_id)  # most dirty data goes to disk before the freeze
            for volume_id, _ in seal:
                self.volumes.flush(volume_id)
        externals = [(v["dst"], v["key"]) for v in self._volume_externals(sandbox_id)]
        started = process_start_time(pid)

        def alive() -> bool:  # killed during the dump: CRIU would wait on its dead tasks
            return _running(pid, started)

        was_frozen = cg.frozen()  # a paused sandbox stays paused
        cg.freeze(True)
        layer = None
        try:
            for attempt in range(3):
                try:
                    checkpoint.dump(pid, images, freezer, leave_running, externals, alive)
                    break
                except checkpoint.CheckpointError as e:
                    if not checkpoint.transient(e) or attempt == 2 or was_frozen:
                        raise
                    cg.freeze(False)
                    time.sleep(0.2)
                    cg.freeze(True)
            self._save_process_records(sandbox_id, images)
            if leave_running:
                layer = self.layers.commit(sandbox_id)
                self._seal_volumes(seal)
        except BaseException:
            shutil.rmtree(images, ignore_errors=True)
            if not was_frozen:
                cg.freeze(False)
            raise
        if leave_running and not was_frozen:
            cg.freeze(False)
        else:
            self._stop(sandbox_id)
        return layer

    async def hibernate(self, sandbox_id: str, pid: int) -> None:
        await asyncio.to_thread(self._checkpoint, sandbox_id, pid, self.checkpoint_dir(sandbox_id), False)

    def _seal_volumes(self, seal: tuple[tuple[str, str], ...]) -> None:
        done: list[str] = []
        try:
            for volume_id, sealed_id in seal:
                self.volumes.seal(volume_id, sealed_id)
                done.append(sealed_id)
        except BaseException:
            for sealed_id in done:
                self.volumes.delete_sealed(sealed_id)
            raise

    async def snapshot_with_memory(
        self, sandbox_id: str, pid: int, key: str, seal: tuple[tuple[str, str], ...] = ()
    ) -> str:
        layer = await asyncio.to_thread(
            self._checkpoint, sandbox_id, pid, self.checkpoint_dir(key), True, seal
        )
        assert layer is not None
        return layer

    def _save_process_records(self, sandbox_id: str, images: Path) -> None:
        """Background processes keep their records (<id>.json) in the run dir, outside the checkpoint:
        keep a copy with it, so restored supervisors are listed again."""
        procs = self.sandbox_dir(sandbox_id) / "run" / "sock" / "procs"
        if procs.is_dir():
            (images / "procs").mkdir(exist_ok=True)
            for record in procs.glob("*.json"):
                shutil.copy2(record, images / "procs" / record.name)
        kernels = self.sandbox_dir(sandbox_id) / "run" / "sock" / "kernels"
        if kernels.is_dir():  # code contexts' socket dirs: their sockets are restored into them
            owners = {d.name: [d.stat().st_uid, d.stat().st_gid] for d in kernels.iterdir() if d.is_dir()}
            (images / "kernels.json").write_text(json.dumps(owners))

    def _load_process_records(self, sandbox_id: str, images: Path) -> None:
        base = self.settings.uid_base
        if (images / "kernels.json").exists():
            kernels = self.sandbox_dir(sandbox_id) / "run" / "sock" / "kernels"
            kernels.mkdir(mode=0o711, exist_ok=True)
            os.chown(kernels, base, base)
            for name, (uid, gid) in json.loads((images / "kernels.json").read_text()).items():
                (kernels / name).mkdir(mode=0o700, exist_ok=True)
                os.chown(kernels / name, uid, gid)
        saved = images / "procs"
        if not saved.is_dir():
            return
        procs = self.sandbox_dir(sandbox_id) / "run" / "sock" / "procs"
        procs.mkdir(mode=0o700, exist_ok=True)
        os.chown(procs, base, base)
        for record in saved.glob("*.json"):
            shutil.copy2(record, procs / record.name)
            os.chown(procs / record.name, base, base)

    def _restore(self, spec: SandboxSpec, images: Path) -> dict[str, Any]:
        if not checkpoint.complete(images):
            raise NodeError(f"no complete checkpoint at {images}")
        launch = self._prepare(spec)
        self._load_process_records(spec.id, images)
        cg = self.cgroup(spec.id)
        cg.create()
        limits = launch["limits"]
        cg.set_limits(limits["memory_bytes"], limits["cpu"], limits["pids"])
        if limits["cpu_weight"]:
            cg.set_weight(limits["cpu_weight"])
        if not os.path.ismount(launch["rootfs"]):
            opts = f"lowerdir={':'.join(launch['lowerdirs'])},upperdir={launch['upper']},workdir={launch['work']}"
            syscalls.mount("overlay", launch["rootfs"], "overlay", 0, opts)
        log_path = self.sandbox_dir(spec.id) / "restore.log"
        externals = [(v["key"], v["src"]) for v in self._volume_externals(spec.id)]
        seen = False

        def alive() -> bool:  # its tasks killed mid-restore: CRIU would wait on them
            nonlocal seen
            if any(_running(p) for p in cg.pids()):
                seen = True
            return not seen or any(_running(p) for p in cg.pids())

        pid = checkpoint.restore(
            images, launch["rootfs"], launch["run_dir"], launch["cgroup"], log_path, externals, alive
        )
        return {"pid": pid, "start_time": process_start_time(pid), "runtime": self.name}

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> dict[str, Any]:
        """Start `spec` from the processes checkpointed under `key` (its own hibernation, or a snapshot)."""
        try:
            return await asyncio.to_thread(self._restore, spec, self.checkpoint_dir(key))
        except BaseException:
            if resume:
                await self.stop(spec.id)
            else:
                await self.kill(spec.id)
            raise

    async def drop_checkpoint(self, key: str) -> None:
        def drop() -> None:
            checkpoint.release(self.checkpoint_dir(key))
            shutil.rmtree(self.checkpoint_dir(key), ignore_errors=True)

        await asyncio.to_thread(drop)

    def _commit(self, sandbox_id: str, seal: tuple[tuple[str, str], ...] = ()) -> str:
        """Seal a copy of the writable layer (and of the volumes in `seal`: (volume id, sealed id))
        at one instant: flush first (the sandbox runs on while the bulk of its dirty data is written
        back), then freeze only for the snapshots themselves."""
        self.layers.flush(sandbox_id)
        for volume_id, _ in seal:
            self.volumes.flush(volume_id)
        cg = self.cgroup(sandbox_id)
        running = cg.exists() and not cg.frozen()
        if running:
            cg.freeze(True)
        try:
            layer = self.layers.commit(sandbox_id)
            try:
                self._seal_volumes(seal)
            except BaseException:
                self.layers.remove_layer(layer)
                raise
            return layer
        finally:
            if running:
                cg.freeze(False)

    async def commit(self, sandbox_id: str, seal: tuple[tuple[str, str], ...] = ()) -> str:
        return await asyncio.to_thread(self._commit, sandbox_id, seal)

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

    def release_parent(self) -> None:
        cgroups.remove_parent_if_empty(self.settings.cgroup_parent)
