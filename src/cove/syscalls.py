"""Thin ctypes wrappers for the Linux calls Python's os module lacks.

Standard library only: the sandbox launcher imports this on every create.
"""

from __future__ import annotations

import _signal
import _socket
import ctypes
import fcntl
import os
import struct

# The C library this interpreter runs on (its symbols are global): no ctypes.util, which imports
# re, subprocess and shutil into every sandbox's pid 1.
_libc = ctypes.CDLL(None, use_errno=True)
MACHINE = os.uname().machine

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
SECCOMP_MODE_FILTER = 2

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
# Calls that must keep the GIL: the interpreter's own fork hooks, and a clone whose child runs on.
_pyapi = ctypes.PyDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def fork_into(namespaces: int) -> int:
    """os.fork() whose child starts in new namespaces (CLONE_NEW* flags): one clone(2) instead of a
    fork, an unshare and, for a new pid namespace, a second fork. Returns 0 in the child.

    The interpreter's fork hooks run around it exactly as os.fork runs them (import lock,
    os.register_at_fork callbacks, thread state); the caller must be single-threaded.
    """
    nr = _SYS_CLONE.get(MACHINE)
    if nr is None:
        raise OSError(f"clone: unsupported architecture {MACHINE}")
    _pyapi.PyOS_BeforeFork()
    # clone(flags, stack=NULL: the child runs on a copy of ours, parent_tid, child_tid, tls)
    pid = _pyapi.syscall(
        ctypes.c_long(nr), ctypes.c_ulong(namespaces | _signal.SIGCHLD), None, None, None, ctypes.c_ulong(0)
    )
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace `fd` refers to (a pidfd enters the process's)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    ret = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(ret, f"mount {source or fstype} on {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT[MACHINE]
    _check(_libc.syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()), "pivot_root")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def prctl(option: int, arg2: int | ctypes.c_void_p = 0, arg3: int = 0) -> None:
    a2 = arg2 if isinstance(arg2, ctypes.c_void_p) else ctypes.c_ulong(arg2)
    _check(
        _libc.prctl(ctypes.c_int(option), a2, ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        "prctl",
    )


def drop_bounding_caps(keep: set[int]) -> None:
    """Remove every capability not in `keep` from the bounding set (inherited across exec)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)


def limit_caps(keep: set[int]) -> None:
    """Permitted and effective capabilities to `keep`, inheritable to none: what an exec as root
    under that bounding set gives, for a process that runs on without one."""
    mask = sum(1 << cap for cap in keep)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    # Two {effective, permitted, inheritable} triples: capabilities 0-31, then 32-63.
    data = (ctypes.c_uint32 * 6)(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0)
    _check(_libc.capset(header, data), "capset")


def set_loopback_up() -> None:
    """`ip link set lo up` without the ip binary: SIOCGIFFLAGS / SIOCSIFFLAGS on lo."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), siocgifflags, ifreq))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14x", b"lo", flags | iff_up))
    finally:
        s.close()


def mount_flags_of(path: str) -> int:
    """The MS_* flags a bind mount of `path` must keep when remounted inside a user namespace."""
    st = os.statvfs(path).f_flag
    flags = 0
    for st_flag, ms_flag in (
        (os.ST_NOSUID, MS_NOSUID),
        (os.ST_NODEV, MS_NODEV),
        (os.ST_NOEXEC, MS_NOEXEC),
        (os.ST_NOATIME, MS_NOATIME),
        (os.ST_NODIRATIME, MS_NODIRATIME),
        (os.ST_RELATIME, MS_RELATIME),
    ):
        if st & st_flag:
            flags |= ms_flag
    return flags


def set_cmdline(title: str) -> None:
    """Show `title` as this process's command line and an empty environment, as an exec would.

    A process that runs on without exec keeps its parent's argv and environ memory, which
    /proc/PID/cmdline and /proc/PID/environ read. setproctitle's way: with the argv area's last
    byte not NUL, the kernel reads it up to the first NUL instead.
    """
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(fields[i]) for i in range(45, 49))  # fields 48-51
    size = arg_end - arg_start
    raw = title.encode()[: size - 2] + b"\0"
    ctypes.memmove(arg_start, raw + b" " * (size - len(raw)), size)
    if env_end > env_start:
        ctypes.memset(env_start, 0, env_end - env_start)


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: tells a re-used pid from the process we started."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])
