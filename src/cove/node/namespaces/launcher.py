"""Start one sandbox: cgroup, overlay root, namespaces, then exec the guest agent as its pid 1.

Run as `python3 -I -S launcher.py` with the launch spec (JSON) on stdin; prints `{"pid": …}` and exits
once the guest agent serves. The sandbox does not stay our child: the process that creates the
namespaces exits, so pid 1 is re-parented away from the server and survives server restarts (the
agent itself is the per-sandbox supervisor that owns every process in the sandbox).

Process shape (see docs/architecture.md):
    launcher ──fork──> A: join cgroup, unshare(user|mnt|pid|net|uts|ipc), wait for the id maps
                          └─fork──> B (pid 1): mounts, pivot_root, drop privileges, become the agent
B becomes the agent without an exec: the fork server runs the guest's interpreter and has the agent
imported, so a sandbox costs no interpreter start (about 9 ms of CPU here, a fifth of a whole
create, exec and kill). Only a root with its own /usr (`rootfs: full`) execs the host's interpreter
through its loader: there the host's files are not at their own paths, which the agent's lazy
imports and CRIU's restore of its mapped files both need. Standard library only.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import socket
import sys
import time

if __package__ in (None, ""):  # run by path: make `cove` importable without the site machinery
    sys.path.insert(
        0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    )

from cove.guest import agent
from cove.node.namespaces import cgroups, seccomp, syscalls
from cove.node.namespaces.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
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
PROC_MASKED_DIRS = ("acpi", "scsi", "asound", "driver")
PROC_READONLY = ("sys", "bus", "fs", "irq")
AGENT_SOCKET = "/run/cove/sock/agent.sock"
AGENT_FD = 3
READY_FD = 4


def _fail(msg: str) -> None:
    sys.stdout.write(json.dumps({"error": msg}) + "\n")
    sys.stdout.flush()
    os._exit(1)


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
    agent_dir = root + "/run/cove"
    os.makedirs(agent_dir, exist_ok=True)
    # Read-write, but only sock/ belongs to the sandbox's root: the rest is host root's (unmapped here).
    syscalls.mount(spec["run_dir"], agent_dir, None, MS_BIND)
    syscalls.mount(None, agent_dir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount(".", MNT_DETACH)
    os.chdir("/")


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


def _listen() -> socket.socket:
    """The agent's socket, bound inside the sandbox (so CRIU checkpoints it like any other file).

    Its directory belongs to the sandbox's root; mode 0600 keeps the sandbox's other users out. The
    host connects through an O_PATH handle, never following a symlink the sandbox may plant there.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
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
            argv = [*spec["loader"], spec["python"], "-I", "-S", spec.get("agent", "/run/cove/agent.pyc")]
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


def launch(spec: dict) -> dict:
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
    to_a_r, to_a_w = os.pipe()
    from_a_r, from_a_w = os.pipe()
    a = os.fork()
    if a == 0:  # process A
        try:
            os.close(ready_r)
            os.close(to_a_w)
            os.close(from_a_r)
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, 9)
            cg.add(os.getpid())
            syscalls.unshare(
                syscalls.CLONE_NEWUSER
                | syscalls.CLONE_NEWNS
                | syscalls.CLONE_NEWPID
                | syscalls.CLONE_NEWNET
                | syscalls.CLONE_NEWUTS
                | syscalls.CLONE_NEWIPC
            )
            os.write(from_a_w, b"u")
            if os.read(to_a_r, 1) != b"g":
                os._exit(1)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            os.setgroups([])
            b = os.fork()
            if b == 0:
                os.close(from_a_w)
                _sandbox_init(spec, ready_w)
            os.write(from_a_w, str(b).encode())
            os._exit(0)
        except BaseException as e:
            os.write(ready_w, f"error: {e}".encode())
            os._exit(1)

    os.close(ready_w)
    os.close(to_a_r)
    os.close(from_a_w)
    if os.read(from_a_r, 1) != b"u":
        os.waitpid(a, 0)
        return {"error": os.read(ready_r, 4000).decode(errors="replace") or "namespace setup failed"}
    uid = spec["uid_map"]  # [inside, outside, count]
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{a}/{name}", "w") as f:
            f.write(f"{uid[0]} {uid[1]} {uid[2]}\n")
    os.write(to_a_w, b"g")
    raw = os.read(from_a_r, 32)
    os.waitpid(a, 0)
    if not raw:
        return {"error": os.read(ready_r, 4000).decode(errors="replace") or "sandbox init failed"}
    pid = int(raw)
    msg = _read_all(ready_r, timeout=spec.get("ready_timeout", 20))
    if msg != b"ok":
        cg.kill()
        return {"error": msg.decode(errors="replace") or "guest agent exited before it was ready"}
    return {"pid": pid, "start_time": process_start_time(pid)}


def _read_all(fd: int, timeout: float) -> bytes:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            return out or b"error: guest agent did not become ready in time"
        chunk = os.read(fd, 4096)
        if not chunk:
            return out
        out += chunk
        if out == b"ok":
            return out


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: tells a re-used pid from the process we started."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def launch_safely(spec: dict) -> dict:
    try:
        return launch(spec)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def serve(sock_path: str) -> None:
    """Fork server: launch sandboxes on request without paying an interpreter start each time.

    Protocol: the client sends the spec as JSON and shuts down its write side; the reply is one
    JSON line. Each request is handled in a forked child, so a failure never takes the server down.
    The server dies with its parent (the cove server), which restarts it; sandboxes are unaffected.
    """
    import signal

    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o600)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    gc.freeze()  # a launch's (and an agent's) collector then leaves our objects' pages alone
    while True:
        conn, _ = listener.accept()
        me = os.getpid()
        if os.fork() == 0:
            # A launch the dead server never hears of must not finish after its successor adopted.
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != me:
                os._exit(1)
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            result = launch_safely(json.loads(data))
            conn.sendall(json.dumps(result).encode() + b"\n")
            os._exit(0)
        conn.close()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
        return
    result = launch_safely(json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0 if "pid" in result else 1)


if __name__ == "__main__":
    main()
