"""What the file operations say about an entry: its type, size, mode, owner, times, symlink target and
`user.` extended attributes."""

from __future__ import annotations

import grp
import os
import pwd
import stat


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


def make_entry(path: str, st: os.stat_result | None = None, xattrs: bool = False) -> dict:
    if st is None:
        st = os.lstat(path)
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "other")
    entry = {
        "name": os.path.basename(path) or "/",
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "permissions": stat.filemode(st.st_mode),
        "owner": _user_name(st.st_uid),
        "group": _group_name(st.st_gid),
        "mtime": st.st_mtime,
        "symlink_target": os.readlink(path) if kind == "symlink" else None,
    }
    if xattrs:
        entry["xattrs"] = user_xattrs(path)
    return entry


def user_xattrs(path: str) -> dict[str, str]:
    """The entry's extended attributes in the `user.` namespace (a symlink's own, not its target's);
    {} where the file system has none."""
    found: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return found
    for name in names:
        if name.startswith("user."):
            try:
                found[name] = os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "replace")
            except OSError:
                continue  # removed meanwhile
    return found
