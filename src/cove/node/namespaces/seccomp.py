"""The sandbox's seccomp filter: a deny list in classic BPF, built without libseccomp.

Denied calls fail with EPERM (ENOSYS for clone3, so libc falls back to clone, whose flags we can
inspect). The list follows Docker's default profile for a container without CAP_SYS_ADMIN: no
mounting, no new namespaces, no kernel keyring, module loading, kexec, bpf or perf, no clock or
swap changes, and no io_uring (a large kernel surface that bypasses per-syscall filtering; Docker
blocks it too). Standard library only (the launcher imports it).
"""

from __future__ import annotations

import ctypes
import errno
import struct

from cove import syscalls

# Syscall numbers per architecture (x86_64 table / asm-generic table used by aarch64).
_X86_64 = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "swapon": 167, "swapoff": 168, "reboot": 169,
    "acct": 163, "settimeofday": 164, "init_module": 175, "delete_module": 176, "finit_module": 313,
    "kexec_load": 246, "kexec_file_load": 320, "keyctl": 250, "add_key": 248, "request_key": 249,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "unshare": 272, "setns": 308,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "syslog": 103, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "iopl": 172, "ioperm": 173, "quotactl": 179,
    "lookup_dcookie": 212, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "clone": 56, "clone3": 435,
}  # fmt: skip
_AARCH64 = {
    "mount": 40, "umount2": 39, "pivot_root": 41, "swapon": 224, "swapoff": 225, "reboot": 142,
    "acct": 89, "settimeofday": 170, "init_module": 105, "delete_module": 106, "finit_module": 273,
    "kexec_load": 104, "kexec_file_load": 294, "keyctl": 219, "add_key": 217, "request_key": 218,
    "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "unshare": 97, "setns": 268,
    "open_by_handle_at": 265, "name_to_handle_at": 264, "syslog": 116, "clock_settime": 112,
    "clock_adjtime": 266, "adjtimex": 171, "quotactl": 60, "lookup_dcookie": 18, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
    "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "clone": 220, "clone3": 435,
}  # fmt: skip
_ARCH = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}

DENIED = tuple(n for n in _X86_64 if n not in ("clone", "clone3"))
NAMESPACE_FLAGS = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWCGROUP
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWUSER
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWNET
)

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_X32_BIT = 0x40000000


def supported() -> bool:
    return syscalls.MACHINE in _ARCH


def build_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions."""
    arch, table = _ARCH[machine or syscalls.MACHINE]
    eperm = _RET_ERRNO | errno.EPERM
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 1, 0, arch),
        (_RET_K, 0, 0, eperm),  # a foreign ABI gets nothing
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch == 0xC000003E:
        prog += [(_JGE_K, 0, 1, _X32_BIT), (_RET_K, 0, 0, eperm)]  # x32 syscalls
    for name in DENIED:
        prog += [(_JEQ_K, 0, 1, table[name]), (_RET_K, 0, 0, eperm)]
    prog += [(_JEQ_K, 0, 1, table["clone3"]), (_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]
    # clone(flags, ...): refuse namespace flags (args[0] low word is at offset 16 on little endian).
    prog += [
        (_JEQ_K, 0, 3, table["clone"]),
        (_LD_W_ABS, 0, 0, 16),
        (_JSET_K, 0, 1, NAMESPACE_FLAGS),
        (_RET_K, 0, 0, eperm),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    return prog


def install() -> None:
    """Load the filter into the calling thread (requires no_new_privs or CAP_SYS_ADMIN)."""
    prog = build_program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    syscalls.prctl(syscalls.PR_SET_SECCOMP, syscalls.SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
