"""Start sandboxes: cgroup, overlay root, namespaces, then the guest agent as each one's pid 1.

Run as `python3 -I -S launcher.py --serve SOCKET` by the runtime: a fork server (see serve()).

Process shape (see docs/architecture.md):
    fork server ──clone(new user, mnt, pid, net, uts, ipc namespaces)──> pid 1: waits for its
        cgroup and id maps, then mounts, pivot_root, drops privileges and becomes the agent
One clone per sandbox, and no exec: the fork server runs the guest's interpreter with the agent
imported, so a sandbox costs neither an interpreter start (about 9 ms of CPU here) nor the
intermediate processes a fork + unshare + fork would (about 10 ms of copy-on-write faults and
exits). Only a root with its own /usr (`rootfs: full`) execs the host's interpreter through its
loader: there the host's files are not at their own paths, which the agent's lazy imports and
CRIU's restore of its mapped files both need. Pid 1 outlives the fork server (which dies with the
cove server): re-parented, it survives server restarts, and the agent in it supervises every
process of its sandbox. Standard library only.
"""

from __future__ import annotations

import _signal
import _socket
import gc
import os
import resource
import select
import sys
import time

if __package__ in (None, ""):  # run by path: make `cove` importable without the site machinery
    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    )

from cove import syscalls
from cove.guest import agent, protocol
from cove.node.namespaces import cgroups, seccomp
from cove.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    process_start_time,
)

SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Docker's default capability set without CAP_NET_RAW (13: raw and packet sockets; ping works without
# it through ICMP datagram sockets); everything else leaves the bounding set before the agent runs.
KEEP_CAPS = {0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 27, 29, 31}
NOFILE = 65536  # open files per process in a sandbox (at most the host's hard limit)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# /proc entries that reveal or control the host (masked as Docker does); /proc/sys etc. read-only.
PROC_MASKED = (
    "kcore",
    "keys",
    "kallsyms",
    "kmsg",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "sysrq-trigger",
)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
PROC_MASKED_DIRS = ("acpi", "scsi", "asound", "driver")
PROC_READONLY = ("sys", "bus", "fs", "irq")
AGENT_SOCKET = "/run/cove/sock/agent.sock"
AGENT_FD = 3
READY_FD = 4


def _setup_mounts(spec: dict) -> None:
    """Inside the new mount namespace: build the root and switch to it."""
    root = spec["rootfs"]
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE)
    # pivot_root refuses a mount copied from the parent namespace (it is locked): bind it onto itself.
    syscalls.mount(root, root, None, MS_BIND | MS_REC)
    for bind in spec.get("binds", []):
        dst = root + bind["dst"]
        os.makedirs(dst, exist_ok=True)
        syscalls.mount(bind["src"], dst, None, MS_BIND | MS_REC)
        if bind.get("ro", True):
            flags = (
                MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | syscalls.mount_flags_of(bind["src"])
            )
            syscalls.mount(None, dst, None, flags)
    syscalls.mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mask_proc(root + "/proc")
    dev = root + "/dev"
    syscalls.mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name in DEVICES:
        path = f"{dev}/{name}"
        open(path, "w").close()
        syscalls.mount(f"/dev/{name}", path, None, MS_BIND)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts")
    os.mkdir(f"{dev}/shm")
    syscalls.mount(
        "devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"
    )
    syscalls.mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    _boot_id(root, dev)
    agent_dir = root + "/run/cove"
    os.makedirs(agent_dir, exist_ok=True)
    # Read-write, but only sock/ belongs to the sandbox's root: the rest is host root's (unmapped here).
    syscalls.mount(spec["run_dir"], agent_dir, None, MS_BIND)
    syscalls.mount(None, agent_dir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount(".", MNT_DETACH)
    os.chdir("/")


def _boot_id(root: str, dev: str) -> None:
    """This boot's own /proc/sys/kernel/random/boot_id (the host's never changes when a sandbox
    reboots): a file in the sandbox's /dev bound over it, so a restore (CRIU) keeps it and a
    restart gets a new one, as a VM's reboot does."""
    target = root + BOOT_ID
    if not os.path.exists(target):
        return
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # a version 4 (random) UUID, as the kernel's
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    path = f"{dev}/.boot_id"
    with open(path, "w") as f:
        f.write(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}\n")
    os.chmod(path, 0o444)
    syscalls.mount(path, target, None, MS_BIND)
    syscalls.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _mask_proc(proc: str) -> None:
    for name in PROC_MASKED:
        if os.path.exists(f"{proc}/{name}"):
            syscalls.mount("/dev/null", f"{proc}/{name}", None, MS_BIND)
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(f"{proc}/{name}"):
            syscalls.mount(
                "tmpfs", f"{proc}/{name}", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0"
            )
    for name in PROC_READONLY:
        path = f"{proc}/{name}"
        if os.path.isdir(path):
            syscalls.mount(path, path, None, MS_BIND | MS_REC)
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            syscalls.mount(None, path, None, flags | syscalls.mount_flags_of(path))


def _listen() -> _socket.socket:
    """The agent's socket, bound inside the sandbox (so CRIU checkpoints it like any other file).

    Its directory belongs to the sandbox's root; mode 0600 keeps the sandbox's other users out. The
    host connects through an O_PATH handle, never following a symlink the sandbox may plant there.
    """
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(AGENT_SOCKET)
    os.chmod(AGENT_SOCKET, 0o600)
    listener.listen(128)
    return listener


def _sandbox_init(spec: dict, ready_w: int) -> None:
    """Process B, pid 1 of the new pid namespace. Never returns."""
    try:
        os.setsid()
        _setup_mounts(spec)
        listener = _listen().detach()
        syscalls.set_loopback_up()
        syscalls.sethostname(spec.get("hostname", "sandbox"))
        syscalls.drop_bounding_caps(KEEP_CAPS)
        syscalls.limit_caps(KEEP_CAPS)  # what an exec as root would leave (we may not exec)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nofile = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        if spec.get("seccomp", True) and seccomp.supported():
            seccomp.install()
        os.dup2(listener, AGENT_FD)
        os.dup2(ready_w, READY_FD)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(READY_FD + 1, 65536)
        for fd in (AGENT_FD, READY_FD):
            os.set_inheritable(fd, True)
        env = {"COVE_AGENT_FD": str(AGENT_FD), "COVE_READY_FD": str(READY_FD), "PATH": "/usr/bin:/bin"}
        if spec.get("loader"):  # a root with its own /usr: the host's interpreter through its loader
            argv = [*spec["loader"], spec["python"], "-I", "-S", spec["agent"]]
            os.execve(argv[0], argv, env)
        # What an exec would have reset: dumpable (CRIU and /proc need it after our id change), the
        # search path (our source dir is not the sandbox's, which may create it) and what /proc
        # shows as our command line.
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 1)
        sys.path[:] = [p for p in sys.path if p != SOURCE_DIR]
        syscalls.set_cmdline(f"python3 -I -S {spec['agent']}")  # not the launcher's host paths
        os.environ.clear()
        os.environ.update(env)
    except BaseException as e:  # report through the ready pipe; the launcher turns it into an error
        try:
            os.write(ready_w, f"error: {e}".encode()[:4000])
        finally:
            os._exit(1)
    try:
        agent.main([])
    finally:
        os._exit(1)  # the agent serves until the sandbox ends; never back into the launcher


