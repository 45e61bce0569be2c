"""Users and paths: who an operation acts as (looked up in the sandbox's own /etc/passwd), the switch
to that user and back, and paths relative to the user's home."""

from __future__ import annotations

import os
import pwd

from .config import CONFIG
from .errors import OpError


class User:
    __slots__ = ("gid", "home", "known", "name", "uid")

    def __init__(self, name: str, uid: int, gid: int, home: str, known: bool) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home
        self.known = known


def resolve_user(spec: object) -> User:
    """A user by name or uid, looked up in the sandbox's own /etc/passwd."""
    if spec is None or spec == "":
        spec = CONFIG["user"]
        if spec is None or spec == "":
            spec = os.geteuid()
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise OpError("invalid", "user must be a name or a uid")
    if isinstance(spec, int) or spec.isdigit():
        uid = int(spec)
        if not 0 <= uid < 2**32 - 1:  # (uid_t)-1 means "unchanged" to the kernel
            raise OpError("invalid", f"uid {uid} is out of range")
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            # Like `docker exec --user 1234`: an unnamed uid is allowed.
            return User(str(uid), uid, uid, "/", False)
    else:
        try:
            pw = pwd.getpwnam(spec)
        except KeyError:
            raise OpError("invalid", f"unknown user {spec!r}") from None
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/", True)


def become(user: User) -> None:
    """Switch this process to ``user`` (groups, gid, uid), so kernel permission checks apply."""
    euid = os.geteuid()
    if euid != 0:
        if user.uid == euid:
            return
        raise OpError(
            "permission_denied", f"cannot act as user {user.name!r}: the agent does not run as root"
        )
    if not ROOT_GROUPS:
        ROOT_GROUPS.append(os.getgroups())
    groups = group_list(user) if user.known else [user.gid]
    try:
        os.setgroups(groups)
    except PermissionError:
        # In a user namespace with setgroups denied we cannot change them; that is only safe when
        # we hold no other supplementary group.
        if set(os.getgroups()) - {user.gid}:
            raise
    # The saved ids stay root, so a handler can return to root for its connection's next request
    # (restore_root). The kernel clears the effective capabilities meanwhile, and a command the
    # handler starts gets the user's ids as all three (execve copies the effective id to the saved).
    os.setresgid(user.gid, user.gid, 0)
    os.setresuid(user.uid, user.uid, 0)


ROOT_GROUPS: list[list[int]] = []  # a handler's supplementary groups before its first switch
# getgrouplist() by (name, gid), valid while /etc/group is the same file unchanged: it parses the
# whole file on every user switch (~70 µs of each exec). Primed in pid 1, inherited by its handlers.
GROUP_FILE = "/etc/group"
_GROUPS: dict[tuple[str, int], tuple[tuple[int, int, int, int], list[int]]] = {}


def group_list(user: User) -> list[int]:
    """The user's supplementary groups (as getgrouplist), cached while /etc/group is unchanged."""
    try:
        st = os.stat(GROUP_FILE)
        sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        sig = (0, 0, 0, 0)
    key = (user.name, user.gid)
    hit = _GROUPS.get(key)
    if hit is not None and hit[0] == sig and sig != (0, 0, 0, 0):
        return list(hit[1])
    groups = os.getgrouplist(user.name, user.gid)
    _GROUPS[key] = (sig, groups)
    return list(groups)


def restore_root() -> bool:
    """Undo become() after an operation, so the handler can serve the next one; False if it cannot."""
    if ROOT_GROUPS:
        try:
            if os.geteuid() != 0:
                os.setresuid(0, 0, 0)  # first: it restores the capabilities the rest needs
            os.setresgid(0, 0, 0)
            if os.getgroups() != ROOT_GROUPS[0]:
                os.setgroups(ROOT_GROUPS[0])
        except OSError:
            return False
    OWNER.clear()
    try:
        os.chdir("/")
    except OSError:
        return False
    return not ROOT_GROUPS or os.geteuid() == 0


def norm_path(path: object, home: str) -> str:
    if not isinstance(path, str) or not path:
        raise OpError("invalid", "path must be a non-empty string")
    if "\0" in path:
        raise OpError("invalid", "path contains a NUL byte")
    full = os.path.normpath(os.path.join(home, path))
    if full.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it); we do not need it
        full = "/" + full.lstrip("/")
    return full


# The user whose files an operation with an `owner` creates: it runs with root's permissions and
# hands what it creates to this user (how e2b's envd works). None: entries keep the acting user's ids.
OWNER: list[User] = []


def give(path: str, fd: int | None = None) -> None:
    if OWNER:
        if fd is not None:
            os.fchown(fd, OWNER[0].uid, OWNER[0].gid)
        else:
            os.lchown(path, OWNER[0].uid, OWNER[0].gid)


def ensure_workdir() -> None:
    """Create the sandbox's working directory if the template lacks it (as Docker's WORKDIR does),
    owned by the sandbox's user, so a sandbox created with a new workdir can run commands at once."""
    workdir = CONFIG["workdir"]
    if not workdir or os.path.isdir(workdir) or os.geteuid() != 0:
        return
    try:
        owner = resolve_user(CONFIG["user"])
        missing = []
        head = os.path.normpath(workdir)
        while head != "/" and not os.path.lexists(head):
            missing.append(head)
            head = os.path.dirname(head)
        os.makedirs(workdir, 0o755, exist_ok=True)
        for created in missing:
            os.chown(created, owner.uid, owner.gid)
    except (OSError, OpError):
        pass  # then commands report the missing directory themselves
