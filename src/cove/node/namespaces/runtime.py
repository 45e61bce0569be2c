"""The namespaces runtime: the launcher's fork server starts each sandbox (namespaces, seccomp, the
overlay root mounted inside), CRIU checkpoints it. The host-side preparation is `SandboxHost`'s.

Everything here that blocks runs in a worker thread, so the server's event loop never waits on the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cove.node import checkpoint
from cove.node.base import Handle, NodeError, SandboxSpec, Seal
from cove.node.namespaces import cgroups
from cove.node.namespaces.host import SandboxHost
from cove.node.runtimes import Checkpointer
from cove.syscalls import process_start_time

T = TypeVar("T")
log = logging.getLogger("cove.node")
LAUNCHER = Path(__file__).resolve().parent / "launcher.py"


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
    egress = True
    ports = True
    available = True
    detail = "user, pid, mount, net, uts and ipc namespaces; seccomp; no_new_privs"

    def __init__(self, host: SandboxHost) -> None:
        self.host = host
        self.settings = host.settings
        self.checkpointer: Checkpointer | None = Criu(self) if checkpoint.available() else None
        self._forkserver: asyncio.subprocess.Process | None = None
        self._forkserver_lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(lambda: self.host.guest_code)
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
        await asyncio.to_thread(cgroups.remove_parent_if_empty, self.settings.cgroup_parent)

    # -- create --------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec, resume: bool = False) -> Handle:
        """Start a sandbox; with `resume`, over the writable layer it already has (after a stop)."""
        if not resume and self.host.exists(spec.id):
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
        launch_spec = await asyncio.to_thread(self.host.prepare, spec)
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

    # -- a running sandbox -----------------------------------------------------------------
    async def dead(self, sandboxes: list[tuple[str, Handle]]) -> list[str]:
        return await asyncio.to_thread(self.host.dead, sandboxes)

    async def pause(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.host.cgroup(sandbox_id).freeze, True)

    async def resume(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.host.cgroup(sandbox_id).freeze, False)

    async def configure(self, spec: SandboxSpec, thaw: bool = False) -> None:
        await asyncio.to_thread(self.host.configure, spec, thaw, spec.limits.pids)

    async def stats(self, sandbox_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.host.stats, sandbox_id)

    # -- teardown ------------------------------------------------------------------------
    async def stop(self, sandbox_id: str) -> None:
        await asyncio.to_thread(self.host.release, sandbox_id)

    async def kill(self, sandbox_id: str) -> None:
        def kill() -> None:
            self.host.release(sandbox_id)
            self.host.remove(sandbox_id)

        await asyncio.to_thread(kill)


class Criu:
    """The namespaces runtime's `Checkpointer`: CRIU dumps and restores the sandbox's process tree."""

    def __init__(self, runtime: NamespacesRuntime) -> None:
        self.runtime = runtime
        self.host = runtime.host

    def _checkpoint(
        self,
        sandbox_id: str,
        pid: int,
        images: Path,
        leave_running: bool,
        seal: Seal = (),
        layer_id: str = "",
    ) -> str | None:
        """Dump the sandbox's processes into `images`, frozen through cove's own freezer.

        leave_running: also seal its files as `layer_id` while still frozen (a snapshot: memory and
        files from one instant) and thaw; returns that layer. Otherwise the processes end and their mounts and
        cgroups are released (a hibernation). On failure the sandbox runs on as before.
        """
        host = self.host
        cg = host.cgroup(sandbox_id)
        freezer = cg.freezer_dir
        if freezer is None:
            raise NodeError("this host has no cgroup freezer")
        shutil.rmtree(images, ignore_errors=True)
        if leave_running:
            host.layers.flush(sandbox_id)  # most dirty data goes to disk before the freeze
            for volume_id, _ in seal:
                host.volumes.flush(volume_id)
        externals = [(v["dst"], v["key"]) for v in host.volume_externals(sandbox_id)]
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
                layer = host.layers.commit(sandbox_id, layer_id)
                host.seal_volumes(seal)
        except BaseException:
            shutil.rmtree(images, ignore_errors=True)
            if not was_frozen:
                cg.freeze(False)
            raise
        if leave_running and not was_frozen:
            cg.freeze(False)
        else:
            host.release(sandbox_id)
        return layer

    async def hibernate(self, sandbox_id: str, handle: Handle) -> None:
        images = self.host.checkpoint_dir(sandbox_id)
        await asyncio.to_thread(self._checkpoint, sandbox_id, handle["pid"], images, False)

    async def snapshot_with_memory(
        self, sandbox_id: str, handle: Handle, key: str, layer_id: str, seal: Seal = ()
    ) -> str:
        images = self.host.checkpoint_dir(key)
        if self.host.layers.exists(layer_id) and checkpoint.complete(images):
            return layer_id  # a retry of a snapshot that completed
        layer = await asyncio.to_thread(
            self._checkpoint, sandbox_id, handle["pid"], images, True, seal, layer_id
        )
        assert layer is not None
        return layer

    def _save_process_records(self, sandbox_id: str, images: Path) -> None:
        """Background processes keep their records (<id>.json) in the run dir, outside the checkpoint:
        keep a copy with it, so restored supervisors are listed again."""
        sock = self.host.sandbox_dir(sandbox_id) / "run" / "sock"
        procs = sock / "procs"
        if procs.is_dir():
            (images / "procs").mkdir(exist_ok=True)
            for record in procs.glob("*.json"):
                shutil.copy2(record, images / "procs" / record.name)
        kernels = sock / "kernels"
        if kernels.is_dir():  # code contexts' socket dirs: their sockets are restored into them
            owners = {d.name: [d.stat().st_uid, d.stat().st_gid] for d in kernels.iterdir() if d.is_dir()}
            (images / "kernels.json").write_text(json.dumps(owners))

    def _load_process_records(self, sandbox_id: str, images: Path) -> None:
        base = self.host.settings.uid_base
        sock = self.host.sandbox_dir(sandbox_id) / "run" / "sock"
        if (images / "kernels.json").exists():
            kernels = sock / "kernels"
            kernels.mkdir(mode=0o711, exist_ok=True)
            os.chown(kernels, base, base)
            for name, (uid, gid) in json.loads((images / "kernels.json").read_text()).items():
                (kernels / name).mkdir(mode=0o700, exist_ok=True)
                os.chown(kernels / name, uid, gid)
        saved = images / "procs"
        if not saved.is_dir():
            return
        procs = sock / "procs"
        procs.mkdir(mode=0o700, exist_ok=True)
        os.chown(procs, base, base)
        for record in saved.glob("*.json"):
            shutil.copy2(record, procs / record.name)
            os.chown(procs / record.name, base, base)

    def _restore(self, spec: SandboxSpec, images: Path) -> Handle:
        host = self.host
        if not checkpoint.complete(images):
            raise NodeError(f"no complete checkpoint at {images}")
        launch = host.prepare(spec)
        self._load_process_records(spec.id, images)
        cg = host.cgroup(spec.id)
        cg.create()
        limits = launch["limits"]
        cg.set_limits(limits["memory_bytes"], limits["cpu"], limits["pids"])
        if limits["cpu_weight"]:
            cg.set_weight(limits["cpu_weight"])
        host.mount_root(launch)
        log_path = host.sandbox_dir(spec.id) / "restore.log"
        externals = [(v["key"], v["src"]) for v in host.volume_externals(spec.id)]
        seen = False

        def alive() -> bool:  # its tasks killed mid-restore: CRIU would wait on them
            nonlocal seen
            if any(_running(p) for p in cg.pids()):
                seen = True
            return not seen or any(_running(p) for p in cg.pids())

        pid = checkpoint.restore(
            images, launch["rootfs"], launch["run_dir"], launch["cgroup"], log_path, externals, alive
        )
        return {"pid": pid, "start_time": process_start_time(pid), "runtime": self.runtime.name}

    async def restore(self, spec: SandboxSpec, key: str, resume: bool) -> Handle:
        try:
            return await asyncio.to_thread(self._restore, spec, self.host.checkpoint_dir(key))
        except BaseException:
            if resume:
                await self.runtime.stop(spec.id)
            else:
                await self.runtime.kill(spec.id)
            raise