def _open_dir(parent: int, name: str, owner: int) -> int:
    """Open (make where missing) a directory below `parent`, never following a symlink: what is
    there comes from the sandbox's own files (a snapshot's), and must not lead out of its root."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=parent)
        os.chown(name, owner, owner, dir_fd=parent, follow_symlinks=False)
        return os.open(name, flags, dir_fd=parent)


def _host_binds(root: str, binds: list, owner: int) -> None:
    """Volumes and bucket mounts, bound under the root *before* the user namespace exists.

    Made here, in the host's mount namespace, they are copied into the sandbox's namespace as
    locked mounts: a read-only one cannot be made writable there, even by a root that somehow had
    CAP_SYS_ADMIN in the sandbox's user namespace. nosuid and nodev always.
    """
    for bind in sorted(binds, key=lambda b: b["dst"]):
        parts = [p for p in bind["dst"].split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"bad mount path {bind['dst']!r}")
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                nfd = _open_dir(fd, part, owner)
                os.close(fd)
                fd = nfd
            target = _open_dir(fd, parts[-1], owner)
            try:
                syscalls.mount(bind["src"], f"/proc/self/fd/{target}", None, MS_BIND | MS_REC)
            finally:
                os.close(target)
            mounted = _open_dir(fd, parts[-1], owner)  # now the mount's root
            try:
                flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if bind.get("ro") else 0)
                syscalls.mount(None, f"/proc/self/fd/{mounted}", None, flags)
            finally:
                os.close(mounted)
        finally:
            os.close(fd)


NAMESPACES = (
    syscalls.CLONE_NEWUSER
    | syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
)


class Launch:
    """A sandbox whose pid 1 runs; the fork server waits for its agent's `ok` on `ready`."""

    __slots__ = ("cgroup", "deadline", "pid", "ready", "said")

    def __init__(self, cgroup: cgroups.Cgroup, pid: int, ready: int, timeout: float) -> None:
        self.cgroup = cgroup
        self.pid = pid
        self.ready = ready
        self.deadline = time.monotonic() + timeout
        self.said = b""


def start(spec: dict) -> Launch:
    """The host's part of a launch: the cgroup, the root, then pid 1 in new namespaces.

    Pid 1 is a clone of this process straight into the new namespaces; it waits until we have put
    it in its cgroup and written its id maps, then sets the sandbox up (_sandbox_init).
    """
    cg = cgroups.Cgroup(spec["cgroup"])
    cg.create()
    limits = spec.get("limits", {})
    cg.set_limits(limits.get("memory_bytes"), limits.get("cpu"), limits.get("pids"))
    if limits.get("cpu_weight"):
        cg.set_weight(limits["cpu_weight"])

    root = spec["rootfs"]
    if not os.path.ismount(root):
        opts = f"lowerdir={':'.join(spec['lowerdirs'])},upperdir={spec['upper']},workdir={spec['work']}"
        syscalls.mount("overlay", root, "overlay", 0, opts)
    _host_binds(root, spec.get("host_binds", []), spec["uid_map"][1])

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    try:
        pid = syscalls.fork_into(NAMESPACES)
    except BaseException:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        raise
    if pid == 0:
        _pid_1(spec, (ready_r, ready_w), (go_r, go_w))
    os.close(ready_w)
    os.close(go_r)
    try:
        cg.add(pid)
        uid = spec["uid_map"]  # [inside, outside, count]
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"{uid[0]} {uid[1]} {uid[2]}\n")
        os.write(go_w, b"g")
    except BaseException:
        os.kill(pid, 9)
        os.close(ready_r)
        raise
    finally:
        os.close(go_w)
    return Launch(cg, pid, ready_r, spec.get("ready_timeout", 20))


def _pid_1(spec: dict, ready: tuple[int, int], go: tuple[int, int]) -> None:
    """The clone: wait for the launcher's go (cgroup joined, id maps written), become root of the
    new user namespace, set the sandbox up. Never returns."""
    try:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)  # the fork server ignores it; an exec keeps that
        os.close(ready[0])
        os.close(go[1])
        if os.read(go[0], 1) != b"g":  # the launcher failed, or died
            os._exit(1)
        os.close(go[0])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        os.setgroups([])
    except BaseException as e:
        try:
            os.write(ready[1], f"error: {e}".encode()[:4000])
        finally:
            os._exit(1)
    _sandbox_init(spec, ready[1])


def finish(launch: Launch) -> dict:
    """The launch's result once its agent said `ok`, failed (its message) or timed out."""
    os.close(launch.ready)
    if launch.said != b"ok":
        launch.cgroup.kill()
        return {"error": launch.said.decode(errors="replace") or "guest agent exited before it was ready"}
    return {"pid": launch.pid, "start_time": process_start_time(launch.pid)}


def _begin(conn: _socket.socket) -> Launch | dict:
    try:
        conn.settimeout(10)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        return start(protocol.decode_json(data))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _answer(conn: _socket.socket, result: dict) -> None:
    try:
        conn.sendall(protocol.dumps(result).encode() + b"\n")
    except OSError:  # the server went away; the next one adopts or sweeps the sandbox
        return
    finally:
        conn.close()


def serve(sock_path: str) -> None:
    """Fork server: start sandboxes on request, without an interpreter start for any of them.

    Protocol: the client sends the spec as JSON and shuts down its write side; the reply, once the
    agent is ready (or has failed), is one JSON line. Single-threaded: the host's part of each
    launch (a few syscalls: cgroup, mounts, clone, id maps) runs here one at a time, and the waits
    for the agents run side by side in the poll loop. The server dies with its parent (the cove
    server), which starts a new one; sandboxes are unaffected.
    """
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, _signal.SIGKILL)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # pid 1s are reaped by the kernel
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o600)
    listener.listen(128)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    gc.freeze()  # a sandbox's collector then leaves our objects' pages alone (fewer copy-on-write faults)
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    waiting: dict[int, tuple[Launch, _socket.socket]] = {}
    while True:
        soonest = min((launch.deadline for launch, _ in waiting.values()), default=None)
        timeout = None if soonest is None else max(0, int((soonest - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(timeout):
            if fd == listener.fileno():
                conn = _socket.socket(fileno=listener._accept()[0])
                begun = _begin(conn)
                if isinstance(begun, dict):
                    _answer(conn, begun)
                else:
                    waiting[begun.ready] = (begun, conn)
                    poller.register(begun.ready, select.POLLIN)
                continue
            launch, conn = waiting[fd]
            chunk = os.read(fd, 4096)
            launch.said += chunk
            if chunk and launch.said != b"ok":
                continue
            del waiting[fd]
            poller.unregister(fd)
            _answer(conn, finish(launch))
        now = time.monotonic()
        for fd, (launch, conn) in list(waiting.items()):
            if now >= launch.deadline:
                launch.said = launch.said or b"error: guest agent did not become ready in time"
                del waiting[fd]
                poller.unregister(fd)
                _answer(conn, finish(launch))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "--serve":
        sys.stderr.write("usage: launcher.py --serve SOCKET\n")
        sys.exit(2)
    serve(sys.argv[2])


if __name__ == "__main__":
    main()
